"""The fake server behaves like the deployed service (docs/contract.md), not like the spec."""

from __future__ import annotations

import base64
import json
from typing import Any

import aiohttp
import pytest

from atoma_images import ImagesClient
from atoma_images.testing import FakeAtomaServer, Reply, make_png

from helpers import API_KEY
from pngcheck import png_size


async def post(server: FakeAtomaServer, body: Any, **headers: str) -> tuple[int, Any]:
    sent = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json", **headers}
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with (
        aiohttp.ClientSession() as session,
        session.post(server.base_url + "/images/generations", data=raw, headers=sent) as response,
    ):
        text = await response.text()
        try:
            return response.status, json.loads(text)
        except ValueError:
            return response.status, text


GOOD = {"model": "black-forest-labs/FLUX.1-schnell", "prompt": "fox", "n": 1, "size": "16x8"}


@pytest.mark.parametrize(
    ("body", "headers", "status", "message"),
    [
        (GOOD, {"Content-Type": "text/plain"}, 415, "Content-Type"),
        (b"{oops", {}, 400, "Failed to parse"),
        ({**GOOD, "n": None}, {}, 400, "N field is required"),
        ({k: v for k, v in GOOD.items() if k != "n"}, {}, 400, "N field is required"),
        ({k: v for k, v in GOOD.items() if k != "size"}, {}, 400, "Size field is required"),
        ({**GOOD, "size": "16X8"}, {}, 400, "Invalid size format"),
        ({**GOOD, "model": "unknown/model"}, {}, 400, "No node found for model"),
        (GOOD, {"Authorization": "Bearer wrong"}, 401, "api key"),
        (GOOD, {"Authorization": f"bearer {API_KEY}"}, 401, "api key"),  # case-sensitive prefix
        # What only the backend refuses comes back as the proxy's 500, without its message.
        ({k: v for k, v in GOOD.items() if k != "prompt"}, {}, 500, "Inference service"),
        # The proxy parses the body and needs model, n and size before it reads the key; it
        # reads the size and picks a node after.
        ({**GOOD, "n": None}, {"Authorization": "Bearer wrong"}, 400, "N field is required"),
        ({**GOOD, "size": "bad"}, {"Authorization": "Bearer wrong"}, 401, "api key"),
        ({**GOOD, "model": "nope"}, {"Authorization": "Bearer wrong"}, 401, "api key"),
        ({**GOOD, "n": -1}, {}, 400, "N field is required"),
    ],
)
async def test_contract_rules(
    server: FakeAtomaServer, body: Any, headers: dict[str, str], status: int, message: str
) -> None:
    got_status, got = await post(server, body, **headers)
    assert got_status == status
    text = got if isinstance(got, str) else got["error"]["message"]
    assert message in text


def image_of(item: dict[str, Any]) -> bytes:
    """The PNG of an answer's item, which must be a data URI as Atoma's backend sends it."""
    prefix = "data:image/png;base64,"
    assert item["url"] is None
    assert item["b64_json"].startswith(prefix)
    return base64.b64decode(item["b64_json"].removeprefix(prefix))


async def test_one_image_whatever_n_and_n_times_the_size_billed(server: FakeAtomaServer) -> None:
    asked = {**GOOD, "n": 3, "width": 16, "height": 8, "response_format": "B64Json"}
    status, body = await post(server, asked)
    assert status == 200
    assert isinstance(body["created"], int)
    assert {"signature", "response_hash"} <= body.keys()
    (item,) = body["data"]  # mistral.rs ignores n
    assert png_size(image_of(item)) == (16, 16)  # FLUX rounds each side up to 16
    assert server.billed_compute_units == 3 * 16 * 8  # the proxy bills n x size


async def test_the_size_comes_from_width_and_height_never_from_size(
    server: FakeAtomaServer,
) -> None:
    _, body = await post(server, {**GOOD, "response_format": "B64Json"})
    assert png_size(image_of(body["data"][0])) == (1280, 720)  # the backend's defaults
    _, body = await post(server, {**GOOD, "width": 40, "height": 33, "response_format": "B64Json"})
    assert png_size(image_of(body["data"][0])) == (48, 48)
    assert server.billed_compute_units == 2 * 16 * 8


