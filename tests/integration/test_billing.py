"""The billing rule, held over a matrix of faults.

An error with ``may_have_been_billed == False`` means the server never received that request
(or answered it with an error status, which Atoma settles at zero). So, for every call:

- "not billed" => no request carrying its prompt was left unanswered or answered with success;
- requests the server received and did not answer with an error status
  == successes + errors with ``may_have_been_billed`` true.

The server here is a raw asyncio one, so that it can fail at any byte: it logs a request as
received once it has read the request's headers (the earliest moment a real server could act
on it), and then answers, stalls, or drops the connection before or after reading the body.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import socket
from collections.abc import AsyncIterator, Iterator

import aiohttp
import attrs
import pytest

from atoma_images import (
    AsyncImagesClient,
    AtomaImagesError,
    Budget,
    ImagesResponse,
    RetryPolicy,
    ServerError,
    Timeout,
)
from atoma_images.testing import make_png

from helpers import FakeSleep

ANSWER = json.dumps(
    {"created": 1, "data": [{"b64_json": base64.b64encode(make_png(8, 8)).decode()}]}
).encode()

#: What the server does with a request, and how often.
FATES = {
    "ok": 4,
    "429": 1,
    "500": 1,
    "503": 1,
    "stall_before_headers": 1,  # reads the request, never answers: a read timeout
    "drop_before_body": 1,  # reads the headers only, then closes
    "drop_after_body": 1,  # reads the whole request, then closes
    "gateway_504": 1,  # the service did the work; a gateway in front gave up: 504, no code
    "cloudflare_524": 1,  # the same behind Cloudflare: its own page, 524
    "bare_500": 1,  # the service did the work, then something in front crashed: no envelope
}

#: What a gateway (or a crash) in front of the service answers, though the service did the
#: work behind it: the status, and a page that is not the API's error envelope.
GATEWAY_PAGES = {
    "gateway_504": (504, b"<html><title>504 Gateway Time-out</title></html>"),
    "cloudflare_524": (524, b"<html><title>example.com | 524: A timeout occurred</title></html>"),
    "cloudflare_520": (
        520,
        b"<html><title>example.com | 520: Web server is returning an unknown error</title></html>",
    ),
    "bare_500": (500, b"Internal Server Error"),
}


@attrs.define
class Received:
    """One request as the server saw it."""

    prompt: str | None = None  # None until the body was read
    status: int | None = None  # None: never answered
    worked: bool = False  # the service did the work (a gateway's error status may hide it)

    @property
    def billable(self) -> bool:
        """What the service may have billed: not refused with an error status of its own."""
        return self.worked or self.status is None or self.status < 300


@attrs.define
class FaultServer:
    """Answers each request with a fate drawn from a seeded random sequence."""

    seed: int
    fates: dict[str, int] = attrs.Factory(lambda: dict(FATES))
    ok_delay: float = 0.05
    received: list[Received] = attrs.Factory(list)
    random: random.Random = attrs.field(init=False)
    handlers: set[asyncio.Task[None]] = attrs.Factory(set)

    def __attrs_post_init__(self) -> None:
        self.random = random.Random(self.seed)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.handlers.add(asyncio.current_task())  # type: ignore[arg-type]
        try:
            await self.answer(reader, writer)
        finally:
            writer.close()

    async def answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:  # keep-alive: one request after another on the connection
                head = await reader.readuntil(b"\r\n\r\n")
                record = Received()
                self.received.append(record)
                fate = self.random.choices(list(self.fates), weights=list(self.fates.values()))[0]
                if fate == "drop_before_body":
                    break
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                record.prompt = json.loads(await reader.readexactly(length))["prompt"]
                if fate == "drop_after_body":
                    break
                if fate == "stall_before_headers":
                    await reader.read()  # until the client gives up and hangs up
                    break
                record.worked = fate == "ok" or fate in GATEWAY_PAGES
                if fate == "ok":
                    await asyncio.sleep(self.ok_delay)
                    status, body = 200, ANSWER
                elif fate in GATEWAY_PAGES:
                    status, body = GATEWAY_PAGES[fate]
                else:  # the service's own refusal, with its error code: settled at zero
                    status = int(fate)
                    body = b'{"error":{"code":"X","message":"no"}}'
                extra = b"Retry-After: 0\r\n" if status == 429 else b""
                writer.write(
                    b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\n%sContent-Length: %d"
                    b"\r\n\r\n%s" % (status, extra, len(body), body)
                )
                record.status = status
                await writer.drain()


@contextlib.asynccontextmanager
async def fault_server(fake: FaultServer) -> AsyncIterator[tuple[FaultServer, str]]:
    server = await asyncio.start_server(fake.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield fake, f"http://127.0.0.1:{port}/v1"
    finally:
        server.close()
        # Connections the clients kept alive are still being read: end them, and wait.
        for handler in fake.handlers:
            handler.cancel()
        await asyncio.gather(*fake.handlers, return_exceptions=True)
        await server.wait_closed()
        # A closed transport closes its socket one loop step later: let those steps run
        # before the test's loop ends, or the sockets are left to the garbage collector.
        for _ in range(3):
            await asyncio.sleep(0)


@contextlib.contextmanager
def stalled_listener() -> Iterator[str]:
    """A port whose accept queue is full, so a new connection never completes."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):  # more than the queue holds: later connects hang in SYN-SENT
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


