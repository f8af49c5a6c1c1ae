"""Many prompts through one client: `Batch` (async) and `SyncBatch` (its synchronous face).

One task, the feeder, reads the source lazily (a million-line file is read as it goes):
for each prompt it takes a slot, then starts one task for that prompt's call. The call
waits for the batch's `_Gate`, generates, and hands its `BatchResult` over. The slot passes
to the result and comes back when a caller asks for the next one, so at most
``concurrency`` requests are in flight, no more tasks run than there is work for, and a
caller that stops listening stops the batch from sending more.

Every retry of every call in the batch waits through the one gate: when the server asks a
call to wait (429 with Retry-After, or a backoff), every call waits before its next
request, instead of each one spending its own retries against an overloaded server.

When the source ends, or fails, the calls already started finish and are handed over; then
the batch ends, or raises the source's error. Closing the batch (leaving ``async with``,
`Batch.aclose`) cancels the calls in flight and waits for them. A call cancelled after its
request may have been sent is counted in `BatchSummary` as possibly billed, and logged once
at WARNING.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import sys
import time
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
    Sized,
)
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

import attrs

from ._checks import check_plain_callable_or_none, check_whole_number
from ._dialect import plan
from ._errors import AtomaImagesError, InvalidRequestError
from ._models import ImageRequest, ImagesResponse, check_fields
from ._retry import check_policy, policy_for
from ._usage import UsageMeter

if TYPE_CHECKING:
    from ._dialect import Dialect
    from ._retry import RetryPolicy

__all__ = ["Batch", "BatchResult", "BatchSummary", "GenerateRequest", "Prompt", "SyncBatch"]

#: How a batch sends one checked request: its client's ``generate`` for a request already
#: built, given explicitly (the batch never reaches into the client).
GenerateRequest: TypeAlias = "Callable[..., Awaitable[ImagesResponse]]"

logger = logging.getLogger("atoma_images")

T = TypeVar("T")

#: One item of a batch's source: a prompt, a mapping of generate() options with a
#: ``"prompt"``, or an `ImageRequest`.
Prompt: TypeAlias = "str | Mapping[str, Any] | ImageRequest"

# The options of generate() that are fields of the request, and those that shape the call.
_REQUEST_OPTIONS = frozenset(attrs.fields_dict(ImageRequest)) - {"prompt"}
_CALL_OPTIONS = frozenset({"timeout", "retries", "confidential", "budget"})
_OPTIONS = _REQUEST_OPTIONS | _CALL_OPTIONS
_ITEM_ALLOWED = "allowed: a prompt string, a mapping with a 'prompt' key, or an ImageRequest"


@attrs.frozen(kw_only=True)
class BatchResult:
    """The outcome of one prompt of a batch: a response or an error, never both.

    Attributes:
        index: the prompt's position in the source, from 0.
        prompt: the prompt (for an item that is not valid, as much of it as could be read).
        response: the images, when the call succeeded.
        error: why it failed, when it did.
    """

    index: int
    prompt: str
    response: ImagesResponse | None = None
    error: AtomaImagesError | None = None

    @property
    def ok(self) -> bool:
        """Whether the call succeeded."""
        return self.response is not None

    @property
    def may_have_been_billed(self) -> bool:
        """True for a success (it was billed) and for an error that says it may have been."""
        return self.error is None or self.error.may_have_been_billed


@attrs.frozen(kw_only=True)
class BatchSummary:
    """How far a batch got, and what it cost (see ``batch.summary``).

    Attributes:
        results: results handed to the caller.
        responses: of those, the successes.
        errors: of those, the failures.
        compute_units: units billed by every call that succeeded, ``unclaimed`` included.
        maybe_billed_compute_units: units of the calls that may have been billed: failures
            with an unknown outcome, and calls cancelled after they may have been sent.
        cancelled_prompts: the prompts whose calls were cancelled (the batch was closed
            early) after their request may have been sent: they may have been billed.
        unclaimed: results that were ready when the batch was closed but never handed out
            (a success among them was billed).
    """

    results: int
    responses: int
    errors: int
    compute_units: int
    maybe_billed_compute_units: int
    cancelled_prompts: tuple[str, ...]
    unclaimed: tuple[BatchResult, ...]


@attrs.define
class _Gate:
    """One "not before" time for a whole batch: any wait asked for moves it for everyone."""

    _sleep: Callable[[float], Awaitable[None]]
    _not_before: float = 0.0

    async def sleep(self, seconds: float) -> None:
        """A retry's wait (the batch's `RetryPolicy.sleep`): every worker waits it too."""
        self._not_before = max(self._not_before, time.monotonic() + seconds)
        await self.wait()

    async def wait(self) -> None:
        # One sleep, not a loop until the time has come: an injected test sleep returns at
        # once without the clock moving. A time moved meanwhile is seen before the next request.
        delay = self._not_before - time.monotonic()
        if delay > 0:
            await self._sleep(delay)


@attrs.frozen
class _Failed:
    """The batch itself failed (the source raised): the caller gets ``error``."""

    error: BaseException


@attrs.frozen
class _Prepared:
    """One item of the source, checked: the request and the options of its call."""

    index: int
    request: ImageRequest
    call: dict[str, Any]


_END = object()


class Batch:
    """An async iterator of `BatchResult`, in completion order; see `generate_many`.

    Use it as ``async with client.generate_many(...) as batch: async for result in batch``:
    leaving the block cancels what is in flight and waits for it, and inside it a loop may be
    left and another started. A plain ``async for`` works too: the batch closes itself when
    it is exhausted, and when the loop is left early asyncio closes the dropped iterator soon
    after (in a task of its own), cancelling what is in flight; `aclose` does it at once.
    A closed batch has no more results: `next_result` answers None. Several tasks may read
    one batch with `next_result`; when it ends, each of them gets None.
    """

    def __init__(
        self,
        generate: GenerateRequest,
        prompts: Iterable[Prompt] | AsyncIterable[Prompt],
        *,
        model: str,
        dialect: Dialect,
        retries: RetryPolicy,
        concurrency: int,
        on_progress: Callable[[int, int | None], object] | None,
        options: Mapping[str, Any],
        pool_size: int | None = None,
    ) -> None:
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (Iterable, AsyncIterable)):
            raise InvalidRequestError(
                "prompts", prompts, "allowed: an iterable or async iterable of prompts"
            )
        check_whole_number("concurrency", concurrency, 1)
        check_plain_callable_or_none("on_progress", on_progress)
        for name in options:
            if name not in _OPTIONS:
                raise InvalidRequestError(
                    name, options[name], f"allowed: the options of generate(): {sorted(_OPTIONS)}"
                )
        self._generate = generate
        self._model, self._dialect = model, dialect
        self._options = dict(options)
        policy = policy_for(self._options.get("retries"), retries)
        self._gate = _Gate(policy.sleep)
        self._policy = attrs.evolve(policy, sleep=self._gate.sleep)
        # Checked once here, so a bad size is one error and not one per prompt.
        # (model=None means the client's, as in generate.)
        check_fields(
            **{k: v for k, v in options.items() if k in _REQUEST_OPTIONS and v is not None}
        )
        self._total = len(prompts) if isinstance(prompts, Sized) else None
        self._source: Iterator[Prompt] | AsyncIterator[Prompt] = (
            aiter(prompts) if isinstance(prompts, AsyncIterable) else iter(prompts)
        )
        self._on_progress = on_progress
        self._feeder: asyncio.Task[None] | None = None  # started on the first next_result()
        self._calls: set[asyncio.Task[None]] = set()  # one task per call in flight
        self._closed = False
        self._entered = False  # used as ``async with``: that block's end closes the batch
        self._held = 0  # results handed out whose slot has not come back yet
        # asyncio's primitives bind to the loop that first uses them: the sync client makes
        # the batch in its caller's thread and runs it on its own loop. The bound is the
        # pool's too, so that no call waits for a connection another one holds (and fails
        # for a pool timeout against a healthy server).
        self._bound = min(concurrency, pool_size or concurrency)
        self._slots = asyncio.Semaphore(self._bound)
        self._results: asyncio.Queue[BatchResult | _Failed | object] = asyncio.Queue()
        self._counts = {"results": 0, "responses": 0, "errors": 0}
        self._meter = UsageMeter()  # what the batch's calls cost, counted as the client counts
        self._cancelled: list[str] = []
        self._cancelled_units = 0  # what those calls were or may have been billed
        self._unclaimed: list[BatchResult] = []

    @property
    def total(self) -> int | None:
        """How many prompts the source holds, when it can say (``len()``); else None."""
        return self._total

    @property
    def summary(self) -> BatchSummary:
        """How far the batch got and what it cost, so far."""
        usage = self._meter.usage
        return BatchSummary(
            **self._counts,
            compute_units=usage.compute_units,
            maybe_billed_compute_units=usage.maybe_billed_compute_units,
            cancelled_prompts=tuple(self._cancelled),
            unclaimed=tuple(self._unclaimed),
        )

    # -- the caller's side ---------------------------------------------------------------

    async def __aenter__(self) -> Batch:
        self._entered = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __aiter__(self) -> AsyncIterator[BatchResult]:
        # Inside ``async with``, leaving the block closes the batch, so a loop may be left
        # and another started. Without it, each loop is an async generator: when a loop is
        # left early (break, an exception, cancellation) and the generator is dropped,
        # asyncio closes it (PEP 525's finalizer hook), and so the batch: what is in flight
        # is cancelled, and nothing keeps running unseen.
        return self if self._entered else self._results_until_closed()

    async def _results_until_closed(self) -> AsyncIterator[BatchResult]:
        try:
            while (result := await self.next_result()) is not None:
                yield result
        finally:
            await self.aclose()

    async def __anext__(self) -> BatchResult:
        result = await self.next_result()
        if result is None:
            raise StopAsyncIteration
        return result

    async def next_result(self) -> BatchResult | None:
        """The next result to finish, or None when every prompt has one (the batch closes).

        Several tasks may ask at once: each result goes to one of them, and when the batch
        ends every one of them gets None.
        """
        if self._closed:
            return None
        if self._feeder is None:
            self._feeder = asyncio.create_task(self._feed(), name="atoma-images-batch-feeder")
        if self._held:  # a caller is done with a result it was given: its slot comes back
            self._held -= 1
            self._slots.release()
        item = await self._results.get()
        if isinstance(item, BatchResult):
            self._held += 1
            self._counts["results"] += 1
            self._counts["responses" if item.ok else "errors"] += 1
            if self._on_progress is not None:
                _report_progress(
                    self._on_progress, self._counts["results"], self._total, item, self.hand_back
                )
            return item
        self._results.put_nowait(_END)  # the end stays there for every other caller waiting
        await self.aclose()
        if isinstance(item, _Failed):
            raise item.error
        return None

    def hand_back(self, result: BatchResult) -> None:
        """Give back a result that was never used: the summary lists it as unclaimed."""
        self._unclaimed.append(result)

    async def aclose(self) -> None:
        """Cancel the calls in flight and wait for them. Safe to repeat."""
        if self._closed:
            return
        self._closed = True
        tasks = [*self._calls] if self._feeder is None else [self._feeder, *self._calls]
        for task in tasks:
            task.cancel()
        try:
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:  # even when the loop is shutting down and cancels this wait
            while not self._results.empty():
                item = self._results.get_nowait()
                if isinstance(item, BatchResult):
                    self._unclaimed.append(item)
            self._results.put_nowait(_END)  # a caller still waiting for a result gets None
        if self._cancelled:
            logger.warning(
                "atoma-images: batch closed early: %d call(s) in flight were cancelled after "
                "their requests were sent; up to %d compute units were or may have been billed "
                "for images that are not returned",
                len(self._cancelled),
                self._cancelled_units,
            )

    # -- the batch's own tasks -----------------------------------------------------------

    async def _feed(self) -> None:
        """Start a call for each prompt as slots free up; when the source ends or fails, let
        the calls already started finish, then end the batch (with the source's error)."""
        end: _Failed | object = _END
        try:
            for index in itertools.count():
                # The slot passes to the call, then to its result; next_result() gives it back.
                await self._slots.acquire()
                item = await self._next_item()
                if item is _END:
                    break
                prepared = self._prepare(index, item)
                # On Atoma a call for n images is n requests: each holds a connection, so
                # the call holds a slot for each it may send at once (at most the bound).
                slots = self._slots_for(prepared)
                for _ in range(slots - 1):
                    await self._slots.acquire()
                call = asyncio.create_task(
                    self._call(prepared, slots), name=f"atoma-images-batch-call-{index}"
                )
                self._calls.add(call)
                call.add_done_callback(self._calls.discard)
        except Exception as error:  # the source failed: the caller gets its error
            end = _Failed(error)
        except asyncio.CancelledError as error:
            if self._closed or _cancelling():
                raise  # the batch is closing, or the loop is shutting down
            end = _Failed(error)  # the source's own: an end, as any other error of it
        if self._calls:  # calls already sent are paid for: their results come first
            await asyncio.wait(set(self._calls))
        self._results.put_nowait(end)

    async def _next_item(self) -> object:
        """The source's next item, or ``_END``."""
        try:
            if isinstance(self._source, AsyncIterator):
                return await anext(self._source)
            return next(self._source)
        except (StopIteration, StopAsyncIteration):
            return _END

    def _prepare(self, index: int, item: object) -> BatchResult | _Prepared:
        """The call for one item of the source, or the result of an item that is not valid."""
        try:
            request, call = self._request(index, item)
        except InvalidRequestError as error:
            return BatchResult(index=index, prompt=_prompt_of(item), error=error)
        return _Prepared(index, request, call)

    def _slots_for(self, prepared: BatchResult | _Prepared) -> int:
        """How many requests the call sends at once (at most the bound)."""
        if isinstance(prepared, BatchResult):
            return 1
        try:
            requests = len(plan(self._dialect, prepared.request))
        except InvalidRequestError:  # reported by its call, which sends nothing
            return 1
        return min(requests, self._bound)

    async def _call(self, prepared: BatchResult | _Prepared, slots: int) -> None:
        try:
            await self._gate.wait()
            result = await self._run(prepared, slots)
        except Exception as error:  # a bug of ours: the caller gets it, and the batch ends
            self._results.put_nowait(_Failed(error))
        else:
            self._results.put_nowait(result)
        finally:  # the slots of its other requests; the first goes with its result
            for _ in range(slots - 1):
                self._slots.release()

    async def _run(self, prepared: BatchResult | _Prepared, slots: int) -> BatchResult:
        if isinstance(prepared, BatchResult):
            return prepared
        index, request = prepared.index, prepared.request
        # This call's own count says what its attempts proved, so that the prompts listed as
        # maybe billed are those the batch's units count (a call cancelled while it waits
        # to retry a 503 was not billed).
        own = UsageMeter()
        try:
            response = await self._generate(
                request, **prepared.call, meters=(self._meter, own), max_in_flight=slots
            )
        except AtomaImagesError as error:
            return BatchResult(index=index, prompt=request.prompt, error=error)
        except asyncio.CancelledError:
            # Listed if any of its requests may have been billed, or was (on Atoma, the
            # images of a call for several that came back before it was cancelled).
            if own.usage.maybe_billed_calls or own.usage.images:
                self._cancelled.append(request.prompt)
                self._cancelled_units += own.usage.max_compute_units
            raise
        return BatchResult(index=index, prompt=request.prompt, response=response)

    def _request(self, index: int, item: object) -> tuple[ImageRequest, dict[str, Any]]:
        """The request for one item of the source, and the options of its call."""
        field = f"prompts[{index}]"
        if isinstance(item, str):
            fields = {**self._options, "prompt": item}
        elif isinstance(item, ImageRequest):
            fields = {**self._options, **attrs.asdict(item)}
        elif isinstance(item, Mapping):
            if "prompt" not in item:
                raise InvalidRequestError(field, item, _ITEM_ALLOWED)
            for name in item:
                if name != "prompt" and name not in _OPTIONS:
                    raise InvalidRequestError(
                        f"{field}[{name!r}]", item[name], f"allowed: {sorted(_OPTIONS)}"
                    )
            fields = {**self._options, **item}
        else:
            raise InvalidRequestError(field, item, _ITEM_ALLOWED)
        call = {name: fields.pop(name) for name in _CALL_OPTIONS if name in fields}
        if fields.get("model") is None:
            fields["model"] = self._model
        retries = call.get("retries")
        # Every retry of the batch waits through its gate.
        call["retries"] = (
            self._policy
            if retries is None or retries is self._options.get("retries")
            else attrs.evolve(check_policy(retries), sleep=self._gate.sleep)
        )
        return ImageRequest(**fields), call


def _report_progress(
    on_progress: Callable[[int, int | None], object],
    done: int,
    total: int | None,
    result: BatchResult,
    hand_back: Callable[[BatchResult], None],
) -> None:
    """Call ``on_progress``; if it fails, log it: the result it reports is paid for, and is
    handed over all the same. One that stops the program (Ctrl-C in it) leaves the result
    with the batch, listed in its summary as unclaimed."""
    try:
        on_progress(done, total)
    except Exception:
        logger.warning("atoma-images: batch on_progress %r failed", on_progress, exc_info=True)
    except BaseException:
        hand_back(result)
        raise


def _cancelling() -> bool:
    """Whether the running task has been asked to stop (known from Python 3.11)."""
    task = asyncio.current_task()
    if sys.version_info >= (3, 11) and task is not None:
        return task.cancelling() > 0
    return False


def _prompt_of(item: object) -> str:
    prompt = item.get("prompt") if isinstance(item, Mapping) else item
    return prompt if isinstance(prompt, str) else repr(item)[:80]


class SyncBatch:
    """An iterator of `BatchResult`, in completion order; see `ImagesClient.generate_many`.

    Leaving a ``for`` loop over it early (``break``, an exception) or a ``with`` block
    cancels the calls in flight and waits for them.
    """

    def __init__(
        self,
        batch: Batch,
        run: Callable[[Coroutine[Any, Any, Any]], Any],
        on_progress: Callable[[int, int | None], object] | None,
    ) -> None:
        check_plain_callable_or_none("on_progress", on_progress)
        self._batch = batch
        self._run = run
        self._on_progress = on_progress
        self._closed = False

    @property
    def summary(self) -> BatchSummary:
        """How far the batch got and what it cost, so far; see `BatchSummary`."""
        return self._batch.summary

    def __iter__(self) -> Iterator[BatchResult]:
        # A generator: when a for loop leaves it early, Python closes it, and so the batch.
        try:
            while (result := self._run(self._batch.next_result())) is not None:
                if self._on_progress is not None:  # in the caller's thread, not the loop's
                    _report_progress(
                        self._on_progress,
                        self._batch.summary.results,
                        self._batch.total,
                        result,
                        self._batch.hand_back,
                    )
                yield result
        finally:
            self.close()

    def close(self) -> None:
        """Cancel the calls in flight and wait for them. Safe to repeat."""
        if not self._closed:
            self._closed = True
            self._run(self._batch.aclose())

    def __enter__(self) -> SyncBatch:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
