"""Every error atoma-images raises, in one tree.

```
AtomaImagesError                      base class; catch this to catch everything below
├── InvalidRequestError               bad input, raised before anything is sent (also a ValueError)
├── ExtraNotInstalledError            a feature needs an optional extra (also an ImportError)
├── BudgetExceededError               a call would spend more than its Budget has left; nothing sent
├── BudgetUnavailableError            a budget or a rate limit could not be checked; nothing sent
│   └── RateLimitUnavailableError     the rate limit could not be checked
├── APIConnectionError                no usable answer from the server
│   ├── APITimeoutError               a time limit was reached
│   │   └── AmbiguousTimeoutError     ...after the request was sent (also an AmbiguousOutcomeError)
│   ├── AmbiguousOutcomeError         sent, outcome unknown: it may have been processed and billed
│   └── ClientClosedError             the client was closed before sending; nothing billed
├── APIStatusError                    the server answered with an error status
│   ├── BadRequestError               400
│   ├── AuthenticationError           401
│   ├── InsufficientBalanceError      402, and 400 with code FIAT_PAYMENTS_ONLY
│   ├── PermissionDeniedError         403
│   ├── NotFoundError                 404
│   ├── RequestTooLargeError          413
│   ├── UnprocessableEntityError      422
│   ├── LockedError                   423
│   ├── StackUnavailableError         425
│   ├── RateLimitError                429
│   └── ServerError                   5xx
│       ├── InternalServerError       500
│       ├── BadGatewayError           502
│       ├── ServiceUnavailableError   503
│       └── GatewayTimeoutError       504
└── ResponseValidationError           a success status with a body that is not an images response
    ├── NoImageError                  a success that holds no image (a file name, not a URL)
    └── ResponseIntegrityError        a confidential answer failed decryption or its hash check
```

aiohttp, cattrs and tenacity exceptions never reach the caller: the original is kept as
``__cause__``. Every error raised by a call carries ``attempts``, the number of attempts made
(one generation request each; a confidential attempt locks a node first), and
``may_have_been_billed``, which is true only when a request reached the server and its
outcome is unknown (a connection that failed after sending, a gateway's error page: any 5xx
but 503 without the API's error envelope) or was a success the client could not read. A
call for several images that Atoma draws one request at a time (see `AsyncImagesClient`)
raises the error of a failed request with ``partial`` set to the images the others brought
back.
"""

from __future__ import annotations

import datetime
import reprlib
from collections.abc import Mapping
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._models import ImagesResponse

__all__ = [
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "AmbiguousOutcomeError",
    "AmbiguousTimeoutError",
    "AtomaImagesError",
    "AuthenticationError",
    "BadGatewayError",
    "BadRequestError",
    "BudgetExceededError",
    "BudgetUnavailableError",
    "ClientClosedError",
    "ExtraNotInstalledError",
    "GatewayTimeoutError",
    "InsufficientBalanceError",
    "InternalServerError",
    "InvalidRequestError",
    "LockedError",
    "NoImageError",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "RateLimitUnavailableError",
    "RequestTooLargeError",
    "ResponseIntegrityError",
    "ResponseValidationError",
    "ServerError",
    "ServiceUnavailableError",
    "StackUnavailableError",
    "UnprocessableEntityError",
]

# str(error) stays readable in a log line however long the server's message is.
_MAX_MESSAGE = 300


def _shown(value: Any) -> str:
    """``repr(value)``, short; a value nested too deeply for repr is shown shallowly."""
    try:
        return _shorten(repr(value), 80)
    except RecursionError:
        return _shorten(reprlib.repr(value), 80)


def _shorten(text: str, limit: int = _MAX_MESSAGE) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


class AtomaImagesError(Exception):
    """Base class of every error raised by atoma-images."""

    #: How many attempts the call made (one generation request each; a confidential
    #: attempt sends a node lock request first).
    attempts: int = 0
    #: True when a request reached the server and may have been processed (and billed).
    may_have_been_billed: bool = False
    #: A call for several images sent as several requests (Atoma draws one image per
    #: request): the images that did come back when one of them failed, else None. They
    #: were billed, so they are never dropped.
    partial: ImagesResponse | None = None


