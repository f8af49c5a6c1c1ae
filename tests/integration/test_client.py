from __future__ import annotations

import asyncio
import gc
import logging
import re
from typing import Any

import aiohttp
import pytest

from atoma_images import (
    AmbiguousOutcomeError,
    APIConnectionError,
    APIStatusError,
    AsyncImagesClient,
    AuthenticationError,
    BadGatewayError,
    BadRequestError,
    Budget,
    BudgetExceededError,
    ImagesResponse,
    InsufficientBalanceError,
    InternalServerError,
    InvalidRequestError,
    LockedError,
    NoImageError,
    NotFoundError,
    RateLimitError,
    ResponseValidationError,
    RetryPolicy,
    ServiceUnavailableError,
    StackUnavailableError,
    Timeout,
)
from atoma_images.testing import FakeAtomaServer, Reply

from helpers import API_KEY, INVALID
from pngcheck import png_size

NO_RETRIES = RetryPolicy(max_retries=0)


@pytest.mark.parametrize("response_format", [None, "b64_json"])
async def test_atoma_gives_the_image_at_the_size_asked(
    client: AsyncImagesClient, server: FakeAtomaServer, response_format: str | None
) -> None:
    result = await client.generate("a red fox", size="512x512", response_format=response_format)
    assert isinstance(result, ImagesResponse)
    (image,) = result.images
    assert image.url is None
    assert image.b64_json is not None
    assert image.b64_json.startswith("data:image/png;base64,")
    assert png_size(image.decode()) == (512, 512)
    assert set(result.extra) == {"signature", "response_hash"}
    assert result.compute_units == server.billed_compute_units == 512 * 512
    assert len(server.posts) == 1


async def test_atoma_default_size_is_1024_square(
    client: AsyncImagesClient, server: FakeAtomaServer
) -> None:
    result = await client.generate("a red fox")
    assert png_size(result.images[0].decode()) == (1024, 1024)
    assert server.billed_compute_units == result.compute_units == 1024 * 1024


async def test_request_on_the_wire(client: AsyncImagesClient, server: FakeAtomaServer) -> None:
    await client.generate(model="black-forest-labs/FLUX.1-schnell", n=1, prompt="fox", size="32x16")
    (post,) = server.posts
    # The one body Atoma's backend draws the asked image from: width, height, "B64Json".
    assert post.json() == {
        "model": "black-forest-labs/FLUX.1-schnell",
        "prompt": "fox",
        "n": 1,
        "size": "32x16",
        "width": 32,
        "height": 16,
        "response_format": "B64Json",
    }
    headers = {k.lower(): v for k, v in post.headers.items()}
    assert headers["authorization"] == f"Bearer {API_KEY}"
    assert headers["content-type"] == "application/json"
    assert headers["user-agent"].startswith("atoma-images/")


async def test_atoma_n_images_are_n_requests_of_one_billed_n_times(
    client: AsyncImagesClient, server: FakeAtomaServer
) -> None:
    budget = Budget(max_compute_units=10 * 64 * 32)
    result = await client.generate("a red fox", n=3, size="64x32", budget=budget)
    assert len(result.images) == 3
    assert all(png_size(image.decode()) == (64, 32) for image in result.images)
    assert [post.json()["n"] for post in server.posts] == [1, 1, 1]
    assert result.compute_units == server.billed_compute_units == 3 * 64 * 32
    assert budget.used == 3 * 64 * 32
    assert client.usage.images == 3
    assert client.usage.compute_units == 3 * 64 * 32


async def test_atoma_n_images_fit_a_budget_whole_or_send_nothing(
    client: AsyncImagesClient, server: FakeAtomaServer
) -> None:
    budget = Budget(max_compute_units=2 * 64 * 32)
    with pytest.raises(BudgetExceededError):
        await client.generate("a red fox", n=3, size="64x32", budget=budget)
    assert server.posts == []
    assert budget.used == 0


