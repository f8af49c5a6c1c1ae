"""The client's settings: checked once, when the client is made, never on a call.

`ClientSettings` is a frozen attrs class whose validators are the one home of every
construction-time check; each raises `InvalidRequestError` naming the argument, the value
(never a secret) and what is allowed. `ClientSettings.from_arguments` fills in what the
caller left out from the environment and the defaults.
"""

from __future__ import annotations

import os
import ssl as ssl_module
from collections.abc import Mapping
from typing import Any

import attrs
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from ._budget import check_budget
from ._checks import check_whole_number, http_url, without_credentials
from ._dialect import Dialect, check_dialect
from ._errors import InvalidRequestError
from ._hooks import DEFAULT_HOOKS, HookSet
from ._limits import BudgetLike, RateLimiter
from ._models import DEFAULT_MODEL, check_fields
from ._retry import RetryPolicy, check_policy
from ._timeout import Timeout

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_MAX_DOWNLOAD_BYTES",
    "DEFAULT_MAX_RESPONSE_BYTES",
    "ClientSettings",
    "from_environment",
]

DEFAULT_BASE_URL = "https://api.atoma.network/v1"
KEY_VARIABLES = ("ATOMA_API_KEY", "ATOMASDK_BEARER_AUTH")
# An answer of n=10 large images as base64 stays well under this; see docs/architecture.md.
DEFAULT_MAX_RESPONSE_BYTES = 128 * 2**20
DEFAULT_MAX_DOWNLOAD_BYTES = 64 * 2**20
# RFC 9110 section 5.6.2: a header name is a token.
_TOKEN = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
# Set by the client itself: the key goes in api_key, the body is always JSON.
_RESERVED_HEADERS = frozenset({"authorization", "content-type"})


def _check_api_key(_: object, __: object, value: Any) -> None:
    # The key is never echoed back, not even in this error.
    if type(value) is not str:
        raise InvalidRequestError("api_key", type(value).__name__, "allowed: a string")
    if not value or not value.isascii() or not value.isprintable() or " " in value:
        raise InvalidRequestError(
            "api_key", "<hidden>", "allowed: a non-empty string of printable ASCII, no spaces"
        )


def _to_base_url(raw: object) -> URL:
    shown = without_credentials(raw)  # every error below shows this, never raw
    url = http_url(raw)
    if url is None:
        raise InvalidRequestError(
            "base_url", shown, "allowed: an http:// or https:// URL such as " + DEFAULT_BASE_URL
        )
    if url.user is not None or url.password is not None:
        raise InvalidRequestError(
            "base_url", shown, "allowed: a URL without user:password; pass the key as api_key"
        )
    if url.query_string or url.fragment:
        raise InvalidRequestError("base_url", shown, "allowed: a URL without query or fragment")
    return url.with_path(url.path.rstrip("/"))  # ".../v1" and ".../v1/" are the same root


def _check_model(_: object, __: object, value: Any) -> None:
    check_fields(model=value)  # the request's own check, not a copy


def _to_timeout(value: object) -> Timeout:
    return Timeout() if value is None else Timeout.of(value)  # type: ignore[arg-type]


def _check_policy(_: object, __: object, value: object) -> None:
    check_policy(value)


def _check_positive_int(_: object, attribute: attrs.Attribute[int], value: object) -> None:
    check_whole_number(attribute.name, value, 1)