class InvalidRequestError(AtomaImagesError, ValueError):
    """An argument is not valid; nothing was sent.

    Attributes:
        field: the parameter that was wrong (``"prompt"``, ``"n"``, ...).
        value: what was passed.
        allowed: what would have been accepted.
    """

    def __init__(self, field: str, value: Any, allowed: str) -> None:
        self.field = field
        self.value = value
        self.allowed = allowed
        super().__init__(f"invalid {field}: got {_shown(value)}; {allowed}")


class ExtraNotInstalledError(AtomaImagesError, ImportError):
    """A feature needs an optional extra that is not installed; nothing was sent.

    Attributes:
        extra: the extra to install (``pip install 'atoma-images[<extra>]'``).
    """

    def __init__(self, feature: str, extra: str, missing: str) -> None:
        self.extra = extra
        super().__init__(
            f"{feature} needs the optional package {missing!r}, which is not installed: "
            f"pip install 'atoma-images[{extra}]'",
            name=missing,
        )


class BudgetExceededError(AtomaImagesError):
    """The call would cost more compute units than its `Budget` has left; nothing was sent.

    (With ``RetryPolicy(retry_ambiguous=True)``, a retry of an attempt that may have been
    billed needs room for another attempt; without it, the retry is not sent, and the
    error says ``may_have_been_billed`` for the earlier attempt.)

    Attributes:
        asked: the compute units the call would cost (``n * W * H``).
        left: the compute units the budget had left.
        resets_at: when the budget's window turns and it is full again (UTC), for a budget
            with a window (``per=``); None for a budget without one.
    """

    def __init__(
        self,
        *,
        asked: int,
        left: int,
        retry: bool = False,
        resets_at: datetime.datetime | None = None,
    ) -> None:
        self.asked = asked
        self.left = left
        self.resets_at = resets_at
        unsent = (
            "the retry was not sent (an earlier attempt may have been billed)"
            if retry
            else "nothing was sent"
        )
        resets = "" if resets_at is None else f"; it resets at {resets_at:%Y-%m-%dT%H:%M:%SZ}"
        super().__init__(
            f"budget exceeded: the call would cost {asked:,} compute units (n x width x "
            f"height) and the budget has {left:,} left{resets}; {unsent}"
        )


class BudgetUnavailableError(AtomaImagesError):
    """A budget or a rate limit could not be checked, so the request was not sent.

    A budget kept in a store of its own (`atoma_images.redis.RedisBudget`, or any
    `BudgetLike`) that cannot be reached cannot say whether the call fits, and a budget that
    cannot be checked is not a budget: the call is refused. The original error is kept as
    ``__cause__``. A reservation whose answer was lost (the store timed out after it was
    asked) stays counted as spent there: the budget errs on the side of spending less.

    Attributes:
        message: what could not be reached, and why.
    """

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(f"{message}; nothing was sent")


class RateLimitUnavailableError(BudgetUnavailableError):
    """A rate limit (`atoma_images.redis.RedisRateLimit`, or a `RateLimiter` of the user's
    own) could not be asked for a permit, so the request was not sent.

    A `BudgetUnavailableError`, so that one ``except`` catches either store being down.
    """


class APIConnectionError(AtomaImagesError):
    """The call ended without a usable answer from the server (refused, reset, TLS, timeout).

    Unless it is an `AmbiguousOutcomeError`, the request never reached the server, so it
    cannot have been billed.

    Attributes:
        message: what went wrong.
        url: the URL that was requested.
        transient: whether trying again may help (False for a certificate that failed
            verification, for example).
    """

    def __init__(self, message: str, *, url: str | None = None, transient: bool = True) -> None:
        self.message = message
        self.url = url
        self.transient = transient
        super().__init__(message)


