"""What an error body says: its code and message, from JSON, plain text or a gateway's HTML.

`error_details` reads any body a server or a gateway in front of it sends with an error
status, in time linear in its size: JSON through the one bounded parser, HTML pages by
forward-only scans, never a backtracking regex (docs/architecture.md, "Hostile input is
bounded").
"""

from __future__ import annotations

import html
import json
from typing import Any

from ._bounded_json import load_json

__all__ = ["EXCERPT", "error_details"]

#: How much of a server's text an error message quotes.
EXCERPT = 200


def error_details(body: bytes, text: str) -> tuple[str | None, str, bool]:
    """(code, message, envelope) of an error body; ``text`` is the body decoded leniently.

    ``envelope``: the body is the API's own error envelope, an ``"error"`` object that carries
    a code: Atoma's ``{"error": {"code", "message"}}``, or OpenAI's ``{"error": {"message",
    "type", "param", "code"}}``, whose code may be null. Only that proves the service itself
    refused the request (`_errors.status_may_have_been_billed`); a gateway's page proves nothing.
    """
    stripped = text.strip()
    if not stripped:
        return None, "the server sent no error details (empty body)", False
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
        return None, _fold(_unescape(_html_text(stripped))) or "(HTML page)", False
    return None, _fold(stripped), False


def _from_json(obj: Any) -> tuple[str | None, str, bool] | None:
    if type(obj) is not dict:
        return None
    error = obj.get("error")
    if type(error) is dict:
        code = error.get("code")
        message = error.get("message")
        # OpenAI's envelope always has the key, null when it names no code, beside its type.
        openai = "code" in error and code is None and type(error.get("type")) is str
        return (
            code if type(code) is str else None,
            message if type(message) is str else json.dumps(error)[:EXCERPT],
            type(code) is str or openai,
        )
    for key in ("error", "message", "detail"):
        value = obj.get(key)
        if type(value) is str:
            return None, value, False
    return None


def _fold(text: str) -> str:
    """The start of ``text`` with each run of whitespace made one space, cut to EXCERPT."""
    # EXCERPT words already make more than EXCERPT characters: the rest is never split.
    return " ".join(text.split(maxsplit=EXCERPT)[:EXCERPT])[:EXCERPT]


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
