"""The one JSON parser of the package, bounded: a hostile body cannot freeze or fill memory.

`load_json` parses with the standard library's ``json``, or ``orjson`` when the
``speedups`` extra is installed; both accept and refuse the same bodies. Before either
builds anything, the body's ``[``, ``{`` and ``,`` are counted, so a body that would become
more objects than any answer holds is refused in C-speed time; nesting deeper than any
answer needs is refused after parsing, a level at a time (docs/architecture.md, "Hostile
input is bounded").
"""

from __future__ import annotations

import json
import math
from typing import Any, NoReturn

from ._models import utf8_encodable

try:
    import orjson
except ImportError:  # without the speedups extra, the standard library parses everything
    orjson = None  # type: ignore[assignment, unused-ignore]  # typed only when installed

__all__ = ["JSON_BACKEND", "MAX_JSON_DEPTH", "MAX_JSON_STRUCTURE", "load_json"]

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
    if _structure_exceeds(body, MAX_JSON_STRUCTURE):
        raise ValueError(
            f"the body has more than the {MAX_JSON_STRUCTURE} of '[', '{{' and ',' that any "
            "answer needs; it was not parsed"
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


# The count goes a slice at a time: one pass of C per slice (bytes.translate deleting the
# three bytes; three bytes.count passes take twice as long), a copy of one slice at most,
# and a hostile body is refused as soon as it passes the cap.
_SLICE = 2**16


def _structure_exceeds(body: bytes, limit: int) -> bool:
    """Whether ``body`` holds more than ``limit`` of the bytes '[', '{' and ','."""
    seen = 0
    for start in range(0, len(body), _SLICE):
        part = body[start : start + _SLICE]
        seen += len(part) - len(part.translate(None, b"[{,"))
        if seen > limit:
            return True
    return False


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
