"""OpenTelemetry: the spans of the SDK's in-memory exporter match what the server received."""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from atoma_images import (
    AmbiguousOutcomeError,
    AsyncImagesClient,
    ExtraNotInstalledError,
    RetryPolicy,
    ServiceUnavailableError,
)
from atoma_images.opentelemetry import OpenTelemetryHooks
from atoma_images.testing import FakeAtomaServer, Reply

from helpers import API_KEY, FakeSleep


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    yield memory
    memory.shutdown()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield tracer_provider
    tracer_provider.shutdown()


def _client(
    base_url: str, sleep: Any, provider: TracerProvider, **policy: Any
) -> AsyncImagesClient:
    return AsyncImagesClient(
        API_KEY,
        base_url=base_url,
        retries=RetryPolicy(sleep=sleep, **policy),
        hooks=[OpenTelemetryHooks(tracer_provider=provider)],
    )


def _split(exporter: InMemorySpanExporter) -> tuple[ReadableSpan, list[ReadableSpan]]:
    spans = exporter.get_finished_spans()
    (call,) = [span for span in spans if span.name != "atoma_images.attempt"]
    attempts = [span for span in spans if span.name == "atoma_images.attempt"]
    for attempt in attempts:
        assert attempt.parent is not None
        assert attempt.parent.span_id == call.context.span_id
    return call, sorted(attempts, key=lambda span: span.start_time or 0)


async def test_429_then_200(
    server: FakeAtomaServer,
    fake_sleep: FakeSleep,
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
) -> None:
    server.enqueue(Reply(status=429, headers={"Retry-After": "2"}))
    async with _client(server.base_url, fake_sleep, provider) as client:
        await client.generate("fox", size="16x16")
        model = client.model
    call, attempts = _split(exporter)
    assert len(attempts) == len(server.posts) == 2
    assert call.name == f"generate_content {model}"
    assert call.kind is SpanKind.CLIENT
    assert call.status.status_code is StatusCode.UNSET
    attributes = dict(call.attributes or {})
    assert attributes["gen_ai.operation.name"] == "generate_content"
    assert attributes["gen_ai.provider.name"] == "atoma"
    assert attributes["gen_ai.request.model"] == model
    assert attributes["gen_ai.request.choice.count"] == 1
    assert attributes["gen_ai.output.type"] == "image"
    assert attributes["atoma_images.size"] == "16x16"
    assert attributes["atoma_images.attempts"] == 2
    assert attributes["atoma_images.may_have_been_billed"] is True
    assert attributes["server.address"] == "127.0.0.1"
    assert "error.type" not in attributes
    failed, served = attempts
    assert failed.status.status_code is StatusCode.ERROR
    assert dict(failed.attributes or {})["http.response.status_code"] == 429
    assert dict(failed.attributes or {})["atoma_images.may_have_been_billed"] is False
    assert served.status.status_code is StatusCode.UNSET
    (event,) = call.events
    assert event.name == "atoma_images.retry"
    assert dict(event.attributes or {})["atoma_images.reason"] == "status 429"
    assert dict(event.attributes or {})["atoma_images.wait"] == fake_sleep.waits[0]


async def test_ambiguous_drop(
    server: FakeAtomaServer,
    fake_sleep: FakeSleep,
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
) -> None:
    server.enqueue(Reply(fault="drop"))
    async with _client(server.base_url, fake_sleep, provider) as client:
        with pytest.raises(AmbiguousOutcomeError):
            await client.generate("fox", size="16x16")
    call, attempts = _split(exporter)
    assert len(attempts) == len(server.posts) == 1
    assert call.status.status_code is StatusCode.ERROR
    attributes = dict(call.attributes or {})
    assert attributes["error.type"] == "AmbiguousOutcomeError"
    assert attributes["atoma_images.may_have_been_billed"] is True


async def test_refused_then_up(
    fake_sleep: FakeSleep, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    fake = FakeAtomaServer(port=port)

    async def start_server_during_the_wait(seconds: float) -> None:
        await fake.start()

    async with _client(
        f"http://127.0.0.1:{port}/v1", start_server_during_the_wait, provider
    ) as client:
        await client.generate("fox", size="16x16")
    await fake.stop()
    call, (refused, served) = _split(exporter)
    assert len(fake.posts) == 1
    assert dict(refused.attributes or {})["error.type"] == "APIConnectionError"
    assert dict(refused.attributes or {})["atoma_images.may_have_been_billed"] is False
    assert served.status.status_code is StatusCode.UNSET
    assert call.status.status_code is StatusCode.UNSET


async def test_error_statuses_bill_nothing(
    server: FakeAtomaServer,
    fake_sleep: FakeSleep,
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
) -> None:
    server.enqueue(Reply(status=503), times=3)
    async with _client(server.base_url, fake_sleep, provider) as client:
        with pytest.raises(ServiceUnavailableError):
            await client.generate("fox", size="16x16")
    call, attempts = _split(exporter)
    assert len(attempts) == len(server.posts) == 3
    attributes = dict(call.attributes or {})
    assert attributes["error.type"] == "ServiceUnavailableError"
    assert attributes["http.response.status_code"] == 503
    assert attributes["atoma_images.may_have_been_billed"] is False
    assert len(call.events) == 2


async def test_no_key_prompt_or_body_in_any_span(
    server: FakeAtomaServer,
    fake_sleep: FakeSleep,
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
) -> None:
    server.enqueue(Reply(status=500))
    async with _client(server.base_url, fake_sleep, provider) as client:
        await client.generate("a secret prompt", size="16x16")
    for span in exporter.get_finished_spans():
        text = span.to_json()
        assert API_KEY not in text
        assert "secret prompt" not in text
        assert "Bearer" not in text


def test_missing_extra_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry", None)  # as if not installed
    with pytest.raises(ExtraNotInstalledError) as info:
        OpenTelemetryHooks()
    assert info.value.extra == "opentelemetry"
    assert "atoma-images[opentelemetry]" in str(info.value)


async def test_a_successful_attempt_carries_its_status_code(
    server: FakeAtomaServer,
    fake_sleep: FakeSleep,
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
) -> None:
    # OpenTelemetry's HTTP conventions: http.response.status_code on every answer, a
    # success's too.
    server.enqueue(Reply(status=503))
    async with _client(server.base_url, fake_sleep, provider) as client:
        await client.generate("fox", size="16x16")
    call, (failed, served) = _split(exporter)
    assert dict(failed.attributes or {})["http.response.status_code"] == 503
    assert dict(served.attributes or {})["http.response.status_code"] == 200
    assert dict(call.attributes or {})["http.response.status_code"] == 200
    assert served.status.status_code is StatusCode.UNSET
