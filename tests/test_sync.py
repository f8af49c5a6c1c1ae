from __future__ import annotations

import asyncio
import inspect
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from atoma_images import (
    AmbiguousTimeoutError,
    AsyncImagesClient,
    BadRequestError,
    ImagesClient,
    ImagesResponse,
    InvalidRequestError,
    RetryPolicy,
)
from atoma_images.testing import FakeAtomaServer, Reply

from conftest import API_KEY
from pngcheck import png_size


@pytest.fixture
def sync_client(threaded_server: FakeAtomaServer) -> Iterator[ImagesClient]:
    with ImagesClient(API_KEY, base_url=threaded_server.base_url) as images:
        yield images


def test_same_signatures_as_the_async_client() -> None:
    assert inspect.signature(ImagesClient.__init__) == inspect.signature(AsyncImagesClient.__init__)
    assert inspect.signature(ImagesClient.generate) == inspect.signature(AsyncImagesClient.generate)


def test_one_line_to_a_png(sync_client: ImagesClient, tmp_path: Path) -> None:
    path = sync_client.generate("a fox", size="40x30").images[0].save(tmp_path / "f.png")
    assert png_size(path) == (40, 30)


def test_sequential_calls_reuse_one_connection(
    sync_client: ImagesClient, threaded_server: FakeAtomaServer
) -> None:
    for index in range(100):
        assert isinstance(sync_client.generate(f"p{index}", size="8x8"), ImagesResponse)
    assert len(threaded_server.posts) == 100
    assert threaded_server.connections == 1


def test_works_inside_a_running_event_loop(sync_client: ImagesClient) -> None:
    async def notebook_cell() -> ImagesResponse:
        return sync_client.generate("inside a loop", size="8x8")  # as in Jupyter

    assert asyncio.run(notebook_cell()).images


def test_eight_threads_share_one_client_concurrently(
    sync_client: ImagesClient, threaded_server: FakeAtomaServer
) -> None:
    threaded_server.latency = 0.3
    results: list[ImagesResponse] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            results.append(sync_client.generate("t", size="8x8"))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert len(results) == 8
    assert threaded_server.peak_in_flight == 8


def test_same_errors_as_the_async_client(
    sync_client: ImagesClient, threaded_server: FakeAtomaServer
) -> None:
    with pytest.raises(InvalidRequestError):
        sync_client.generate("", size="8x8")
    threaded_server.enqueue(Reply(status=400))
    with pytest.raises(BadRequestError):
        sync_client.generate("fox", size="8x8")
    assert len(threaded_server.posts) == 1


def test_timeout_cancels_and_the_client_stays_usable(
    sync_client: ImagesClient, threaded_server: FakeAtomaServer
) -> None:
    threaded_server.enqueue(Reply(delay=3))
    with pytest.raises(AmbiguousTimeoutError):
        sync_client.generate("slow", size="8x8", timeout=0.2, retries=RetryPolicy(max_retries=0))
    assert sync_client.generate("fast", size="8x8").images


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals")
def test_ctrl_c_cancels_the_request_and_the_next_call_works(
    threaded_server: FakeAtomaServer,
) -> None:
    threaded_server.enqueue(Reply(delay=5))
    with ImagesClient(API_KEY, base_url=threaded_server.base_url, max_connections=1) as images:
        timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        started = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            images.generate("interrupted", size="8x8")
        assert time.monotonic() - started < 4  # did not wait for the 5 s answer
        # Nothing is left running on the client's loop...
        assert images._portal.run(_other_tasks()) == 0
        # ...and its only connection was released: the next call goes through.
        assert images.generate("next", size="8x8").images
    assert len(threaded_server.posts) == 2


async def _other_tasks() -> int:
    return len(asyncio.all_tasks()) - 1


def test_close_is_idempotent_and_final(threaded_server: FakeAtomaServer) -> None:
    images = ImagesClient(API_KEY, base_url=threaded_server.base_url)
    images.generate("fox", size="8x8")
    thread = images._portal._thread
    images.close()
    images.close()
    assert thread is not None
    assert not thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        images.generate("fox", size="8x8")


def test_unclosed_client_warns_and_cleans_up_without_hanging(
    threaded_server: FakeAtomaServer,
) -> None:
    import gc

    images = ImagesClient(API_KEY, base_url=threaded_server.base_url)
    images.generate("fox", size="8x8")
    thread = images._portal._thread
    assert thread is not None
    with pytest.warns(ResourceWarning, match="unclosed <ImagesClient"):  # noqa: PT031
        del images
        gc.collect()
    thread.join(5)
    assert not thread.is_alive()


def test_a_session_is_refused_with_a_reason() -> None:
    async def make() -> None:
        import aiohttp

        async with aiohttp.ClientSession() as session:
            with pytest.raises(InvalidRequestError, match="runs its own event loop"):
                ImagesClient("k", session=session)

    asyncio.run(make())


def test_script_that_never_closes_exits_promptly_and_quietly() -> None:
    script = textwrap.dedent(
        """
        from atoma_images import ImagesClient
        from atoma_images.testing import FakeAtomaServer

        server = FakeAtomaServer().__enter__()
        client = ImagesClient("k", base_url=server.base_url)
        print(len(client.generate("fox", size="8x8").images))
        """
    )
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-X", "dev", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1"
    assert done.stderr == ""
    assert time.monotonic() - started < 15


def test_closing_during_a_retry_wait_gives_a_clear_error(
    threaded_server: FakeAtomaServer,
) -> None:
    threaded_server.enqueue(Reply(status=503, headers={"Retry-After": "30"}))
    outcome: list[BaseException] = []
    images = ImagesClient(API_KEY, base_url=threaded_server.base_url)

    def call() -> None:
        try:
            images.generate("waits 30 s before its retry", size="8x8")
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=call)
    worker.start()
    while not threaded_server.posts:
        time.sleep(0.01)
    time.sleep(0.1)  # now in the retry wait
    images.close()
    worker.join(10)
    assert not worker.is_alive()
    (error,) = outcome
    assert isinstance(error, RuntimeError)
    assert "client was closed" in str(error)