@pytest.mark.parametrize(
    ("arguments", "phrase"),
    [
        ({"response_format": "url"}, "nothing serves"),
        ({"size": "1000x1000"}, "'992x992' or '1008x1008'"),
        ({"size": "1024x1000"}, "'1024x992' or '1024x1008'"),
        ({"size": "8x8"}, "'16x16'"),
        ({"extra_body": {"width": 512}}, "size='WIDTHxHEIGHT'"),
        ({"extra_body": {"n": 2}}, "n=..."),
        ({"extra_body": {"seed": None}}, "rather than send null"),
        ({"extra_body": {"seed": float("nan")}}, "NaN"),
        ({"extra_body": {"seed": object()}}, "JSON values"),
        ({"extra_body": {1: 2}}, "str keys"),
    ],
)
async def test_what_atoma_cannot_answer_as_asked_sends_nothing(
    client: AsyncImagesClient, server: FakeAtomaServer, arguments: dict[str, Any], phrase: str
) -> None:
    with pytest.raises(InvalidRequestError, match=re.escape(phrase)):
        await client.generate("fox", **arguments)
    assert server.requests == []


async def test_extra_body_is_merged_into_every_request(
    client: AsyncImagesClient, server: FakeAtomaServer
) -> None:
    await client.generate("fox", n=2, size="16x16", extra_body={"seed": 42, "steps": [1, 2]})
    assert [post.json()["seed"] for post in server.posts] == [42, 42]
    assert server.posts[0].json()["steps"] == [1, 2]


async def test_a_file_name_answer_raises_once_billed(server: FakeAtomaServer) -> None:
    # The OpenAI dialect leaves response_format out; Atoma's backend then answers "Url": the
    # name of a file on the node's disk. Billed, no image, and never retried.
    async with AsyncImagesClient(API_KEY, base_url=server.base_url, dialect="openai") as client:
        with pytest.raises(NoImageError, match="image-generation-") as caught:
            await client.generate("fox", size="64x64")
        assert caught.value.may_have_been_billed
        assert caught.value.attempts == 1
        assert caught.value.response.images[0].url.startswith("image-generation-")  # type: ignore[union-attr]
        assert len(server.posts) == 1
        assert client.usage.maybe_billed_compute_units == server.billed_compute_units == 64 * 64


async def test_openai_dialect_sends_size_only_and_downloads_urls() -> None:
    async with (
        FakeAtomaServer(dialect="openai") as server,
        AsyncImagesClient(API_KEY, base_url=server.base_url, dialect="openai") as client,
    ):
        result = await client.generate("fox", n=2, size="48x32", model="dall-e-3")
        (post,) = server.posts
        assert post.json() == {"model": "dall-e-3", "prompt": "fox", "n": 2, "size": "48x32"}
        assert len(result.images) == 2
        assert all(image.url and image.b64_json is None for image in result.images)
        assert png_size(await client.download(result.images[0])) == (48, 32)
        b64 = await client.generate("fox", size="48x32", response_format="b64_json")
        assert png_size(b64.images[0].decode()) == (48, 32)
        assert server.posts[-1].json()["response_format"] == "b64_json"


async def test_openai_dialect_sends_no_response_format_to_a_gpt_image_model() -> None:
    async with (
        FakeAtomaServer(dialect="openai") as server,
        AsyncImagesClient(API_KEY, base_url=server.base_url, dialect="openai") as client,
    ):
        result = await client.generate("fox", size="32x32", model="gpt-image-1")
        assert "response_format" not in server.posts[0].json()
        assert png_size(result.images[0].decode()) == (32, 32)


async def test_the_atoma_dialect_against_openai_is_refused_unbilled() -> None:
    async with (
        FakeAtomaServer(dialect="openai") as server,
        AsyncImagesClient(API_KEY, base_url=server.base_url) as client,
    ):
        with pytest.raises(BadRequestError, match="unknown_parameter") as caught:
            await client.generate("fox", size="32x32")
        assert not caught.value.may_have_been_billed
        assert server.billed_compute_units == 0


def test_a_dialect_that_does_not_exist_is_refused() -> None:
    with pytest.raises(InvalidRequestError, match="dialect"):
        AsyncImagesClient(API_KEY, dialect="anthropic")  # type: ignore[arg-type]


async def test_defaults_are_sent_and_none_never_is(
    client: AsyncImagesClient, server: FakeAtomaServer
) -> None:
    await client.generate("fox", size="16x16", quality=None, style="vivid", user=None)
    body = server.posts[0].json()
    assert body["n"] == 1
    assert body["size"] == "16x16"
    assert body["style"] == "vivid"
    assert None not in body.values()
    assert "quality" not in body
    assert "user" not in body


