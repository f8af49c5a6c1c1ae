"""The key stays secret, redirects do not carry it, and TLS is verified by default."""

from __future__ import annotations

import asyncio
import base64
import html
import json
import logging
import os
import ssl
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from urllib.parse import quote

import aiohttp
import pytest
import trustme
from aiohttp import web
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import atoma_images
from atoma_images import (
    APIConnectionError,
    APIStatusError,
    AsyncImagesClient,
    AtomaImagesError,
    AttemptFinished,
    AttemptStarted,
    CallFinished,
    Hooks,
    ImagesClient,
    ImagesResponse,
    InvalidRequestError,
    ResponseValidationError,
    RetryPolicy,
    RetryScheduled,
)
from atoma_images._transport import MAX_ERROR_BODY
from atoma_images.opentelemetry import OpenTelemetryHooks
from atoma_images.testing import FakeAtomaServer, Reply, make_png

from helpers import serving

SECRET = "sk-live-7f3a9c2e5b1d4e8f"
# The subprocess runs the copy of the package this test session imported.
PACKAGE_ROOT = str(Path(atoma_images.__file__).resolve().parent.parent)


def every_text_of(error: BaseException) -> list[str]:
    """str, repr and attributes of an error and of everything chained to it."""
    texts = []
    seen: set[int] = set()
    todo: list[BaseException | None] = [error]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        texts += [str(current), repr(current), repr(vars(current)), repr(current.args)]
        todo += [current.__cause__, current.__context__]
    return texts


async def test_key_appears_in_no_repr_error_chain_or_debug_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    for name in ("aiohttp", "aiohttp.client", "aiohttp.internal", "aiohttp.access", "atoma_images"):
        logging.getLogger(name).setLevel(logging.DEBUG)
    texts: list[str] = []
    async with FakeAtomaServer(api_key=SECRET) as server:
        policy = RetryPolicy(max_retries=1, backoff_base=0.001)
        async with AsyncImagesClient(SECRET, base_url=server.base_url, retries=policy) as images:
            texts += [repr(images), str(images)]
            await images.generate("a fox", size="16x16")
            for reply in (
                Reply(status=401),
                Reply(status=500),
                Reply(fault="drop"),
                Reply(status=200, body=b"x"),
            ):
                server.reset()
                server.enqueue(reply, times=2)
                with pytest.raises(AtomaImagesError) as info:
                    await images.generate("a fox", size="16x16")
                texts += every_text_of(info.value)
    with ImagesClient(SECRET, base_url="http://127.0.0.1:9/v1") as sync_images:
        texts += [repr(sync_images), str(sync_images)]
    texts += [record.getMessage() for record in caplog.records]
    texts += [repr(record.args) for record in caplog.records]
    assert len(texts) > 20
    assert not [text for text in texts if SECRET in text]


async def test_a_redirect_to_another_origin_gets_nothing() -> None:
    async with FakeAtomaServer() as elsewhere, FakeAtomaServer() as server:
        target = f"{elsewhere.base_url}/images/generations"
        server.enqueue(Reply(status=307, headers={"Location": target}))
        async with AsyncImagesClient(SECRET, base_url=server.base_url) as images:
            with pytest.raises(APIStatusError, match="redirected"):
                await images.generate("a fox", size="16x16")
        assert elsewhere.requests == []  # neither the key nor the paid request went there


@pytest.fixture(scope="module")
def authority() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def https_server(authority: trustme.CA) -> AsyncIterator[str]:
    """The fake server's behaviour behind TLS with a certificate from a private CA."""
    fake = FakeAtomaServer()
    await fake.start()
    upstream = fake.base_url

    async def forward(request: web.Request) -> web.Response:
        import aiohttp

        async with (
            aiohttp.ClientSession() as session,
            session.post(
                upstream + "/images/generations", data=await request.read(), headers=request.headers
            ) as answer,
        ):
            return web.Response(
                status=answer.status, body=await answer.read(), content_type="application/json"
            )

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(context)
    app = web.Application()
    app.router.add_post("/v1/images/generations", forward)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    yield f"https://127.0.0.1:{runner.addresses[0][1]}/v1"
    await runner.cleanup()
    await fake.stop()


