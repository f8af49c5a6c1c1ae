"""`AsyncImagesClient`: one aiohttp session, one retry policy, typed errors."""

from __future__ import annotations

import asyncio
import logging
import os
import ssl as ssl_module
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import aiohttp
import attrs
from multidict import CIMultiDict
from yarl import URL

from . import _read_timer
from ._convert import encode_request, error_from_response, parse_response
from ._errors import (
    AmbiguousOutcomeError,
    AmbiguousTimeoutError,
    APIConnectionError,
    APITimeoutError,
    AtomaImagesError,
    InvalidRequestError,
    ResponseValidationError,
)
from ._files import write_images
from ._models import DEFAULT_MODEL, GeneratedImage, ImageRequest, ImagesResponse
from ._retry import RetryPolicy
from ._timeout import Timeout
from ._version import user_agent

__all__ = ["DEFAULT_BASE_URL", "AsyncImagesClient"]

logger = logging.getLogger("atoma_images")

T = TypeVar("T")
#: Turns (status, headers, body, url) into the call's result, or raises the error it means.
Parse = Callable[[int, Mapping[str, str], bytes, URL], T]


DEFAULT_BASE_URL = "https://api.atoma.network/v1"
KEY_VARIABLES = ("ATOMA_API_KEY", "ATOMASDK_BEARER_AUTH")
DEFAULT_MAX_RESPONSE_BYTES = 128 * 2**20
DEFAULT_MAX_DOWNLOAD_BYTES = 64 * 2**20
# An error body is kept for the error's message; more than this of it is not read.
_MAX_ERROR_BODY = 2**20
_NOT_SENT = "; the request was not sent, so nothing was billed"
_MAYBE_BILLED = (
    "; the request was sent, so it may have been processed and billed. By default such a "
    "request is not sent again, to avoid paying twice (RetryPolicy(retry_ambiguous=True))"
)
_DOWNLOAD_ONLY = "; fetching an image bills nothing"


def _consequence(method: str) -> str:
    return _MAYBE_BILLED if method == "POST" else _DOWNLOAD_ONLY


