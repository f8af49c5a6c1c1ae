"""Budgets and rate limits shared by replicas, in a real Redis (`atoma_images.redis`).

The tests marked ``redis`` start Debian's redis-server themselves (tests/redis_server.py) and
fail, saying so, when it is not installed; the default run leaves them out and .ci/run runs
them (``pytest -m redis``). Replicas are processes of their own (tests/redis_replica.py)
firing calls at one fake server that counts what it bills.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from atoma_images import (
    APITimeoutError,
    AsyncImagesClient,
    BadRequestError,
    BudgetExceededError,
    BudgetUnavailableError,
    InvalidRequestError,
    RateLimitUnavailableError,
    Reservation,
    RetryPolicy,
)
from atoma_images.testing import FakeAtomaServer, Reply

from helpers import API_KEY, ROOT, FakeSleep
from redis_server import RedisServer, free_port

UNITS = 16 * 16  # one 16x16 image
REPLICA = ROOT / "tests" / "redis_replica.py"


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture
def key() -> str:
    """A key of this test's own, so that tests sharing the server share nothing else."""
    return f"test:{uuid.uuid4().hex}"


def at(*fields: int) -> datetime.datetime:
    return datetime.datetime(*fields, tzinfo=datetime.timezone.utc)  # type: ignore[arg-type, misc]


