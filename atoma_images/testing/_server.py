"""FakeAtomaServer: lifecycle, routes, recording, scripting and the normal answer."""

from __future__ import annotations

import asyncio
import base64
import collections
import hashlib
import json
import time
import uuid
from collections.abc import Mapping
from typing import Any

import attrs
from aiohttp import web

from atoma_images import _confidential
from atoma_images._dialect import Dialect, check_dialect
from atoma_images._models import DEFAULT_MODEL
from atoma_images._portal import LoopThread

from ._checks import json_object, openai_refusal, parse_size, proxy_size, refusal
from ._faults import Reply, send
from ._node import FakeConfidentialNode, lock_request, sealed_request
from ._png import make_png

__all__ = ["FakeAtomaServer", "RecordedRequest"]

GENERATIONS_PATH = "/v1/images/generations"
CONFIDENTIAL_PATH = "/v1/" + _confidential.PATH
LOCK_PATH = "/v1/" + _confidential.LOCK_PATH
# atoma-proxy src/server/handlers/models.rs (MODELS_PATH) and http_server.rs (HEALTH_PATH):
# the health check sits at the root, beside /v1.
MODELS_PATH = "/v1/models"
HEALTH_PATH = "/health"
# What models_list answers as every model's "created" and "owned_by" (it knows neither);
# OpenAI's reference shows the same timestamp, and "system" for its own models.
_MODEL_CREATED = 1_686_935_002
_OWNER = {"atoma": "atoma", "openai": "system"}
# The fake refuses to draw more than this many pixels per image, to keep tests' memory sane.
MAX_PIXELS = 4096 * 4096
_MAX_IMAGES = 10
# What the proxy answers when its node (and so the backend) failed: atoma-proxy
# src/server/handlers/mod.rs, handle_status_code_error (the backend's own message is lost).
_BACKEND_FAILED = "Inference service returned status code error 500 Internal Server Error"
# mistral.rs's ImageGenerationRequest (mistralrs-server/src/openai.rs, v0.3.1 to v0.9.2):
# the spellings of its response_format enum, and the size it draws when none is named.
_BACKEND_FORMATS = ("Url", "B64Json")
_BACKEND_DEFAULT_SIZE = {"width": 1280, "height": 720}
# Its FLUX pipeline rounds each side up to a multiple of this (diffusion_models/flux/sampling.rs).
_FLUX_STEP = 16
# The request keys OpenAI's images API knows; any other is a 400 unknown_parameter.
_OPENAI_KEYS = frozenset(
    {
        "model", "prompt", "n", "size", "quality", "response_format", "style", "user",
        "background", "moderation", "output_compression", "output_format", "partial_images",
        "stream",
    }
)  # fmt: skip
_OPENAI_MODELS = ("dall-e-2", "dall-e-3", "gpt-image-1", DEFAULT_MODEL)
# Images served by URL are kept for the last this many; older ones are forgotten.
_MAX_FILES = 256


@attrs.frozen(kw_only=True)
class RecordedRequest:
    """One request the fake server received."""

    method: str
    path: str
    headers: Mapping[str, str]
    body: bytes
    #: (host, port) of the client's end of the connection: one value per TCP connection.
    peer: tuple[str, int] | None = None
    #: When its body was read, on the server's `time.monotonic` clock.
    received: float = 0.0

    def json(self) -> Any:
        return json.loads(self.body)


