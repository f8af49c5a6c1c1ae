from __future__ import annotations

import asyncio
import inspect
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import CodeType, FrameType
from typing import TypeVar

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

from helpers import API_KEY, without_slow_step_notes
from pngcheck import png_size

T = TypeVar("T")


PORTAL_THREAD = "atoma-images"
CLOSED = "is closed; create a new"
CLOSED_WHILE_RUNNING = "the call was cancelled: the client was closed while it ran"


def portal_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == PORTAL_THREAD]


@pytest.fixture
def sync_client(threaded_server: FakeAtomaServer) -> Iterator[ImagesClient]:
    with ImagesClient(API_KEY, base_url=threaded_server.base_url) as images:
        yield images


def async_methods() -> list[str]:
    """The public coroutine methods of AsyncImagesClient; each has a blocking twin."""
    return [
        name
        for name, _ in inspect.getmembers(AsyncImagesClient, inspect.iscoroutinefunction)
        if not name.startswith("_")
    ]


def test_same_signatures_as_the_async_client() -> None:
    assert inspect.signature(ImagesClient.__init__) == inspect.signature(AsyncImagesClient.__init__)
    assert async_methods() == ["aclose", "download", "generate", "health", "models", "save_all"]
    for name in async_methods():
        twin = "close" if name == "aclose" else name
        assert inspect.signature(getattr(ImagesClient, twin)) == inspect.signature(
            getattr(AsyncImagesClient, name)
        ), name
    for name, member in inspect.getmembers(AsyncImagesClient, inspect.isdatadescriptor):
        if not name.startswith("_"):
            assert isinstance(member, property)
            assert isinstance(getattr(ImagesClient, name), property), name


def test_generate_many_takes_the_async_twins_arguments() -> None:
    sync, twin = (inspect.signature(c.generate_many) for c in (ImagesClient, AsyncImagesClient))
    assert sync.parameters == twin.parameters  # it returns a SyncBatch, not a Batch


@pytest.mark.parametrize(
    "name",
    [
        "close", "download", "generate", "generate_many", "health", "models", "save_all",
        "base_url", "budget", "dialect", "model", "rate_limit", "retries", "timeout", "usage",
    ],
)  # fmt: skip
def test_each_public_name_has_a_docstring_of_its_own(name: str) -> None:
    # Written in the source, so an editor shows it too; a method's names its async twin,
    # which documents the arguments and errors. What Ctrl-C does is said once, in the class.
    doc = getattr(ImagesClient, name).__doc__
    assert doc
    if name in ("download", "generate", "generate_many", "health", "models", "save_all"):
        assert f"`AsyncImagesClient.{name}`" in doc
    assert "Ctrl-C" in (ImagesClient.__doc__ or "")
    assert "never sent" in (ImagesClient.__doc__ or "")


def test_one_line_to_a_png(sync_client: ImagesClient, tmp_path: Path) -> None:
    path = sync_client.generate("a fox", size="48x32").images[0].save(tmp_path / "f.png")
    assert png_size(path) == (48, 32)


def test_sequential_calls_reuse_one_connection(
    sync_client: ImagesClient, threaded_server: FakeAtomaServer
) -> None:
    for index in range(100):
        assert isinstance(sync_client.generate(f"p{index}", size="16x16"), ImagesResponse)
    assert len(threaded_server.posts) == 100
    assert threaded_server.connections == 1


def test_works_inside_a_running_event_loop(sync_client: ImagesClient) -> None:
    async def notebook_cell() -> ImagesResponse:
        return sync_client.generate("inside a loop", size="16x16")  # as in Jupyter

    assert asyncio.run(notebook_cell()).images


def test_eight_threads_share_one_client_concurrently(
    sync_client: ImagesClient, threaded_server: FakeAtomaServer
) -> None:
    threaded_server.latency = 0.3
    results: list[ImagesResponse] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            results.append(sync_client.generate("t", size="16x16"))
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
        sync_client.generate("", size="16x16")
    threaded_server.enqueue(Reply(status=400))
    with pytest.raises(BadRequestError):
        sync_client.generate("fox", size="16x16")
    assert len(threaded_server.posts) == 1