# In generate(), model=None means "the client's model", so that one case is valid there.
@pytest.mark.parametrize(
    ("field", "value", "phrase"), [case for case in INVALID if case[:2] != ("model", None)]
)
async def test_invalid_input_sends_nothing(
    client: AsyncImagesClient, server: FakeAtomaServer, field: str, value: Any, phrase: str
) -> None:
    arguments: dict[str, Any] = {"prompt": "fox", "size": "16x16", field: value}
    prompt = arguments.pop("prompt")
    with pytest.raises(InvalidRequestError, match=f"invalid {field}"):
        await client.generate(prompt, **arguments)
    assert server.requests == []


@pytest.mark.parametrize(
    ("status", "body", "cls", "code"),
    [
        (400, None, BadRequestError, "REQUEST_ERROR"),
        (
            400,
            {"error": {"code": "FIAT_PAYMENTS_ONLY", "message": "m"}},
            InsufficientBalanceError,
            "FIAT_PAYMENTS_ONLY",
        ),
        (401, None, AuthenticationError, "AUTH_ERROR"),
        (402, None, InsufficientBalanceError, "BALANCE_ERROR"),
        (404, None, NotFoundError, "NOT_FOUND"),
        (423, None, LockedError, "LOCKED"),
        (425, None, StackUnavailableError, "UNAVAILABLE_STACK"),
        (429, None, RateLimitError, "TOO_MANY_REQUESTS"),
        (500, None, InternalServerError, "INTERNAL_ERROR"),
        (503, None, ServiceUnavailableError, "SERVICE_UNAVAILABLE"),
        (502, "<html><title>502 Bad Gateway</title></html>", BadGatewayError, None),
        (503, "", ServiceUnavailableError, None),
        (500, "upstream exploded", InternalServerError, None),
    ],
)
async def test_error_statuses_raise_their_class_over_the_wire(
    client: AsyncImagesClient,
    server: FakeAtomaServer,
    status: int,
    body: Any,
    cls: type[APIStatusError],
    code: str | None,
) -> None:
    server.enqueue(Reply(status=status, body=body, headers={"x-request-id": "rid-7"}))
    with pytest.raises(cls) as info:
        await client.generate("fox", size="16x16", retries=NO_RETRIES)
    error = info.value
    assert error.status == status
    assert error.code == code
    assert error.request_id == "rid-7"
    assert error.url == f"{server.base_url}/images/generations"
    assert error.attempts == 1
    assert error.message
    assert error.__cause__ is None  # an HTTP answer, not a failure of aiohttp's


async def test_the_real_server_rules_reach_the_caller(server: FakeAtomaServer) -> None:
    async with AsyncImagesClient("wrong-key", base_url=server.base_url, retries=NO_RETRIES) as bad:
        with pytest.raises(AuthenticationError, match="AUTH_ERROR"):
            await bad.generate("fox", size="16x16")
        # The proxy picks a node for the model after it checks the key.
        with pytest.raises(AuthenticationError, match="AUTH_ERROR"):
            await bad.generate("fox", size="16x16", model="nope")
    async with AsyncImagesClient(API_KEY, base_url=server.base_url, retries=NO_RETRIES) as good:
        with pytest.raises(BadRequestError, match="No node found for model nope"):
            await good.generate("fox", size="16x16", model="nope")
    assert server.billed_compute_units == 0


@pytest.mark.parametrize(
    "body", [b"{not json", b"<html>gateway says hi</html>", b'{"created": "x", "data": []}', b"{}"]
)
async def test_bad_success_bodies_raise_response_validation_error(
    client: AsyncImagesClient, server: FakeAtomaServer, body: bytes
) -> None:
    server.enqueue(Reply(status=200, body=body))
    with pytest.raises(ResponseValidationError) as info:
        await client.generate("fox", size="16x16")
    assert info.value.attempts == 1
    assert len(server.posts) == 1  # a 200 was billed: never retried


@pytest.mark.parametrize("chunked", [False, True])
async def test_response_larger_than_the_cap_is_refused(
    server: FakeAtomaServer, chunked: bool
) -> None:
    server.enqueue(Reply(status=200, body=b"{" + b" " * 300_000 + b"}", chunked=chunked))
    async with AsyncImagesClient(
        API_KEY, base_url=server.base_url, max_response_bytes=100_000
    ) as small:
        with pytest.raises(ResponseValidationError, match="max_response_bytes"):
            await small.generate("fox", size="16x16")
        assert len(server.posts) == 1
        # The connection was not poisoned: the next call works.
        assert (await small.generate("fox", size="16x16")).images


