"""What a budget and a rate limit must do, whatever store keeps them: `BudgetLike`,
`RateLimiter`, fixed time windows aligned to UTC, and the in-process `RateLimit`.

A budget is asked before each request is sent (`BudgetLike.reserve`) and told how the
request ended (`BudgetLike.settle`): what it billed, or may have billed, stays spent; the rest
is given back to the window it was reserved in. A rate limiter hands out one permit per
request (`RateLimiter.acquire`: how long to wait before sending) and hears when the server
asks every caller to wait (`RateLimiter.hold_off`). The in-process implementations are
`Budget` (``_budget.py``) and `RateLimit`; ``atoma_images.redis`` keeps both in Redis, so
that every replica of a service shares them.
"""

from __future__ import annotations

import calendar
import collections
import datetime
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import attrs

from ._checks import check_whole_number
from ._errors import (
    APITimeoutError,
    AtomaImagesError,
    InvalidRequestError,
    RateLimitUnavailableError,
)
from ._retry_after import parse_retry_after
from ._testing_switch import waiting_with
from ._timeout import MIN_ATTEMPT

if TYPE_CHECKING:
    from ._retry import RetryPolicy

__all__ = [
    "BudgetLike",
    "Pacing",
    "Per",
    "RateLimit",
    "RateLimiter",
    "Reservation",
    "check_per",
    "utc",
    "window_of",
]

logger = logging.getLogger("atoma_images")

Per = Literal["second", "minute", "hour", "day", "month"]
"""The length of a window: a budget's (``"minute"``, ``"hour"``, ``"day"``, ``"month"``),
each fixed and aligned to UTC (a day runs from 00:00 UTC, a month from the 1st at 00:00
UTC); a rate limit's sliding one (``"second"``, ``"minute"``, ``"hour"``, ``"day"``)."""

#: The fixed lengths, in seconds (a month has none: it is read from the calendar).
_SECONDS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}


def check_per(name: str, value: object, *, allow_none: bool, allowed: tuple[str, ...]) -> None:
    """``value`` must be one of ``allowed`` (or None when ``allow_none``)."""
    if value is None and allow_none:
        return
    if not isinstance(value, str) or value not in allowed:
        words = ", ".join(repr(a) for a in allowed) + (" or None" if allow_none else "")
        raise InvalidRequestError(name, value, f"allowed: {words}")


