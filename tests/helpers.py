"""What several test modules share: the test key, a sleep that does not wait, a small server,
the command line run as a user runs it, and the documentation's citations. Fixtures stay in
conftest.py; tests import these from here, never from one another."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import functools
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

from aiohttp import web

import atoma_images
from atoma_images.testing import FakeAtomaServer

#: The repository's root.
ROOT = Path(__file__).resolve().parent.parent

API_KEY = "sk-test-5f2b9c1e7d"


class FakeSleep:
    """Stands in for asyncio.sleep in retry policies: records waits, never waits for real."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        await asyncio.sleep(0)

    @property
    def total(self) -> float:
        return sum(self.waits)


@contextlib.asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    """Run a small aiohttp.web app made in a test on 127.0.0.1; yields its root URL."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


# Dev mode (python -X dev) turns on asyncio's debug mode, which logs any step of the loop that
# takes over 0.1 s: on a loaded machine that is the machine, not the code under test, so those
# notes are dropped from what the tests compare; every other line of stderr is compared exactly.
_SLOW_STEP = re.compile(r"Executing <.*> took \d+\.\d+ seconds")


def without_slow_step_notes(stderr: str) -> str:
    return "".join(
        line for line in stderr.splitlines(keepends=True) if not _SLOW_STEP.fullmatch(line.strip())
    )


# -- bad input every entry point refuses before sending ----------------------------------

INVALID = [
    ("prompt", "", "non-empty"),
    ("prompt", "   \n\t", "empty"),
    ("prompt", "x" * 1001, "1001 characters"),
    ("prompt", None, "non-empty string"),
    ("prompt", 42, "non-empty string"),
    ("prompt", b"bytes", "non-empty string"),
    ("prompt", "lone \ud800 surrogate", "UTF-8"),
    ("model", "", "model name"),
    ("model", None, "model name"),
    ("model", 7, "model name"),
    ("n", 0, "from 1 to 10"),
    ("n", 11, "from 1 to 10"),
    ("n", -1, "from 1 to 10"),
    ("n", True, "from 1 to 10"),
    ("n", 1.0, "from 1 to 10"),
    ("n", "2", "from 1 to 10"),
    ("n", None, "from 1 to 10"),
    ("size", "1024X1024", "lowercase x"),
    ("size", "1024*1024", "lowercase x"),
    ("size", "1024x", "lowercase x"),
    ("size", "x1024", "lowercase x"),
    ("size", "0x1024", "positive"),
    ("size", "1024x0", "positive"),
    ("size", "-1x5", "positive"),
    ("size", " 1024x1024", "WIDTHxHEIGHT"),
    ("size", "1024x1024 ", "WIDTHxHEIGHT"),
    ("size", "1e3x1024", "WIDTHxHEIGHT"),
    ("size", "\u0661\u0660x\u0661\u0660", "WIDTHxHEIGHT"),  # Arabic-Indic digits: not ASCII
    ("size", "99999999999x1", "WIDTHxHEIGHT"),
    ("size", 1024, "WIDTHxHEIGHT"),
    ("size", None, "WIDTHxHEIGHT"),
    ("quality", 1, "string or None"),
    ("style", ["vivid"], "string or None"),
    ("user", b"u", "string or None"),
    ("response_format", 0, "'url', 'b64_json' or None"),
    ("response_format", "png", "'url', 'b64_json' or None"),
    ("response_format", "URL", "'url', 'b64_json' or None"),
    ("response_format", "data_uri", "'url', 'b64_json' or None"),
    ("response_format", ["url"], "'url', 'b64_json' or None"),  # unhashable: no TypeError
    ("user", "\udfff", "UTF-8"),
]


# -- the command line, run as a user runs it --------------------------------------------------

# The subprocess must run the copy of the package this test session imported, not whichever
# copy an editable install of another checkout puts on sys.path.
PACKAGE_ROOT = str(Path(atoma_images.__file__).resolve().parent.parent)
COMMAND = (sys.executable, "-X", "dev", "-m", "atoma_images")
# aiohttp parses strictly in dev mode; a user's run parses leniently, and lets a control
# character through in a header.
USERS_COMMAND = (sys.executable, "-m", "atoma_images")


def environment(
    cwd: Path,
    key: str | None,
    sitecustomize: str | None = None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The subprocess's environment; ``sitecustomize`` is code it runs first (a fault)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ATOMA", "ATOMASDK"))}
    path = [PACKAGE_ROOT]
    if sitecustomize is not None:
        site = cwd / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(sitecustomize)
        path.insert(0, str(site))
    env["PYTHONPATH"] = os.pathsep.join(path)
    if key is not None:
        env["ATOMA_API_KEY"] = key
    env.update(extra or {})
    return env


def cli(
    *arguments: str,
    cwd: Path,
    key: str | None = API_KEY,
    stderr: int | None = None,
    sitecustomize: str | None = None,
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [*COMMAND, *arguments],
        cwd=cwd,
        env=environment(cwd, key, sitecustomize),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE if stderr is None else stderr,
        text=True,
        timeout=120,
        check=False,
    )
    if done.stderr is not None:
        done.stderr = without_slow_step_notes(done.stderr)
    return done


async def acli(
    *arguments: str,
    cwd: Path,
    key: str | None = API_KEY,
    sitecustomize: str | None = None,
    extra: Mapping[str, str] | None = None,
    dev_mode: bool = True,
) -> subprocess.CompletedProcess[str]:
    """`cli` for a test whose server runs on the test's own event loop."""
    process = await asyncio.create_subprocess_exec(
        *(COMMAND if dev_mode else USERS_COMMAND),
        *arguments,
        cwd=cwd,
        env=environment(cwd, key, sitecustomize, extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode is not None
    return subprocess.CompletedProcess(
        arguments, process.returncode, out.decode(), without_slow_step_notes(err.decode())
    )


# -- the documentation ---------------------------------------------------------------------

# A test cited as `tests/test_x.py` or `tests/test_x.py::test_name` (in backticks).
CITED_TEST = re.compile(r"`(tests/[\w/]+\.py)(?:::(\w+))?`")


def section(text: str, title: str) -> str:
    """The body of the ``## title`` section of a Markdown text, up to the next ``## ``."""
    lines = text.splitlines()
    start = lines.index(f"## {title}") + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("## ")), len(lines))
    return "\n".join(lines[start:end])


@functools.cache
def _functions(path: Path) -> frozenset[str]:
    tree = ast.parse(path.read_text())
    kinds = (ast.FunctionDef, ast.AsyncFunctionDef)
    return frozenset(node.name for node in ast.walk(tree) if isinstance(node, kinds))


def missing_tests(text: str) -> list[str]:
    """The tests ``text`` cites that do not exist: a file, or a test function in it."""
    missing = []
    for path, name in CITED_TEST.findall(text):
        file = ROOT / path
        if not file.is_file():
            missing.append(path)
        elif name and not (name.startswith("test_") and name in _functions(file)):
            missing.append(f"{path}::{name}")
    return missing


def run_python_block(code: str, server: FakeAtomaServer, tmp_path: Path) -> None:
    """Run a README or docs block as a user runs it, against ``server``, offline."""
    env = {
        **os.environ,
        "ATOMA_API_KEY": API_KEY,
        "ATOMA_BASE_URL": server.base_url,
    }
    done = subprocess.run(
        [sys.executable, "-X", "dev", "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert without_slow_step_notes(done.stderr) == ""
    for png in tmp_path.glob("*.png"):
        assert png.read_bytes().startswith(b"\x89PNG")
