from __future__ import annotations

import pytest

from atoma_images import (
    AmbiguousTimeoutError,
    APITimeoutError,
    AsyncImagesClient,
    InvalidRequestError,
    RetryPolicy,
    Timeout,
)
from atoma_images.testing import FakeAtomaServer

from helpers import API_KEY

NO_RETRIES = RetryPolicy(max_retries=0)


def test_defaults_fit_image_generation() -> None:
    timeout = Timeout()
    assert (timeout.connect, timeout.read, timeout.pool, timeout.total) == (10.0, 300.0, 30.0, None)
    assert RetryPolicy().deadline == 600.0


def test_a_number_means_the_whole_attempt() -> None:
    assert Timeout.of(12.5) == Timeout(total=12.5)
    assert Timeout.of(3) == Timeout(total=3)
    custom = Timeout(read=5)
    assert Timeout.of(custom) is custom


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), True, "5"])
def test_limits_must_be_positive_finite_numbers(bad: object) -> None:
    with pytest.raises(InvalidRequestError, match="timeout"):
        Timeout(read=bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="timeout"):
        Timeout.of(bad)  # type: ignore[arg-type]


def test_aiohttp_limits_and_the_deadline_cap() -> None:
    limits = Timeout(connect=2, read=7, pool=3, total=50).for_attempt(remaining=600)
    assert (limits.total, limits.connect, limits.sock_connect, limits.sock_read) == (50, 5, 2, 7)
    assert Timeout(total=50).for_attempt(remaining=4).total == 4
    assert Timeout().for_attempt(remaining=4).total == 4
    assert Timeout().for_attempt(remaining=-1).total == 0.001
    assert Timeout(pool=None, total=20).for_attempt(600).connect == 19.95


@pytest.mark.parametrize("total", [0.001, 0.05, 0.3, 3.0, 40.0, 599.0])
@pytest.mark.parametrize("pool", [None, 0.01, 30.0])
def test_the_connect_phase_always_ends_before_the_attempt(total: float, pool: float | None) -> None:
    # aiohttp's connect limit (pool wait + connecting) ends with ConnectionTimeoutError, which
    # proves nothing was sent; its total limit does not. The first must run out first, and
    # neither may be rounded up to a whole second (which could swap them).
    limits = Timeout(pool=pool, total=total).for_attempt(remaining=600)
    assert limits.connect is not None
    assert 0 < limits.connect < limits.total  # type: ignore[operator]
    assert limits.ceil_threshold > 600


@pytest.mark.parametrize(
    ("client_timeout", "call_timeout", "times_out"),
    [
        (None, None, False),  # default: minutes
        (0.2, None, True),  # the client's limit applies
        (0.2, 5, False),  # the call's overrides the client's
        (None, 0.2, True),  # the call's overrides the default
        (5, Timeout(read=0.2), True),  # a Timeout per call replaces the client's wholesale
    ],
)
async def test_precedence_call_then_client_then_default(
    server: FakeAtomaServer,
    client_timeout: float | None,
    call_timeout: Timeout | float | None,
    times_out: bool,
) -> None:
    server.latency = 0.6
    async with AsyncImagesClient(
        API_KEY, base_url=server.base_url, timeout=client_timeout, retries=NO_RETRIES
    ) as images:
        if times_out:
            with pytest.raises(AmbiguousTimeoutError):
                await images.generate("fox", size="16x16", timeout=call_timeout)
        else:
            assert (await images.generate("fox", size="16x16", timeout=call_timeout)).images
        assert images.timeout == (
            Timeout() if client_timeout is None else Timeout.of(client_timeout)
        )


async def test_pool_wait_is_a_timeout_before_sending(server: FakeAtomaServer) -> None:
    import asyncio

    server.latency = 1.0
    async with AsyncImagesClient(
        API_KEY,
        base_url=server.base_url,
        max_connections=1,
        timeout=Timeout(pool=0.1, connect=0.1),
        retries=NO_RETRIES,
    ) as images:
        first = asyncio.create_task(images.generate("fox", size="16x16"))
        await asyncio.sleep(0.05)
        with pytest.raises(APITimeoutError) as info:
            await images.generate("fox", size="16x16")
        assert not info.value.may_have_been_billed
        assert "was not sent" in str(info.value)
        assert (await first).images
    assert len(server.posts) == 1


async def test_a_pool_wait_is_not_sent_even_when_a_stalled_loop_lets_every_limit_run_out(
    server: FakeAtomaServer,
) -> None:
    # A CPU-bound stretch elsewhere in the application freezes the loop past both the connect
    # limit and the attempt's overall limit: both fire at once when it wakes. The second
    # call never had a connection, so it was not sent, whichever limit wins.
    import asyncio
    import time

    server.latency = 1.0
    async with AsyncImagesClient(
        API_KEY, base_url=server.base_url, max_connections=1, timeout=0.6, retries=NO_RETRIES
    ) as images:

        async def stall() -> None:
            await asyncio.sleep(0.5)
            time.sleep(0.3)  # noqa: ASYNC251 - the blocking stretch is the point

        sent = asyncio.create_task(images.generate("sent", size="16x16"))
        await asyncio.sleep(0.05)  # the first call holds the one connection
        waiting = asyncio.create_task(images.generate("waiting", size="16x16"))
        await stall()
        with pytest.raises(AmbiguousTimeoutError):
            await sent
        with pytest.raises(APITimeoutError) as info:
            await waiting
    assert not info.value.may_have_been_billed
    assert "was not sent" in str(info.value)
    assert [post.json()["prompt"] for post in server.posts] == ["sent"]


# -- aiohttp's own read timer, through its public API only ---------------------------------


async def test_the_read_limit_counts_from_the_last_byte() -> None:
    import asyncio
    import time

    from aiohttp import web

    from conftest import serving

    done = asyncio.Event()

    async def headers_a_byte_then_silence(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = 100
        await response.prepare(request)
        await asyncio.sleep(0.4)
        await response.write(b"{")
        # Silent until the test is over: the client gives up long before (the server's
        # clean-up would otherwise wait out a fixed sleep).
        await done.wait()
        return response

    app = web.Application()
    app.router.add_post("/v1/images/generations", headers_a_byte_then_silence)
    async with (
        serving(app) as root,
        AsyncImagesClient(API_KEY, base_url=root + "/v1", retries=NO_RETRIES) as images,
    ):
        started = time.monotonic()
        with pytest.raises(AmbiguousTimeoutError):
            await images.generate("fox", size="16x16", timeout=Timeout(read=0.6))
        elapsed = time.monotonic() - started
        done.set()
    # 0.4 s to the byte, then 0.6 s of silence: about 1.0 s. A timer that ignored the
    # byte would have fired at 0.6 s.
    assert 0.95 <= elapsed < 2.5


async def test_a_shorter_read_limit_on_a_reused_connection_applies(
    server: FakeAtomaServer,
) -> None:
    import time

    from atoma_images.testing import Reply

    async with AsyncImagesClient(
        API_KEY, base_url=server.base_url, max_connections=1, retries=NO_RETRIES
    ) as images:
        await images.generate("fox", size="16x16", timeout=Timeout(read=300))
        server.enqueue(Reply(fault="stall", delay=5))
        started = time.monotonic()
        with pytest.raises(AmbiguousTimeoutError):
            await images.generate("fox", size="16x16", timeout=Timeout(read=0.3))
        assert time.monotonic() - started < 2.0
    assert server.connections == 1