async def test_error_body_is_cut_not_refused(
    client: AsyncImagesClient, server: FakeAtomaServer
) -> None:
    server.enqueue(Reply(status=500, body="E" * (3 * 2**20), chunked=True))
    with pytest.raises(InternalServerError) as info:
        await client.generate("fox", size="16x16", retries=NO_RETRIES)
    assert len(info.value.body) == 2**20
    assert len(str(info.value)) < 400


async def test_redirect_is_not_followed(client: AsyncImagesClient, server: FakeAtomaServer) -> None:
    server.enqueue(
        Reply(status=307, headers={"Location": "http://127.0.0.1:9/v1/images/generations"})
    )
    with pytest.raises(APIStatusError, match="redirected") as info:
        await client.generate("fox", size="16x16")
    assert info.value.status == 307
    assert len(server.posts) == 1


async def test_key_never_shows_in_repr_errors_or_debug_logs(
    server: FakeAtomaServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for name in ("aiohttp", "aiohttp.client", "aiohttp.internal", "atoma_images"):
        logging.getLogger(name).setLevel(logging.DEBUG)
    seen: list[str] = []
    async with AsyncImagesClient(API_KEY, base_url=server.base_url, retries=NO_RETRIES) as images:
        seen.append(repr(images))
        await images.generate("fox", size="16x16")
        for status in (401, 500, 429):
            server.enqueue(Reply(status=status))
            with pytest.raises(APIStatusError) as info:
                await images.generate("fox", size="16x16")
            seen += [str(info.value), repr(info.value), repr(vars(info.value))]
    seen += [record.getMessage() for record in caplog.records]
    assert any("POST" in line for line in seen), "the DEBUG log line was not emitted"
    assert all(API_KEY not in line for line in seen)


async def test_session_passed_in_is_used_and_left_open(server: FakeAtomaServer) -> None:
    async with aiohttp.ClientSession() as session:
        async with AsyncImagesClient(API_KEY, base_url=server.base_url, session=session) as images:
            await images.generate("fox", size="16x16")
        assert not session.closed
        async with session.get(server.base_url.replace("/v1", "/files/none")) as response:
            assert response.status == 404
    assert len(server.posts) == 1


async def test_closed_session_or_client_gives_a_clear_error(server: FakeAtomaServer) -> None:
    session = aiohttp.ClientSession()
    await session.close()
    images = AsyncImagesClient(API_KEY, base_url=server.base_url, session=session)
    with pytest.raises(RuntimeError, match="ClientSession given to the client is closed"):
        await images.generate("fox", size="16x16")
    own = AsyncImagesClient(API_KEY, base_url=server.base_url)
    await own.generate("fox", size="16x16")
    await own.aclose()
    await own.aclose()  # twice is fine
    with pytest.raises(RuntimeError, match="closed"):
        await own.generate("fox", size="16x16")


def test_client_is_bound_to_one_event_loop() -> None:
    async def scenario() -> tuple[FakeAtomaServer, AsyncImagesClient]:
        fake = FakeAtomaServer()
        await fake.start()
        images = AsyncImagesClient(API_KEY, base_url=fake.base_url)
        await images.generate("fox", size="16x16")
        return fake, images

    first, second = asyncio.new_event_loop(), asyncio.new_event_loop()
    try:
        fake, images = first.run_until_complete(scenario())
        with pytest.raises(RuntimeError, match="bound to the event loop"):
            second.run_until_complete(images.generate("fox", size="16x16"))
        first.run_until_complete(images.aclose())
        first.run_until_complete(fake.stop())
    finally:
        first.close()
        second.close()


async def test_unclosed_client_warns(server: FakeAtomaServer) -> None:
    images = AsyncImagesClient(API_KEY, base_url=server.base_url)
    await images.generate("fox", size="16x16")
    session = images._transport.open()
    assert session is not None
    with pytest.warns(ResourceWarning, match="unclosed <AsyncImagesClient"):  # noqa: PT031
        del images
        gc.collect()
    await session.close()


def test_key_and_base_url_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InvalidRequestError, match=r"ATOMA_API_KEY.*ATOMASDK_BEARER_AUTH"):
        AsyncImagesClient()
    monkeypatch.setenv("ATOMASDK_BEARER_AUTH", "sdk-key")
    assert AsyncImagesClient()._transport.headers["Authorization"] == "Bearer sdk-key"
    monkeypatch.setenv("ATOMA_API_KEY", "atoma-key")
    client = AsyncImagesClient()
    assert client._transport.headers["Authorization"] == "Bearer atoma-key"
    assert client.base_url == "https://api.atoma.network/v1"
    monkeypatch.setenv("ATOMA_BASE_URL", "http://localhost:8080/v1/")
    assert AsyncImagesClient().base_url == "http://localhost:8080/v1"
    assert AsyncImagesClient(base_url="https://other/v1").base_url == "https://other/v1"


