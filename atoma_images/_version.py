"""The installed version, read once and only when asked (importing the package stays cheap)."""

from __future__ import annotations

import functools
import sys

import aiohttp

__all__ = ["package_version", "user_agent"]


@functools.cache
def package_version() -> str:
    # importlib.metadata costs ~10 ms to import: pay it when a client is made, not on import.
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    try:
        return version("atoma-images")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


@functools.cache
def user_agent() -> str:
    python = ".".join(map(str, sys.version_info[:3]))
    return (
        f"atoma-images/{package_version()} aiohttp/{aiohttp.__version__} "
        f"{sys.implementation.name}/{python}"
    )