def refused_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"  # nothing listens there any more


def check_the_rule(
    outcomes: dict[str, ImagesResponse | BaseException], received: list[Received]
) -> None:
    unexpected = [
        o for o in outcomes.values() if not isinstance(o, (ImagesResponse, AtomaImagesError))
    ]
    assert not unexpected
    # Received and not refused by the service itself: what it may have billed.
    billable = [r for r in received if r.billable]
    successes = [p for p, o in outcomes.items() if isinstance(o, ImagesResponse)]
    billed_errors = [
        p for p, o in outcomes.items() if isinstance(o, AtomaImagesError) and o.may_have_been_billed
    ]
    not_billed = [
        p
        for p, o in outcomes.items()
        if isinstance(o, AtomaImagesError) and not o.may_have_been_billed
    ]
    for prompt in not_billed:
        seen = [r for r in billable if r.prompt == prompt]
        assert not seen, (
            f"{prompt}: {outcomes[prompt]!r} says not billed, but the server got {seen}"
        )
    assert len(billable) == len(successes) + len(billed_errors)


#: The pooled clients' limits for one attempt: aiohttp's bound for waiting for a connection
#: (``pool + connect``, 0.9 s) is longer than the attempt's ``total`` (0.5 s).
#: `Timeout.for_attempt` ends that wait before ``total`` (at 0.45 s), so that aiohttp's error
#: says nothing was sent; if ``total`` fired during the wait instead, only the client's own
#: session, whose request trace sees that no header was sent, could still tell. On a session
#: passed in, the order of the limits is all there is.
POOL_LIMITS = Timeout(total=0.5, read=None, connect=0.1, pool=0.8)
#: How long a pooled client's only connection is held: well past the waiters' 0.45 s.
HOLD = 1.0
POOLED = ("own session", "session passed in")


async def until_received(server: FaultServer, prompt: str) -> None:
    """Wait until ``server`` has read the request for ``prompt``."""
    for _ in range(5000):
        if any(record.prompt == prompt for record in server.received):
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"{prompt}: the request never reached the server")


