"""`AsyncImagesClient`: the public surface of the package.

Each call is planned by its dialect (`_dialect.plan`: on Atoma, one request per image), and
each request is an attempt function run by the retry policy's one loop (`RetryPolicy.run`);
an attempt sends through the client's `_transport.Transport` and parses with `_convert`. The
flow and the module map are in docs/architecture.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl as ssl_module
from collections.abc import AsyncIterable, Callable, Coroutine, Iterable, Mapping
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
import attrs
from yarl import URL

from ._batch import Batch, Prompt
from ._budget import check_budget
from ._checks import check_flag, check_whole_number
from ._convert import parse_response
from ._dialect import Dialect, encode, plan
from ._discovery import Health, ModelInfo, fetch_health, fetch_models
from ._download import download, download_url
from ._errors import AtomaImagesError, InvalidRequestError
from ._files import write_images
from ._hooks import CallInfo, Hooks
from ._limits import BudgetLike, Cooldown, Pacing, RateLimiter
from ._models import DEFAULT_MODEL, GeneratedImage, ImageRequest, ImagesResponse, ResponseFormat
from ._retry import RetryPolicy, policy_for
from ._settings import (
    DEFAULT_BASE_URL,
    DEFAULT_MAX_DOWNLOAD_BYTES,
    DEFAULT_MAX_RESPONSE_BYTES,
    ClientSettings,
)
from ._timeout import Timeout
from ._transport import Answer, RequestProgress, Transport
from ._usage import (
    CallCost,
    Usage,
    UsageMeter,
    compute_units,
    counted,
    may_have_been_billed,
)

logger = logging.getLogger("atoma_images")

#: The time limits of `AsyncImagesClient.models` and `health` when a call names none: an
#: answer that takes a generation's minutes is no answer for a readiness probe.
DISCOVERY_TIMEOUT = Timeout(connect=5.0, pool=5.0, read=10.0, total=15.0)
#: Seconds for a whole models or health call, retries included.
DISCOVERY_DEADLINE = 30.0

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_MAX_DOWNLOAD_BYTES",
    "DEFAULT_MAX_RESPONSE_BYTES",
    "AsyncImagesClient",
]


class AsyncImagesClient:
    """An asyncio client for ``POST /v1/images/generations``.

    Create one per application and share it: it holds one connection pool. Close it with
    ``async with`` or `aclose`. A ``session`` passed in is used as is and never closed here.

    Args:
        api_key: the Atoma API key. Defaults to ``$ATOMA_API_KEY``, then
            ``$ATOMASDK_BEARER_AUTH`` (the Atoma SDK's variable).
        base_url: the API root, ending in ``/v1``. Defaults to ``$ATOMA_BASE_URL``, then
            ``https://api.atoma.network/v1``.
        dialect: how the server reads a request: ``"atoma"`` (the default, whatever
            ``base_url`` is: a self-hosted Atoma proxy has its own address) or ``"openai"``
            for OpenAI and servers that follow OpenAI's images API. On Atoma each image is
            a request of its own, sent as ``width``/``height`` with ``"B64Json"``, because
            its backend reads nothing else (docs/contract.md).
        model: the model used when a call names none.
        timeout: limits for one attempt: a `Timeout`, or a number of seconds for the whole
            attempt. Defaults to ``Timeout()``.
        retries: the default `RetryPolicy`; ``RetryPolicy(max_retries=0)`` turns retries off.
        max_connections: the size of the connection pool.
        max_response_bytes: the largest response body read before giving up.
        headers: extra headers sent with every request to ``base_url``'s origin.
        ssl: TLS verification: True (the default), an `ssl.SSLContext`, or False to turn
            verification off (only for a server you trust on a network you trust).
        session: an `aiohttp.ClientSession` to use instead of the client's own.
        budget: a `Budget` that caps the compute units of every call of this client (or
            any `BudgetLike`, such as ``atoma_images.redis.RedisBudget``, shared by replicas).
        rate_limit: a `RateLimit` every request of this client takes a permit from before it
            is sent (or any `RateLimiter`, such as ``atoma_images.redis.RedisRateLimit``).
            With or without one, when the server answers 429 or 503 with Retry-After, every
            call of the client waits that long before its next request (at most the retry
            policy's ``max_retry_after``).
        hooks: `Hooks` told of every attempt, retry and call (after the built-in
            `LoggingHooks`, which logs each retry at INFO).
    """

    def __init__(
        self,
        api_key: str | None = None,
        *,
        base_url: str | None = None,
        model: str = DEFAULT_MODEL,
        timeout: Timeout | float | None = None,
        retries: RetryPolicy | None = None,
        max_connections: int = 100,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        headers: Mapping[str, str] | None = None,
        ssl: ssl_module.SSLContext | bool = True,
        session: aiohttp.ClientSession | None = None,
        budget: BudgetLike | None = None,
        hooks: Iterable[Hooks] | None = None,
        dialect: Dialect = "atoma",
        rate_limit: RateLimiter | None = None,
    ) -> None:
        self._settings = settings = ClientSettings.from_arguments(
            api_key,
            base_url,
            retries,
            model=model,
            timeout=timeout,
            max_connections=max_connections,
            max_response_bytes=max_response_bytes,
            headers=headers,
            ssl=ssl,
            hooks=hooks,
            budget=budget,
            dialect=dialect,
            rate_limit=rate_limit,
        )
        if session is not None and not isinstance(session, aiohttp.ClientSession):
            raise InvalidRequestError("session", session, "allowed: an aiohttp.ClientSession")
        self._url = settings.generations_url
        self._transport = Transport.of(settings, repr(self), session)
        self._meter = UsageMeter()
        # Every request takes a permit here; without a rate limit, only the server's waits.
        # The client's own cooldown holds around any limiter: a user's own may keep none.
        self._pacer: RateLimiter = Cooldown(settings.rate_limit)

    def __repr__(self) -> str:
        return f"<AsyncImagesClient base_url={self.base_url!r} model={self.model!r}>"

    @property
    def base_url(self) -> str:
        """The API root the client sends to, ending in ``/v1``."""
        return str(self._settings.base_url)

    @property
    def model(self) -> str:
        """The model used when a call names none."""
        return self._settings.model

    @property
    def dialect(self) -> Dialect:
        """How the server reads a request: ``"atoma"`` or ``"openai"``."""
        return self._settings.dialect

    @property
    def timeout(self) -> Timeout:
        """The time limits of each attempt, unless a call passes its own."""
        return self._settings.timeout

    @property
    def retries(self) -> RetryPolicy:
        """The retry policy of every call, unless a call passes its own."""
        return self._settings.retries

    @property
    def budget(self) -> BudgetLike | None:
        """The `Budget` that caps every call of this client, if it was given one."""
        return self._settings.budget

    @property
    def rate_limit(self) -> RateLimiter | None:
        """The `RateLimit` every request of this client takes a permit from, if given one."""
        return self._settings.rate_limit

    @property
    def usage(self) -> Usage:
        """What this client's generation calls have cost so far (a snapshot)."""
        return self._meter.usage

    async def generate(
        self,
        prompt: str,
        *,
        model: str | None = None,
        n: int = 1,
        size: str = "1024x1024",
        quality: str | None = None,
        response_format: ResponseFormat | None = None,
        style: str | None = None,
        user: str | None = None,
        extra_body: Mapping[str, Any] | None = None,
        timeout: Timeout | float | None = None,
        retries: RetryPolicy | None = None,
        confidential: bool = False,
        budget: BudgetLike | None = None,
    ) -> ImagesResponse:
        """Generate ``n`` images for ``prompt``.

        On Atoma (the default dialect) the ``n`` images are ``n`` requests of one image,
        sent at once through the pool, each with its own retries; the response holds all
        of them and ``compute_units`` their sum. If some fail, the error of a failed one is
        raised with ``partial`` set to the images that came back (billed, never dropped).

        Args:
            prompt: what to draw, 1 to 1000 characters.
            model: the model; defaults to the client's.
            n: how many images, 1 to 10.
            size: ``"WIDTHxHEIGHT"``; on Atoma both sides multiples of 16 (its backend
                rounds each side up to one, so another size would not be what was billed).
            quality: passed to the server as is (Atoma's backend ignores it).
            response_format: ``"b64_json"``, ``"url"`` or None. On Atoma, None and
                ``"b64_json"`` both give the image's bytes and ``"url"`` is refused (its
                backend answers a file name nobody serves). On OpenAI's API, None leaves
                the field out (gpt-image models refuse it) and the server picks.
            style: passed to the server as is (Atoma's backend ignores it).
            user: an end-user id for the server's abuse tracking.
            extra_body: keys merged into the request body, for options a server reads
                beyond the standard fields (some OpenAI-compatible servers take a
                ``"seed"``; Atoma's backend ignores unknown keys): JSON values, no None,
                and none of the keys the client writes itself.
            timeout: limits for each attempt of this call (overrides the client's).
            retries: the retry policy of this call (overrides the client's).
            confidential: encrypt the request for a node running in a TEE, and decrypt and
                check its answer (needs the ``confidential`` extra: from a clone,
                ``pip install '.[confidential]'``). Each attempt locks a node first, for
                ``n * W * H`` compute units.
            budget: a `Budget` (or any `BudgetLike`) this call must fit in (besides the
                client's).

        Returns:
            The images; ``compute_units`` says what the call was charged.

        Raises:
            InvalidRequestError: an argument is not valid; nothing was sent.
            BudgetExceededError: the call costs more than a budget has left; nothing was sent.
            BudgetUnavailableError: a budget or the rate limit kept in a store (Redis) could
                not be checked; nothing was sent.
            ExtraNotInstalledError: ``confidential=True`` without the extra; nothing was sent.
            APIStatusError: the server answered with an error status (see its subclasses).
            APIConnectionError: no usable answer (`AmbiguousOutcomeError` when the request
                was sent and may have been billed).
            ResponseValidationError: a success status with a body that is not an images response.
            ResponseIntegrityError: a confidential answer failed decryption or its hash check.
        """
        request = ImageRequest(
            model=self.model if model is None else model,
            prompt=prompt,
            n=n,
            size=size,
            quality=quality,
            response_format=response_format,
            style=style,
            user=user,
            extra_body=extra_body,
        )
        return await self._generate_request(
            request, timeout=timeout, retries=retries, confidential=confidential, budget=budget
        )

    async def _generate_request(
        self,
        request: ImageRequest,
        *,
        timeout: Timeout | float | None = None,
        retries: RetryPolicy | None = None,
        confidential: bool = False,
        budget: BudgetLike | None = None,
        meters: tuple[UsageMeter, ...] = (),
        max_in_flight: int | None = None,
    ) -> ImagesResponse:
        """`generate` for a request already built (`Batch` builds one per prompt).

        ``meters`` count the call besides the client's own (a batch's). ``max_in_flight``
        bounds how many of its requests are sent at once (on Atoma, one per image): by
        default the pool's size, so that none waits for a connection its siblings hold.
        """
        dialect = self.dialect
        parts = plan(dialect, request)  # InvalidRequestError here: nothing sent
        limits = self._limits(timeout)
        policy = policy_for(retries, self.retries)
        check_flag("confidential", confidential)
        self._transport.open()  # a closed client fails here, before anything is reserved
        meters = (self._meter, *meters)
        # Every request's cost is reserved in every budget before the first is sent (or
        # BudgetExceededError, and nothing is sent).
        costs = await CallCost.reserve(
            compute_units(parts[0]), check_budget(budget), self.budget, requests=len(parts)
        )
        calls = [
            self._request(part, encode(dialect, part), limits, policy, cost, confidential)
            for part, cost in zip(parts, costs, strict=True)
        ]
        if len(calls) == 1:
            return await counted(calls[0], costs[0], meters)
        limit = max_in_flight or self._transport.pool_size or len(calls)
        return await _all_of(calls, costs, meters, limit)

    def _request(  # noqa: PLR0917 - one request's parts, in order
        self,
        request: ImageRequest,
        body: bytes,
        limits: Timeout,
        policy: RetryPolicy,
        cost: CallCost,
        confidential: bool,
    ) -> Coroutine[Any, Any, ImagesResponse]:
        """One request of a call, in the policy's attempt loop (not yet awaited)."""
        pacing = Pacing(self._pacer, policy)  # a permit before each attempt is sent
        if confidential:
            from . import _confidential  # noqa: PLC0415 - cryptography costs import time

            async def post(
                url: URL,
                body: bytes,
                seconds: float,
                max_bytes: int | None,
                progress: RequestProgress | None,
            ) -> Answer:
                timeout = limits.for_attempt(await pacing.before_send(seconds))
                answer = await self._transport.post(
                    url, body, timeout, max_bytes=max_bytes, progress=progress
                )
                await pacing.after_answer(answer.status, answer.headers)
                return answer

            return _confidential.generate(
                post,
                self._settings.base_url,
                request,
                body,
                limits,
                policy,
                self._settings.hooks,
                cost,
            )

        async def attempt(remaining: float) -> ImagesResponse:
            timeout = limits.for_attempt(await pacing.before_send(remaining))
            answer = await self._transport.post(
                self._url, body, timeout, progress=cost.paid_request()
            )
            await pacing.after_answer(answer.status, answer.headers)
            return parse_response(answer.status, answer.headers, answer.body, self._url)

        describe = partial(CallInfo.of, "generate", "POST", self._url, request)
        return policy.run(attempt, self._settings.hooks, describe, cost)

    def generate_many(
        self,
        prompts: Iterable[Prompt] | AsyncIterable[Prompt],
        *,
        concurrency: int = 4,
        on_progress: Callable[[int, int | None], object] | None = None,
        **generate_options: Any,
    ) -> Batch:
        """Generate for many prompts, at most ``concurrency`` at a time; results as they finish.

        ```python
        async with client.generate_many(prompts, concurrency=8, size="512x512") as batch:
            async for result in batch:
                if result.ok:
                    result.response.images[0].save(f"{result.index}.png")
        print(batch.summary)
        ```

        A prompt that fails gives a `BatchResult` with its error; the batch goes on. When
        the server asks one call to wait (429 with Retry-After), the whole batch waits.

        Args:
            prompts: an iterable or async iterable, read lazily, of prompt strings, of
                mappings of `generate` options with a ``"prompt"`` key (to mix sizes or
                models), or of `ImageRequest`.
            concurrency: the most requests in flight at once; never more than the
                connection pool holds (``max_connections``, or the limit of a session passed
                in), so that no call of the batch waits for a connection another one holds.
            on_progress: called as ``on_progress(done, total)`` after each result; ``total``
                is None when the source has no ``len()``.
            **generate_options: the options of `generate` for every prompt (an item's own
                options take precedence).

        Returns:
            A `Batch`: an async iterator of `BatchResult`, in completion order, and an async
            context manager that cancels what is still in flight on exit.

        Raises:
            InvalidRequestError: an argument or an option is not valid; nothing was sent.
        """
        return Batch(
            self._generate_request,
            prompts,
            model=self.model,
            dialect=self.dialect,
            retries=self.retries,
            concurrency=concurrency,
            on_progress=on_progress,
            options=generate_options,
            pool_size=self._transport.pool_size,
        )

    async def download(
        self,
        image: GeneratedImage | str,
        *,
        max_bytes: int = DEFAULT_MAX_DOWNLOAD_BYTES,
        timeout: Timeout | float | None = None,
    ) -> bytes:
        """The bytes of an image: downloaded for a URL result, decoded for a base64 one.

        Only http(s) URLs are fetched, through the client's own session and with its
        timeouts and retries (a download is safe to repeat, so a dropped one is retried).
        Redirects are followed (at most five), each hop only to an http(s) URL. The key and
        the client's ``headers`` go only to the origin of ``base_url``; any other host gets
        nothing but ``User-Agent`` and ``Accept``.

        Raises:
            InvalidRequestError: the image has no http(s) URL (such as the node-local file
                name Atoma's backend answers to a request without ``"B64Json"``, which
                ``dialect="atoma"`` always sends), or its URL holds ``user:password@``.
            ResponseValidationError: the image is larger than ``max_bytes``.
            APIStatusError: the URL answered with an error status (404 when it expired), or
                redirected too often, to something that is not http(s), or to a URL with
                ``user:password@``.
            APIConnectionError: the download failed.
        """
        if isinstance(image, GeneratedImage) and image.b64_json is not None:
            return image.decode()
        url = download_url(image.url if isinstance(image, GeneratedImage) else image)
        check_whole_number("max_bytes", max_bytes, 1)
        return await download(
            self._transport,
            url,
            self._settings.base_url,
            self._limits(timeout),
            self.retries,
            self._settings.hooks,
            max_bytes,
        )

    async def models(self, *, timeout: Timeout | float | None = None) -> tuple[ModelInfo, ...]:
        """The models the API serves (``GET /v1/models``, with the key).

        ``timeout`` defaults to the client's, shortened to seconds, not a generation's
        minutes (at most 5 s to connect, 10 s of silence, 15 s an attempt), and the whole
        call, retries included, ends within 30 s: fit for a readiness probe.

        To check at start-up that the configured model exists, rather than learn it from a
        400 on the first paid call. Atoma's list does not say what a model does: image and
        chat models look alike (its proxy keeps only their names), so the list is not
        filtered and a model in it may not draw images. Safe to repeat: retried as a
        download is, and never counted in `usage` or a budget.

        Raises:
            AuthenticationError: the key was refused.
            APIStatusError: the server answered with another error status.
            APIConnectionError: no usable answer.
            ResponseValidationError: a success status with a body that is not a models list.
        """
        return await fetch_models(
            self._transport,
            self._settings.base_url,
            limits=self._discovery_limits(timeout),
            policy=self._discovery_policy(),
            hooks=self._settings.hooks,
        )

    async def health(self, *, timeout: Timeout | float | None = None) -> Health:
        """Whether the API is up: what ``GET /health`` answered (``message="ok"`` on Atoma).

        Its time limits are those of `models`.

        ``/health`` sits at the API's root, beside ``/v1`` (``https://api.atoma.network/health``),
        and needs no key: none is sent. It does not check the key; `models` does. Retried as a
        download is, and never counted in `usage` or a budget.

        Raises:
            NotFoundError: the server has no ``/health`` (OpenAI's API has none).
            APIStatusError: the server answered with another error status: it is not healthy.
            APIConnectionError: no usable answer: it is down or out of reach.
            ResponseValidationError: a success status with a body that is not a JSON object.
        """
        return await fetch_health(
            self._transport,
            self._settings.base_url,
            limits=self._discovery_limits(timeout),
            policy=self._discovery_policy(),
            hooks=self._settings.hooks,
        )

    def _discovery_limits(self, timeout: Timeout | float | None) -> Timeout:
        # A call's own limits as given; else the client's, but never longer than seconds.
        if timeout is not None:
            return Timeout.of(timeout)
        mine = attrs.asdict(self.timeout)
        short = {
            name: limit if mine[name] is None else min(limit, mine[name])
            for name, limit in attrs.asdict(DISCOVERY_TIMEOUT).items()
        }
        return Timeout(**short)

    def _discovery_policy(self) -> RetryPolicy:
        # A question about the API, not a generation: the client's retries, within seconds.
        return attrs.evolve(self.retries, deadline=min(self.retries.deadline, DISCOVERY_DEADLINE))

    async def save_all(
        self,
        response: ImagesResponse,
        directory: str | os.PathLike[str],
        stem: str = "image",
    ) -> list[Path]:
        """Write every image of ``response`` to ``directory``, downloading URL images.

        Files are named ``stem-1.png``, ``stem-2.jpeg``, ... after their own bytes.
        """
        images = await asyncio.gather(*(self.download(image) for image in response.images))
        return write_images(images, directory, stem)

    def _limits(self, timeout: Timeout | float | None) -> Timeout:
        return self.timeout if timeout is None else Timeout.of(timeout)

    async def aclose(self) -> None:
        """Close the client's own session (a session passed in is left open). Safe to repeat."""
        await self._transport.aclose()

    async def __aenter__(self) -> AsyncImagesClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __del__(self) -> None:
        transport = getattr(self, "_transport", None)  # absent if __init__ raised
        if transport is not None:
            transport.warn_if_open()


async def _all_of(
    calls: list[Coroutine[Any, Any, ImagesResponse]],
    costs: list[CallCost],
    meters: tuple[UsageMeter, ...],
    limit: int,
) -> ImagesResponse:
    """Run the requests of one call, ``limit`` at a time: one response of all their images,
    or the error of the first that failed, with ``partial`` set to what the others brought
    back.

    Cancelling it cancels them all and returns only when none is left running. Each
    request is counted once, from how it ended; one cancelled before it started cost nothing.
    """
    turns = asyncio.Semaphore(limit)

    async def in_turn(call: Coroutine[Any, Any, ImagesResponse]) -> ImagesResponse:
        async with turns:
            return await call

    tasks = [asyncio.ensure_future(in_turn(call)) for call in calls]
    try:
        await asyncio.wait(tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await _until_done(tasks)
        responses, _ = await _count(tasks, costs, meters, calls)
        if responses:  # billed, and the caller is gone: say so rather than drop them quietly
            logger.warning(
                "atoma-images: a call for %d images was cancelled after %d of them were "
                "generated and billed (%d compute units); they are not returned",
                len(calls),
                sum(len(response.data) for response in responses),
                sum(response.compute_units for response in responses),
            )
        raise
    responses, errors = await _count(tasks, costs, meters, calls)
    together = _merged(responses) if responses else None
    if not errors:
        assert together is not None
        return together
    error = errors[0]
    if isinstance(error, AtomaImagesError):
        error.partial = together
        # The call was billed for what came back, and maybe for what did not.
        if together is not None or any(map(may_have_been_billed, errors)):
            error.may_have_been_billed = True
    raise error


async def _until_done(tasks: list[asyncio.Task[ImagesResponse]]) -> None:
    """Wait until every task has ended, however often the waiting is cancelled: the caller
    raises its own cancellation once nothing it started is left running."""
    pending = [task for task in tasks if not task.done()]
    while pending:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait(pending)
        pending = [task for task in pending if not task.done()]


async def _count(
    tasks: list[asyncio.Task[ImagesResponse]],
    costs: list[CallCost],
    meters: tuple[UsageMeter, ...],
    calls: list[Coroutine[Any, Any, ImagesResponse]],
) -> tuple[list[ImagesResponse], list[BaseException]]:
    """Each ended request, counted in the meters: its response (with its cost) or its error."""
    responses: list[ImagesResponse] = []
    errors: list[BaseException] = []
    for task, cost, call in zip(tasks, costs, calls, strict=True):
        call.close()  # one cancelled before its turn never started: nothing left to await
        error = asyncio.CancelledError() if task.cancelled() else task.exception()
        response = await cost.close(task.result() if error is None else None, meters)
        if response is None:
            errors.append(error)  # type: ignore[arg-type]  # not None when there is no result
        else:
            responses.append(response)
    return responses, errors


def _merged(responses: list[ImagesResponse]) -> ImagesResponse:
    """One response of every image, costing the sum; the rest is the first response's."""
    return attrs.evolve(
        responses[0],
        data=tuple(image for response in responses for image in response.data),
        compute_units=sum(response.compute_units for response in responses),
    )
