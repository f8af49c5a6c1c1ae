"""Retries: every row of the README's table, counted in POSTs the server received."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from email.utils import formatdate
from typing import Any

import pytest
from aiohttp import web

from atoma_images import (
    AmbiguousOutcomeError,
    AmbiguousTimeoutError,
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AsyncImagesClient,
    BadRequestError,
    InternalServerError,
    InvalidRequestError,
    RateLimitError,
    ResponseValidationError,
    RetryPolicy,
    ServerError,
    ServiceUnavailableError,
    Timeout,
)
from atoma_images.testing import FakeAtomaServer, Reply

from helpers import API_KEY, FakeSleep, serving


def policy(fake_sleep: FakeSleep, **overrides: Any) -> RetryPolicy:
    return RetryPolicy(sleep=fake_sleep, **overrides)


async def test_429_with_retry_after_waits_then_succeeds(
    client: AsyncImagesClient, server: FakeAtomaServer, fake_sleep: FakeSleep
) -> None:
    server.enqueue(Reply(status=429, headers={"Retry-After": "2"}))
    result = await client.generate("fox", size="16x16")
    assert result.images
    assert len(server.posts) == 2
    assert len(fake_sleep.waits) == 1
    # The server's wait, plus a jitter that only ever adds.
    assert 2.0 <= fake_sleep.waits[0] <= 2.0 + 0.3


async def test_retry_after_too_long_raises_at_once(
    client: AsyncImagesClient, server: FakeAtomaServer, fake_sleep: FakeSleep
) -> None:
    server.enqueue(Reply(status=429, headers={"Retry-After": "3600"}))
    with pytest.raises(RateLimitError) as info:
        await client.generate("fox", size="16x16")
    assert info.value.retry_after == 3600
    assert info.value.attempts == 1
    assert len(server.posts) == 1
    assert fake_sleep.waits == []


async def test_503_three_times_gives_up_after_three_posts(
    client: AsyncImagesClient, server: FakeAtomaServer, fake_sleep: FakeSleep
) -> None:
    server.enqueue(Reply(status=503), times=3)
    with pytest.raises(ServerError) as info:
        await client.generate("fox", size="16x16")
    assert isinstance(info.value, ServiceUnavailableError)
    assert info.value.attempts == 3
    assert len(server.posts) == 3
    # Full-jitter backoff without a header: within [0, 0.5] then [0, 1.0].
    assert len(fake_sleep.waits) == 2
    assert 0 <= fake_sleep.waits[0] <= 0.5
    assert 0 <= fake_sleep.waits[1] <= 1.0


async def test_500_is_retried_only_once(client: AsyncImagesClient, server: FakeAtomaServer) -> None:
    server.enqueue(Reply(status=500), times=5)
    with pytest.raises(InternalServerError) as info:
        await client.generate("fox", size="16x16")
    assert info.value.attempts == 2
    assert len(server.posts) == 2


@pytest.mark.parametrize("status", [502, 504])
async def test_gateway_errors_count_as_server_errors(
    client: AsyncImagesClient, server: FakeAtomaServer, status: int
) -> None:
    server.enqueue(Reply(status=status), times=5)
    with pytest.raises(ServerError):
        await client.generate("fox", size="16x16")
    assert len(server.posts) == 2


async def test_server_error_budget_is_separate_from_the_total(
    client: AsyncImagesClient, server: FakeAtomaServer
) -> None:
    # 503 (retry), 500 (the one server-error retry), 500 (budget spent): three POSTs.
    server.enqueue(Reply(status=503), Reply(status=500), Reply(status=500), Reply(status=200))
    with pytest.raises(InternalServerError) as info:
        await client.generate("fox", size="16x16")
    assert info.value.attempts == 3
    assert len(server.posts) == 3


def test_server_error_budget_answers_the_same_however_often_it_is_asked() -> None:
    # tenacity asks its stop once per failure today; nothing documented promises it, so the
    # budget counts attempts by number rather than questions.
    from tenacity import RetryCallState

    from atoma_images._retry import _ServerErrorBudget

    budget = _ServerErrorBudget(allowed=1)
    state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
    for number in (1, 2):
        state.attempt_number = number
        error = InternalServerError(status=500, code=None, message="boom", body="", headers={})
        state.set_exception((InternalServerError, error, None))
        answers = {budget(state) for _ in range(3)}
        assert answers == {number > 1}


@pytest.mark.parametrize("status", [408, 423, 425, 429, 503])
async def test_not_now_statuses_are_retried(
    client: AsyncImagesClient, server: FakeAtomaServer, status: int
) -> None:
    server.enqueue(Reply(status=status), times=2)
    assert (await client.generate("fox", size="16x16")).images
    assert len(server.posts) == 3


@pytest.mark.parametrize("status", [400, 401, 402, 403, 404, 413, 422])
async def test_other_4xx_are_never_retried(
    client: AsyncImagesClient, server: FakeAtomaServer, status: int
) -> None:
    server.enqueue(Reply(status=status), times=3)
    with pytest.raises(APIStatusError) as info:
        await client.generate("fox", size="16x16")
    assert info.value.status == status
    assert info.value.attempts == 1
    assert len(server.posts) == 1


async def test_x_should_retry_header_is_obeyed(
    client: AsyncImagesClient, server: FakeAtomaServer
) -> None:
    server.enqueue(Reply(status=503, headers={"x-should-retry": "false"}))
    with pytest.raises(ServiceUnavailableError):
        await client.generate("fox", size="16x16")
    assert len(server.posts) == 1
    server.reset()
    server.enqueue(Reply(status=400, headers={"x-should-retry": "true"}))
    assert (await client.generate("fox", size="16x16")).images
    assert len(server.posts) == 2


@pytest.mark.parametrize(
    ("hint", "posts"), [("FALSE", 1), (" False ", 1), ("TRUE", 2), ("True", 2)]
)
async def test_x_should_retry_is_read_case_insensitively(
    client: AsyncImagesClient, server: FakeAtomaServer, hint: str, posts: int
) -> None:
    # A header value's case carries no meaning here; proxies and SDKs write it either way.
    status = 503 if posts == 1 else 400
    server.enqueue(Reply(status=status, headers={"x-should-retry": hint}))
    if posts == 1:
        with pytest.raises(ServiceUnavailableError):
            await client.generate("fox", size="16x16")
    else:
        assert (await client.generate("fox", size="16x16")).images
    assert len(server.posts) == posts


async def test_read_timeout_is_ambiguous_and_not_retried(
    client: AsyncImagesClient, server: FakeAtomaServer
) -> None:
    server.enqueue(Reply(fault="stall", delay=5))
    started = time.monotonic()
    with pytest.raises(AmbiguousOutcomeError) as info:
        await client.generate("fox", size="16x16", timeout=Timeout(read=0.2))
    assert isinstance(info.value, AmbiguousTimeoutError)
    assert isinstance(info.value, APITimeoutError)
    assert "may have been processed and billed" in str(info.value)
    assert info.value.may_have_been_billed
    assert info.value.attempts == 1
    assert len(server.posts) == 1
    assert time.monotonic() - started < 2


async def test_read_timeout_is_retried_when_asked(
    server: FakeAtomaServer, fake_sleep: FakeSleep
) -> None:
    server.enqueue(Reply(fault="stall", delay=5))
    async with AsyncImagesClient(
        API_KEY,
        base_url=server.base_url,
        retries=policy(fake_sleep, retry_ambiguous=True),
        timeout=Timeout(read=0.2),
    ) as images:
        assert (await images.generate("fox", size="16x16")).images
    assert len(server.posts) == 2


@pytest.mark.parametrize("fault", ["drop", "drop_mid_body"])
async def test_dropped_connection_after_sending_is_ambiguous(
    client: AsyncImagesClient, server: FakeAtomaServer, fault: Any
) -> None:
    server.enqueue(Reply(fault=fault))
    with pytest.raises(AmbiguousOutcomeError) as info:
        await client.generate("fox", size="16x16")
    assert not isinstance(info.value, APITimeoutError)
    assert len(server.posts) == 1
    assert info.value.__cause__ is not None  # aiohttp's exception, kept for diagnosis


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_connection_refused_is_retried(fake_sleep: FakeSleep) -> None:
    async with AsyncImagesClient(
        API_KEY, base_url=f"http://127.0.0.1:{_closed_port()}/v1", retries=policy(fake_sleep)
    ) as images:
        with pytest.raises(APIConnectionError) as info:
            await images.generate("fox", size="16x16")
    assert not isinstance(info.value, AmbiguousOutcomeError)
    assert "was not sent" in str(info.value)
    assert not info.value.may_have_been_billed
    assert info.value.attempts == 3
    assert len(fake_sleep.waits) == 2


async def test_refused_then_up_succeeds(fake_sleep: FakeSleep) -> None:
    port = _closed_port()
    fake = FakeAtomaServer(port=port)

    async def start_server_during_the_wait(seconds: float) -> None:
        fake_sleep.waits.append(seconds)
        if fake.requests == [] and not fake._runner:
            await fake.start()

    async with AsyncImagesClient(
        API_KEY,
        base_url=f"http://127.0.0.1:{port}/v1",
        retries=RetryPolicy(sleep=start_server_during_the_wait),
    ) as images:
        assert (await images.generate("fox", size="16x16")).images
    await fake.stop()
    assert len(fake.posts) == 1
    assert len(fake_sleep.waits) == 1


async def test_max_retries_zero_turns_retrying_off(
    client: AsyncImagesClient, server: FakeAtomaServer, fake_sleep: FakeSleep
) -> None:
    server.enqueue(Reply(status=503), times=3)
    with pytest.raises(ServiceUnavailableError) as info:
        await client.generate("fox", size="16x16", retries=RetryPolicy(max_retries=0))
    assert info.value.attempts == 1
    assert len(server.posts) == 1
    assert fake_sleep.waits == []


async def test_policy_per_call_overrides_the_client(
    server: FakeAtomaServer, fake_sleep: FakeSleep
) -> None:
    async with AsyncImagesClient(
        API_KEY, base_url=server.base_url, retries=RetryPolicy(max_retries=0)
    ) as images:
        server.enqueue(Reply(status=503))
        assert (await images.generate("fox", size="16x16", retries=policy(fake_sleep))).images
    assert len(server.posts) == 2


async def test_deadline_stops_before_sleeping_past_it(
    client: AsyncImagesClient, server: FakeAtomaServer, fake_sleep: FakeSleep
) -> None:
    server.enqueue(Reply(status=503, headers={"Retry-After": "30"}))
    with pytest.raises(ServiceUnavailableError) as info:
        await client.generate("fox", size="16x16", retries=policy(fake_sleep, deadline=10))
    assert info.value.retry_after == 30
    assert len(server.posts) == 1
    assert fake_sleep.waits == []


@pytest.mark.parametrize("where", ["client", "call"])
async def test_no_attempt_outlives_the_deadline(server: FakeAtomaServer, where: str) -> None:
    server.latency = 3
    short = RetryPolicy(deadline=0.3)
    started = time.monotonic()
    with pytest.raises(AmbiguousTimeoutError):
        async with AsyncImagesClient(
            API_KEY, base_url=server.base_url, retries=short if where == "client" else None
        ) as images:
            await images.generate("fox", size="16x16", retries=short if where == "call" else None)
    assert time.monotonic() - started < 1.5
    assert len(server.posts) == 1


async def test_retry_after_variants(
    client: AsyncImagesClient, server: FakeAtomaServer, fake_sleep: FakeSleep
) -> None:
    server.enqueue(
        Reply(status=503, headers={"retry-after-ms": "1500"}),
        Reply(status=429, headers={"Retry-After": formatdate(time.time() + 20, usegmt=True)}),
    )
    assert (
        await client.generate("fox", size="16x16", retries=policy(fake_sleep, max_retries=3))
    ).images
    assert 1.5 <= fake_sleep.waits[0] <= 1.9
    assert 18 <= fake_sleep.waits[1] <= 21.1


async def test_one_info_line_per_retry_without_secrets(
    client: AsyncImagesClient, server: FakeAtomaServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="atoma_images")
    server.enqueue(
        Reply(
            status=429,
            headers={"x-request-id": "rid-1"},
            body={"error": {"message": "SECRET-BODY"}},
        ),
        Reply(status=503),
    )
    await client.generate("fox", size="16x16")
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(lines) == 2
    assert "attempt 1 failed (status 429)" in lines[0]
    assert "rid-1" in lines[0]
    assert "attempt 2 failed (status 503)" in lines[1]
    assert all("SECRET-BODY" not in line and API_KEY not in line for line in lines)


async def test_cancel_during_the_wait_sends_nothing_more(server: FakeAtomaServer) -> None:
    waiting = asyncio.Event()

    async def sleep_forever(seconds: float) -> None:
        waiting.set()
        await asyncio.Event().wait()

    server.enqueue(Reply(status=503))
    async with AsyncImagesClient(
        API_KEY,
        base_url=server.base_url,
        max_connections=1,
        retries=RetryPolicy(sleep=sleep_forever),
    ) as images:
        call = asyncio.create_task(images.generate("fox", size="16x16"))
        await asyncio.wait_for(waiting.wait(), 5)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await asyncio.sleep(0.05)
        assert len(server.posts) == 1
        # With one connection in the pool, this only works if the first was released.
        assert (await asyncio.wait_for(images.generate("fox", size="16x16"), 5)).images


async def test_cancel_during_the_request_sends_nothing_more(server: FakeAtomaServer) -> None:
    server.enqueue(Reply(delay=5))
    async with AsyncImagesClient(API_KEY, base_url=server.base_url, max_connections=1) as images:
        call = asyncio.create_task(images.generate("fox", size="16x16"))
        while not server.posts:  # noqa: ASYNC110 - polling the server's record is the point
            await asyncio.sleep(0.01)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await asyncio.sleep(0.05)
        assert len(server.posts) == 1
        assert (await asyncio.wait_for(images.generate("fox", size="16x16"), 5)).images
    assert len(server.posts) == 2


async def test_invalid_response_is_not_retried(
    client: AsyncImagesClient, server: FakeAtomaServer
) -> None:
    server.enqueue(Reply(status=200, body=b"nonsense"), times=3)
    with pytest.raises(ResponseValidationError, match="not JSON"):
        await client.generate("fox", size="16x16")
    assert len(server.posts) == 1


async def test_bad_request_after_a_retry_stops_there(
    client: AsyncImagesClient, server: FakeAtomaServer
) -> None:
    server.enqueue(Reply(status=429), Reply(status=400), Reply(status=200))
    with pytest.raises(BadRequestError) as info:
        await client.generate("fox", size="16x16")
    assert info.value.attempts == 2
    assert len(server.posts) == 2


@pytest.mark.parametrize(
    ("arguments", "field"),
    [
        ({"max_retries": -1}, "retries.max_retries"),
        ({"max_retries": 1.5}, "retries.max_retries"),
        ({"max_server_error_retries": True}, "retries.max_server_error_retries"),
        ({"retry_ambiguous": 1}, "retries.retry_ambiguous"),
        ({"deadline": -5}, "retries.deadline"),
        ({"deadline": 0}, "retries.deadline"),  # no attempt fits: it could only ever fail
        ({"deadline": 1e-6}, "retries.deadline"),
        ({"deadline": float("nan")}, "retries.deadline"),
        ({"backoff_max": "8"}, "retries.backoff_max"),
        ({"max_retry_after": float("inf")}, "retries.max_retry_after"),
    ],
)
def test_policy_checks_its_fields(arguments: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequestError, match=f"invalid {field}"):
        RetryPolicy(**arguments)


@pytest.mark.parametrize("status", [502, 504])
async def test_a_gateways_502_or_504_may_have_been_billed_and_is_not_sent_again(
    client: AsyncImagesClient, server: FakeAtomaServer, fake_sleep: FakeSleep, status: int
) -> None:
    # Without Atoma's error code the answer came from a gateway, which may have forwarded the
    # request and given up while the service worked on and billed it.
    server.enqueue(Reply(status=status, body="<html>gateway</html>"), times=2)
    with pytest.raises(APIStatusError) as info:
        await client.generate("fox", size="16x16")
    assert info.value.may_have_been_billed
    assert len(server.posts) == 1
    server.reset()
    server.enqueue(Reply(status=status, body="<html>gateway</html>"))
    asked = RetryPolicy(sleep=fake_sleep, retry_ambiguous=True)
    assert (await client.generate("fox", size="16x16", retries=asked)).images
    assert len(server.posts) == 2


OPENAI_500 = {
    "error": {
        "message": "The server had an error",
        "type": "server_error",
        "param": None,
        "code": None,
    }
}


@pytest.mark.parametrize(
    ("reply", "posts"),
    [
        (Reply(status=500), 2),  # Atoma's own envelope: refused, settled at zero; retried once
        (Reply(status=500, body=OPENAI_500), 2),  # OpenAI's envelope, whose code may be null
        # "Not now", whoever says it: nothing was taken on, so it is sent again.
        (Reply(status=503, body="<html><title>503 Service Unavailable</title></html>"), 3),
        (Reply(status=429, body="Too Many Requests"), 3),
    ],
)
async def test_refusals_in_the_apis_envelope_and_not_now_pages_are_not_billed_and_retried(
    client: AsyncImagesClient, server: FakeAtomaServer, reply: Reply, posts: int
) -> None:
    server.enqueue(reply, times=posts)
    with pytest.raises(APIStatusError) as info:
        await client.generate("fox", size="16x16")
    assert not info.value.may_have_been_billed
    assert info.value.attempts == len(server.posts) == posts


async def test_an_invalid_success_is_never_sent_again_even_when_ambiguity_is_allowed(
    client: AsyncImagesClient, server: FakeAtomaServer, fake_sleep: FakeSleep
) -> None:
    server.enqueue(Reply(status=200, body=b"not json"), times=2)
    asked = RetryPolicy(sleep=fake_sleep, retry_ambiguous=True)
    with pytest.raises(ResponseValidationError):
        await client.generate("fox", size="16x16", retries=asked)
    assert len(server.posts) == 1


async def test_no_retry_is_sent_with_less_than_a_second_of_the_deadline_left(
    server: FakeAtomaServer,
) -> None:
    # The first attempt's 503 comes after 0.7 s of a 1.5 s deadline: a retry could not bring
    # an image back in what is left, but could be billed. The call ends with the 503.
    server.enqueue(Reply(status=503, delay=0.7))
    policy = RetryPolicy(deadline=1.5, backoff_base=0)
    async with AsyncImagesClient(API_KEY, base_url=server.base_url, retries=policy) as client:
        with pytest.raises(ServiceUnavailableError) as caught:
            await client.generate("fox", size="16x16")
    assert caught.value.attempts == 1
    assert not caught.value.may_have_been_billed
    assert len(server.posts) == 1


async def test_a_call_that_bills_nothing_never_says_it_may_have_been_billed() -> None:
    # A download dropped after it was sent, and a models list answered by a gateway's page:
    # a GET bills nothing, whatever failed.
    async def dropped(request: web.Request) -> web.Response:
        if request.transport is not None:
            request.transport.close()
        return web.Response()

    async def gateway_page(request: web.Request) -> web.Response:
        return web.Response(status=500, text="<html>oops</html>", content_type="text/html")

    app = web.Application()
    app.router.add_get("/files/x.png", dropped)
    app.router.add_get("/v1/models", gateway_page)
    once = RetryPolicy(max_retries=0)
    async with (
        serving(app) as root,
        AsyncImagesClient(API_KEY, base_url=f"{root}/v1", retries=once) as client,
    ):
        with pytest.raises(AmbiguousOutcomeError) as lost:
            await client.download(f"{root}/files/x.png")
        with pytest.raises(InternalServerError) as refused:
            await client.models()
    assert not lost.value.may_have_been_billed
    assert not refused.value.may_have_been_billed