@pytest.mark.parametrize(
    ("arguments", "field"),
    [
        ({"api_key": ""}, "api_key"),
        ({"api_key": "has space"}, "api_key"),
        ({"api_key": "line\nbreak"}, "api_key"),
        ({"base_url": "api.atoma.network/v1"}, "base_url"),
        ({"base_url": "ftp://host/v1"}, "base_url"),
        ({"base_url": "http:///v1"}, "base_url"),
        ({"base_url": "https://h/v1?x=1"}, "base_url"),
        ({"model": ""}, "model"),
        ({"timeout": -1}, "timeout.total"),
        ({"timeout": "10"}, "timeout"),
        ({"retries": 3}, "retries"),
        ({"max_connections": 0}, "max_connections"),
        ({"max_response_bytes": 0}, "max_response_bytes"),
        ({"headers": {"Authorization": "Bearer other"}}, "headers"),
        ({"ssl": "yes"}, "ssl"),
        ({"headers": [("X-A", "1")]}, "headers"),
        ({"headers": {"X-A": 1}}, "headers"),
        ({"headers": {"X-A": "one\r\nX-Injected: two"}}, "headers"),
        ({"headers": {"X-A": "one\ntwo"}}, "headers"),
        ({"headers": {"X-A\r\nX-B": "1"}}, "headers"),
        ({"headers": {"X A": "1"}}, "headers"),
        ({"headers": {"": "1"}}, "headers"),
        ({"headers": {b"X-A": "1"}}, "headers"),
        ({"base_url": "https://user:s3cret-pw@api.example/v1"}, "base_url"),
    ],
)
def test_constructor_checks_its_arguments(arguments: dict[str, Any], field: str) -> None:
    arguments.setdefault("api_key", "k")
    with pytest.raises(InvalidRequestError, match=f"invalid {field}") as info:
        AsyncImagesClient(**arguments)
    if field == "api_key":
        assert arguments["api_key"] not in str(info.value) or arguments["api_key"] == ""
    # Credentials in a URL are never echoed back, in the message or the error's attributes.
    assert "s3cret-pw" not in repr(info.value) + str(info.value) + repr(vars(info.value))


async def test_extra_headers_are_sent(server: FakeAtomaServer) -> None:
    async with AsyncImagesClient(
        API_KEY, base_url=server.base_url, headers={"X-Trace": "t-1"}
    ) as images:
        await images.generate("fox", size="16x16")
    assert server.posts[0].headers["X-Trace"] == "t-1"


async def test_many_concurrent_calls_share_one_pool(server: FakeAtomaServer) -> None:
    async with AsyncImagesClient(API_KEY, base_url=server.base_url, max_connections=4) as images:
        results = await asyncio.gather(*(images.generate(f"p{i}", size="16x16") for i in range(50)))
    assert len(results) == 50
    assert server.connections <= 4


@pytest.mark.parametrize("status", [401, 429, 500])
async def test_a_session_that_raises_for_status_still_gets_typed_status_errors(
    server: FakeAtomaServer, status: int
) -> None:
    # A bot's own session may raise on every error status; the client reads statuses itself.
    server.enqueue(Reply(status=status), times=3)
    async with (
        aiohttp.ClientSession(raise_for_status=True) as session,
        AsyncImagesClient(
            API_KEY, base_url=server.base_url, session=session, retries=NO_RETRIES
        ) as images,
    ):
        with pytest.raises(APIStatusError) as info:
            await images.generate("fox", size="16x16")
    assert info.value.status == status
    assert not info.value.may_have_been_billed


