"""What a service asks at start-up: which models the API serves, and whether it is up.

Two GETs, through the client's one transport and its retry loop, both safe to repeat and
neither billed (docs/contract.md, "Models and health"):

- ``GET <base_url>/models``, with the key: Atoma's proxy answers
  ``{"object": "list", "data": [{"id", "object", "created", "owned_by"}]}``;
- ``GET <root>/health``, without the key: ``{"message": "ok"}``. It sits at the root of the
  API, beside ``/v1`` and not under it (atoma-proxy ``src/server/http_server.rs``).

The list cannot tell image models from chat models: the proxy keeps only their names, so
nothing here filters it. Parsing is network-free (`parse_models`, `parse_health`), by the
package's one converter.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
from yarl import URL

from ._convert import error_from_response, parse_object
from ._hooks import CallInfo

if TYPE_CHECKING:
    from ._hooks import HookSet
    from ._retry import RetryPolicy
    from ._timeout import Timeout
    from ._transport import Transport

__all__ = ["Health", "ModelInfo", "fetch_health", "fetch_models", "health_url", "models_url"]

T = TypeVar("T")


@attrs.frozen(kw_only=True)
class ModelInfo:
    """One model the API serves, as ``GET /v1/models`` lists it.

    Atoma's list says nothing of what a model does: an image model and a chat model look
    alike (its proxy keeps only their names), so a model listed here may not draw images.

    Attributes:
        id: the model's name, as ``model=`` takes it.
        object: ``"model"``.
        created: a Unix timestamp (Atoma sends the same one for every model).
        owned_by: who serves it (``"atoma"`` on Atoma).
        extra: keys the server sent that this version does not know.
    """

    id: str
    object: str = "model"
    created: int | None = None
    owned_by: str | None = None
    extra: Mapping[str, Any] = attrs.field(factory=dict, repr=False)


@attrs.frozen(kw_only=True)
class Health:
    """What ``GET /health`` answered: the API is up.

    Attributes:
        message: what it said (``"ok"`` on Atoma); None for a body without one (some
            servers that follow OpenAI's API answer an empty body).
        extra: the other keys of its answer.
    """

    message: str | None = None
    extra: Mapping[str, Any] = attrs.field(factory=dict, repr=False)


@attrs.frozen
class _ModelList:
    data: tuple[ModelInfo, ...]


def models_url(base_url: URL) -> URL:
    """Where the API lists its models: ``<base_url>/models``."""
    return base_url / "models"


def health_url(base_url: URL) -> URL:
    """Where the API says whether it is up: ``/health`` beside ``base_url``'s ``/v1``.

    Atoma's proxy routes ``/health`` at its root, as vLLM and llama.cpp's server do; a
    ``base_url`` that does not end in ``/v1`` is taken to be that root.
    """
    root = base_url.parent if base_url.name == "v1" else base_url
    return root / "health"


def parse_models(
    status: int, headers: Mapping[str, str], body: bytes, url: object = None
) -> tuple[ModelInfo, ...]:
    """The models of a ``GET /v1/models`` answer, or the typed error it stands for.

    Raises:
        APIStatusError: (a subclass of it) for any status that is not 2xx.
        ResponseValidationError: a 2xx whose body is not a list of models.
    """
    return parse_object(status, headers, body, url, _ModelList).data


def parse_health(
    status: int, headers: Mapping[str, str], body: bytes, url: object = None
) -> Health:
    """What a ``GET /health`` answer says, or the typed error it stands for.

    Raises:
        APIStatusError: (a subclass of it) for any status that is not 2xx; a 404 means the
            server has no ``/health`` (OpenAI's API has none).
        ResponseValidationError: a 2xx whose body is neither empty nor a JSON object.
    """
    if not 200 <= status < 300:
        # Without the URL: its 404 would say "base_url must end in /v1", which is not why.
        error = error_from_response(status, headers, body)
        error.url = None if url is None else str(url)
        raise error
    if not body.strip():
        return Health()
    return parse_object(status, headers, body, url, Health)


async def _get(  # noqa: PLR0917 - what one GET of the API needs, in order
    operation: str,
    parse: Callable[[int, Mapping[str, str], bytes, object], T],
    transport: Transport,
    url: URL,
    headers: Mapping[str, str],
    limits: Timeout,
    policy: RetryPolicy,
    hooks: HookSet,
) -> T:
    """``GET url`` in the policy's attempt loop, parsed by ``parse``.

    A GET bills nothing, so an ambiguous failure is worth another try (as a download's is):
    the policy retries it. No cost is reserved, so no usage or budget ever counts it, and
    hooks see a call that is not billable.
    """

    transport.open()  # a closed client fails here, before the attempt loop

    async def attempt(remaining: float) -> T:
        timeout = limits.for_attempt(remaining)
        answer = await transport.get(url, timeout, headers=headers)
        return parse(answer.status, answer.headers, answer.body, url)

    policy = attrs.evolve(policy, retry_ambiguous=True)
    return await policy.run(attempt, hooks, lambda: CallInfo.of(operation, "GET", url))


async def fetch_models(
    transport: Transport,
    base_url: URL,
    *,
    limits: Timeout,
    policy: RetryPolicy,
    hooks: HookSet,
) -> tuple[ModelInfo, ...]:
    """``GET <base_url>/models`` with the client's headers (the key among them)."""
    url = models_url(base_url)
    return await _get(
        "models", parse_models, transport, url, transport.headers, limits, policy, hooks
    )


async def fetch_health(
    transport: Transport,
    base_url: URL,
    *,
    limits: Timeout,
    policy: RetryPolicy,
    hooks: HookSet,
) -> Health:
    """``GET /health`` with the client's headers but the key: the route needs none."""
    headers = {k: v for k, v in transport.headers.items() if k.lower() != "authorization"}
    url = health_url(base_url)
    return await _get("health", parse_health, transport, url, headers, limits, policy, hooks)
