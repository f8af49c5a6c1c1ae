"""The one place that meets the network: send one request, get its answer or our error.

A client has one `Transport`, as httpx's ``AsyncHTTPTransport`` owns its pool: the
loop-bound aiohttp session and its life (UNOPENED, OPENED, CLOSED), the headers of each
origin, the TLS setting, the proxies read from the environment, the size caps and the map
from aiohttp's errors to ours. Its `Transport.post` and `Transport.get` are the only code
that calls aiohttp's request API and knows its exceptions. Every failure is sorted by what it
proves about billing (docs/architecture.md, "Billing honesty"):

- before the request was written (could not connect, no free connection in time, an
  unusable proxy): `APIConnectionError` or `APITimeoutError`; the server never saw it;
- after (a read timeout, a reset, a body cut short): `AmbiguousOutcomeError` or
  `AmbiguousTimeoutError`; the server may have processed it.

Redirects are never followed here: a paid POST goes where it was sent, and downloads follow
them one hop at a time, choosing the headers for each origin. The cause of our error is kept
for diagnosis, with the request's headers (the key) taken out of it.

This is also the one place where a server's answer becomes our values, so it is where the key
is taken out of it (`Secrets`): a server or gateway that echoes the key (in its message, a
header, a redirect's ``Location``) has it replaced by ``[redacted]`` before anything reads it,
so no error, response, hook, span or command-line line downstream can show it.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import enum
import html
import json
import logging
import ssl as ssl_module
import urllib.parse
import urllib.request
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import aiohttp
import attrs
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from ._checks import http_url
from ._errors import (
    AmbiguousOutcomeError,
    AmbiguousTimeoutError,
    APIConnectionError,
    APITimeoutError,
    AtomaImagesError,
    ClientClosedError,
    InvalidRequestError,
    ResponseValidationError,
)
from ._version import user_agent

if TYPE_CHECKING:
    from ._settings import ClientSettings

__all__ = [
    "MAX_ERROR_BODY",
    "Answer",
    "Proxy",
    "RequestProgress",
    "Secrets",
    "State",
    "Transport",
    "answer_status",
    "environment_proxy",
    "progress_trace",
]

logger = logging.getLogger("atoma_images")

#: An error body is read for its message; more than this of it is not read.
MAX_ERROR_BODY = 2**20

_NOT_SENT = "; the request was not sent, so nothing was billed"
_MAYBE_BILLED = (
    "; the request was sent, so it may have been processed and billed. By default such a "
    "request is not sent again, to avoid paying twice (RetryPolicy(retry_ambiguous=True))"
)
_DOWNLOAD_ONLY = "; a GET (a download, the models list, a health check) bills nothing"
_SECRET_HEADERS = frozenset({"authorization", "proxy-authorization"})


#: The status of the last answer a `Transport` read in this task, for the hooks of the attempt
#: that read it: what a successful attempt returns (an images response, a download's bytes) does
#: not carry its status. An attempt is awaited in its call's own task, so the retry loop reads
#: the value the attempt's last answer set (`_hooks.CallRecord.attempt_finished`).
answer_status: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "atoma_images_answer_status", default=None
)

#: What stands for the key wherever a server echoed it.
REDACTED = "[redacted]"
#: The shortest key looked for in image data; Atoma's keys are far longer.
MIN_KEY_IN_DATA = 16
# The shortest start of the key taken out of the end of a body cut at its size cap.
_MIN_KEY_PART = 4


@attrs.frozen
class Secrets:
    """The forms in which a server could echo the key back, to be taken out of its answers.

    The key itself (which covers ``Bearer <key>``), and as it reads inside a JSON string or
    percent-encoded in a URL, when those differ.
    """

    forms: tuple[str, ...] = attrs.field(repr=False)

    @classmethod
    def of(cls, key: str) -> Secrets:
        if not key:
            return cls(())
        in_json = json.dumps(key)[1:-1]
        forms = (key, in_json, in_json.replace("/", "\\/"), urllib.parse.quote(key, safe=""))
        return cls(tuple(dict.fromkeys(forms)))  # each form once, in order

    def text(self, text: str) -> str:
        """``text`` with every form of the key replaced by `REDACTED`."""
        for form in self.forms:
            if form in text:
                text = text.replace(form, REDACTED)
        return text

    def body(self, body: bytes, status: int) -> bytes:
        """``body`` with every form of the key replaced by `REDACTED`.

        A success's body is image data (base64, or a download's bytes): a key too short to
        be a real one (under `MIN_KEY_IN_DATA` characters) would match it by chance and
        corrupt the image, so there it is not looked for.
        """
        success = 200 <= status < 300
        for form in self.forms:
            if success and len(form) < MIN_KEY_IN_DATA:
                continue
            if form.encode() in body:
                body = body.replace(form.encode(), REDACTED.encode())
            # A body cut at its size cap may end with the start of the key.
            for length in range(min(len(form), len(body)) - 1, _MIN_KEY_PART - 1, -1):
                if body.endswith(form[:length].encode()):
                    body = body[:-length] + REDACTED.encode()
                    break
        if len(body) <= MAX_ERROR_BODY and (b"\\u" in body or b"&" in body):
            body = self._unescaped(body)
        return body

    def _unescaped(self, body: bytes) -> bytes:
        """``body`` as reading it will spell it, when that spells the key: JSON's ``\\u``
        escapes and HTML's character references are undone before a parser or an error's
        message could undo them, and the key is then taken out. Small bodies only (an error
        page, a models list); an answer of images is far larger, and its data is base64."""
        text = body.decode("utf-8", "replace")
        try:  # the same characters, spelled plainly (json.loads undoes every escape)
            plain = json.dumps(json.loads(text), ensure_ascii=False)
        except (ValueError, RecursionError):
            plain = html.unescape(text)
        redacted = self.text(plain)
        return body if redacted == plain else redacted.encode()

    def headers(self, headers: Mapping[str, str]) -> Mapping[str, str]:
        """``headers`` (names and values) with every form of the key replaced by `REDACTED`."""
        if all(self.text(k) == k and self.text(v) == v for k, v in headers.items()):
            return headers
        return CIMultiDictProxy(
            CIMultiDict((self.text(k), self.text(v)) for k, v in headers.items())
        )


@attrs.frozen
class Answer:
    """What the server answered: status, headers and the body (capped)."""

    status: int
    headers: Mapping[str, str]
    body: bytes


@attrs.define
class RequestProgress:
    """How far one request got: whether it may have reached the server.

    On a session the client made itself, ``may_have_been_sent`` turns True when the request's
    headers are handed to the connection (`progress_trace`). Until then no byte of the
    request can have reached the server, whatever ended it first: a limit (a loop that stalls
    can make the attempt's overall limit fire while it still waits for a connection) or a
    cancellation. A session passed in has no such trace: `Transport.post` sets it from the start.
    """

    may_have_been_sent: bool = False


async def _headers_sent(
    _: aiohttp.ClientSession, context: Any, __: aiohttp.TraceRequestHeadersSentParams
) -> None:
    if isinstance(context.trace_request_ctx, RequestProgress):
        context.trace_request_ctx.may_have_been_sent = True


def progress_trace() -> aiohttp.TraceConfig:
    """The request trace of a session made by the client, which feeds each `RequestProgress`."""
    config = aiohttp.TraceConfig()
    config.on_request_headers_sent.append(_headers_sent)
    return config


@attrs.frozen
class Proxy:
    """An HTTP proxy to send through, and the headers that carry its credentials."""

    url: URL
    headers: Mapping[str, str] | None = attrs.field(default=None, repr=False)


class State(enum.Enum):
    """Where a transport is in its life; CLOSED is final."""

    UNOPENED = 1
    OPENED = 2
    CLOSED = 3


@attrs.define
class Transport:
    """One client's way to the network: its session, headers, TLS setting, proxies and caps.

    `post` and `get` are the only code that calls aiohttp's request API and maps its errors
    (module docstring). The session belongs to the event loop it was made in, so it is made
    lazily, in the loop of the first call, and refuses any other; its state is explicit, as
    httpx keeps its own: UNOPENED until the first call, OPENED, then CLOSED, which is final.
    A session passed in by the caller is used as is and never closed here.

    Attributes:
        owner: what to name in errors and warnings (the client's repr).
        headers: the headers of a request to the API's origin (the key among them).
        ssl: the client's TLS setting.
        max_bytes: the largest success body read (``max_response_bytes``).
        max_connections: the size of the pool of a session made here.
        api_url: the generations URL, whose proxy is read once, when the client is made
            (so that a bad proxy variable is an error then).
        anonymous_headers: for any other origin: nothing of the user's but what is safe to
            show anyone.
        owns_session: whether the session is the client's own: it then carries
            `progress_trace`, and the proxy variables are honoured (a session passed in
            keeps its own proxy settings).
        secrets: the key (the token of ``headers``' ``Authorization``), taken out of every
            answer, whichever origin sent it.
    """

    owner: str
    headers: Mapping[str, str] = attrs.field(repr=False)
    ssl: ssl_module.SSLContext | bool
    max_bytes: int
    max_connections: int
    api_url: URL
    _session: aiohttp.ClientSession | None = attrs.field(default=None, alias="session", repr=False)
    anonymous_headers: Mapping[str, str] = attrs.field(init=False, repr=False)
    owns_session: bool = attrs.field(init=False)
    api_proxy: Proxy | None = attrs.field(init=False, repr=False)
    secrets: Secrets = attrs.field(init=False, repr=False)
    _loop: asyncio.AbstractEventLoop | None = attrs.field(init=False, default=None, repr=False)
    state: State = attrs.field(init=False, default=State.UNOPENED)

    def __attrs_post_init__(self) -> None:
        self.owns_session = self._session is None
        self.anonymous_headers = CIMultiDict({"Accept": "*/*", "User-Agent": user_agent()})
        self.api_proxy = environment_proxy(self.api_url) if self.owns_session else None
        self.secrets = Secrets.of(self.headers.get("Authorization", "").removeprefix("Bearer "))

    @classmethod
    def of(
        cls, settings: ClientSettings, owner: str, session: aiohttp.ClientSession | None
    ) -> Transport:
        """The transport of a client with ``settings``, on ``session`` or a session of its own."""
        headers = CIMultiDict(
            {
                "Authorization": f"Bearer {settings.api_key}",
                "Content-Type": "application/json",
                "Accept": "application/json",
                "User-Agent": user_agent(),
            }
        )
        headers.update(settings.headers)
        return cls(
            owner,
            headers,
            settings.ssl,
            settings.max_response_bytes,
            settings.max_connections,
            settings.generations_url,
            session=session,
        )

    @property
    def pool_size(self) -> int | None:
        """How many requests the pool sends to one host at once; None when it sets no limit.

        A session made here: ``max_connections``. One passed in: its connector's limits.
        """
        if self.owns_session:
            return self.max_connections
        connector = None if self._session is None else self._session.connector
        if connector is None:
            return None
        return min((n for n in (connector.limit, connector.limit_per_host) if n), default=None)

    def open(self) -> aiohttp.ClientSession:
        """The session for the running loop, made on first use.

        Raises:
            ClientClosedError: the transport, or the session passed in, is closed.
            RuntimeError: the transport was first used in another event loop.
        """
        if self.state is State.CLOSED:
            raise ClientClosedError(f"{self.owner} is closed; create a new client")
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._loop is not None:
                raise RuntimeError(
                    f"{self.owner} is bound to the event loop it was first used in; an aiohttp "
                    "session cannot move between loops. Create one client per loop (or use "
                    "ImagesClient from synchronous code)."
                )
            self._loop = loop
        session = self._session
        if session is None:
            session = self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.max_connections, limit_per_host=0),
                # Not trust_env=True: aiohttp would then read ~/.netrc and the proxy variables
                # in a worker thread on every request, and a .netrc entry for the API host
                # would clash with our Authorization header. The proxy variables are honoured
                # all the same (environment_proxy).
                trust_env=False,
                # Tells `_send` whether a failed request had been sent (billing honesty).
                trace_configs=[progress_trace()],
            )
        elif session.closed:
            raise ClientClosedError("the aiohttp.ClientSession given to the client is closed")
        self.state = State.OPENED
        return session

    async def aclose(self) -> None:
        """Close a session made here (one passed in is left open). Safe to repeat."""
        self.state = State.CLOSED
        session, self._session = self._session, None
        if session is not None and self.owns_session and not session.closed:
            await session.close()
            # Its connections' sockets close a loop step later: let that step run, so that a
            # loop ended right after (asyncio.run, a test's loop) leaves no socket open.
            await asyncio.sleep(0)

    def warn_if_open(self) -> None:
        """For a finaliser: warn (never close: that needs the loop, which may be gone)."""
        session = self._session
        if session is not None and self.owns_session and not session.closed:
            warnings.warn(
                f"unclosed {self.owner}: use 'async with' or 'await client.aclose()'",
                ResourceWarning,
                stacklevel=2,
                source=self,
            )

    async def post(
        self,
        url: URL,
        body: bytes,
        timeout: aiohttp.ClientTimeout,
        *,
        max_bytes: int | None = None,
        progress: RequestProgress | None = None,
    ) -> Answer:
        """POST ``body`` (JSON) to ``url`` with the API's headers; its answer or our error.

        ``max_bytes`` replaces ``max_response_bytes`` as the cap of a success body;
        ``progress`` records how far the request got (a paid one's, for its accounting).
        """
        return await self._send("POST", url, body, timeout, self.headers, max_bytes, progress)

    async def get(
        self,
        url: URL,
        timeout: aiohttp.ClientTimeout,
        *,
        headers: Mapping[str, str] | None = None,
        max_bytes: int | None = None,
    ) -> Answer:
        """GET ``url``; its answer or our error. ``headers`` replace the API's own (a download
        to another origin gets `anonymous_headers`; ``/health`` goes without the key)."""
        headers = self.headers if headers is None else headers
        return await self._send("GET", url, None, timeout, headers, max_bytes, None)

    async def _send(  # noqa: PLR0917 - one request's parts, in order
        self,
        method: str,
        url: URL,
        body: bytes | None,
        timeout: aiohttp.ClientTimeout,
        headers: Mapping[str, str],
        max_bytes: int | None,
        progress: RequestProgress | None,
    ) -> Answer:
        """Send one request and read its answer; raise our error for anything else.

        A success body larger than ``max_bytes`` is a `ResponseValidationError` (after reading
        no more than that); an error body is cut at `MAX_ERROR_BODY`, since it is read only
        for its message. On the client's own session `progress_trace` tells whether a failure
        came before the request was sent; on a session passed in, any failure once begun is
        taken to mean it may have been sent. ``progress``, when given, keeps that knowledge
        for the caller, for an end that is no error of ours (a cancellation). Every form of
        the key is taken out of the answer, and out of the error and its cause.
        """
        current = self._session
        if self.state is State.CLOSED or (current is not None and current.closed):
            # aiohttp's bare RuntimeError, before anything is sent
            raise ClientClosedError(
                f"the client (or the aiohttp session given it) was closed before this request "
                f"to {url.host}:{url.port} was sent{_NOT_SENT}",
                url=str(url),
            )
        session = self.open()
        traced = self.owns_session
        proxy: Proxy | None = None
        if traced:  # a session passed in keeps its own proxy settings
            proxy = self.api_proxy if url == self.api_url else environment_proxy(url)
        progress = RequestProgress() if progress is None else progress
        progress.may_have_been_sent = not traced  # untraced: it may have been, once begun
        if proxy is not None and proxy.headers and url.scheme == "http":
            # aiohttp sends proxy_headers only with the CONNECT of an https request; a
            # plain-HTTP request goes to the proxy as it is, so its credentials travel with it.
            headers = {**headers, **proxy.headers}
        secrets = self.secrets
        cap = self.max_bytes if max_bytes is None else max_bytes
        try:
            async with session.request(
                method,
                url,
                data=body,
                headers=headers,
                timeout=timeout,
                ssl=self.ssl,
                proxy=None if proxy is None else proxy.url,
                proxy_headers=None if proxy is None else proxy.headers,
                allow_redirects=False,
                # A session passed in may raise on error statuses; we read statuses ourselves.
                raise_for_status=False,
                trace_request_ctx=progress if traced else None,
                # A session passed in may carry client middlewares, and one that retries, or
                # answers a 401 by sending again, would send a paid request twice behind our
                # back: none run for our requests.
                middlewares=(),
            ) as response:
                status = response.status
                limit = cap if status < 300 else MAX_ERROR_BODY
                answer_status.set(status)
                read = await _read_body(response, limit, secrets)
                headers = secrets.headers(response.headers)
                answer = Answer(status, headers, secrets.body(read, status))
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            _redact_chain(exc, secrets)
            unsent = not progress.may_have_been_sent
            error = _error_for(exc, method, url, unsent, secrets)
            cause = _without_secrets(exc, secrets)
        else:
            if logger.isEnabledFor(logging.DEBUG):  # never the body, never the headers
                logger.debug(
                    "atoma-images: %s %s -> %d (%d bytes, request id %s)",
                    method,
                    url,
                    status,
                    len(answer.body),
                    answer.headers.get("x-request-id"),
                )
            return answer
        # Raised outside the handler, so that the original (which holds the key in its request
        # headers) is not kept as __context__ either.
        raise error from cause


async def _read_body(response: aiohttp.ClientResponse, limit: int, secrets: Secrets) -> bytes:
    length = response.content_length
    if length is not None and length > limit and response.status < 300:
        raise _too_large(response, limit, secrets)
    if length is not None and length <= limit and "Content-Encoding" not in response.headers:
        return await response.read()  # exactly Content-Length bytes: the usual case
    # No length (chunked), compressed (it may grow), or an error body to cut: count as it comes.
    chunks = []
    size = 0
    async for chunk in response.content.iter_any():
        size += len(chunk)
        if size > limit:
            if response.status < 300:
                raise _too_large(response, limit, secrets)
            chunks.append(chunk[: len(chunk) - (size - limit)])  # keep an error body's start
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(
    response: aiohttp.ClientResponse, limit: int, secrets: Secrets
) -> ResponseValidationError:
    headers = secrets.headers(response.headers)
    return ResponseValidationError(
        f"the response is larger than the limit ({limit} bytes: max_response_bytes for a "
        "generation, max_bytes for a download); it was not read to the end",
        status=response.status,
        headers=headers,
        request_id=headers.get("x-request-id"),
    )


def _error_for(
    exc: BaseException, method: str, url: URL, unsent: bool, secrets: Secrets
) -> AtomaImagesError:
    """Our error for aiohttp's ``exc``; what it quotes of the server's bytes is without the key."""
    where = f"{url.host}:{url.port}"
    said = secrets.text(f"{type(exc).__name__}: {exc}")
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return APIConnectionError(
            f"the TLS certificate of {url.host} failed verification ({exc.certificate_error})"
            f"{_NOT_SENT}. Pass ssl=<an ssl.SSLContext that trusts it> if the server is yours",
            url=str(url),
            transient=False,
        )
    if isinstance(exc, aiohttp.ClientConnectorError):
        return APIConnectionError(
            f"could not connect to {where} ({exc.os_error}){_NOT_SENT}", url=str(url)
        )
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return APITimeoutError(
            f"timed out waiting for a connection to {where}{_NOT_SENT}", url=str(url)
        )
    if isinstance(exc, aiohttp.ClientHttpProxyError):  # the proxy refused the tunnel
        return APIConnectionError(
            f"the proxy refused to connect to {where} ({exc.status} {secrets.text(exc.message)})"
            f"{_NOT_SENT}",
            url=str(url),
            transient=exc.status >= 500,
        )
    if isinstance(exc, aiohttp.InvalidURL):
        return APIConnectionError(
            f"aiohttp cannot request {exc.url!s:.200}{_NOT_SENT}", url=str(url), transient=False
        )
    if unsent and isinstance(exc, asyncio.TimeoutError):  # the overall limit, before sending
        return APITimeoutError(
            f"timed out before the request to {where} was sent (waiting for a connection)"
            f"{_NOT_SENT}",
            url=str(url),
        )
    if unsent:
        return APIConnectionError(
            f"the connection to {where} failed before the request was sent ({said}){_NOT_SENT}",
            url=str(url),
        )
    consequence = _MAYBE_BILLED if method == "POST" else _DOWNLOAD_ONLY
    if isinstance(exc, asyncio.TimeoutError):  # aiohttp's read and total limits
        return AmbiguousTimeoutError(
            f"timed out waiting for the response from {url.host}{consequence}", url=str(url)
        )
    return AmbiguousOutcomeError(
        f"the connection to {url.host} failed after the request was sent ({said}){consequence}",
        url=str(url),
    )


def _redact_chain(exc: BaseException, secrets: Secrets) -> None:
    """Take the key out of the texts of ``exc`` and of every error chained to it, in place.

    aiohttp's parser errors quote the bytes they could not read, and Python 3.10 can chain
    such an error to ours as ``__context__`` wherever ours is raised again (its coroutines
    keep the exception being handled): so the originals themselves must not hold the key.
    """
    todo: list[BaseException | None] = [exc]
    seen: set[int] = set()
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        current.args = tuple(
            secrets.text(arg) if isinstance(arg, str) else arg for arg in current.args
        )
        for name, value in list(getattr(current, "__dict__", {}).items()):
            if isinstance(value, str) and secrets.text(value) != value:
                setattr(current, name, secrets.text(value))
        todo += [current.__cause__, current.__context__]


def _without_secrets(exc: BaseException, secrets: Secrets) -> BaseException:
    """``exc`` for use as a cause, without the secrets aiohttp keeps in its errors.

    A response error keeps the request's headers (the key): it is rebuilt without them. A
    connector error keeps the connection key, which holds the proxy's credentials when a
    session passed in reads them from the environment: the OS error underneath it
    (``os_error``, which our message names too) stands in for it. An error that quotes a
    server's bytes holding the key (a malformed header echoing it) gives way to a plain
    `RuntimeError` with its words, without the key.
    """
    safe = _without_request_headers(exc)
    if not any(secrets.text(text) != text for text in _texts_of(safe)):
        return safe
    return RuntimeError(secrets.text(f"{type(exc).__name__}: {exc}"))


def _without_request_headers(exc: BaseException) -> BaseException:
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return exc.certificate_error
    if isinstance(exc, aiohttp.ClientConnectorError):
        return exc.os_error
    if not isinstance(exc, aiohttp.ClientResponseError):
        return exc
    info = exc.request_info
    kept = CIMultiDict((k, v) for k, v in info.headers.items() if k.lower() not in _SECRET_HEADERS)
    safe = type(exc)(
        aiohttp.RequestInfo(info.url, info.method, CIMultiDictProxy(kept), info.real_url),
        (),
        status=exc.status,
        message=exc.message,
        headers=exc.headers,
    )
    safe.__cause__ = exc.__cause__  # what went wrong underneath, which holds no secret
    return safe


def _texts_of(exc: BaseException) -> list[str]:
    """What an error and those chained to it can show: str, args and attributes."""
    texts: list[str] = []
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        texts += [str(current), repr(current.args), repr(getattr(current, "__dict__", {}))]
        todo += [current.__cause__, current.__context__]
    return texts


def environment_proxy(url: URL) -> Proxy | None:
    """The proxy that HTTP_PROXY / HTTPS_PROXY / NO_PROXY name for ``url``, if any.

    A proxy without a scheme (``127.0.0.1:3128``) means http://, as curl, requests and httpx
    read it. Anything else that is not an http(s) URL is an `InvalidRequestError`. NO_PROXY
    is read as urllib and requests read it: ``*``, a host, a domain (``.example.com`` or
    ``example.com``, its subdomains too), an IP address, each with or without a port (an
    entry with a port matches a URL that names that port).
    """
    proxies = urllib.request.getproxies_environment()
    address = proxies.get(url.scheme)
    if not address or not url.host:
        return None
    # urllib matches an entry with a port against "host:port", so the port goes with the host
    # when the URL names one (as urllib and requests pass it); the host alone would never match.
    host = url.host if url.explicit_port is None else f"{url.host}:{url.explicit_port}"
    bypass = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]
    if bypass(host, proxies):
        return None
    variable = f"{url.scheme.upper()}_PROXY"
    proxy = http_url(address if "://" in address else f"http://{address}")
    if proxy is None:
        shown = address.rpartition("@")[2]  # never echo a proxy password
        raise InvalidRequestError(
            variable, shown, "allowed: an http proxy URL such as http://proxy.example:3128"
        )
    if proxy.user is None:
        return Proxy(proxy)
    # RFC 7617 Basic credentials, as a header: aiohttp's BasicAuth is deprecated from 3.14.
    credentials = base64.b64encode(f"{proxy.user}:{proxy.password or ''}".encode()).decode()
    return Proxy(proxy.with_user(None), {"Proxy-Authorization": f"Basic {credentials}"})
