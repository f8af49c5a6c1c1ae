"""The testing switch: every retry in the process skips its waits (`set_testing`).

One switch for the process, read by the attempt loop (`RetryPolicy.run`) each time a call
starts; users reach it through `atoma_images.testing` and the pytest plugin's fixtures
(docs/architecture.md, the module map).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import attrs

from ._checks import check_flag

__all__ = ["TestingSetting", "is_testing", "set_testing", "waiting_with"]


@attrs.define
class _Testing:
    """Whether retries skip their waits (`set_testing`): one switch for the process."""

    on: bool = False


_testing = _Testing()


@attrs.frozen
class TestingSetting:
    """Returned by `set_testing`: as a context manager, it restores the previous setting."""

    previous: bool

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc_info: object) -> None:
        _testing.on = self.previous


def set_testing(on: bool) -> TestingSetting:
    """Make every retry policy skip its waits (True), or wait again (False).

    The number of attempts and every decision stay as they are; only the sleeping is left
    out. It applies to every client in the process, on every thread. Use it as a statement,
    or as ``with set_testing(True):`` to restore the previous setting at the end.
    """
    check_flag("set_testing", on)
    setting = TestingSetting(_testing.on)
    _testing.on = on
    return setting


def is_testing() -> bool:
    """Whether `set_testing` has turned waiting off."""
    return _testing.on


async def _skip_wait(_: float) -> None:
    await asyncio.sleep(0)  # still yield to the loop, as a real wait would


def waiting_with(sleep: Callable[[float], Awaitable[None]]) -> Callable[[float], Awaitable[None]]:
    """The sleep a retry loop uses now: ``sleep``, or no wait at all under `set_testing`."""
    return _skip_wait if _testing.on else sleep
