"""Instrumentation: what a client tells your monitoring about each call, attempt and retry.

A hook is an object of a `Hooks` subclass that overrides any of its four methods. The retry
loop (`RetryPolicy.run`) calls them, in this order for a call that is retried once::

    attempt_started(1) -> attempt_finished(1) -> retry_scheduled(1)
    attempt_started(2) -> attempt_finished(2) -> call_finished

Each method gets one frozen info object, and is called, never awaited: an ``async def`` hook
method is refused when the client is made. None of them holds the API key, a header or a body:
only the method, the URL without its query, the model, ``n``, ``size``, numbers, the status
(of every answer, a success's too),
the error's class name and the request id. A hook that raises is logged at WARNING (logger
``atoma_images``) and ignored: instrumentation never breaks a call.

Every client runs `LoggingHooks` (one INFO line per retry) before the hooks it is given.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import attrs

from ._checks import is_async_callable
from ._errors import APIStatusError, InvalidRequestError, ResponseValidationError
from ._transport import answer_status
from ._usage import may_have_been_billed as error_may_have_been_billed

if TYPE_CHECKING:
    from tenacity import RetryCallState
    from yarl import URL

    from ._models import ImageRequest

__all__ = [
    "AttemptFinished",
    "AttemptStarted",
    "CallFinished",
    "CallInfo",
    "CallRecord",
    "HookSet",
    "Hooks",
    "LoggingHooks",
    "RetryScheduled",
    "unnamed_call",
]

logger = logging.getLogger("atoma_images")


@attrs.frozen(kw_only=True, eq=False)
class CallInfo:
    """One call of the client, as hooks see it (compared by identity: one object per call).

    Attributes:
        operation: ``"generate"``, ``"generate_confidential"``, ``"download"``, or
            ``"models"`` and ``"health"`` (`AsyncImagesClient.models` and ``health``).
        method: the HTTP method.
        url: the URL without user, query or fragment (a signed download URL keeps its
            signature in the query).
        model: the model asked for (None for a download).
        n: how many images were asked for (None for a download).
        size: the size asked for, ``"WIDTHxHEIGHT"`` (None for a download).
        billable: whether a success is billed (a generation); a download, the models list
            and a health check bill nothing.
    """

    operation: str
    method: str
    url: str
    model: str | None = None
    n: int | None = None
    size: str | None = None
    billable: bool = True

    @classmethod
    def of(
        cls, operation: str, method: str, url: URL, request: ImageRequest | None = None
    ) -> CallInfo:
        """The info of a call to ``url``; a generation names its ``request``."""
        if url.query_string or url.fragment or url.user is not None:
            url = url.with_user(None).with_query(None).with_fragment(None)
        if request is None:
            return cls(operation=operation, method=method, url=str(url), billable=False)
        return cls(
            operation=operation,
            method=method,
            url=str(url),
            model=request.model,
            n=request.n,
            size=request.size,
        )


@attrs.frozen(kw_only=True)
class AttemptStarted:
    """An attempt is about to be sent. Attempt 1 starts the call."""

    call: CallInfo
    attempt: int


@attrs.frozen(kw_only=True)
class AttemptFinished:
    """An attempt ended, with an answer or an error.

    Attributes:
        duration: seconds the attempt took.
        status: the HTTP status of the attempt's answer, a success's (200) as an error's
            (None when no answer came: a connection failure).
        error: the class name of the error (None for a success).
        may_have_been_billed: False only when this attempt cannot have been billed.
        request_id: the server's ``x-request-id``, when it sent one.
    """

    call: CallInfo
    attempt: int
    duration: float
    status: int | None
    error: str | None
    may_have_been_billed: bool
    request_id: str | None


@attrs.frozen(kw_only=True)
class RetryScheduled:
    """An attempt failed and another one follows after ``wait`` seconds.

    Attributes:
        attempt: the attempt that failed.
        wait: seconds until the next attempt (the server's Retry-After, or backoff).
        reason: why: ``"status 429"``, or the error's class name.
        status: the HTTP status of the failed attempt, if it had one.
        error: the class name of the error.
        request_id: the server's ``x-request-id`` of the failed attempt, when it sent one.
    """

    call: CallInfo
    attempt: int
    wait: float
    reason: str
    status: int | None
    error: str
    request_id: str | None


@attrs.frozen(kw_only=True)
class CallFinished:
    """The call is over: it returned, or raised the error it ends with.

    Attributes:
        attempts: how many attempts were made.
        duration: seconds from the first attempt's start, waits included.
        status: the HTTP status of the answer the call ended with, a success's (200) as an
            error's (None when it ended without one: a connection failure, a cancellation).
        error: the class name of the error that ended the call (None for a success).
        may_have_been_billed: False only when no attempt of the call can have been billed.
        request_id: the server's ``x-request-id`` of the last answer, when it sent one.
    """

    call: CallInfo
    attempts: int
    duration: float
    status: int | None
    error: str | None
    may_have_been_billed: bool
    request_id: str | None


class Hooks:
    """Base class of instrumentation hooks: override the methods you need.

    Hooks run in the event loop (the client's own thread for `ImagesClient`), inside the
    call: keep them quick and never block. What they raise is logged and ignored. They are
    called, never awaited: a method made with ``async def`` is refused when the client is
    made (`InvalidRequestError`).
    """

    def attempt_started(self, info: AttemptStarted) -> None:
        """An attempt is about to be sent."""

    def attempt_finished(self, info: AttemptFinished) -> None:
        """An attempt ended."""

    def retry_scheduled(self, info: RetryScheduled) -> None:
        """A failed attempt will be followed by another after ``info.wait`` seconds."""

    def call_finished(self, info: CallFinished) -> None:
        """The call returned or raised."""


class LoggingHooks(Hooks):
    """One INFO line per retry on the ``atoma_images`` logger. Every client runs it."""

    def retry_scheduled(self, info: RetryScheduled) -> None:
        logger.info(
            "atoma-images: attempt %d failed (%s); retrying in %.2fs (request id %s)",
            info.attempt,
            info.reason,
            info.wait,
            info.request_id,
        )


_EVENTS = ("attempt_started", "attempt_finished", "retry_scheduled", "call_finished")


@attrs.frozen
class HookSet:
    """The hooks of a client, sorted by event once, so that an event nobody listens to costs
    one truth test. `LoggingHooks` comes first.
    """

    hooks: tuple[Hooks, ...]
    attempt_started: tuple[Callable[[AttemptStarted], None], ...] = attrs.field(init=False)
    attempt_finished: tuple[Callable[[AttemptFinished], None], ...] = attrs.field(init=False)
    retry_scheduled: tuple[Callable[[RetryScheduled], None], ...] = attrs.field(init=False)
    call_finished: tuple[Callable[[CallFinished], None], ...] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        for event in _EVENTS:
            overridden = tuple(
                getattr(hook, event)
                for hook in self.hooks
                if getattr(type(hook), event) is not getattr(Hooks, event)
            )
            object.__setattr__(self, event, overridden)  # frozen: attrs' way for derived fields

    @classmethod
    def of(cls, value: object) -> HookSet:
        """The hook set for a client's ``hooks`` argument: None, or a list of `Hooks`."""
        if value is None:
            return DEFAULT_HOOKS
        if isinstance(value, HookSet):
            return value
        if isinstance(value, (str, bytes, Hooks)) or not isinstance(value, Iterable):
            raise InvalidRequestError("hooks", value, "allowed: a list of Hooks objects, or None")
        hooks = tuple(value)
        for hook in hooks:
            if not isinstance(hook, Hooks):
                raise InvalidRequestError(
                    "hooks", hook, "allowed: instances of a subclass of atoma_images.Hooks"
                )
            for event in _EVENTS:
                # A hook is called, not awaited: an async one would only make a coroutine
                # that never runs, so the monitoring it was written for would silently not be.
                if is_async_callable(getattr(hook, event)):
                    raise InvalidRequestError(
                        "hooks",
                        hook,
                        f"allowed: hook methods made with 'def'; {type(hook).__name__}."
                        f"{event} is 'async def', and hooks are called, never awaited (it "
                        "would never run). Keep it quick and synchronous, or start your own "
                        "task from it with asyncio.get_running_loop().create_task(...)",
                    )
        return cls((LoggingHooks(), *hooks))

    @property
    def extra(self) -> tuple[Hooks, ...]:
        """The hooks the client was given (without the default logging)."""
        return self.hooks[1:]


DEFAULT_HOOKS = HookSet((LoggingHooks(),))


def call_hooks(callbacks: tuple[Callable[[Any], None], ...], info: object) -> None:
    """Call each hook with ``info``; one that raises is logged and the rest still run."""
    for callback in callbacks:
        try:
            callback(info)
        except Exception:
            logger.warning("atoma-images: instrumentation hook %r failed", callback, exc_info=True)


def outcome(error: BaseException | None) -> tuple[int | None, str | None, str | None]:
    """(status, error class name, request id) of an attempt's error; all None for success.

    The status is that of the answer the error stands for: an error status, or a success
    whose body could not be used (`ResponseValidationError`).
    """
    if error is None:
        return None, None, None
    status = error.status if isinstance(error, (APIStatusError, ResponseValidationError)) else None
    return status, type(error).__name__, getattr(error, "request_id", None)


def may_have_been_billed(call: CallInfo, error: BaseException | None) -> bool:
    """Whether an attempt of ``call`` that ended with ``error`` (None: success) may be billed.

    Cancellation is not our error: whether the request had reached the server is unknown.
    """
    if not call.billable:
        return False
    return error is None or error_may_have_been_billed(error)


def unnamed_call() -> CallInfo:
    # A policy run on its own (as in tests) describes its call as nothing in particular.
    return CallInfo(operation="call", method="", url="")


class CallRecord:
    """What one call has told its hooks so far; builds their info objects.

    Nothing here runs unless a hook listens: a call without hooks pays one truth test per
    event. `retry_scheduled` is tenacity's ``before_sleep``.
    """

    def __init__(self, hooks: HookSet, describe: Callable[[], CallInfo]) -> None:
        self.hooks = hooks
        self.describe = describe
        self._info: CallInfo | None = None
        self.attempts = 0
        self.began = 0.0
        self.billed = False
        self.status: int | None = None
        self.request_id: str | None = None

    @property
    def info(self) -> CallInfo:
        if self._info is None:
            self._info = self.describe()
        return self._info

    def attempt_started(self, number: int) -> None:
        call_hooks(self.hooks.attempt_started, AttemptStarted(call=self.info, attempt=number))

    def attempt_finished(
        self,
        state: RetryCallState,
        started: float,
        error: BaseException | None,
        result: object,
        billed: bool | None = None,
    ) -> None:
        """``billed``: whether the attempt may have been billed, as its call's accounting
        decided it (`CallCost.attempt_failed`); None to decide from ``error`` alone."""
        self.attempts, self.began = state.attempt_number, state.start_time
        status, name, request_id = outcome(error)
        if error is None:  # the answer's status, as the transport read it (an attempt's result
            # does not carry it); reset, so that it is never taken for a later attempt's
            status, request_id = answer_status.get(), getattr(result, "request_id", None)
            answer_status.set(None)
        if billed is None:
            billed = may_have_been_billed(self.info, error)
        self.billed = self.billed or billed
        self.status, self.request_id = status, request_id
        if self.hooks.attempt_finished:
            info = AttemptFinished(
                call=self.info,
                attempt=state.attempt_number,
                duration=time.monotonic() - started,
                status=status,
                error=name,
                may_have_been_billed=billed,
                request_id=request_id,
            )
            call_hooks(self.hooks.attempt_finished, info)

    def retry_scheduled(self, state: RetryCallState) -> None:
        if not self.hooks.retry_scheduled:
            return
        error = state.outcome.exception() if state.outcome else None
        status, name, request_id = outcome(error)
        info = RetryScheduled(
            call=self.info,
            attempt=state.attempt_number,
            wait=state.upcoming_sleep,
            reason=f"status {status}" if status is not None else str(name),
            status=status,
            error=str(name),
            request_id=request_id,
        )
        call_hooks(self.hooks.retry_scheduled, info)

    def call_finished(self, error: BaseException | None) -> None:
        if not self.hooks.call_finished:
            return
        info = CallFinished(
            call=self.info,
            attempts=self.attempts,
            duration=time.monotonic() - self.began if self.attempts else 0.0,
            status=self.status,
            error=None if error is None else type(error).__name__,
            may_have_been_billed=self.billed,
            request_id=self.request_id,
        )
        call_hooks(self.hooks.call_finished, info)
