from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator

import pytest
from aiohttp import web

from atoma_images import AsyncImagesClient, RetryPolicy
from atoma_images.testing import FakeAtomaServer

from helpers import API_KEY, FakeSleep, serving


def pytest_configure(config: pytest.Config) -> None:
    # Many tests run the CLI, the examples and the docs' blocks in fresh interpreters. Where
    # bytecode caching is off (PYTHONDONTWRITEBYTECODE, as in CI), each of them compiled the
    # package again: about 10 s of the default run on these 2-core machines. They share one
    # cache instead, in a temporary directory (PYTHONPYCACHEPREFIX): the tree stays clean.
    if os.environ.get("PYTHONDONTWRITEBYTECODE"):
        cache = tempfile.mkdtemp(prefix="atoma-images-pycache-")
        del os.environ["PYTHONDONTWRITEBYTECODE"]
        os.environ["PYTHONPYCACHEPREFIX"] = cache
        config.add_cleanup(lambda: shutil.rmtree(cache, ignore_errors=True))


@pytest.fixture(autouse=True)
def _no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests must not pick up a developer's real key or base URL.
    for name in ("ATOMA_API_KEY", "ATOMASDK_BEARER_AUTH", "ATOMA_BASE_URL"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def fake_sleep() -> FakeSleep:
    return FakeSleep()


@pytest.fixture
async def server() -> AsyncIterator[FakeAtomaServer]:
    async with FakeAtomaServer(api_key=API_KEY) as fake:
        yield fake


@pytest.fixture
async def client(
    server: FakeAtomaServer, fake_sleep: FakeSleep
) -> AsyncIterator[AsyncImagesClient]:
    async with AsyncImagesClient(
        API_KEY, base_url=server.base_url, retries=RetryPolicy(sleep=fake_sleep)
    ) as images:
        yield images


@pytest.fixture
async def url_server() -> AsyncIterator[FakeAtomaServer]:
    """A fake server of OpenAI's dialect, whose images are URLs it serves itself."""
    async with FakeAtomaServer(api_key=API_KEY, dialect="openai") as fake:
        yield fake


@pytest.fixture
async def url_client(url_server: FakeAtomaServer) -> AsyncIterator[AsyncImagesClient]:
    async with AsyncImagesClient(API_KEY, base_url=url_server.base_url, dialect="openai") as c:
        yield c


@pytest.fixture
def threaded_server() -> Iterator[FakeAtomaServer]:
    """The fake server on its own loop thread, for synchronous tests and subprocesses."""
    with FakeAtomaServer(api_key=API_KEY) as fake:
        yield fake


@pytest.fixture
async def endless() -> AsyncIterator[str]:
    """A server answering any request with 200 and a 256 MiB body, until the client hangs up.

    Under a path with a ``sized`` segment (``/sized/...``) the body has a Content-Length;
    elsewhere it is chunked. It is written chunk by chunk, so the server never holds it.
    """
    chunk = b" " * 2**16

    async def answer(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        if "sized" in request.path.split("/"):
            response.content_length = len(chunk) * 4096
        else:
            response.enable_chunked_encoding()
        await response.prepare(request)
        try:
            for _ in range(4096):
                await response.write(chunk)
        except ConnectionError:  # the client hung up, as it should
            pass
        return response

    app = web.Application()
    app.router.add_route("*", "/{path:.*}", answer)
    async with serving(app) as root:
        yield root