def test_timeout_cancels_and_the_client_stays_usable(
    sync_client: ImagesClient, threaded_server: FakeAtomaServer
) -> None:
    threaded_server.enqueue(Reply(delay=3))
    with pytest.raises(AmbiguousTimeoutError):
        sync_client.generate("slow", size="16x16", timeout=0.2, retries=RetryPolicy(max_retries=0))
    assert sync_client.generate("fast", size="16x16").images


# -- Ctrl-C ----------------------------------------------------------------------------------
# Ctrl-C is SIGINT delivered to the main thread. These tests send it when the main thread is
# provably blocked waiting for its call (its stack, read with sys._current_frames), never
# after a guessed delay.

MAIN_THREAD_ONLY = pytest.mark.skipif(
    threading.current_thread() is not threading.main_thread(),
    reason="signals are handled in the main thread only",
)
GENERATE = ImagesClient.generate.__code__
WAIT = threading.Condition.wait.__code__


def main_stack() -> list[FrameType]:
    """The main thread's frames, innermost first."""
    frame = sys._current_frames().get(threading.main_thread().ident or 0)
    stack = []
    while frame is not None:
        stack.append(frame)
        frame = frame.f_back
    return stack


def main_blocked_in(code: CodeType) -> FrameType | None:
    """The main thread's innermost frame if it is blocked in a wait inside ``code``."""
    stack = main_stack()
    if stack and stack[0].f_code is WAIT and any(frame.f_code is code for frame in stack):
        return stack[0]
    return None


def main_inside(code: CodeType) -> bool:
    return any(frame.f_code is code for frame in main_stack())


def until(condition: Callable[[], T | None], what: str) -> T:
    """Poll ``condition`` until it holds (a truthy value); fail after 10 s."""
    deadline = time.monotonic() + 10
    while not (found := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.001)
    return found


def ctrl_c() -> None:
    signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)


async def running_loop() -> asyncio.AbstractEventLoop:
    return asyncio.get_running_loop()


async def other_tasks() -> int:
    return len(asyncio.all_tasks()) - 1


@MAIN_THREAD_ONLY
def test_ctrl_c_while_the_loop_is_busy_raises_it_and_sends_nothing(
    threaded_server: FakeAtomaServer,
) -> None:
    problems: list[BaseException] = []

    def hold_the_loop() -> None:
        # Runs on the client's loop thread: the call below cannot start before this returns.
        try:
            waiting = until(lambda: main_blocked_in(GENERATE), "the call waits")
            ctrl_c()
            # Hold on until the caller has dealt with Ctrl-C: it left the call, or it waits
            # anew (for the call to unwind).
            until(
                lambda: (
                    not main_inside(GENERATE) or main_blocked_in(GENERATE) not in (None, waiting)
                ),
                "the caller handled Ctrl-C",
            )
        except BaseException as exc:  # pragma: no cover - reported below
            problems.append(exc)

    with ImagesClient(API_KEY, base_url=threaded_server.base_url) as images:
        # A warm connection: the call would not pause to connect, so once the loop is free
        # it would write its POST at once, before a cancellation could reach it. Only the
        # call's own check that it was abandoned keeps it from being sent.
        assert images.generate("warm", size="16x16").images
        (warm,) = threaded_server.posts
        threaded_server.reset()
        images._portal.run(running_loop()).call_soon_threadsafe(hold_the_loop)
        with pytest.raises(KeyboardInterrupt):
            images.generate("interrupted before it was sent", size="16x16")
        assert images._portal.run(other_tasks()) == 0
        assert threaded_server.posts == []
        assert images.generate("next", size="16x16").images  # the client stays usable
    assert problems == []
    # The interrupted request never reached the server, not even later than this call (had
    # it been written, it would have been before "next" was), and "next" went over the warm
    # connection, which the interrupted call had left untouched.
    assert [post.json()["prompt"] for post in threaded_server.posts] == ["next"]
    assert threaded_server.posts[0].peer == warm.peer


