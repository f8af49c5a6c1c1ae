"""The package's one cattrs converter, and the network-free edges of a call.

`encode_request` turns an `ImageRequest` into body bytes; `parse_response` turns
(status, headers, body bytes) into an `ImagesResponse` or raises the typed error. Neither
touches a socket, so both are tested without one.
"""

from __future__ import annotations

import datetime
import email.utils
import html
import json
import math
import re
import time
from collections.abc import Mapping
from typing import Any

import attrs
import cattrs
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override
from cattrs.v import format_exception

from ._errors import APIStatusError, ResponseValidationError, status_error_class
from ._models import GeneratedImage, ImageRequest, ImagesResponse

__all__ = ["converter", "encode_request", "error_from_response", "parse_response"]

_EXCERPT = 200


class _Mismatch(TypeError):
    """A value of the wrong type; its message is shown to the user as is."""


def _strict(expected: type, noun: str) -> Any:
    def structure(value: Any, _: Any) -> Any:
        # type() rather than isinstance(): True is not an int, and 3 is not a float here.
        if type(value) is not expected:
            raise _Mismatch(f"expected {noun}, got {type(value).__name__} {_short(value)}")
        return value

    return structure


def _structure_float(value: Any, _: Any) -> float:
    if type(value) is float or type(value) is int:
        return float(value)
    raise _Mismatch(f"expected a number, got {type(value).__name__} {_short(value)}")


def _passthrough(value: Any, _: Any) -> Any:
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:39] + "…"


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter()
    conv.register_structure_hook(str, _strict(str, "a string"))
    conv.register_structure_hook(int, _strict(int, "an integer"))
    conv.register_structure_hook(bool, _strict(bool, "a boolean"))
    conv.register_structure_hook(float, _structure_float)

    unstructure_request = make_dict_unstructure_fn(ImageRequest, conv)

    def unstructure(request: ImageRequest) -> dict[str, Any]:
        # Never send null: the proxy treats a null n or size as missing. n and size are
        # never None (ImageRequest checks them), so they are always sent.
        return {k: v for k, v in unstructure_request(request).items() if v is not None}

    conv.register_unstructure_hook(ImageRequest, unstructure)

    image_fields = frozenset(f.name for f in attrs.fields(GeneratedImage)) - {"extra"}
    structure_image = make_dict_structure_fn(
        GeneratedImage, conv, extra=override(struct_hook=_passthrough)
    )

    def structure_item(obj: Any, _: Any) -> GeneratedImage:
        if type(obj) is not dict:
            raise _Mismatch(f"expected an object, got {type(obj).__name__} {_short(obj)}")
        if obj.get("url") is None and obj.get("b64_json") is None:
            raise _Mismatch("the image has neither url nor b64_json")
        if obj.keys() <= image_fields:
            return structure_image(obj, GeneratedImage)
        known = {k: v for k, v in obj.items() if k in image_fields}
        known["extra"] = {k: v for k, v in obj.items() if k not in image_fields}
        return structure_image(known, GeneratedImage)

    def structure_images(obj: Any, _: Any) -> tuple[GeneratedImage, ...]:
        if type(obj) is not list:
            raise _Mismatch(f"expected a list, got {type(obj).__name__} {_short(obj)}")
        return conv.structure(obj, tuple[GeneratedImage, ...])

    conv.register_structure_hook(GeneratedImage, structure_item)
    conv.register_structure_hook(
        ImagesResponse,
        make_dict_structure_fn(
            ImagesResponse,
            conv,
            data=override(struct_hook=structure_images),
            extra=override(struct_hook=_passthrough),
            headers=override(struct_hook=_passthrough),
        ),
    )
    return conv


#: The one converter of the package.
converter = _make_converter()

_RESPONSE_KEYS = frozenset({"created", "data"})


