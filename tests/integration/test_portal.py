"""`LoopThread`: the lifecycle of the loop that synchronous callers hand coroutines to."""

from __future__ import annotations

import asyncio
import inspect
import threading

import pytest

from atoma_images._portal import LoopThread

NAME = "atoma-images-portal-test"


def portal_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == NAME]


async def answer() -> int:
    return 42


async def forever() -> None:
    await asyncio.Event().wait()


def test_the_first_call_starts_the_thread_and_stop_joins_it() -> None:
    portal = LoopThread(NAME)
    assert portal_threads() == []
    assert portal.run(answer()) == 42
    (thread,) = portal_threads()
    portal.stop()
    assert not thread.is_alive()


def test_a_call_after_stop_raises_and_starts_no_thread() -> None:
    portal = LoopThread(NAME)
    portal.run(answer())
    portal.stop()
    late = answer()
    with pytest.raises(RuntimeError, match="the client is closed; create a new one"):
        portal.run(late)
    assert inspect.getcoroutinestate(late) == inspect.CORO_CLOSED  # not "never awaited"
    assert portal_threads() == []


def test_stop_before_any_call_is_final_too() -> None:
    portal = LoopThread(NAME)
    portal.stop()
    portal.stop()
    with pytest.raises(RuntimeError, match="closed"):
        portal.run(answer())
    assert portal_threads() == []


def test_stop_cancels_running_calls_before_it_runs_last() -> None:
    portal = LoopThread(NAME)
    order: list[str] = []
    outcome: list[BaseException] = []
    started = threading.Event()

    async def running() -> None:
        started.set()
        try:
            await forever()
        finally:
            order.append("call unwound")

    async def last() -> None:
        order.append("last")

    def call() -> None:
        try:
            portal.run(running())
        except RuntimeError as exc:
            outcome.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    started.wait(10)
    portal.stop(last())
    caller.join(10)
    assert order == ["call unwound", "last"]
    (error,) = outcome
    assert str(error) == "the call was cancelled: the client was closed while it ran"
    assert portal_threads() == []


def test_stop_without_waiting_still_runs_last_and_ends_the_thread() -> None:
    portal = LoopThread(NAME)
    portal.run(answer())
    (thread,) = portal_threads()
    ran = threading.Event()

    async def last() -> None:
        ran.set()

    portal.stop(last(), wait=False)
    thread.join(10)
    assert ran.is_set()
    assert not thread.is_alive()


def test_stop_of_a_portal_never_started_closes_last_unrun() -> None:
    portal = LoopThread(NAME)

    async def last() -> None:  # pragma: no cover - must not run
        raise AssertionError

    unrun = last()
    portal.stop(unrun)
    assert inspect.getcoroutinestate(unrun) == inspect.CORO_CLOSED
    assert portal_threads() == []


def test_a_synchronous_call_from_the_loop_thread_is_refused() -> None:
    portal = LoopThread(NAME)

    async def nested() -> str:
        inner = answer()
        try:
            portal.run(inner)
        except RuntimeError as exc:
            assert inspect.getcoroutinestate(inner) == inspect.CORO_CLOSED
            return str(exc)
        return "ran"  # pragma: no cover - a deadlock, really

    try:
        assert "from the client's own event loop" in portal.run(nested())
    finally:
        portal.stop()
