"""generate_many: many prompts, bounded in flight, never stopped by one failure, closed cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import tracemalloc
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
from aiohttp import web

from atoma_images import (
    AsyncImagesClient,
    BadRequestError,
    BatchResult,
    Budget,
    BudgetExceededError,
    ImageRequest,
    ImagesClient,
    InvalidRequestError,
    RetryPolicy,
    ServiceUnavailableError,
    Timeout,
)
from atoma_images.testing import FakeAtomaServer, Reply

from helpers import API_KEY, FakeSleep, serving

UNITS_16X16 = 256


async def test_200_prompts_at_concurrency_8_with_10_percent_failures(
    client: AsyncImagesClient, server: FakeAtomaServer
) -> None:
    for number in range(200):
        # Every tenth request is refused; the others take a moment, so calls overlap.
        server.enqueue(Reply(status=400) if number % 10 == 0 else Reply(delay=0.01))
    prompts = [f"prompt {number}" for number in range(200)]
    results: list[BatchResult] = []
    async with client.generate_many(prompts, concurrency=8, size="16x16") as batch:
        async for result in batch:
            results.append(result)
    assert len(results) == 200
    assert sorted(result.index for result in results) == list(range(200))
    assert all(result.prompt == prompts[result.index] for result in results)
    responses = [result for result in results if result.ok]
    assert len(responses) == 180
    failed = [result for result in results if not result.ok]
    assert all(isinstance(result.error, BadRequestError) for result in failed)
    assert not any(result.may_have_been_billed for result in failed)
    assert 1 < server.peak_in_flight <= 8
    assert len(server.posts) == 200
    assert batch.summary.responses == 180
    assert batch.summary.compute_units == 180 * UNITS_16X16 == client.usage.compute_units


def _lazy_prompts(count: int) -> Iterator[str]:
    for number in range(count):
        yield f"prompt {number}"


async def test_a_million_prompts_are_read_lazily_and_a_break_stops_the_batch(
    client: AsyncImagesClient, server: FakeAtomaServer
) -> None:
    tracemalloc.start()
    try:
        async with client.generate_many(
            _lazy_prompts(1_000_000), concurrency=8, size="16x16"
        ) as batch:
            seen = 0
            async for _ in batch:
                seen += 1
                if seen == 50:
                    break
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # A million prompt strings held at once would take ~60 MB.
    assert peak < 8 * 2**20, peak
    assert 50 <= len(server.posts) <= 50 + 8
    assert batch.summary.results == 50
    await asyncio.sleep(0.05)  # nothing goes on in the background
    assert len(server.posts) <= 50 + 8


async def test_an_async_source_and_a_plain_async_for_with_aclose(
    client: AsyncImagesClient, server: FakeAtomaServer
) -> None:
    async def prompts() -> AsyncIterator[str]:
        for number in range(1000):
            await asyncio.sleep(0)
            yield f"prompt {number}"

    batch = client.generate_many(prompts(), concurrency=3, size="16x16")
    seen = [result async for result in _first(batch, 10)]
    await batch.aclose()
    assert len(seen) == 10
    assert len(server.posts) <= 10 + 3


async def test_a_plain_async_for_left_by_break_cancels_what_is_in_flight(
    client: AsyncImagesClient, server: FakeAtomaServer
) -> None:
    server.enqueue(Reply(delay=0.3), times=1000)
    batch = client.generate_many((f"prompt {n}" for n in range(1000)), concurrency=4, size="16x16")
    async for _ in batch:
        break
    for _ in range(20):  # asyncio closes the dropped iterator in a task of its own
        await asyncio.sleep(0.01)
    workers = [task for task in asyncio.all_tasks() if "atoma-images-batch" in task.get_name()]
    assert workers == []
    summary = batch.summary
    assert summary.results == 1
    assert len(server.posts) <= 1 + 4
    # Every request sent is accounted for: the one handed out, then those cancelled or
    # finished but never claimed.
    assert len(server.posts) == 1 + len(summary.cancelled_prompts) + len(summary.unclaimed)


async def test_inside_async_with_a_loop_may_be_left_and_another_started(
    client: AsyncImagesClient, server: FakeAtomaServer
) -> None:
    prompts = [f"prompt {n}" for n in range(6)]
    async with client.generate_many(prompts, concurrency=2, size="16x16") as batch:
        first = []
        async for result in batch:
            first.append(result)
            break
        for _ in range(5):  # a dropped loop is closed by asyncio in a task of its own
            await asyncio.sleep(0.01)
        rest = [result async for result in batch]
    assert len(first) + len(rest) == 6
    assert batch.summary.cancelled_prompts == ()
    assert len(server.posts) == 6


async def test_a_closed_batch_answers_none_at_once_rather_than_waiting(
    client: AsyncImagesClient, server: FakeAtomaServer
) -> None:
    server.enqueue(Reply())
    server.enqueue(Reply(delay=0.5), times=9)  # in flight while the caller waits
    batch = client.generate_many([f"prompt {n}" for n in range(10)], concurrency=2, size="16x16")
    assert (await anext(aiter(batch))).ok  # a loop of one step, dropped: the batch closes
    # Soon after, in a task of asyncio's: a caller waiting for a result then gets None.
    more = 0
    while await asyncio.wait_for(batch.next_result(), 5) is not None:
        more += 1
    assert more < 9
    assert [task for task in asyncio.all_tasks() if "atoma-images-batch" in task.get_name()] == []


async def test_retries_none_means_the_clients_policy(
    client: AsyncImagesClient, server: FakeAtomaServer
) -> None:
    results = [r async for r in client.generate_many(["a fox"], size="16x16", retries=None)]
    assert [r.ok for r in results] == [True]
    assert len(server.posts) == 1


async def _first(batch: AsyncIterator[BatchResult], count: int) -> AsyncIterator[BatchResult]:
    async for result in batch:
        yield result
        count -= 1
        if count == 0:
            return


async def test_cancelling_mid_batch_leaves_no_task_and_accounts_for_every_request(
    client: AsyncImagesClient, server: FakeAtomaServer, caplog: pytest.LogCaptureFixture
) -> None:
    server.enqueue(Reply(), Reply())  # two answers come back at once, the rest take long
    server.enqueue(Reply(delay=60), times=100)
    before = asyncio.all_tasks()
    batch = client.generate_many([f"prompt {number}" for number in range(100)], concurrency=4)
    received: list[BatchResult] = []

    async def consume() -> None:
        async with batch:
            async for result in batch:
                received.append(result)

    consumer = asyncio.create_task(consume())
    while len(server.posts) < 2 + 4:  # noqa: ASYNC110 - polling the server's record is the point
        await asyncio.sleep(0.01)
    with caplog.at_level(logging.WARNING, logger="atoma_images"):
        consumer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await consumer
    # Only the fake server's handlers, still waiting to answer, are left.
    left = {task.get_coro().__qualname__ for task in asyncio.all_tasks() - before}
    assert left <= {"RequestHandler.start", "RequestHandler._handle_request"}
    summary = batch.summary
    assert len(received) == 2
    # Every request the server saw is a result handed out, or a call cancelled in flight.
    assert len(server.posts) == 6
    assert len(summary.cancelled_prompts) == 4
    assert summary.maybe_billed_compute_units == 4 * 1024 * 1024
    assert client.usage.maybe_billed_calls == 4
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "4 call(s) in flight were cancelled" in warnings[0].getMessage()


async def test_a_429_slows_every_call_down(server: FakeAtomaServer) -> None:
    waited_by: list[str] = []

    async def recording_sleep(seconds: float) -> None:
        task = asyncio.current_task()
        assert task is not None
        waited_by.append(task.get_name())
        await asyncio.sleep(0)

    # The first request is told to wait; the three sent with it are answered well after.
    server.enqueue(Reply(status=429, headers={"Retry-After": "30"}))
    server.enqueue(Reply(delay=0.05), times=3)
    retries = RetryPolicy(sleep=recording_sleep)
    async with AsyncImagesClient(API_KEY, base_url=server.base_url, retries=retries) as client:
        prompts = [f"prompt {number}" for number in range(40)]
        async with client.generate_many(prompts, concurrency=4, size="16x16") as batch:
            results = [result async for result in batch]
    assert all(result.ok for result in results)
    assert len(server.posts) == 41  # one retry: no call spent retries of its own
    # The one call told to wait did, and so did every call not yet sent, before its request.
    sent_before = {post.json()["prompt"] for post in server.posts[1:4]}
    assert set(waited_by) == {
        f"atoma-images-batch-call-{number}"
        for number in range(40)
        if f"prompt {number}" not in sent_before
    }


async def test_a_batch_mixes_sizes_models_and_requests(
    client: AsyncImagesClient, server: FakeAtomaServer
) -> None:
    items = [
        "a fox",
        {"prompt": "an owl", "size": "32x16", "n": 2},
        ImageRequest(model=client.model, prompt="a boat", size="16x32"),
        {"size": "16x16"},  # no prompt
        {"prompt": "a kite", "colour": "red"},  # not an option
        42,
        {"prompt": "a cat", "size": "8X8"},
    ]
    async with client.generate_many(items, size="16x16") as batch:
        results = {result.index: result async for result in batch}
    bodies = [post.json() for post in server.posts]
    sizes = sorted((body["prompt"], body["size"], body["n"]) for body in bodies)
    # On Atoma the owl's two images are two requests of one.
    assert sizes == [
        ("a boat", "16x32", 1),
        ("a fox", "16x16", 1),
        ("an owl", "32x16", 1),
        ("an owl", "32x16", 1),
    ]
    assert results[1].response is not None
    assert len(results[1].response.images) == 2
    assert results[1].response.compute_units == 2 * 32 * 16
    for index, field in [
        (3, "prompts[3]"),
        (4, "prompts[4]['colour']"),
        (5, "prompts[5]"),
        (6, "size"),
    ]:
        error = results[index].error
        assert isinstance(error, InvalidRequestError), index
        assert error.field == field
    assert results[6].prompt == "a cat"


async def test_budget_refusals_in_a_batch_are_results(
    client: AsyncImagesClient, server: FakeAtomaServer
) -> None:
    budget = Budget(max_compute_units=3 * UNITS_16X16)
    prompts = [f"prompt {number}" for number in range(10)]
    async with client.generate_many(prompts, size="16x16", budget=budget) as batch:
        results = [result async for result in batch]
    assert sum(result.ok for result in results) == 3
    assert sum(isinstance(result.error, BudgetExceededError) for result in results) == 7
    assert len(server.posts) == 3


async def test_a_failing_source_ends_the_batch_with_its_error(client: AsyncImagesClient) -> None:
    def prompts() -> Iterator[str]:
        yield "a fox"
        raise OSError("disk gone")

    async with client.generate_many(prompts(), concurrency=1, size="16x16") as batch:
        first = await batch.next_result()
        with pytest.raises(OSError, match="disk gone"):
            await batch.next_result()
    assert first is not None
    assert first.prompt == "a fox"


@pytest.mark.parametrize(
    ("arguments", "field"),
    [
        ({"prompts": "a fox"}, "prompts"),
        ({"prompts": ["a fox"], "concurrency": 0}, "concurrency"),
        ({"prompts": ["a fox"], "concurrency": True}, "concurrency"),
        ({"prompts": ["a fox"], "colour": "red"}, "colour"),
        ({"prompts": ["a fox"], "size": "big"}, "size"),
        ({"prompts": ["a fox"], "on_progress": 3}, "on_progress"),
    ],
)
async def test_bad_arguments_are_refused_before_anything_is_sent(
    client: AsyncImagesClient, server: FakeAtomaServer, arguments: dict[str, object], field: str
) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        client.generate_many(**arguments)  # type: ignore[arg-type]
    assert refused.value.field == field
    assert server.posts == []


def test_the_sync_client_iterates_reports_progress_and_closes_on_break(
    threaded_server: FakeAtomaServer,
) -> None:
    progress: list[tuple[int, int | None, str]] = []

    def on_progress(done: int, total: int | None) -> None:
        progress.append((done, total, threading.current_thread().name))

    with ImagesClient(API_KEY, base_url=threaded_server.base_url) as client:
        prompts = [f"prompt {number}" for number in range(5)]
        results = list(client.generate_many(prompts, size="16x16", on_progress=on_progress))
        assert sorted(result.index for result in results) == list(range(5))
        assert progress == [(n, 5, threading.current_thread().name) for n in range(1, 6)]

        threaded_server.reset()
        for _ in client.generate_many(_lazy_prompts(1_000_000), concurrency=2, size="16x16"):
            break
        assert len(threaded_server.posts) <= 1 + 2
        # Counted: every request that was sent, and any cancelled while it waited to be.
        assert len(threaded_server.posts) <= client.usage.calls - 5 <= 1 + 2


# -- second pass: the promises a batch keeps (docs/reliability.md) ----------------------------


def _envelope(status: int, code: str, **headers: str) -> web.Response:
    body = {"error": {"code": code, "message": code.lower()}}
    return web.json_response(body, status=status, headers=headers)


async def test_a_batch_wide_wait_never_sends_a_call_past_its_own_deadline() -> None:
    # "a" is told to wait 30 s, and the whole batch waits with it; "b", with a deadline of
    # its own far shorter, wakes with no time left. It ends with its own 503 and sends
    # nothing more: a request with 1 ms to live would be billed and never be received.
    b_deadline = 0.3
    posts: list[str] = []
    a_waits = asyncio.Event()

    async def answer(request: web.Request) -> web.Response:
        prompt = (await request.json())["prompt"]
        posts.append(prompt)
        if prompt == "b":
            await a_waits.wait()  # "b" fails only once the batch has been told to wait
            return _envelope(503, "SERVICE_UNAVAILABLE")
        if posts.count("a") == 1:
            return _envelope(429, "RATE_LIMITED", **{"Retry-After": "30"})
        return _envelope(400, "BAD_REQUEST")

    async def long_sleep(seconds: float) -> None:
        a_waits.set()
        await asyncio.sleep(b_deadline)  # the 30 s, shortened: still past b's deadline

    app = web.Application()
    app.router.add_post("/v1/images/generations", answer)
    async with serving(app) as root:
        client = AsyncImagesClient(
            API_KEY, base_url=f"{root}/v1", retries=RetryPolicy(sleep=long_sleep)
        )
        async with client:
            b_retries = RetryPolicy(deadline=b_deadline, backoff_base=0)
            items = ["a", {"prompt": "b", "retries": b_retries}]
            async with client.generate_many(items, concurrency=2, size="16x16") as batch:
                results = {result.prompt: result async for result in batch}
    assert posts.count("b") == 1
    error = results["b"].error
    assert isinstance(error, ServiceUnavailableError)
    assert not error.may_have_been_billed
    assert error.attempts == 1
    assert batch.summary.maybe_billed_compute_units == 0


async def test_every_consumer_of_a_batch_learns_it_is_over_and_the_bound_holds(
    client: AsyncImagesClient, server: FakeAtomaServer
) -> None:
    server.enqueue(Reply(delay=0.02), times=40)
    batch = client.generate_many([f"prompt {n}" for n in range(40)], concurrency=4, size="16x16")
    received: list[BatchResult] = []

    async def consume() -> int:
        while (result := await batch.next_result()) is not None:
            received.append(result)
            if len(received) == 20:
                server.peak_in_flight = 0  # from here on, is the bound still 4?
        return 1

    # A consumer left waiting for ever would hold the test: the 10 s guard only fails it.
    ended = await asyncio.wait_for(asyncio.gather(*(consume() for _ in range(6))), 10)
    assert ended == [1] * 6
    assert sorted(result.index for result in received) == list(range(40))
    assert server.peak_in_flight == 4
    assert await batch.next_result() is None


async def test_a_failing_on_progress_never_loses_a_result(
    client: AsyncImagesClient, server: FakeAtomaServer, caplog: pytest.LogCaptureFixture
) -> None:
    def on_progress(done: int, total: int | None) -> None:
        raise RuntimeError("the progress bar broke")

    prompts = ["a fox", "an owl", "a boat"]
    with caplog.at_level(logging.WARNING, logger="atoma_images"):
        async with client.generate_many(prompts, size="16x16", on_progress=on_progress) as batch:
            results = [result async for result in batch]
    assert sorted(result.prompt for result in results) == sorted(prompts)
    assert all(result.ok for result in results)
    assert batch.summary.unclaimed == ()
    assert len(server.posts) == 3
    failed = [r for r in caplog.records if "on_progress" in r.getMessage()]
    assert len(failed) == 3
    assert all(r.levelno == logging.WARNING and r.exc_info for r in failed)


def test_a_failing_on_progress_never_loses_a_result_in_a_sync_batch(
    threaded_server: FakeAtomaServer, caplog: pytest.LogCaptureFixture
) -> None:
    def on_progress(done: int, total: int | None) -> None:
        raise RuntimeError("the progress bar broke")

    prompts = ["a fox", "an owl", "a boat"]
    with (
        ImagesClient(API_KEY, base_url=threaded_server.base_url) as client,
        caplog.at_level(logging.WARNING, logger="atoma_images"),
    ):
        batch = client.generate_many(prompts, size="16x16", on_progress=on_progress)
        results = list(batch)
    assert sorted(result.prompt for result in results) == sorted(prompts)
    assert all(result.ok for result in results)
    assert batch.summary.unclaimed == ()
    assert len(threaded_server.posts) == 3
    assert len([r for r in caplog.records if "on_progress" in r.getMessage()]) == 3


async def test_a_source_that_fails_part_way_hands_over_the_calls_already_sent(
    client: AsyncImagesClient, server: FakeAtomaServer
) -> None:
    server.enqueue(Reply(delay=0.05), times=3)  # still in flight when the source fails

    def prompts() -> Iterator[str]:
        yield from ("a fox", "an owl", "a boat")
        raise OSError("disk gone")

    received: list[BatchResult] = []
    async with client.generate_many(prompts(), concurrency=4, size="16x16") as batch:

        async def consume() -> None:
            async for result in batch:
                received.append(result)

        with pytest.raises(OSError, match="disk gone"):  # after the calls already sent
            await consume()
    assert sorted(result.prompt for result in received) == ["a boat", "a fox", "an owl"]
    assert all(result.ok for result in received)
    assert len(server.posts) == 3
    assert batch.summary.cancelled_prompts == ()
    assert batch.summary.compute_units == 3 * UNITS_16X16


async def test_a_source_that_ends_with_its_own_cancellation_ends_the_batch(
    client: AsyncImagesClient, server: FakeAtomaServer
) -> None:
    async def prompts() -> AsyncIterator[str]:
        yield "a fox"
        raise asyncio.CancelledError  # as when what the source reads from was cancelled

    received: list[BatchResult] = []

    async def consume() -> None:
        async with client.generate_many(prompts(), concurrency=2, size="16x16") as batch:
            async for result in batch:
                received.append(result)

    consumer = asyncio.create_task(consume())
    # A batch waiting for ever would hold the test: the 10 s guard only fails it.
    done, _ = await asyncio.wait([consumer], timeout=10)
    assert consumer in done
    assert consumer.cancelled()  # the source's own error, as it is
    assert [result.prompt for result in received] == ["a fox"]
    assert received[0].ok
    assert len(server.posts) == 1
    assert [t for t in asyncio.all_tasks() if "atoma-images-batch" in t.get_name()] == []


async def test_a_concurrency_far_above_the_prompts_starts_only_the_tasks_the_work_needs(
    client: AsyncImagesClient, server: FakeAtomaServer
) -> None:
    prompts = ["a fox", "an owl", "a boat"]
    most = 0
    async with client.generate_many(prompts, concurrency=20_000, size="16x16") as batch:
        first = asyncio.create_task(batch.next_result())
        while not first.done():  # the batch's tasks, counted at every turn of the loop
            tasks = [t for t in asyncio.all_tasks() if "atoma-images-batch" in t.get_name()]
            most = max(most, len(tasks))
            await asyncio.sleep(0)
        results = [first.result()] + [result async for result in batch]
    assert 1 < most <= len(prompts) + 1  # one per call, and the one that reads the source
    assert sorted(result.prompt for result in results if result) == sorted(prompts)
    assert len(server.posts) == 3


@pytest.mark.parametrize("pool", ["max_connections", "a session passed in"])
async def test_a_concurrency_above_the_pool_never_fails_for_waiting_on_its_own_pool(
    server: FakeAtomaServer, fake_sleep: FakeSleep, pool: str
) -> None:
    server.enqueue(Reply(delay=0.1), times=6)
    async with contextlib.AsyncExitStack() as stack:
        if pool == "max_connections":
            pool_options: dict[str, object] = {"max_connections": 2}
        else:
            connector = aiohttp.TCPConnector(limit=10, limit_per_host=2)
            session = aiohttp.ClientSession(connector=connector)
            pool_options = {"session": await stack.enter_async_context(session)}
        client = AsyncImagesClient(
            API_KEY,
            base_url=server.base_url,
            # A call that waits more than 20 ms for a connection times out.
            timeout=Timeout(pool=0.02, connect=None),
            retries=RetryPolicy(sleep=fake_sleep),
            **pool_options,  # type: ignore[arg-type]
        )
        await stack.enter_async_context(client)
        prompts = [f"prompt {n}" for n in range(6)]
        async with client.generate_many(prompts, concurrency=6, size="16x16") as batch:
            results = [result async for result in batch]
    assert [result.error for result in results] == [None] * 6
    assert len(server.posts) == 6
    assert server.peak_in_flight <= 2


async def test_closing_a_batch_lists_as_maybe_billed_only_the_calls_that_may_have_been(
    server: FakeAtomaServer,
) -> None:
    # Two calls get a 503 (not billed) and wait to retry; a third is in flight (sent: it
    # may be billed). Closing the batch lists the one, and counts its units.
    waiting = 0

    async def sleep_until_cancelled(seconds: float) -> None:
        nonlocal waiting
        waiting += 1
        await asyncio.Event().wait()

    server.enqueue(Reply(status=503), Reply(status=503), Reply(delay=60))
    retries = RetryPolicy(sleep=sleep_until_cancelled)
    async with AsyncImagesClient(API_KEY, base_url=server.base_url, retries=retries) as client:
        batch = client.generate_many(["a fox", "an owl", "a boat"], concurrency=3, size="16x16")
        pending = asyncio.create_task(batch.next_result())
        while len(server.posts) < 3 or waiting < 2:  # noqa: ASYNC110 - polling is the point
            await asyncio.sleep(0.01)
        await batch.aclose()
        assert await pending is None
    in_flight = server.posts[2].json()["prompt"]
    summary = batch.summary
    assert summary.cancelled_prompts == (in_flight,)
    assert summary.maybe_billed_compute_units == UNITS_16X16
    assert client.usage.maybe_billed_calls == 1
    assert client.usage.unbilled_failures == 2


async def _progress_coroutine(done: int, total: int | None) -> None:
    return None


async def test_an_async_on_progress_is_refused_when_the_batch_is_made(
    client: AsyncImagesClient, server: FakeAtomaServer
) -> None:
    # It would be called and never awaited: no progress, and a "never awaited" warning.
    with pytest.raises(InvalidRequestError) as refused:
        client.generate_many(["a fox"], on_progress=_progress_coroutine)
    assert refused.value.field == "on_progress"
    assert "async" in str(refused.value)
    assert server.posts == []


def test_an_async_on_progress_is_refused_when_a_sync_batch_is_made(
    threaded_server: FakeAtomaServer,
) -> None:
    with (
        ImagesClient(API_KEY, base_url=threaded_server.base_url) as client,
        pytest.raises(InvalidRequestError) as refused,
    ):
        client.generate_many(["a fox"], on_progress=_progress_coroutine)
    assert refused.value.field == "on_progress"
    assert threaded_server.posts == []


def test_ctrl_c_in_on_progress_leaves_the_paid_result_with_the_batch(
    threaded_server: FakeAtomaServer,
) -> None:
    def interrupted(done: int, total: int | None) -> None:
        raise KeyboardInterrupt

    with ImagesClient(API_KEY, base_url=threaded_server.base_url) as client:
        batch = client.generate_many(["a fox"], size="16x16", on_progress=interrupted)
        with pytest.raises(KeyboardInterrupt):
            list(batch)
        (kept,) = batch.summary.unclaimed
        assert kept.ok
        assert kept.response is not None
        assert kept.response.images[0].decode()
