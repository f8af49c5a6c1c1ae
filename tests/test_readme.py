"""Every command and code block in README.md runs, and CI runs the README's commands."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from atoma_images.testing import FakeAtomaServer

from conftest import API_KEY

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
CI = (ROOT / ".ci" / "run").read_text()
COMMANDS = [line for line in README.splitlines() if line.startswith("python3 -m venv .venv")]
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, re.DOTALL)


def test_readme_has_the_demo_and_the_test_command() -> None:
    assert len(COMMANDS) == 2
    assert COMMANDS[0].endswith("examples/quickstart.py")
    assert COMMANDS[1].endswith("-m pytest")


@pytest.mark.parametrize("command", COMMANDS)
def test_ci_runs_the_readme_commands_verbatim(command: str) -> None:
    assert command in CI.splitlines()


def test_ci_also_runs_the_slow_tests_the_default_run_leaves_out(
    pytestconfig: pytest.Config,
) -> None:
    addopts = pytestconfig.getini("addopts")
    assert ["-m", "not slow"] in [addopts[i : i + 2] for i in range(len(addopts))]
    assert ".venv/bin/python -m pytest -m slow" in CI.splitlines()
    collect_slow = ["--collect-only", "-q", "-p", "no:cacheprovider", "-m", "slow"]
    files = ["tests/test_benchmark.py", "tests/test_reliability.py"]
    listed = subprocess.run(
        [sys.executable, "-m", "pytest", *collect_slow, *files],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert listed.returncode == 0, listed.stdout + listed.stderr
    slow = {line for line in listed.stdout.splitlines() if "::" in line}
    assert slow >= {
        "tests/test_benchmark.py::test_benchmark_smoke_run_prints_its_table",
        "tests/test_reliability.py::test_a_thousand_calls_cancelled_at_random_moments",
        "tests/test_reliability.py::test_sustained_load_without_errors_or_leaks",
    }


@pytest.mark.parametrize(
    "code", PYTHON_BLOCKS, ids=[f"block{i}" for i in range(len(PYTHON_BLOCKS))]
)
def test_readme_python_blocks_run(
    code: str, threaded_server: FakeAtomaServer, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "ATOMA_API_KEY": API_KEY,
        "ATOMA_BASE_URL": threaded_server.base_url,
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
    assert done.stderr == ""
    for png in tmp_path.glob("*.png"):
        assert png.read_bytes().startswith(b"\x89PNG")
