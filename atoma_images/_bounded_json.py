"""The one JSON parser of the package, bounded: a hostile body cannot freeze or fill memory.

`load_json` parses with the standard library's ``json``, or ``orjson`` when the
``speedups`` extra is installed, and checks what either made with the same code, so both
accept and refuse the same bodies. Before either builds anything, the body's ``[``, ``{``
and ``,`` are counted, so a body that would become more objects than any answer holds is
refused in C-speed time; nesting deeper than any answer needs is refused after parsing, a
level at a time (docs/architecture.md, "Hostile input is bounded").
"""

from __future__ import annotations

import json
import math
from typing import Any

from ._models import utf8_encodable

try:
    import orjson
except ImportError:  # without the speedups extra, the standard library parses everything
    orjson = None  # type: ignore[assignment, unused-ignore]  # typed only when installed

__all__ = ["JSON_BACKEND", "MAX_JSON_DEPTH", "MAX_JSON_STRUCTURE", "load_json"]

#: The JSON parser in use, chosen once at import: "orjson" when the ``speedups`` extra is
#: installed, else "json".
JSON_BACKEND = "json" if orjson is None else "orjson"

# Every JSON value but the outermost comes right after a '[' (an array's first item), a
# '{' (an object's first key) or a ',' (any later one), and each key is such a value's
# twin; so a body with S of these bytes makes at most 2*S + 1 objects, whatever it holds
# (bytes inside strings only make S an overestimate). An images answer holds a few dozen:
# ten images of three or four keys, a comma in each data URI, and the commas of a revised
# prompt. 65536 leaves room for any of that and caps what a hostile body can make at about
# 130,000 small objects (under 10 MB, tens of ms). Counting is C-speed and copies nothing:
# about 3 ms for a 1.4 MB image, 0.2 s for the 128 MiB a response may be at most.
MAX_JSON_STRUCTURE = 2**16
# An images answer nests three deep (answer, data, image); 32 leaves room for whatever an
# extra key holds, and stays far below where either parser gives up (json at about 1000
# minus the caller's stack depth with a RecursionError, orjson at 1024), and nothing built
# from an answer is too deep to print or compare.
MAX_JSON_DEPTH = 32

_TOO_DEEP = f"the body nests deeper than {MAX_JSON_DEPTH} levels"


def load_json(body: bytes, backend: str = JSON_BACKEND) -> Any:
    """The value of a UTF-8 JSON body (RFC 8259); the one JSON parser of the package.

    ``backend`` ("json" or "orjson") is for tests, which run both. What either parser
    accepts beyond RFC 8259 (json: NaN, Infinity, numbers beyond a double, lone surrogate
    escapes; either: nesting beyond `MAX_JSON_DEPTH`) is refused by the one check after
    parsing, and an integer beyond 64 bits is read as a float by both, as JavaScript does.

    Raises:
        ValueError: the body is not JSON, or holds more than an answer can; the message
            says which, readably.
    """
    if sum(body.count(byte) for byte in b"[{,") > MAX_JSON_STRUCTURE:
        raise ValueError(
            f"the body has more than the {MAX_JSON_STRUCTURE} of '[', '{{' and ',' that any "
            "answer needs; it was not parsed"
        )
    try:
        if backend == "orjson":
            value = orjson.loads(body)
        else:  # strictly UTF-8: no BOM, no UTF-16, no encoded surrogates
            value = json.loads(body.decode("utf-8"), parse_int=_json_int)
    except RecursionError:
        raise ValueError(_TOO_DEEP) from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError and int()'s alike
        raise ValueError(f"the body is not JSON ({exc})") from exc
    _check_tree(value)
    return value


def _json_int(text: str) -> int | float:
    # As orjson reads them: beyond 64 bits, a float (which also keeps Python's limit on
    # long int() conversions out of the way).
    number = int(text) if len(text) <= 20 else None
    return number if number is not None and -(2**63) <= number < 2**64 else float(text)


def _check_tree(value: Any) -> None:
    """Refuse what is not JSON (NaN, infinities, lone surrogates) and nesting beyond
    MAX_JSON_DEPTH. A level at a time, without recursion: at most 2*MAX_JSON_STRUCTURE + 1
    nodes."""
    level, depth = [value], 0
    while level:
        depth += 1
        inner: list[Any] = []
        for node in level:
            kind = type(node)
            if kind is float:
                if not math.isfinite(node):
                    raise ValueError(
                        "the body is not JSON (NaN, Infinity or a number beyond a double)"
                    )
            elif kind is str:
                if not utf8_encodable(node):
                    raise ValueError(
                        "the body is not JSON (a \\u escape stands for a lone surrogate)"
                    )
            elif kind is dict or kind is list:
                if depth > MAX_JSON_DEPTH:
                    raise ValueError(_TOO_DEEP)
                inner += node  # a dict's keys, then its values
                if kind is dict:
                    inner += node.values()
        level = inner