async def test_a_proxy_variable_without_a_scheme_means_http(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As curl, requests and httpx read it. Port 9 refuses: nothing can have been sent.
    monkeypatch.setenv("HTTP_PROXY", "127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    async with AsyncImagesClient(
        API_KEY, base_url="http://127.0.0.1:8/v1", retries=NO_RETRIES
    ) as images:
        with pytest.raises(APIConnectionError) as info:
            await images.generate("fox", size="16x16")
    assert not info.value.may_have_been_billed
    assert "9" in str(info.value)


def test_a_proxy_variable_that_is_not_a_url_is_refused_at_construction(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "socks9://[::1")
    with pytest.raises(InvalidRequestError, match="HTTPS_PROXY"):
        AsyncImagesClient(API_KEY, base_url="https://api.example/v1")


async def test_a_sessions_middlewares_never_send_a_paid_request_again() -> None:
    # A generic retrying middleware (as aiohttp's docs show one) would re-send a POST that
    # the server processed and then dropped: two bills for one call.
    received = 0

    async def processed_then_dropped(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        nonlocal received
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        received += 1
        writer.close()

    async def retrying(request: Any, handler: Any) -> Any:
        for attempt in range(3):
            try:
                return await handler(request)
            except aiohttp.ClientConnectionError:
                if attempt == 2:
                    raise
        return None

    server = await asyncio.start_server(processed_then_dropped, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"
    async with (
        aiohttp.ClientSession(middlewares=(retrying,)) as session,
        AsyncImagesClient(API_KEY, base_url=url, session=session, retries=NO_RETRIES) as images,
    ):
        with pytest.raises(AmbiguousOutcomeError) as info:
            await images.generate("fox", size="16x16")
    server.close()
    await server.wait_closed()
    assert info.value.attempts == 1
    assert received == 1


async def test_proxy_credentials_from_the_environment_reach_the_proxy(
    server: FakeAtomaServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A plain-HTTP proxy gets the request in absolute form, with Basic credentials (RFC 7617).
    seen: list[bytes] = []

    async def forwarding_proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        seen.append(head)
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        body = await reader.readexactly(length)
        async with (
            aiohttp.ClientSession() as upstream,
            upstream.post(
                f"{server.base_url}/images/generations",
                data=body,
                headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
            ) as answer,
        ):
            payload = await answer.read()
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d"
            b"\r\nConnection: close\r\n\r\n%s" % (len(payload), payload)
        )
        await writer.drain()
        writer.close()

    proxy = await asyncio.start_server(forwarding_proxy, "127.0.0.1", 0)
    port = proxy.sockets[0].getsockname()[1]
    monkeypatch.setenv("HTTP_PROXY", f"http://someone:pa55@127.0.0.1:{port}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    async with AsyncImagesClient(API_KEY, base_url="http://images.invalid/v1") as images:
        assert (await images.generate("fox", size="16x16")).images
    proxy.close()
    await proxy.wait_closed()
    assert seen[0].startswith(b"POST http://images.invalid/v1/images/generations ")
    assert b"Proxy-Authorization: Basic c29tZW9uZTpwYTU1" in seen[0]  # someone:pa55


async def test_a_base_url_without_v1_gets_a_404_that_names_the_url_and_the_fix() -> None:
    async with FakeAtomaServer() as server:
        root = server.base_url.removesuffix("/v1")
        async with AsyncImagesClient(API_KEY, base_url=root, retries=NO_RETRIES) as images:
            with pytest.raises(NotFoundError) as info:
                await images.generate("fox", size="16x16")
    assert f"{root}/images/generations answered 404" in str(info.value)
    assert "ending in /v1" in str(info.value)


async def test_atomas_own_404_keeps_its_message(
    client: AsyncImagesClient, server: FakeAtomaServer
) -> None:
    server.enqueue(Reply(status=404))  # the envelope with code NOT_FOUND: a node, not a path
    with pytest.raises(NotFoundError) as info:
        await client.generate("fox", size="16x16")
    assert "/v1" not in info.value.message


async def test_n_images_never_wait_for_connections_their_siblings_hold() -> None:
    async with (
        FakeAtomaServer(latency=0.2) as server,
        # A pool of 2, a pool wait far shorter than an answer: 6 requests at once would fail.
        AsyncImagesClient(
            API_KEY, base_url=server.base_url, max_connections=2, timeout=Timeout(pool=0.05)
        ) as client,
    ):
        result = await client.generate("fox", n=6, size="16x16")
        assert len(result.images) == 6
        assert server.peak_in_flight == 2


async def test_a_deeply_nested_extra_body_is_checked_without_exhausting_the_stack(
    client: AsyncImagesClient, server: FakeAtomaServer
) -> None:
    nested: Any = {"deep": 1}
    for _ in range(500):
        nested = [nested]
    await client.generate("fox", size="16x16", extra_body={"steps": nested})
    assert len(server.posts) == 1
    for _ in range(100_000):
        nested = [nested]
    with pytest.raises(InvalidRequestError, match="extra_body"):
        await client.generate("fox", size="16x16", extra_body={"steps": nested})
    assert len(server.posts) == 1