@MAIN_THREAD_ONLY
def test_ctrl_c_cancels_a_request_under_way_and_the_next_call_works(
    threaded_server: FakeAtomaServer,
) -> None:
    threaded_server.enqueue(Reply(delay=30))
    problems: list[BaseException] = []

    def interrupt_once_sent() -> None:
        try:
            until(lambda: threaded_server.posts and main_blocked_in(GENERATE), "the POST is in")
            ctrl_c()
        except BaseException as exc:  # pragma: no cover - reported below
            problems.append(exc)

    with ImagesClient(API_KEY, base_url=threaded_server.base_url, max_connections=1) as images:
        interrupter = threading.Thread(target=interrupt_once_sent)
        interrupter.start()
        started = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            images.generate("interrupted", size="16x16")
        assert time.monotonic() - started < 20  # did not wait for the 30 s answer
        interrupter.join()
        # Nothing is left running on the client's loop...
        assert images._portal.run(other_tasks()) == 0
        # ...and its only connection was released: the next call goes through.
        assert images.generate("next", size="16x16").images
    assert problems == []
    assert len(threaded_server.posts) == 2


def test_close_is_idempotent_and_final(threaded_server: FakeAtomaServer) -> None:
    images = ImagesClient(API_KEY, base_url=threaded_server.base_url)
    images.generate("fox", size="16x16")
    (thread,) = portal_threads()
    images.close()
    images.close()
    assert not thread.is_alive()
    with pytest.raises(RuntimeError, match=CLOSED):
        images.generate("fox", size="16x16")
    assert portal_threads() == []


def test_unclosed_client_warns_and_cleans_up_without_hanging(
    threaded_server: FakeAtomaServer,
) -> None:
    import gc

    images = ImagesClient(API_KEY, base_url=threaded_server.base_url)
    images.generate("fox", size="16x16")
    (thread,) = portal_threads()
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
        print(len(client.generate("fox", size="16x16").images))
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
    assert without_slow_step_notes(done.stderr) == ""
    assert time.monotonic() - started < 15


def call_in_thread(images: ImagesClient, outcome: list[object]) -> threading.Thread:
    def call() -> None:
        try:
            outcome.append(images.generate("cut short", size="16x16"))
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    return thread


def test_closing_during_a_retry_wait_gives_a_clear_error(
    threaded_server: FakeAtomaServer,
) -> None:
    threaded_server.enqueue(Reply(status=503, headers={"Retry-After": "1"}))
    waiting = threading.Event()

    async def sleep_until_closed(seconds: float) -> None:
        waiting.set()
        await asyncio.Event().wait()

    images = ImagesClient(
        API_KEY, base_url=threaded_server.base_url, retries=RetryPolicy(sleep=sleep_until_closed)
    )
    outcome: list[object] = []
    worker = call_in_thread(images, outcome)
    assert waiting.wait(10)
    images.close()
    worker.join(10)
    assert not worker.is_alive()
    (error,) = outcome
    assert isinstance(error, RuntimeError)
    assert str(error) == CLOSED_WHILE_RUNNING
    assert len(threaded_server.posts) == 1


def test_closing_during_a_request_cancels_it_before_the_session_closes(
    threaded_server: FakeAtomaServer,
) -> None:
    threaded_server.enqueue(Reply(delay=30))
    images = ImagesClient(API_KEY, base_url=threaded_server.base_url)
    outcome: list[object] = []
    worker = call_in_thread(images, outcome)
    until(lambda: threaded_server.posts, "the POST is in")
    images.close()
    worker.join(10)
    (error,) = outcome
    # Not an APIConnectionError from a session closed under the request.
    assert isinstance(error, RuntimeError)
    assert str(error) == CLOSED_WHILE_RUNNING
    assert portal_threads() == []