def encode_request(request: ImageRequest) -> bytes:
    """The JSON body for ``request``: optional fields only when set, ``n`` and ``size`` always."""
    body = converter.unstructure(request)
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def parse_response(
    status: int, headers: Mapping[str, str], body: bytes, url: str | None = None
) -> ImagesResponse:
    """Turn an HTTP answer into an `ImagesResponse`, or raise the error it stands for.

    Raises:
        APIStatusError: (a subclass of it) for any status that is not 2xx.
        ResponseValidationError: a 2xx whose body is not an images response.
    """
    if not 200 <= status < 300:
        raise error_from_response(status, headers, body, url)
    request_id = headers.get("x-request-id")
    try:
        obj = json.loads(body)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError alike
        raise ResponseValidationError(
            f"the body is not JSON ({exc})",
            status=status,
            body_excerpt=_excerpt(body),
            headers=headers,
            request_id=request_id,
        ) from exc
    if type(obj) is not dict:
        raise ResponseValidationError(
            f"expected a JSON object, got {type(obj).__name__}",
            status=status,
            body_excerpt=_excerpt(body),
            headers=headers,
            request_id=request_id,
        )
    fields = {k: v for k, v in obj.items() if k in _RESPONSE_KEYS}
    fields["extra"] = {k: v for k, v in obj.items() if k not in _RESPONSE_KEYS}
    fields["headers"] = headers
    fields["request_id"] = request_id
    try:
        return converter.structure(fields, ImagesResponse)
    except Exception as exc:  # cattrs reports every problem found, grouped
        problems = cattrs.transform_error(exc, path="response", format_exception=_describe)
        raise ResponseValidationError(
            "; ".join(_path_first(p) for p in problems),
            status=status,
            body_excerpt=_excerpt(body),
            headers=headers,
            request_id=request_id,
        ) from exc


def _path_first(problem: str) -> str:
    # cattrs says "what @ response.data[0].url"; lead with the path: "data[0].url: what".
    what, _, path = problem.rpartition(" @ ")
    return f"{path.removeprefix('response.')}: {what}" if what else problem


def _describe(exc: BaseException, type_: Any) -> str:
    if isinstance(exc, _Mismatch):
        return str(exc)
    if isinstance(exc, KeyError):
        return "required field missing"
    return format_exception(exc, type_)


def _excerpt(body: bytes) -> str:
    return body[:_EXCERPT].decode("utf-8", "replace")


def error_from_response(
    status: int, headers: Mapping[str, str], body: bytes, url: str | None = None
) -> APIStatusError:
    """The typed error for an error status; copes with JSON, plain-text, HTML and empty bodies."""
    text = body.decode("utf-8", "replace")
    code, message = _error_details(text)
    if 300 <= status < 400:
        # Redirects are not followed: a paid POST and its key go only where they were sent.
        message = (
            f"the server redirected to {headers.get('location')!r}; atoma-images does not "
            "follow redirects for generation requests, so set base_url to the final address"
        )
    cls = status_error_class(status, code)
    return cls(
        status=status,
        code=code,
        message=message,
        body=text,
        headers=headers,
        request_id=headers.get("x-request-id"),
        url=url,
        retry_after=parse_retry_after(headers),
    )


_TITLE = re.compile(r"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)
_TAG = re.compile(r"<[^>]*>")
_SCRIPT = re.compile(r"<(script|style)\b.*?</\1\s*>", re.IGNORECASE | re.DOTALL)


def _error_details(text: str) -> tuple[str | None, str]:
    stripped = text.strip()
    if not stripped:
        return None, "the server sent no error details (empty body)"
    if stripped[0] in "{[":
        try:
            obj = json.loads(stripped)
        except ValueError:
            pass
        else:
            found = _from_json(obj)
            if found is not None:
                return found
    if stripped[0] == "<":
        # A gateway's HTML page: its title says it best, else its visible text.
        title = _TITLE.search(stripped)
        shown = title.group(1) if title else _TAG.sub(" ", _SCRIPT.sub(" ", stripped))
        return None, " ".join(html.unescape(shown).split())[:_EXCERPT] or "(HTML page)"
    return None, " ".join(stripped.split())[:_EXCERPT]


def _from_json(obj: Any) -> tuple[str | None, str] | None:
    if type(obj) is not dict:
        return None
    error = obj.get("error")
    if type(error) is dict:
        code = error.get("code")
        message = error.get("message")
        return (
            code if type(code) is str else None,
            message if type(message) is str else json.dumps(error)[:_EXCERPT],
        )
    for key in ("error", "message", "detail"):
        value = obj.get(key)
        if type(value) is str:
            return None, value
    return None


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date)."""
    millis = headers.get("retry-after-ms")
    if millis is not None:
        seconds = _as_seconds(millis)
        if seconds is not None:
            return seconds / 1000
    value = headers.get("retry-after")
    if value is None:
        return None
    seconds = _as_seconds(value)
    if seconds is not None:
        return seconds
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # an HTTP date is GMT even when it says -0000
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, when.timestamp() - time.time())


def _as_seconds(value: str) -> float | None:
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None
