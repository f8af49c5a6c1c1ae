"""The package's one cattrs converter, its one JSON parser, and the network-free edges of a call.

`encode_request` turns an `ImageRequest` into body bytes; `parse_response` turns
(status, headers, body bytes) into an `ImagesResponse` or raises the typed error. Neither
touches a socket, so both are tested without one.

Everything here reads what a server sent, so everything is bounded: `load_json` refuses a
body that would become more objects or deeper nesting than an answer can hold before
building it, and error pages are scanned with searches that only move forward.
"""

from __future__ import annotations

import datetime
import email.utils
import functools
import html
import json
import math
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import attrs

from ._errors import APIStatusError, ResponseValidationError, status_error_class
from ._models import (
    MAX_IMAGES,
    GeneratedImage,
    ImageRequest,
    ImagesResponse,
    utf8_encodable,
)

try:
    import orjson
except ImportError:  # without the speedups extra, the standard library parses everything
    orjson = None  # type: ignore[assignment, unused-ignore]  # typed only when installed

if TYPE_CHECKING:
    import cattrs

__all__ = [
    "JSON_BACKEND",
    "converter",
    "encode_request",
    "error_from_response",
    "invalid_response",
    "load_json",
    "parse_object",
    "parse_response",
    "parse_retry_after",
]

T = TypeVar("T")

_EXCERPT = 200

#: The JSON parser in use, chosen once at import: "orjson" when the ``speedups`` extra is
#: installed, else "json". Both accept and refuse the same bodies (see `load_json`).
JSON_BACKEND = "json" if orjson is None else "orjson"

# Every JSON value but the outermost comes right after a '[' (an array's first item), a
# '{' (an object's first key) or a ',' (any later one), and each key is such a value's
# twin; so a body with S of these bytes makes at most 2*S + 1 objects, whatever it holds
# (bytes inside strings only make S an overestimate). An images answer holds a few dozen:
# ten images of three or four keys, a comma in each data URI, and the commas of a revised
# prompt. 65536 leaves room for any of that and caps what a hostile body can make at about
# 130,000 small objects (under 10 MB, tens of ms). Counting is C-speed: about 1 ms for a
# 1.4 MB image, 0.2 s for the 100 MB of ten large ones.
MAX_JSON_STRUCTURE = 2**16
# An images answer nests three deep (answer, data, image); 32 leaves room for whatever an
# extra key holds, and stays far below where either parser gives up (json at about 1000
# minus the caller's stack depth with a RecursionError, orjson at 1024), so both refuse
# the same bodies, and nothing built from an answer is too deep to print or compare.
MAX_JSON_DEPTH = 32


def load_json(body: bytes, backend: str = JSON_BACKEND) -> Any:
    """The value of a UTF-8 JSON body (RFC 8259); the one JSON parser of the package.

    ``backend`` ("json" or "orjson") is for tests, which run both. They agree on every
    body: json is told to refuse what orjson refuses (NaN and Infinity, numbers beyond a
    double, lone surrogates) and to read an integer beyond 64 bits as a float, as orjson
    does; nesting beyond `MAX_JSON_DEPTH` is refused whichever parser noticed it first.

    Raises:
        ValueError: the body is not JSON, or holds more than an answer can; the message
            says which, readably.
    """
    structure = body.count(b"[") + body.count(b"{") + body.count(b",")
    if structure > MAX_JSON_STRUCTURE:
        raise ValueError(
            f"the body has {structure} of '[', '{{' and ',', more than the "
            f"{MAX_JSON_STRUCTURE} any answer needs; it was not parsed"
        )
    try:
        if backend == "orjson":
            value = orjson.loads(body)
        else:
            value = json.loads(
                body.decode("utf-8"),  # strictly: no BOM, no UTF-16, no encoded surrogates
                parse_int=_json_int,
                parse_float=_json_float,
                parse_constant=_json_constant,
            )
    except RecursionError:
        raise ValueError(_too_deep()) from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError and ours alike
        raise ValueError(f"the body is not JSON ({exc})") from exc
    _check_tree(value)
    return value


