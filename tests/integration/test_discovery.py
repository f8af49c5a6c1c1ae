"""What a service asks at start-up: `models()` and `health()`, against the fake server and
against servers that fail. Neither is a generation: nothing is ever counted as billed."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import attrs
import pytest
from aiohttp import web
from yarl import URL

from atoma_images import (
    AmbiguousOutcomeError,
    AmbiguousTimeoutError,
    APITimeoutError,
    AsyncImagesClient,
    AtomaImagesError,
    AttemptFinished,
    AttemptStarted,
    AuthenticationError,
    Budget,
    CallFinished,
    Health,
    Hooks,
    ImagesClient,
    InternalServerError,
    ModelInfo,
    NotFoundError,
    ResponseValidationError,
    RetryPolicy,
    Usage,
)
from atoma_images._discovery import health_url, parse_health, parse_models
from atoma_images._models import DEFAULT_MODEL
from atoma_images.testing import FakeAtomaServer

from helpers import API_KEY, FakeSleep, serving

JSON = {"Content-Type": "application/json"}

# -- parsing, without a socket ----------------------------------------------------------------


def test_a_models_list_keeps_unknown_keys_and_reads_types_strictly() -> None:
    body = (
        b'{"object": "list", "data": [{"id": "m", "object": "model", "created": 3, '
        b'"owned_by": "me", "max_model_len": 4096, "root": "m"}]}'
    )
    (model,) = parse_models(200, {}, body)
    assert model == ModelInfo(id="m", object="model", created=3, owned_by="me", extra=model.extra)
    assert model.extra == {"max_model_len": 4096, "root": "m"}
    assert parse_models(200, {}, b'{"data": [{"id": "bare"}]}') == (ModelInfo(id="bare"),)
    assert parse_models(200, {}, b'{"data": []}') == ()


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b'{"data": [{"id": 7}]}', "data[0].id: expected a string, got int 7"),
        (b'{"data": [{"id": "m", "created": true}]}', "data[0].created: expected an integer"),
        (b'{"data": [{"id": "m", "created": "3"}]}', "data[0].created: expected an integer"),
        (b'{"data": [{"id": "m"}, "m2"]}', "data[1]: expected an object, got str"),
        (b'{"data": [{"object": "model"}]}', "data[0].id: required field missing"),
        # A string is not a list of one-letter models, nor an object a list of its keys.
        (b'{"data": "' + b"m" * 10_000 + b'"}', "data: expected a list, got str"),
        (b'{"data": {"id": "m"}}', "data: expected a list, got dict"),
        (b'{"object": "list"}', "data: required field missing"),
        (b'["m"]', "expected a JSON object"),
        (b"<html>", "not JSON"),
    ],
)
def test_a_models_list_that_is_not_one_is_a_validation_error(body: bytes, problem: str) -> None:
    with pytest.raises(ResponseValidationError) as caught:
        parse_models(200, {}, body)
    assert problem in str(caught.value)
    assert str(caught.value).count("expected") <= 2  # one error per problem, not per letter


def test_health_reads_what_the_server_said() -> None:
    assert parse_health(200, {}, b'{"message": "ok"}') == Health(message="ok")
    # vLLM answers an empty 200; llama.cpp's server {"status": "ok"}: both are up.
    assert parse_health(200, {}, b"") == Health()
    assert parse_health(200, {}, b'{"status": "ok"}').extra == {"status": "ok"}
    with pytest.raises(ResponseValidationError, match="message: expected a string"):
        parse_health(200, {}, b'{"message": 1}')
    with pytest.raises(InternalServerError):
        parse_health(500, {}, b'{"error": {"code": "INTERNAL_ERROR", "message": "down"}}')


def test_a_missing_health_check_does_not_blame_base_url() -> None:
    # A 404 on /v1/... says base_url lacks its /v1; /health is beside /v1, so not here.
    with pytest.raises(NotFoundError) as caught:
        parse_health(404, {}, b"404: Not Found", "http://h/health")
    assert "/v1" not in str(caught.value)
    assert caught.value.url == "http://h/health"


@pytest.mark.parametrize(
    ("base_url", "expected"),
    [
        ("https://api.atoma.network/v1", "https://api.atoma.network/health"),
        ("http://127.0.0.1:8080/atoma/v1", "http://127.0.0.1:8080/atoma/health"),
        ("http://127.0.0.1:8080/api", "http://127.0.0.1:8080/api/health"),
    ],
)
def test_health_is_at_the_root_beside_v1(base_url: str, expected: str) -> None:
    assert str(health_url(URL(base_url))) == expected


# -- against the fake server, in both dialects ------------------------------------------------


async def test_models_and_health_on_atoma(server: FakeAtomaServer) -> None:
    budget = Budget(max_compute_units=1000)
    async with AsyncImagesClient(API_KEY, base_url=server.base_url, budget=budget) as client:
        models = await client.models()
        health = await client.health()
        assert client.usage == Usage()
    assert models == (
        ModelInfo(id=DEFAULT_MODEL, object="model", created=1_686_935_002, owned_by="atoma"),
    )
    assert health == Health(message="ok")
    assert budget.used == 0
    assert server.billed_compute_units == 0
    listing, check = server.requests
    assert (listing.method, listing.path) == ("GET", "/v1/models")
    assert listing.headers["Authorization"] == f"Bearer {API_KEY}"
    # /health is at the proxy's root, and needs no key: none is sent.
    assert (check.method, check.path) == ("GET", "/health")
    assert "Authorization" not in check.headers
    assert API_KEY not in repr(check.headers)


async def test_models_with_a_wrong_key_is_an_authentication_error_and_health_needs_none(
    server: FakeAtomaServer,
) -> None:
    async with AsyncImagesClient("sk-wrong", base_url=server.base_url) as client:
        with pytest.raises(AuthenticationError) as caught:
            await client.models()
        assert await client.health() == Health(message="ok")
        assert client.usage == Usage()
    assert caught.value.may_have_been_billed is False
    assert caught.value.attempts == 1  # a refused key is not asked again


async def test_models_lists_every_model_the_fake_serves_without_filtering() -> None:
    # The proxy lists chat models beside image ones, and says nothing of either.
    served = ("black-forest-labs/FLUX.1-schnell", "meta-llama/Llama-3.3-70B-Instruct")
    async with (
        FakeAtomaServer(api_key=API_KEY, models=served) as fake,
        AsyncImagesClient(API_KEY, base_url=fake.base_url) as client,
    ):
        assert tuple(model.id for model in await client.models()) == served


async def test_models_and_health_on_openais_dialect(url_server: FakeAtomaServer) -> None:
    async with AsyncImagesClient(API_KEY, base_url=url_server.base_url, dialect="openai") as client:
        models = await client.models()
        with pytest.raises(NotFoundError) as caught:
            await client.health()  # OpenAI's API has no health check
        assert client.usage == Usage()
    assert [model.id for model in models] == list(url_server.models)
    assert {(model.object, model.owned_by) for model in models} == {("model", "system")}
    assert caught.value.may_have_been_billed is False
    assert caught.value.url is not None
    assert caught.value.url.endswith("/health")


def test_the_sync_client_asks_the_same(threaded_server: FakeAtomaServer) -> None:
    with ImagesClient(API_KEY, base_url=threaded_server.base_url) as client:
        assert [model.id for model in client.models()] == [DEFAULT_MODEL]
        assert client.health().message == "ok"
        assert client.usage == Usage()


# -- against servers that fail ------------------------------------------------------------------


@contextlib.asynccontextmanager
async def failing(how: str) -> AsyncIterator[tuple[str, list[web.Request]]]:
    """A server whose /v1/models and /health fail as ``how`` says; yields its root and the
    requests it received."""
    received: list[web.Request] = []
    never = asyncio.Event()

    async def answer(request: web.Request) -> web.StreamResponse:
        received.append(request)
        if how == "drop":
            assert request.transport is not None
            request.transport.close()
        elif how == "timeout":
            await never.wait()  # until the test is over: the client's read limit fires
        else:
            code = {"401": "AUTH_ERROR", "500": "INTERNAL_ERROR"}[how]
            return web.json_response({"error": {"code": code, "message": "no"}}, status=int(how))
        return web.Response()

    app = web.Application()
    app.router.add_get("/v1/models", answer)
    app.router.add_get("/health", answer)
    async with serving(app) as root:
        try:
            yield root, received
        finally:
            never.set()  # so that the server's shutdown does not wait for the handler


FAILURES = [
    # (how the server fails, the error, the GETs the retry policy sends)
    ("401", AuthenticationError, 1),
    ("500", InternalServerError, 2),  # one retry after a 500, as for any call
    ("drop", AmbiguousOutcomeError, 3),  # a GET bills nothing: a lost answer is asked again
    ("timeout", AmbiguousTimeoutError, 3),
]


@pytest.mark.parametrize("call", ["models", "health"])
@pytest.mark.parametrize(("how", "error", "requests"), FAILURES, ids=[f[0] for f in FAILURES])
async def test_a_failing_server_gives_a_typed_error_and_nothing_is_counted(
    call: str, how: str, error: type[AtomaImagesError], requests: int, fake_sleep: FakeSleep
) -> None:
    budget = Budget(max_compute_units=1000)
    async with (
        failing(how) as (root, received),
        AsyncImagesClient(
            API_KEY,
            base_url=f"{root}/v1",
            budget=budget,
            timeout=0.2,
            retries=RetryPolicy(sleep=fake_sleep),
        ) as client,
    ):
        with pytest.raises(error) as caught:
            await getattr(client, call)()
        assert client.usage == Usage()
    assert budget.used == 0
    assert caught.value.attempts == requests
    if how == "drop":  # aiohttp itself sends a GET once more when its connection drops
        assert requests <= len(received) <= 2 * requests
    else:
        assert len(received) == requests
    assert API_KEY not in str(caught.value)
    if how in ("drop", "timeout"):
        assert "a GET (a download, the models list, a health check) bills nothing" in str(
            caught.value
        )  # not "fetching an image"


class Recorder(Hooks):
    def __init__(self) -> None:
        self.events: list[Any] = []

    def attempt_started(self, info: AttemptStarted) -> None:
        self.events.append(info)

    def attempt_finished(self, info: AttemptFinished) -> None:
        self.events.append(info)

    def call_finished(self, info: CallFinished) -> None:
        self.events.append(info)


@pytest.mark.parametrize("call", ["models", "health"])
async def test_hooks_see_a_call_that_bills_nothing_even_when_its_answer_is_lost(
    call: str, fake_sleep: FakeSleep
) -> None:
    recorder = Recorder()
    async with (
        failing("drop") as (root, _),
        AsyncImagesClient(
            API_KEY,
            base_url=f"{root}/v1",
            hooks=[recorder],
            retries=RetryPolicy(max_retries=0, sleep=fake_sleep),
        ) as client,
    ):
        with pytest.raises(AmbiguousOutcomeError):
            await getattr(client, call)()
    started, finished, ended = recorder.events
    info = started.call
    assert (info.operation, info.method, info.billable) == (call, "GET", False)
    assert (info.model, info.n, info.size) == (None, None, None)
    assert finished.may_have_been_billed is False
    assert ended.may_have_been_billed is False
    assert API_KEY not in repr([attrs.asdict(event) for event in recorder.events])


@pytest.mark.slow
async def test_a_server_that_never_answers_fails_a_check_within_seconds() -> None:
    # A readiness probe cannot wait a generation's five minutes of silence.
    done = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await done.wait()  # reads nothing, answers nothing, until the test is over
        writer.close()
        await writer.wait_closed()

    listener = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        async with AsyncImagesClient("k", base_url=f"http://127.0.0.1:{port}/v1") as client:
            with pytest.raises(APITimeoutError) as caught:
                # A guard against a hang, not a measure: the client's own limits end it first.
                await asyncio.wait_for(client.health(), 60)
    finally:
        done.set()
        listener.close()
        await listener.wait_closed()
    assert not caught.value.may_have_been_billed