class APITimeoutError(APIConnectionError):
    """A time limit was reached (connecting, waiting for a free connection, or reading)."""


class AmbiguousOutcomeError(APIConnectionError):
    """The request was sent but no complete answer came back.

    The server may have processed the request and billed it. It is not retried unless the
    retry policy says ``retry_ambiguous=True``, so a user is never charged twice by accident.
    """

    may_have_been_billed: bool = True


class AmbiguousTimeoutError(AmbiguousOutcomeError, APITimeoutError):
    """The read timed out after the request was sent: the outcome is unknown."""


class ClientClosedError(APIConnectionError, RuntimeError):
    """The client (or the aiohttp session given it) was closed before the request was sent.

    Nothing was sent, so nothing was billed, and it is not retried: a call waiting to retry
    when ``aclose()`` ran ends with it. Also a `RuntimeError`, which is what it was before.
    """

    def __init__(self, message: str, *, url: str | None = None) -> None:
        super().__init__(message, url=url, transient=False)


def status_may_have_been_billed(status: int, envelope: bool) -> bool:
    """Whether an answer with the error ``status`` may hide work the service billed.

    Only the API's own error envelope (``envelope``: Atoma's ``{"error": {"code", "message"}}``,
    or OpenAI's) proves that the service itself refused the request, and Atoma settles a
    refusal at zero. A 5xx without it proves nothing: it is a gateway's page (a load
    balancer's 502 or 504, Cloudflare's 520 or 524, which says the origin is still working)
    or a crash in front of the service, which may have done and billed the work behind it.
    503 is the exception, as 429 and every 4xx are: they mean "not now", or "refused", before
    the service took the work.
    """
    return status >= 500 and status != 503 and not envelope


class APIStatusError(AtomaImagesError):
    """The server answered with an error status.

    Atoma settles a failed attempt at zero, so an error status in the API's own envelope
    means nothing was billed. Any 5xx but 503 without it comes from a gateway in front of the
    service (or a crash), which may have forwarded the request and given up while the
    service worked on and billed the success nobody read (`status_may_have_been_billed`):
    ``may_have_been_billed`` is then True, and it is not retried unless the policy says
    ``retry_ambiguous=True``.

    Attributes:
        status: the HTTP status code.
        code: the error code from the JSON envelope (``"REQUEST_ERROR"``), or None.
        envelope: whether the body was the API's own error envelope (an ``"error"`` object
            with a code; OpenAI's may be null); by default, whether ``code`` is given.
        message: the server's message, or a readable summary of a non-JSON body.
        body: the response body as text (decoded leniently).
        headers: the response headers.
        request_id: the ``x-request-id`` header, when the server sent one.
        url: the URL that was requested.
        retry_after: seconds the server asked to wait (``Retry-After``), or None.
    """

    def __init__(
        self,
        *,
        status: int,
        code: str | None,
        message: str,
        body: str,
        headers: Mapping[str, str],
        request_id: str | None = None,
        url: str | None = None,
        retry_after: float | None = None,
        envelope: bool | None = None,
    ) -> None:
        self.status = status
        self.code = code
        self.envelope = code is not None if envelope is None else envelope
        self.message = message
        self.body = body
        self.headers = headers
        self.request_id = request_id
        self.url = url
        self.retry_after = retry_after
        self.may_have_been_billed = status_may_have_been_billed(status, self.envelope)
        super().__init__(self._describe())

    def _describe(self) -> str:
        try:
            phrase = HTTPStatus(self.status).phrase
        except ValueError:
            phrase = "Unknown Status"
        text = f"{self.status} {phrase}"
        if self.code:
            text += f" ({_shorten(self.code, 60)})"
        text += f": {_shorten(self.message)}"
        if self.request_id:
            text += f" [request id {_shorten(self.request_id, 80)}]"
        return text


class BadRequestError(APIStatusError):
    """400: the server rejected the request (bad JSON, missing field, unknown model, ...)."""


class AuthenticationError(APIStatusError):
    """401: the API key is missing or not valid."""


