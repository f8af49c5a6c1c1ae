"""Every command and code block in README.md runs, and CI runs the README's commands.

The README states the billing rule and names the tests that hold it (they exist), and its
links lead somewhere.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from atoma_images.testing import FakeAtomaServer

from helpers import CITED_TEST, ROOT, missing_tests, run_python_block, section

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


@pytest.mark.slow  # a pytest collection in a fresh interpreter: CI runs it
def test_ci_also_runs_the_slow_tests_the_default_run_leaves_out(
    pytestconfig: pytest.Config,
) -> None:
    addopts = pytestconfig.getini("addopts")
    assert ["-m", "not slow and not redis"] in [addopts[i : i + 2] for i in range(len(addopts))]
    assert ".venv/bin/python -m pytest -m slow" in CI.splitlines()
    assert ".venv/bin/python -m pytest -m redis" in CI.splitlines()
    assert "apt-get install -y redis-server" in CI  # the redis tests need it; they never skip
    collect_slow = ["--collect-only", "-q", "-p", "no:cacheprovider", "-m", "slow"]
    files = ["tests/integration/test_benchmark.py", "tests/integration/test_reliability.py"]
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
        "tests/integration/test_benchmark.py::test_benchmark_smoke_run_prints_its_table",
        "tests/integration/test_reliability.py::test_a_thousand_calls_cancelled_at_random_moments",
        "tests/integration/test_reliability.py::test_sustained_load_without_errors_or_leaks",
    }


@pytest.mark.parametrize(
    "code", PYTHON_BLOCKS, ids=[f"block{i}" for i in range(len(PYTHON_BLOCKS))]
)
def test_readme_python_blocks_run(
    code: str, threaded_server: FakeAtomaServer, tmp_path: Path
) -> None:
    run_python_block(code, threaded_server, tmp_path)


# -- what the README promises, and where it sends readers -----------------------------------------

RULE = (
    "**an error with `may_have_been_billed == False` means the server never received that"
    " request.**"
)


def test_readme_states_the_billing_rule_and_names_the_tests_that_hold_it() -> None:
    reliability = section(README, "Reliability")
    assert RULE in " ".join(reliability.split())  # the exact words, however the line wraps
    named = [f"{path}::{name}" for path, name in CITED_TEST.findall(reliability) if name]
    assert any(test.startswith("tests/integration/test_billing.py::") for test in named), named
    assert missing_tests(reliability) == []
    assert "](docs/reliability.md)" in reliability  # the rest of it has a page of its own


def test_every_test_the_readme_cites_exists() -> None:
    assert missing_tests(README) == []


def _slug(heading: str) -> str:
    """A heading's anchor, as GitHub and the docs site make it (for plain headings)."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


_LINK = re.compile(r"\]\((?!https?:|mailto:)(?P<path>[^)#\s]*)(?:#(?P<anchor>[^)\s]+))?\)")


def test_readme_links_lead_somewhere() -> None:
    links = list(_LINK.finditer(README))
    assert len(links) >= 10  # the guides, the reliability and performance pages...
    for link in links:
        target = ROOT / (link["path"] or "README.md")
        assert target.exists(), link[0]
        if link["anchor"]:
            headings = re.findall(r"^#+ (.+)$", target.read_text(), re.MULTILINE)
            assert link["anchor"] in {_slug(h) for h in headings}, link[0]
