"""The request and response values (attrs), and the checks a request passes before it is sent."""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import attrs

from ._errors import InvalidRequestError, ResponseValidationError
from ._files import write_images

__all__ = [
    "DEFAULT_MODEL",
    "MAX_IMAGES",
    "GeneratedImage",
    "ImageRequest",
    "ImagesResponse",
    "ResponseFormat",
    "check_fields",
]

DEFAULT_MODEL = "black-forest-labs/FLUX.1-schnell"
MAX_PROMPT_CHARS = 1000
MAX_IMAGES = 10
# The backend parses each side as an unsigned 32-bit integer.
_MAX_SIDE = 2**32 - 1
_SIZE = re.compile(r"([1-9][0-9]{0,9})x([1-9][0-9]{0,9})", re.ASCII)
_EMPTY: Mapping[str, Any] = MappingProxyType({})
_WHITESPACE = b" \t\n\r\x0b\x0c"


_SIZE_ALLOWED = "'WIDTHxHEIGHT' with a lowercase x and two positive integers, such as '1024x1024'"
_RESPONSE_FORMATS = ("url", "b64_json")
_UTF8_ALLOWED = "allowed: text that can be encoded as UTF-8 (no lone surrogates)"


def utf8_encodable(value: str) -> bool:
    """False for a str holding a lone surrogate, which UTF-8 (and so JSON) cannot carry."""
    # ASCII, the usual case, always can; isascii() is O(1).
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _text(allowed: str, limit: int | None = None) -> Any:
    """An attrs validator for a required, non-blank string of at most ``limit`` characters."""

    def check(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
        field = attribute.name
        if type(value) is not str:
            raise InvalidRequestError(field, value, f"allowed: {allowed}")
        if not value or value.isspace():
            raise InvalidRequestError(field, value, f"allowed: {allowed} (this one is empty)")
        if limit is not None and len(value) > limit:
            raise InvalidRequestError(
                field, value, f"allowed: {allowed} (this one has {len(value)} characters)"
            )
        if not utf8_encodable(value):
            raise InvalidRequestError(field, value, _UTF8_ALLOWED)

    return check


def _check_n(_: object, attribute: attrs.Attribute[int], value: object) -> None:
    # bool is an int subclass; n=True is a mistake, not a request for one image.
    if type(value) is not int or not 1 <= value <= MAX_IMAGES:
        raise InvalidRequestError(
            attribute.name, value, f"allowed: an integer from 1 to {MAX_IMAGES}"
        )


def _check_size(_: object, attribute: attrs.Attribute[str], value: object) -> None:
    match = _SIZE.fullmatch(value) if type(value) is str else None
    if match is None or max(int(match[1]), int(match[2])) > _MAX_SIDE:
        raise InvalidRequestError(attribute.name, value, f"allowed: {_SIZE_ALLOWED}")


def _check_optional_text(_: object, attribute: attrs.Attribute[str | None], value: object) -> None:
    if value is None:
        return
    if type(value) is not str:
        raise InvalidRequestError(attribute.name, value, "allowed: a string or None")
    if not utf8_encodable(value):
        raise InvalidRequestError(attribute.name, value, _UTF8_ALLOWED)


def _check_response_format(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    # type() first: an unhashable value must be refused, not raise TypeError in `in`.
    if value is not None and (type(value) is not str or value not in _RESPONSE_FORMATS):
        raise InvalidRequestError(attribute.name, value, "allowed: 'url', 'b64_json' or None")


_EXTRA_BODY_ALLOWED = (
    "allowed: a mapping of str keys to JSON values (no None, NaN or infinity), for options a "
    "server reads beyond the standard fields"
)


def _read_only_copy(value: object) -> object:
    """A mapping as a read-only copy (a caller's later change does not reach the request)."""
    if value is None:
        return _EMPTY
    return MappingProxyType(dict(value)) if isinstance(value, Mapping) else value


def _check_extra_body(_: object, __: object, value: object) -> None:
    """JSON the server can take: str keys, JSON values, no null, NaN or infinity."""
    if not isinstance(value, Mapping) or not all(type(key) is str for key in value):
        raise InvalidRequestError("extra_body", value, _EXTRA_BODY_ALLOWED)
    try:
        json.dumps(dict(value), allow_nan=False, ensure_ascii=False).encode()
    except (TypeError, ValueError, RecursionError) as exc:  # not JSON, NaN, a lone surrogate
        raise InvalidRequestError("extra_body", value, f"{_EXTRA_BODY_ALLOWED} ({exc})") from None
    if _holds_none(value):  # the proxy and the backend read null as missing, or refuse it
        raise InvalidRequestError(
            "extra_body", value, f"{_EXTRA_BODY_ALLOWED}; leave a key out rather than send null"
        )


def _holds_none(value: object) -> bool:
    """Whether JSON ``value`` holds a null anywhere: a walk with a stack of its own, so a
    deeply nested value cannot exhaust Python's."""
    pending = [value]
    while pending:
        item = pending.pop()
        if item is None:
            return True
        if isinstance(item, Mapping):
            pending.extend(item.values())
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
    return False


#: What ``response_format`` may be: ``"url"``, ``"b64_json"``, or None for the server's default.
ResponseFormat = Literal["url", "b64_json"]


@attrs.frozen(kw_only=True)
class ImageRequest:
    """One image generation request, checked when it is made.

    Every check raises `InvalidRequestError` naming the field, the value and what is allowed.
    ``n`` and ``size`` are always sent (the Atoma proxy requires both); optional fields are
    left out of the body when they are None. How the body is written for each kind of
    server (``width``/``height`` and ``"B64Json"`` for Atoma) is `_dialect`'s job.

    ``extra_body`` is merged into the body as is, for options a server reads beyond the
    standard fields (Atoma's backend reads none: it ignores unknown keys).
    """

    model: str = attrs.field(validator=_text("a non-empty model name string"))
    prompt: str = attrs.field(
        validator=_text(
            f"a non-empty string of at most {MAX_PROMPT_CHARS} characters", MAX_PROMPT_CHARS
        )
    )
    n: int = attrs.field(default=1, validator=_check_n)
    size: str = attrs.field(default="1024x1024", validator=_check_size)
    quality: str | None = attrs.field(default=None, validator=_check_optional_text)
    response_format: ResponseFormat | None = attrs.field(
        default=None, validator=_check_response_format
    )
    style: str | None = attrs.field(default=None, validator=_check_optional_text)
    user: str | None = attrs.field(default=None, validator=_check_optional_text)
    extra_body: Mapping[str, Any] = attrs.field(
        default=_EMPTY, converter=_read_only_copy, validator=_check_extra_body, hash=False
    )

    @property
    def width(self) -> int:
        return int(self.size.partition("x")[0])

    @property
    def height(self) -> int:
        return int(self.size.partition("x")[2])


def check_fields(**fields: object) -> None:
    """Check some fields of a request before its prompt is known (a client's model, a
    batch's options), each by `ImageRequest`'s own converter and validator: one home."""
    known = attrs.fields_dict(ImageRequest)
    for name, value in fields.items():
        field = known[name]
        # extra_body's converter is a plain function (attrs types it as a Converter).
        checked = value if field.converter is None else field.converter(value)  # type: ignore[operator]
        if field.validator is not None:
            field.validator(None, field, checked)


def _short_base64(value: str | None) -> str:
    if value is None or len(value) <= 32:
        return repr(value)
    return f"'{value[:24]}…' ({len(value)} chars)"


def _data_uri_payload(uri: str) -> str:
    """The base64 payload of a ``data:`` URI (RFC 2397) that holds an image.

    The scheme, the media type and ``;base64`` are case-insensitive; a URI without a media
    type means ``text/plain``, which is not an image either.
    """
    header, comma, payload = uri.partition(",")
    # data:[<media type>][;<parameter>]*;base64,<data>: only the first and last parts matter.
    if not comma or header.rpartition(";")[2].lower() != "base64":
        raise ResponseValidationError(
            f"b64_json is a data URI without base64 content: {header[:60]!r}"
        )
    media_type = header[5:].partition(";")[0].lower() or "text/plain"
    if not media_type.startswith("image/"):
        raise ResponseValidationError(
            f"b64_json is a data URI of {media_type[:60]!r}, not of an image"
        )
    return payload


@attrs.frozen(kw_only=True)
class GeneratedImage:
    """One image of a response: a URL, base64 data, or both.

    ``b64_json`` is kept exactly as the server sent it (bare base64 or a ``data:`` URI);
    `decode` turns it into bytes only when asked.
    """

    url: str | None = None
    b64_json: str | None = attrs.field(default=None, repr=_short_base64)
    revised_prompt: str | None = None
    #: Keys the server sent that this version does not know.
    extra: Mapping[str, Any] = attrs.field(factory=dict, repr=False)

    def decode(self) -> bytes:
        """The image bytes, from bare base64 or a ``data:image/...;base64,`` URI.

        Raises:
            ResponseValidationError: the image has no base64 data (only a URL), is a data URI
                of something other than an image, or is not valid base64.
        """
        data = self.b64_json
        if data is None:
            raise ResponseValidationError(
                f"this image has no base64 data, only a URL ({self.url!r}); download it with "
                "client.download(image) (an OpenAI-compatible server sends the bytes when "
                "asked for response_format='b64_json'; Atoma always does)"
            )
        if data[:5].lower() == "data:":
            data = _data_uri_payload(data)
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            pass
        # Some servers wrap lines or drop the padding; accept that, but nothing else.
        # One C-speed copy without whitespace (str.split would make a string per word of a
        # hostile payload); a non-ASCII character becomes "?", which base64 refuses.
        cleaned = data.encode("ascii", "replace").translate(None, _WHITESPACE)
        cleaned += b"=" * (-len(cleaned) % 4)
        try:
            return base64.b64decode(cleaned, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ResponseValidationError(
                f"b64_json is not valid base64 ({exc})", body_excerpt=data[:60]
            ) from exc

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the decoded image to ``path`` and return it as a `Path`."""
        target = Path(path)
        target.write_bytes(self.decode())
        return target


@attrs.frozen(kw_only=True)
class ImagesResponse:
    """The answer to one generation call.

    Attributes:
        created: the server's Unix timestamp.
        data: the generated images (also available as ``images``).
        extra: top-level keys this version does not know (Atoma's ``signature`` and
            ``response_hash``, for example).
        request_id: the ``x-request-id`` response header, when the server sent one.
        headers: the response headers.
        compute_units: what the call was charged, ``n * W * H`` of its request (set by the
            client; 0 for a response parsed on its own).
    """

    created: int
    data: tuple[GeneratedImage, ...]
    extra: Mapping[str, Any] = attrs.field(factory=dict, repr=False)
    request_id: str | None = None
    headers: Mapping[str, str] = attrs.field(default=_EMPTY, repr=False, eq=False)
    compute_units: int = 0

    @property
    def images(self) -> tuple[GeneratedImage, ...]:
        """The generated images (the same tuple as ``data``)."""
        return self.data

    def save_all(self, directory: str | os.PathLike[str], stem: str = "image") -> list[Path]:
        """Write every image to ``directory`` as ``stem-1.png``, ``stem-2.png``, ...

        The extension comes from the image's own bytes (png, jpeg or webp). URL images need
        a download first: use ``await client.save_all(response, directory)`` for those.
        """
        for image in self.data:
            if image.b64_json is None:
                raise ResponseValidationError(
                    f"image {image.url!r} is a URL, not data; use client.save_all(response, "
                    "directory), which downloads it"
                )
        return write_images([image.decode() for image in self.data], directory, stem)