class InsufficientBalanceError(APIStatusError):
    """402, or 400 with code ``FIAT_PAYMENTS_ONLY``: the account is out of credit."""


class PermissionDeniedError(APIStatusError):
    """403: the key may not use this resource."""


class NotFoundError(APIStatusError):
    """404: the route, or the node chosen for the model, was not found."""


class RequestTooLargeError(APIStatusError):
    """413: the request body is too large for the server or a gateway."""


class UnprocessableEntityError(APIStatusError):
    """422: the request was well-formed but not acceptable."""


class LockedError(APIStatusError):
    """423: the stack is locked; Atoma expects clients to retry."""


class StackUnavailableError(APIStatusError):
    """425: no usable stack or lock; Atoma expects clients to retry."""


class RateLimitError(APIStatusError):
    """429: too many requests; ``retry_after`` says how long to wait when the server said."""


class ServerError(APIStatusError):
    """5xx: the server or a gateway failed."""


class InternalServerError(ServerError):
    """500: the backend failed (Atoma also answers 500 for input the backend rejected)."""


class BadGatewayError(ServerError):
    """502: a gateway in front of the server failed."""


class ServiceUnavailableError(ServerError):
    """503: no node is available right now."""


class GatewayTimeoutError(ServerError):
    """504: a gateway gave up waiting for the server."""


class ResponseValidationError(AtomaImagesError):
    """The server answered with a success status, but the body is not an images response.

    The server processed the request, so it may have been billed.

    Attributes:
        message: what was wrong, with the path of the offending value (``data[0].url``).
        status: the HTTP status code.
        body_excerpt: the start of the body, for diagnosis.
        headers: the response headers.
        request_id: the ``x-request-id`` header, when the server sent one.
    """

    may_have_been_billed: bool = True

    def __init__(
        self,
        message: str,
        *,
        status: int = 200,
        body_excerpt: str = "",
        headers: Mapping[str, str] | None = None,
        request_id: str | None = None,
    ) -> None:
        self.message = message
        self.status = status
        self.body_excerpt = body_excerpt
        self.headers: Mapping[str, str] = headers or {}
        self.request_id = request_id
        text = f"invalid response ({status}): {_shorten(message)}"
        if body_excerpt:
            text += f"; body starts {_shorten(body_excerpt, 120)!r}"
        super().__init__(text)


class NoImageError(ResponseValidationError):
    """A success whose answer holds no image: neither base64 data nor an http(s) URL.

    Atoma's backend answers a request without ``response_format: "B64Json"`` with the name of
    a file on the node's disk (``image-generation-<uuid>.png``), which nothing serves. The
    server billed the request, so it is not retried (a retry would bill again).

    Attributes:
        response: the answer as the server sent it.
    """

    def __init__(self, message: str, *, response: ImagesResponse, **details: Any) -> None:
        self.response = response
        super().__init__(message, **details)


class ResponseIntegrityError(ResponseValidationError):
    """A confidential answer could not be decrypted, or its content does not match its hash.

    The answer may have been altered on its way, or come from another node than the one the
    request was encrypted for. It is never returned as a success, and not retried: the node
    may have processed (and billed) the request.
    """


_BY_STATUS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    402: InsufficientBalanceError,
    403: PermissionDeniedError,
    404: NotFoundError,
    413: RequestTooLargeError,
    422: UnprocessableEntityError,
    423: LockedError,
    425: StackUnavailableError,
    429: RateLimitError,
    500: InternalServerError,
    502: BadGatewayError,
    503: ServiceUnavailableError,
    504: GatewayTimeoutError,
}


def status_error_class(status: int, code: str | None) -> type[APIStatusError]:
    """The class for an error status and the code from the body."""
    if code == "FIAT_PAYMENTS_ONLY":
        return InsufficientBalanceError
    cls = _BY_STATUS.get(status)
    if cls is not None:
        return cls
    return ServerError if status >= 500 else APIStatusError
