"""Instrumentation hooks: what they see, in order, against what the server received."""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

import attrs
import pytest

from atoma_images import (
    AmbiguousOutcomeError,
    AsyncImagesClient,
    Dialect,
    ImagesClient,
    InvalidRequestError,
    NotFoundError,
    ResponseValidationError,
    RetryPolicy,
    ServiceUnavailableError,
)
from atoma_images._hooks import (
    DEFAULT_HOOKS,
    AttemptFinished,
    AttemptStarted,
    CallFinished,
    Hooks,
    LoggingHooks,
    RetryScheduled,
)
from atoma_images.testing import FakeAtomaServer, Reply, set_testing

from helpers import API_KEY, FakeSleep


class Recorder(Hooks):
    """Keeps every event, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def attempt_started(self, info: AttemptStarted) -> None:
        self.events.append(("started", info))

    def attempt_finished(self, info: AttemptFinished) -> None:
        self.events.append(("finished", info))

    def retry_scheduled(self, info: RetryScheduled) -> None:
        self.events.append(("retry", info))

    def call_finished(self, info: CallFinished) -> None:
        self.events.append(("call", info))

    @property
    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.events]

    def of(self, kind: str) -> list[Any]:
        return [info for k, info in self.events if k == kind]


class Raising(Hooks):
    def attempt_started(self, info: AttemptStarted) -> None:
        raise RuntimeError("hook bug")

    def attempt_finished(self, info: AttemptFinished) -> None:
        raise RuntimeError("hook bug")

    def retry_scheduled(self, info: RetryScheduled) -> None:
        raise RuntimeError("hook bug")

    def call_finished(self, info: CallFinished) -> None:
        raise RuntimeError("hook bug")


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _client(
    base_url: str, sleep: Any, *hooks: Hooks, dialect: Dialect = "atoma", **policy: Any
) -> AsyncImagesClient:
    return AsyncImagesClient(
        API_KEY,
        base_url=base_url,
        retries=RetryPolicy(sleep=sleep, **policy),
        hooks=hooks,
        dialect=dialect,
    )


async def test_429_then_200(server: FakeAtomaServer, fake_sleep: FakeSleep) -> None:
    server.enqueue(Reply(status=429, headers={"Retry-After": "2", "x-request-id": "req-429"}))
    recorder = Recorder()
    async with _client(server.base_url, fake_sleep, recorder) as client:
        result = await client.generate("fox", size="16x16")
        model = client.model
    assert len(server.posts) == 2
    assert recorder.kinds == ["started", "finished", "retry", "started", "finished", "call"]
    assert [info.attempt for info in recorder.of("started")] == [1, 2]
    first, second = recorder.of("finished")
    assert (first.status, first.error, first.may_have_been_billed) == (429, "RateLimitError", False)
    assert first.request_id == "req-429"
    assert (second.status, second.error, second.may_have_been_billed) == (200, None, True)
    assert second.request_id == result.request_id
    (retry,) = recorder.of("retry")
    assert (retry.attempt, retry.reason, retry.status) == (1, "status 429", 429)
    assert retry.wait == fake_sleep.waits[0]
    (call,) = recorder.of("call")
    assert (call.attempts, call.status, call.error, call.may_have_been_billed) == (
        2,
        200,
        None,
        True,
    )
    assert call.duration >= first.duration + second.duration
    info = call.call
    assert (info.operation, info.method, info.model, info.n, info.size) == (
        "generate",
        "POST",
        model,
        1,
        "16x16",
    )
    assert info.url == f"{server.base_url}/images/generations"
    # One object per call: every event of the call carries the same one.
    assert all(event.call is info for _, event in recorder.events)


async def test_ambiguous_drop_is_not_retried(
    server: FakeAtomaServer, fake_sleep: FakeSleep
) -> None:
    server.enqueue(Reply(fault="drop"))
    recorder = Recorder()
    async with _client(server.base_url, fake_sleep, recorder) as client:
        with pytest.raises(AmbiguousOutcomeError):
            await client.generate("fox", size="16x16")
    assert len(server.posts) == 1
    assert recorder.kinds == ["started", "finished", "call"]
    (finished,) = recorder.of("finished")
    assert (finished.error, finished.status, finished.may_have_been_billed) == (
        "AmbiguousOutcomeError",
        None,
        True,
    )
    (call,) = recorder.of("call")
    assert (call.attempts, call.error, call.may_have_been_billed) == (
        1,
        "AmbiguousOutcomeError",
        True,
    )


async def test_ambiguous_drop_retried_when_allowed(
    server: FakeAtomaServer, fake_sleep: FakeSleep
) -> None:
    server.enqueue(Reply(fault="drop"))
    recorder = Recorder()
    async with _client(server.base_url, fake_sleep, recorder, retry_ambiguous=True) as client:
        await client.generate("fox", size="16x16")
    assert len(server.posts) == 2
    assert recorder.kinds == ["started", "finished", "retry", "started", "finished", "call"]
    assert recorder.of("retry")[0].reason == "AmbiguousOutcomeError"


async def test_refused_then_up(fake_sleep: FakeSleep) -> None:
    port = _closed_port()
    fake = FakeAtomaServer(port=port)

    async def start_server_during_the_wait(seconds: float) -> None:
        fake_sleep.waits.append(seconds)
        await fake.start()

    recorder = Recorder()
    async with _client(
        f"http://127.0.0.1:{port}/v1", start_server_during_the_wait, recorder
    ) as client:
        await client.generate("fox", size="16x16")
    await fake.stop()
    assert len(fake.posts) == 1
    assert recorder.kinds == ["started", "finished", "retry", "started", "finished", "call"]
    refused, served = recorder.of("finished")
    assert (refused.error, refused.status, refused.may_have_been_billed) == (
        "APIConnectionError",
        None,
        False,
    )
    assert (served.error, served.may_have_been_billed) == (None, True)
    assert recorder.of("call")[0].attempts == 2


async def test_only_error_statuses_bill_nothing(
    server: FakeAtomaServer, fake_sleep: FakeSleep
) -> None:
    server.enqueue(Reply(status=503), times=3)
    recorder = Recorder()
    async with _client(server.base_url, fake_sleep, recorder) as client:
        with pytest.raises(ServiceUnavailableError):
            await client.generate("fox", size="16x16")
    assert len(recorder.of("started")) == len(server.posts) == 3
    (call,) = recorder.of("call")
    assert (call.attempts, call.status, call.may_have_been_billed) == (3, 503, False)


async def test_a_raising_hook_changes_nothing(
    server: FakeAtomaServer, fake_sleep: FakeSleep, caplog: pytest.LogCaptureFixture
) -> None:
    server.enqueue(Reply(status=429, headers={"Retry-After": "1"}))
    recorder = Recorder()
    async with _client(server.base_url, fake_sleep, Raising(), recorder) as client:
        result = await client.generate("fox", size="16x16")
    assert result.images
    assert len(server.posts) == 2
    # The hooks after the raising one still ran, every time.
    assert recorder.kinds == ["started", "finished", "retry", "started", "finished", "call"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 6
    assert all(r.name == "atoma_images" and "hook" in r.getMessage() for r in warnings)


async def test_hooks_never_see_the_key_headers_or_body(
    server: FakeAtomaServer, fake_sleep: FakeSleep
) -> None:
    server.enqueue(Reply(status=429, headers={"Retry-After": "1"}), Reply(status=500))
    recorder = Recorder()
    async with _client(server.base_url, fake_sleep, recorder) as client:
        await client.generate("a secret prompt", size="16x16")
    assert len(recorder.events) == 9
    for _, info in recorder.events:
        everything = repr(attrs.asdict(info))
        assert API_KEY not in everything
        assert "Bearer" not in everything
        assert "secret prompt" not in everything
        assert "b64_json" not in everything


async def test_download_bills_nothing_and_hides_the_query(
    url_server: FakeAtomaServer, fake_sleep: FakeSleep
) -> None:
    server = url_server
    recorder = Recorder()
    async with _client(server.base_url, fake_sleep, recorder, dialect="openai") as client:
        result = await client.generate("fox", size="16x16", response_format="url")
        url = f"{result.images[0].url}?X-Signature=s3cr3t#frag"
        await client.download(url)
    started = recorder.of("started")[1].call
    assert (started.operation, started.method, started.billable) == ("download", "GET", False)
    assert started.url == result.images[0].url
    assert (started.model, started.n, started.size) == (None, None, None)
    assert recorder.of("call")[1].may_have_been_billed is False


@pytest.mark.parametrize("received", [True, False], ids=["received", "before sending"])
async def test_cancelled_call_is_reported(
    server: FakeAtomaServer, fake_sleep: FakeSleep, received: bool
) -> None:
    server.enqueue(Reply(delay=30.0))
    recorder = Recorder()
    started = asyncio.Event()

    class Signal(Hooks):
        def attempt_started(self, info: AttemptStarted) -> None:
            started.set()

    async with _client(server.base_url, fake_sleep, recorder, Signal()) as client:
        task = asyncio.create_task(client.generate("fox", size="16x16"))
        await started.wait()  # cancelled now, it has not even connected yet
        while received and not server.posts:  # noqa: ASYNC110 - polls the server's record
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    # A connection given up half-way reaches the server a moment later: let it see it close.
    await asyncio.sleep(0.05)
    assert recorder.kinds == ["started", "finished", "call"]
    (finished,), (call,) = recorder.of("finished"), recorder.of("call")
    # The server received it, and may bill it; or the client's session saw it never left.
    assert (call.error, call.may_have_been_billed) == ("CancelledError", received)
    assert finished.may_have_been_billed is received
    assert client.usage.maybe_billed_calls == (1 if received else 0)
    assert len(server.posts) == (1 if received else 0)


def test_sync_client_passes_hooks(threaded_server: FakeAtomaServer) -> None:
    threaded_server.enqueue(Reply(status=503))
    recorder = Recorder()
    with (
        ImagesClient(API_KEY, base_url=threaded_server.base_url, hooks=[recorder]) as client,
        set_testing(True),
    ):
        client.generate("fox", size="16x16")
    assert recorder.kinds == ["started", "finished", "retry", "started", "finished", "call"]


@pytest.mark.parametrize("value", [Recorder(), "hooks", [object()], 3])
def test_hooks_must_be_a_list_of_hooks(value: object) -> None:
    with pytest.raises(InvalidRequestError) as info:
        AsyncImagesClient(API_KEY, hooks=value)  # type: ignore[arg-type]
    assert info.value.field == "hooks"
    assert "Hooks" in info.value.allowed


def test_no_hooks_means_only_the_retry_log() -> None:
    # The default set listens to retries only, so an attempt builds no info object.
    assert DEFAULT_HOOKS.attempt_started == ()
    assert DEFAULT_HOOKS.attempt_finished == ()
    assert DEFAULT_HOOKS.call_finished == ()
    assert len(DEFAULT_HOOKS.retry_scheduled) == 1
    assert isinstance(DEFAULT_HOOKS.hooks[0], LoggingHooks)


# -- the testing switch ----------------------------------------------------------------------


async def test_set_testing_skips_waits_but_not_attempts(
    server: FakeAtomaServer, fake_sleep: FakeSleep
) -> None:
    server.enqueue(Reply(status=429, headers={"Retry-After": "30"}), Reply(status=503))
    recorder = Recorder()
    async with _client(server.base_url, fake_sleep, recorder) as client:
        with set_testing(True):
            await client.generate("fox", size="16x16")
    assert len(server.posts) == 3
    assert fake_sleep.waits == []  # not even the policy's own sleep was called
    # The decided waits are still reported: only the sleeping is left out.
    assert recorder.of("retry")[0].wait >= 30


async def test_testing_is_off_by_default_and_restored(
    server: FakeAtomaServer, fake_sleep: FakeSleep
) -> None:
    from atoma_images.testing import is_testing

    assert not is_testing()
    with set_testing(True):
        assert is_testing()
        with set_testing(False):
            assert not is_testing()
        assert is_testing()
    assert not is_testing()
    server.enqueue(Reply(status=503))
    async with _client(server.base_url, fake_sleep) as client:
        await client.generate("fox", size="16x16")
    assert len(fake_sleep.waits) == 1
    setting = set_testing(True)  # the statement form
    try:
        assert is_testing()
    finally:
        set_testing(setting.previous)
    assert not is_testing()


def test_set_testing_takes_a_bool() -> None:
    with pytest.raises(InvalidRequestError):
        set_testing("yes")  # type: ignore[arg-type]


class AsyncFinished(Hooks):
    async def attempt_finished(self, info: AttemptFinished) -> None:  # type: ignore[override]
        pass


class AsyncGeneratorCall(Hooks):
    async def call_finished(self, info: CallFinished) -> Any:  # type: ignore[override]
        yield info


class AsyncAttribute(Hooks):
    def __init__(self) -> None:
        async def started(info: AttemptStarted) -> None:
            pass

        self.attempt_started = started  # type: ignore[method-assign]


@pytest.mark.parametrize("hook", [AsyncFinished(), AsyncGeneratorCall(), AsyncAttribute()])
@pytest.mark.parametrize("client_class", [AsyncImagesClient, ImagesClient])
def test_an_async_hook_method_is_refused_when_the_client_is_made(
    hook: Hooks, client_class: type[AsyncImagesClient | ImagesClient]
) -> None:
    # Hooks are called, never awaited: an async one would make a coroutine that never runs.
    with pytest.raises(InvalidRequestError, match="async def") as info:
        client_class(API_KEY, hooks=[Recorder(), hook])
    assert info.value.field == "hooks"
    assert "never awaited" in info.value.allowed


async def test_every_answer_reports_its_status(
    url_server: FakeAtomaServer, fake_sleep: FakeSleep
) -> None:
    server = url_server
    # A success (a generation, a download at the end of a redirect), a success whose body is
    # not usable and an error: each attempt that got an answer says its status.
    recorder = Recorder()
    server.enqueue(Reply(status=201), Reply(status=200, body=b"{}"))
    async with _client(server.base_url, fake_sleep, recorder, dialect="openai") as client:
        created = await client.generate("fox", size="16x16", response_format="url")
        with pytest.raises(ResponseValidationError):
            await client.generate("fox", size="16x16")
        await client.download(created.images[0].url or "")
        with pytest.raises(NotFoundError):
            await client.download(f"{server.base_url}/nothing-here")
    finished = [(info.status, info.error) for info in recorder.of("finished")]
    assert finished == [
        (201, None),
        (200, "ResponseValidationError"),
        (200, None),
        (404, "NotFoundError"),
    ]
    assert [info.status for info in recorder.of("call")] == [201, 200, 200, 404]


def test_the_sync_client_reports_a_successs_status(threaded_server: FakeAtomaServer) -> None:
    recorder = Recorder()
    with ImagesClient(API_KEY, base_url=threaded_server.base_url, hooks=[recorder]) as client:
        client.generate("fox", size="16x16")
    assert [info.status for kind, info in recorder.events if kind != "started"] == [200, 200]


async def test_a_connection_failure_after_a_success_reports_no_status(
    server: FakeAtomaServer, fake_sleep: FakeSleep
) -> None:
    # The status of one answer is never taken for a later attempt that got none.
    recorder = Recorder()
    async with _client(server.base_url, fake_sleep, recorder) as client:
        await client.generate("fox", size="16x16")
        server.enqueue(Reply(fault="drop"))
        with pytest.raises(AmbiguousOutcomeError):
            await client.generate("fox", size="16x16")
    assert [info.status for info in recorder.of("finished")] == [200, None]
    assert [info.status for info in recorder.of("call")] == [200, None]


async def test_hooks_see_every_request_of_a_call_for_several_images(
    server: FakeAtomaServer, fake_sleep: FakeSleep
) -> None:
    recorder = Recorder()
    async with _client(server.base_url, fake_sleep, recorder) as client:
        await client.generate("fox", n=3, size="16x16")
    calls = recorder.of("call")
    assert len(calls) == len(server.posts) == 3  # Atoma: one request per image
    assert [(c.call.n, c.status, c.may_have_been_billed) for c in calls] == [(1, 200, True)] * 3


def test_a_hook_whose_method_is_an_object_with_an_async_call_is_refused() -> None:
    class Later:
        async def __call__(self, info: object) -> None:
            pass

    class Sneaky(Hooks):
        pass

    sneaky = Sneaky()
    sneaky.call_finished = Later()  # type: ignore[method-assign,assignment]
    with pytest.raises(InvalidRequestError, match="hooks"):
        AsyncImagesClient(API_KEY, hooks=[sneaky])
