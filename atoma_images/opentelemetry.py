"""OpenTelemetry tracing for atoma-images, with the ``opentelemetry`` extra (from a clone:
``pip install '.[opentelemetry]'``; once released, ``pip install 'atoma-images[opentelemetry]'``).

```python
from atoma_images import AsyncImagesClient
from atoma_images.opentelemetry import OpenTelemetryHooks

client = AsyncImagesClient(hooks=[OpenTelemetryHooks()])
```

Each call is one CLIENT span, covering every attempt and wait (as the GenAI semantic
conventions ask of a retried operation), named ``"{gen_ai.operation.name} {model}"``; each
attempt is a child span ``atoma_images.attempt``, and each retry an event on the call's span.
Only ``opentelemetry-api`` is needed; spans go wherever your tracer provider sends them.

Attributes, from the GenAI semantic conventions where one fits:

- ``gen_ai.operation.name``: ``"generate_content"`` (the conventions' name for multimodal
  generation; they define none for images), ``"download"`` for a download, ``"models"``
  and ``"health"`` for `AsyncImagesClient.models` and ``health``;
- ``gen_ai.provider.name``: ``"atoma"``; ``gen_ai.output.type``: ``"image"``;
- ``gen_ai.request.model``, ``gen_ai.request.choice.count`` (``n``);
- ``server.address``, ``server.port``, ``http.request.method``, ``url.full`` (without query);
- ``http.response.status_code``: the status of the attempt's answer, a success's too (on the
  call's span, that of the answer it ended with), as the HTTP semantic conventions ask;
- ``error.type``: the error's class name, when the call failed (the span status is then ERROR);
- ours, where the conventions have nothing: ``atoma_images.size``,
  ``atoma_images.attempts``, ``atoma_images.may_have_been_billed``,
  ``atoma_images.request_id`` and ``atoma_images.confidential``.

No prompt, body, header or key is ever recorded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from yarl import URL

from ._errors import ExtraNotInstalledError
from ._hooks import (
    AttemptFinished,
    AttemptStarted,
    CallFinished,
    CallInfo,
    Hooks,
    RetryScheduled,
)

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer, TracerProvider

__all__ = ["OpenTelemetryHooks"]

_OPERATIONS = {
    "generate": "generate_content",
    "generate_confidential": "generate_content",
    "download": "download",
}


class OpenTelemetryHooks(Hooks):
    """Hooks that trace every call as an OpenTelemetry span, with a child span per attempt.

    Args:
        tracer_provider: the provider to get the tracer from; the global one by default.

    Raises:
        ExtraNotInstalledError: ``opentelemetry-api`` is not installed.
    """

    def __init__(self, tracer_provider: TracerProvider | None = None) -> None:
        try:
            from opentelemetry import trace  # noqa: PLC0415
        except ImportError as exc:
            raise ExtraNotInstalledError(
                "OpenTelemetryHooks", "opentelemetry", "opentelemetry-api"
            ) from exc
        from ._version import package_version  # noqa: PLC0415

        self._trace = trace
        self._tracer: Tracer = trace.get_tracer(
            "atoma_images", package_version(), tracer_provider=tracer_provider
        )
        # The open spans of the calls and attempts under way, by call (one CallInfo per call).
        self._calls: dict[CallInfo, Span] = {}
        self._attempts: dict[CallInfo, Span] = {}

    def attempt_started(self, info: AttemptStarted) -> None:
        call = info.call
        span = self._calls.get(call)
        if span is None:
            span = self._calls[call] = self._tracer.start_span(
                _span_name(call),
                kind=self._trace.SpanKind.CLIENT,
                attributes=_call_attributes(call),
            )
        context = self._trace.set_span_in_context(span)
        self._attempts[call] = self._tracer.start_span(
            "atoma_images.attempt",
            context=context,
            kind=self._trace.SpanKind.INTERNAL,
            attributes={"atoma_images.attempt": info.attempt},
        )

    def attempt_finished(self, info: AttemptFinished) -> None:
        span = self._attempts.pop(info.call, None)
        if span is None:
            return
        span.set_attributes(
            _outcome(info.status, info.error, info.may_have_been_billed, info.request_id)
        )
        if info.error is not None:
            span.set_status(self._trace.StatusCode.ERROR, info.error)
        span.end()

    def retry_scheduled(self, info: RetryScheduled) -> None:
        span = self._calls.get(info.call)
        if span is None:
            return
        attributes: dict[str, Any] = {
            "atoma_images.attempt": info.attempt,
            "atoma_images.wait": info.wait,
            "atoma_images.reason": info.reason,
        }
        span.add_event("atoma_images.retry", attributes)

    def call_finished(self, info: CallFinished) -> None:
        self._attempts.pop(info.call, None)
        span = self._calls.pop(info.call, None)
        if span is None:
            return
        span.set_attributes(
            {
                "atoma_images.attempts": info.attempts,
                **_outcome(info.status, info.error, info.may_have_been_billed, info.request_id),
            }
        )
        if info.error is not None:
            span.set_status(self._trace.StatusCode.ERROR, info.error)
        span.end()


def _span_name(call: CallInfo) -> str:
    operation = _OPERATIONS.get(call.operation, call.operation)
    return operation if call.model is None else f"{operation} {call.model}"


def _call_attributes(call: CallInfo) -> dict[str, Any]:
    url = URL(call.url)
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": _OPERATIONS.get(call.operation, call.operation),
        "gen_ai.provider.name": "atoma",
        "http.request.method": call.method,
        "url.full": call.url,
        "server.address": url.host or "",
        "atoma_images.confidential": call.operation == "generate_confidential",
    }
    if url.port is not None:
        attributes["server.port"] = url.port
    if call.model is not None:
        attributes["gen_ai.request.model"] = call.model
        attributes["gen_ai.output.type"] = "image"
    if call.n is not None:
        attributes["gen_ai.request.choice.count"] = call.n
    if call.size is not None:
        attributes["atoma_images.size"] = call.size
    return attributes


def _outcome(
    status: int | None, error: str | None, billed: bool, request_id: str | None
) -> dict[str, Any]:
    attributes: dict[str, Any] = {"atoma_images.may_have_been_billed": billed}
    if status is not None:
        attributes["http.response.status_code"] = status
    if error is not None:
        attributes["error.type"] = error
    if request_id is not None:
        attributes["atoma_images.request_id"] = request_id
    return attributes
