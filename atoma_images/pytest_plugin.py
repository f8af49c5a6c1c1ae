"""pytest fixtures for testing code that uses atoma-images, offline and without a key.

Installing the package registers this plugin (the ``pytest11`` entry point):

```python
def test_my_thumbnailer(atoma_sync_client, atoma_server):
    make_thumbnail(atoma_sync_client, "a red fox")
    assert atoma_server.posts[0].json()["size"] == "256x256"
```

- ``atoma_server``: a running `FakeAtomaServer` (on its own thread), scriptable with
  ``atoma_server.enqueue(Reply(...))``;
- ``atoma_client``: an `AsyncImagesClient` bound to it, for async tests (pytest-asyncio,
  anyio or any runner that runs the test in an asyncio loop);
- ``atoma_sync_client``: an `ImagesClient` bound to it.

While a fixture is in use, retries skip their waits (`atoma_images.testing.set_testing`),
so code that meets a scripted 429 or 503 retries at once. Each fixture closes what it opened.
The fake server is imported only when a test asks for a fixture.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

# The fake server (and its confidential node) loads only when a test asks for a fixture.
from atoma_images import AttemptStarted, Hooks

if TYPE_CHECKING:
    from atoma_images import AsyncImagesClient, ImagesClient
    from atoma_images.testing import FakeAtomaServer

__all__ = ["ATOMA_TEST_KEY", "atoma_client", "atoma_server", "atoma_sync_client"]

#: The key the fixtures' server accepts and their clients send.
ATOMA_TEST_KEY = "sk-atoma-test"


@pytest.fixture
def atoma_server() -> Iterator[FakeAtomaServer]:
    """A running fake Atoma server; retries skip their waits while it runs."""
    from atoma_images.testing import FakeAtomaServer, set_testing  # noqa: PLC0415

    with set_testing(True), FakeAtomaServer(api_key=ATOMA_TEST_KEY) as server:
        yield server


@pytest.fixture
def atoma_client(atoma_server: FakeAtomaServer) -> Iterator[AsyncImagesClient]:
    """An `AsyncImagesClient` bound to ``atoma_server``, closed with the test's event loop."""
    from atoma_images import AsyncImagesClient  # noqa: PLC0415

    closer = _CloseWithLoop()
    client = closer.client = AsyncImagesClient(
        ATOMA_TEST_KEY, base_url=atoma_server.base_url, hooks=[closer]
    )
    yield client
    closer.close()


class _CloseWithLoop(Hooks):
    """Closes a client in the event loop it was used in, before that loop closes.

    A client's session belongs to the loop of its first call, and the runners of
    pytest-asyncio and anyio close the test's loop before a plain fixture's teardown. They
    (like ``asyncio.run``) first cancel the tasks left and wait for them: so on the first
    call this starts a task that waits until it is cancelled, then closes the client.
    """

    def __init__(self) -> None:
        self.client: AsyncImagesClient | None = None
        self.guard: asyncio.Task[None] | None = None

    def attempt_started(self, info: AttemptStarted) -> None:
        if self.guard is None:
            self.guard = asyncio.get_running_loop().create_task(self._close_when_cancelled())

    async def _close_when_cancelled(self) -> None:
        try:
            await asyncio.Event().wait()
        finally:
            assert self.client is not None  # set before any call
            await self.client.aclose()

    def close(self) -> None:
        """At teardown: close the client now, unless its loop already did."""
        guard, client = self.guard, self.client
        assert client is not None
        if guard is None:  # never called: no session, nothing bound to a loop
            asyncio.run(client.aclose())
        elif not guard.done():
            loop = guard.get_loop()
            if loop.is_closed() or loop.is_running():
                raise RuntimeError(
                    "atoma_client could not be closed: its event loop is gone or still running"
                )
            guard.cancel()
            loop.run_until_complete(asyncio.gather(guard, return_exceptions=True))


@pytest.fixture
def atoma_sync_client(atoma_server: FakeAtomaServer) -> Iterator[ImagesClient]:
    """An `ImagesClient` bound to ``atoma_server``, closed after the test."""
    from atoma_images import ImagesClient  # noqa: PLC0415

    with ImagesClient(ATOMA_TEST_KEY, base_url=atoma_server.base_url) as client:
        yield client