async def test_without_response_format_the_answer_is_a_node_local_file_name(
    server: FakeAtomaServer,
) -> None:
    for asked in (GOOD, {**GOOD, "response_format": "Url"}):
        _, body = await post(server, asked)
        (item,) = body["data"]
        assert item["b64_json"] is None
        assert item["url"].startswith("image-generation-")
        assert item["url"].endswith(".png")
    assert server.billed_compute_units == 2 * 16 * 8


@pytest.mark.parametrize("spelling", [None, "url", "b64_json", "b64json", "B64JSON", 1])
async def test_only_the_backends_own_spellings_parse(
    server: FakeAtomaServer, spelling: Any
) -> None:
    status, body = await post(server, {**GOOD, "response_format": spelling})
    assert status == 500
    assert body["error"] == {
        "code": "INTERNAL_ERROR",
        "message": "Inference service returned status code error 500 Internal Server Error",
    }
    assert server.billed_compute_units == 0


@pytest.mark.parametrize("size", ["0x8", "16x8x", "+16x8"])
async def test_sizes_the_proxy_reads_as_two_numbers_pass_it(
    server: FakeAtomaServer, size: str
) -> None:
    # It splits on "x" and keeps what parses as a u64; the backend draws width x height.
    status, body = await post(server, {**GOOD, "size": size, "response_format": "B64Json"})
    assert status == 200
    assert png_size(image_of(body["data"][0])) == (1280, 720)


@pytest.mark.parametrize(("key", "value"), [("width", None), ("height", -16), ("width", "64")])
async def test_a_width_or_height_the_backend_cannot_parse_is_a_500(
    server: FakeAtomaServer, key: str, value: Any
) -> None:
    status, _ = await post(server, {**GOOD, key: value, "response_format": "B64Json"})
    assert status == 500


async def test_openai_dialect_serves_urls_and_n_images() -> None:
    async with FakeAtomaServer(dialect="openai") as fake:
        _, body = await post(fake, {**GOOD, "n": 2})
        assert len(body["data"]) == 2
        async with (
            aiohttp.ClientSession() as session,
            session.get(body["data"][0]["url"]) as response,
        ):
            assert response.status == 200
            assert png_size(await response.read()) == (16, 8)
        _, body = await post(fake, {**GOOD, "response_format": "b64_json"})
        assert png_size(base64.b64decode(body["data"][0]["b64_json"])) == (16, 8)
        assert fake.billed_compute_units == 3 * 16 * 8


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({**GOOD, "width": 16}, "width", "unknown_parameter"),
        ({**GOOD, "response_format": "B64Json"}, "response_format", "invalid_value"),
        ({**GOOD, "model": "gpt-image-1", "response_format": "url"}, "response_format",
         "unknown_parameter"),
    ],
)  # fmt: skip
async def test_openai_dialect_refuses_what_openai_refuses(
    body: dict[str, Any], param: str, code: str
) -> None:
    async with FakeAtomaServer(dialect="openai") as fake:
        status, answer = await post(fake, body)
        assert status == 400
        assert (answer["error"]["param"], answer["error"]["code"]) == (param, code)
        assert fake.billed_compute_units == 0


async def test_scripted_replies_come_in_order_then_normal_answers(server: FakeAtomaServer) -> None:
    server.enqueue(Reply(status=503), Reply(status=200, body={"created": 1, "data": []}))
    assert (await post(server, GOOD))[0] == 503
    assert (await post(server, GOOD))[1] == {"created": 1, "data": []}
    assert (await post(server, GOOD))[0] == 200
    assert len(server.posts) == 3
    assert server.posts[0].json() == GOOD


def test_png_is_deterministic_and_valid() -> None:
    assert make_png(3, 2, "a") == make_png(3, 2, "a")
    assert make_png(3, 2, "a") != make_png(3, 2, "b")
    assert png_size(make_png(1, 1)) == (1, 1)
    assert png_size(make_png(333, 17, "odd")) == (333, 17)


def test_sync_context_manager_runs_in_a_thread() -> None:
    import urllib.request

    with FakeAtomaServer() as fake:
        request = urllib.request.Request(
            fake.base_url + "/images/generations",
            data=json.dumps(GOOD).encode(),
            headers={"Authorization": "Bearer k", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request) as response:
            assert json.loads(response.read())["data"]
    with pytest.raises(RuntimeError, match="not running"):
        _ = fake.base_url


# -- refusals and scripted answers, as sent on the wire ---------------------------------------


async def exchange(
    server: FakeAtomaServer, method: str, path: str, body: Any = GOOD, **headers: str
) -> tuple[int, str, bytes]:
    """One request under the API root: status, content type and the raw body."""
    sent = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json", **headers}
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method, f"{server.base_url}{path}", data=json.dumps(body), headers=sent
        ) as response,
    ):
        return response.status, response.content_type, await response.read()


