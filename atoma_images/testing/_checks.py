"""How the fake says no: Atoma's error envelope, raised as aiohttp's HTTP exceptions.

Every refusal is ``raise refusal(web.HTTPBadRequest, "...")``: aiohttp turns the exception
into the answer, so a check is one line wherever it stands and no helper has to hand an
error response back up through its callers. The checks here are the proxy's, shared by
every endpoint that reads a JSON body.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

__all__ = [
    "ERROR_CODES",
    "HTTPTooEarly",
    "error_code",
    "error_envelope",
    "json_object",
    "openai_refusal",
    "parse_size",
    "proxy_size",
    "refusal",
]

#: The ``code`` of Atoma's error envelope, by status (docs/contract.md, "Errors").
ERROR_CODES = {
    400: "REQUEST_ERROR",
    401: "AUTH_ERROR",
    402: "BALANCE_ERROR",
    404: "NOT_FOUND",
    413: "PAYLOAD_TOO_LARGE",
    423: "LOCKED",
    425: "UNAVAILABLE_STACK",
    429: "TOO_MANY_REQUESTS",
    500: "INTERNAL_ERROR",
    503: "SERVICE_UNAVAILABLE",
}


class HTTPTooEarly(web.HTTPClientError):
    """425 Too Early: Atoma's answer when no lock is usable (aiohttp has no class for it)."""

    status_code = 425


def error_code(status: int) -> str:
    """The ``code`` Atoma's error envelope carries for ``status``."""
    return ERROR_CODES.get(status, "ERROR")


def error_envelope(status: int, message: str) -> str:
    """The JSON of Atoma's error body: ``{"error": {"code", "message"}}``."""
    return json.dumps({"error": {"code": error_code(status), "message": message}})


def refusal(kind: type[web.HTTPException], message: str) -> web.HTTPException:
    """The exception to raise to answer with status ``kind`` and Atoma's error envelope."""
    return kind(text=error_envelope(kind.status_code, message), content_type="application/json")


def openai_refusal(
    kind: type[web.HTTPException], message: str, code: str, param: str | None = None
) -> web.HTTPException:
    """The exception to raise to answer as OpenAI's API does: status ``kind`` and its
    envelope ``{"error": {"message", "type", "param", "code"}}``."""
    error = {"message": message, "type": "invalid_request_error", "param": param, "code": code}
    return kind(text=json.dumps({"error": error}), content_type="application/json")


def json_object(request: web.Request, raw: bytes) -> dict[str, Any]:
    """The request's body as a JSON object; raises what the proxy answers for anything else."""
    if request.content_type != "application/json":
        # The proxy's 415 is plain text, not the envelope.
        raise web.HTTPUnsupportedMediaType(
            text="Expected request with `Content-Type: application/json`"
        )
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise refusal(web.HTTPBadRequest, f"Failed to parse body as JSON: {exc}") from None
    if type(body) is not dict:
        raise refusal(web.HTTPBadRequest, "Failed to parse body as JSON: expected an object")
    return body


def parse_size(size: object) -> tuple[int, int] | None:
    """``(width, height)`` of a ``"WxH"`` size in plain ASCII digits, or None."""
    if type(size) is not str:
        return None
    width, x, height = size.partition("x")
    if not x or not width.isdigit() or not height.isdigit() or not width.isascii():
        return None
    if not height.isascii() or int(width) == 0 or int(height) == 0:
        return None
    return int(width), int(height)


def proxy_size(size: str) -> tuple[int, int] | None:
    """``(width, height)`` as Atoma's proxy reads a size, or None where it answers 400.

    It splits on ``x`` and keeps the parts Rust parses as a ``u64`` (digits, one optional
    ``+``), and needs exactly two (atoma-proxy src/server/handlers/image_generations.rs,
    ``get_compute_units_estimate``): so ``"0x8"`` and ``"16x8x"`` pass, ``"16X8"`` does not.
    """
    sides = [int(part) for part in size.split("x") if _is_u64(part)]
    return (sides[0], sides[1]) if len(sides) == 2 else None


def _is_u64(text: str) -> bool:
    digits = text.removeprefix("+")
    return digits.isascii() and digits.isdigit() and int(digits) < 2**64
