"""The pytest plugin, run as a user runs it: pytest's own pytester, in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
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
    return ["-p", "_atoma_images_pytestplugin"]


@pytest.fixture
def run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    # The subprocess imports this checkout's package, as the test session does.
    path = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", f"{ROOT}{os.pathsep}{path}" if path else str(ROOT))
    # A user's project, as pytest-asyncio asks it to be configured.
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    return pytester


def _run(pytester: pytest.Pytester, *args: str, warnings: str = "error") -> pytest.RunResult:
    return pytester.runpytest_subprocess(
        *_plugin_options(), "-p", "no:cacheprovider", "-W", warnings, *args
    )


USER_TESTS = """
import pytest

from atoma_images import AsyncImagesClient
from atoma_images.testing import Reply, is_testing


def test_sync(atoma_sync_client, atoma_server):
    atoma_server.enqueue(Reply(status=503))
    result = atoma_sync_client.generate("a red fox", size="16x16")
    assert result.images
    assert len(atoma_server.posts) == 2  # retried, without waiting
    assert is_testing()


@pytest.mark.asyncio
async def test_asyncio(atoma_client, atoma_server):
    atoma_server.enqueue(Reply(status=429, headers={"Retry-After": "30"}))
    result = await atoma_client.generate("a red fox", n=2, size="16x16")
    assert len(result.images) == 2
    assert len(atoma_server.posts) == 3  # Atoma: one request per image, one retried


@pytest.mark.anyio
async def test_anyio(atoma_client, atoma_server):
    result = await atoma_client.generate("a red fox", size="16x16")
    assert result.images
    assert atoma_server.posts[0].json()["prompt"] == "a red fox"


def test_server_alone(atoma_server):
    assert atoma_server.base_url.startswith("http://127.0.0.1:")


def test_client_never_used(atoma_client):
    assert isinstance(atoma_client, AsyncImagesClient)
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
            result = atoma_client.generate("a red fox", size="16x16")
            assert result.images
        """
    )
    result = _run(run)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*'coroutine' object has no attribute 'images'*"])


@pytest.mark.slow
@pytest.mark.parametrize("warnings", ["default", "error"])
def test_a_call_never_awaited_fails_the_test(run: pytest.Pytester, warnings: str) -> None:
    # Written as a statement, the forgotten call raises nothing: Python only warns, when the
    # coroutine is collected, and the test passes unless that warning is an error.
    run.makepyfile(
        test_user="""
        import pytest

        @pytest.mark.asyncio
        async def test_asyncio_forgot(atoma_client):
            atoma_client.generate("a red fox", size="16x16")

        @pytest.mark.anyio
        async def test_anyio_forgot(atoma_client):
            atoma_client.generate("a red fox", size="16x16")

        def test_sync_forgot(atoma_client):
            atoma_client.download("https://example.com/fox.png")

        @pytest.mark.asyncio
        async def test_asyncio_awaited(atoma_client):
            pending = atoma_client.generate("a red fox", size="16x16")
            assert (await pending).images

        @pytest.mark.anyio
        async def test_anyio_awaited(atoma_client):
            assert (await atoma_client.generate("a red fox", size="16x16")).images
        """
    )
    result = _run(run, warnings=warnings)
    result.assert_outcomes(failed=3, passed=2)
    never_awaited = "a call of atoma_client was never awaited: write `await atoma_client.{}(...)`"
    result.stdout.fnmatch_lines(
        [
            "*_ test_asyncio_forgot _*",
            never_awaited.format("generate"),
            "*_ test_anyio_forgot*",
            never_awaited.format("generate"),
            "*_ test_sync_forgot _*",
            never_awaited.format("download"),
        ]
    )
    assert "RuntimeWarning" not in result.stdout.str() + result.stderr.str()


# What the plugin module runs at import, without atoma_images/__init__.py (which loads the
# client): its source as a module of its own. It prints the modules that importing it added.
PLUGIN_ALONE = """
import importlib.util, sys
import pytest

before = set(sys.modules)
spec = importlib.util.spec_from_file_location("plugin_alone", sys.argv[1])
sys.modules["plugin_alone"] = module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
print("\\n".join(sorted(set(sys.modules) - before)))
"""


def test_the_plugin_itself_imports_only_pytest_and_the_standard_library() -> None:
    # pytest imports the plugin in every run of every project that has the package installed.
    plugin = ROOT / "_atoma_images_pytestplugin.py"
    imported = subprocess.run(
        [sys.executable, "-c", PLUGIN_ALONE, str(plugin)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert "plugin_alone" in imported  # the measure sees the plugin's import
    imported.remove("plugin_alone")
    others = [name for name in imported if name.split(".")[0] not in sys.stdlib_module_names]
    assert others == []


def test_the_entry_point_names_the_plugin() -> None:
    # What pytest itself reads: the installed distribution's entry points (from a clone, a
    # wheel or an sdist alike), not the source tree's pyproject.toml.
    from importlib.metadata import entry_points

    plugins = {e.name: e.value for e in entry_points(group="pytest11")}
    assert plugins.get("atoma_images") == "_atoma_images_pytestplugin"


def test_a_run_that_uses_no_fixture_imports_neither_the_package_nor_aiohttp(
    run: pytest.Pytester,
) -> None:
    # pytest loads the plugin in every project that has the package installed.
    run.makepyfile(
        """
        import sys

        def test_nothing_of_atoma_images_was_imported():
            assert "_atoma_images_pytestplugin" in sys.modules  # the plugin is loaded
            assert "atoma_images" not in sys.modules
            assert "aiohttp" not in sys.modules
        """
    )
    result = run.runpytest_subprocess(*_plugin_options(), "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
