"""The read timeout of the client's own connections, at the cost of one timer per response.

aiohttp enforces ``sock_read`` (our ``Timeout.read``) by cancelling its timer and scheduling
a new one whenever bytes arrive: two or more timers for every response, each pushed onto
and later pulled off the event loop's heap. On the loopback benchmark that was the largest
single cost a call had over raw aiohttp (about 8 % of its CPU at 16 in flight).

`LazyReadTimeoutHandler` keeps aiohttp's meaning exactly: the timeout fires ``sock_read``
seconds after the request was sent or the last byte arrived. It moves a deadline instead of
a timer; the one timer, when it fires early, re-arms itself for what is left.

It reaches into two aiohttp internals, unchanged from 3.10 to 3.14: the connector's
``_factory`` and ``ResponseHandler._reschedule_timeout``. `install` acts only on those
versions (`TESTED`) and when both look as expected; otherwise it leaves the connector alone,
which is only slower. A session passed in by the user is never touched.
tests/test_timeout.py checks that it is in place on the installed aiohttp, and the
read-timeout tests (stall, drip) check what it does.
"""

from __future__ import annotations

import functools

import aiohttp
from aiohttp.client_proto import ResponseHandler

__all__ = ["TESTED", "LazyReadTimeoutHandler", "install"]

#: The aiohttp versions (major, minor) whose internals this was checked against.
TESTED = ((3, 10), (3, 14))


class LazyReadTimeoutHandler(ResponseHandler):
    """aiohttp's protocol, with a read timer that is moved lazily rather than replaced."""

    _read_deadline = 0.0

    def _reschedule_timeout(self) -> None:
        timeout = self._read_timeout
        handle = self._read_timeout_handle
        if not timeout:
            self._drop_timeout()
            return
        deadline = self._loop.time() + timeout
        self._read_deadline = deadline
        # A timer that would fire later than the new deadline (a shorter sock_read on a
        # reused connection) is replaced; an earlier one will find the deadline moved.
        if handle is None or handle.when() > deadline:
            if handle is not None:
                handle.cancel()
            self._read_timeout_handle = self._loop.call_at(deadline, self._check_deadline)

    def _check_deadline(self) -> None:
        self._read_timeout_handle = None
        deadline = self._read_deadline
        if self._loop.time() < deadline:  # bytes arrived since the timer was set
            self._read_timeout_handle = self._loop.call_at(deadline, self._check_deadline)
        else:
            self._on_read_timeout()


def install(connector: aiohttp.BaseConnector) -> bool:
    """Make ``connector`` build `LazyReadTimeoutHandler` connections; False if it cannot."""
    factory = getattr(connector, "_factory", None)
    if not (
        TESTED[0] <= _version(aiohttp.__version__) <= TESTED[1]
        and isinstance(factory, functools.partial)
        and factory.func is ResponseHandler
        and callable(getattr(ResponseHandler, "_reschedule_timeout", None))
        and callable(getattr(ResponseHandler, "_on_read_timeout", None))
    ):
        return False
    connector._factory = functools.partial(  # type: ignore[assignment]
        LazyReadTimeoutHandler, *factory.args, **factory.keywords
    )
    return True


def _version(text: str) -> tuple[int, int]:
    major, _, rest = text.partition(".")
    minor = "".join(c for c in rest.partition(".")[0] if c.isdigit())
    return (int(major), int(minor or 0)) if major.isdigit() else (0, 0)