@pytest.mark.parametrize(
    ("body", "headers", "status", "code"),
    [
        ({**GOOD, "n": "1"}, {}, 400, "REQUEST_ERROR"),
        ({**GOOD, "size": "16X8"}, {}, 400, "REQUEST_ERROR"),
        ({**GOOD, "response_format": "gif"}, {}, 500, "INTERNAL_ERROR"),
        (GOOD, {"Authorization": "Basic x"}, 401, "AUTH_ERROR"),
        ({k: v for k, v in GOOD.items() if k != "prompt"}, {}, 500, "INTERNAL_ERROR"),
    ],
)
async def test_refusals_carry_atomas_error_envelope(
    server: FakeAtomaServer, body: Any, headers: dict[str, str], status: int, code: str
) -> None:
    got_status, content_type, raw = await exchange(
        server, "POST", "/images/generations", body, **headers
    )
    assert (got_status, content_type) == (status, "application/json")
    (error,) = json.loads(raw).values()
    assert error["code"] == code
    assert error["message"]


async def test_a_file_that_was_never_served_is_not_found(server: FakeAtomaServer) -> None:
    root = server.base_url.removesuffix("/v1")
    async with aiohttp.ClientSession() as session, session.get(root + "/files/x.png") as response:
        assert response.status == 404
        assert (await response.json())["error"]["code"] == "NOT_FOUND"
    assert [r.path for r in server.requests] == ["/files/x.png"]


@pytest.mark.parametrize(
    "reply", [Reply(), Reply(chunked=True), Reply(fault="drip", drip_interval=0)]
)
async def test_a_scripted_reply_with_the_normal_answer_keeps_the_requests_checks(
    server: FakeAtomaServer, reply: Reply
) -> None:
    # The normal answer to a request with a wrong key is a 401, scripted or not.
    server.enqueue(reply)
    status, _, raw = await exchange(
        server, "POST", "/images/generations", Authorization="Bearer wrong"
    )
    assert status == 401
    assert json.loads(raw)["error"]["code"] == "AUTH_ERROR"


@pytest.mark.parametrize(
    ("reply", "content_type"),
    [
        (Reply(), "application/json"),
        (Reply(chunked=True), "application/json"),
        (Reply(status=503), "application/json"),
        (Reply(body=b"x"), "application/octet-stream"),
        (Reply(body=b"x", chunked=True), "application/octet-stream"),
        (Reply(body="<p>", headers={"Content-Type": "text/html"}), "text/html"),
        (Reply(body="<p>", headers={"Content-Type": "text/html"}, chunked=True), "text/html"),
    ],
)
async def test_a_scripted_reply_says_what_its_body_is(
    server: FakeAtomaServer, reply: Reply, content_type: str
) -> None:
    server.enqueue(reply)
    status, got, _ = await exchange(server, "POST", "/images/generations")
    assert (status, got) == (reply.status, content_type)


async def test_the_sync_client_calls_a_server_started_on_the_loop_it_blocks() -> None:
    # A notebook: the server started on the kernel's own loop ('async with', or 'await
    # server.start()'), then the synchronous client called from that loop, which it blocks.
    # The server answers from a thread of its own, so the call succeeds. (A short limit, so
    # that a server stuck behind the blocked loop fails fast rather than hangs.)
    async with FakeAtomaServer() as server:
        with ImagesClient("any-key", base_url=server.base_url, timeout=2) as client:
            assert client.generate("a teapot", size="16x16").images
            assert [r.ok for r in client.generate_many(["a teapot"], size="16x16")] == [True]
        assert len(server.posts) == 2


async def test_the_sync_client_calls_a_server_on_another_thread_from_a_running_loop() -> None:
    # The working form in a notebook: the server in a thread of its own.
    with FakeAtomaServer() as server, ImagesClient("any-key", base_url=server.base_url) as client:
        assert client.generate("a teapot", size="16x16").images
        assert len(server.posts) == 1
