"""Retry decisions and the attempt loop, without a socket: errors are made from (status,
headers, body) as the transport would hand them over, and an attempt is a plain coroutine."""

from __future__ import annotations

import asyncio
import json

import pytest
from multidict import CIMultiDict

from atoma_images import (
    AmbiguousOutcomeError,
    APIConnectionError,
    AtomaImagesError,
    ImagesResponse,
    ResponseValidationError,
    RetryPolicy,
    ServiceUnavailableError,
)
from atoma_images._convert import error_from_response

from helpers import FakeSleep


def status_error(status: int, body: object = None, **headers: str) -> AtomaImagesError:
    """The error the client makes of an answer; ``body`` None is the API's own envelope."""
    raw = (
        json.dumps({"error": {"code": "X", "message": "no"}}).encode()
        if body is None
        else str(body).encode()
    )
    return error_from_response(status, CIMultiDict(headers), raw)


@pytest.mark.parametrize(
    ("error", "retried"),
    [
        (status_error(429), True),  # not now
        (status_error(503), True),
        (status_error(503, "<html>busy</html>"), True),  # a gateway's "not now" too
        (status_error(423), True),
        (status_error(400), False),  # refused: asking again gets the same answer
        (status_error(401), False),
        (status_error(500), True),  # the API's own 500: settled at zero, one retry allowed
        (status_error(500, "<html>oops</html>"), False),  # a gateway's page: may be billed
        (status_error(504, "<html>timeout</html>"), False),
        (status_error(503, None, **{"X-Should-Retry": "false"}), False),
        (status_error(400, None, **{"x-should-retry": "TRUE"}), True),
        (status_error(429, None, **{"Retry-After": "3600"}), False),  # past max_retry_after
        (APIConnectionError("refused"), True),  # never sent
        (APIConnectionError("bad certificate", transient=False), False),
        (AmbiguousOutcomeError("dropped after sending"), False),  # may bill twice
        (ResponseValidationError("not an images answer"), False),  # billed: asking bills again
        (asyncio.CancelledError(), False),
        (KeyError("a bug of ours"), False),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else str(value),
)
def test_what_is_retried(error: BaseException, retried: bool) -> None:
    assert RetryPolicy().retryable(error) is retried


def test_an_ambiguous_outcome_is_retried_only_when_asked() -> None:
    dropped = AmbiguousOutcomeError("dropped after sending")
    assert RetryPolicy(retry_ambiguous=True).retryable(dropped)
    gateway_page = status_error(502, "<html>bad gateway</html>")
    assert gateway_page.may_have_been_billed
    assert RetryPolicy(retry_ambiguous=True).retryable(gateway_page)


async def test_the_loop_retries_until_an_answer_and_waits_as_told() -> None:
    sleep = FakeSleep()
    failures = [status_error(503, None, **{"Retry-After": "2"}), status_error(429)]
    answer = ImagesResponse(created=1, data=())

    async def attempt(remaining: float) -> ImagesResponse:
        assert remaining > 0
        if failures:
            raise failures.pop(0)
        return answer

    assert await RetryPolicy(sleep=sleep).run(attempt) is answer
    assert len(sleep.waits) == 2
    assert 2 <= sleep.waits[0] <= 3  # the server's Retry-After, with a little jitter


async def test_the_loop_stops_after_its_retries_and_the_error_says_how_many() -> None:
    sleep = FakeSleep()

    async def attempt(remaining: float) -> ImagesResponse:
        raise status_error(503)

    with pytest.raises(ServiceUnavailableError) as caught:
        await RetryPolicy(sleep=sleep, max_retries=2).run(attempt)
    assert caught.value.attempts == 3
    assert len(sleep.waits) == 2


async def test_server_errors_have_a_budget_of_their_own() -> None:
    attempts = 0

    async def attempt(remaining: float) -> ImagesResponse:
        nonlocal attempts
        attempts += 1
        raise status_error(500)

    with pytest.raises(AtomaImagesError):
        await RetryPolicy(sleep=FakeSleep(), max_retries=5, max_server_error_retries=1).run(attempt)
    assert attempts == 2


async def test_an_error_that_is_not_retried_ends_the_loop_at_once() -> None:
    sleep = FakeSleep()

    async def attempt(remaining: float) -> ImagesResponse:
        raise AmbiguousOutcomeError("dropped after sending")

    with pytest.raises(AmbiguousOutcomeError) as caught:
        await RetryPolicy(sleep=sleep).run(attempt)
    assert caught.value.attempts == 1
    assert sleep.waits == []
