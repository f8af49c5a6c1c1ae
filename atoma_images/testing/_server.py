"""FakeAtomaServer: the generations endpoint, the confidential node, the file server, the script."""

from __future__ import annotations

import asyncio
import base64
import collections
import hashlib
import json
import os
import time
import uuid
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Literal

import attrs
from aiohttp import web

from atoma_images import _confidential
from atoma_images._models import DEFAULT_MODEL
from atoma_images._portal import LoopThread

from ._png import make_png

__all__ = ["FakeAtomaServer", "RecordedRequest", "Reply"]

ImageFormat = Literal["data_uri", "b64_json", "url", "local_file"]
Fault = Literal["drop", "drop_mid_body", "stall", "drip"]
Tamper = Literal["ciphertext", "response_hash"]

GENERATIONS_PATH = "/v1/images/generations"
CONFIDENTIAL_PATH = "/v1/" + _confidential.PATH
LOCK_PATH = "/v1/" + _confidential.LOCK_PATH
_NODE_SMALL_ID = 7
# The fake refuses to draw more than this many pixels per image, to keep tests' memory sane.
MAX_PIXELS = 4096 * 4096
_MAX_FILES = 256

_ERROR_CODES = {
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


@attrs.frozen(kw_only=True)
class RecordedRequest:
    """One request the fake server received."""

    method: str
    path: str
    headers: Mapping[str, str]
    body: bytes
    #: (host, port) of the client's end of the connection: one value per TCP connection.
    peer: tuple[str, int] | None = None

    def json(self) -> Any:
        return json.loads(self.body)


@attrs.frozen(kw_only=True)
class Reply:
    """A scripted answer for one request.

    Attributes:
        status: the status to answer with.
        headers: headers to add.
        body: the body; None gives the normal images answer for 2xx and Atoma's error
            envelope for an error status. A dict or list is sent as JSON.
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


class FakeAtomaServer:
    """An aiohttp.web server on 127.0.0.1 that answers like Atoma's image API.

    Args:
        api_key: the only key accepted; None accepts any non-empty Bearer token.
        models: the models it has nodes for.
        image_format: how images come back when the request names no ``response_format``:
            ``"data_uri"`` (like Atoma's backend), ``"b64_json"`` (bare base64), ``"url"``
            (served by this server) or ``"local_file"`` (a node-local file name, like the
            real backend's ``image-generation-<uuid>.png``).
        latency: seconds every normal answer takes (a real image takes about ten).
        host: the address to listen on.
        port: the port; 0 picks a free one.
        confidential: also serve the confidential routes (needs the ``confidential`` extra).
        lock_ttl: seconds a node lock stays usable; a request on an expired (or already
            used) lock gets 425 ``UNAVAILABLE_STACK``, like Atoma's.
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        models: tuple[str, ...] = (DEFAULT_MODEL,),
        image_format: ImageFormat = "data_uri",
        latency: float = 0.0,
        host: str = "127.0.0.1",
        port: int = 0,
        confidential: bool = False,
        lock_ttl: float = 60.0,
    ) -> None:
        if confidential:
            _confidential.require("FakeAtomaServer(confidential=True)")
        self.confidential = confidential
        self.lock_ttl = lock_ttl
        # stack_small_id -> (compute units locked, expiry on the monotonic clock)
        self._locks: dict[int, tuple[int, float]] = {}
        self._stacks = 0
        self._node_key = _confidential.new_private_key() if confidential else None
        self.api_key = api_key
        self.models = models
        self.image_format = image_format
        self.latency = latency
        self.host = host
        self.port = port
        #: Every request received, in order.
        self.requests: list[RecordedRequest] = []
        #: The most generation requests that were being answered at the same time.
        self.peak_in_flight = 0
        self._in_flight = 0
        self._script: collections.deque[Reply] = collections.deque()
        self._files: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._runner: web.AppRunner | None = None
        self._thread: LoopThread | None = None

    # -- scripting and inspection ---------------------------------------------------------

    def enqueue(self, *replies: Reply, times: int = 1) -> None:
        """Answer the next requests with ``replies``, in order (each repeated ``times``)."""
        for reply in replies:
            self._script.extend([reply] * times)

    def reset(self) -> None:
        """Forget recorded requests and scripted replies."""
        self.requests.clear()
        self._script.clear()
        self.peak_in_flight = 0

    @property
    def posts(self) -> list[RecordedRequest]:
        """The generation requests received, confidential ones included."""
        return [
            r
            for r in self.requests
            if r.method == "POST" and r.path in (GENERATIONS_PATH, CONFIDENTIAL_PATH)
        ]

    @property
    def locks(self) -> list[RecordedRequest]:
        """The node lock requests received (``POST /v1/nodes/lock``)."""
        return [r for r in self.requests if r.path == LOCK_PATH]

    @property
    def node_public_key(self) -> bytes:
        """The node's raw X25519 public key (``confidential=True`` only)."""
        if self._node_key is None:
            raise RuntimeError("FakeAtomaServer(confidential=True) has a node key; this one not")
        return _confidential.public_key_bytes(self._node_key)

    @property
    def connections(self) -> int:
        """How many distinct TCP connections the recorded requests came over."""
        return len({r.peer for r in self.requests})

    @property
    def base_url(self) -> str:
        """The API root to give a client: ``http://127.0.0.1:<port>/v1``."""
        if self._runner is None:
            raise RuntimeError("the fake server is not running; use 'async with' or 'with'")
        return f"http://{self.host}:{self.port}/v1"

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_post(GENERATIONS_PATH, self._generations)
        app.router.add_get("/files/{name}", self._file)
        if self.confidential:
            app.router.add_post(LOCK_PATH, self._lock)
            app.router.add_post(CONFIDENTIAL_PATH, self._generations)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        await site.start()
        self.port = runner.addresses[0][1]
        self._runner = runner

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> FakeAtomaServer:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any
    ) -> None:
        await self.stop()

    def __enter__(self) -> FakeAtomaServer:
        self._thread = LoopThread("atoma-images-fake-server")
        self._thread.run(self.start())
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.run(self.stop())
            thread.stop()

    # -- handlers ------------------------------------------------------------------------

    async def _generations(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self._record(request, body)
        self._in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self._in_flight)
        try:
            if self._script:
                return await self._scripted(request, self._script.popleft(), body)
            if self.latency:
                await asyncio.sleep(self.latency)
            return self._normal_answer(request, body)
        finally:
            self._in_flight -= 1

    def _normal_answer(self, request: web.Request, raw: bytes) -> web.Response:
        if request.path == CONFIDENTIAL_PATH:
            return self._confidential_answer(request, raw)
        return self._answer(request, raw)

    def _record(self, request: web.Request, body: bytes) -> None:
        transport = request.transport
        self.requests.append(
            RecordedRequest(
                method=request.method,
                path=request.path,
                headers=dict(request.headers),
                body=body,
                peer=transport.get_extra_info("peername") if transport else None,
            )
        )

    def _answer(self, request: web.Request, raw: bytes) -> web.Response:
        # The order of checks is the proxy's: body first, key last.
        body = _json_object(request, raw)
        if isinstance(body, web.Response):
            return body
        model, n, size = body.get("model"), body.get("n"), body.get("size")
        if type(model) is not str:
            return _error(400, "Model field is required")
        if n is None:
            return _error(400, "N field is required")
        if type(n) is not int or n < 0:
            return _error(400, "Invalid n field")
        if size is None:
            return _error(400, "Size field is required")
        dims = _parse_size(size)
        if dims is None:
            return _error(400, "Invalid size format")
        if model not in self.models:
            return _error(400, f"No node found for model {model}")
        if not self._authorized(request):
            return _error(401, "Invalid or missing api key")
        prompt = body.get("prompt")
        if type(prompt) is not str:
            return _error(500, "Failed to generate image: missing prompt")
        width, height = dims
        if width * height > MAX_PIXELS or n > 10:
            return _error(400, f"fake server: at most 10 images of {MAX_PIXELS} pixels each")
        fmt = body.get("response_format") or self.image_format
        if fmt not in ("data_uri", "b64_json", "url", "local_file"):
            return _error(400, f"Invalid response_format {fmt!r}")
        data = [
            self._image(fmt, make_png(width, height, f"{prompt}#{i}"), prompt) for i in range(n)
        ]
        digest = hashlib.blake2b(json.dumps(data).encode(), digest_size=32).digest()
        answer = {
            "created": int(time.time()),
            "data": data,
            "signature": base64.b64encode(hashlib.sha256(digest).digest()).decode(),
            "response_hash": base64.b64encode(digest).decode(),
        }
        return web.json_response(answer)

    # -- the node side of confidential generation ------------------------------------------

    async def _lock(self, request: web.Request) -> web.Response:
        raw = await request.read()
        self._record(request, raw)
        try:
            body = json.loads(raw)
        except ValueError as exc:
            return _error(400, f"Failed to parse body as JSON: {exc}")
        model = body.get("model") if type(body) is dict else None
        units = body.get("max_num_tokens") if type(body) is dict else None
        if type(model) is not str:
            return _error(400, "Model field is required")
        if units is not None and (type(units) is not int or units < 0):
            return _error(400, "Invalid max_num_tokens field")
        if not self._authorized(request):
            return _error(401, "Invalid or missing api key")
        if model not in self.models:
            return _error(503, f"No node found for model {model} with confidential compute")
        self._stacks += 1
        self._locks[self._stacks] = (units or 0, time.monotonic() + self.lock_ttl)
        return web.json_response(
            {
                "public_key": _confidential.b64encode_text(self.node_public_key),
                "node_small_id": _NODE_SMALL_ID,
                "stack_small_id": self._stacks,
                "stack_entry_digest": None,
            }
        )

    def _confidential_answer(self, request: web.Request, raw: bytes) -> web.Response:
        body = _json_object(request, raw)
        if isinstance(body, web.Response):
            return body
        for name in _SEALED_FIELDS:
            if type(body.get(name)) is not str:
                return _error(400, f"{name} field is required (a base64 string)")
        stack, units = body.get("stack_small_id"), body.get("num_compute_units")
        if type(stack) is not int or type(units) is not int:
            return _error(400, "stack_small_id and num_compute_units must be integers")
        if not self._authorized(request):
            return _error(401, "Invalid or missing api key")
        locked, expires = self._locks.pop(stack, (None, 0.0))  # a lock serves one request
        if locked is None or time.monotonic() >= expires:
            return _error(425, f"No usable lock for stack {stack} (unknown, used or expired)")
        if units > locked:
            return _error(425, f"The lock covers {locked} compute units; {units} requested")
        decoded: dict[str, bytes] = {}
        for name in _SEALED_FIELDS:
            value = _confidential.b64decode_text(body[name])
            if value is None:
                return _error(400, f"{name} is not valid base64")
            decoded[name] = value
        if decoded["node_dh_public_key"] != self.node_public_key:
            return _error(400, "node_dh_public_key is not this node's key")
        node_key = self._node_key
        if node_key is None:  # not reached: the route exists only when confidential
            return _error(404, "this fake server is not confidential")
        try:
            secret = _confidential.shared_secret(node_key, decoded["client_dh_public_key"])
            key = _confidential.derive_key(secret, decoded["salt"])
            plaintext = _confidential.decrypt(key, decoded["nonce"], decoded["ciphertext"])
        except Exception:  # a bad key, nonce or tag: the node cannot read it
            return _error(400, "Failed to decrypt the request")
        if _confidential.body_hash(plaintext) != body["plaintext_body_hash"]:
            return _error(400, "plaintext_body_hash does not match the decrypted body")
        pixels = _pixels(plaintext)
        if pixels is not None and units != pixels:
            return _error(400, f"num_compute_units must be n*W*H = {pixels}, got {units}")
        answer = self._answer(request, plaintext)
        if answer.status != 200:
            return answer
        inner: bytes = answer.body  # type: ignore[assignment]
        nonce = os.urandom(_confidential.NONCE_BYTES)
        digest = _confidential.body_hash(inner)
        b64 = _confidential.b64encode_text
        return web.json_response(
            {
                "ciphertext": b64(_confidential.encrypt(key, nonce, inner)),
                "nonce": b64(nonce),
                "signature": b64(hashlib.sha256(digest.encode()).digest()),
                "response_hash": digest,
            }
        )

    def _image(self, fmt: str, png: bytes, prompt: str) -> dict[str, Any]:
        if fmt == "url":
            name = f"{uuid.uuid4().hex}.png"
            self._files[name] = png
            while len(self._files) > _MAX_FILES:
                self._files.popitem(last=False)
            return {"url": f"http://{self.host}:{self.port}/files/{name}", "revised_prompt": prompt}
        if fmt == "local_file":
            return {"url": f"image-generation-{uuid.uuid4()}.png", "b64_json": None}
        encoded = base64.b64encode(png).decode()
        if fmt == "data_uri":
            return {"url": None, "b64_json": "data:image/png;base64," + encoded}
        return {"b64_json": encoded, "revised_prompt": prompt}

    def _authorized(self, request: web.Request) -> bool:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme != "Bearer" or not token:
            return False
        return self.api_key is None or token == self.api_key

    async def _file(self, request: web.Request) -> web.Response:
        self._record(request, b"")
        png = self._files.get(request.match_info["name"])
        if png is None:
            return _error(404, "no such file")
        return web.Response(body=png, content_type="image/png")

    async def _scripted(self, request: web.Request, reply: Reply, raw: bytes) -> web.StreamResponse:
        if reply.fault != "stall" and reply.delay:
            await asyncio.sleep(reply.delay)
        if reply.fault == "drop":
            _drop(request)
            return web.Response()  # never reaches the client: the connection is gone
        payload = self._scripted_body(request, reply, raw)
        if reply.fault is None and not reply.chunked:
            response = web.Response(status=reply.status, body=payload, headers=reply.headers)
            if "Content-Type" not in reply.headers and payload[:1] in (b"{", b"["):
                response.content_type = "application/json"
            return response
        stream = web.StreamResponse(status=reply.status, headers=reply.headers)
        if reply.chunked:
            stream.enable_chunked_encoding()
        else:
            stream.content_length = len(payload)
        stream.content_type = "application/json"
        await stream.prepare(request)
        if reply.fault is None:  # chunked
            for start in range(0, len(payload), 2**16):
                await stream.write(payload[start : start + 2**16])
            await stream.write_eof()
        elif reply.fault == "drop_mid_body":
            await stream.write(payload[: len(payload) // 2])
            _drop(request)
        elif reply.fault == "stall":
            await asyncio.sleep(reply.delay)
            _drop(request)
        else:  # drip
            for index in range(len(payload)):
                await stream.write(payload[index : index + 1])
                await asyncio.sleep(reply.drip_interval)
            await stream.write_eof()
        return stream

    def _scripted_body(self, request: web.Request, reply: Reply, raw: bytes) -> bytes:
        body = reply.body
        if body is None:
            if 200 <= reply.status < 300:
                answer: bytes = self._normal_answer(request, raw).body  # type: ignore[assignment]
                return _tampered(answer, reply.tamper) if reply.tamper else answer
            code = _ERROR_CODES.get(reply.status, "ERROR")
            return json.dumps({"error": {"code": code, "message": f"fake {code}"}}).encode()
        if isinstance(body, (dict, list)):
            return json.dumps(body).encode()
        return body.encode() if isinstance(body, str) else body


_SEALED_FIELDS = (
    "ciphertext",
    "nonce",
    "salt",
    "client_dh_public_key",
    "node_dh_public_key",
    "plaintext_body_hash",
)


def _pixels(plaintext: bytes) -> int | None:
    """n*W*H of a request body, or None if it is not a valid request (the normal checks say why)."""
    try:
        body = json.loads(plaintext)
    except ValueError:
        return None
    if type(body) is not dict or type(body.get("n")) is not int:
        return None
    dims = _parse_size(body.get("size"))
    return None if dims is None else int(body["n"]) * dims[0] * dims[1]


def _tampered(answer: bytes, tamper: Tamper) -> bytes:
    sealed = json.loads(answer)
    if tamper == "ciphertext":
        data = bytearray(base64.b64decode(sealed["ciphertext"]))
        data[len(data) // 2] ^= 0x01
        sealed["ciphertext"] = _confidential.b64encode_text(bytes(data))
    else:
        sealed["response_hash"] = _confidential.body_hash(b"some other response")
    return json.dumps(sealed).encode()


def _json_object(request: web.Request, raw: bytes) -> dict[str, Any] | web.Response:
    """The request's JSON object, or the error the proxy answers for a body that is not one."""
    if request.content_type != "application/json":
        return web.Response(
            status=415, text="Expected request with `Content-Type: application/json`"
        )
    try:
        body = json.loads(raw)
    except ValueError as exc:
        return _error(400, f"Failed to parse body as JSON: {exc}")
    if type(body) is not dict:
        return _error(400, "Failed to parse body as JSON: expected an object")
    return body


def _drop(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.close()


def _error(status: int, message: str) -> web.Response:
    code = _ERROR_CODES.get(status, "ERROR")
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


def _parse_size(size: object) -> tuple[int, int] | None:
    if type(size) is not str:
        return None
    width, x, height = size.partition("x")
    if not x or not width.isdigit() or not height.isdigit() or not width.isascii():
        return None
    if not height.isascii() or int(width) == 0 or int(height) == 0:
        return None
    return int(width), int(height)
