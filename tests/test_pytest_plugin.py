"""The pytest plugin, run as a user runs it: pytest's own pytester, in a subprocess."""

from __future__ import annotations

import os
from importlib.metadata import entry_points
from pathlib import Path

import pytest

import atoma_images

pytest_plugins = ["pytester"]

ROOT = Path(atoma_images.__file__).resolve().parent.parent


def _plugin_options() -> list[str]:
    # From a checkout that is not installed, the entry point is absent: load the plugin by name.
    if entry_points(group="pytest11", name="atoma_images"):
        return []
    return ["-p", "atoma_images.pytest_plugin"]


@pytest.fixture
def run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    # The subprocess imports this checkout's package, as the test session does.
    path = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", f"{ROOT}{os.pathsep}{path}" if path else str(ROOT))
    # A user's project, as pytest-asyncio asks it to be configured.
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    return pytester


def _run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(
        *_plugin_options(), "-p", "no:cacheprovider", "-W", "error", *args
    )


USER_TESTS = """
import pytest

from atoma_images.testing import Reply, is_testing


def test_sync(atoma_sync_client, atoma_server):
    atoma_server.enqueue(Reply(status=503))
    result = atoma_sync_client.generate("a red fox", size="8x8")
    assert result.images
    assert len(atoma_server.posts) == 2  # retried, without waiting
    assert is_testing()


@pytest.mark.asyncio
async def test_asyncio(atoma_client, atoma_server):
    atoma_server.enqueue(Reply(status=429, headers={"Retry-After": "30"}))
    result = await atoma_client.generate("a red fox", n=2, size="8x8")
    assert len(result.images) == 2
    assert len(atoma_server.posts) == 2


@pytest.mark.anyio
async def test_anyio(atoma_client, atoma_server):
    result = await atoma_client.generate("a red fox", size="8x8")
    assert result.images
    assert atoma_server.posts[0].json()["prompt"] == "a red fox"


def test_server_alone(atoma_server):
    assert atoma_server.base_url.startswith("http://127.0.0.1:")


def test_client_never_used(atoma_client):
    assert atoma_client.base_url.endswith("/v1")


def test_testing_is_off_without_the_fixtures():
    assert not is_testing()
"""


@pytest.mark.slow  # a pytest run in a subprocess each; CI runs them
def test_each_fixture_sync_and_async(run: pytest.Pytester) -> None:
    run.makepyfile(test_user=USER_TESTS)
    result = _run(run, "-W", "error::ResourceWarning")
    result.assert_outcomes(passed=6)
    text = result.stdout.str() + result.stderr.str()
    assert "Unclosed" not in text
    assert "ResourceWarning" not in text


@pytest.mark.slow
def test_forgetting_to_await_fails_clearly(run: pytest.Pytester) -> None:
    run.makepyfile(
        test_user="""
        import pytest

        @pytest.mark.asyncio
        async def test_forgot(atoma_client):
            result = atoma_client.generate("a red fox", size="8x8")
            assert result.images
        """
    )
    result = _run(run)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*'coroutine' object has no attribute 'images'*"])


def test_the_entry_point_names_the_plugin() -> None:
    # What pytest itself reads: the installed distribution's entry points (from a clone, a
    # wheel or an sdist alike), not the source tree's pyproject.toml.
    from importlib.metadata import entry_points

    plugins = {e.name: e.value for e in entry_points(group="pytest11")}
    assert plugins.get("atoma_images") == "atoma_images.pytest_plugin"