# One seed in the default run (it must stay under a minute); CI runs the others too (slow).
@pytest.mark.parametrize(
    "seed", [1, pytest.param(2, marks=pytest.mark.slow), pytest.param(3, marks=pytest.mark.slow)]
)
async def test_not_billed_means_never_received_over_a_fault_matrix(seed: int) -> None:
    sleep = FakeSleep()
    policy = RetryPolicy(sleep=sleep, max_retries=2)
    once = RetryPolicy(sleep=sleep, max_retries=0)
    # Few connections for many calls and a short attempt limit, besides every fault the
    # server plays.
    limits = Timeout(total=0.8, read=0.4, connect=0.3, pool=1.0)
    outcomes: dict[str, ImagesResponse | BaseException] = {}

    async def call(
        client: AsyncImagesClient,
        prompt: str,
        timeout: Timeout | None = None,
        retries: RetryPolicy | None = None,
    ) -> None:
        try:
            outcomes[prompt] = await client.generate(
                prompt, size="16x16", timeout=timeout, retries=retries
            )
        except BaseException as exc:  # checked below: only our errors may come out
            outcomes[prompt] = exc

    async def hold_then_wait(pooled: AsyncImagesClient, slow: FaultServer, name: str) -> None:
        # A slow request holds the client's only connection; the calls made while it is held
        # wait in the pool until they time out there, and are never sent. (One attempt each:
        # the retries of a pool wait are test_pool_waits_that_time_out_are_not_billed...)
        holder = f"seed {seed} {name}: holder"
        holding = asyncio.ensure_future(call(pooled, holder, timeout=Timeout(read=10 * HOLD)))
        await until_received(slow, holder)
        await asyncio.gather(
            *(call(pooled, f"seed {seed} {name}: waiter {i}", retries=once) for i in range(3))
        )
        await holding

    async with (
        fault_server(FaultServer(seed)) as (server, url),
        fault_server(FaultServer(seed, fates={"ok": 1}, ok_delay=HOLD)) as (slow, slow_url),
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as one_connection,
    ):
        with stalled_listener() as stalled:
            async with (
                AsyncImagesClient(
                    "k", base_url=url, max_connections=3, timeout=limits, retries=policy
                ) as busy,
                AsyncImagesClient("k", base_url=refused_url(), retries=policy) as refused,
                AsyncImagesClient("k", base_url=stalled, timeout=limits, retries=policy) as stalls,
                AsyncImagesClient(
                    "k", base_url=slow_url, max_connections=1, timeout=POOL_LIMITS, retries=policy
                ) as pooled,
                AsyncImagesClient(
                    "k",
                    base_url=slow_url,
                    session=one_connection,
                    timeout=POOL_LIMITS,
                    retries=policy,
                ) as pooled_on_a_session,
            ):
                await asyncio.gather(
                    *(call(busy, f"seed {seed} call {i}") for i in range(40)),
                    *(call(refused, f"seed {seed} refused {i}") for i in range(3)),
                    *(call(stalls, f"seed {seed} stalled {i}") for i in range(3)),
                )
                # Then, so as not to change which of the calls above meets which fault:
                await asyncio.gather(
                    hold_then_wait(pooled, slow, POOLED[0]),
                    hold_then_wait(pooled_on_a_session, slow, POOLED[1]),
                )
    # Prompts differ between the two servers, so the rule holds over both at once.
    check_the_rule(outcomes, server.received + slow.received)
    kinds = {type(o).__name__ for o in outcomes.values()}
    # The matrix really ran: a success, a timeout before sending, one after, a status error.
    assert {"ImagesResponse", "APITimeoutError", "AmbiguousTimeoutError"} <= kinds, kinds
    assert kinds & {"RateLimitError", "InternalServerError", "ServiceUnavailableError"}, kinds
    assert all(not outcomes[f"seed {seed} refused {i}"].may_have_been_billed for i in range(3))  # type: ignore[union-attr]
    assert all(
        type(outcomes[f"seed {seed} stalled {i}"]).__name__ == "APITimeoutError" for i in range(3)
    )
    # ...and so did waiting for a connection, on either kind of session: calls ended timed
    # out in the pool (the one connection was held throughout), not billed.
    for name in POOLED:
        assert type(outcomes[f"seed {seed} {name}: holder"]).__name__ == "ImagesResponse"
        waiters = [outcomes[f"seed {seed} {name}: waiter {i}"] for i in range(3)]
        pool_waits = [o for o in waiters if type(o).__name__ == "APITimeoutError"]
        assert pool_waits, (name, waiters)
        for error in pool_waits:
            assert isinstance(error, AtomaImagesError)
            assert not error.may_have_been_billed
            assert "waiting for a connection" in str(error)
            assert error.attempts == 1


