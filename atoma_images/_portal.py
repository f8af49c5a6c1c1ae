"""An event loop in a daemon thread, and a way for synchronous code to run coroutines on it.

An aiohttp session belongs to one loop, so synchronous callers cannot use ``asyncio.run()``
per call (a new loop each time) nor run a loop of their own where one is already running
(Jupyter). They hand each coroutine to this one long-lived loop instead, with
`asyncio.run_coroutine_threadsafe`.

The portal's life is explicit, as httpx keeps its client's: NOT_STARTED until the first call
starts the thread, RUNNING, then CLOSED, which is final: nothing restarts a thread after
`LoopThread.stop`. The state changes, and every call is scheduled, under one lock, so a call
racing `stop` either was scheduled before the loop stopped (and is cancelled and unwound with
it) or sees CLOSED.

A forked child inherits the portal's loop but not its thread, so a call there would wait for
ever: `LoopThread.forget_in_child` gives the child a portal of its own (NOT_STARTED, a new
lock), and hands back what it inherited, which the child must keep, unused and unclosed (its
sockets and its epoll are the parent's too: closing them in the child would cut the parent's).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import enum
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["CLOSED_MESSAGE", "LoopThread", "PortalState"]

T = TypeVar("T")

CLOSED_MESSAGE = "the client is closed; create a new one"
_CANCELLED_MESSAGE = "the call was cancelled: the client was closed while it ran"
# How long a cancelled call may take to unwind (release its connection) before we stop
# waiting for it; unwinding is local work, so this is never reached in practice.
_UNWIND_SECONDS = 10.0


class PortalState(enum.Enum):
    NOT_STARTED = 1
    RUNNING = 2
    CLOSED = 3


class LoopThread:
    """Starts its loop on first use; `stop` ends it for good. Safe from many threads at once."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._lock = threading.Lock()
        self._state = PortalState.NOT_STARTED
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def state(self) -> PortalState:
        return self._state

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop thread and wait for its result.

        If the waiting thread is interrupted (Ctrl-C), the call is cancelled: one the loop had
        not started yet never starts (so a request not yet sent is never sent), one under way
        is cancelled and waited for until it has unwound (its connection released). Then the
        interruption is raised again.
        """
        abandoned = threading.Event()  # set by the caller: the call must not start
        unwound = threading.Event()  # set on the loop: the call has ended, however

        async def unless_abandoned() -> T:
            try:
                if abandoned.is_set():
                    raise asyncio.CancelledError
                return await coro
            finally:
                coro.close()  # a no-op once it ran; never "was never awaited"
                unwound.set()

        with self._lock:
            if threading.current_thread() is self._thread:
                coro.close()
                raise RuntimeError(
                    "a synchronous call was made from the client's own event loop; await the "
                    "async client there instead"
                )
            loop = self._running_loop(coro)
            future = asyncio.run_coroutine_threadsafe(unless_abandoned(), loop)
        try:
            return future.result()
        except concurrent.futures.CancelledError:  # stop() cancelled it
            raise RuntimeError(_CANCELLED_MESSAGE) from None
        except BaseException:
            # Interrupted while waiting (Ctrl-C): cancel the call, and wait until it is over.
            abandoned.set()
            future.cancel()
            unwound.wait(_UNWIND_SECONDS)
            raise

    def _running_loop(self, coro: Coroutine[Any, Any, Any]) -> asyncio.AbstractEventLoop:
        """The loop, started on the first call; called with the lock held."""
        if self._state is PortalState.CLOSED:
            coro.close()
            raise RuntimeError(CLOSED_MESSAGE)
        if self._state is PortalState.NOT_STARTED:
            loop = asyncio.new_event_loop()
            started = threading.Event()
            thread = threading.Thread(
                target=_serve, args=(loop, started), name=self._name, daemon=True
            )
            thread.start()
            started.wait()
            self._loop, self._thread, self._state = loop, thread, PortalState.RUNNING
        assert self._loop is not None
        return self._loop

    def forget_in_child(self) -> asyncio.AbstractEventLoop | None:
        """In a forked child: start afresh, and return the loop inherited from the parent.

        The loop's thread did not survive the fork, and the lock may have been held by a
        thread that did not either. A closed portal stays closed; any other is NOT_STARTED
        again, so the next call starts a loop and a thread of the child's own.
        """
        inherited = self._loop
        self._lock = threading.Lock()
        if self._state is not PortalState.CLOSED:
            self._state = PortalState.NOT_STARTED
        self._loop = self._thread = None
        return inherited

    def stop(self, last: Coroutine[Any, Any, object] | None = None, *, wait: bool = True) -> None:
        """Close the portal for good: cancel what still runs, run ``last``, end the thread.

        ``last`` (closing the client's session, say) runs after every running call has been
        cancelled and has unwound. With ``wait=False`` (for a finaliser, which must not block)
        this returns at once and the thread ends by itself. Safe to repeat.
        """
        with self._lock:
            state, self._state = self._state, PortalState.CLOSED
            loop, thread = self._loop, self._thread
        if state is not PortalState.RUNNING or loop is None or thread is None:
            if last is not None:
                last.close()
            return
        stopped = asyncio.run_coroutine_threadsafe(_cancel_all_then(last), loop)
        stopped.add_done_callback(lambda _: loop.call_soon_threadsafe(loop.stop))
        if wait and thread is not threading.current_thread():
            thread.join()


async def _cancel_all_then(last: Coroutine[Any, Any, object] | None) -> None:
    this = asyncio.current_task()
    running = [task for task in asyncio.all_tasks() if task is not this]
    for task in running:
        task.cancel()
    await asyncio.gather(*running, return_exceptions=True)
    if last is not None:
        with contextlib.suppress(Exception):  # closing is best effort; the loop ends anyway
            await last
    # A transport closed by what was cancelled closes its socket a loop step or two later:
    # let those steps run before the loop stops, so that no socket outlives it.
    for _ in range(3):
        await asyncio.sleep(0)


def _serve(loop: asyncio.AbstractEventLoop, started: threading.Event) -> None:
    asyncio.set_event_loop(loop)
    loop.call_soon(started.set)
    try:
        loop.run_forever()
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()
