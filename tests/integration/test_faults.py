"""The fault matrix: every way a server or network can fail, against a real server.

Each row asserts the class raised, that its message is readable, how many POSTs the server
received, and so that no duplicate POST follows an ambiguous failure by default.
"""

from __future__ import annotations

import time
import tracemalloc
from email.utils import formatdate

import attrs
import pytest

from atoma_images import (
    AmbiguousOutcomeError,
    AmbiguousTimeoutError,
    APIConnectionError,
    AsyncImagesClient,
    AtomaImagesError,
    BadGatewayError,
    GatewayTimeoutError,
    InternalServerError,
    LockedError,
    RateLimitError,
    ResponseValidationError,
    RetryPolicy,
    ServiceUnavailableError,
    StackUnavailableError,
    Timeout,
)
from atoma_images.testing import FakeAtomaServer, Reply

from helpers import API_KEY, FakeSleep

HTML_502 = (
    "<html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad Gateway"
    "</h1></center><hr><center>nginx</center></body></html>"
)


@attrs.frozen
class Fault:
    reply: Reply
    error: type[AtomaImagesError]
    posts: int
    phrase: str  # a piece of the message that says what happened
    timeout: Timeout | None = None


FAULTS = {
    "429 retry-after seconds, too long": Fault(
        Reply(status=429, headers={"Retry-After": "120"}), RateLimitError, 1, "429"
    ),
    "429 retry-after http date, too long": Fault(
        Reply(status=429, headers={"Retry-After": formatdate(time.time() + 3600, usegmt=True)}),
        RateLimitError,
        1,
        "Too Many Requests",
    ),
    "429 retry-after, always": Fault(
        Reply(status=429, headers={"Retry-After": "1"}), RateLimitError, 3, "429"
    ),
    "423 locked": Fault(Reply(status=423), LockedError, 3, "LOCKED"),
    "425 no stack": Fault(Reply(status=425), StackUnavailableError, 3, "UNAVAILABLE_STACK"),
    "503 no node": Fault(Reply(status=503), ServiceUnavailableError, 3, "SERVICE_UNAVAILABLE"),
    "500 backend": Fault(Reply(status=500), InternalServerError, 2, "INTERNAL_ERROR"),
    "502 gateway html": Fault(
        Reply(status=502, body=HTML_502, headers={"Content-Type": "text/html"}),
        BadGatewayError,
        1,  # a gateway's 502 may follow work the service billed: not sent again
        "502 Bad Gateway",
    ),
    "504 gateway": Fault(Reply(status=504, body=""), GatewayTimeoutError, 1, "empty body"),
    "503 empty body": Fault(Reply(status=503, body=""), ServiceUnavailableError, 3, "empty body"),
    "dropped before any byte": Fault(
        Reply(fault="drop"), AmbiguousOutcomeError, 1, "may have been processed and billed"
    ),
    "dropped mid-body": Fault(
        Reply(fault="drop_mid_body"), AmbiguousOutcomeError, 1, "may have been processed"
    ),
    "headers then stall": Fault(
        Reply(fault="stall", delay=5),
        AmbiguousTimeoutError,
        1,
        "timed out",
        Timeout(read=0.3),
    ),
    "200 malformed json": Fault(
        Reply(status=200, body=b'{"created": 1, "data": ['), ResponseValidationError, 1, "not JSON"
    ),
    "200 html page": Fault(
        Reply(status=200, body="<html><body>Welcome to nginx!</body></html>"),
        ResponseValidationError,
        1,
        "not JSON",
    ),
    "200 without data": Fault(
        Reply(status=200, body={"created": 1}), ResponseValidationError, 1, "data: required"
    ),
    "200 item with neither form": Fault(
        Reply(status=200, body={"created": 1, "data": [{"revised_prompt": "x"}]}),
        ResponseValidationError,
        1,
        "no image: neither base64 data nor a URL",
    ),
}


@pytest.mark.parametrize("fault", FAULTS.values(), ids=FAULTS.keys())
async def test_fault(server: FakeAtomaServer, fake_sleep: FakeSleep, fault: Fault) -> None:
    server.enqueue(fault.reply, times=5)
    async with AsyncImagesClient(
        API_KEY,
        base_url=server.base_url,
        retries=RetryPolicy(sleep=fake_sleep),
        timeout=fault.timeout,
    ) as images:
        with pytest.raises(fault.error) as info:
            await images.generate("a fox", size="16x16")
        message = str(info.value)
        assert fault.phrase in message
        assert 20 < len(message) < 600
        assert "Traceback" not in message
        assert len(server.posts) == fault.posts
        assert info.value.attempts == fault.posts
        if isinstance(info.value, AmbiguousOutcomeError):
            assert info.value.may_have_been_billed
        # The client is still usable afterwards.
        server.reset()
        assert (await images.generate("a fox", size="16x16")).images


async def test_invalid_base64_is_found_on_decode(
    client: AsyncImagesClient, server: FakeAtomaServer
) -> None:
    server.enqueue(Reply(status=200, body={"created": 1, "data": [{"b64_json": "%%%not base64"}]}))
    result = await client.generate("a fox", size="16x16")
    with pytest.raises(ResponseValidationError, match="not valid base64"):
        result.images[0].decode()
    assert len(server.posts) == 1


async def test_connection_refused_is_retried_then_reported(fake_sleep: FakeSleep) -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with AsyncImagesClient(
        API_KEY, base_url=f"http://127.0.0.1:{port}/v1", retries=RetryPolicy(sleep=fake_sleep)
    ) as images:
        with pytest.raises(APIConnectionError, match="could not connect") as info:
            await images.generate("a fox", size="16x16")
    assert not isinstance(info.value, AmbiguousOutcomeError)
    assert info.value.attempts == 3


async def test_slow_drip_ends_at_the_deadline(server: FakeAtomaServer) -> None:
    # One byte every 0.1 s never trips the read timeout; the call's deadline ends it.
    server.enqueue(Reply(fault="drip", drip_interval=0.1))
    started = time.monotonic()
    async with AsyncImagesClient(
        API_KEY, base_url=server.base_url, retries=RetryPolicy(deadline=1.0)
    ) as images:
        with pytest.raises(AmbiguousTimeoutError):
            await images.generate("a fox", size="16x16", timeout=Timeout(read=0.5))
    elapsed = time.monotonic() - started
    assert 0.9 < elapsed < 3
    assert len(server.posts) == 1


@pytest.mark.parametrize("sized", [False, True])
async def test_response_size_cap_holds_with_bounded_memory(endless: str, sized: bool) -> None:
    base_url = f"{endless}/sized/v1" if sized else f"{endless}/v1"
    async with AsyncImagesClient(API_KEY, base_url=base_url, max_response_bytes=2**20) as images:
        tracemalloc.start()
        try:
            with pytest.raises(ResponseValidationError, match="max_response_bytes") as info:
                await images.generate("a fox", size="16x16")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak < 12 * 2**20
    assert info.value.attempts == 1
