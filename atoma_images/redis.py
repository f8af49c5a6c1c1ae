"""A budget and a rate limit that every replica of a service shares, kept in Redis.

Needs the ``redis`` extra (``pip install 'atoma-images[redis]'``: redis-py's asyncio
client). ``import atoma_images`` never imports this module, nor redis-py.

```python
from atoma_images import AsyncImagesClient
from atoma_images.redis import RedisBudget, RedisRateLimit

url = "redis://redis:6379/0"
client = AsyncImagesClient(
    budget=RedisBudget(url, key="images:all", max_compute_units=10**9, per="day"),
    rate_limit=RedisRateLimit(url, key="images:atoma", requests=10, per="second"),
)
user_budget = RedisBudget(url, key=f"images:user:{user}", max_compute_units=..., per="day")
await client.generate(prompt, budget=user_budget)
```

Each step is one Lua script, run atomically by the Redis server (``EVALSHA``): a
reservation checks and sets aside in one step, never read then write. A reservation is
given back only by the process that made it, when its request was not billed: one held by a
process that died (SIGKILL, out of memory) stays spent, because the server may still bill
its request. A windowed budget's counts end with their window (the key expires). When Redis
cannot be reached, calls are refused before anything is sent, with
`BudgetUnavailableError` (`RateLimitUnavailableError` for the rate limit). The service guide
is docs/guide-replicas.md.
"""

from __future__ import annotations

import asyncio
import datetime
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from ._checks import check_whole_number
from ._errors import (
    BudgetExceededError,
    BudgetUnavailableError,
    ExtraNotInstalledError,
    InvalidRequestError,
    RateLimitUnavailableError,
)
from ._limits import Per, Reservation, check_per, utc, window_of

try:
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import RedisError
except ImportError as _missing:  # pragma: no cover - tested in a venv without the extra
    raise ExtraNotInstalledError("atoma_images.redis", "redis", "redis") from _missing

__all__ = ["RedisBudget", "RedisRateLimit"]

#: Seconds a Redis command may take (connecting included) before the call is refused.
DEFAULT_TIMEOUT = 5.0
# A window's key lives this long past the window's end, so that a replica whose clock is a
# little behind does not make a key that expires at once.
_WINDOW_GRACE = 3600

# KEYS[1]: the count; ARGV: units, the cap, seconds until the key expires (0: never).
# Returns {1, left after} when set aside, {0, left} when it does not fit.
_RESERVE = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local units = tonumber(ARGV[1])
local cap = tonumber(ARGV[2])
if used + units > cap then
  return {0, cap - used}
end
redis.call('INCRBY', KEYS[1], units)
if ARGV[3] ~= '0' then
  redis.call('EXPIRE', KEYS[1], ARGV[3])
end
return {1, cap - used - units}
"""

# KEYS[1]: the count; ARGV[1]: units to give back. An ended window (its key gone) is not
# made again.
_GIVE_BACK = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
return redis.call('DECRBY', KEYS[1], ARGV[1])
"""

# KEYS[1]: the permits' send times (a sorted set, in ms of the server's clock); KEYS[2]: the
# cooldown's end. ARGV: requests, the window (ms), 1 if the caller waited already, a unique
# member, the most ms the caller can wait (-1: any). Returns the ms to wait. Permits are
# handed out in order, each at the earliest time when the window ending at it holds fewer
# than `requests` others: no burst at an edge. A permit further away than the caller can
# wait is not taken: the refused request does not push the next ones later.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local requests = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local slot = now
if ARGV[3] == '0' then
  local cooldown = tonumber(redis.call('GET', KEYS[2]) or '0')
  if cooldown > slot then slot = cooldown end
end
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
if #last > 0 and tonumber(last[2]) > slot then slot = tonumber(last[2]) end
if redis.call('ZCARD', KEYS[1]) >= requests then
  local nth = redis.call('ZRANGE', KEYS[1], -requests, -requests, 'WITHSCORES')
  local free = tonumber(nth[2]) + window
  if free > slot then slot = free end
end
if ARGV[5] ~= '-1' and slot - now > tonumber(ARGV[5]) then
  return slot - now
end
redis.call('ZADD', KEYS[1], slot, ARGV[4])
redis.call('PEXPIRE', KEYS[1], slot - now + window + 1000)
return slot - now
"""

# KEYS[1]: the cooldown's end (ms of the server's clock); ARGV[1]: ms to hold off.
_HOLD_OFF = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local until_ = now + tonumber(ARGV[1])
if until_ > tonumber(redis.call('GET', KEYS[1]) or '0') then
  redis.call('SET', KEYS[1], until_, 'PX', tonumber(ARGV[1]) + 1000)
end
return until_
"""

