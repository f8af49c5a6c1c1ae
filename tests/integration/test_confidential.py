"""Confidential generation: known answers, round trips, tampering, locks and the missing extra."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import importlib.util
import json
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from atoma_images import (
    AmbiguousTimeoutError,
    AsyncImagesClient,
    AuthenticationError,
    Budget,
    ImageRequest,
    ImagesClient,
    InvalidRequestError,
    ResponseIntegrityError,
    ResponseValidationError,
    RetryPolicy,
    ServiceUnavailableError,
    StackUnavailableError,
)
from atoma_images._dialect import encode
from atoma_images.testing import FakeAtomaServer, Reply

from helpers import API_KEY, ROOT, FakeSleep, serving
from pngcheck import png_size

needs_cryptography = pytest.mark.skipif(
    importlib.util.find_spec("cryptography") is None,
    reason="needs the confidential extra: pip install 'atoma-images[confidential]'",
)

# Computed with an independent implementation (the Atoma Python SDK 0.1.3's own key
# derivation and hashing).
KAT = json.loads((ROOT / "tests" / "vectors" / "confidential-kat.json").read_text())


def b64(name: str) -> bytes:
    return base64.b64decode(KAT[name])


# -- known answers ---------------------------------------------------------------------------


@needs_cryptography
def test_key_agreement_and_derivation_match_the_known_answers() -> None:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from atoma_images import _confidential as c

    client = X25519PrivateKey.from_private_bytes(bytes.fromhex(KAT["client_private_key_hex"]))
    node = X25519PrivateKey.from_private_bytes(bytes.fromhex(KAT["node_private_key_hex"]))
    assert c.public_key_bytes(client) == b64("client_public_key")
    assert c.public_key_bytes(node) == b64("node_public_key")
    assert c.shared_secret(client, b64("node_public_key")) == b64("shared_secret")
    assert c.shared_secret(node, b64("client_public_key")) == b64("shared_secret")
    assert c.derive_key(b64("shared_secret"), b64("salt")) == b64(
        "derived_key_hkdf_sha256_info_empty"
    )


@needs_cryptography
def test_the_sealed_request_matches_the_known_answers() -> None:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from atoma_images import _confidential as c

    request = ImageRequest(model="black-forest-labs/FLUX.1-schnell", prompt="a red fox")
    # The vectors were made for the body of OpenAI's dialect; the sealing does not depend on
    # what the plaintext says (Atoma's own body is checked end to end by the fake node).
    plaintext = encode("openai", request)
    assert plaintext == KAT["request_plaintext"].encode()
    lock = c.NodeLock(public_key=KAT["node_public_key"], node_small_id=3, stack_small_id=42)
    sealed = c.seal(
        plaintext,
        request,
        lock,
        private_key=X25519PrivateKey.from_private_bytes(
            bytes.fromhex(KAT["client_private_key_hex"])
        ),
        salt=b64("salt"),
        nonce=b64("request_nonce"),
    )
    assert sealed.key == b64("derived_key_hkdf_sha256_info_empty")
    assert json.loads(sealed.body) == {
        "ciphertext": KAT["request_ciphertext"],
        "stack_small_id": 42,
        "nonce": KAT["request_nonce"],
        "salt": KAT["salt"],
        "client_dh_public_key": KAT["client_public_key"],
        "node_dh_public_key": KAT["node_public_key"],
        "plaintext_body_hash": KAT["plaintext_body_hash_blake2b_256"],
        "model_name": "black-forest-labs/FLUX.1-schnell",
        "num_compute_units": KAT["num_compute_units_for_n1_1024x1024"],
    }
    assert json.loads(c.lock_body(request)) == {
        "model": "black-forest-labs/FLUX.1-schnell",
        "max_num_tokens": KAT["num_compute_units_for_n1_1024x1024"],
    }


@needs_cryptography
def test_the_known_answer_response_opens_to_its_images() -> None:
    from atoma_images import _confidential as c

    assert c.body_hash(KAT["response_plaintext"].encode()) == KAT["response_hash_blake2b_256"]
    # The node's side, as the fake server plays it: open the request, seal the answer.
    key = b64("derived_key_hkdf_sha256_info_empty")
    assert c.decrypt(key, b64("request_nonce"), b64("request_ciphertext")) == (
        KAT["request_plaintext"].encode()
    )
    assert c.encrypt(key, b64("response_nonce"), KAT["response_plaintext"].encode()) == (
        b64("response_ciphertext")
    )
    sealed = c.SealedRequest(body=b"", key=b64("derived_key_hkdf_sha256_info_empty"))
    answer = {
        "ciphertext": KAT["response_ciphertext"],
        "nonce": KAT["response_nonce"],
        "response_hash": KAT["response_hash_blake2b_256"],
    }
    result = sealed.open(200, {}, json.dumps(answer).encode(), None)
    assert result.created == 1735000000
    assert result.images[0].b64_json == "iVBORw0KGgo="
    assert result.images[0].decode() == b"\x89PNG\r\n\x1a\n"
    assert repr(sealed) == "SealedRequest(body=b'')"  # the key is never shown


# -- round trips against the fake node -------------------------------------------------------


@pytest.fixture
async def node() -> AsyncIterator[FakeAtomaServer]:
    if importlib.util.find_spec("cryptography") is None:
        pytest.skip("needs the confidential extra: pip install 'atoma-images[confidential]'")
    async with FakeAtomaServer(api_key=API_KEY, confidential=True) as fake:
        yield fake


@pytest.fixture
async def client(node: FakeAtomaServer, fake_sleep: FakeSleep) -> AsyncIterator[AsyncImagesClient]:
    async with AsyncImagesClient(
        API_KEY, base_url=node.base_url, retries=RetryPolicy(sleep=fake_sleep)
    ) as images:
        yield images


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize(("size", "width", "height"), [("64x64", 64, 64), ("320x96", 320, 96)])
async def test_round_trip(
    client: AsyncImagesClient, node: FakeAtomaServer, n: int, size: str, width: int, height: int
) -> None:
    result = await client.generate("a red fox in the snow", n=n, size=size, confidential=True)

    assert [png_size(image.decode()) for image in result.images] == [(width, height)] * n
    assert result.extra["response_hash"]  # the decrypted response, as the node wrote it
    assert result.compute_units == node.billed_compute_units == n * width * height
    # On Atoma each image is a sealed request of its own, on a lock of its own.
    assert len(node.locks) == len(node.posts) == n
    for lock, post in zip(node.locks, node.posts, strict=True):
        assert lock.json() == {"model": client.model, "max_num_tokens": width * height}
        sent = post.json()
        assert post.path == "/v1/confidential/images/generations"
        assert sent["num_compute_units"] == width * height
        assert sent["node_dh_public_key"] == base64.b64encode(node.node_public_key).decode()
        assert len(base64.b64decode(sent["salt"])) == 16
        assert len(base64.b64decode(sent["nonce"])) == 12
        assert b"red fox" not in post.body  # the prompt travels encrypted only
        assert post.headers["Authorization"] == f"Bearer {API_KEY}"
    assert sorted(post.json()["stack_small_id"] for post in node.posts) == list(range(1, n + 1))


async def test_every_call_uses_a_new_key_salt_and_nonce(
    client: AsyncImagesClient, node: FakeAtomaServer
) -> None:
    for _ in range(3):
        await client.generate("a red fox", size="16x16", confidential=True)
    sent = [post.json() for post in node.posts]
    for field in ("client_dh_public_key", "salt", "nonce"):
        assert len({body[field] for body in sent}) == 3, field
    assert [body["stack_small_id"] for body in sent] == [1, 2, 3]


@needs_cryptography
def test_the_sync_client_has_the_same_confidential_call(tmp_path: Path) -> None:
    with (
        FakeAtomaServer(api_key=API_KEY, confidential=True) as node,
        ImagesClient(API_KEY, base_url=node.base_url) as client,
    ):
        result = client.generate("a red fox", n=2, size="48x32", confidential=True)
        paths = client.save_all(result, tmp_path)
    assert [png_size(path) for path in paths] == [(48, 32), (48, 32)]
    assert len(node.locks) == len(node.posts) == 2  # one per image, on Atoma


# -- what goes wrong ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tamper", "words"),
    [("ciphertext", "failed authentication"), ("response_hash", "response_hash does not match")],
)
async def test_a_tampered_answer_is_an_integrity_error_never_a_result(
    client: AsyncImagesClient, node: FakeAtomaServer, tamper: str, words: str
) -> None:
    node.enqueue(Reply(tamper=tamper))  # type: ignore[arg-type]
    with pytest.raises(ResponseIntegrityError, match=words) as caught:
        await client.generate("a red fox", size="32x32", confidential=True)
    assert caught.value.status == 200
    assert caught.value.may_have_been_billed  # the node did the work: never sent again
    assert caught.value.attempts == 1
    assert len(node.locks) == len(node.posts) == 1


async def test_an_answer_sealed_with_another_key_is_an_integrity_error(
    client: AsyncImagesClient, node: FakeAtomaServer
) -> None:
    from atoma_images import _confidential as c

    key = c.derive_key(b"\x01" * 32, b"\x02" * 16)
    plaintext = b'{"created": 1, "data": [{"b64_json": "iVBORw0KGgo="}]}'
    forged = {
        "ciphertext": base64.b64encode(c.encrypt(key, b"\x03" * 12, plaintext)).decode(),
        "nonce": base64.b64encode(b"\x03" * 12).decode(),
        "response_hash": c.body_hash(plaintext),  # a consistent hash does not help
    }
    node.enqueue(Reply(body=forged))
    with pytest.raises(ResponseIntegrityError, match="failed authentication"):
        await client.generate("a red fox", size="32x32", confidential=True)


async def test_an_expired_lock_is_retried_with_fresh_locks_then_reported(
    client: AsyncImagesClient, node: FakeAtomaServer, fake_sleep: FakeSleep
) -> None:
    node.lock_ttl = 0.0  # every lock has expired by the time the request arrives
    with pytest.raises(StackUnavailableError) as caught:
        await client.generate("a red fox", size="32x32", confidential=True)
    assert caught.value.status == 425
    assert caught.value.code == "UNAVAILABLE_STACK"
    assert "expired" in caught.value.message
    assert caught.value.attempts == 3  # the default policy: two retries
    assert len(fake_sleep.waits) == 2
    assert len(node.locks) == 3  # a fresh lock for every attempt (the fake numbers them 1, 2, 3)
    assert [post.json()["stack_small_id"] for post in node.posts] == [1, 2, 3]


async def test_a_425_is_retried_once_with_a_new_lock(
    client: AsyncImagesClient, node: FakeAtomaServer, fake_sleep: FakeSleep
) -> None:
    node.enqueue(Reply(status=425))
    result = await client.generate("a red fox", size="32x32", confidential=True)
    assert png_size(result.images[0].decode()) == (32, 32)
    assert len(node.locks) == 2
    assert [post.json()["stack_small_id"] for post in node.posts] == [1, 2]
    assert len(fake_sleep.waits) == 1


async def test_the_node_refuses_a_lock_that_covers_too_few_units(node: FakeAtomaServer) -> None:
    # The Atoma SDK locks 8,192 units for any image: a 1024x1024 image needs 1,048,576.
    from atoma_images import _confidential as c

    request = ImageRequest(model="black-forest-labs/FLUX.1-schnell", prompt="a red fox")
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with aiohttp.ClientSession(node.base_url + "/") as session:
        small = {"model": request.model, "max_num_tokens": 8192}
        async with session.post("nodes/lock", json=small, headers=headers) as answer:
            lock = c.NodeLock(**{k: v for k, v in (await answer.json()).items() if v is not None})
        sealed = c.seal(encode("atoma", request), request, lock)
        async with session.post(
            "confidential/images/generations",
            data=sealed.body,
            headers={**headers, "Content-Type": "application/json"},
        ) as answer:
            assert answer.status == 425
            assert "covers 8192 compute units; 1048576 requested" in await answer.text()


async def test_lock_errors_come_back_typed_and_nothing_is_encrypted_for_them(
    node: FakeAtomaServer,
) -> None:
    async with AsyncImagesClient("wrong-key", base_url=node.base_url) as client:
        with pytest.raises(AuthenticationError) as caught:
            await client.generate("a red fox", size="32x32", confidential=True)
    assert caught.value.url is not None
    assert caught.value.url.endswith("/v1/nodes/lock")
    assert caught.value.attempts == 1
    assert len(node.locks) == 1
    assert node.posts == []

    no_retry = RetryPolicy(max_retries=0)
    async with AsyncImagesClient(API_KEY, base_url=node.base_url, retries=no_retry) as client:
        with pytest.raises(ServiceUnavailableError, match="No node found for model"):
            await client.generate("a red fox", model="no/such-model", confidential=True)
    assert node.posts == []


@contextlib.asynccontextmanager
async def losing_the_first_lock_answer(node: FakeAtomaServer, how: str) -> AsyncIterator[str]:
    """A gateway in front of ``node`` that forwards every request, and loses the node's
    answer to the first lock: ``how`` is "drop" (the connection) or "page" (a gateway's 502
    page instead). Yields its API root."""
    lost: list[int] = []

    async def forward(request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k: request.headers[k] for k in ("Authorization", "Content-Type")}
        url = node.base_url + request.path.removeprefix("/v1")
        async with upstream.post(url, data=body, headers=headers) as answer:
            status, payload = answer.status, await answer.read()
        if request.path.endswith("/nodes/lock") and not lost:  # the node locked, and then:
            lost.append(status)
            if how == "page":
                return web.Response(status=502, text="<html>502 Bad Gateway</html>")
            assert request.transport is not None
            request.transport.close()
        return web.Response(status=status, body=payload, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/{path:.*}", forward)
    async with aiohttp.ClientSession() as upstream, serving(app) as root:
        yield root + "/v1"
    assert lost == [200]


@pytest.mark.parametrize("how", ["drop", "page"])
async def test_a_lost_lock_answer_is_not_billed_and_is_retried_with_a_new_lock(
    node: FakeAtomaServer, fake_sleep: FakeSleep, how: str
) -> None:
    """A lock costs nothing until the sealed request: one whose answer was lost (dropped, or
    a gateway's page) is a failure before anything paid was sent, and the call goes on with
    a new lock."""
    budget = Budget(max_compute_units=32 * 32)
    async with (
        losing_the_first_lock_answer(node, how) as root,
        AsyncImagesClient(
            API_KEY, base_url=root, retries=RetryPolicy(sleep=fake_sleep), budget=budget
        ) as client,
    ):
        result = await client.generate("a red fox", size="32x32", confidential=True)
    assert png_size(result.images[0].decode()) == (32, 32)
    assert len(node.locks) == 2
    assert [post.json()["stack_small_id"] for post in node.posts] == [2]
    assert node.billed_compute_units == budget.used == client.usage.compute_units == 32 * 32
    assert client.usage.maybe_billed_calls == 0


LOCK_OK = {"public_key": base64.b64encode(b"\x09" * 32).decode(), "node_small_id": 1}


@needs_cryptography
async def test_a_call_cancelled_while_it_locks_a_node_was_not_billed() -> None:
    """The lock reached the server, the sealed request never left: nothing paid was sent."""
    locking, released = asyncio.Event(), asyncio.Event()

    async def lock(request: web.Request) -> web.Response:
        await request.read()
        locking.set()
        await released.wait()
        return web.json_response(LOCK_OK)

    app = web.Application()
    app.router.add_post("/v1/nodes/lock", lock)
    budget = Budget(max_compute_units=32 * 32)
    async with (
        serving(app) as root,
        AsyncImagesClient(API_KEY, base_url=root + "/v1", budget=budget) as client,
    ):
        call = asyncio.create_task(client.generate("a red fox", size="32x32", confidential=True))
        await locking.wait()
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        released.set()
    assert budget.used == 0
    assert (client.usage.maybe_billed_calls, client.usage.unbilled_failures) == (0, 1)


@contextlib.asynccontextmanager
async def scripted_node(
    lock: object, sealed: object, *, delay: float = 0.0, timeout: float | None = None
) -> AsyncIterator[AsyncImagesClient]:
    """A client for a server that answers the lock and the sealed request as given."""

    async def answer(request: web.Request) -> web.Response:
        await asyncio.sleep(delay)
        return web.json_response(lock if request.path.endswith("/lock") else sealed)

    app = web.Application()
    app.router.add_post("/v1/nodes/lock", answer)
    app.router.add_post("/v1/confidential/images/generations", answer)
    async with (
        serving(app) as root,
        AsyncImagesClient(API_KEY, base_url=root + "/v1", timeout=timeout) as client,
    ):
        yield client


@needs_cryptography
@pytest.mark.parametrize(
    ("lock", "sealed", "words"),
    [
        ({**LOCK_OK}, None, "stack_small_id: required field missing"),
        ({**LOCK_OK, "stack_small_id": "7"}, None, "stack_small_id: expected an integer"),
        ({**LOCK_OK, "stack_small_id": 7, "public_key": "AAAA"}, None, "public_key: expected"),
        (
            {**LOCK_OK, "stack_small_id": 7, "public_key": base64.b64encode(bytes(32)).decode()},
            None,
            "public_key: the node's key cannot be used",
        ),
        ({**LOCK_OK, "stack_small_id": 7}, {"nonce": "AAAA"}, "ciphertext: required field"),
        ({**LOCK_OK, "stack_small_id": 7}, [], "expected a JSON object"),
    ],
)
async def test_malformed_lock_or_sealed_answers_name_what_is_wrong(
    lock: dict[str, object], sealed: object, words: str
) -> None:
    async with scripted_node(lock, sealed) as client:
        with pytest.raises(ResponseValidationError, match=words):
            await client.generate("a red fox", size="32x32", confidential=True)


@needs_cryptography
@pytest.mark.parametrize(
    ("sealed", "words"),
    [
        ({"ciphertext": "AAAA", "nonce": "AAAA"}, "nonce: expected the base64 of 12 bytes"),
        ({"ciphertext": "not base64!", "nonce": "AAAAAAAAAAAAAAAA"}, "ciphertext: not valid"),
    ],
)
async def test_an_undecodable_sealed_answer_is_an_integrity_error(
    sealed: dict[str, str], words: str
) -> None:
    async with scripted_node({**LOCK_OK, "stack_small_id": 7}, sealed) as client:
        with pytest.raises(ResponseIntegrityError, match=words):
            await client.generate("a red fox", size="32x32", confidential=True)


DEEP = b"[" * 60_000 + b"]" * 60_000
MANY = b"[" + b"[]," * 100_000 + b"[]]"


@needs_cryptography
@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b'{"public_key": ' + DEEP + b"}", "deeper than|depth limit"),
        (b'{"node_small_id": ' + MANY + b"}", "more than the 65536"),
        (b"\xef\xbb\xbf{}", "not JSON"),
    ],
)
def test_a_hostile_lock_or_sealed_answer_is_a_validation_error(body: bytes, words: str) -> None:
    from atoma_images._confidential import SealedRequest, parse_lock

    with pytest.raises(ResponseValidationError, match=words):
        parse_lock(200, {}, body, None)
    with pytest.raises(ResponseValidationError, match=words):
        SealedRequest(body=b"", key=b"k" * 32).open(200, {}, body, None)


@needs_cryptography
def test_a_hostile_answer_inside_a_well_sealed_one_is_a_validation_error() -> None:
    from atoma_images._confidential import SealedRequest, b64encode_text, encrypt

    key, nonce = b"k" * 32, b"n" * 12
    for plaintext, words in ((DEEP, "deeper than|depth limit"), (MANY, "more than the 65536")):
        answer = {"ciphertext": b64encode_text(encrypt(key, nonce, plaintext))}
        body = json.dumps({**answer, "nonce": b64encode_text(nonce)}).encode()
        with pytest.raises(ResponseValidationError, match=words):
            SealedRequest(body=b"", key=key).open(200, {}, body, None)


async def test_confidential_must_be_a_bool(
    client: AsyncImagesClient, node: FakeAtomaServer
) -> None:
    with pytest.raises(InvalidRequestError, match="invalid confidential: got 'yes'"):
        await client.generate("a red fox", confidential="yes")  # type: ignore[arg-type]
    assert node.requests == []


# -- without the extra -----------------------------------------------------------------------


def test_without_the_extra_a_clear_error_names_it_and_nothing_is_sent() -> None:
    # A fresh interpreter in which `import cryptography` fails, as in a base install.
    script = textwrap.dedent(
        """
        import asyncio, sys
        sys.modules["cryptography"] = None
        from atoma_images import AsyncImagesClient, ExtraNotInstalledError
        from atoma_images.testing import FakeAtomaServer

        async def main():
            async with FakeAtomaServer() as server, AsyncImagesClient(
                "key", base_url=server.base_url
            ) as client:
                print((await client.generate("plain", size="16x16")).images[0].decode()[:4])
                try:
                    await client.generate("secret", size="16x16", confidential=True)
                except ExtraNotInstalledError as error:
                    print(type(error).__mro__[1:3], error.extra, error, sep="|")
                print(len(server.requests))
            try:
                FakeAtomaServer(confidential=True)
            except ImportError as error:
                print(error)

        asyncio.run(main())
        """
    )
    done = subprocess.run(
        [sys.executable, "-X", "dev", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    lines = done.stdout.splitlines()
    assert lines[0] == repr(b"\x89PNG"), done.stderr  # the base install works as ever
    bases, extra, message = lines[1].split("|")
    assert "AtomaImagesError" in bases
    assert "ImportError" in bases
    assert extra == "confidential"
    assert message == (
        "confidential=True needs the optional package 'cryptography', which is not "
        "installed: pip install 'atoma-images[confidential]'"
    )
    assert lines[2] == "1"  # only the plain call reached the server
    assert lines[3].startswith("FakeAtomaServer(confidential=True) needs the optional package")
    assert done.stderr == ""


@needs_cryptography
async def test_the_lock_and_the_request_share_one_attempt_time_limit() -> None:
    # Each leg takes 0.5 s; the attempt may take 0.8 s. Were the limit per request, both
    # would fit; shared, the generation request has 0.3 s left and times out.
    sealed = {"ciphertext": "AAAA", "nonce": "AAAAAAAAAAAAAAAA"}
    lock = {**LOCK_OK, "stack_small_id": 7}
    async with scripted_node(lock, sealed, delay=0.5, timeout=0.8) as client:
        with pytest.raises(AmbiguousTimeoutError, match="may have been processed and billed"):
            await client.generate("a red fox", size="32x32", confidential=True)
