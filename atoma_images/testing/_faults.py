"""Scripted answers: a `Reply`, and the one function that sends it, faults included."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Mapping
from typing import Any, Literal

import attrs
from aiohttp import web

from ._checks import error_code, error_envelope
from ._node import Tamper, tampered

__all__ = ["Fault", "Reply", "send"]

Fault = Literal["drop", "drop_mid_body", "stall", "drip"]

# A chunked body goes out in pieces of this size, so a client sees several chunks.
_PIECE = 2**16


@attrs.frozen(kw_only=True)
class Reply:
    """A scripted answer for one request.

    Attributes:
        status: the status to answer with.
        headers: headers to add.
        body: the body; None gives the normal answer for 2xx (refused, like any answer, if
            the request is not valid) and Atoma's error envelope for an error status. A dict
            or list is sent as JSON. Without a ``Content-Type`` header, a body that starts
            like JSON is labelled ``application/json``.
        delay: seconds to wait before answering.
        fault: misbehave instead: ``"drop"`` closes the connection without answering,
            ``"drop_mid_body"`` sends the headers and half the body then closes,
            ``"stall"`` sends the headers then nothing for ``delay`` seconds,
            ``"drip"`` sends the body one byte every ``drip_interval`` seconds.
        drip_interval: seconds between bytes for ``"drip"``.
        chunked: send the body with chunked transfer encoding (no ``Content-Length``).
        tamper: for a confidential answer: ``"ciphertext"`` flips one bit of the encrypted
            body, ``"response_hash"`` sends the hash of another body.
    """

    status: int = 200
    headers: Mapping[str, str] = attrs.field(factory=dict)
    body: bytes | str | dict[str, Any] | list[Any] | None = None
    delay: float = 0.0
    fault: Fault | None = None
    drip_interval: float = 1.0
    chunked: bool = False
    tamper: Tamper | None = None


async def send(
    reply: Reply, request: web.Request, normal_answer: Callable[[], bytes]
) -> web.StreamResponse:
    """Answer ``request`` as ``reply`` says.

    ``normal_answer`` makes the body of the unscripted answer, raising aiohttp's HTTP
    exception for a request it refuses (which is then what is sent). It is called only for a
    2xx reply without a body of its own, so a scripted error neither uses up a node lock
    nor is overtaken by the request's own checks.
    """
    if reply.delay and reply.fault != "stall":
        await asyncio.sleep(reply.delay)
    if reply.fault == "drop":
        _drop(request)
        return web.Response()  # never reaches the client: the connection is gone
    payload = _payload(reply, normal_answer)
    response = web.StreamResponse(status=reply.status, headers=reply.headers)
    # response.headers ignores case, so a reply's own "content-type" is seen too.
    if "Content-Type" not in response.headers and payload[:1] in (b"{", b"["):
        response.content_type = "application/json"
    if reply.chunked:
        response.enable_chunked_encoding()
    else:
        response.content_length = len(payload)
    # A client that hung up (cancelled, timed out) has nobody left to answer.
    with contextlib.suppress(ConnectionResetError):
        await _write(reply, request, response, payload)
    return response


async def _write(
    reply: Reply, request: web.Request, response: web.StreamResponse, payload: bytes
) -> None:
    await response.prepare(request)
    if reply.fault == "drop_mid_body":
        await response.write(payload[: len(payload) // 2])
        _drop(request)
    elif reply.fault == "stall":
        await asyncio.sleep(reply.delay)
        _drop(request)
    else:
        piece = 1 if reply.fault == "drip" else _PIECE
        for start in range(0, len(payload), piece):
            await response.write(payload[start : start + piece])
            if reply.fault == "drip":
                await asyncio.sleep(reply.drip_interval)
        await response.write_eof()


def _payload(reply: Reply, normal_answer: Callable[[], bytes]) -> bytes:
    body = reply.body
    if body is None and 200 <= reply.status < 300:
        answer = normal_answer()
        return tampered(answer, reply.tamper) if reply.tamper else answer
    if body is None:
        return error_envelope(reply.status, f"fake {error_code(reply.status)}").encode()
    if isinstance(body, (dict, list)):
        return json.dumps(body).encode()
    return body.encode() if isinstance(body, str) else body


def _drop(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.close()
