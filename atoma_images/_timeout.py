"""Time limits for one attempt, and their translation into aiohttp's terms."""

from __future__ import annotations

import math
from typing import Any

import aiohttp
import attrs

from ._errors import InvalidRequestError

__all__ = ["Timeout"]


def seconds_validator(owner: str, *, allow_zero: bool = False, allow_none: bool = False) -> Any:
    """An attrs validator for a duration: a finite number of seconds, positive or >= 0."""
    allowed = "a finite number of seconds " + (">= 0" if allow_zero else "> 0")
    if allow_none:
        allowed += ", or None"

    def check(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if value is None and allow_none:
            return
        if (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and math.isfinite(value)
            and (value > 0 or (allow_zero and value == 0))
        ):
            return
        raise InvalidRequestError(f"{owner}.{attribute.name}", value, f"allowed: {allowed}")

    return check


_check_limit = seconds_validator("timeout", allow_none=True)

#: The shortest time an attempt is given; a deadline shorter than this cannot fit one.
MIN_ATTEMPT = 0.001
# The connect phase (pool wait and connecting) must end, with aiohttp's ConnectionTimeoutError,
# this much before the attempt's total limit: that error proves nothing was sent, while the
# total limit firing during the wait would leave the client unable to say so.
_CONNECT_MARGIN = 0.05


@attrs.frozen(kw_only=True)
class Timeout:
    """Time limits for one attempt; None means no limit of that kind.

    Attributes:
        connect: establishing a new connection (DNS, TCP, TLS).
        read: the longest silence while waiting for or reading the response. Generation
            takes 10 to 90 s before the first byte, so the default is generous.
        pool: waiting for a free connection when ``max_connections`` are busy; a request
            that waited this long was never sent. (aiohttp measures this wait together
            with connecting, so the bound for both is ``pool + connect``.)
        total: the whole attempt, from asking for a connection to the last byte.

    The retry policy's ``deadline`` bounds the whole call, every attempt and wait
    included; no attempt is allowed more time than remains of it.
    A float where a `Timeout` is accepted means ``Timeout(total=that_float)``.
    """

    connect: float | None = attrs.field(default=10.0, validator=_check_limit)
    read: float | None = attrs.field(default=300.0, validator=_check_limit)
    pool: float | None = attrs.field(default=30.0, validator=_check_limit)
    total: float | None = attrs.field(default=None, validator=_check_limit)

    @classmethod
    def of(cls, value: Timeout | float) -> Timeout:
        """``value`` as a `Timeout`: a `Timeout` as is, a number as the whole attempt's limit."""
        if isinstance(value, Timeout):
            return value
        if type(value) in (int, float):
            return cls(total=value)
        raise InvalidRequestError(
            "timeout", value, "allowed: a Timeout, a positive number of seconds, or None"
        )

    def attempt_seconds(self, remaining: float) -> float:
        """How long an attempt may take when ``remaining`` seconds are left of the deadline."""
        if self.total is not None and self.total <= remaining:
            return self.total
        return max(remaining, MIN_ATTEMPT)

    def for_attempt(self, remaining: float) -> aiohttp.ClientTimeout:
        """aiohttp's limits for an attempt that may take at most ``remaining`` seconds.

        aiohttp's ``connect`` covers the wait for a pooled connection and connecting; when it
        runs out, aiohttp raises ConnectionTimeoutError and nothing was sent. Its ``total``
        covers everything, and when it runs out nobody can tell whether the request was
        written. So ``connect`` always ends before ``total`` does, and neither is rounded up
        to a whole second (aiohttp's ``ceil_threshold``), which could swap their order.
        """
        total = self.attempt_seconds(remaining)
        connect = None if self.pool is None else self.pool + (self.connect or 0.0)
        before_total = total - min(_CONNECT_MARGIN, total / 10)
        connect = before_total if connect is None else min(connect, before_total)
        return aiohttp.ClientTimeout(
            total=total,
            connect=connect,
            sock_connect=self.connect,
            sock_read=self.read,
            ceil_threshold=math.inf,
        )
