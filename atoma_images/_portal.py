"""An event loop in a daemon thread, and a way for synchronous code to run coroutines on it.

An aiohttp session belongs to one loop, so synchronous callers cannot use ``asyncio.run()``
per call (a new loop each time) nor run a loop of their own where one is already running
(Jupyter). They hand each coroutine to this one long-lived loop instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["LoopThread"]

T = TypeVar("T")

# How long a cancelled call may take to unwind (release its connection) before we give up
# waiting for it; unwinding is local work, so this is never reached in practice.
_UNWIND_SECONDS = 10.0


class LoopThread:
    """Starts its loop on first use; `stop` ends it. Safe to use from many threads at once."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _start(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                started = threading.Event()
                thread = threading.Thread(
                    target=self._serve, args=(loop, started), name=self._name, daemon=True
                )
                thread.start()
                started.wait()
                self._loop, self._thread = loop, thread
            return self._loop

    @staticmethod
    def _serve(loop: asyncio.AbstractEventLoop, started: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(started.set)
        try:
            loop.run_forever()
            # Whatever is still running is cancelled and allowed to unwind.
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop thread and wait for its result.

        If the waiting thread is interrupted (Ctrl-C), the coroutine is cancelled and this
        waits until it has unwound, so no request is left running, then re-raises.
        """
        loop = self._start()
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError(
                "a synchronous call was made from the client's own event loop; await the "
                "async client there instead"
            )
        done = threading.Event()
        tasks: list[asyncio.Task[T]] = []

        def launch() -> None:
            task = loop.create_task(coro)
            task.add_done_callback(lambda _: done.set())
            tasks.append(task)

        loop.call_soon_threadsafe(launch)
        try:
            done.wait()  # interruptible: Ctrl-C lands here
        except BaseException:
            # Callbacks run in order, so launch() has run by the time this one does.
            loop.call_soon_threadsafe(tasks[0].cancel)
            done.wait(_UNWIND_SECONDS)
            raise
        if tasks[0].cancelled():  # the loop was stopped (the client closed) mid-call
            raise RuntimeError("the call was cancelled: the client was closed while it ran")
        return tasks[0].result()

    def stop(self) -> None:
        """Stop the loop (cancelling what still runs) and join its thread. Safe to repeat."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            return
        if thread is threading.current_thread():
            loop.stop()
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join()

    def stop_after(self, coro: Coroutine[Any, Any, object]) -> None:
        """Run ``coro`` on the loop, then stop it, without waiting (for finalisers)."""
        with self._lock:
            loop = self._loop
            self._loop = self._thread = None
        if loop is None:
            coro.close()
            return

        async def last() -> None:
            try:
                await coro
            finally:
                loop.stop()

        with contextlib.suppress(RuntimeError):  # the loop is already closed
            loop.call_soon_threadsafe(loop.create_task, last())
