from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest

from atoma_images import AsyncImagesClient, RetryPolicy
from atoma_images.testing import FakeAtomaServer

API_KEY = "sk-test-5f2b9c1e7d"


@pytest.fixture(autouse=True)
def _no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests must not pick up a developer's real key or base URL.
    for name in ("ATOMA_API_KEY", "ATOMASDK_BEARER_AUTH", "ATOMA_BASE_URL"):
        monkeypatch.delenv(name, raising=False)


class FakeSleep:
    """Stands in for asyncio.sleep in retry policies: records waits, never waits for real."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        await asyncio.sleep(0)

    @property
    def total(self) -> float:
        return sum(self.waits)


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
def threaded_server() -> Iterator[FakeAtomaServer]:
    """The fake server on its own loop thread, for synchronous tests and subprocesses."""
    with FakeAtomaServer(api_key=API_KEY) as fake:
        yield fake