async def test_tls_is_verified_by_default(https_server: str) -> None:
    async with AsyncImagesClient(SECRET, base_url=https_server) as images:
        with pytest.raises(APIConnectionError, match="certificate") as info:
            await images.generate("a fox", size="16x16")
    assert info.value.attempts == 1  # a bad certificate is not worth retrying
    assert not info.value.may_have_been_billed


async def test_a_custom_ssl_context_or_ssl_false_can_be_passed(
    https_server: str, authority: trustme.CA
) -> None:
    trusting = ssl.create_default_context()
    authority.configure_trust(trusting)
    async with AsyncImagesClient(SECRET, base_url=https_server, ssl=trusting) as images:
        assert (await images.generate("a fox", size="16x16")).images
    async with AsyncImagesClient(SECRET, base_url=https_server, ssl=False) as images:
        assert (await asyncio.wait_for(images.generate("a fox", size="16x16"), 10)).images


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n",  # a header aiohttp cannot read
        b"HTTP/1.1 2OO OK\r\n\r\n",  # not a status line
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",  # a broken chunk
    ],
)
async def test_key_is_in_no_exception_chain_of_a_malformed_answer(answer: bytes) -> None:
    # aiohttp's ClientResponseError keeps the request's headers (so the key) in request_info.
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with AsyncImagesClient(
        SECRET, base_url=f"http://127.0.0.1:{port}/v1", retries=RetryPolicy(max_retries=0)
    ) as images:
        with pytest.raises(AtomaImagesError) as info:
            await images.generate("a fox", size="16x16")
    server.close()
    await server.wait_closed()
    chain = every_text_of(info.value)
    assert len(chain) >= 8  # the cause is kept, for diagnosis
    assert not [text for text in chain if SECRET in text]


def recording_app(
    seen: list[tuple[str, dict[str, str]]], **routes: Callable[[], web.StreamResponse]
) -> web.Application:
    """An app that records each GET and answers /<name> with a fresh routes[name]()."""

    async def answer(request: web.Request) -> web.StreamResponse:
        seen.append((request.path, dict(request.headers)))
        return routes[request.match_info["name"]]()

    app = web.Application()
    app.router.add_get("/{name}", answer)
    return app


async def test_download_sends_nothing_of_the_users_to_another_origin() -> None:
    png = b"\x89PNG\r\n\x1a\nrest"
    seen_here: list[tuple[str, dict[str, str]]] = []
    seen_there: list[tuple[str, dict[str, str]]] = []
    there_app = recording_app(seen_there, img=lambda: web.Response(body=png))
    async with serving(there_app) as there:
        here_app = recording_app(
            seen_here,
            img=lambda: web.Response(body=png),
            away=lambda: web.Response(status=302, headers={"Location": f"{there}/img"}),
        )
        async with (
            serving(here_app) as here,
            AsyncImagesClient(
                SECRET, base_url=f"{here}/v1", headers={"X-Gateway-Token": "gw-secret"}
            ) as images,
        ):
            assert await images.download(f"{here}/img") == png  # our own origin: all of it
            assert await images.download(f"{there}/img") == png  # another: nothing of ours
            assert await images.download(f"{here}/away") == png  # redirected to another
    assert seen_here[0][1]["X-Gateway-Token"] == "gw-secret"
    assert SECRET in seen_here[0][1]["Authorization"]
    assert len(seen_there) == 2
    for _, headers in seen_there:
        ours = {k.lower() for k in headers} - {"host", "accept-encoding", "connection"}
        assert ours <= {"user-agent", "accept"}, headers


@pytest.mark.parametrize("location", ["file:///etc/passwd", "ftp://127.0.0.1/x.png", "data:,x"])
async def test_download_refuses_a_redirect_that_is_not_http_at_once(location: str) -> None:
    seen: list[tuple[str, dict[str, str]]] = []
    app = recording_app(seen, img=lambda: web.Response(status=302, headers={"Location": location}))
    async with serving(app) as root, AsyncImagesClient(SECRET, base_url=f"{root}/v1") as images:
        with pytest.raises(APIStatusError, match="not an http") as info:
            await images.download(f"{root}/img")
    assert len(seen) == 1  # typed, and not retried
    assert info.value.status == 302


