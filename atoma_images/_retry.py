"""When to send a paid request again, and how long to wait first.

Image generation is a paid, non-idempotent POST. Atoma settles a failed attempt at zero and
charges a success even when the client has gone away, so the rules are:

- an error status, or a failure before the request was sent: retrying cannot bill twice;
- sent but no complete answer (read timeout, reset, truncated body): it may have been billed,
  so it is not retried unless the policy says ``retry_ambiguous=True``.

The first attempt runs without tenacity (the happy path pays nothing for retries); only
after it fails does `RetryPolicy.retry` build tenacity's `AsyncRetrying`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

import attrs

from ._errors import (
    AmbiguousOutcomeError,
    APIConnectionError,
    APIStatusError,
    AtomaImagesError,
    InvalidRequestError,
)
from ._timeout import seconds_validator

if TYPE_CHECKING:
    from tenacity import RetryCallState

__all__ = ["RetryPolicy"]

logger = logging.getLogger("atoma_images")

T = TypeVar("T")

#: Statuses that mean "not now": retried up to ``max_retries`` times.
RETRY_STATUSES = frozenset({408, 423, 425, 429, 503})
#: Server failures: retried at most ``max_server_error_retries`` times.
SERVER_ERROR_STATUSES = frozenset({500, 502, 504})


def _check_count(_: object, attribute: attrs.Attribute[int], value: object) -> None:
    if type(value) is not int or value < 0:
        raise InvalidRequestError(f"retries.{attribute.name}", value, "allowed: an integer >= 0")


_check_seconds = seconds_validator("retries", allow_zero=True)


def _check_flag(_: object, attribute: attrs.Attribute[bool], value: object) -> None:
    if type(value) is not bool:
        raise InvalidRequestError(f"retries.{attribute.name}", value, "allowed: True or False")


@attrs.frozen(kw_only=True)
class RetryPolicy:
    """How a call is retried. ``RetryPolicy(max_retries=0)`` turns retrying off.

    Attributes:
        max_retries: retries after the first attempt, for any reason.
        max_server_error_retries: of those, how many may follow a 500, 502 or 504.
        retry_ambiguous: also retry when the request was sent and the outcome is unknown.
            This can bill twice; leave it off unless a duplicate image costs you nothing.
        max_retry_after: the longest server-requested wait (``Retry-After``) that is honoured;
            a longer one ends the call at once with the error's ``retry_after`` set.
        backoff_base: the first backoff window in seconds when the server names no wait
            (full jitter: a random wait in ``[0, backoff_base * 2**k]``).
        backoff_max: the largest backoff window.
        deadline: seconds for the whole call, every attempt and wait included.
        sleep: the coroutine used to wait; tests pass a fake to avoid waiting for real.
    """

    max_retries: int = attrs.field(default=2, validator=_check_count)
    max_server_error_retries: int = attrs.field(default=1, validator=_check_count)
    retry_ambiguous: bool = attrs.field(default=False, validator=_check_flag)
    max_retry_after: float = attrs.field(default=60.0, validator=_check_seconds)
    backoff_base: float = attrs.field(default=0.5, validator=_check_seconds)
    backoff_max: float = attrs.field(default=8.0, validator=_check_seconds)
    deadline: float = attrs.field(default=600.0, validator=_check_seconds)
    sleep: Callable[[float], Awaitable[None]] = attrs.field(
        default=asyncio.sleep, repr=False, eq=False
    )

    def worth_retrying(self, error: AtomaImagesError) -> bool:
        """Whether this kind of failure is retried at all (the budget is checked elsewhere)."""
        if self.max_retries == 0:
            return False
        if isinstance(error, APIStatusError):
            hint = error.headers.get("x-should-retry")
            if hint == "false":
                return False
            if error.retry_after is not None and error.retry_after > self.max_retry_after:
                return False
            if hint == "true":
                return True
            return error.status in RETRY_STATUSES or (
                error.status in SERVER_ERROR_STATUSES and self.max_server_error_retries > 0
            )
        if isinstance(error, AmbiguousOutcomeError):
            return self.retry_ambiguous
        if isinstance(error, APIConnectionError):
            return error.transient
        return False

    async def retry(
        self,
        attempt: Callable[[float], Awaitable[T]],
        *,
        first_error: AtomaImagesError,
        started: float,
    ) -> T:
        """Go on after a first attempt that failed with ``first_error``, or re-raise it.

        ``attempt(remaining)`` makes one more attempt and may take at most ``remaining``
        seconds. ``started`` is the ``time.monotonic()`` at which the call began. The
        error that ends the call carries ``attempts``.
        """
        first_error.attempts = 1
        if not self.worth_retrying(first_error):
            raise first_error
        # Imported here: a call that never fails never needs tenacity, nor its import time.
        from tenacity import AsyncRetrying, retry_if_exception  # noqa: PLC0415

        budget = _Budget(self)
        pending: AtomaImagesError | None = first_error

        async def next_attempt() -> T:
            nonlocal pending
            if pending is not None:
                # Replay the first failure so tenacity counts it as attempt 1 and applies
                # the same decision, wait and stop to it as to every later one.
                error, pending = pending, None
                raise error
            budget.attempts += 1
            return await attempt(self.deadline - (time.monotonic() - started))

        def stop(state: RetryCallState) -> bool:
            if state.attempt_number > self.max_retries:
                return True
            # Never sleep past the deadline: stop now rather than wake up with no time left.
            return time.monotonic() - started + state.upcoming_sleep >= self.deadline

        retrying = AsyncRetrying(
            sleep=self.sleep,
            stop=stop,
            wait=self._wait,
            retry=retry_if_exception(budget.allows),
            before_sleep=_log_retry,
            reraise=True,
        )
        try:
            return await retrying(next_attempt)
        except AtomaImagesError as error:
            error.attempts = budget.attempts
            raise

    def _wait(self, state: RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome else None
        retry_after = getattr(error, "retry_after", None)
        if retry_after is not None:
            # The server named a wait; add a little so a crowd of clients does not return at once.
            return float(retry_after) + random.uniform(0, min(1.0, 0.1 + retry_after / 10))
        from tenacity.wait import wait_random_exponential  # noqa: PLC0415

        backoff = wait_random_exponential(multiplier=self.backoff_base, max=self.backoff_max)
        return float(backoff(state))


class _Budget:
    """Counts attempts and server-error retries for one call."""

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self.attempts = 1
        self.server_error_retries = 0

    def allows(self, error: BaseException) -> bool:
        if not isinstance(error, AtomaImagesError) or not self.policy.worth_retrying(error):
            return False
        if isinstance(error, APIStatusError) and error.status in SERVER_ERROR_STATUSES:
            self.server_error_retries += 1
            return self.server_error_retries <= self.policy.max_server_error_retries
        return True


def _log_retry(state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome else None
    what = f"status {error.status}" if isinstance(error, APIStatusError) else type(error).__name__
    logger.info(
        "atoma-images: attempt %d failed (%s); retrying in %.2fs (request id %s)",
        state.attempt_number,
        what,
        state.upcoming_sleep,
        getattr(error, "request_id", None),
    )
