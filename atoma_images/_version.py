"""The installed version, read once and only when asked (importing the package stays cheap)."""

from __future__ import annotations

import functools
import platform
from importlib.metadata import PackageNotFoundError, version

import aiohttp

__all__ = ["package_version", "user_agent"]


@functools.cache
def package_version() -> str:
    try:
        return version("atoma-images")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


@functools.cache
def user_agent() -> str:
    return (
        f"atoma-images/{package_version()} aiohttp/{aiohttp.__version__} "
        f"{platform.python_implementation()}/{platform.python_version()}"
    )