async def test_download_redirect_loops_are_cut_short() -> None:
    seen: list[tuple[str, dict[str, str]]] = []
    app = recording_app(seen)

    async def next_hop(request: web.Request) -> web.Response:
        seen.append((request.path, dict(request.headers)))
        hop = int(request.match_info["n"]) + 1
        return web.Response(status=302, headers={"Location": f"/loop/{hop}"})

    app.router.add_get("/loop/{n}", next_hop)
    async with serving(app) as root, AsyncImagesClient(SECRET, base_url=f"{root}/v1") as images:
        with pytest.raises(APIStatusError, match="redirects") as info:
            await images.download(f"{root}/loop/0")
    assert len(seen) <= 6  # the first GET and at most five redirects, once
    assert info.value.attempts == 1


@pytest.mark.parametrize("own_session", [True, False], ids=["own session", "session passed in"])
async def test_a_proxy_password_is_in_no_exception_chain(
    monkeypatch: pytest.MonkeyPatch, own_session: bool
) -> None:
    # aiohttp's connector errors keep the connection key, which holds the proxy's credentials
    # when a session passed in reads them from the environment (trust_env=True).
    password = "pr0xy-S3CRET"

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")  # the CONNECT
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n" + b"not TLS\r\n" * 20)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(proxy, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    monkeypatch.setenv("HTTPS_PROXY", f"http://user:{password}@127.0.0.1:{port}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    session = None if own_session else aiohttp.ClientSession(trust_env=True)
    async with AsyncImagesClient(
        SECRET,
        base_url="https://127.0.0.1:9/v1",
        retries=RetryPolicy(max_retries=0),
        session=session,
    ) as images:
        texts = [repr(images._transport), repr(images._transport.api_proxy)]
        with pytest.raises(AtomaImagesError) as info:
            await asyncio.wait_for(images.generate("a fox", size="16x16"), 10)
    if session is not None:
        await session.close()
    server.close()
    await server.wait_closed()
    texts += every_text_of(info.value)
    texts += [repr(getattr(e, "args", ())) for e in (info.value.__cause__,) if e is not None]
    assert info.value.__cause__ is not None  # the cause is kept, for diagnosis
    assert not [text for text in texts if password in text or SECRET in text]