@attrs.define(kw_only=True, eq=False)
class FakeAtomaServer:
    """An aiohttp.web server on 127.0.0.1 that answers like Atoma's deployed image API.

    By default it answers as Atoma's proxy, node and mistral.rs backend do together
    (docs/contract.md names the source of each behaviour): the proxy needs ``model``, ``n``
    and ``size`` and bills ``n * W * H``; the backend reads neither ``n`` nor ``size``, but
    draws one image at ``width`` x ``height`` (1280 x 720 without them, each side rounded up
    to a multiple of 16), takes only ``"Url"`` (the default: a node-local file name, no
    image) and ``"B64Json"`` (a data URI), and anything it cannot parse is a 500.
    ``dialect="openai"`` answers as OpenAI's images API: unknown keys are a 400
    ``unknown_parameter``, ``response_format`` is ``"url"`` (served here) or ``"b64_json"``
    (and refused for gpt-image models, which always answer base64), ``n`` images.

    It serves ``POST /v1/images/generations``, ``GET /files/<name>`` (the images of ``"url"``
    answers), ``GET /v1/models`` (with the key: every model of `models`) and, for Atoma,
    ``GET /health`` (no key: ``{"message": "ok"}``; OpenAI's API has none, so the
    ``"openai"`` dialect answers 404), and, with ``confidential=True``, ``POST /v1/nodes/lock`` and
    ``POST /v1/confidential/images/generations``, whose node part a `FakeConfidentialNode`
    plays. Every request is recorded in `requests`; `enqueue` scripts the answers to the
    next generation requests. It answers from a loop in a thread of its own, however it is
    started, so even a caller that blocks its own loop gets its answers.

    Attributes:
        api_key: the only key accepted; None accepts any non-empty Bearer token.
        models: the models it serves (for ``"openai"``, by default also ``dall-e-2``,
            ``dall-e-3`` and ``gpt-image-1``).
        dialect: ``"atoma"`` (the deployed service) or ``"openai"`` (OpenAI's images API).
        latency: seconds every normal answer takes (a real image takes about ten).
        host: the address to listen on.
        port: the port; 0 picks a free one.
        confidential: also play a confidential node (needs the ``confidential`` extra).
        lock_ttl: seconds a node lock stays usable; a request on an expired (or already
            used) lock gets 425 ``UNAVAILABLE_STACK``, like Atoma's.
    """

    api_key: str | None = attrs.field(default=None, repr=False)
    dialect: Dialect = attrs.field(default="atoma", validator=lambda _, __, v: check_dialect(v))
    models: tuple[str, ...] = attrs.field(
        default=attrs.Factory(
            lambda self: _OPENAI_MODELS if self.dialect == "openai" else (DEFAULT_MODEL,),
            takes_self=True,
        )
    )
    latency: float = 0.0
    host: str = "127.0.0.1"
    port: int = 0
    confidential: bool = False
    lock_ttl: float = 60.0
    #: Every request received, in order.
    requests: list[RecordedRequest] = attrs.field(init=False, factory=list, repr=False)
    #: The most generation requests that were being answered at the same time.
    peak_in_flight: int = attrs.field(init=False, default=0, repr=False)
    #: The compute units billed so far: ``n * W * H`` of every request it generated for,
    #: whether or not the client read the answer (the proxy bills a success regardless).
    billed_compute_units: int = attrs.field(init=False, default=0, repr=False)
    _node: FakeConfidentialNode | None = attrs.field(init=False, default=None, repr=False)
    _in_flight: int = attrs.field(init=False, default=0, repr=False)
    _script: collections.deque[Reply] = attrs.field(
        init=False, factory=collections.deque, repr=False
    )
    _files: collections.OrderedDict[str, bytes] = attrs.field(
        init=False, factory=collections.OrderedDict, repr=False
    )
    _runner: web.AppRunner | None = attrs.field(init=False, default=None, repr=False)
    _thread: LoopThread | None = attrs.field(init=False, default=None, repr=False)

    def __attrs_post_init__(self) -> None:
        if self.confidential:
            _confidential.require("FakeAtomaServer(confidential=True)")
            self._node = FakeConfidentialNode()

    # -- scripting and inspection ---------------------------------------------------------

    def enqueue(self, *replies: Reply, times: int = 1) -> None:
        """Answer the next requests with ``replies``, in order (each repeated ``times``)."""
        for reply in replies:
            self._script.extend([reply] * times)

    def reset(self) -> None:
        """Forget recorded requests, scripted replies and what was billed."""
        self.requests.clear()
        self._script.clear()
        self.peak_in_flight = 0
        self.billed_compute_units = 0

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
        return self._confidential_node().public_key

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

    # The server always answers from a loop in a thread of its own, however it is started,
    # so a caller that blocks its own loop (a synchronous client called in a notebook or an
    # async test) cannot keep it from answering. Its handlers run only on that thread: what
    # they record is appended there, and the counters are written there alone.

    def __enter__(self) -> FakeAtomaServer:
        thread = LoopThread("atoma-images-fake-server")
        try:
            thread.run(self._listen())
        except BaseException:
            thread.stop()
            raise
        self._thread = thread
        return self

    def __exit__(self, *exc_info: object) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.run(self._close())
            thread.stop()

    async def start(self) -> None:
        """Listen on ``host``:``port`` (a free port if 0, then ``port`` says which)."""
        await asyncio.to_thread(self.__enter__)

    async def stop(self) -> None:
        """Close the server and its connections. Safe to repeat."""
        await asyncio.to_thread(self.__exit__)

    async def __aenter__(self) -> FakeAtomaServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def _listen(self) -> None:
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_post(GENERATIONS_PATH, self._generations)
        app.router.add_get("/files/{name}", self._file)
        app.router.add_get(MODELS_PATH, self._models)
        if self.dialect == "atoma":  # OpenAI's API has no health check: a 404 there
            app.router.add_get(HEALTH_PATH, self._health)
        if self.confidential:
            app.router.add_post(LOCK_PATH, self._lock)
            app.router.add_post(CONFIDENTIAL_PATH, self._generations)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        await site.start()
        self.port = runner.addresses[0][1]
        self._runner = runner

    async def _close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            server = runner.server
            open_now = [] if server is None else [h.transport for h in server.connections]
            await runner.cleanup()
            # A connection closed with an answer still unsent (its client gone) would wait
            # for ever to send it: abort it. Its socket then closes a loop step later: let
            # those steps run before the thread's loop stops, or the socket leaks (and warns).
            # (and one accepted while it closed, from a client that gave up connecting)
            open_now += [] if server is None else [h.transport for h in server.connections]
            for transport in open_now:
                if transport is not None:
                    transport.abort()
            for _ in range(3):
                await asyncio.sleep(0)

    # -- handlers ------------------------------------------------------------------------

    async def _receive(self, request: web.Request) -> bytes:
        """Read the request's body and record the request."""
        body = await request.read()
        self.requests.append(_record(request, body))
        return body

    async def _generations(self, request: web.Request) -> web.StreamResponse:
        raw = await self._receive(request)
        # Unscripted, the answer is a plain Reply that takes the server's latency.
        reply = self._script.popleft() if self._script else Reply(delay=self.latency)
        self._in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self._in_flight)
        try:
            return await send(reply, request, lambda: self._normal_answer(request, raw))
        finally:
            self._in_flight -= 1

    def _normal_answer(self, request: web.Request, raw: bytes) -> bytes:
        if request.path != CONFIDENTIAL_PATH:
            return self._images(request, raw)
        sealed = sealed_request(json_object(request, raw))
        self._authorize(request)  # the proxy's check: after the body, before the lock
        node = self._confidential_node()
        plaintext, key = node.open(sealed)
        return node.seal(key, self._images(request, plaintext))

    def _images(self, request: web.Request, raw: bytes) -> bytes:
        """The JSON of the images answer to the request ``raw``; bills what it generates."""
        if self.dialect == "openai":
            return self._openai_images(request, raw)
        # The order of checks is the proxy's (atoma-proxy src/server/middleware.rs,
        # authenticate_middleware and authenticate_and_lock_compute_units;
        # handlers/image_generations.rs, RequestModelImageGenerations): the body is parsed
        # and model, n and size must be there, then the key, then the size is read and a
        # node is chosen for the model.
        body = json_object(request, raw)
        model, n, size = body.get("model"), body.get("n"), body.get("size")
        if type(model) is not str:
            raise refusal(web.HTTPBadRequest, "Model field is required")
        if type(n) is not int or n < 0:  # serde_json's as_u64
            raise refusal(web.HTTPBadRequest, "N field is required")
        if type(size) is not str:
            raise refusal(web.HTTPBadRequest, "Size field is required")
        self._authorize(request)
        dims = proxy_size(size)
        if dims is None:
            raise refusal(web.HTTPBadRequest, f"Invalid size format: {size}")
        if model not in self.models:
            raise refusal(web.HTTPBadRequest, f"No node found for model {model}")
        # The node forwards the body untouched; the backend (mistral.rs) parses it with
        # serde: what it cannot parse is its 422, which the node and the proxy turn into a
        # 500 without its message. It reads neither n nor size: one image, width x height.
        prompt, fmt = body.get("prompt"), body.get("response_format", "Url")
        width, height = (body.get(key, default) for key, default in _BACKEND_DEFAULT_SIZE.items())
        if type(prompt) is not str or fmt not in _BACKEND_FORMATS:
            raise refusal(web.HTTPInternalServerError, _BACKEND_FAILED)
        if not (_is_usize(width) and _is_usize(height)):
            raise refusal(web.HTTPInternalServerError, _BACKEND_FAILED)
        width, height = (-(-side // _FLUX_STEP) * _FLUX_STEP for side in (width, height))
        if not 0 < width * height <= MAX_PIXELS:
            raise refusal(web.HTTPBadRequest, f"fake server: at most {MAX_PIXELS} pixels per image")
        png = make_png(width, height, prompt)
        self.billed_compute_units += n * dims[0] * dims[1]  # the proxy bills n x size
        if fmt == "Url":  # saved in the backend's working directory; nothing serves it
            image = {"url": f"image-generation-{uuid.uuid4()}.png", "b64_json": None}
        else:
            image = {"url": None, "b64_json": "data:image/png;base64," + _b64(png)}
        return _signed_answer([image])

    def _openai_images(self, request: web.Request, raw: bytes) -> bytes:
        """OpenAI's images API: the key first, then every key of the body, n images."""
        self._authorize(request)
        body = json_object(request, raw)
        for key in body:
            if key not in _OPENAI_KEYS:
                raise openai_refusal(
                    web.HTTPBadRequest, f"Unknown parameter: '{key}'.", "unknown_parameter", key
                )
        model, prompt = body.get("model", "dall-e-2"), body.get("prompt")
        if type(prompt) is not str or not prompt:
            raise openai_refusal(
                web.HTTPBadRequest, "Missing required parameter: 'prompt'.", "missing", "prompt"
            )
        if model not in self.models:
            raise openai_refusal(
                web.HTTPNotFound, f"The model '{model}' does not exist.", "model_not_found"
            )
        n, dims = body.get("n", 1), parse_size(body.get("size", "1024x1024"))
        if type(n) is not int or not 1 <= n <= _MAX_IMAGES:
            raise openai_refusal(web.HTTPBadRequest, f"Invalid n: {n!r}.", "invalid_value", "n")
        if dims is None or dims[0] * dims[1] > MAX_PIXELS:
            raise openai_refusal(web.HTTPBadRequest, "Invalid size.", "invalid_value", "size")
        if model.startswith("gpt-image"):  # always base64; the field itself is refused
            if "response_format" in body:
                raise openai_refusal(
                    web.HTTPBadRequest,
                    "Unknown parameter: 'response_format'.",
                    "unknown_parameter",
                    "response_format",
                )
            fmt = "b64_json"
        else:
            fmt = body.get("response_format", "url")
            if fmt not in ("url", "b64_json"):
                raise openai_refusal(
                    web.HTTPBadRequest,
                    f"Invalid value: {fmt!r}. Supported values are: 'url' and 'b64_json'.",
                    "invalid_value",
                    "response_format",
                )
        width, height = dims
        self.billed_compute_units += n * width * height
        data = [self._openai_image(fmt, make_png(width, height, f"{prompt}#{i}"), prompt)
                for i in range(n)]  # fmt: skip
        return json.dumps({"created": int(time.time()), "data": data}).encode()

    def _openai_image(self, fmt: str, png: bytes, prompt: str) -> dict[str, Any]:
        if fmt == "b64_json":
            return {"b64_json": _b64(png), "revised_prompt": prompt}
        name = f"{uuid.uuid4().hex}.png"
        self._files[name] = png
        while len(self._files) > _MAX_FILES:
            self._files.popitem(last=False)
        return {"url": f"http://{self.host}:{self.port}/files/{name}", "revised_prompt": prompt}

    def _authorize(self, request: web.Request) -> None:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme != "Bearer" or not token or (self.api_key is not None and token != self.api_key):
            raise refusal(web.HTTPUnauthorized, "Invalid or missing api key")

    async def _lock(self, request: web.Request) -> web.Response:
        model, units = lock_request(json_object(request, await self._receive(request)))
        self._authorize(request)
        if model not in self.models:
            raise refusal(
                web.HTTPServiceUnavailable,
                f"No node found for model {model} with confidential compute",
            )
        return web.json_response(self._confidential_node().lock(units, ttl=self.lock_ttl))

    def _confidential_node(self) -> FakeConfidentialNode:
        if self._node is None:
            raise RuntimeError("FakeAtomaServer(confidential=True) has a node key; this one not")
        return self._node

    async def _models(self, request: web.Request) -> web.Response:
        """``GET /v1/models``: the key first (the proxy's ``check_auth``), then the list of
        every model it serves; nothing says which draw images."""
        await self._receive(request)
        self._authorize(request)
        owner = _OWNER[self.dialect]
        data = [
            {"id": model, "object": "model", "created": _MODEL_CREATED, "owned_by": owner}
            for model in self.models
        ]
        return web.json_response({"object": "list", "data": data})

    async def _health(self, request: web.Request) -> web.Response:
        """``GET /health``: no key needed, ``{"message": "ok"}``, as the proxy's handler."""
        await self._receive(request)
        return web.json_response({"message": "ok"})

    async def _file(self, request: web.Request) -> web.Response:
        await self._receive(request)
        png = self._files.get(request.match_info["name"])
        if png is None:
            raise refusal(web.HTTPNotFound, "no such file")
        return web.Response(body=png, content_type="image/png")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _is_usize(value: object) -> bool:
    """Whether serde would read ``value`` as a Rust ``usize``."""
    return type(value) is int and value >= 0


def _signed_answer(data: list[dict[str, Any]]) -> bytes:
    """The JSON of the images answer: ``data``, and the hash and signature a node adds."""
    digest = hashlib.blake2b(json.dumps(data).encode(), digest_size=32).digest()
    answer = {
        "created": int(time.time()),
        "data": data,
        "signature": base64.b64encode(hashlib.sha256(digest).digest()).decode(),
        "response_hash": base64.b64encode(digest).decode(),
    }
    return json.dumps(answer).encode()


def _record(request: web.Request, body: bytes) -> RecordedRequest:
    transport = request.transport
    return RecordedRequest(
        method=request.method,
        path=request.path,
        headers=dict(request.headers),
        body=body,
        peer=transport.get_extra_info("peername") if transport else None,
        received=time.monotonic(),
    )
