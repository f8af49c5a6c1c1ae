"""What calls cost: compute units on responses, the client's usage, and budgets."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import atoma_images
from atoma_images import (
    AmbiguousOutcomeError,
    APIConnectionError,
    AsyncImagesClient,
    BadRequestError,
    Budget,
    BudgetExceededError,
    ClientClosedError,
    ImagesClient,
    InvalidRequestError,
    RetryPolicy,
    Usage,
)
from atoma_images.cli import EXIT_CODES
from atoma_images.testing import FakeAtomaServer, Reply

from helpers import API_KEY, FakeSleep, cli

NO_RETRIES = RetryPolicy(max_retries=0)
UNITS_16X16 = 256  # n x W x H of one 16x16 image


async def test_a_response_says_what_it_cost(client: AsyncImagesClient) -> None:
    response = await client.generate("a fox", n=3, size="32x16")
    assert response.compute_units == 3 * 32 * 16


async def test_usage_counts_what_the_server_saw(
    client: AsyncImagesClient, server: FakeAtomaServer
) -> None:
    assert client.usage == Usage()
    await client.generate("a fox", n=2, size="16x16")
    server.enqueue(Reply(status=400))
    with pytest.raises(BadRequestError):
        await client.generate("an owl", size="16x16", retries=NO_RETRIES)
    server.enqueue(Reply(fault="drop"))
    with pytest.raises(AmbiguousOutcomeError):
        await client.generate("a boat", size="16x16", retries=NO_RETRIES)
    with pytest.raises(InvalidRequestError):  # refused before sending: not a call
        await client.generate("a kite", size="8X8")
    assert client.usage == Usage(
        calls=4,  # on Atoma, the call for 2 images is 2 requests
        images=2,
        compute_units=2 * UNITS_16X16,
        maybe_billed_calls=1,
        maybe_billed_compute_units=16 * 16,
        unbilled_failures=1,
    )
    assert client.usage.max_compute_units == 2 * UNITS_16X16 + 16 * 16
    assert len(server.posts) == client.usage.calls


async def test_100_concurrent_calls_against_a_budget_for_10(server: FakeAtomaServer) -> None:
    budget = Budget(max_compute_units=10 * UNITS_16X16)
    async with AsyncImagesClient(API_KEY, base_url=server.base_url, budget=budget) as client:
        outcomes = await asyncio.gather(
            *(client.generate(f"prompt {i}", size="16x16") for i in range(100)),
            return_exceptions=True,
        )
    refused = [o for o in outcomes if isinstance(o, BudgetExceededError)]
    assert len(refused) == 90
    assert len(outcomes) - len(refused) == 10
    assert all(not error.may_have_been_billed for error in refused)
    assert len(server.posts) == 10
    assert budget.remaining == 0
    assert client.usage.calls == 10
    assert client.usage.compute_units == 10 * UNITS_16X16


async def test_a_failure_that_was_not_billed_gives_its_reservation_back(
    client: AsyncImagesClient, server: FakeAtomaServer
) -> None:
    budget = Budget(max_compute_units=UNITS_16X16)
    server.enqueue(Reply(status=400))
    with pytest.raises(BadRequestError):
        await client.generate("a fox", size="16x16", budget=budget, retries=NO_RETRIES)
    assert budget.remaining == UNITS_16X16
    await client.generate("a fox", size="16x16", budget=budget)
    assert budget.remaining == 0
    assert len(server.posts) == 2


async def test_an_ambiguous_failure_keeps_its_reservation(
    client: AsyncImagesClient, server: FakeAtomaServer
) -> None:
    budget = Budget(max_compute_units=UNITS_16X16)
    server.enqueue(Reply(fault="drop"))
    with pytest.raises(AmbiguousOutcomeError):
        await client.generate("a fox", size="16x16", budget=budget, retries=NO_RETRIES)
    assert budget.remaining == 0
    with pytest.raises(BudgetExceededError) as refused:
        await client.generate("a fox", size="16x16", budget=budget)
    assert (refused.value.asked, refused.value.left) == (UNITS_16X16, 0)
    assert "256 compute units" in str(refused.value)
    assert len(server.posts) == 1


async def test_a_cancelled_call_keeps_its_reservation_and_counts_as_maybe_billed(
    server: FakeAtomaServer,
) -> None:
    server.enqueue(Reply(delay=30))
    budget = Budget(max_compute_units=UNITS_16X16)
    async with AsyncImagesClient(API_KEY, base_url=server.base_url, budget=budget) as client:
        call = asyncio.create_task(client.generate("a fox", size="16x16"))
        while not server.posts:  # noqa: ASYNC110 - polling the server's record is the point
            await asyncio.sleep(0.01)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
    assert budget.remaining == 0
    assert client.usage.maybe_billed_calls == 1
    assert client.usage.maybe_billed_compute_units == UNITS_16X16


@pytest.mark.parametrize("own_session", [True, False], ids=["own session", "session passed in"])
async def test_a_call_cancelled_while_it_waits_for_a_connection_was_not_billed(
    server: FakeAtomaServer, own_session: bool
) -> None:
    """The client's own session knows the request never left: its reservation comes back and
    it counts as unbilled. A session passed in cannot tell, so the call may have been billed."""
    server.enqueue(Reply(delay=0.3))  # holds the only connection while the other call waits
    budget = Budget(max_compute_units=2 * UNITS_16X16)
    async with contextlib.AsyncExitStack() as stack:
        if own_session:
            options: dict[str, Any] = {"max_connections": 1}
        else:
            connector = aiohttp.TCPConnector(limit=1)
            options = {
                "session": await stack.enter_async_context(
                    aiohttp.ClientSession(connector=connector)
                )
            }
        client = await stack.enter_async_context(
            AsyncImagesClient(API_KEY, base_url=server.base_url, budget=budget, **options)
        )
        holder = asyncio.create_task(client.generate("holder", size="16x16"))
        while not server.posts:  # noqa: ASYNC110 - polling the server's record is the point
            await asyncio.sleep(0.01)
        waiter = asyncio.create_task(client.generate("waiter", size="16x16"))
        await asyncio.sleep(0.05)  # it reaches the pool and waits there for the connection
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        await holder
    assert [post.json()["prompt"] for post in server.posts] == ["holder"]
    assert server.billed_compute_units == UNITS_16X16
    if own_session:
        assert budget.used == client.usage.max_compute_units == UNITS_16X16
        assert (client.usage.maybe_billed_calls, client.usage.unbilled_failures) == (0, 1)
    else:  # erring towards "may have been billed"
        assert budget.used == client.usage.max_compute_units == 2 * UNITS_16X16
        assert (client.usage.maybe_billed_calls, client.usage.unbilled_failures) == (1, 0)


async def test_closing_the_client_while_a_call_waits_to_retry_ends_it_typed_and_unbilled(
    server: FakeAtomaServer,
) -> None:
    """The retry was never sent: a typed error that says so, and the reservation back."""
    server.enqueue(Reply(status=503))
    waiting, closed = asyncio.Event(), asyncio.Event()

    async def sleep(seconds: float) -> None:  # the retry's wait: until the client is closed
        waiting.set()
        await closed.wait()

    budget = Budget(max_compute_units=UNITS_16X16)
    policy = RetryPolicy(sleep=sleep)
    client = AsyncImagesClient(API_KEY, base_url=server.base_url, budget=budget, retries=policy)
    call = asyncio.create_task(client.generate("a fox", size="16x16"))
    await waiting.wait()
    await client.aclose()
    closed.set()
    with pytest.raises(ClientClosedError, match="closed") as caught:
        await call
    assert isinstance(caught.value, APIConnectionError)
    assert isinstance(caught.value, RuntimeError)  # what it was before it had a type
    assert not caught.value.may_have_been_billed
    assert caught.value.attempts == 2  # the second one never left
    assert len(server.posts) == 1
    assert budget.remaining == UNITS_16X16
    assert (client.usage.maybe_billed_calls, client.usage.unbilled_failures) == (0, 1)


AMBIGUITY_ALLOWED = RetryPolicy(retry_ambiguous=True, backoff_base=0)


async def test_a_retried_ambiguous_attempt_is_counted_and_reserved_again(
    client: AsyncImagesClient, server: FakeAtomaServer
) -> None:
    # Dropped after sending (may have been billed), then retried and answered: two POSTs that
    # may both be billed, so the budget holds two attempts and usage says so.
    budget = Budget(max_compute_units=2 * UNITS_16X16)
    server.enqueue(Reply(fault="drop"))
    result = await client.generate("a fox", size="16x16", budget=budget, retries=AMBIGUITY_ALLOWED)
    assert result.compute_units == UNITS_16X16
    assert len(server.posts) == 2
    assert budget.remaining == 0
    assert client.usage.compute_units == UNITS_16X16
    assert client.usage.maybe_billed_calls == 1
    assert client.usage.maybe_billed_compute_units == UNITS_16X16
    assert client.usage.max_compute_units == len(server.posts) * UNITS_16X16


async def test_a_retry_of_an_ambiguous_attempt_that_does_not_fit_is_not_sent(
    client: AsyncImagesClient, server: FakeAtomaServer
) -> None:
    budget = Budget(max_compute_units=UNITS_16X16)
    server.enqueue(Reply(fault="drop"))
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    policy = RetryPolicy(retry_ambiguous=True, backoff_base=5, sleep=sleep)
    with pytest.raises(BudgetExceededError) as refused:
        await client.generate("a fox", size="16x16", budget=budget, retries=policy)
    assert waits == []  # refused before the wait, not after it
    assert len(server.posts) == 1
    assert refused.value.may_have_been_billed  # the first attempt may have been
    assert refused.value.attempts == 1
    assert "the retry was not sent" in str(refused.value)
    assert budget.remaining == 0


async def test_a_call_whose_earlier_attempt_may_have_been_billed_says_so_at_the_end(
    client: AsyncImagesClient, server: FakeAtomaServer
) -> None:
    # The last attempt's 400 bills nothing, but the dropped one before it may have.
    server.enqueue(Reply(fault="drop"), Reply(status=400))
    with pytest.raises(BadRequestError) as info:
        await client.generate("a fox", size="16x16", retries=AMBIGUITY_ALLOWED)
    assert len(server.posts) == 2
    assert info.value.attempts == 2
    assert info.value.may_have_been_billed
    assert client.usage.maybe_billed_compute_units == UNITS_16X16
    assert client.usage.unbilled_failures == 0


async def test_a_call_budget_and_the_client_budget_both_apply(server: FakeAtomaServer) -> None:
    shared = Budget(max_compute_units=3 * UNITS_16X16)
    alice = Budget(max_compute_units=2 * UNITS_16X16)
    async with AsyncImagesClient(API_KEY, base_url=server.base_url, budget=shared) as client:
        await client.generate("a fox", size="16x16", budget=alice)
        await client.generate("a fox", size="16x16", budget=alice)
        with pytest.raises(BudgetExceededError):  # alice's is spent; the client's is not
            await client.generate("a fox", size="16x16", budget=alice)
        bob = Budget(max_compute_units=10**6)
        await client.generate("an owl", size="16x16", budget=bob)
        with pytest.raises(BudgetExceededError):  # now the client's is spent
            await client.generate("an owl", size="16x16", budget=bob)
    # A refusal by one budget leaves nothing reserved in the other.
    assert (shared.remaining, alice.remaining, bob.used) == (0, 0, UNITS_16X16)
    assert len(server.posts) == 3


def test_the_budget_holds_across_threads(threaded_server: FakeAtomaServer) -> None:
    budget = Budget(max_compute_units=5 * UNITS_16X16)
    start = threading.Barrier(20)

    def call(client: ImagesClient, number: int) -> str:
        start.wait()
        try:
            client.generate(f"prompt {number}", size="16x16", budget=budget)
        except BudgetExceededError:
            return "refused"
        return "done"

    with (
        ImagesClient(API_KEY, base_url=threaded_server.base_url) as client,
        ThreadPoolExecutor(20) as pool,
    ):
        outcomes = list(pool.map(lambda number: call(client, number), range(20)))
        usage = client.usage
    assert outcomes.count("done") == 5
    assert outcomes.count("refused") == 15
    assert len(threaded_server.posts) == 5
    assert usage.compute_units == 5 * UNITS_16X16


@pytest.mark.parametrize("value", [-1, 1.5, "100", True])
def test_a_budget_needs_a_whole_number_of_units(value: object) -> None:
    with pytest.raises(InvalidRequestError, match="max_compute_units"):
        Budget(max_compute_units=value)  # type: ignore[arg-type]


async def test_a_budget_that_is_not_a_budget_is_refused(
    client: AsyncImagesClient, server: FakeAtomaServer
) -> None:
    with pytest.raises(InvalidRequestError, match="budget"):
        AsyncImagesClient(API_KEY, base_url=server.base_url, budget=100)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="budget"):
        await client.generate("a fox", budget=100)  # type: ignore[arg-type]
    assert server.posts == []


def test_the_cli_caps_a_run_and_says_what_it_used(
    threaded_server: FakeAtomaServer, tmp_path: Path
) -> None:
    (tmp_path / "prompts.txt").write_text("a fox\nan owl\na boat\n")
    done = cli(
        *("--base-url", threaded_server.base_url, "--prompts-file", "prompts.txt"),
        *("--size", "16x16", "--concurrency", "1", "--max-compute-units", str(2 * UNITS_16X16)),
        cwd=tmp_path,
    )
    assert done.returncode == EXIT_CODES["balance"], done.stderr
    assert len(done.stdout.splitlines()) == 2
    assert len(threaded_server.posts) == 2
    lines = done.stderr.splitlines()
    assert lines[-1] == f"atoma-images: used {2 * UNITS_16X16:,} compute units"
    (refusal,) = [line for line in lines if line.startswith("atoma-images: error")]
    assert "budget exceeded" in refusal
    assert "nothing was sent" in refusal


def test_the_cli_says_what_may_have_been_billed(
    threaded_server: FakeAtomaServer, tmp_path: Path
) -> None:
    threaded_server.enqueue(Reply(fault="drop"))
    (tmp_path / "prompts.txt").write_text("a fox\nan owl\n")
    done = cli(
        *("--base-url", threaded_server.base_url, "--prompts-file", "prompts.txt"),
        *("--size", "16x16", "--concurrency", "1", "--max-retries", "0"),
        cwd=tmp_path,
    )
    assert done.returncode == EXIT_CODES["connection"], done.stderr
    assert done.stderr.splitlines()[-1] == (
        f"atoma-images: used {UNITS_16X16} compute units; {UNITS_16X16} more may have been billed"
    )


def test_the_cli_refuses_a_negative_cap(tmp_path: Path) -> None:
    done = cli("--fake", "a fox", "--max-compute-units", "-1", cwd=tmp_path, key=None)
    assert done.returncode == EXIT_CODES["invalid input"]
    assert "invalid --max-compute-units: got -1; allowed: an integer >= 0" in done.stderr


# -- n images on Atoma: n requests of one, each billed on its own ------------------------------

UNITS_3 = 3 * UNITS_16X16


def agrees_with_the_bill(client: AsyncImagesClient, server: FakeAtomaServer) -> None:
    """What the client counts brackets what the server billed, and the budget holds both."""
    usage = client.usage
    assert usage.compute_units <= server.billed_compute_units <= usage.max_compute_units
    assert client.budget is not None
    assert client.budget.used == usage.max_compute_units  # nothing billable was given back


def clients_tasks() -> list[asyncio.Task[object]]:
    """The running tasks of the client's code (the fake server's own tasks left out)."""
    package = str(Path(atoma_images.__file__).parent)
    return [
        task
        for task in asyncio.all_tasks()
        if not task.done()
        and task.get_coro().cr_code.co_filename.startswith(package)  # type: ignore[union-attr]
        and "testing" not in task.get_coro().cr_code.co_filename  # type: ignore[union-attr]
    ]


@pytest.fixture
async def budgeted(server: FakeAtomaServer) -> AsyncIterator[AsyncImagesClient]:
    async with AsyncImagesClient(
        API_KEY,
        base_url=server.base_url,
        budget=Budget(max_compute_units=100 * UNITS_3),
        retries=RetryPolicy(sleep=FakeSleep()),
    ) as client:
        yield client


async def test_three_images_with_a_503_then_200_among_them(
    budgeted: AsyncImagesClient, server: FakeAtomaServer
) -> None:
    server.enqueue(Reply(status=503))
    result = await budgeted.generate("a fox", n=3, size="16x16")
    assert len(result.images) == 3
    assert len(server.posts) == 4  # the refused request was sent again, and only it
    assert result.compute_units == server.billed_compute_units == UNITS_3
    assert budgeted.usage.compute_units == UNITS_3
    agrees_with_the_bill(budgeted, server)


async def test_three_images_with_one_refused_raise_its_error_with_the_others(
    budgeted: AsyncImagesClient, server: FakeAtomaServer
) -> None:
    server.enqueue(Reply(status=400))
    with pytest.raises(BadRequestError) as caught:
        await budgeted.generate("a fox", n=3, size="16x16")
    error = caught.value
    assert error.partial is not None
    assert len(error.partial.images) == 2  # billed: never dropped
    assert all(image.decode() for image in error.partial.images)
    assert error.partial.compute_units == server.billed_compute_units == 2 * UNITS_16X16
    assert error.may_have_been_billed  # the call was billed, for what came back
    assert budgeted.usage.compute_units == 2 * UNITS_16X16
    assert budgeted.usage.maybe_billed_compute_units == 0
    agrees_with_the_bill(budgeted, server)


async def test_three_images_with_an_ambiguous_drop_count_it_as_maybe_billed(
    budgeted: AsyncImagesClient, server: FakeAtomaServer
) -> None:
    # The server generates (and bills) the image, and the answer is cut off half-way.
    server.enqueue(Reply(fault="drop_mid_body"))
    with pytest.raises(AmbiguousOutcomeError) as caught:
        await budgeted.generate("a fox", n=3, size="16x16")
    error = caught.value
    assert error.may_have_been_billed
    assert error.partial is not None
    assert len(error.partial.images) == 2
    assert len(server.posts) == 3  # an ambiguous request is never sent again
    assert server.billed_compute_units == UNITS_3
    assert budgeted.usage.compute_units == 2 * UNITS_16X16
    assert budgeted.usage.maybe_billed_compute_units == UNITS_16X16
    agrees_with_the_bill(budgeted, server)


async def test_three_images_all_refused_say_not_billed_and_give_the_budget_back(
    budgeted: AsyncImagesClient, server: FakeAtomaServer
) -> None:
    server.enqueue(Reply(status=400), times=3)
    with pytest.raises(BadRequestError) as caught:
        await budgeted.generate("a fox", n=3, size="16x16")
    assert caught.value.partial is None
    assert not caught.value.may_have_been_billed
    assert server.billed_compute_units == 0
    assert budgeted.budget is not None
    assert budgeted.budget.used == 0
    assert budgeted.usage.unbilled_failures == 3


async def test_cancelling_three_images_cancels_every_request_and_leaves_nothing_running(
    budgeted: AsyncImagesClient, server: FakeAtomaServer
) -> None:
    server.enqueue(Reply(), Reply(delay=30), Reply(delay=30))
    call = asyncio.ensure_future(budgeted.generate("a fox", n=3, size="16x16"))
    while server.billed_compute_units == 0 or len(server.posts) < 3:  # noqa: ASYNC110 - polls the fake
        await asyncio.sleep(0.01)
    assert len(clients_tasks()) >= 3  # the call and (at least) its two requests in flight
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert clients_tasks() == []  # no request of the call is left running
    # The one answered was billed; the two cancelled in flight may have been.
    assert budgeted.usage.compute_units == UNITS_16X16
    assert budgeted.usage.maybe_billed_compute_units == 2 * UNITS_16X16
    agrees_with_the_bill(budgeted, server)


async def test_a_batch_cancelled_after_some_images_of_a_call_were_billed_names_its_prompt(
    budgeted: AsyncImagesClient, server: FakeAtomaServer, caplog: pytest.LogCaptureFixture
) -> None:
    # Two of three requests are answered (billed); the third waits to retry a 503.
    server.enqueue(Reply(status=503), Reply(), Reply())
    never = asyncio.Event()

    async def forever(_: float) -> None:
        await never.wait()

    stalled = RetryPolicy(sleep=forever)
    batch = budgeted.generate_many(["a fox"], n=3, size="16x16", retries=stalled)
    waiting = asyncio.ensure_future(batch.next_result())
    while server.billed_compute_units < 2 * UNITS_16X16:  # noqa: ASYNC110 - polls the fake
        await asyncio.sleep(0.01)
    await batch.aclose()
    waiting.cancel()
    assert batch.summary.cancelled_prompts == ("a fox",)
    assert budgeted.usage.compute_units == 2 * UNITS_16X16
    assert "2 of them were generated and billed" in caplog.text
    agrees_with_the_bill(budgeted, server)