@pytest.mark.parametrize(
    "base_url",
    [
        "https://alice:hunter2@api.example/v1",  # credentials alone
        "ftp://alice:hunter2@api.example/v1",  # and a scheme that is not http(s)
        "alice:hunter2@api.example/v1",  # and no scheme
        "http://alice:hunter2@api.example:99999/v1",  # and a port out of range
        "http://alice:hunter2@/v1",  # and no host
        "https://alice:hun/ter2+hunter2@api.example/v1",  # a password with '/' (base64)
        "https://alice:x@y/hunter2@api.example/v1",  # and with '@'
        "https://api.example/v1?api_key=hunter2",  # a key in the query
    ],
)
def test_a_base_url_password_is_in_no_error_whatever_else_is_wrong(
    base_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for given, environment in ((base_url, None), (None, base_url)):
        if environment is not None:
            monkeypatch.setenv("ATOMA_BASE_URL", environment)
        with pytest.raises(InvalidRequestError) as info:
            AsyncImagesClient(SECRET, base_url=given)
        texts = every_text_of(info.value)
        assert "api.example" in str(info.value) or "/v1" in str(info.value)  # still useful
        assert not [text for text in texts if "hunter2" in text or SECRET in text]


@pytest.mark.parametrize("value", ["gw-SECRET-token\n", "gw-SECRET-token\r\nX-Evil: 1", "\x00"])
def test_a_refused_header_value_is_described_not_shown(value: str) -> None:
    # A custom header is often a gateway's token, read from a file with its newline.
    with pytest.raises(InvalidRequestError) as info:
        AsyncImagesClient(SECRET, headers={"X-Gateway-Token": value})
    assert "X-Gateway-Token" in str(info.value)
    assert "control character" in str(info.value)
    assert not [text for text in every_text_of(info.value) if value in text]


def test_headers_that_are_not_a_mapping_are_named_by_type_not_shown() -> None:
    with pytest.raises(InvalidRequestError) as info:
        AsyncImagesClient(SECRET, headers=[("X-Gateway-Token", "gw-SECRET-token")])  # type: ignore[arg-type]
    assert "got 'list'" in str(info.value)
    assert not [text for text in every_text_of(info.value) if "gw-SECRET" in text]


# A key with the characters a JSON writer may escape ("/" as "\/") and a URL percent-encodes.
ODD_SECRET = "sk-live/7f3a+9c2e5b1d4e8f"


def echoing_app() -> web.Application:
    """A server (or a gateway) that echoes the caller's key wherever it can.

    Routes under ``/<mode>/``: ``refused`` (an error status with the key in its message),
    ``moved`` (a redirect to a URL carrying it), ``garbled`` (a 200 that is not an images
    response, holding it), ``fine`` (a good answer holding it in an unknown key), ``ftp`` (a
    download redirected to a non-http URL carrying it). Every answer also has the key in
    ``x-request-id``, in another header's value and in a header's name. JSON is written with
    ``/`` escaped (as PHP does), a URL with the key percent-encoded.
    """

    async def answer(request: web.Request) -> web.Response:
        token = request.headers.get("Authorization", "Bearer -")
        key = token.removeprefix("Bearer ")
        headers = {
            "x-request-id": f"req-{key}",
            "X-Echo-Authorization": token,
            f"X-Seen-{quote(key, safe='')}": "1",
        }
        mode = request.match_info["mode"]
        body: object
        if mode == "refused":
            status = 401 if request.method == "POST" else 403
            body = {"error": {"code": "UNAUTHORIZED", "message": f"Invalid API key: {key}"}}
        elif mode == "moved":
            status = 307 if request.method == "POST" else 302
            headers["Location"] = f"/refused/img?key={quote(key, safe='')}&raw={key}"
        elif mode == "ftp":
            status, body = 302, {}
            headers["Location"] = f"ftp://127.0.0.1/{key}"
        elif mode == "garbled":
            status, body = 200, {"created": 1, "data": f"no images for {token}"}
        else:
            image = {"b64_json": base64.b64encode(make_png(8, 8)).decode(), "echo": key}
            status, body = 200, {"created": 1, "data": [image], "auth": token}
        text = json.dumps(body if mode != "moved" else {}).replace("/", "\\/")
        return web.Response(status=status, text=text, headers=headers)

    app = web.Application()
    app.router.add_route("*", "/{mode}/v1/images/generations", answer)
    app.router.add_get("/{mode}/img", answer)
    return app


class RecordingHooks(Hooks):
    def __init__(self) -> None:
        self.seen: list[object] = []

    def attempt_started(self, info: AttemptStarted) -> None:
        self.seen.append(info)

    def attempt_finished(self, info: AttemptFinished) -> None:
        self.seen.append(info)

    def retry_scheduled(self, info: RetryScheduled) -> None:
        self.seen.append(info)

    def call_finished(self, info: CallFinished) -> None:
        self.seen.append(info)


def texts_of_response(response: ImagesResponse) -> list[str]:
    return [
        repr(response),
        repr(response.extra),
        repr(response.request_id),
        repr(list(response.headers.items())),
        *(repr(image.extra) for image in response.images),
    ]


@pytest.mark.parametrize("key", [SECRET, ODD_SECRET])
async def test_a_key_the_server_echoes_is_in_nothing_the_client_keeps_or_shows(
    key: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    hooks = RecordingHooks()
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    texts: list[str] = []
    errors: list[AtomaImagesError] = []
    async with serving(echoing_app()) as root:
        for mode in ("refused", "moved", "garbled", "fine"):
            async with AsyncImagesClient(
                key,
                base_url=f"{root}/{mode}/v1",
                retries=RetryPolicy(max_retries=0),
                hooks=[hooks, OpenTelemetryHooks(tracer_provider=provider)],
            ) as images:
                if mode == "fine":
                    response = await images.generate("a fox", size="16x16")
                    texts += texts_of_response(response)
                    assert response.request_id == "req-[redacted]"
                    assert response.extra["auth"] == "Bearer [redacted]"
                    continue
                with pytest.raises(AtomaImagesError) as info:
                    await images.generate("a fox", size="16x16")
                errors.append(info.value)
        async with AsyncImagesClient(
            key, base_url=f"{root}/fine/v1", retries=RetryPolicy(max_retries=0), hooks=[hooks]
        ) as images:
            for path in ("refused/img", "moved/img", "ftp/img"):
                with pytest.raises(AtomaImagesError) as info:
                    await images.download(f"{root}/{path}")
                errors.append(info.value)
    provider.shutdown()
    for error in errors:
        texts += every_text_of(error)
        texts += [repr(getattr(error, name, None)) for name in ("body", "body_excerpt")]
        texts += [repr(list(getattr(error, "headers", {}).items()))]
    texts += [repr(info) for info in hooks.seen]
    texts += [span.to_json() for span in exporter.get_finished_spans()]
    texts += [record.getMessage() for record in caplog.records]
    # What the server said is kept, with the key replaced.
    refused, moved, garbled = errors[:3]
    assert isinstance(refused, APIStatusError)
    assert refused.message == "Invalid API key: [redacted]"
    assert refused.request_id == "req-[redacted]"
    assert refused.headers["X-Echo-Authorization"] == "Bearer [redacted]"
    assert "X-Seen-[redacted]" in refused.headers
    assert isinstance(moved, APIStatusError)
    assert "[redacted]" in moved.headers["Location"]
    assert isinstance(garbled, ResponseValidationError)
    assert "Bearer [redacted]" in garbled.body_excerpt
    assert [info.request_id for info in hooks.seen if isinstance(info, CallFinished)] == [
        "req-[redacted]"
    ] * 7
    assert len(texts) > 60
    forms = {key, quote(key, safe=""), key.replace("/", "\\/")}
    assert not [text for text in texts if any(form in text for form in forms)]


async def test_the_command_line_shows_no_key_the_server_echoes(tmp_path: Path) -> None:
    outputs: list[str] = []
    async with serving(echoing_app()) as root:
        for mode in ("refused", "moved", "garbled"):
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "atoma_images",
                "a fox",
                "--size",
                "16x16",
                "--json",
                "--debug",
                "--base-url",
                f"{root}/{mode}/v1",
                cwd=tmp_path,
                env={**os.environ, "ATOMA_API_KEY": ODD_SECRET, "PYTHONPATH": PACKAGE_ROOT},
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(process.communicate(), 120)
            assert process.returncode != 0
            record = json.loads(out)
            assert "[redacted]" in record["error"]["message"]
            outputs += [out.decode(), err.decode()]
    assert "[redacted]" in outputs[1]
    forms = (ODD_SECRET, quote(ODD_SECRET, safe=""), ODD_SECRET.replace("/", "\\/"))
    assert not [text for text in outputs if any(form in text for form in forms)]


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: %s\r\n\r\n",
        b"HTTP/1.1 2OO %s\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Echo\x01%s: 1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%s\r\n",
    ],
)
async def test_a_key_echoed_in_a_malformed_answer_is_in_no_error_or_cause(answer: bytes) -> None:
    # aiohttp's parser quotes the line it could not read, in its error's message.
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer % SECRET.encode())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with AsyncImagesClient(
        SECRET, base_url=f"http://127.0.0.1:{port}/v1", retries=RetryPolicy(max_retries=0)
    ) as images:
        with pytest.raises(AtomaImagesError) as info:
            await images.generate("a fox", size="16x16")
    server.close()
    await server.wait_closed()
    chain = every_text_of(info.value)
    assert "[redacted]" in str(info.value)  # what aiohttp read is still shown, without the key
    assert info.value.__cause__ is not None
    assert not [text for text in chain if SECRET in text]


