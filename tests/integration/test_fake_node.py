"""The fake server's confidential node refuses what the deployed one refuses, in the same order.

Requests are written by hand here (a lock, then a sealed body, then one field spoilt), so each
check of the node is seen on its own; test_confidential.py drives the node with the client.
"""

from __future__ import annotations

import base64
import importlib.util
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from atoma_images import ImageRequest
from atoma_images._dialect import encode
from atoma_images.testing import FakeAtomaServer

from helpers import API_KEY
from pngcheck import png_size

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("cryptography") is None,
    reason="needs the confidential extra: pip install 'atoma-images[confidential]'",
)

MODEL = "black-forest-labs/FLUX.1-schnell"
REQUEST = ImageRequest(model=MODEL, prompt="a red fox", n=2, size="32x16")
UNITS = 2 * 32 * 16
AUTH = {"Authorization": f"Bearer {API_KEY}"}
WRONG_KEY = {"Authorization": "Bearer wrong"}


@pytest.fixture
async def node() -> AsyncIterator[FakeAtomaServer]:
    async with FakeAtomaServer(api_key=API_KEY, confidential=True) as fake:
        yield fake


async def post(
    node: FakeAtomaServer, path: str, body: Any, headers: dict[str, str] = AUTH
) -> tuple[int, str, Any]:
    """POST ``body`` (JSON unless bytes) under the API root: status, content type, body."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    sent = {"Content-Type": "application/json", **headers}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{node.base_url}/{path}", data=raw, headers=sent) as answer,
    ):
        text = await answer.text()
        try:
            return answer.status, answer.content_type, json.loads(text)
        except ValueError:
            return answer.status, answer.content_type, text


async def lock(node: FakeAtomaServer, units: int = UNITS) -> Any:
    status, _, body = await post(node, "nodes/lock", {"model": MODEL, "max_num_tokens": units})
    assert status == 200, body
    return body


async def sealed_body(
    node: FakeAtomaServer, plaintext: bytes | None = None, units: int = UNITS
) -> tuple[dict[str, Any], bytes]:
    """A sealed request on a fresh lock, as the client sends it, and the key of its answer."""
    from atoma_images import _confidential as c

    granted = await lock(node, units)
    sealed = c.seal(
        encode("atoma", REQUEST) if plaintext is None else plaintext,
        REQUEST,
        c.NodeLock(**{k: v for k, v in granted.items() if v is not None}),
    )
    return json.loads(sealed.body), sealed.key


def error(body: Any) -> tuple[str, str]:
    assert isinstance(body, dict), body
    return body["error"]["code"], body["error"]["message"]


# -- POST /v1/nodes/lock ------------------------------------------------------------------


async def test_a_lock_carries_the_node_key_and_numbers_its_stacks(node: FakeAtomaServer) -> None:
    first, second = await lock(node), await lock(node)
    assert base64.b64decode(first["public_key"]) == node.node_public_key
    assert [first["stack_small_id"], second["stack_small_id"]] == [1, 2]
    assert first["node_small_id"] == second["node_small_id"]
    assert first["stack_entry_digest"] is None
    assert [r.json()["max_num_tokens"] for r in node.locks] == [UNITS, UNITS]


@pytest.mark.parametrize(
    ("body", "headers", "status", "code", "words"),
    [
        (b"{oops", AUTH, 400, "REQUEST_ERROR", "Failed to parse body as JSON"),
        ([MODEL], AUTH, 400, "REQUEST_ERROR", "expected an object"),
        ({"max_num_tokens": 4}, AUTH, 400, "REQUEST_ERROR", "Model field is required"),
        ({"model": MODEL, "max_num_tokens": "4"}, AUTH, 400, "REQUEST_ERROR", "max_num_tokens"),
        ({"model": MODEL, "max_num_tokens": -1}, AUTH, 400, "REQUEST_ERROR", "max_num_tokens"),
        ({"model": MODEL}, WRONG_KEY, 401, "AUTH_ERROR", "Invalid or missing api key"),
        # The body is checked before the key, as the proxy does.
        ({"max_num_tokens": 4}, WRONG_KEY, 400, "REQUEST_ERROR", "Model field is required"),
        ({"model": "no/such"}, AUTH, 503, "SERVICE_UNAVAILABLE", "No node found for model"),
    ],
)
async def test_lock_refusals(
    node: FakeAtomaServer,
    body: Any,
    headers: dict[str, str],
    status: int,
    code: str,
    words: str,
) -> None:
    got_status, content_type, got = await post(node, "nodes/lock", body, headers)
    assert (got_status, content_type) == (status, "application/json")
    got_code, message = error(got)
    assert got_code == code
    assert words in message
    assert len(node.locks) == 1  # recorded, refused or not


# -- POST /v1/confidential/images/generations -----------------------------------------------


async def test_a_sealed_request_is_answered_sealed_with_its_hash(node: FakeAtomaServer) -> None:
    from atoma_images import _confidential as c

    body, key = await sealed_body(node)
    status, content_type, sealed = await post(node, "confidential/images/generations", body)
    assert (status, content_type) == (200, "application/json")
    inner = c.decrypt(
        key, base64.b64decode(sealed["nonce"]), base64.b64decode(sealed["ciphertext"])
    )
    assert sealed["response_hash"] == c.body_hash(inner)
    images = json.loads(inner)["data"]
    # The node's backend draws one image whatever n says (the client sends n=1 on Atoma).
    assert [png_size(base64.b64decode(i["b64_json"].partition(",")[2])) for i in images] == [
        (32, 16)
    ]


def spoil(name: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(body: dict[str, Any]) -> None:
        body[name] = value

    return change


def drop(name: str) -> Callable[[dict[str, Any]], None]:
    def change(body: dict[str, Any]) -> None:
        del body[name]

    return change


def flip_ciphertext(body: dict[str, Any]) -> None:
    data = bytearray(base64.b64decode(body["ciphertext"]))
    data[0] ^= 1
    body["ciphertext"] = base64.b64encode(data).decode()


@pytest.mark.parametrize(
    ("change", "status", "code", "words"),
    [
        (drop("ciphertext"), 400, "REQUEST_ERROR", "ciphertext field is required"),
        (spoil("salt", 16), 400, "REQUEST_ERROR", "salt field is required"),
        (drop("plaintext_body_hash"), 400, "REQUEST_ERROR", "plaintext_body_hash field"),
        (spoil("stack_small_id", "1"), 400, "REQUEST_ERROR", "must be integers"),
        (spoil("num_compute_units", None), 400, "REQUEST_ERROR", "must be integers"),
        (spoil("stack_small_id", 99), 425, "UNAVAILABLE_STACK", "No usable lock for stack 99"),
        (spoil("num_compute_units", UNITS + 1), 425, "UNAVAILABLE_STACK", f"covers {UNITS}"),
        (spoil("nonce", "%%%"), 400, "REQUEST_ERROR", "nonce is not valid base64"),
        (
            spoil("node_dh_public_key", base64.b64encode(b"\x09" * 32).decode()),
            400,
            "REQUEST_ERROR",
            "not this node's key",
        ),
        (flip_ciphertext, 400, "REQUEST_ERROR", "Failed to decrypt the request"),
        (spoil("plaintext_body_hash", "AAAA"), 400, "REQUEST_ERROR", "plaintext_body_hash"),
        (spoil("num_compute_units", UNITS - 1), 400, "REQUEST_ERROR", f"n*W*H = {UNITS}"),
    ],
)
async def test_sealed_request_refusals(
    node: FakeAtomaServer,
    change: Callable[[dict[str, Any]], None],
    status: int,
    code: str,
    words: str,
) -> None:
    body, _ = await sealed_body(node)
    change(body)
    got_status, content_type, got = await post(node, "confidential/images/generations", body)
    assert (got_status, content_type) == (status, "application/json")
    got_code, message = error(got)
    assert got_code == code
    assert words in message


async def test_the_key_is_checked_after_the_body_and_before_the_lock(
    node: FakeAtomaServer,
) -> None:
    body, _ = await sealed_body(node)
    path = "confidential/images/generations"
    status, _, got = await post(node, path, {**body, "salt": None}, WRONG_KEY)
    assert (status, error(got)[0]) == (400, "REQUEST_ERROR")
    status, _, got = await post(node, path, body, WRONG_KEY)
    assert (status, error(got)[0]) == (401, "AUTH_ERROR")
    # A refused key does not use the lock up; the right key then gets the answer.
    assert (await post(node, path, body))[0] == 200


async def test_a_lock_serves_one_request(node: FakeAtomaServer) -> None:
    body, _ = await sealed_body(node)
    path = "confidential/images/generations"
    assert (await post(node, path, body))[0] == 200
    status, _, got = await post(node, path, body)
    assert status == 425
    assert "used or expired" in error(got)[1]


async def test_an_invalid_request_inside_is_refused_in_clear(node: FakeAtomaServer) -> None:
    inner = json.dumps({"model": MODEL, "prompt": "a red fox", "n": 2}).encode()
    body, _ = await sealed_body(node, inner)
    status, _, got = await post(node, "confidential/images/generations", body)
    assert status == 400
    assert error(got) == ("REQUEST_ERROR", "Size field is required")


@pytest.mark.parametrize("path", ["nodes/lock", "confidential/images/generations"])
async def test_a_body_that_is_not_json_is_refused_by_the_proxy(
    node: FakeAtomaServer, path: str
) -> None:
    status, content_type, got = await post(
        node, path, b"{}", {**AUTH, "Content-Type": "text/plain"}
    )
    assert (status, content_type) == (415, "text/plain")
    assert "Content-Type: application/json" in got


async def test_a_scripted_error_leaves_the_lock_unused(node: FakeAtomaServer) -> None:
    from atoma_images.testing import Reply

    body, _ = await sealed_body(node)
    node.enqueue(Reply(status=503))
    path = "confidential/images/generations"
    status, _, got = await post(node, path, body)
    assert (status, error(got)[0]) == (503, "SERVICE_UNAVAILABLE")
    assert (await post(node, path, body))[0] == 200