def window_of(per: Per, now: float) -> tuple[int, int]:
    """The window of length ``per`` that holds ``now`` (seconds since the epoch): its start
    and its end, in whole seconds since the epoch, aligned to UTC."""
    if per == "month":
        day = datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
        year, month = day.year, day.month
        start = calendar.timegm((year, month, 1, 0, 0, 0))
        end = calendar.timegm((year + month // 12, month % 12 + 1, 1, 0, 0, 0))
        return start, end
    length = _SECONDS[per]
    start = int(now // length) * length
    return start, start + length


def utc(seconds: int | None) -> datetime.datetime | None:
    """A time in seconds since the epoch as an aware UTC datetime (None stays None)."""
    if seconds is None:
        return None
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)


@attrs.frozen
class Reservation:
    """Units set aside in a budget for requests about to be sent.

    Attributes:
        units: the units set aside.
        window: the start of the window they were set aside in (seconds since the epoch,
            UTC), or None for a budget without windows. What is given back goes there.
        resets_at: when that window ends (None without windows).
    """

    units: int
    window: int | None = None
    resets_at: datetime.datetime | None = None


@runtime_checkable
class BudgetLike(Protocol):
    """What a client and a call accept as ``budget=``: a cap on compute units, in any store.

    `Budget` keeps one in the process, and `atoma_images.redis.RedisBudget` in Redis, shared
    by every replica of a service. To keep one elsewhere (a database, a billing service),
    write a class with these two coroutine methods; the client calls them so:

    - `reserve` before a call sends anything, for the cost of all its requests at once (on
      Atoma a call for ``n`` images is ``n`` requests, reserved together), and again before
      a retry of an attempt that may have been billed;
    - `settle` once for each request's share of a reservation when it ends, with the units
      it spent or may have spent: the rest goes back. A reservation whose request may have
      been billed is never given back; a reservation that is never settled (its process was
      killed) must stay counted as spent, because the server may bill it all the same.

    Both must be safe to call from many tasks at once, and `reserve` must check and set
    aside in one atomic step (never read, then write).
    """

    async def reserve(self, units: int) -> Reservation:
        """Set ``units`` aside for requests about to be sent, in the window that holds now.

        Raises:
            BudgetExceededError: they do not fit in what is left; nothing was set aside.
            BudgetUnavailableError: the store could not be asked (any other exception is
                reported to the caller as this one, with it as ``__cause__``).
        """
        ...

    async def settle(self, reservation: Reservation, spent: int) -> None:
        """A request ended: ``spent`` of the ``reservation.units`` were billed or may have
        been, and stay spent; give the rest back to ``reservation.window``.

        ``reservation`` may be one request's share of what `reserve` returned (same window,
        fewer units). An exception here is logged and the units stay spent: the call's
        images reach its caller all the same.
        """
        ...


@runtime_checkable
class RateLimiter(Protocol):
    """What a client accepts as ``rate_limit=``: one permit per request sent, for every call.

    `RateLimit` keeps one in the process; `atoma_images.redis.RedisRateLimit` in Redis, shared
    by every replica. Both also keep the cooldown the server asks for (429 with Retry-After).
    """

    async def acquire(self, *, waited: bool = False, within: float = math.inf) -> float:
        """Take a permit for one request: the seconds to wait before sending it (0: now).

        The permit is taken for the time returned, so the caller waits that long and then
        sends. A permit further than ``within`` seconds away is not taken: its seconds are
        returned all the same, and the caller does not send (its deadline comes first), so a
        refused request never pushes the next ones later. ``waited`` is True for the retry
        of a request the server told to wait: it has waited already, so the cooldown does
        not apply to it (the rate does).

        Raises:
            RateLimitUnavailableError: the store could not be asked; the request is not sent
                (any other exception is reported to the caller as this one).
        """
        ...

    async def hold_off(self, seconds: float) -> None:
        """The server asked to wait ``seconds``: no permit is for sooner than that."""
        ...

    async def cooldown(self) -> float:
        """The seconds left of the latest wait the server asked for (0: none). A request
        that waited for its permit asks again before it is sent: a 429 may have come in
        the meantime."""
        ...


def _check_requests(_: object, attribute: attrs.Attribute[int], value: object) -> None:
    check_whole_number(f"rate_limit.{attribute.name}", value, 1)


def _check_rate_per(_: object, attribute: attrs.Attribute[str], value: object) -> None:
    check_per("rate_limit.per", value, allow_none=False, allowed=tuple(_SECONDS))


@attrs.define(eq=False)
class RateLimit:
    """At most ``requests`` requests in any ``per`` (a sliding window), for every call of the
    clients given it; and one shared wait when the server asks for one (429 with Retry-After).

    ``AsyncImagesClient(rate_limit=RateLimit(requests=10, per="second"))``. A request waits
    for a permit before it is sent (each of the ``n`` requests of an Atoma call, and each
    retry), with its call's `RetryPolicy.sleep`, in the order the permits were asked for.
    Safe to share between threads and clients. For replicas, use
    `atoma_images.redis.RedisRateLimit`.

    Attributes:
        requests: the most requests in any window of ``per``.
        per: ``"second"``, ``"minute"``, ``"hour"`` or ``"day"``.
        clock: a monotonic clock in seconds (tests pass their own).
    """

    requests: int = attrs.field(validator=_check_requests)
    per: Per = attrs.field(default="second", validator=_check_rate_per)
    clock: Callable[[], float] = attrs.field(default=time.monotonic, repr=False)
    # The send times of the latest ``requests`` permits, oldest first.
    _sent: collections.deque[float] = attrs.field(init=False, repr=False)
    _not_before: float = attrs.field(init=False, default=float("-inf"), repr=False)
    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        self._sent = collections.deque(maxlen=self.requests)

    async def acquire(self, *, waited: bool = False, within: float = math.inf) -> float:
        """Take the earliest permit free: the seconds until its time (see `RateLimiter`)."""
        with self._lock:
            now = self.clock()
            slot = now if waited else max(now, self._not_before)
            if self._sent:  # permits are handed out in order: never before the latest
                slot = max(slot, self._sent[-1])
            if len(self._sent) == self.requests:  # the window ending at slot must hold room
                slot = max(slot, self._sent[0] + _SECONDS[self.per])
            if slot - now <= within:  # a permit the caller cannot wait for is not taken
                self._sent.append(slot)
            return slot - now

    async def hold_off(self, seconds: float) -> None:
        with self._lock:
            self._not_before = max(self._not_before, self.clock() + seconds)

    async def cooldown(self) -> float:
        with self._lock:
            return max(0.0, self._not_before - self.clock())


@attrs.define(eq=False, repr=False)
class Cooldown:
    """A client's own shared wait, around its rate limiter if it has one: after the server
    asks one call to wait (429 with Retry-After), no request of the client is sent before
    that time, whatever the limiter keeps (a user's own may keep no cooldown at all)."""

    limiter: RateLimiter | None = None
    clock: Callable[[], float] = attrs.field(default=time.monotonic)
    _not_before: float = attrs.field(init=False, default=float("-inf"))
    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)

    def __repr__(self) -> str:
        return "Cooldown()" if self.limiter is None else repr(self.limiter)

    def _left(self) -> float:
        with self._lock:
            return max(0.0, self._not_before - self.clock())

    async def acquire(self, *, waited: bool = False, within: float = math.inf) -> float:
        left = 0.0 if waited else self._left()
        if self.limiter is None or left > within:  # no permit is taken for a refused request
            return left
        return max(left, await self.limiter.acquire(waited=waited, within=within))

    async def hold_off(self, seconds: float) -> None:
        with self._lock:
            self._not_before = max(self._not_before, self.clock() + seconds)
        if self.limiter is not None:
            await self.limiter.hold_off(seconds)

    async def cooldown(self) -> float:
        left = self._left()
        return left if self.limiter is None else max(left, await self.limiter.cooldown())


#: How much later than a permit's time a cooldown must end to be a new one (the clocks of
#: a store and of this process differ by a little).
_SLACK = 0.05

#: The statuses whose Retry-After asks every caller to wait (RFC 9110 and RFC 6585).
_WAIT_STATUSES = frozenset({429, 503})


@attrs.define
class Pacing:
    """One request's use of its client's `RateLimiter`, attempt after attempt.

    Before each attempt is sent it takes a permit and waits for it, with the call's sleep (so
    an injected test sleep and `set_testing` apply); after each answer, a 429 or 503 with
    Retry-After makes the limiter hold off every request of the client that long (at most
    the policy's ``max_retry_after``). The retry of the request that was told to wait has
    waited already, in its retry policy: it takes its permit without the cooldown.
    """

    limiter: RateLimiter
    policy: RetryPolicy
    _waited: bool = False

    async def before_send(self, remaining: float) -> float:
        """Wait for a permit; what is then left of ``remaining`` seconds.

        A permit past the deadline is not taken. When the server asked every request to
        wait (429) while this one waited for its permit, that permit's time has passed: it
        takes another one, after the cooldown, until neither applies.

        Raises:
            APITimeoutError: the permit comes later than the call's deadline; nothing was sent.
            RateLimitUnavailableError: the limiter could not be asked; nothing was sent.
        """
        waited, self._waited = self._waited, False
        while True:
            latest = remaining - MIN_ATTEMPT
            asked = time.monotonic()
            delay = await self._ask(self.limiter.acquire, waited=waited, within=latest)
            if delay > latest:
                raise APITimeoutError(
                    f"the rate limit's next permit is {delay:.1f} s away, past the call's "
                    "deadline; the request was not sent"
                )
            if delay <= 0:  # checked against the cooldown when it was handed out
                return remaining
            await waiting_with(self.policy.sleep)(delay)
            remaining -= delay
            if waited:
                return remaining
            # The permit's time, from now: about 0 after a real wait (more with a test's).
            permit = max(0.0, delay - (time.monotonic() - asked))
            if await self._ask(self.limiter.cooldown) <= permit + _SLACK:
                return remaining  # no cooldown ends after the permit: it was counted

    async def _ask(self, method: Callable[..., Awaitable[float]], **arguments: Any) -> float:
        try:
            return await method(**arguments)
        except AtomaImagesError:
            raise
        except Exception as error:  # a limiter of the user's own: refused as unavailable
            raise RateLimitUnavailableError(
                f"the rate limit {self.limiter!r} could not be checked: {type(error).__name__}"
            ) from error

    async def after_answer(self, status: int, headers: Mapping[str, str]) -> None:
        """Hold off every request of the client if the server asked to wait."""
        if status not in _WAIT_STATUSES:
            return
        seconds = parse_retry_after(headers)
        if seconds is None or seconds <= 0:
            return
        self._waited = True
        try:
            await self.limiter.hold_off(min(seconds, self.policy.max_retry_after))
        except Exception:  # the answer still reaches the call; only the shared wait is lost
            logger.warning(
                "atoma-images: the rate limit %r could not hold off for the server's Retry-After",
                self.limiter,
                exc_info=True,
            )