@pytest.mark.parametrize(
    ("no_proxy", "through_proxy"),
    [
        ("127.0.0.1:{port}", False),  # host:port, as urllib and requests read it
        ("example.com, 127.0.0.1:{port}", False),  # among others, with spaces
        ("127.0.0.1", False),  # the host (an IP) alone: any port
        ("*", False),
        ("127.0.0.1:{other}", True),  # another port of the same host
        ("", True),
    ],
)
async def test_no_proxy_with_a_port_keeps_the_key_off_the_proxy(
    monkeypatch: pytest.MonkeyPatch, no_proxy: str, through_proxy: bool
) -> None:
    received: list[bytes] = []

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await reader.readuntil(b"\r\n\r\n"))  # counts what it was sent
        writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    proxy_server = await asyncio.start_server(proxy, "127.0.0.1", 0)
    proxy_port = proxy_server.sockets[0].getsockname()[1]
    async with FakeAtomaServer(api_key=SECRET) as server:
        port = int(server.base_url.split(":")[2].split("/")[0])
        for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "ALL_PROXY"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy_port}")
        monkeypatch.setenv("NO_PROXY", no_proxy.format(port=port, other=port + 1))
        async with AsyncImagesClient(
            SECRET, base_url=server.base_url, retries=RetryPolicy(max_retries=0)
        ) as images:
            if through_proxy:
                with pytest.raises(APIStatusError):
                    await images.generate("a fox", size="16x16")
            else:
                await images.generate("a fox", size="16x16")
                with pytest.raises(APIStatusError, match="404"):  # a download: direct too
                    await images.download(f"{server.base_url.removesuffix('/v1')}/missing")
    proxy_server.close()
    await proxy_server.wait_closed()
    assert len(received) == through_proxy
    assert len(server.posts) == (not through_proxy)


