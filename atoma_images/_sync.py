"""`ImagesClient`: the synchronous face of `AsyncImagesClient`.

A portal, not a copy: it owns one event loop in one daemon thread, holds an
`AsyncImagesClient` there and hands it every call. Requests, parsing and retries exist once,
in the async client; this module only moves calls across threads.
"""

from __future__ import annotations

import atexit
import os
import ssl as ssl_module
import threading
import warnings
import weakref
from collections.abc import AsyncIterable, Callable, Coroutine, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import aiohttp

from ._batch import Prompt, SyncBatch
from ._client import DEFAULT_MAX_DOWNLOAD_BYTES, DEFAULT_MAX_RESPONSE_BYTES, AsyncImagesClient
from ._errors import InvalidRequestError
from ._hooks import Hooks
from ._models import DEFAULT_MODEL, GeneratedImage, ImagesResponse, ResponseFormat
from ._portal import LoopThread
from ._retry import RetryPolicy
from ._timeout import Timeout
from ._usage import Budget, Usage

__all__ = ["ImagesClient"]

T = TypeVar("T")

# Clients still open at interpreter exit are closed then, so a script that never calls
# close() still exits cleanly, without "Unclosed client session" on stderr.
_open_clients: weakref.WeakSet[ImagesClient] = weakref.WeakSet()


@atexit.register
def _close_open_clients() -> None:
    for client in list(_open_clients):
        client.close()


class ImagesClient:
    """A synchronous client for scripts, threads and notebooks.

    Takes the same arguments as `AsyncImagesClient`, returns the same values and raises the
    same errors. It works where an event loop is already running (Jupyter) and from many
    threads at once. Close it with ``with`` or `close`; one left open is closed at exit.
    Its ``hooks`` run on the client's own event loop thread.
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
        budget: Budget | None = None,
        hooks: Iterable[Hooks] | None = None,
    ) -> None:
        if session is not None:
            # A session is bound to the loop it was made in; this client runs its own.
            raise InvalidRequestError(
                "session",
                session,
                "allowed: None; ImagesClient runs its own event loop and session. "
                "Pass a session to AsyncImagesClient instead",
            )
        self._client = AsyncImagesClient(
            api_key,
            base_url=base_url,
            model=model,
            timeout=timeout,
            retries=retries,
            max_connections=max_connections,
            max_response_bytes=max_response_bytes,
            headers=headers,
            ssl=ssl,
            session=session,
            budget=budget,
            hooks=hooks,
        )
        self._portal = LoopThread("atoma-images")
        self._lock = threading.Lock()
        self._closed = False
        _open_clients.add(self)

    def __repr__(self) -> str:
        return f"<ImagesClient base_url={self.base_url!r} model={self.model!r}>"

    @property
    def base_url(self) -> str:
        return self._client.base_url

    @property
    def model(self) -> str:
        return self._client.model

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
        timeout: Timeout | float | None = None,
        retries: RetryPolicy | None = None,
        confidential: bool = False,
        budget: Budget | None = None,
    ) -> ImagesResponse:
        """Generate ``n`` images for ``prompt``; see `AsyncImagesClient.generate`.

        Ctrl-C during the call cancels the request (its connection is released) and
        re-raises KeyboardInterrupt; the client stays usable.
        """
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
        """The bytes of an image; see `AsyncImagesClient.download`."""
        return self._run(self._client.download(image, max_bytes=max_bytes, timeout=timeout))

    def save_all(
        self,
        response: ImagesResponse,
        directory: str | os.PathLike[str],
        stem: str = "image",
    ) -> list[Path]:
        """Write every image to ``directory``; see `AsyncImagesClient.save_all`."""
        return self._run(self._client.save_all(response, directory, stem))

    def _run(self, call: Coroutine[Any, Any, T]) -> T:
        if self._closed:
            call.close()
            raise RuntimeError(f"{self!r} is closed; create a new client")
        return self._portal.run(call)

    def close(self) -> None:
        """Close the session, stop the loop and join its thread. Safe to repeat."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        _open_clients.discard(self)
        if self._portal.running:
            self._portal.run(self._client.aclose())
        self._portal.stop()

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
        if getattr(self, "_closed", True):
            return
        self._closed = True
        warnings.warn(
            f"unclosed {self!r}: use 'with ImagesClient(...)' or client.close()",
            ResourceWarning,
            stacklevel=1,
            source=self,
        )
        # Never wait here (a finaliser that joins a thread can hang): the loop closes the
        # session and stops on its own.
        self._portal.stop_after(self._client.aclose())

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

        The same as `AsyncImagesClient.generate_many`, as a plain iterator; ``on_progress``
        is called in the thread that iterates::

            with client.generate_many(prompts, size="512x512") as batch:
                for result in batch:
                    ...
        """
        batch = self._client.generate_many(
            prompts, concurrency=concurrency, on_progress=None, **generate_options
        )
        return SyncBatch(batch, self._run, on_progress)
