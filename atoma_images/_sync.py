"""`ImagesClient`: the synchronous face of `AsyncImagesClient`.

A portal, not a copy: it owns one event loop in one daemon thread, holds an
`AsyncImagesClient` there and hands it every call. Requests, parsing and retries exist once,
in the async client; this module only moves calls across threads.
"""

from __future__ import annotations

import atexit
import logging
import os
import ssl as ssl_module
import warnings
import weakref
from collections.abc import AsyncIterable, Callable, Coroutine, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import aiohttp

from ._batch import Prompt, SyncBatch
from ._client import DEFAULT_MAX_DOWNLOAD_BYTES, DEFAULT_MAX_RESPONSE_BYTES, AsyncImagesClient
from ._dialect import Dialect
from ._discovery import Health, ModelInfo
from ._errors import InvalidRequestError
from ._hooks import Hooks
from ._limits import BudgetLike, RateLimiter
from ._models import DEFAULT_MODEL, GeneratedImage, ImagesResponse, ResponseFormat
from ._portal import LoopThread, PortalState
from ._retry import RetryPolicy
from ._settings import from_environment
from ._timeout import Timeout
from ._usage import Usage

__all__ = ["ImagesClient"]

T = TypeVar("T")

# Clients still open at interpreter exit are closed then, so a script that never calls
# close() still exits cleanly, without "Unclosed client session" on stderr.
logger = logging.getLogger("atoma_images")

_open_clients: weakref.WeakSet[ImagesClient] = weakref.WeakSet()


@atexit.register
def _close_open_clients() -> None:
    for client in list(_open_clients):
        client.close()


# A forked child (multiprocessing's fork, gunicorn --preload, Celery prefork) inherits each
# client's loop but not the thread that ran it: each open client starts afresh there, with a
# loop, a thread and a session of the child's own (each client's `_start_afresh`, held weakly).
_in_forked_child: set[weakref.WeakMethod[Callable[[], None]]] = set()
# What the child inherited: kept, never used and never closed, for the process's life. Its
# connections and its epoll are shared with the parent, and closing them here would take them
# from the parent (an unregistered socket, a TLS close_notify on the parent's connection).
_inherited: list[object] = []


def _start_afresh_in_child() -> None:
    for method in list(_in_forked_child):
        start_afresh = method()
        if start_afresh is None:
            continue
        try:
            start_afresh()
        except Exception:  # that client cannot work here; the others still can
            logger.exception("atoma-images: an ImagesClient could not start afresh in a child")


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_start_afresh_in_child)


