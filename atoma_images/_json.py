"""json.loads for answers that are mostly one long string: a base64 image.

An image answer is about 1.4 MB of base64 inside a few hundred bytes of JSON. The json
module reads a string one character at a time (to find its end and its escapes), which
was three quarters of the CPU a large call cost. `loads` cuts long strings that contain
no escape out of the body with memchr-speed searches, lets json.loads parse the few
hundred bytes left, and puts the strings back, each copied once, straight from the body.

The result is what ``json.loads(body)`` returns, with one leniency: a cut string is not
checked for raw control characters (json rejects them); an image's base64 is checked when
it is decoded. Anything unusual (a long string used as a key, a non-ASCII one, an
unterminated one, very many strings) falls back to json.loads of the whole body.
"""

from __future__ import annotations

import json
import os
from typing import Any

__all__ = ["loads"]

#: Strings at least this long are cut out; below it, json's own scanner is as fast.
LONG_STRING = 1 << 15
# Past this many strings, the Python-level boundary search costs more than it saves.
_MAX_STRINGS = 512
_BACKSLASH = 0x5C


def loads(body: bytes) -> Any:
    """``json.loads(body)`` for UTF-8 JSON, faster when it holds long plain strings.

    Raises ValueError (json's, or UnicodeDecodeError) for a body that is not JSON.
    """
    if len(body) >= LONG_STRING:
        cut = _cut_long_strings(body)
        if cut is not None:
            rest, strings, marker = cut
            try:
                obj = json.loads(rest)
            except ValueError:
                pass  # parsed again below, for an error message about the body itself
            else:
                # Every string must go back exactly once, as a value; if not (a long key,
                # say), the plain way decides.
                if _restore(obj, dict(enumerate(strings)), marker):
                    return obj
    return json.loads(body.decode())


def _cut_long_strings(body: bytes) -> tuple[str, list[str], str] | None:
    """The body with long plain strings replaced by placeholders, and those strings."""
    find = body.find
    view = memoryview(body)
    marker = f"\x00atoma-images-{os.urandom(8).hex()}-"  # the server cannot guess it
    parts: list[str] = []
    strings: list[str] = []
    copied = 0  # body[:copied] is in parts already
    position = 0
    for _ in range(_MAX_STRINGS):
        opening = find(b'"', position)
        if opening < 0:
            break
        closing = _closing_quote(body, opening)
        if closing < 0:
            return None  # unterminated: json.loads will say so
        position = closing + 1
        if closing - opening <= LONG_STRING or find(b"\\", opening, closing) >= 0:
            continue
        try:
            text = str(view[opening + 1 : closing], "ascii")  # the one copy
        except UnicodeDecodeError:
            return None
        parts.append(str(view[copied:opening], "utf-8"))
        parts.append(json.dumps(f"{marker}{len(strings)}"))
        strings.append(text)
        copied = position
    else:
        return None
    if not strings:
        return None
    parts.append(str(view[copied:], "utf-8"))
    return "".join(parts), strings, marker


def _closing_quote(body: bytes, opening: int) -> int:
    """The index of the quote that ends the string opened at ``opening``, or -1."""
    closing = opening
    while True:
        closing = body.find(b'"', closing + 1)
        if closing < 0:
            return -1
        backslashes = 0
        while body[closing - 1 - backslashes] == _BACKSLASH:
            backslashes += 1
        if backslashes % 2 == 0:  # \\" ends the string; \" does not
            return closing


def _restore(obj: Any, pending: dict[int, str], marker: str) -> bool:
    """Put each pending string back in place of its placeholder; True if all went back."""

    def walk(node: Any) -> bool:
        items = node.items() if type(node) is dict else enumerate(node)
        for key, value in items:
            if type(value) is str:
                if value.startswith(marker):
                    text = pending.pop(int(value[len(marker) :]), None)
                    if text is None:  # the same placeholder twice
                        return False
                    node[key] = text
            elif (type(value) is dict or type(value) is list) and not walk(value):
                return False
        return True

    return (type(obj) is dict or type(obj) is list) and walk(obj) and not pending
