"""Budgets in any store (`BudgetLike`), budgets with time windows, and one rate limit and one
shared wait for every call of a client (`RateLimit`, the server's Retry-After)."""

from __future__ import annotations

import asyncio
import calendar
import datetime
import logging
from pathlib import Path

import pytest

from atoma_images import (
    AmbiguousOutcomeError,
    APITimeoutError,
    AsyncImagesClient,
    BadRequestError,
    Budget,
    BudgetExceededError,
    BudgetLike,
    BudgetUnavailableError,
    ImagesClient,
    InvalidRequestError,
    RateLimit,
    RateLimiter,
    RateLimitUnavailableError,
    Reservation,
    RetryPolicy,
    Usage,
)
from atoma_images.testing import FakeAtomaServer, Reply

from helpers import API_KEY, FakeSleep

NO_RETRIES = RetryPolicy(max_retries=0)
UNITS = 16 * 16  # one 16x16 image


class LedgerBudget:
    """A `BudgetLike` of a user's own: every step awaits, as a remote store's would."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.used = 0
        self.log: list[tuple[object, ...]] = []

    async def reserve(self, units: int) -> Reservation:
        await asyncio.sleep(0)
        if self.used + units > self.cap:
            raise BudgetExceededError(asked=units, left=self.cap - self.used)
        self.used += units
        self.log.append(("reserve", units))
        return Reservation(units)

    async def settle(self, reservation: Reservation, spent: int) -> None:
        await asyncio.sleep(0)
        self.used -= reservation.units - spent
        self.log.append(("settle", reservation.units, spent))


class Unreachable:
    """A store that cannot be reached."""

    async def reserve(self, units: int) -> Reservation:
        raise ConnectionRefusedError("the store is down")

    async def settle(self, reservation: Reservation, spent: int) -> None:
        raise ConnectionRefusedError("the store is down")


class Clock:
    """A settable time, in seconds since the epoch."""

    def __init__(self, when: datetime.datetime) -> None:
        self.now = when.timestamp()

    def __call__(self) -> float:
        return self.now


def at(*fields: int) -> datetime.datetime:
    return datetime.datetime(*fields, tzinfo=datetime.timezone.utc)  # type: ignore[arg-type, misc]


# -- a budget in any store -----------------------------------------------------------------


def test_the_in_process_budget_and_rate_limit_follow_the_protocols() -> None:
    assert isinstance(Budget(max_compute_units=1), BudgetLike)
    assert isinstance(LedgerBudget(1), BudgetLike)
    assert isinstance(RateLimit(requests=1), RateLimiter)


async def test_a_budget_of_the_users_own_is_settled_with_what_each_request_spent(
    server: FakeAtomaServer,
) -> None:
    ledger = LedgerBudget(10 * UNITS)
    async with AsyncImagesClient(API_KEY, base_url=server.base_url, retries=NO_RETRIES) as client:
        await client.generate("a fox", size="16x16", budget=ledger)
        server.enqueue(Reply(status=400))
        with pytest.raises(BadRequestError):
            await client.generate("an owl", size="16x16", budget=ledger)
        server.enqueue(Reply(fault="drop"))
        with pytest.raises(AmbiguousOutcomeError):
            await client.generate("a boat", size="16x16", budget=ledger)
    # Reserved before sending; the success and the dropped answer stay spent, the 400 is
    # given back.
    assert ledger.log == [
        ("reserve", UNITS),
        ("settle", UNITS, UNITS),
        ("reserve", UNITS),
        ("settle", UNITS, 0),
        ("reserve", UNITS),
        ("settle", UNITS, UNITS),
    ]
    assert ledger.used == 2 * UNITS


async def test_a_call_for_n_images_reserves_once_and_settles_each_request(
    server: FakeAtomaServer,
) -> None:
    ledger = LedgerBudget(10 * UNITS)
    server.enqueue(Reply(status=400), Reply(fault="drop"))
    async with AsyncImagesClient(API_KEY, base_url=server.base_url, retries=NO_RETRIES) as client:
        with pytest.raises((BadRequestError, AmbiguousOutcomeError)) as failed:
            await client.generate("a fox", n=3, size="16x16", budget=ledger)
    assert failed.value.partial is not None
    assert len(failed.value.partial.images) == 1
    assert ledger.log[0] == ("reserve", 3 * UNITS)
    assert sorted(ledger.log[1:]) == sorted(
        [("settle", UNITS, UNITS), ("settle", UNITS, 0), ("settle", UNITS, UNITS)]
    )
    assert ledger.used == 2 * UNITS == server.billed_compute_units + UNITS  # + the dropped one


async def test_a_retry_of_a_possibly_billed_attempt_reserves_again_and_keeps_both(
    server: FakeAtomaServer, fake_sleep: FakeSleep
) -> None:
    ledger = LedgerBudget(10 * UNITS)
    server.enqueue(Reply(fault="drop"))
    policy = RetryPolicy(retry_ambiguous=True, sleep=fake_sleep)
    async with AsyncImagesClient(API_KEY, base_url=server.base_url, retries=policy) as client:
        await client.generate("a fox", size="16x16", budget=ledger)
    assert ledger.log == [
        ("reserve", UNITS),
        ("reserve", UNITS),
        ("settle", UNITS, UNITS),
        ("settle", UNITS, UNITS),
    ]


async def test_a_budget_that_cannot_be_reached_refuses_the_call_before_sending(
    server: FakeAtomaServer,
) -> None:
    async with AsyncImagesClient(API_KEY, base_url=server.base_url, budget=Unreachable()) as client:
        with pytest.raises(BudgetUnavailableError) as refused:
            await client.generate("a fox", size="16x16")
    assert not server.posts
    assert not refused.value.may_have_been_billed
    assert isinstance(refused.value.__cause__, ConnectionRefusedError)
    assert client.usage.calls == 0


async def test_a_refusal_by_one_budget_gives_back_what_the_others_reserved(
    server: FakeAtomaServer,
) -> None:
    ledger = LedgerBudget(10 * UNITS)
    async with AsyncImagesClient(API_KEY, base_url=server.base_url, budget=ledger) as client:
        with pytest.raises(BudgetUnavailableError):
            await client.generate("a fox", size="16x16", budget=Unreachable())
    assert ledger.used == 0
    assert not server.posts


async def test_a_settle_that_fails_is_logged_and_the_images_reach_the_caller(
    server: FakeAtomaServer, caplog: pytest.LogCaptureFixture
) -> None:
    class SettleFails(LedgerBudget):
        async def settle(self, reservation: Reservation, spent: int) -> None:
            raise ConnectionRefusedError("the store went down")

    budget = SettleFails(10 * UNITS)
    server.enqueue(Reply(status=400))
    async with AsyncImagesClient(API_KEY, base_url=server.base_url, retries=NO_RETRIES) as client:
        with pytest.raises(BadRequestError), caplog.at_level(logging.WARNING, "atoma_images"):
            await client.generate("a fox", size="16x16", budget=budget)
        response = await client.generate("a fox", size="16x16", budget=budget)
    assert response.images
    assert "could not be settled" in caplog.text
    assert budget.used == 2 * UNITS  # the 400's units stay spent: the safe side


async def test_anything_else_is_refused_as_a_budget() -> None:
    with pytest.raises(InvalidRequestError, match="BudgetLike"):
        AsyncImagesClient(API_KEY, budget=42)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="rate_limit"):
        AsyncImagesClient(API_KEY, rate_limit=10)  # type: ignore[arg-type]


# -- windows -------------------------------------------------------------------------------


async def test_a_daily_budget_refuses_at_the_cap_and_admits_again_after_the_utc_day_turns(
    server: FakeAtomaServer,
) -> None:
    clock = Clock(at(2025, 3, 9, 23, 59, 30))
    budget = Budget(max_compute_units=2 * UNITS, per="day", clock=clock)
    async with AsyncImagesClient(API_KEY, base_url=server.base_url, budget=budget) as client:
        await client.generate("a fox", n=2, size="16x16")
        assert budget.remaining == 0
        assert budget.resets_at == at(2025, 3, 10)
        with pytest.raises(BudgetExceededError) as refused:
            await client.generate("an owl", size="16x16")
        assert refused.value.resets_at == at(2025, 3, 10)
        assert "resets at 2025-03-10T00:00:00Z" in str(refused.value)
        clock.now = at(2025, 3, 10, 0, 0, 1).timestamp()
        assert budget.remaining == 2 * UNITS
        await client.generate("an owl", size="16x16")
    assert budget.used == UNITS
    assert len(server.posts) == 3


async def test_a_give_back_goes_to_the_window_the_call_started_in() -> None:
    clock = Clock(at(2025, 3, 9, 23, 59, 59))
    budget = Budget(max_compute_units=UNITS, per="day", clock=clock)
    before = await budget.reserve(UNITS)
    assert before.window == calendar.timegm((2025, 3, 9, 0, 0, 0))
    clock.now += 2  # the day turns while the call is in flight
    after = await budget.reserve(UNITS)
    await budget.settle(before, 0)  # its day has ended: today is not refilled by it
    assert budget.remaining == 0
    await budget.settle(after, 0)
    assert budget.remaining == UNITS


@pytest.mark.parametrize(
    ("per", "now", "resets"),
    [
        ("minute", at(2025, 1, 31, 23, 59, 59), at(2025, 2, 1)),
        ("hour", at(2025, 1, 31, 22, 0, 0), at(2025, 1, 31, 23)),
        ("month", at(2024, 2, 29, 12), at(2024, 3, 1)),
        ("month", at(2024, 12, 31, 23, 59, 59), at(2025, 1, 1)),
    ],
)
def test_windows_are_fixed_and_aligned_to_utc(
    per: str, now: datetime.datetime, resets: datetime.datetime
) -> None:
    budget = Budget(max_compute_units=1, per=per, clock=Clock(now))  # type: ignore[arg-type]
    assert budget.resets_at == resets


def test_a_budget_without_a_window_never_resets() -> None:
    assert Budget(max_compute_units=1).resets_at is None


@pytest.mark.parametrize("per", ["second", "week", "Day", 86400])
def test_a_window_must_be_one_a_budget_knows(per: object) -> None:
    with pytest.raises(InvalidRequestError, match="per"):
        Budget(max_compute_units=1, per=per)  # type: ignore[arg-type]


# -- one rate limit, one shared wait -------------------------------------------------------


async def test_a_rate_limit_hands_out_permits_in_a_sliding_window() -> None:
    now = [100.0]
    limit = RateLimit(requests=3, per="second", clock=lambda: now[0])
    assert [await limit.acquire() for _ in range(7)] == [0, 0, 0, 1, 1, 1, 2]
    now[0] = 100.5  # the permits already handed out still count, in the order they were given
    assert await limit.acquire() == 1.5  # the window after the 101s holds room at 102


async def test_every_request_of_a_client_takes_a_permit(
    server: FakeAtomaServer, fake_sleep: FakeSleep
) -> None:
    limit = RateLimit(requests=2, per="minute", clock=lambda: 0.0)
    policy = RetryPolicy(sleep=fake_sleep)
    async with AsyncImagesClient(
        API_KEY, base_url=server.base_url, retries=policy, rate_limit=limit
    ) as client:
        await asyncio.gather(
            client.generate("a fox", n=3, size="16x16"), client.generate("an owl", size="16x16")
        )
    assert len(server.posts) == 4
    assert sorted(fake_sleep.waits) == [60, 60]  # the 3rd and 4th wait for the next minute


async def test_a_permit_past_the_deadline_is_not_waited_for(server: FakeAtomaServer) -> None:
    limit = RateLimit(requests=1, per="hour")
    policy = RetryPolicy(deadline=60, max_retries=0)
    async with AsyncImagesClient(
        API_KEY, base_url=server.base_url, retries=policy, rate_limit=limit
    ) as client:
        await client.generate("a fox", size="16x16")
        with pytest.raises(Exception, match="rate limit") as refused:
            await client.generate("an owl", size="16x16")
    assert not refused.value.may_have_been_billed  # type: ignore[attr-defined]
    assert len(server.posts) == 1


async def test_one_429_with_retry_after_holds_every_plain_generate_call_of_the_client(
    server: FakeAtomaServer, fake_sleep: FakeSleep
) -> None:
    policy = RetryPolicy(sleep=fake_sleep)
    server.enqueue(Reply(status=429, headers={"Retry-After": "1"}))
    async with AsyncImagesClient(API_KEY, base_url=server.base_url, retries=policy) as client:
        await client.generate("a fox", size="16x16")
        told = fake_sleep.waits[:]
        await asyncio.gather(*(client.generate(f"owl {i}", size="16x16") for i in range(3)))
    assert len(told) == 1  # the call told to wait waited once
    assert told[0] >= 1
    held = fake_sleep.waits[1:]
    assert len(held) == 3, held  # every other call waits for the rest of that second
    assert all(0.5 < wait <= 1 for wait in held), held
    assert len(server.posts) == 5


def test_the_sync_client_takes_a_rate_limit(threaded_server: FakeAtomaServer) -> None:
    limit = RateLimit(requests=100, per="second")
    with ImagesClient(API_KEY, base_url=threaded_server.base_url, rate_limit=limit) as client:
        assert client.rate_limit is limit
        assert client.generate("a fox", size="16x16").images


def test_the_cli_caps_each_window_and_checks_its_options(
    threaded_server: FakeAtomaServer, tmp_path: Path
) -> None:
    from test_cli import cli

    from atoma_images.cli import EXIT_CODES

    done = cli("--fake", "a fox", "--budget-per", "day", cwd=tmp_path, key=None)
    assert done.returncode == EXIT_CODES["invalid input"]
    assert "--budget-per is the window of --max-compute-units" in done.stderr
    (tmp_path / "prompts.txt").write_text("a fox\nan owl\n")
    done = cli(
        *("--base-url", threaded_server.base_url, "--prompts-file", "prompts.txt"),
        *("--size", "16x16", "--concurrency", "1", "--max-compute-units", str(UNITS)),
        *("--budget-per", "day", "--rate-limit", "5"),
        cwd=tmp_path,
    )
    assert done.returncode == EXIT_CODES["balance"], done.stderr
    assert "resets at" in done.stderr
    assert len(threaded_server.posts) == 1


async def test_requests_refused_at_their_deadline_leave_the_rate_limits_permits_free(
    server: FakeAtomaServer, fake_sleep: FakeSleep
) -> None:
    now = [0.0]
    limit = RateLimit(requests=1, per="second", clock=lambda: now[0])
    policy = RetryPolicy(deadline=3, max_retries=0, sleep=fake_sleep)
    async with AsyncImagesClient(
        API_KEY, base_url=server.base_url, retries=policy, rate_limit=limit
    ) as client:
        burst = [client.generate(f"fox {i}", size="16x16") for i in range(20)]
        results = await asyncio.gather(*burst, return_exceptions=True)
        refused = [r for r in results if isinstance(r, APITimeoutError)]
        assert len(refused) + len(server.posts) == 20, results
        assert len(server.posts) == 3  # the permits at 0, 1 and 2 s: within the deadline
        now[0] = 10.0  # the client stays idle a while: its next permit is free at once
        await client.generate("an owl", size="16x16")
    assert len(server.posts) == 4


async def test_a_429_while_requests_wait_for_their_permits_holds_them_too(
    server: FakeAtomaServer,
) -> None:
    # Real time (a second's permits): the fox is told to wait 2 s after the owl has taken
    # its permit, for 1 s later; the owl must wait for the end of the cooldown all the same.
    limit = RateLimit(requests=1, per="second")
    server.enqueue(Reply(status=429, headers={"Retry-After": "2"}))
    async with AsyncImagesClient(API_KEY, base_url=server.base_url, rate_limit=limit) as client:
        await asyncio.gather(
            client.generate("a fox", size="16x16"), client.generate("an owl", size="16x16")
        )
    told, *others = server.posts
    owl = next(post for post in others if post.json()["prompt"] == "an owl")
    assert owl.received - told.received > 1.5, [p.received - told.received for p in others]


class CountingLimiter:
    """A `RateLimiter` of the user's own that keeps no cooldown."""

    def __init__(self) -> None:
        self.permits = 0

    async def acquire(self, *, waited: bool = False, within: float = float("inf")) -> float:
        self.permits += 1
        return 0.0

    async def hold_off(self, seconds: float) -> None:
        pass

    async def cooldown(self) -> float:
        return 0.0


