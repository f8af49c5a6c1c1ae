"""Cancellation at any moment and sustained load leave nothing behind.

    ATOMA_IMAGES_LOAD_CALLS=20000 pytest -m slow tests/integration/test_reliability.py

The load test runs 20,000 calls unless ATOMA_IMAGES_LOAD_CALLS says otherwise. Both tests are
`slow`: deselected by default, run by CI.
"""

from __future__ import annotations

import asyncio
import os
import random

import pytest

from atoma_images import (
    AsyncImagesClient,
    AtomaImagesError,
    RetryPolicy,
    Timeout,
)
from atoma_images.testing import FakeAtomaServer, Reply

from helpers import API_KEY

pytestmark = pytest.mark.slow

POOL = 8


async def assert_pool_is_whole(images: AsyncImagesClient) -> None:
    # Twice as many calls as the pool holds, with a short pool timeout: a leaked
    # connection slot would make some of them wait in vain and fail.
    results = await asyncio.gather(
        *(images.generate("after", size="16x16", timeout=Timeout(pool=3)) for _ in range(2 * POOL))
    )
    assert len(results) == 2 * POOL


async def test_a_thousand_calls_cancelled_at_random_moments(server: FakeAtomaServer) -> None:
    rng = random.Random(20261124)
    loop = asyncio.get_running_loop()
    server.latency = 0.004  # a window to be cancelled in while waiting for the answer
    policy = RetryPolicy(backoff_base=0.003, backoff_max=0.006)  # real, short retry waits
    outcomes = {"done": 0, "cancelled": 0, "error": 0}
    async with AsyncImagesClient(
        API_KEY, base_url=server.base_url, max_connections=POOL, retries=policy
    ) as images:
        for _ in range(10):
            # Some calls meet a 503 first and are cancelled during the retry wait; some
            # get a large body and are cancelled while reading it.
            server.enqueue(Reply(status=503), times=20)
            tasks = [
                asyncio.create_task(images.generate(f"p{i}", size="64x64" if i % 3 else "16x16"))
                for i in range(100)
            ]
            for task in tasks:
                loop.call_later(rng.uniform(0, 0.15), task.cancel)
            for result in await asyncio.gather(*tasks, return_exceptions=True):
                if isinstance(result, asyncio.CancelledError):
                    outcomes["cancelled"] += 1
                elif isinstance(result, AtomaImagesError):
                    outcomes["error"] += 1
                else:
                    assert not isinstance(result, BaseException), repr(result)
                    outcomes["done"] += 1
        assert sum(outcomes.values()) == 1000, outcomes
        assert outcomes["cancelled"] > 100
        assert outcomes["done"] > 100
        # Nothing is left running, and every connection came back to the pool.
        await asyncio.sleep(0.05)
        # (The fake server shares this loop: its idle keep-alive handlers do not count.)
        left = [
            task
            for task in asyncio.all_tasks()
            if task is not asyncio.current_task()
            and not task.get_coro().__qualname__.startswith("RequestHandler.")  # type: ignore[union-attr]
        ]
        assert left == []
        server.reset()
        server.latency = 0
        await assert_pool_is_whole(images)


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_sustained_load_without_errors_or_leaks(server: FakeAtomaServer) -> None:
    calls = int(os.environ.get("ATOMA_IMAGES_LOAD_CALLS", "20000"))
    before = open_descriptors()
    slots = asyncio.Semaphore(500)
    errors: list[BaseException] = []

    async def one(index: int) -> None:
        async with slots:
            try:
                result = await images.generate(f"p{index}", size="16x16")
                assert result.images
            except Exception as exc:  # counted and reported below
                errors.append(exc)

    async with AsyncImagesClient(API_KEY, base_url=server.base_url) as images:
        await asyncio.gather(*(one(i) for i in range(calls)))
        during = open_descriptors()
    await asyncio.sleep(0.2)  # the server's ends close once they see ours go
    after = open_descriptors()
    assert errors == []
    assert len(server.posts) == calls
    assert during - before <= 2 * 100  # the pool (100) on both ends of loopback
    assert after - before <= 2  # closed: back where it started (give or take a lingering pair)