def _json_int(text: str) -> int | float:
    # orjson reads an integer beyond 64 bits as a float, as JavaScript does; reading it the
    # same way also keeps Python's limit on long int() conversions out of the way.
    if len(text) <= 20:
        number = int(text)
        if -(2**63) <= number < 2**64:
            return number
    return _json_float(text)


def _json_float(text: str) -> float:
    number = float(text)
    if math.isinf(number):
        raise ValueError(f"the number {text[:20]}... is beyond the range of a double")
    return number


def _json_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON value")


def _too_deep() -> str:
    return f"the body nests deeper than {MAX_JSON_DEPTH} levels"


def _check_tree(value: Any) -> None:
    """Refuse nesting beyond MAX_JSON_DEPTH, and strings that are not Unicode text.

    A level at a time, without recursion: at most 2*MAX_JSON_STRUCTURE + 1 nodes.
    """
    level, depth = [value], 0
    while level:
        depth += 1
        inner: list[Any] = []
        for node in level:
            kind = type(node)
            if kind is str:
                # json makes a str of an escaped lone surrogate; orjson refuses it.
                if not utf8_encodable(node):
                    raise ValueError(
                        "the body is not JSON (a \\u escape stands for a lone surrogate)"
                    )
            elif kind is dict or kind is list:
                if depth > MAX_JSON_DEPTH:
                    raise ValueError(_too_deep())
                inner += node  # a dict's keys, then its values
                if kind is dict:
                    inner += node.values()
        level = inner


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
    # except n and size, which the proxy requires.
    conv.register_unstructure_hook(
        ImageRequest,
        make_dict_unstructure_fn(
            ImageRequest,
            conv,
            _cattrs_omit_if_default=True,
            n=override(omit_if_default=False),
            size=override(omit_if_default=False),
        ),
    )

    image_fields = frozenset(f.name for f in attrs.fields(GeneratedImage)) - {"extra"}
    structure_image = make_dict_structure_fn(
        GeneratedImage, conv, extra=override(struct_hook=_passthrough)
    )

    # These hooks are the one place an answer is checked; each problem is named by its
    # path (data[0].url: expected a string ...).

    def structure_item(obj: Any, _: Any) -> GeneratedImage:
        if type(obj) is not dict:
            raise _Mismatch(f"expected an object, got {type(obj).__name__} {_short(obj)}")
        if obj.get("url") is None and obj.get("b64_json") is None:
            raise _Mismatch("the image has neither url nor b64_json")
        known = {k: v for k, v in obj.items() if k in image_fields}
        extra = {k: v for k, v in obj.items() if k not in image_fields}
        return structure_image({**known, "extra": extra}, GeneratedImage)

    def structure_images(obj: Any, _: Any) -> tuple[GeneratedImage, ...]:
        if type(obj) is not list:  # cattrs would take a string as a tuple of characters
            raise _Mismatch(f"expected a list, got {type(obj).__name__} {_short(obj)}")
        # A request asks for at most MAX_IMAGES; checked first, so that a hostile list
        # costs one error, not one per item.
        if len(obj) > MAX_IMAGES:
            raise _Mismatch(f"expected at most {MAX_IMAGES} images, got {len(obj)} items")
        # Every item is tried, and each failure is noted with its index so that
        # transform_error can name it as data[i].
        images, errors = [], []
        for index, item in enumerate(obj):
            try:
                images.append(structure_item(item, GeneratedImage))
            except Exception as exc:
                note = IterableValidationNote(f"data @ index {index}", index, GeneratedImage)
                exc.__notes__ = [*getattr(exc, "__notes__", []), note]  # type: ignore[attr-defined]
                errors.append(exc)
        if errors:
            raise IterableValidationError("While structuring data", errors, tuple)
        return tuple(images)

    structure_fields = make_dict_structure_fn(
        ImagesResponse,
        conv,
        data=override(struct_hook=structure_images),
        extra=override(struct_hook=_passthrough),
        headers=override(struct_hook=_passthrough),
    )

    conv.register_structure_hook(GeneratedImage, structure_item)
    conv.register_structure_hook(ImagesResponse, structure_fields)
    return conv