@pytest.mark.parametrize("seed", [1, pytest.param(2, marks=pytest.mark.slow)])
async def test_n_images_on_atoma_agree_with_the_bill_over_a_fault_matrix(seed: int) -> None:
    """On Atoma a call for 3 images is 3 requests, each meeting its own fault: every call's
    outcome, the client's usage and its budget agree with what the server may have billed."""
    unit = 16 * 16
    budget = Budget(max_compute_units=10**9)
    policy = RetryPolicy(sleep=FakeSleep(), max_retries=2)
    limits = Timeout(total=0.8, read=0.4, connect=0.3, pool=1.0)
    outcomes: dict[str, ImagesResponse | BaseException] = {}

    async def call(client: AsyncImagesClient, prompt: str) -> None:
        try:
            outcomes[prompt] = await client.generate(prompt, n=3, size="16x16")
        except BaseException as exc:  # checked below: only our errors may come out
            outcomes[prompt] = exc

    # Mostly successes: a call succeeds only when its three requests do, and each fault of
    # the matrix ends a request once.
    fates = {**FATES, "ok": 16}
    async with (
        fault_server(FaultServer(seed, fates=fates)) as (server, url),
        AsyncImagesClient(
            "k", base_url=url, max_connections=9, timeout=limits, retries=policy, budget=budget
        ) as client,
    ):
        await asyncio.gather(*(call(client, f"seed {seed} call {i}") for i in range(12)))
    billable = [r for r in server.received if r.billable]
    images = 0
    for prompt, outcome in outcomes.items():
        sent = len([r for r in billable if r.prompt == prompt])
        if isinstance(outcome, ImagesResponse):
            assert len(outcome.images) == 3
            assert sent == 3, prompt
            images += 3
            continue
        assert isinstance(outcome, AtomaImagesError), outcome
        came_back = 0 if outcome.partial is None else len(outcome.partial.images)
        assert came_back <= sent, prompt  # every image handed back was billed by the server
        images += came_back
        if not outcome.may_have_been_billed:
            assert (sent, outcome.partial) == (0, None), prompt
    usage = client.usage
    assert usage.images == images
    assert usage.compute_units == images * unit
    # Every request the server may have billed is billed or maybe billed on the client's side.
    assert len(billable) * unit == usage.max_compute_units == budget.used
    kinds = {type(o).__name__ for o in outcomes.values()}
    assert "ImagesResponse" in kinds, kinds
    assert any(isinstance(o, AtomaImagesError) and o.partial for o in outcomes.values()), kinds


async def test_pool_waits_that_time_out_are_not_billed_and_are_retried() -> None:
    """The case from the field: more calls than connections, a per-attempt total limit."""
    sleep = FakeSleep()
    only_ok = FaultServer(0, fates={"ok": 1}, ok_delay=0.2)
    async with fault_server(only_ok) as (server, url):
        outcomes: dict[str, ImagesResponse | BaseException] = {}
        async with AsyncImagesClient(
            "k", base_url=url, max_connections=2, timeout=0.5, retries=RetryPolicy(sleep=sleep)
        ) as client:

            async def call(prompt: str) -> None:
                try:
                    outcomes[prompt] = await client.generate(prompt, size="16x16")
                except AtomaImagesError as exc:
                    outcomes[prompt] = exc

            await asyncio.gather(*(call(f"p{i}") for i in range(20)))
    check_the_rule(outcomes, server.received)
    # A call that waited too long for a connection was never sent: a plain APITimeoutError,
    # retried until the policy's three attempts were spent. (One that got a connection late
    # and then ran out of time was sent: AmbiguousTimeoutError, as check_the_rule requires.)
    never_sent = [o for o in outcomes.values() if type(o).__name__ == "APITimeoutError"]
    assert never_sent  # 20 calls through 2 connections at 0.2 s each cannot all fit
    assert all(e.attempts == 3 and not e.may_have_been_billed for e in never_sent)  # type: ignore[union-attr]


@pytest.mark.parametrize("fate", list(GATEWAY_PAGES))
async def test_a_gateways_error_page_may_have_been_billed_and_is_not_sent_again(fate: str) -> None:
    """Only the API's own error envelope proves a refusal: behind a gateway's page (Cloudflare's
    524 and 520, a 504, a bare 500) the service did the work, and billed it once."""
    budget = Budget(max_compute_units=10**6)
    policy = RetryPolicy(sleep=FakeSleep())
    async with (
        fault_server(FaultServer(0, fates={fate: 1})) as (server, url),
        AsyncImagesClient("k", base_url=url, retries=policy, budget=budget) as client,
    ):
        with pytest.raises(ServerError) as caught:
            await client.generate(fate, size="16x16")
    check_the_rule({fate: caught.value}, server.received)
    assert caught.value.may_have_been_billed
    assert caught.value.attempts == len(server.received) == 1  # billed once, not twice
    assert budget.used == client.usage.maybe_billed_compute_units == 16 * 16
