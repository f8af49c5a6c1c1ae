"""Fetching an image by URL: one attempt follows redirects, one hop at a time.

Each hop chooses its headers by origin: the key and the user's headers go only to
``base_url``'s origin, any other host gets ``User-Agent`` and ``Accept`` alone. A redirect to
something that is not http(s) or that holds ``user:password@``, or more than `MAX_REDIRECTS`
of them, ends the download with a typed error that is not retried; a URL that holds
``user:password@`` is refused before anything is sent (aiohttp would send them, or refuse
them with a bare ValueError beside the key), and no error shows the password.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING

import attrs
from multidict import CIMultiDict
from yarl import URL

from ._checks import http_url, is_http_url, without_credentials
from ._convert import error_from_response
from ._errors import APIStatusError, InvalidRequestError
from ._hooks import CallInfo
from ._transport import Answer

if TYPE_CHECKING:
    from ._hooks import HookSet
    from ._retry import RetryPolicy
    from ._timeout import Timeout
    from ._transport import Transport

__all__ = ["MAX_REDIRECTS", "download", "download_url", "fetch_once"]

#: How many redirects a download follows (aiohttp follows 10, httpx 20; an image URL
#: needs one or two, and each hop is a chance to be sent somewhere else).
MAX_REDIRECTS = 5
_REDIRECTS = frozenset({301, 302, 303, 307, 308})

#: Sends one GET: (url, headers, seconds it may take).
Get = Callable[[URL, Mapping[str, str], float], Awaitable[Answer]]


def download_url(raw: object) -> URL:
    """The URL of an image result, or `InvalidRequestError` if it is not an http(s) one, or
    holds ``user:password@`` (shown without them)."""
    url = http_url(raw)
    if url is not None and _has_credentials(url):
        raise InvalidRequestError(
            "image.url",
            without_credentials(raw),
            "allowed: an http(s) URL without user:password@ (a download sends no credentials "
            "but the client's own)",
        )
    if url is None:
        hint = ""
        if isinstance(raw, str) and "://" not in raw:
            hint = (
                " This looks like a file name on the server's node, which nothing serves:"
                " Atoma's backend answers so when a request lacks response_format 'B64Json',"
                " which the client's default dialect='atoma' always sends"
            )
        raise InvalidRequestError("image.url", raw, f"allowed: an http(s) URL.{hint}")
    return url


async def fetch_once(
    get: Get,
    url: URL,
    *,
    home: URL,
    home_headers: Mapping[str, str],
    other_headers: Mapping[str, str],
    seconds: float,
) -> bytes:
    """One download attempt of at most ``seconds``: the body at ``url``, redirects followed."""
    started = time.monotonic()
    target = url
    for _ in range(MAX_REDIRECTS + 1):
        headers = home_headers if target.origin() == home.origin() else other_headers
        answer = await get(target, headers, seconds - (time.monotonic() - started))
        location = _redirect_target(target, answer)
        if location is None:
            if answer.status >= 300:
                raise error_from_response(answer.status, answer.headers, answer.body, str(target))
            return answer.body
        target = location
    raise _redirect_error(answer, target, f"more than {MAX_REDIRECTS} redirects")


async def download(  # noqa: PLR0917 - what one download needs, in order
    transport: Transport,
    url: URL,
    home: URL,
    limits: Timeout,
    policy: RetryPolicy,
    hooks: HookSet,
    max_bytes: int,
) -> bytes:
    """The body at ``url``: `fetch_once` in the policy's attempt loop.

    The client's headers (its key among them) go only to ``home``'s origin; every other
    origin gets the transport's ``anonymous_headers``. Fetching bills nothing, so an ambiguous
    failure is worth another try: the policy retries it.
    """

    transport.open()  # a closed client fails here, before the attempt loop

    async def get(target: URL, headers: Mapping[str, str], seconds: float) -> Answer:
        timeout = limits.for_attempt(seconds)
        return await transport.get(target, timeout, headers=headers, max_bytes=max_bytes)

    async def attempt(remaining: float) -> bytes:
        return await fetch_once(
            get,
            url,
            home=home,
            home_headers=transport.headers,
            other_headers=transport.anonymous_headers,
            seconds=limits.attempt_seconds(remaining),
        )

    policy = attrs.evolve(policy, retry_ambiguous=True)
    return await policy.run(attempt, hooks, lambda: CallInfo.of("download", "GET", url))


def _redirect_target(current: URL, answer: Answer) -> URL | None:
    """Where a redirect answer points (None when it is not one); refuses a non-http(s) one."""
    location = answer.headers.get("location")
    if answer.status not in _REDIRECTS or location is None:
        return None
    try:
        target: URL | None = current.join(URL(location))
    except (TypeError, ValueError):
        target = None
    if target is None or not is_http_url(target):
        raise _redirect_error(
            answer, current, f"redirected to {location[:200]!r}, which is not an http(s) URL"
        )
    if _has_credentials(target):
        shown = str(without_credentials(location))
        headers = CIMultiDict(answer.headers)
        headers["Location"] = shown  # the error keeps the headers: never the password
        raise _redirect_error(
            attrs.evolve(answer, headers=headers),
            current,
            f"redirected to {shown[:200]!r}, which holds user:password@",
        )
    return target


def _has_credentials(url: URL) -> bool:
    return url.user is not None or url.password is not None


def _redirect_error(answer: Answer, url: URL, problem: str) -> APIStatusError:
    return APIStatusError(
        status=answer.status,
        code=None,
        message=f"{problem}; the download was not followed further",
        body="",
        headers=answer.headers,
        request_id=answer.headers.get("x-request-id"),
        url=str(url),
    )