async def test_a_rate_limiter_of_the_users_own_keeps_the_clients_shared_cooldown(
    server: FakeAtomaServer, fake_sleep: FakeSleep
) -> None:
    limiter = CountingLimiter()
    policy = RetryPolicy(sleep=fake_sleep)
    server.enqueue(Reply(status=429, headers={"Retry-After": "1"}))
    async with AsyncImagesClient(
        API_KEY, base_url=server.base_url, retries=policy, rate_limit=limiter
    ) as client:
        await client.generate("a fox", size="16x16")
        await asyncio.gather(*(client.generate(f"owl {i}", size="16x16") for i in range(3)))
    held = fake_sleep.waits[1:]
    assert len(held) == 3, held  # every other call waits for the rest of that second
    assert all(0.5 < wait <= 1 for wait in held), held
    assert limiter.permits == 5


async def test_a_rate_limiter_that_fails_refuses_with_its_own_error_before_sending(
    server: FakeAtomaServer,
) -> None:
    class Broken(CountingLimiter):
        async def acquire(self, *, waited: bool = False, within: float = float("inf")) -> float:
            raise ConnectionRefusedError("the store is down")

    async with AsyncImagesClient(API_KEY, base_url=server.base_url, rate_limit=Broken()) as client:
        with pytest.raises(RateLimitUnavailableError, match="rate limit") as refused:
            await client.generate("a fox", size="16x16")
        # Refused by the client before sending, as a budget refuses: not a call.
        assert client.usage == Usage()
    assert isinstance(refused.value, BudgetUnavailableError)
    assert not refused.value.may_have_been_billed
    assert not server.posts