_RESPONSE_KEYS = frozenset({"created", "data"})


def encode_request(request: ImageRequest) -> bytes:
    """The JSON body for ``request``: the converter's dict of it, as compact UTF-8 JSON.

    ImageRequest has checked every value, lone surrogates included, so it always encodes.
    """
    body = converter().unstructure(request)
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def parse_response(
    status: int, headers: Mapping[str, str], body: bytes, url: object = None
) -> ImagesResponse:
    """Turn an HTTP answer into an `ImagesResponse`, or raise the error it stands for.

    Raises:
        APIStatusError: (a subclass of it) for any status that is not 2xx.
        ResponseValidationError: a 2xx whose body is not an images response.
    """
    if not 200 <= status < 300:
        raise error_from_response(status, headers, body, None if url is None else str(url))
    obj = _load_object(status, headers, body)
    fields = {key: obj[key] for key in _RESPONSE_KEYS if key in obj}
    extra = {key: value for key, value in obj.items() if key not in _RESPONSE_KEYS}
    try:
        return converter().structure(
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
    return body[:_EXCERPT].decode("utf-8", "replace")


def error_from_response(
    status: int, headers: Mapping[str, str], body: bytes, url: str | None = None
) -> APIStatusError:
    """The typed error for an error status; copes with JSON, plain-text, HTML and empty bodies."""
    text = body.decode("utf-8", "replace")
    code, message = _error_details(body, text)
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
        message=message,
        body=text,
        headers=headers,
        request_id=headers.get("x-request-id"),
        url=url,
        retry_after=parse_retry_after(headers),
    )


def _error_details(body: bytes, text: str) -> tuple[str | None, str]:
    stripped = text.strip()
    if not stripped:
        return None, "the server sent no error details (empty body)"
    if stripped[0] in "{[":
        try:
            obj = load_json(body)
        except ValueError:
            pass  # shown as text below
        else:
            found = _from_json(obj)
            if found is not None:
                return found
    if stripped[0] == "<":
        # A gateway's HTML page: its title says it best, else its visible text.
        return None, _fold(_unescape(_html_text(stripped))) or "(HTML page)"
    return None, _fold(stripped)


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


def _fold(text: str) -> str:
    """The start of ``text`` with each run of whitespace made one space, cut to _EXCERPT."""
    # _EXCERPT words already make more than _EXCERPT characters: the rest is never split.
    return " ".join(text.split(maxsplit=_EXCERPT)[:_EXCERPT])[:_EXCERPT]


def _unescape(text: str) -> str:
    try:
        return html.unescape(text)
    except ValueError:  # "&#" and more digits than int() converts: shown as it is
        return text


# An error page is summed up from its first 64 KiB: a gateway's page is a few KB, and the
# whole body stays in error.body. The scans below are linear without the cap; it keeps a
# 1 MiB page of tiny tags (a Python step each) well under 50 ms.
_HTML_SCAN = 2**16
_RAW_TEXT_ELEMENTS = (b"script", b"style")
_WORD_BYTES = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789_")


def _html_text(page: str) -> str:
    """A gateway page's title, or else its text without scripts, styles and tags.

    What the regexes ``<title[^>]*>(.*?)</title>``, ``<(script|style)\\b.*?</\\1\\s*>`` and
    ``<[^>]*>`` (case-insensitive) find, found with searches that each start where the one
    before ended, so in linear time: the regexes take quadratic time on a page of ``<``
    (15 minutes for 1 MiB), and html.parser does on pages of ``<a `` or ``<!--``.
    """
    page = page[:_HTML_SCAN]
    # One byte per character of page, ASCII letters lowercased: searches ignore case, and
    # their positions index page itself.
    lower = page.encode("ascii", "replace").lower()
    start = lower.find(b"<title")
    opened = lower.find(b">", start) if start >= 0 else -1
    closed = lower.find(b"</title>", opened) if opened >= 0 else -1
    if closed >= 0:
        return page[opened + 1 : closed]
    return _without_tags(_without_raw_text(page, lower))