def _to_headers(value: object) -> CIMultiDictProxy[str]:
    if value is None:
        value = {}
    if not isinstance(value, Mapping):  # its values may be secrets: named by type only
        raise InvalidRequestError(
            "headers", type(value).__name__, "allowed: a mapping of str to str, or None"
        )
    headers: CIMultiDict[str] = CIMultiDict()
    for name, text in value.items():
        if type(name) is not str or not name or not _TOKEN.issuperset(name):
            raise InvalidRequestError(
                "headers", name, "allowed: names made of letters, digits and !#$%&'*+-.^_`|~"
            )
        if name.lower() in _RESERVED_HEADERS:
            raise InvalidRequestError(
                "headers", name, "allowed: any header but Authorization and Content-Type"
            )
        # RFC 9110 section 5.5: no CR, LF or NUL (a header injection), nor other controls.
        # The value may be a secret (a gateway's token): the error describes it, never shows it.
        if type(text) is not str:
            raise InvalidRequestError(
                f"headers[{name!r}]",
                type(text).__name__,
                "allowed: a str without control characters",
            )
        if any((c < " " and c != "\t") or c == "\x7f" for c in text):
            raise InvalidRequestError(
                f"headers[{name!r}]",
                f"<hidden: {len(text)} characters, with a control character such as CR or LF>",
                "allowed: a str without control characters",
            )
        headers[name] = text
    return CIMultiDictProxy(headers)


def _to_hooks(value: object) -> HookSet:
    return HookSet.of(value)


def _check_ssl(_: object, __: object, value: object) -> None:
    if not isinstance(value, (bool, ssl_module.SSLContext)):
        raise InvalidRequestError("ssl", value, "allowed: True, False or an ssl.SSLContext")


def _check_rate_limit(value: object) -> None:
    if value is not None and not isinstance(value, RateLimiter):
        raise InvalidRequestError(
            "rate_limit", value, "allowed: a RateLimit, a RedisRateLimit, or None"
        )


def from_environment(api_key: str | None, base_url: str | None) -> tuple[str, str]:
    """The key and the API root of a client: as given, else from the environment (read when
    a client is made, never at import), else the default root.

    Raises:
        InvalidRequestError: no key was given and none is set.
    """
    if api_key is None:
        api_key = next(filter(None, map(os.environ.get, KEY_VARIABLES)), None)
        if api_key is None:
            raise InvalidRequestError(
                "api_key",
                None,
                f"pass api_key=... or set {KEY_VARIABLES[0]} (or {KEY_VARIABLES[1]}, the "
                "Atoma SDK's variable)",
            )
    return api_key, base_url or os.environ.get("ATOMA_BASE_URL") or DEFAULT_BASE_URL


@attrs.frozen(kw_only=True)
class ClientSettings:
    """Everything a client was configured with, checked. See `AsyncImagesClient` for each."""

    api_key: str = attrs.field(validator=_check_api_key, repr=False)
    base_url: URL = attrs.field(converter=_to_base_url)
    model: str = attrs.field(default=DEFAULT_MODEL, validator=_check_model)
    timeout: Timeout = attrs.field(default=None, converter=_to_timeout)
    retries: RetryPolicy = attrs.field(factory=RetryPolicy, validator=_check_policy)
    max_connections: int = attrs.field(default=100, validator=_check_positive_int)
    max_response_bytes: int = attrs.field(
        default=DEFAULT_MAX_RESPONSE_BYTES, validator=_check_positive_int
    )
    headers: CIMultiDictProxy[str] = attrs.field(factory=dict, converter=_to_headers)
    ssl: ssl_module.SSLContext | bool = attrs.field(default=True, validator=_check_ssl)
    hooks: HookSet = attrs.field(default=DEFAULT_HOOKS, converter=_to_hooks)
    budget: BudgetLike | None = attrs.field(
        default=None, validator=lambda _, __, v: check_budget(v)
    )
    rate_limit: RateLimiter | None = attrs.field(
        default=None, validator=lambda _, __, v: _check_rate_limit(v)
    )
    dialect: Dialect = attrs.field(default="atoma", validator=lambda _, __, v: check_dialect(v))

    @classmethod
    def from_arguments(
        cls, api_key: str | None, base_url: str | None, retries: RetryPolicy | None, **rest: Any
    ) -> ClientSettings:
        """The settings for a client's arguments, the environment filling in what is None."""
        api_key, base_url = from_environment(api_key, base_url)
        return cls(
            api_key=api_key,
            base_url=base_url,
            retries=RetryPolicy() if retries is None else retries,
            **rest,
        )

    @property
    def generations_url(self) -> URL:
        return self.base_url / "images/generations"
