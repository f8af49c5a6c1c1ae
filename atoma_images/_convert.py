"""The package's one cattrs converter, and the network-free edges of a call.

The converter's dict of an `ImageRequest` is the start of every body (`_dialect.encode`
writes it for each kind of server); `parse_response` turns
(status, headers, body bytes) into an `ImagesResponse` or raises the typed error;
`error_from_response` makes the typed error of an error status. None touches a socket, so
all are tested without one. JSON is read by the one bounded parser (`_bounded_json`), an
error body's message by `_error_text`, a wait by `_retry_after` (docs/architecture.md).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar, get_args, get_origin

import attrs

from ._bounded_json import load_json
from ._checks import http_url
from ._error_text import EXCERPT, error_details
from ._errors import APIStatusError, NoImageError, ResponseValidationError, status_error_class
from ._models import MAX_IMAGES, GeneratedImage, ImageRequest, ImagesResponse
from ._retry_after import parse_retry_after

if TYPE_CHECKING:
    import cattrs

__all__ = [
    "converter",
    "error_from_response",
    "invalid_response",
    "parse_object",
    "parse_response",
]

T = TypeVar("T")


class _Mismatch(TypeError):
    """A value of the wrong type; its message is shown to the user as is."""


def _strict(expected: type, noun: str) -> Any:
    def structure(value: Any, _: Any) -> Any:
        # type() rather than isinstance(): True is not an int here.
        if type(value) is not expected:
            raise _Mismatch(f"expected {noun}, got {type(value).__name__} {_short(value)}")
        return value

    return structure


def _structure_optional_str(value: Any, _: Any) -> str | None:
    if value is None or type(value) is str:
        return value
    raise _Mismatch(f"expected a string or null, got {type(value).__name__} {_short(value)}")


def _passthrough(value: Any, _: Any) -> Any:
    return value


def _has_extra(type_: Any) -> bool:
    return attrs.has(type_) and "extra" in attrs.fields_dict(type_)


def _is_variadic_tuple(type_: Any) -> bool:
    return get_origin(type_) is tuple and get_args(type_)[1:] == (Ellipsis,)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:39] + "…"


@functools.cache
def converter() -> cattrs.Converter:
    """The one converter of the package, built on first use (cattrs costs import time)."""
    import cattrs  # noqa: PLC0415
    from cattrs.errors import IterableValidationError, IterableValidationNote  # noqa: PLC0415
    from cattrs.gen import (  # noqa: PLC0415
        make_dict_structure_fn,
        make_dict_unstructure_fn,
        override,
    )

    conv = cattrs.Converter()
    conv.register_structure_hook(str, _strict(str, "a string"))
    conv.register_structure_hook(int, _strict(int, "an integer"))
    # One call for an optional string instead of cattrs' Optional wrapper plus the str hook.
    conv.register_structure_hook_func(lambda t: t == (str | None), _structure_optional_str)

    # The dict form of a request is exactly what goes on the wire: fields left at their
    # default are omitted (the optional ones are None, and the proxy reads null as missing),
    # except n and size, which the proxy requires; extra_body is merged in by _dialect.
    conv.register_unstructure_hook(
        ImageRequest,
        make_dict_unstructure_fn(
            ImageRequest,
            conv,
            _cattrs_omit_if_default=True,
            n=override(omit_if_default=False),
            size=override(omit_if_default=False),
            extra_body=override(omit=True),
        ),
    )

    # These hooks are the one place an answer is checked; each problem is named by its
    # path (data[0].url: expected a string ...).

    def keeping_extra(cls: Any) -> Callable[[Any, Any], Any]:
        """The hook of a value that keeps the keys it does not know in its ``extra``."""
        fields = frozenset(f.name for f in attrs.fields(cls)) - {"extra"}
        structure = make_dict_structure_fn(cls, conv, extra=override(struct_hook=_passthrough))

        def structure_value(obj: Any, _: Any) -> Any:
            if type(obj) is not dict:
                raise _Mismatch(f"expected an object, got {type(obj).__name__} {_short(obj)}")
            known = {k: v for k, v in obj.items() if k in fields}
            extra = {k: v for k, v in obj.items() if k not in fields}
            return structure({**known, "extra": extra}, cls)

        return structure_value

    def structure_items(obj: Any, item_type: Any) -> tuple[Any, ...]:
        if type(obj) is not list:  # cattrs would take a string as a tuple of characters
            raise _Mismatch(f"expected a list, got {type(obj).__name__} {_short(obj)}")
        # Every item is tried, and each failure is noted with its index so that
        # transform_error can name it as data[i].
        items, errors = [], []
        for index, item in enumerate(obj):
            try:
                items.append(conv.structure(item, item_type))
            except Exception as exc:
                note = IterableValidationNote(f"item @ index {index}", index, item_type)
                exc.__notes__ = [*getattr(exc, "__notes__", []), note]  # type: ignore[attr-defined]
                errors.append(exc)
        if errors:
            raise IterableValidationError("While structuring a list", errors, tuple)
        return tuple(items)

    def structure_images(obj: Any, _: Any) -> tuple[GeneratedImage, ...]:
        # A request asks for at most MAX_IMAGES; checked first, so that a hostile list
        # costs one error, not one per item.
        if type(obj) is list and len(obj) > MAX_IMAGES:
            raise _Mismatch(f"expected at most {MAX_IMAGES} images, got {len(obj)} items")
        return structure_items(obj, GeneratedImage)

    # Any value with an ``extra`` field (GeneratedImage, ModelInfo, Health) keeps unknown keys
    # there, and any ``tuple[X, ...]`` is read from a JSON list, item by item.
    conv.register_structure_hook_factory(_has_extra, keeping_extra)
    conv.register_structure_hook_func(
        _is_variadic_tuple, lambda obj, t: structure_items(obj, get_args(t)[0])
    )

    structure_fields = make_dict_structure_fn(
        ImagesResponse,
        conv,
        data=override(struct_hook=structure_images),
        extra=override(struct_hook=_passthrough),
        headers=override(struct_hook=_passthrough),
    )

    conv.register_structure_hook(ImagesResponse, structure_fields)
    return conv


_RESPONSE_KEYS = frozenset({"created", "data"})


def parse_response(
    status: int, headers: Mapping[str, str], body: bytes, url: object = None
) -> ImagesResponse:
    """Turn an HTTP answer into an `ImagesResponse`, or raise the error it stands for.

    Raises:
        APIStatusError: (a subclass of it) for any status that is not 2xx.
        ResponseValidationError: a 2xx whose body is not an images response.
        NoImageError: a 2xx with an item that holds no image (a file name, not a URL).
    """
    if not 200 <= status < 300:
        raise error_from_response(status, headers, body, None if url is None else str(url))
    obj = _load_object(status, headers, body)
    fields = {key: obj[key] for key in _RESPONSE_KEYS if key in obj}
    extra = {key: value for key, value in obj.items() if key not in _RESPONSE_KEYS}
    try:
        response = converter().structure(
            {
                **fields,
                "extra": extra,
                "request_id": headers.get("x-request-id"),
                "headers": headers,
            },
            ImagesResponse,
        )
    except Exception as exc:  # cattrs reports every problem found, grouped
        raise _invalid_fields(exc, status, headers, body) from exc
    missing = [i for i, image in enumerate(response.data) if not _holds_image(image)]
    if missing:
        raise _no_image(response, missing, status, headers, body)
    return response


def _holds_image(image: GeneratedImage) -> bool:
    """Base64 data, or an http(s) URL to download it from (not a file name on a server)."""
    return image.b64_json is not None or (image.url is not None and http_url(image.url) is not None)


def _no_image(
    response: ImagesResponse,
    missing: list[int],
    status: int,
    headers: Mapping[str, str],
    body: bytes,
) -> NoImageError:
    first = response.data[missing[0]]
    if first.url is None:
        what = "neither base64 data nor a URL"
    else:
        what = (
            f"no base64 data, and its url {first.url[:80]!r} is not an http(s) URL (Atoma's "
            "backend answers response_format 'Url' with a file name on the node's disk, which "
            "nothing serves)"
        )
    where = ", ".join(f"data[{i}]" for i in missing)
    error = NoImageError(
        f"{where}: no image: {what}",
        response=response,
        status=status,
        body_excerpt=_excerpt(body),
        headers=headers,
        request_id=headers.get("x-request-id"),
    )
    # The items that do hold an image were billed with the rest: never dropped.
    images = tuple(image for image in response.data if _holds_image(image))
    error.partial = attrs.evolve(response, data=images) if images else None
    return error


def parse_object(
    status: int, headers: Mapping[str, str], body: bytes, url: object, cls: type[T]
) -> T:
    """Turn a JSON answer into a ``cls`` (unknown keys ignored), or raise the typed error."""
    if not 200 <= status < 300:
        raise error_from_response(status, headers, body, None if url is None else str(url))
    obj = _load_object(status, headers, body)
    try:
        return converter().structure(obj, cls)
    except Exception as exc:
        raise _invalid_fields(exc, status, headers, body) from exc


def _load_object(status: int, headers: Mapping[str, str], body: bytes) -> dict[str, Any]:
    try:
        obj = load_json(body)
    except ValueError as exc:
        raise invalid_response(str(exc), status, headers, body) from exc
    if type(obj) is not dict:
        raise invalid_response(
            f"expected a JSON object, got {type(obj).__name__}", status, headers, body
        )
    return obj


def _invalid_fields(
    exc: Exception, status: int, headers: Mapping[str, str], body: bytes
) -> ResponseValidationError:
    from cattrs import transform_error  # noqa: PLC0415 - imported by converter() already

    problems = transform_error(exc, path="response", format_exception=_describe)
    return invalid_response("; ".join(_path_first(p) for p in problems), status, headers, body)


def invalid_response(
    message: str, status: int, headers: Mapping[str, str], body: bytes
) -> ResponseValidationError:
    """The error for a success answer whose body cannot be used, with its start and request id."""
    return ResponseValidationError(
        message,
        status=status,
        body_excerpt=_excerpt(body),
        headers=headers,
        request_id=headers.get("x-request-id"),
    )


def _path_first(problem: str) -> str:
    # cattrs says "what @ response.data[0].url"; lead with the path: "data[0].url: what".
    what, _, path = problem.rpartition(" @ ")
    return f"{path.removeprefix('response.')}: {what}" if what else problem


def _describe(exc: BaseException, type_: Any) -> str:
    if isinstance(exc, _Mismatch):
        return str(exc)
    if isinstance(exc, KeyError):
        return "required field missing"
    from cattrs.v import format_exception  # noqa: PLC0415

    return format_exception(exc, type_)


def _excerpt(body: bytes) -> str:
    return body[:EXCERPT].decode("utf-8", "replace")


def error_from_response(
    status: int, headers: Mapping[str, str], body: bytes, url: str | None = None
) -> APIStatusError:
    """The typed error for an error status; copes with JSON, plain-text, HTML and empty bodies."""
    text = body.decode("utf-8", "replace")
    code, message, envelope = error_details(body, text)
    if 300 <= status < 400:
        # Redirects are not followed: a paid POST and its key go only where they were sent.
        message = (
            f"the server redirected to {headers.get('location')!r}; atoma-images does not "
            "follow redirects for generation requests, so set base_url to the final address"
        )
    elif status == 404 and code is None and url is not None:
        # Not Atoma's own 404 (that one has a code): the path is wrong, most often a base_url
        # without its /v1.
        message += f" ({url} answered 404; base_url must be the API root, ending in /v1)"
    cls = status_error_class(status, code)
    return cls(
        status=status,
        code=code,
        envelope=envelope,
        message=message,
        body=text,
        headers=headers,
        request_id=headers.get("x-request-id"),
        url=url,
        retry_after=parse_retry_after(headers),
    )