@pytest.mark.parametrize(
    "spelled",
    [
        lambda key: (
            '{"error": {"code": "AUTH_ERROR", "message": "Invalid: '
            + "".join(f"\\u{ord(c):04x}" for c in key)
            + '"}}'
        ),
        lambda key: "<html><title>bad key " + "".join(f"&#{ord(c)};" for c in key) + "</title>",
    ],
    ids=["json-escapes", "html-references"],
)
async def test_a_key_spelled_with_escapes_is_taken_out_too(
    spelled: Callable[[str], str],
) -> None:
    key = "sk-test-0123456789abcdefghijklmnopqrstuvwx"

    async def echo(request: web.Request) -> web.Response:
        await request.read()
        body = spelled(key)
        kind = "application/json" if body.startswith("{") else "text/html"
        return web.Response(status=401, text=body, content_type=kind)

    app = web.Application()
    app.router.add_post("/v1/images/generations", echo)
    async with serving(app) as root, AsyncImagesClient(key, base_url=f"{root}/v1") as client:
        with pytest.raises(AtomaImagesError) as caught:
            await client.generate("fox", size="16x16")
    error = caught.value
    shown = f"{error} {error!r} {vars(error)!r}"
    assert key not in shown
    assert key not in html.unescape(shown)


async def test_a_key_cut_in_two_by_the_error_bodys_cap_leaves_no_part_behind() -> None:
    key = "sk-test-0123456789abcdefghijklmnopqrstuvwx"

    async def echo(request: web.Request) -> web.Response:
        await request.read()
        body = b"x" * (MAX_ERROR_BODY - 20) + key.encode() + b"y" * 100
        return web.Response(status=500, body=body, content_type="text/plain")

    app = web.Application()
    app.router.add_post("/v1/images/generations", echo)
    async with (
        serving(app) as root,
        AsyncImagesClient(key, base_url=f"{root}/v1", retries=RetryPolicy(max_retries=0)) as client,
    ):
        with pytest.raises(AtomaImagesError) as caught:
            await client.generate("fox", size="16x16")
    assert key[:20] not in f"{caught.value} {vars(caught.value)!r}"
