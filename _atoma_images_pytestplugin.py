"""The pytest plugin of atoma-images: the fixtures ``atoma_server``, ``atoma_client`` and
``atoma_sync_client``, documented in their public home, `atoma_images.pytest_plugin`.

pytest imports this module in every run of every project that has the package installed, so
it is a small top-level module (as Hypothesis ships ``_hypothesis_pytestplugin``): loading it
imports only pytest and the standard library, never ``atoma_images`` nor aiohttp. The fixtures
import the rest when a test uses them; while one is in use, retries skip their waits, and each
closes what it opened.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Callable, Coroutine, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from atoma_images import AsyncImagesClient, AttemptStarted, ImagesClient
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
def atoma_client(
    atoma_server: FakeAtomaServer, request: pytest.FixtureRequest
) -> Iterator[AsyncImagesClient]:
    """An `AsyncImagesClient` bound to ``atoma_server``, closed with the test's event loop.

    The test fails if it calls one of the client's coroutine methods without awaiting it.
    """
    from atoma_images import AsyncImagesClient, Hooks  # noqa: PLC0415

    closer = _CloseWithLoop()

    class StartCloser(Hooks):  # defined here so that Hooks loads with the fixture
        def attempt_started(self, info: AttemptStarted) -> None:
            closer.start()

    client = closer.client = AsyncImagesClient(
        ATOMA_TEST_KEY, base_url=atoma_server.base_url, hooks=[StartCloser()]
    )
    request.node.stash[_CALLS] = calls = _Calls(client)
    yield client
    calls.close_never_awaited()  # after a failed test too: no "was never awaited" warning
    closer.close()


@pytest.fixture
def atoma_sync_client(atoma_server: FakeAtomaServer) -> Iterator[ImagesClient]:
    """An `ImagesClient` bound to ``atoma_server``, closed after the test."""
    from atoma_images import ImagesClient  # noqa: PLC0415

    with ImagesClient(ATOMA_TEST_KEY, base_url=atoma_server.base_url) as client:
        yield client


class _CloseWithLoop:
    """Closes a client in the event loop it was used in, before that loop closes.

    A client's session belongs to the loop of its first call, and the runners of
    pytest-asyncio and anyio close the test's loop before a plain fixture's teardown. They
    (like ``asyncio.run``) first cancel the tasks left and wait for them: so on the first
    call this starts a task that waits until it is cancelled, then closes the client.
    """

    def __init__(self) -> None:
        self.client: AsyncImagesClient | None = None
        self.guard: asyncio.Task[None] | None = None

    def start(self) -> None:
        """At each attempt (in the client's loop): start the guard, once."""
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


class _Calls:
    """The coroutines one client's coroutine methods returned, to find those never awaited.

    Each public coroutine method of that client (not of its class) is wrapped to keep what it
    returns: a coroutine never awaited stays alive, so it can be named, then closed.
    """

    def __init__(self, client: AsyncImagesClient) -> None:
        self.returned: list[tuple[str, Coroutine[Any, Any, Any]]] = []
        for name, _ in inspect.getmembers(type(client), inspect.iscoroutinefunction):
            if not name.startswith("_"):
                setattr(client, name, self._kept(name, getattr(client, name)))

    def _kept(
        self, name: str, method: Callable[..., Coroutine[Any, Any, Any]]
    ) -> Callable[..., Coroutine[Any, Any, Any]]:
        @functools.wraps(method)
        def call(*args: Any, **kwargs: Any) -> Coroutine[Any, Any, Any]:
            coroutine = method(*args, **kwargs)
            self.returned.append((name, coroutine))
            return coroutine

        return call

    def close_never_awaited(self) -> list[str]:
        """Close the coroutines never started; the names of their methods, each once."""
        names: list[str] = []
        for name, coroutine in self.returned:
            if inspect.getcoroutinestate(coroutine) == inspect.CORO_CREATED:
                coroutine.close()  # closed, it no longer warns when collected
                names.append(name)
        return list(dict.fromkeys(names))


_CALLS = pytest.StashKey[_Calls]()


@pytest.hookimpl(trylast=True)
def pytest_runtest_call(item: pytest.Item) -> None:
    # Last of the test's call hooks, so it runs only when the test itself passed (an error
    # from using the coroutine says enough), and the test fails rather than its teardown.
    # A plain hook, not a wrapper: it loads with any pluggy a user's pytest may bring.
    calls = item.stash.get(_CALLS, None)
    never_awaited = calls.close_never_awaited() if calls is not None else []
    if never_awaited:
        fixes = [f"`await atoma_client.{name}(...)`" for name in never_awaited]
        pytest.fail(
            f"a call of atoma_client was never awaited: write {' and '.join(fixes)}", pytrace=False
        )
