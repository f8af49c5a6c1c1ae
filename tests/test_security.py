"""The key stays secret, redirects do not carry it, and TLS is verified by default."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator

import pytest
import trustme
from aiohttp import web

from atoma_images import (
    APIConnectionError,
    APIStatusError,
    AsyncImagesClient,
    AtomaImagesError,
    ImagesClient,
    RetryPolicy,
)
from atoma_images.testing import FakeAtomaServer, Reply

SECRET = "sk-live-7f3a9c2e5b1d4e8f"


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
            await images.generate("a fox", size="8x8")
            for reply in (
                Reply(status=401),
                Reply(status=500),
                Reply(fault="drop"),
                Reply(status=200, body=b"x"),
            ):
                server.reset()
                server.enqueue(reply, times=2)
                with pytest.raises(AtomaImagesError) as info:
                    await images.generate("a fox", size="8x8")
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
                await images.generate("a fox", size="8x8")
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
            await images.generate("a fox", size="8x8")
    assert info.value.attempts == 1  # a bad certificate is not worth retrying
    assert not info.value.may_have_been_billed


async def test_a_custom_ssl_context_or_ssl_false_can_be_passed(
    https_server: str, authority: trustme.CA
) -> None:
    trusting = ssl.create_default_context()
    authority.configure_trust(trusting)
    async with AsyncImagesClient(SECRET, base_url=https_server, ssl=trusting) as images:
        assert (await images.generate("a fox", size="8x8")).images
    async with AsyncImagesClient(SECRET, base_url=https_server, ssl=False) as images:
        assert (await asyncio.wait_for(images.generate("a fox", size="8x8"), 10)).images