def replica(base_url: str, redis_url: str, key: str, calls: int, kind: str, limit: int) -> Any:
    return subprocess.Popen(
        [sys.executable, str(REPLICA), base_url, redis_url, key, str(calls), kind, str(limit)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def outcome(process: Any) -> dict[str, Any]:
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 0, out
    lines = [json.loads(line) for line in out.splitlines()]
    result: dict[str, Any] = lines[-1]
    assert result["other"] == [], result
    return result


def wait_for(condition: Any, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


# -- without the extra, and without a server -----------------------------------------------


def test_the_package_imports_nothing_of_redis_and_the_module_names_the_extra() -> None:
    code = (
        "import sys\n"
        "import atoma_images\n"
        "from atoma_images import AsyncImagesClient, Budget, ExtraNotInstalledError, RateLimit\n"
        "assert not [m for m in sys.modules if m == 'redis' or m.startswith('redis.')]\n"
        "sys.modules['redis'] = None  # as if redis-py were not installed\n"
        "try:\n"
        "    import atoma_images.redis\n"
        "except ExtraNotInstalledError as error:\n"
        "    assert error.extra == 'redis', error\n"
        "    assert \"pip install 'atoma-images[redis]'\" in str(error), error\n"
        "else:\n"
        "    raise AssertionError('imported without redis-py')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


async def test_a_redis_nobody_answers_refuses_the_call_before_sending(
    server: FakeAtomaServer,
) -> None:
    from atoma_images.redis import RedisBudget, RedisRateLimit

    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    budget = RedisBudget(url, key="k", max_compute_units=10**6, timeout=2)
    limit = RedisRateLimit(url, key="k", requests=10, timeout=2)
    async with AsyncImagesClient(API_KEY, base_url=server.base_url) as client:
        with pytest.raises(BudgetUnavailableError) as refused:
            await client.generate("a fox", size="16x16", budget=budget)
        assert not refused.value.may_have_been_billed
        assert "RedisBudget(key='k'" in str(refused.value)
    async with AsyncImagesClient(API_KEY, base_url=server.base_url, rate_limit=limit) as client:
        with pytest.raises(RateLimitUnavailableError, match="RedisRateLimit"):
            await client.generate("a fox", size="16x16")
    assert not server.posts
    await budget.aclose()
    await limit.aclose()


async def test_a_redis_client_passed_in_that_never_answers_refuses_the_call_in_its_timeout(
    server: FakeAtomaServer,
) -> None:
    import redis.asyncio as aioredis

    from atoma_images.redis import RedisBudget, RedisRateLimit

    with socket.socket() as hole:  # accepts connections, never answers
        hole.bind(("127.0.0.1", 0))
        hole.listen(16)
        port = hole.getsockname()[1]
        stores = [aioredis.Redis(host="127.0.0.1", port=port) for _ in range(2)]
        budget = RedisBudget(stores[0], key="k", max_compute_units=10**6, timeout=0.5)
        limit = RedisRateLimit(stores[1], key="k", requests=10, timeout=0.5)
        async with AsyncImagesClient(API_KEY, base_url=server.base_url) as client:
            with pytest.raises(BudgetUnavailableError) as refused:  # a guard, not a measure:
                await asyncio.wait_for(client.generate("a fox", size="16x16", budget=budget), 30)
            assert "RedisBudget" in str(refused.value)
        async with AsyncImagesClient(API_KEY, base_url=server.base_url, rate_limit=limit) as client:
            with pytest.raises(RateLimitUnavailableError):
                await asyncio.wait_for(client.generate("a fox", size="16x16"), 30)
        for store in stores:
            await store.aclose()
    assert not server.posts


@pytest.mark.parametrize("timeout", [None, 0, -1, "5", float("nan"), float("inf"), True])
def test_a_redis_store_takes_only_a_finite_positive_timeout(timeout: object) -> None:
    from atoma_images.redis import RedisBudget, RedisRateLimit

    url = "redis://127.0.0.1:1/0"
    with pytest.raises(InvalidRequestError, match="timeout"):
        RedisBudget(url, key="k", max_compute_units=1, timeout=timeout)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="timeout"):
        RedisRateLimit(url, key="k", requests=1, timeout=timeout)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="clock"):
        RedisBudget(url, key="k", max_compute_units=1, clock="now")  # type: ignore[arg-type]


async def test_the_url_never_shows_in_a_repr_or_an_error() -> None:
    from atoma_images.redis import RedisBudget

    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"  # nothing listens there
    budget = RedisBudget(url, key="k", max_compute_units=1, timeout=2)
    assert "hunter2" not in repr(budget)
    with pytest.raises(BudgetUnavailableError) as refused:
        await budget.reserve(1)
    assert "hunter2" not in str(refused.value)
    assert "hunter2" not in repr(refused.value)
    assert "hunter2" not in str(refused.value.__cause__)
    await budget.aclose()


# -- against a real redis-server ------------------------------------------------------------


@pytest.mark.redis
def test_three_replicas_sharing_a_budget_of_40_images_send_exactly_40(
    redis_server: RedisServer, key: str
) -> None:
    with FakeAtomaServer() as server:
        replicas = [
            replica(server.base_url, redis_server.url, key, 30, "budget", 40 * UNITS)
            for _ in range(3)
        ]
        results = [outcome(process) for process in replicas]
        assert sum(r["images"] for r in results) == 40, results
        assert sum(r["refused"] for r in results) == 50, results  # refused before sending
        assert len(server.posts) == 40
        assert server.billed_compute_units == 40 * UNITS


@pytest.mark.redis
def test_a_replica_killed_with_calls_in_flight_leaves_the_others_unable_to_overspend(
    redis_server: RedisServer, key: str
) -> None:
    with FakeAtomaServer() as server:
        # The killed replica's 10 requests are still being drawn when it dies; the server
        # bills them all the same, after it has gone.
        server.enqueue(Reply(delay=2), times=10)
        killed = replica(server.base_url, redis_server.url, key, 10, "budget", 40 * UNITS)
        wait_for(lambda: len(server.posts) == 10)
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait(timeout=30)
        killed.stdout.close()  # type: ignore[union-attr]
        others = [
            replica(server.base_url, redis_server.url, key, 30, "budget", 40 * UNITS)
            for _ in range(2)
        ]
        results = [outcome(process) for process in others]
        assert sum(r["images"] for r in results) == 30  # 40, less the 10 it held
        assert sum(r["refused"] for r in results) == 30
        wait_for(lambda: server.billed_compute_units == 40 * UNITS)
        assert len(server.posts) == 40


@pytest.mark.redis
async def test_redis_stopped_mid_run_refuses_calls_and_loses_or_counts_twice_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from atoma_images.redis import RedisBudget

    store = RedisServer()  # its own: this test stops it
    budget = RedisBudget(store.url, key="all", max_compute_units=100 * UNITS, timeout=2)
    try:
        async with (
            FakeAtomaServer() as server,
            AsyncImagesClient(
                API_KEY,
                base_url=server.base_url,
                budget=budget,
                retries=RetryPolicy(max_retries=0),
            ) as client,
        ):
            first = [client.generate(str(i), size="16x16") for i in range(5)]
            before = await asyncio.gather(*first)
            server.enqueue(Reply(delay=0.5), Reply(delay=0.5), Reply(status=400, delay=0.5))
            in_flight = [
                asyncio.ensure_future(client.generate(f"late {i}", size="16x16")) for i in range(3)
            ]
            while len(server.posts) < 8:  # noqa: ASYNC110 - polling the server's record
                await asyncio.sleep(0.01)
            store.stop()  # while three calls are being answered
            with caplog.at_level(logging.WARNING, "atoma_images"):
                landed = await asyncio.gather(*in_flight, return_exceptions=True)
            refused = await asyncio.gather(
                *(client.generate(f"after {i}", size="16x16") for i in range(3)),
                return_exceptions=True,
            )
    finally:
        await budget.aclose()
        store.stop()
    # The images of every billed call reached the caller; the 400 was not billed.
    images = [r for r in landed if not isinstance(r, BaseException)]
    assert len(images) == 2
    assert sum(isinstance(r, BadRequestError) for r in landed) == 1
    assert "could not be settled" in caplog.text  # its units stay spent: the safe side
    # Calls after the stop are refused before sending, not billed.
    assert all(isinstance(r, BudgetUnavailableError) for r in refused), refused
    assert not any(r.may_have_been_billed for r in refused if isinstance(r, BaseException))
    assert len(server.posts) == 8
    paid = sum(r.compute_units for r in [*before, *images])
    assert server.billed_compute_units == paid == client.usage.compute_units == 7 * UNITS
    assert client.usage.calls == 8  # the refused calls sent nothing and are not calls


@pytest.mark.redis
async def test_a_daily_budget_on_redis_admits_again_after_the_utc_day_turns(
    redis_server: RedisServer, key: str, server: FakeAtomaServer
) -> None:
    from atoma_images.redis import RedisBudget

    now = [at(2025, 3, 9, 23, 59, 30).timestamp()]
    budget = RedisBudget(
        redis_server.url, key=key, max_compute_units=2 * UNITS, per="day", clock=lambda: now[0]
    )
    other_replica = RedisBudget(
        redis_server.url, key=key, max_compute_units=2 * UNITS, per="day", clock=lambda: now[0]
    )
    async with AsyncImagesClient(API_KEY, base_url=server.base_url) as client:
        await client.generate("a fox", size="16x16", budget=budget)
        await client.generate("a fox", size="16x16", budget=other_replica)
        with pytest.raises(BudgetExceededError) as refused:
            await client.generate("an owl", size="16x16", budget=budget)
        assert refused.value.resets_at == at(2025, 3, 10)
        assert await budget.remaining() == 0
        now[0] = at(2025, 3, 10, 0, 0, 1).timestamp()
        assert await budget.remaining() == 2 * UNITS
        await client.generate("an owl", size="16x16", budget=other_replica)
    assert await budget.remaining() == UNITS
    # Each day's count ends with its day (and an hour's grace for clocks a little behind).
    day = int(at(2025, 3, 10).timestamp())
    seconds = await budget._redis.ttl(f"{key}:{day}")  # type: ignore[attr-defined]
    assert 86400 - 1 + 3600 - 5 < seconds <= 86400 - 1 + 3600
    await budget.aclose()
    await other_replica.aclose()


@pytest.mark.redis
def test_two_replicas_sharing_a_rate_limit_never_send_more_than_it_in_any_second(
    redis_server: RedisServer, key: str
) -> None:
    with FakeAtomaServer() as server:
        replicas = [
            replica(server.base_url, redis_server.url, key, 15, "rate", 10) for _ in range(2)
        ]
        results = [outcome(process) for process in replicas]
        times = sorted(request.received for request in server.posts)
    assert sum(r["images"] for r in results) == 30
    # Any one-second window, less what a loopback's jitter can move a request by.
    busiest = max(sum(t <= u < t + 0.95 for u in times) for t in times)
    assert busiest <= 10, times


@pytest.mark.redis
async def test_one_429_with_retry_after_holds_every_replica_that_shares_the_rate_limit(
    redis_server: RedisServer, key: str, server: FakeAtomaServer
) -> None:
    from atoma_images.redis import RedisRateLimit

    limits = [RedisRateLimit(redis_server.url, key=key, requests=100) for _ in range(2)]
    sleeps = [FakeSleep(), FakeSleep()]
    clients = [
        AsyncImagesClient(
            API_KEY, base_url=server.base_url, rate_limit=limit, retries=RetryPolicy(sleep=sleep)
        )
        for limit, sleep in zip(limits, sleeps, strict=True)
    ]
    server.enqueue(Reply(status=429, headers={"Retry-After": "1"}))
    await clients[0].generate("a fox", size="16x16")  # told to wait, then served
    await asyncio.gather(*(clients[1].generate(f"owl {i}", size="16x16") for i in range(3)))
    for client, limit in zip(clients, limits, strict=True):
        await client.aclose()
        await limit.aclose()
    assert len(sleeps[0].waits) == 1  # the call told to wait waited once, in its retry
    held = sleeps[1].waits
    assert len(held) == 3, held  # every call of the other replica waits the rest of it
    assert all(0.5 < wait <= 1 for wait in held), held


@pytest.mark.redis
def test_cli_runs_on_several_hosts_share_one_budget_through_the_environment(
    redis_server: RedisServer, key: str, threaded_server: FakeAtomaServer, tmp_path: Path
) -> None:
    from test_cli import COMMAND, environment

    from atoma_images.cli import EXIT_CODES

    (tmp_path / "prompts.txt").write_text("a fox\nan owl\n")
    env = environment(tmp_path, API_KEY, extra={"ATOMA_IMAGES_REDIS_URL": redis_server.url})
    arguments = [
        *("--base-url", threaded_server.base_url, "--prompts-file", "prompts.txt"),
        *("--size", "16x16", "--concurrency", "1", "--max-compute-units", str(3 * UNITS)),
        *("--budget-per", "day", "--budget-key", key, "--rate-limit", "50"),
    ]
    runs = [
        subprocess.run(
            [*COMMAND, *arguments],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        for _host in range(2)
    ]
    assert runs[0].returncode == EXIT_CODES["ok"], runs[0].stderr
    assert runs[1].returncode == EXIT_CODES["balance"], runs[1].stderr
    assert "budget exceeded" in runs[1].stderr
    assert "resets at" in runs[1].stderr
    assert len(threaded_server.posts) == 3  # the second host had room for one


@pytest.mark.redis
async def test_requests_refused_at_their_deadline_take_no_permit_from_redis(
    redis_server: RedisServer, key: str, server: FakeAtomaServer, fake_sleep: FakeSleep
) -> None:
    from atoma_images.redis import RedisRateLimit

    limit = RedisRateLimit(redis_server.url, key=key, requests=1)
    # Half a second clear of the permits at 2 s and 3 s, whatever the clocks of a loaded
    # machine and of Redis make of the moment each call starts.
    policy = RetryPolicy(deadline=2.5, max_retries=0, sleep=fake_sleep)
    async with AsyncImagesClient(
        API_KEY, base_url=server.base_url, rate_limit=limit, retries=policy
    ) as client:
        burst = [client.generate(f"fox {i}", size="16x16") for i in range(10)]
        results = await asyncio.gather(*burst, return_exceptions=True)
    refused = [r for r in results if isinstance(r, APITimeoutError)]
    assert len(server.posts) == 3, results  # the permits at 0, 1 and 2 s
    assert len(refused) == 7, results
    # The next permit is the one after those three, not after the seven refused.
    assert await limit.acquire(within=0) <= 3
    await limit.aclose()


@pytest.mark.redis
async def test_a_429_while_requests_wait_for_their_redis_permits_holds_them_too(
    redis_server: RedisServer, key: str, server: FakeAtomaServer
) -> None:
    from atoma_images.redis import RedisRateLimit

    # Real time (a second's permits): the fox is told to wait 2 s after the owl has taken
    # its permit, for 1 s later; the owl must wait for the end of the cooldown all the same.
    limit = RedisRateLimit(redis_server.url, key=key, requests=1)
    server.enqueue(Reply(status=429, headers={"Retry-After": "2"}))
    async with AsyncImagesClient(API_KEY, base_url=server.base_url, rate_limit=limit) as client:
        await asyncio.gather(
            client.generate("a fox", size="16x16"), client.generate("an owl", size="16x16")
        )
    await limit.aclose()
    told, *others = server.posts
    owl = next(post for post in others if post.json()["prompt"] == "an owl")
    assert owl.received - told.received > 1.5, [p.received - told.received for p in others]


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    while data := await reader.read(65536):
        await asyncio.sleep(delay)
        writer.write(data)
        await writer.drain()
    writer.close()


@pytest.mark.redis
async def test_a_call_cancelled_while_redis_reserves_gives_the_units_back(
    redis_server: RedisServer, key: str, server: FakeAtomaServer
) -> None:
    from atoma_images.redis import RedisBudget

    pipes: set[asyncio.Task[None]] = set()
    writers: list[asyncio.StreamWriter] = []

    async def slow_replies(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        to_reader, to_writer = await asyncio.open_connection("127.0.0.1", redis_server.port)
        writers.extend((writer, to_writer))
        for pipe in (_pipe(reader, to_writer, 0), _pipe(to_reader, writer, 0.5)):
            pipes.add(asyncio.ensure_future(pipe))

    proxy = await asyncio.start_server(slow_replies, "127.0.0.1", 0)
    port = proxy.sockets[0].getsockname()[1]

    class Watched(RedisBudget):
        """Counts its steps, so that the test knows when the late answers have come in."""

        ended = reserved = settled = 0

        async def reserve(self, units: int) -> Reservation:
            try:
                reservation = await super().reserve(units)
            finally:
                self.ended += 1
            self.reserved += 1
            return reservation

        async def settle(self, reservation: Reservation, spent: int) -> None:
            await super().settle(reservation, spent)
            self.settled += 1

    budget = Watched(f"redis://127.0.0.1:{port}/0", key=key, max_compute_units=10 * UNITS)
    # A connection ready and the scripts loaded: a call's reserve is run at once.
    await budget.settle(await budget.reserve(UNITS), 0)
    budget.ended = budget.reserved = budget.settled = 0
    async with AsyncImagesClient(API_KEY, base_url=server.base_url) as client:
        for _ in range(3):
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(client.generate("a fox", size="16x16", budget=budget), 0.2)
        wait_for_loop = asyncio.get_running_loop().time() + 30
        while budget.ended < 3 or budget.settled < budget.reserved:  # the late answers
            assert asyncio.get_running_loop().time() < wait_for_loop, "timed out"
            await asyncio.sleep(0.05)
        assert await budget.remaining() == 10 * UNITS
        assert client.usage.calls == 0
    assert not server.posts
    await budget.aclose()
    proxy.close()
    for pipe in pipes:
        pipe.cancel()
    await asyncio.gather(*pipes, return_exceptions=True)
    for writer in writers:
        writer.close()
    await asyncio.gather(*(w.wait_closed() for w in writers), return_exceptions=True)
    await proxy.wait_closed()
