"""What an error body says: its code and message, from the API's JSON, or an excerpt of its text.

`error_details` reads any body a server or a gateway in front of it sends with an error
status, in time linear in its size: JSON through the one bounded parser, anything else
(a gateway's HTML page, plain text) as a short excerpt of its text, never parsed
(docs/architecture.md, "Hostile input is bounded").
"""

from __future__ import annotations

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
    return None, _excerpt(stripped), False


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


def _excerpt(text: str) -> str:
    """The start of ``text``, each run of whitespace made one space, cut to EXCERPT, with
    every character a terminal would not print (an escape sequence's ESC) made U+FFFD."""
    # EXCERPT words already make more than EXCERPT characters: the rest is never split.
    start = " ".join(text.split(maxsplit=EXCERPT)[:EXCERPT])[:EXCERPT]
    return "".join(c if c.isprintable() else "\ufffd" for c in start)