def close_while_eight_threads_call(server: FakeAtomaServer) -> list[BaseException]:
    """Close a client while 8 threads call it over and over; each thread's final error."""
    images = ImagesClient(API_KEY, base_url=server.base_url)
    errors: list[BaseException] = []
    ready = threading.Barrier(9)

    def hammer() -> None:
        ready.wait()
        while True:
            try:
                images.generate("race", size="16x16")
            except BaseException as exc:
                errors.append(exc)
                return

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for thread in threads:
        thread.start()
    ready.wait()
    enough = len(server.posts) + 16
    until(lambda: len(server.posts) >= enough, "calls are under way")
    images.close()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads)
    return errors


def test_calls_racing_close_complete_or_fail_clearly_and_leave_no_thread(
    threaded_server: FakeAtomaServer,
) -> None:
    for _ in range(20):
        errors = close_while_eight_threads_call(threaded_server)
        assert len(errors) == 8
        for error in errors:
            assert isinstance(error, RuntimeError), repr(error)
            assert CLOSED in str(error) or str(error) == CLOSED_WHILE_RUNNING
        assert portal_threads() == []


def _generate_in_child(images: ImagesClient) -> None:
    # Runs in a forked child: exit code 0 if the inherited client works there.
    images.generate("child", size="16x16")


# Python 3.12+ warns before forking a process that runs threads (as this one does: the fake
# server's and the client's); forking such a process is what this test is about.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_client_used_in_a_forked_child_works_there_and_in_the_parent(
    threaded_server: FakeAtomaServer,
) -> None:
    import multiprocessing

    with ImagesClient(API_KEY, base_url=threaded_server.base_url, timeout=30) as images:
        images.generate("parent before", size="16x16")  # the portal runs, a connection is pooled
        child = multiprocessing.get_context("fork").Process(
            target=_generate_in_child, args=(images,)
        )
        child.start()
        child.join(60)
        if child.is_alive():  # it hangs: fail, rather than hang the suite
            child.kill()
            child.join()
            pytest.fail("the forked child's call never ended")
        assert child.exitcode == 0
        for number in range(3):  # the parent's pooled connection is still its own
            images.generate(f"parent after {number}", size="16x16")
    prompts = [post.json()["prompt"] for post in threaded_server.posts]
    assert prompts == ["parent before", "child", *(f"parent after {n}" for n in range(3))]


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_that_exits_normally_leaves_the_parents_connections_alone(
    tmp_path: Path,
) -> None:
    # A child that ends by sys.exit (a gunicorn worker) runs its finalisers; what it inherited
    # must not close the parent's pooled connection on its way out.
    script = textwrap.dedent(
        """
        import os, sys
        from atoma_images import ImagesClient
        from atoma_images.testing import FakeAtomaServer

        # Not "with": the child must not stop the server it inherited (its thread is the
        # parent's).
        server = FakeAtomaServer(api_key="k").__enter__()
        images = ImagesClient("k", base_url=server.base_url, timeout=10)
        images.generate("parent before", size="16x16")
        if os.fork() == 0:
            images.generate("child", size="16x16")
            sys.exit(0)
        _, status = os.wait()
        assert os.waitstatus_to_exitcode(status) == 0, status
        for number in range(3):
            images.generate(f"parent after {number}", size="16x16")
        print(len(server.posts))
        images.close()
        server.__exit__(None, None, None)
        """
    )
    done = subprocess.run(
        [sys.executable, "-W", "error", "-W", "ignore::DeprecationWarning", "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["5"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX only")
def test_a_child_forked_after_the_key_left_the_environment_still_works(
    threaded_server: FakeAtomaServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Hygiene: a parent may remove the key from its environment once its clients are made.
    monkeypatch.setenv("ATOMA_API_KEY", API_KEY)
    monkeypatch.setenv("ATOMA_BASE_URL", threaded_server.base_url)
    with ImagesClient() as client:
        client.generate("warm-up", size="16x16")
        monkeypatch.delenv("ATOMA_API_KEY")
        context = multiprocessing.get_context("fork")
        results = context.Queue()

        def child() -> None:
            try:
                client.generate("from the child", size="16x16")
                results.put("ok")
            except Exception as exc:
                results.put(repr(exc))

        process = context.Process(target=child)
        process.start()
        process.join(60)
        assert process.exitcode == 0, "the child hung or died"
        assert results.get(timeout=5) == "ok"
