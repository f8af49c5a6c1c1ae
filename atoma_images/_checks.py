"""The argument rules several settings share, each in one place.

Each raises `InvalidRequestError` naming the argument, the value and what is allowed; the
attrs validators of `ClientSettings`, `RetryPolicy` and `Budget`, and the checks of a call's
own arguments, all call these (docs/architecture.md, "One home per rule").
"""

from __future__ import annotations

import inspect

from yarl import URL

from ._errors import InvalidRequestError

__all__ = [
    "check_callable_or_none",
    "check_flag",
    "check_plain_callable_or_none",
    "check_whole_number",
    "http_url",
    "is_async_callable",
    "is_http_url",
    "without_credentials",
]


def check_whole_number(field: str, value: object, minimum: int) -> None:
    """An ``int`` (not a bool, not a float) of at least ``minimum``."""
    if type(value) is not int or value < minimum:
        raise InvalidRequestError(field, value, f"allowed: an integer >= {minimum}")


def check_flag(field: str, value: object) -> None:
    """``True`` or ``False``, not merely something truthy."""
    if type(value) is not bool:
        raise InvalidRequestError(field, value, "allowed: True or False")


def check_callable_or_none(field: str, value: object) -> None:
    if value is not None and not callable(value):
        raise InvalidRequestError(field, value, "allowed: a callable or None")


def is_async_callable(value: object) -> bool:
    """Whether calling ``value`` makes a coroutine or an async generator (an ``async def``
    function or method, or an object whose ``__call__`` is one) instead of running it."""
    call = getattr(value, "__call__", None)  # noqa: B004 - an object with an async __call__
    return any(
        inspect.iscoroutinefunction(f) or inspect.isasyncgenfunction(f) for f in (value, call)
    )


def check_plain_callable_or_none(field: str, value: object) -> None:
    """A callable or None, but not an ``async def`` one: the package calls it and does not
    await it, so its body would never run."""
    check_callable_or_none(field, value)
    if is_async_callable(value):
        raise InvalidRequestError(
            field, value, "allowed: a plain function (an async def one would never be awaited)"
        )


def is_http_url(url: URL) -> bool:
    """Whether ``url`` is an absolute http(s) URL with a host."""
    return url.scheme in ("http", "https") and bool(url.host)


def http_url(text: object) -> URL | None:
    """``text`` as an absolute http(s) URL with a host, or None if it is not one."""
    if not isinstance(text, str):
        return None
    try:
        url = URL(text)
    except (TypeError, ValueError):
        return None
    return url if is_http_url(url) else None


def without_credentials(raw: object) -> object:
    """``raw`` as an error may show it, parsed or not: everything up to a URL's last ``@``
    replaced (a password may hold ``/`` or ``@``), and no query or fragment (one may hold a
    key)."""
    if not isinstance(raw, str):
        return raw
    scheme, separator, rest = raw.partition("://") if "://" in raw else ("", "", raw)
    if "?" in rest or "#" in rest:
        rest = rest.split("?", 1)[0].split("#", 1)[0] + "?<query or fragment removed>"
    if "@" in rest:
        rest = "<credentials removed>@" + rest.rpartition("@")[2]
    return f"{scheme}{separator}{rest}"