def _without_raw_text(page: str, lower: bytes) -> str:
    """``page`` with each script and style element, from its tag to its end tag, made a space."""
    pieces: list[str] = []
    position = 0
    # For each element: where its next start tag is (-1: there is none), and where the
    # first end tag after the start tag last looked at starts and ends (-1: there is none;
    # (0, 0): not looked for yet).
    openings = {name: _start_tag(lower, name, 0) for name in _RAW_TEXT_ELEMENTS}
    closings = dict.fromkeys(_RAW_TEXT_ELEMENTS, (0, 0))
    while True:
        first: tuple[int, int] | None = None
        for name in _RAW_TEXT_ELEMENTS:
            opening = openings[name]
            if 0 <= opening < position:
                opening = openings[name] = _start_tag(lower, name, position)
            if opening < 0:
                continue
            after = opening + 1 + len(name)
            start, end = closings[name]
            if 0 <= start < after:
                start, end = closings[name] = _end_tag(lower, name, after)
            if start < 0:  # no end tag after this start tag, so after no later one either
                openings[name] = -1
            elif first is None or opening < first[0]:
                first = (opening, end)
        if first is None:
            break
        pieces += (page[position : first[0]], " ")
        position = first[1]
    pieces.append(page[position:])
    return "".join(pieces)


def _start_tag(lower: bytes, name: bytes, position: int) -> int:
    """Where the first ``<name`` that ends a word starts, from ``position``; -1 if none."""
    opener = b"<" + name
    while (start := lower.find(opener, position)) >= 0:
        after = start + len(opener)
        if after == len(lower) or lower[after] not in _WORD_BYTES:
            return start
        position = after
    return -1


def _end_tag(lower: bytes, name: bytes, position: int) -> tuple[int, int]:
    """Where the first ``</name>`` (whitespace allowed before '>') from ``position``
    starts and ends; (-1, -1) if there is none."""
    opener = b"</" + name
    while (start := lower.find(opener, position)) >= 0:
        gt = lower.find(b">", start)
        if gt < 0:
            break
        # Of the openers before this '>', only the last can have just whitespace after it.
        start = lower.rfind(opener, start, gt)
        rest = lower[start + len(opener) : gt]
        if not rest or rest.isspace():
            return start, gt + 1
        position = gt + 1
    return -1, -1


def _without_tags(text: str) -> str:
    """``text`` with each tag made a space; a '<' that no '>' follows is text."""
    pieces: list[str] = []
    position = 0
    while (start := text.find("<", position)) >= 0:
        end = text.find(">", start)
        if end < 0:
            break
        pieces += (text[position:start], " ")
        position = end + 1
    pieces.append(text[position:])
    return "".join(pieces)


# The longest wait a server can name, in seconds: RFC 9111 (section 1.2.2) has a cache
# treat a delta-seconds too large to count as 2**31, and so does this client.
_LONGEST_DELAY = float(2**31)


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After``, or None.

    ``Retry-After`` is delta-seconds, digits only, or an HTTP-date (RFC 9110, section
    10.2.3): not float()'s ``1e3``, ``inf``, ``1_000`` or `` 5 ``. ``retry-after-ms`` (an
    OpenAI convention) is digits with an optional fraction. No value is longer than 2**31 s.
    """
    millis = headers.get("retry-after-ms")
    if millis is not None:
        whole, dot, fraction = millis.partition(".")
        if _digits(whole) and (not dot or _digits(fraction)):
            return min(float(millis) / 1000, _LONGEST_DELAY)
    value = headers.get("retry-after")
    if value is None:
        return None
    if _digits(value):
        return min(float(value), _LONGEST_DELAY)  # float: no digit limit; too many is inf
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # an HTTP date is GMT even when it says -0000
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, when.timestamp() - time.time())


def _digits(text: str) -> bool:
    # isdigit() alone also takes '²' and Arabic-Indic digits.
    return text.isascii() and text.isdigit()