class AsyncImagesClient:
    """An asyncio client for ``POST /v1/images/generations``.

    Create one per application and share it: it holds one connection pool. Close it with
    ``async with`` or `aclose`. A ``session`` passed in is used as is and never closed here.

    Args:
        api_key: the Atoma API key. Defaults to ``$ATOMA_API_KEY``, then
            ``$ATOMASDK_BEARER_AUTH`` (the Atoma SDK's variable).
        base_url: the API root, ending in ``/v1``. Defaults to ``$ATOMA_BASE_URL``, then
            ``https://api.atoma.network/v1``. Any OpenAI-compatible server works.
        model: the model used when a call names none.
        timeout: limits for one attempt: a `Timeout`, or a number of seconds for the whole
            attempt. Defaults to ``Timeout()``.
        retries: the default `RetryPolicy`; ``RetryPolicy(max_retries=0)`` turns retries off.
        max_connections: the size of the connection pool.
        max_response_bytes: the largest response body read before giving up.
        headers: extra headers sent with every request.
        ssl: TLS verification: True (the default), an `ssl.SSLContext`, or False to turn
            verification off (only for a server you trust on a network you trust).
        session: an `aiohttp.ClientSession` to use instead of the client's own.
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
    ) -> None:
        key = _api_key(api_key)
        self._base_url = _base_url(base_url)
        self._url = self._base_url / "images/generations"
        ImageRequest(model=model, prompt="-")  # checks the model name now, not on first call
        self._model = model
        self._timeout = Timeout() if timeout is None else Timeout.of(timeout)
        self._retries = _policy(retries, RetryPolicy())
        if type(max_connections) is not int or max_connections < 1:
            raise InvalidRequestError("max_connections", max_connections, "allowed: an int >= 1")
        self._max_connections = max_connections
        if type(max_response_bytes) is not int or max_response_bytes < 1:
            raise InvalidRequestError(
                "max_response_bytes", max_response_bytes, "allowed: an int >= 1"
            )
        self._max_response_bytes = max_response_bytes
        if not isinstance(ssl, (bool, ssl_module.SSLContext)):
            raise InvalidRequestError("ssl", ssl, "allowed: True, False or an ssl.SSLContext")
        self._ssl = ssl
        self._headers = CIMultiDict(
            {
                "Authorization": f"Bearer {key}",
                "Content-Type": "application/json",
                "Accept": "application/json",
                "User-Agent": user_agent(),
            }
        )
        for name, value in (headers or {}).items():
            if name.lower() in ("authorization", "content-type"):
                raise InvalidRequestError(
                    "headers", name, "allowed: any header but Authorization and Content-Type"
                )
            self._headers[name] = value
        # For downloads from other hosts: everything but the key.
        self._anonymous = CIMultiDict(self._headers)
        del self._anonymous["Authorization"]
        # Built once: the first attempt of a call with default limits uses it as is.
        self._first_attempt_timeout = self._timeout.for_attempt(self._retries.deadline)
        self._session = session
        self._owns_session = session is None
        # Only for our own session; a session passed in keeps its own proxy settings.
        self._proxies: dict[URL, tuple[URL | None, aiohttp.BasicAuth | None]] = {}
        self._url_proxy = self._proxy(self._url)  # looked up once: every call goes there
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"<AsyncImagesClient base_url={str(self._base_url)!r} model={self._model!r}>"

    @property
    def base_url(self) -> str:
        return str(self._base_url)

    @property
    def model(self) -> str:
        return self._model

    @property
    def timeout(self) -> Timeout:
        return self._timeout

    @property
    def retries(self) -> RetryPolicy:
        return self._retries

    async def generate(
        self,
        prompt: str,
        *,
        model: str | None = None,
        n: int = 1,
        size: str = "1024x1024",
        quality: str | None = None,
        response_format: str | None = None,
        style: str | None = None,
        user: str | None = None,
        timeout: Timeout | float | None = None,
        retries: RetryPolicy | None = None,
        confidential: bool = False,
    ) -> ImagesResponse:
        """Generate ``n`` images for ``prompt``.

        Args:
            prompt: what to draw, 1 to 1000 characters.
            model: the model; defaults to the client's.
            n: how many images, 1 to 10.
            size: ``"WIDTHxHEIGHT"``.
            quality: passed to the server as is.
            response_format: ``"url"`` or ``"b64_json"``; leave it out to get the server's
                default (Atoma's backend answers with base64 data).
            style: passed to the server as is.
            user: an end-user id for the server's abuse tracking.
            timeout: limits for each attempt of this call (overrides the client's).
            retries: the retry policy of this call (overrides the client's).
            confidential: encrypt the request for a node running in a TEE, and decrypt and
                check its answer (needs ``pip install 'atoma-images[confidential]'``). Each
                attempt locks a node first, for ``n * W * H`` compute units.

        Raises:
            InvalidRequestError: an argument is not valid; nothing was sent.
            ExtraNotInstalledError: ``confidential=True`` without the extra; nothing was sent.
            APIStatusError: the server answered with an error status (see its subclasses).
            APIConnectionError: no usable answer (`AmbiguousOutcomeError` when the request
                was sent and may have been billed).
            ResponseValidationError: a success status with a body that is not an images response.
            ResponseIntegrityError: a confidential answer failed decryption or its hash check.
        """
        request = ImageRequest(
            model=self._model if model is None else model,
            prompt=prompt,
            n=n,
            size=size,
            quality=quality,
            response_format=response_format,
            style=style,
            user=user,
        )
        body = encode_request(request)
        policy = _policy(retries, self._retries)
        if confidential is not False:
            if confidential is not True:
                raise InvalidRequestError("confidential", confidential, "allowed: True or False")
            return await self._generate_confidential(request, body, timeout, policy)
        return await self._call(
            "POST",
            self._url,
            body=body,
            headers=self._headers,
            max_bytes=self._max_response_bytes,
            parse=parse_response,
            timeout=timeout,
            policy=policy,
        )

    async def _generate_confidential(
        self,
        request: ImageRequest,
        plaintext: bytes,
        timeout: Timeout | float | None,
        policy: RetryPolicy,
    ) -> ImagesResponse:
        """Each attempt locks a node, seals the request for it and opens its answer.

        A fresh lock every attempt: a 425 (the lock was not usable) is retried with a new one.
        """
        # Imported on first use: hashlib and cryptography cost import time nobody else pays.
        from . import _confidential  # noqa: PLC0415

        _confidential.require()
        lock_url = self._base_url / _confidential.LOCK_PATH
        sealed_url = self._base_url / _confidential.PATH
        session = self._session_for_running_loop()
        limits = self._timeout if timeout is None else Timeout.of(timeout)
        lock_body = _confidential.lock_body(request)
        started = time.monotonic()

        async def attempt(remaining: float) -> ImagesResponse:
            began = time.monotonic()
            lock = await self._exchange(
                session,
                "POST",
                lock_url,
                lock_body,
                self._headers,
                limits.for_attempt(remaining),
                _MAX_ERROR_BODY,
                "the lock answer's limit",
                _confidential.parse_lock,
            )
            sealed = _confidential.seal(plaintext, request, lock)
            # Both requests share the attempt's time: what the lock took is gone.
            spent = time.monotonic() - began
            left = remaining - spent
            if limits.total is not None:
                left = min(left, limits.total - spent)
            return await self._exchange(
                session,
                "POST",
                sealed_url,
                sealed.body,
                self._headers,
                limits.for_attempt(left),
                self._max_response_bytes,
                "max_response_bytes",
                sealed.open,
            )

        try:
            return await attempt(policy.deadline)
        except AtomaImagesError as error:
            first_error = error
        return await policy.retry(attempt, first_error=first_error, started=started)

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
        The API key is sent only to the origin of ``base_url``, never to another host.

        Raises:
            InvalidRequestError: the image has no http(s) URL (Atoma's backend may answer
                with a node-local file name: ask for ``response_format="b64_json"``).
            ResponseValidationError: the image is larger than ``max_bytes``.
            APIStatusError: the URL answered with an error status (404 when it expired).
            APIConnectionError: the download failed.
        """
        if isinstance(image, GeneratedImage) and image.b64_json is not None:
            return image.decode()
        url = _download_url(image.url if isinstance(image, GeneratedImage) else image)
        if type(max_bytes) is not int or max_bytes < 1:
            raise InvalidRequestError("max_bytes", max_bytes, "allowed: an int >= 1")
        headers = self._headers if url.origin() == self._base_url.origin() else self._anonymous
        # Fetching a URL bills nothing, so an ambiguous failure is worth another try.
        policy = attrs.evolve(self._retries, retry_ambiguous=True)
        return await self._call(
            "GET",
            url,
            body=None,
            headers=headers,
            max_bytes=max_bytes,
            option="max_bytes",
            parse=_downloaded,
            timeout=timeout,
            policy=policy,
        )

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

    async def _call(
        self,
        method: str,
        url: URL,
        *,
        body: bytes | None,
        headers: Mapping[str, str],
        max_bytes: int,
        option: str = "max_response_bytes",
        parse: Parse[T],
        timeout: Timeout | float | None,
        policy: RetryPolicy,
    ) -> T:
        """One exchange; if it fails in a way the policy retries, hand over to the policy."""
        session = self._session_for_running_loop()
        limits = self._timeout if timeout is None else Timeout.of(timeout)
        started = time.monotonic()
        if limits is self._timeout and policy.deadline == self._retries.deadline:
            first_limit = self._first_attempt_timeout
        else:
            first_limit = limits.for_attempt(policy.deadline)
        exchange = self._exchange
        try:
            return await exchange(
                session, method, url, body, headers, first_limit, max_bytes, option, parse
            )
        except AtomaImagesError as error:
            first_error = error

        async def again(remaining: float) -> T:
            limit = limits.for_attempt(remaining)
            return await exchange(
                session, method, url, body, headers, limit, max_bytes, option, parse
            )

        return await policy.retry(again, first_error=first_error, started=started)

    async def _exchange(  # noqa: PLR0917 - positional on purpose: this runs for every call
        self,
        session: aiohttp.ClientSession,
        method: str,
        url: URL,
        body: bytes | None,
        headers: Mapping[str, str],
        timeout: aiohttp.ClientTimeout,
        max_bytes: int,
        option: str,
        parse: Parse[T],
    ) -> T:
        """One HTTP exchange, its answer parsed; our error for whatever went wrong."""
        proxy, proxy_auth = self._url_proxy if url is self._url else self._proxy(url)
        try:
            async with session.request(
                method,
                url,
                data=body,
                headers=headers,
                timeout=timeout,
                ssl=self._ssl,
                proxy=proxy,
                proxy_auth=proxy_auth,
                # A paid POST goes where it was sent, or nowhere. A GET may follow a CDN's
                # redirect; aiohttp drops the Authorization header when the origin changes.
                allow_redirects=method == "GET",
            ) as response:
                status = response.status
                answer = response.headers
                length = response.content_length
                if (
                    status < 300
                    and length is not None
                    and length <= max_bytes
                    and "Content-Encoding" not in answer
                ):
                    payload = await response.read()  # exactly Content-Length bytes: the usual case
                else:
                    payload = await _read_body(
                        response, max_bytes if status < 300 else _MAX_ERROR_BODY
                    )
        except aiohttp.ClientConnectorCertificateError as exc:
            raise APIConnectionError(
                f"the TLS certificate of {url.host} failed verification ({exc.certificate_error})"
                f"{_NOT_SENT}. Pass ssl=<an ssl.SSLContext that trusts it> if the server is yours",
                url=str(url),
                transient=False,
            ) from exc
        except aiohttp.ClientConnectorError as exc:
            raise APIConnectionError(
                f"could not connect to {url.host}:{url.port} ({exc.os_error}){_NOT_SENT}",
                url=str(url),
            ) from exc
        except aiohttp.ConnectionTimeoutError as exc:
            raise APITimeoutError(
                f"timed out waiting for a connection to {url.host}:{url.port}{_NOT_SENT}",
                url=str(url),
            ) from exc
        except asyncio.TimeoutError as exc:  # aiohttp's read and total limits
            raise AmbiguousTimeoutError(
                f"timed out waiting for the response from {url.host}{_consequence(method)}",
                url=str(url),
            ) from exc
        except _BodyTooLarge as exc:
            raise ResponseValidationError(
                f"the response is larger than {option} ({exc.limit} bytes); "
                "it was not read to the end",
                status=exc.status,
                headers=exc.headers,
                request_id=exc.headers.get("x-request-id"),
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise AmbiguousOutcomeError(
                f"the connection to {url.host} failed after the request was sent "
                f"({type(exc).__name__}: {exc}){_consequence(method)}",
                url=str(url),
            ) from exc
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "atoma-images: %s %s -> %d (%d bytes, request id %s)",
                method,
                url,
                status,
                len(payload),
                answer.get("x-request-id"),
            )
        return parse(status, answer, payload, url)

    def _proxy(self, url: URL) -> tuple[URL | None, aiohttp.BasicAuth | None]:
        if not self._owns_session:
            return None, None
        origin = url.origin()
        found = self._proxies.get(origin)
        if found is None:
            found = self._proxies[origin] = _environment_proxy(url)
        return found

    def _session_for_running_loop(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError(f"{self!r} is closed; create a new client")
        loop = asyncio.get_running_loop()
        session = self._session
        if self._loop is not loop:
            if self._loop is not None:
                raise RuntimeError(
                    f"{self!r} is bound to the event loop it was first used in; an aiohttp "
                    "session cannot move between loops. Create one client per loop (or use "
                    "ImagesClient from synchronous code)."
                )
            self._loop = loop
        if session is None:
            connector = aiohttp.TCPConnector(limit=self._max_connections, limit_per_host=0)
            _read_timer.install(connector)  # the same read timeout, fewer timers
            session = self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self._first_attempt_timeout,
                # Not trust_env=True: aiohttp would then read ~/.netrc and the proxy variables
                # in a worker thread on every request (half our CPU per call), and a .netrc
                # entry for the API host would clash with our Authorization header. The
                # proxy variables are honoured all the same, read once per origin (_proxy).
                trust_env=False,
            )
        elif not self._owns_session and session.closed:
            raise RuntimeError("the aiohttp.ClientSession given to the client is closed")
        return session

    async def aclose(self) -> None:
        """Close the client's own session (a session passed in is left open). Safe to repeat."""
        self._closed = True
        session, self._session = self._session, None
        if session is not None and self._owns_session and not session.closed:
            await session.close()

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
        # Only warn: closing needs the event loop, which may be gone by now.
        session = getattr(self, "_session", None)
        if session is not None and self._owns_session and not session.closed:
            warnings.warn(
                f"unclosed {self!r}: use 'async with' or 'await client.aclose()'",
                ResourceWarning,
                stacklevel=1,
                source=self,
            )


class _BodyTooLarge(Exception):
    def __init__(self, limit: int, status: int, headers: Mapping[str, str]) -> None:
        self.limit = limit
        self.status = status
        self.headers = headers


async def _read_body(response: aiohttp.ClientResponse, limit: int) -> bytes:
    length = response.content_length
    if length is not None and length > limit:
        if response.status >= 300:  # an error body is only for the message: keep its start
            return await response.content.read(limit)
        raise _BodyTooLarge(limit, response.status, response.headers)
    # No length (chunked), compressed, or too long: count what arrives.
    chunks = []
    size = 0
    async for chunk in response.content.iter_any():
        size += len(chunk)
        if size > limit:
            if response.status >= 300:
                chunks.append(chunk[: len(chunk) - (size - limit)])
                break
            raise _BodyTooLarge(limit, response.status, response.headers)
        chunks.append(chunk)
    return b"".join(chunks)


def _environment_proxy(url: URL) -> tuple[URL | None, aiohttp.BasicAuth | None]:
    """The proxy that HTTP_PROXY / HTTPS_PROXY / NO_PROXY name for ``url``, if any."""
    import urllib.request  # noqa: PLC0415 - only when a client first talks to an origin

    proxies = urllib.request.getproxies_environment()
    address = proxies.get(url.scheme)
    bypass = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]
    if not address or (url.host and bypass(url.host, proxies)):
        return None, None
    proxy = URL(address)
    if proxy.user is None:
        return proxy, None
    auth = aiohttp.BasicAuth(proxy.user, proxy.password or "")
    return proxy.with_user(None), auth


def _policy(retries: RetryPolicy | None, default: RetryPolicy) -> RetryPolicy:
    if retries is None:
        return default
    if not isinstance(retries, RetryPolicy):
        raise InvalidRequestError("retries", retries, "allowed: a RetryPolicy or None")
    return retries


def _downloaded(status: int, headers: Mapping[str, str], body: bytes, url: URL) -> bytes:
    if status >= 300:
        raise error_from_response(status, headers, body, str(url))
    return body


def _download_url(raw: str | None) -> URL:
    url = None
    if isinstance(raw, str):
        try:
            url = URL(raw)
        except (TypeError, ValueError):
            url = None
    if url is None or url.scheme not in ("http", "https") or not url.host:
        hint = ""
        if isinstance(raw, str) and "://" not in raw:
            hint = (
                " This looks like a file name on the server's node, which it cannot serve:"
                " ask for response_format='b64_json' to get the image itself"
            )
        raise InvalidRequestError("image.url", raw, f"allowed: an http(s) URL.{hint}")
    return url


def _api_key(api_key: str | None) -> str:
    if api_key is None:
        for variable in KEY_VARIABLES:
            api_key = os.environ.get(variable) or None
            if api_key is not None:
                break
        else:
            raise InvalidRequestError(
                "api_key",
                None,
                f"pass api_key=... or set {KEY_VARIABLES[0]} (or {KEY_VARIABLES[1]}, the "
                "Atoma SDK's variable)",
            )
    # The key is never echoed back, not even in this error.
    if type(api_key) is not str:
        raise InvalidRequestError("api_key", type(api_key).__name__, "allowed: a string")
    if not api_key or not api_key.isascii() or not api_key.isprintable() or " " in api_key:
        raise InvalidRequestError(
            "api_key", "<hidden>", "allowed: a non-empty string of printable ASCII, no spaces"
        )
    return api_key


def _base_url(base_url: str | None) -> URL:
    raw = base_url or os.environ.get("ATOMA_BASE_URL") or DEFAULT_BASE_URL
    try:
        url = URL(raw)
    except (TypeError, ValueError):
        url = None
    if url is None or url.scheme not in ("http", "https") or not url.host:
        raise InvalidRequestError(
            "base_url", raw, "allowed: an http:// or https:// URL such as " + DEFAULT_BASE_URL
        )
    if url.query_string or url.fragment:
        raise InvalidRequestError("base_url", raw, "allowed: a URL without query or fragment")
    # "…/v1" and "…/v1/" both mean the same root.
    return url.with_path(url.path.rstrip("/"))