# KEYS[1]: the cooldown's end (ms of the server's clock). Returns the ms left of it (0: none).
_COOLDOWN = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local left = tonumber(redis.call('GET', KEYS[1]) or '0') - now
if left < 0 then return 0 end
return left
"""

_WINDOWS = ("minute", "hour", "day", "month")
_RATE_WINDOWS = {"second": 1000, "minute": 60_000, "hour": 3_600_000, "day": 86_400_000}


def _connect(url_or_client: object, timeout: float) -> tuple[aioredis.Redis, bool]:
    """The asyncio Redis client to use, and whether it is ours to close."""
    if isinstance(url_or_client, aioredis.Redis):
        return url_or_client, False
    if isinstance(url_or_client, str):
        # No retries of its own: a script retried after a timeout could reserve twice.
        client = aioredis.Redis.from_url(
            url_or_client,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
        )
        return client, True
    raise InvalidRequestError(
        "url_or_client", url_or_client, "allowed: a redis:// URL or a redis.asyncio.Redis"
    )


def _check_timeout(timeout: object) -> float:
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, (int, float))
        or not math.isfinite(timeout)
        or timeout <= 0
    ):
        raise InvalidRequestError("timeout", timeout, "allowed: a finite number of seconds > 0")
    return float(timeout)


def _check_key(key: object) -> str:
    if not isinstance(key, str) or not key:
        raise InvalidRequestError("key", key, "allowed: a non-empty str")
    return key


class _Store:
    """What a budget and a rate limit share: the client, its scripts, refusing when down."""

    _Unavailable: type[BudgetUnavailableError] = BudgetUnavailableError

    def __init__(self, url_or_client: object, key: object, timeout: object) -> None:
        self._key = _check_key(key)
        self.timeout = _check_timeout(timeout)
        self._redis, self._owned = _connect(url_or_client, self.timeout)

    def _script(self, source: str) -> Any:
        return self._redis.register_script(source)

    async def _run(self, step: Awaitable[Any], within: float = math.inf) -> Any:
        """Await ``step`` (one script, or one command) for at most `timeout` seconds, or
        ``within`` when that is sooner and positive: a client passed in may have no timeout
        of its own, and a server that accepts and never answers must not hang the call.

        Raises:
            BudgetUnavailableError: Redis failed, or did not answer in time (its answer is
                lost: a step it took stays taken, which errs on the side of sending less).
        """
        seconds = min(self.timeout, within) if within > 0 else self.timeout
        try:
            return await asyncio.wait_for(step, seconds)
        except (RedisError, OSError, asyncio.TimeoutError) as error:
            raise self._unavailable(error) from error

    def _unavailable(self, error: BaseException) -> BudgetUnavailableError:
        why = f"{type(error).__name__}: {str(error)[:200]}" if str(error) else "no answer"
        return self._Unavailable(f"{self!r} could not reach Redis: {why}")

    async def aclose(self) -> None:
        """Close the connections of a client made from a URL (one passed in is left open)."""
        if self._owned:
            await self._redis.aclose()


class RedisBudget(_Store):
    """A `BudgetLike` in Redis: one cap for every process that uses the same ``key``.

    Pass it as a client's or a call's ``budget=``, as a `Budget`. Each process makes its
    own (from the URL), and every one of them gives the same ``max_compute_units`` and
    ``per``. Use it from one event loop (a client's), and close it with `aclose` when it was
    made from a URL.

    Args:
        url_or_client: a ``redis://`` URL, or a ``redis.asyncio.Redis`` (used as is: its own
            retries, if it has some, may count a reservation twice after a timeout, never
            less).
        key: the Redis key of this budget (a window's count is ``key:<start>``).
        max_compute_units: the most the calls may spend, in each window (or in all).
        per: ``"minute"``, ``"hour"``, ``"day"``, ``"month"`` (fixed windows aligned to
            UTC), or None: no window.
        clock: the time, in seconds since the epoch, that picks the window (tests pass
            their own).
        timeout: seconds Redis may take to answer before a call is refused (a finite
            number > 0; it bounds every step, also with a client passed in).
    """

    def __init__(
        self,
        url_or_client: str | aioredis.Redis,
        *,
        key: str,
        max_compute_units: int,
        per: Per | None = None,
        clock: Callable[[], float] = time.time,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        check_whole_number("max_compute_units", max_compute_units, 0)
        check_per("per", per, allow_none=True, allowed=_WINDOWS)
        if not callable(clock):
            raise InvalidRequestError("clock", clock, "allowed: a function returning the time")
        super().__init__(url_or_client, key, timeout)
        self.max_compute_units = max_compute_units
        self.per = per
        self.clock = clock
        self._reserve = self._script(_RESERVE)
        self._give_back = self._script(_GIVE_BACK)

    def __repr__(self) -> str:
        return (
            f"RedisBudget(key={self._key!r}, max_compute_units={self.max_compute_units}, "
            f"per={self.per!r})"
        )

    def _window(self) -> tuple[str, int | None, int | None, float]:
        """The key of the window that holds now, its start and its end; and now."""
        now = self.clock()
        if self.per is None:
            return self._key, None, None, now
        start, end = window_of(self.per, now)
        return f"{self._key}:{start}", start, end, now

    async def reserve(self, units: int) -> Reservation:
        """Set ``units`` aside in one atomic step on the server (see `BudgetLike.reserve`)."""
        key, start, end, now = self._window()
        # Relative to this replica's own clock, so that the window is the one it reserved in.
        expires = 0 if end is None else max(1, end - int(now)) + _WINDOW_GRACE
        # Its answer lost (an error, a timeout): it may be set aside, and stays spent.
        step = self._reserve(keys=[key], args=[units, self.max_compute_units, expires])
        fits, left = await self._run(step)
        if not fits:
            raise BudgetExceededError(asked=units, left=int(left), resets_at=utc(end))
        return Reservation(units, start, utc(end))

    async def settle(self, reservation: Reservation, spent: int) -> None:
        """Give back what a request did not spend, to its window (see `BudgetLike.settle`)."""
        unspent = reservation.units - spent
        if unspent <= 0:
            return  # spent stays spent: nothing to tell Redis
        key = self._key if reservation.window is None else f"{self._key}:{reservation.window}"
        await self._run(self._give_back(keys=[key], args=[unspent]))

    async def remaining(self) -> int:
        """Units still available to new calls (in the current window).

        A coroutine, unlike `Budget.remaining` (a property): it asks Redis
        (``await budget.remaining()``), and raises `BudgetUnavailableError` when it cannot.
        """
        key = self._window()[0]
        used = await self._run(self._redis.get(key))
        return self.max_compute_units - int(used or 0)

    @property
    def resets_at(self) -> datetime.datetime | None:
        """When the current window ends (UTC), or None without ``per``."""
        return utc(self._window()[2])


def _check_requests(value: object) -> int:
    check_whole_number("requests", value, 1)
    return value  # type: ignore[return-value]  # checked just above


class RedisRateLimit(_Store):
    """A `RateLimiter` in Redis: at most ``requests`` in any ``per`` (a sliding window), for
    every request of every process that uses the same ``key``, and one shared cooldown.

    Pass it as a client's ``rate_limit=``. Permits are handed out by the Redis server's
    clock, in order; when the server answers one replica 429 with Retry-After, every
    replica waits. Redis unreachable: the request is refused with `RateLimitUnavailableError`.

    Args:
        url_or_client: a ``redis://`` URL, or a ``redis.asyncio.Redis``.
        key: the Redis key prefix of this limit (``{key}:log`` and ``{key}:cooldown``).
        requests: the most requests in any window of ``per``.
        per: ``"second"``, ``"minute"``, ``"hour"`` or ``"day"``.
        timeout: seconds Redis may take to answer before a request is refused (a finite
            number > 0), or what is left of the request's deadline when that is sooner.
    """

    def __init__(
        self,
        url_or_client: str | aioredis.Redis,
        *,
        key: str,
        requests: int,
        per: Per = "second",
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.requests = _check_requests(requests)
        check_per("per", per, allow_none=False, allowed=tuple(_RATE_WINDOWS))
        super().__init__(url_or_client, key, timeout)
        self.per = per
        # One hash tag: both keys live on one node of a cluster.
        self._log, self._cooldown = f"{{{self._key}}}:log", f"{{{self._key}}}:cooldown"
        self._acquire = self._script(_ACQUIRE)
        self._hold_off = self._script(_HOLD_OFF)
        self._cooldown_left = self._script(_COOLDOWN)

    _Unavailable = RateLimitUnavailableError

    def __repr__(self) -> str:
        return f"RedisRateLimit(key={self._key!r}, requests={self.requests}, per={self.per!r})"

    async def acquire(self, *, waited: bool = False, within: float = math.inf) -> float:
        """Take the earliest permit free, unless it is further than ``within`` seconds away
        (see `RateLimiter.acquire`). Redis is given at most `timeout` seconds, or ``within``
        when that is sooner."""
        latest = -1 if math.isinf(within) else max(0, math.floor(within * 1000))
        args = [self.requests, _RATE_WINDOWS[self.per], int(waited), uuid.uuid4().hex, latest]
        keys = [self._log, self._cooldown]
        return int(await self._run(self._acquire(keys=keys, args=args), within)) / 1000

    async def hold_off(self, seconds: float) -> None:
        """No permit of any replica is for sooner than ``seconds`` from now."""
        await self._run(self._hold_off(keys=[self._cooldown], args=[max(1, round(seconds * 1000))]))

    async def cooldown(self) -> float:
        """The seconds left of the wait the server asked any replica for (0: none)."""
        return int(await self._run(self._cooldown_left(keys=[self._cooldown]))) / 1000
