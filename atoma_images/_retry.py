"""When to send a paid request again, and how long to wait first.

Image generation is a paid, non-idempotent POST. Atoma settles a failed attempt at zero and
charges a success even when the client has gone away, so the rules are:

- an error status in the API's own envelope (or a 503 or 429, "not now"), or a failure
  before the request was sent: retrying cannot bill twice;
- sent but no complete answer (read timeout, reset, truncated body), or a gateway's error
  page (`_errors.status_may_have_been_billed`): it may have been billed, so it is not
  retried unless the policy says ``retry_ambiguous=True``.

`RetryPolicy.run` is the one attempt loop of the package, built from tenacity's parts (as
hynek/stamina builds its own): ``stop_any(stop_after_attempt, stop_before_delay)``, a wait
that reads the server's Retry-After, and `RetryPolicy.retryable`, a pure function of the error.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, TypeVar

import attrs
from tenacity import (
    AsyncRetrying,
    retry_base,
    retry_if_exception,
    stop_after_attempt,
    stop_any,
    stop_before_delay,
)
from tenacity.stop import stop_base
from tenacity.wait import wait_base, wait_random_exponential

from ._checks import check_flag, check_whole_number
from ._errors import (
    APIConnectionError,
    APIStatusError,
    AtomaImagesError,
    InvalidRequestError,
    ResponseValidationError,
)
from ._hooks import DEFAULT_HOOKS, CallInfo, CallRecord, HookSet, unnamed_call
from ._testing_switch import waiting_with
from ._timeout import MIN_ATTEMPT, seconds_validator

if TYPE_CHECKING:
    from tenacity import RetryCallState

    from ._usage import CallCost

__all__ = ["RetryPolicy", "check_policy", "policy_for"]

T = TypeVar("T")

#: A retry is sent only with this much of the call's deadline left. Less cannot bring an
#: image back (a generation takes seconds), but the request could still be billed.
MIN_RETRY = 1.0

#: Statuses that mean "not now": retried up to ``max_retries`` times.
RETRY_STATUSES = frozenset({408, 423, 425, 429, 503})
#: Server failures: retried at most ``max_server_error_retries`` times.
SERVER_ERROR_STATUSES = frozenset({500, 502, 504})


def _check_count(_: object, attribute: attrs.Attribute[int], value: object) -> None:
    check_whole_number(f"retries.{attribute.name}", value, 0)


_check_seconds = seconds_validator("retries", allow_zero=True)
_check_positive_seconds = seconds_validator("retries")


def _check_deadline(owner: object, attribute: attrs.Attribute[float], value: object) -> None:
    _check_positive_seconds(owner, attribute, value)
    if value < MIN_ATTEMPT:  # type: ignore[operator]  # a number: checked just above
        raise InvalidRequestError(
            "retries.deadline", value, f"allowed: at least {MIN_ATTEMPT} s, the shortest attempt"
        )


def _check_flag(_: object, attribute: attrs.Attribute[bool], value: object) -> None:
    check_flag(f"retries.{attribute.name}", value)


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
    deadline: float = attrs.field(default=600.0, validator=_check_deadline)
    sleep: Callable[[float], Awaitable[None]] = attrs.field(
        default=asyncio.sleep, repr=False, eq=False
    )
    # tenacity's stateless strategies for this policy, built once (see run).
    _stops: tuple[stop_base, ...] = attrs.field(init=False, repr=False, eq=False)
    _wait: wait_base = attrs.field(init=False, repr=False, eq=False)
    _retry: retry_base = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        # Never sleep past the deadline: stop now rather than wake up with no time left.
        stops = (stop_after_attempt(self.max_retries + 1), stop_before_delay(self.deadline))
        backoff = wait_random_exponential(multiplier=self.backoff_base, max=self.backoff_max)
        object.__setattr__(self, "_stops", stops)  # frozen: attrs' way to set derived fields
        object.__setattr__(self, "_wait", _RetryAfterOrBackoff(backoff))
        object.__setattr__(self, "_retry", retry_if_exception(self.retryable))

    def retryable(self, error: BaseException) -> bool:
        """Whether a failure of this kind is worth another attempt (budgets aside)."""
        if not isinstance(error, AtomaImagesError):
            return False  # cancellation, Ctrl-C and our own bugs propagate at once
        if isinstance(error, ResponseValidationError):
            return False  # a success we could not read was billed; asking again bills again
        if error.may_have_been_billed:  # sent, outcome unknown: a retry may bill twice
            return self.retry_ambiguous
        if isinstance(error, APIStatusError):
            # Compared as RFC 9110 compares tokens: without regard to case.
            hint = error.headers.get("x-should-retry", "").strip().lower()
            if hint == "false":
                return False
            if error.retry_after is not None and error.retry_after > self.max_retry_after:
                return False
            if hint == "true":
                return True
            return error.status in RETRY_STATUSES or (
                error.status in SERVER_ERROR_STATUSES and self.max_server_error_retries > 0
            )
        if isinstance(error, APIConnectionError):
            return error.transient
        return False

    async def run(
        self,
        attempt: Callable[[float], Awaitable[T]],
        hooks: HookSet = DEFAULT_HOOKS,
        describe: Callable[[], CallInfo] | None = None,
        cost: CallCost | None = None,
    ) -> T:
        """``await attempt(remaining)`` until it succeeds or the policy says stop.

        ``attempt`` may take at most ``remaining`` seconds (what is left of the deadline); a
        retry with less than `MIN_RETRY` left is not made: the last error ends the call.
        The error that ends the call is re-raised as it is, carrying ``attempts``.
        ``hooks`` hear of each attempt, retry and the call's end (see `Hooks`); ``describe``
        makes the `CallInfo` they get, only if one of them listens.

        A call without a `CallCost` bills nothing: its error never says it may have been
        billed. A paid call passes its `CallCost`: it hears of every failed attempt and reserves a
        retry's cost before it is sent, and the error that ends the call says
        ``may_have_been_billed`` if any of its attempts may have been billed, not only the
        last (which can differ only under ``retry_ambiguous=True``).
        """
        record = CallRecord(hooks, describe or unnamed_call)
        retrying = AsyncRetrying(
            # Each call has its own AsyncRetrying (tenacity keeps a call's state in it) and its
            # own server-error budget; the stateless strategies are the policy's, built once.
            stop=stop_any(_ServerErrorBudget(self.max_server_error_retries), *self._stops),
            wait=self._wait,
            retry=self._retry,
            # Under set_testing(True) the wait is decided as usual, and skipped.
            sleep=waiting_with(self.sleep),
            before_sleep=partial(_before_sleep, cost, record),
            reraise=True,
        )
        last_error: BaseException | None = None
        try:
            async for try_ in retrying:
                state = try_.retry_state
                if (
                    last_error is not None
                    and self.deadline - (time.monotonic() - state.start_time) < MIN_RETRY
                ):
                    # A wait overran the deadline (a batch's shared wait, a stalled loop): an
                    # attempt sent now could not be answered in time, and might be billed.
                    raise last_error
                with try_:
                    if hooks.attempt_started:
                        record.attempt_started(state.attempt_number)
                    started = time.monotonic()
                    try:
                        result = await attempt(self.deadline - (started - state.start_time))
                    except BaseException as error:  # cancellation too: hooks see every end
                        last_error = error
                        if isinstance(error, AtomaImagesError):
                            error.attempts = state.attempt_number
                        billed = None if cost is None else cost.attempt_failed(error)
                        if hooks.attempt_finished or hooks.call_finished:
                            record.attempt_finished(state, started, error, None, billed)
                        raise
                    if hooks.attempt_finished or hooks.call_finished:
                        record.attempt_finished(state, started, None, result)
                        record.call_finished(None)
                    return result
        except BaseException as error:
            # The error that ends a paid call speaks for all of its attempts; a call without a
            # cost (a download, a models list, a health check) bills nothing, whatever failed.
            if isinstance(error, AtomaImagesError):
                if cost is None:
                    error.may_have_been_billed = False
                elif cost.maybe_billed_attempts:
                    error.may_have_been_billed = True
            if hooks.call_finished:
                record.call_finished(error)
            raise
        raise AssertionError("unreachable: tenacity returns the result or raises")


async def _before_sleep(cost: CallCost | None, record: CallRecord, state: RetryCallState) -> None:
    """tenacity's ``before_sleep``: a retry is decided. Its cost is reserved now, before the
    wait, so that one that does not fit the budget ends the call at once (what it raises
    leaves the loop); then the hooks hear of it."""
    if cost is not None:
        try:
            await cost.before_retry()  # a budget may live in another process (Redis)
        except AtomaImagesError as error:
            error.attempts = state.attempt_number
            raise
    record.retry_scheduled(state)


class _RetryAfterOrBackoff(wait_base):
    """The server's Retry-After when it named one, else full-jitter exponential backoff."""

    def __init__(self, backoff: wait_base) -> None:
        self.backoff = backoff

    def __call__(self, state: RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome else None
        retry_after = getattr(error, "retry_after", None)
        if retry_after is None:
            return float(self.backoff(state))
        # Add a little, so that a crowd of clients told the same wait does not return at once.
        return float(retry_after) + random.uniform(0, min(1.0, 0.1 + retry_after / 10))


class _ServerErrorBudget(stop_base):
    """A stop condition: the call has used up its retries after a 500, 502 or 504.

    It notes the numbers of the attempts that failed so, so the answer is the same however
    often tenacity asks about one attempt.
    """

    def __init__(self, allowed: int) -> None:
        self.allowed = allowed
        self.failed_attempts: set[int] = set()

    def __call__(self, state: RetryCallState) -> bool:
        error = state.outcome.exception() if state.outcome else None
        if isinstance(error, APIStatusError) and error.status in SERVER_ERROR_STATUSES:
            self.failed_attempts.add(state.attempt_number)
        return len(self.failed_attempts) > self.allowed


def check_policy(value: object) -> RetryPolicy:
    """``value`` if it is a `RetryPolicy`, else `InvalidRequestError` (for a client or a call)."""
    if not isinstance(value, RetryPolicy):
        raise InvalidRequestError("retries", value, "allowed: a RetryPolicy or None")
    return value


def policy_for(retries: object, default: RetryPolicy) -> RetryPolicy:
    """A call's policy: its own ``retries`` when given (checked), else ``default``."""
    return default if retries is None else check_policy(retries)