class ImagesClient:
    """A synchronous client for scripts, threads and notebooks.

    Takes the same arguments as `AsyncImagesClient`, returns the same values and raises the
    same errors. It works where an event loop is already running (Jupyter) and from many
    threads at once. Close it with ``with`` or `close`; one left open is closed at exit.
    Its ``hooks`` run on the client's own event loop thread.

    Each method is the blocking twin of the `AsyncImagesClient` method of the same name,
    whose docstring gives its arguments, what it returns and what it raises. A call blocks
    until it is over. Ctrl-C while it waits cancels the call and raises KeyboardInterrupt: a
    request the client's loop had not started is never sent, one under way is cancelled and
    its connection released. The client stays usable.
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
        if session is not None:
            # A session is bound to the loop it was made in; this client runs its own.
            raise InvalidRequestError(
                "session",
                session,
                "allowed: None; ImagesClient runs its own event loop and session. "
                "Pass a session to AsyncImagesClient instead",
            )

        # Kept to make the client again in a forked child (_start_afresh), from the key and
        # root resolved now: a parent may clear its environment before it forks. A closure,
        # not a functools.partial: a partial's repr would show the key.
        api_key, base_url = from_environment(api_key, base_url)

        def make_client() -> AsyncImagesClient:
            return AsyncImagesClient(
                api_key,
                base_url=base_url,
                model=model,
                timeout=timeout,
                retries=retries,
                max_connections=max_connections,
                max_response_bytes=max_response_bytes,
                headers=headers,
                ssl=ssl,
                budget=budget,
                hooks=hooks,
                dialect=dialect,
                rate_limit=rate_limit,
            )

        self._make_client = make_client
        self._client = self._make_client()
        self._portal = LoopThread("atoma-images")
        _open_clients.add(self)
        _in_forked_child.add(weakref.WeakMethod(self._start_afresh, _in_forked_child.discard))

    def __repr__(self) -> str:
        return f"<ImagesClient base_url={self.base_url!r} model={self.model!r}>"

    @property
    def base_url(self) -> str:
        """The API root the client sends to, ending in ``/v1``."""
        return self._client.base_url

    @property
    def model(self) -> str:
        """The model used when a call names none."""
        return self._client.model

    @property
    def dialect(self) -> Dialect:
        """How the server reads a request: ``"atoma"`` or ``"openai"``."""
        return self._client.dialect

    @property
    def timeout(self) -> Timeout:
        """The time limits of each attempt, unless a call passes its own."""
        return self._client.timeout

    @property
    def retries(self) -> RetryPolicy:
        """The retry policy of every call, unless a call passes its own."""
        return self._client.retries

    @property
    def budget(self) -> BudgetLike | None:
        """The `Budget` that caps every call of this client, if it was given one."""
        return self._client.budget

    @property
    def rate_limit(self) -> RateLimiter | None:
        """The `RateLimit` every request of this client takes a permit from, if given one."""
        return self._client.rate_limit

    def generate(
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
        """Generate ``n`` images for ``prompt``: the blocking `AsyncImagesClient.generate`."""
        return self._run(
            self._client.generate(
                prompt,
                model=model,
                n=n,
                size=size,
                quality=quality,
                response_format=response_format,
                style=style,
                user=user,
                extra_body=extra_body,
                timeout=timeout,
                retries=retries,
                confidential=confidential,
                budget=budget,
            )
        )

    def download(
        self,
        image: GeneratedImage | str,
        *,
        max_bytes: int = DEFAULT_MAX_DOWNLOAD_BYTES,
        timeout: Timeout | float | None = None,
    ) -> bytes:
        """The bytes of an image: the blocking `AsyncImagesClient.download`."""
        return self._run(self._client.download(image, max_bytes=max_bytes, timeout=timeout))

    def models(self, *, timeout: Timeout | float | None = None) -> tuple[ModelInfo, ...]:
        """The models the API serves: the blocking `AsyncImagesClient.models`."""
        return self._run(self._client.models(timeout=timeout))

    def health(self, *, timeout: Timeout | float | None = None) -> Health:
        """Whether the API is up: the blocking `AsyncImagesClient.health`."""
        return self._run(self._client.health(timeout=timeout))

    def save_all(
        self,
        response: ImagesResponse,
        directory: str | os.PathLike[str],
        stem: str = "image",
    ) -> list[Path]:
        """Write every image to ``directory``: the blocking `AsyncImagesClient.save_all`."""
        return self._run(self._client.save_all(response, directory, stem))

    def _run(self, call: Coroutine[Any, Any, T]) -> T:
        return self._portal.run(call)  # a RuntimeError once the client is closed

    def _start_afresh(self) -> None:
        """In a forked child: a portal and an async client (so a session) of the child's own.

        The child's calls then work as the parent's do; what it inherited is kept aside,
        untouched (`_inherited`). A closed client stays closed.
        """
        if self._portal.state is PortalState.CLOSED:
            return
        _inherited.append((self._portal.forget_in_child(), self._client))
        try:
            self._client = self._make_client()
        except BaseException:
            # Closed for good rather than left bound to the parent's loop, where a call
            # would wait for ever: every call now says the client is closed, at once.
            self._portal.stop()
            raise

    def close(self) -> None:
        """Close the client for good: cancel calls still running, close the session, stop
        the loop and join its thread. Safe to repeat."""
        _open_clients.discard(self)
        self._portal.stop(self._client.aclose())

    def __enter__(self) -> ImagesClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        portal = getattr(self, "_portal", None)  # absent if __init__ raised
        if portal is None or portal.state is PortalState.CLOSED:
            return
        warnings.warn(
            f"unclosed {self!r}: use 'with ImagesClient(...)' or client.close()",
            ResourceWarning,
            stacklevel=1,
            source=self,
        )
        # Never wait here (a finaliser that joins a thread can hang): the loop closes the
        # session and ends by itself.
        portal.stop(self._client.aclose(), wait=False)

    @property
    def usage(self) -> Usage:
        """What this client's generation calls have cost so far (a snapshot)."""
        return self._client.usage

    def generate_many(
        self,
        prompts: Iterable[Prompt] | AsyncIterable[Prompt],
        *,
        concurrency: int = 4,
        on_progress: Callable[[int, int | None], object] | None = None,
        **generate_options: Any,
    ) -> SyncBatch:
        """Generate for many prompts, at most ``concurrency`` at a time; results as they finish.

        ```python
        with client.generate_many(prompts, concurrency=8, size="512x512") as batch:
            for result in batch:
                if result.ok:
                    result.response.images[0].save(f"{result.index}.png")
        print(batch.summary)
        ```

        A prompt that fails gives a `BatchResult` with its error; the batch goes on. When
        the server asks one call to wait (429 with Retry-After), the whole batch waits.
        Leaving the loop early (``break``, an exception, Ctrl-C) cancels the calls in flight
        and waits for them; ``on_progress`` is called in the thread that iterates. The
        arguments and errors are those of `AsyncImagesClient.generate_many`.

        Returns:
            A `SyncBatch`: an iterator of `BatchResult`, in completion order, and a context
            manager that cancels what is still in flight on exit.
        """
        batch = self._client.generate_many(
            prompts, concurrency=concurrency, on_progress=None, **generate_options
        )
        return SyncBatch(batch, self._run, on_progress)
