"""The documentation site: its code runs, each table has one home, and it builds.

Every ```python block in docs/*.md runs here, against the fake server, offline. A block
runs as a script (``python -X dev -c``, as the README's blocks do) unless the line just
before its fence marks it:

- ``<!-- docs-test: pytest -->``: the block is a pytest module (the testing guide shows
  users how to test their own code); it is written to a file and run by pytest.
- ``<!-- docs-test: fragment: <why> -->``: the block cannot run alone. It is compiled, so
  it stays valid Python, and the reason is part of the page's source. Keep these few.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

import _atoma_images_pytestplugin
import atoma_images
import atoma_images.opentelemetry
import atoma_images.pytest_plugin
import atoma_images.redis
import atoma_images.testing
from atoma_images.testing import FakeAtomaServer

from helpers import ROOT, missing_tests, run_python_block, section
from test_readme import COMMANDS

DOCS = ROOT / "docs"
README = (ROOT / "README.md").read_text()
PAGES = sorted(DOCS.glob("*.md"))

# An optional marker line, then a fence that starts a line and ends on a line of its own.
_BLOCK = re.compile(
    r"^(?:<!-- docs-test: (?P<mark>[^\n]*?) -->\n)?```python\n(?P<code>.*?)^```$",
    re.MULTILINE | re.DOTALL,
)
# Blocks that cannot run alone: each one is a cost (it can rot unseen), so keep them few.
MAX_FRAGMENTS = 3


class Block(NamedTuple):
    page: str
    line: int
    kind: str  # "script", "pytest" or "fragment"
    reason: str
    code: str

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def _blocks(page: Path) -> list[Block]:
    text = page.read_text()
    blocks = []
    for match in _BLOCK.finditer(text):
        mark = match["mark"] or "script"
        kind, _, reason = mark.partition(":")
        line = text.count("\n", 0, match.start("code"))  # the fence's line, 1-based
        blocks.append(Block(page.name, line, kind.strip(), reason.strip(), match["code"]))
    return blocks


BLOCKS = [block for page in PAGES for block in _blocks(page)]
SCRIPTS = [block for block in BLOCKS if block.kind == "script"]
PYTESTS = [block for block in BLOCKS if block.kind == "pytest"]
FRAGMENTS = [block for block in BLOCKS if block.kind == "fragment"]


def test_every_python_block_is_found_and_known() -> None:
    for page in PAGES:
        text = page.read_text()
        # An indented fence (in a list or an admonition) would not be run: refuse it.
        assert text.count("```python") == len(_blocks(page)), page.name
        assert text.count("<!-- docs-test:") == sum(b.kind != "script" for b in _blocks(page))
    assert {block.kind for block in BLOCKS} <= {"script", "pytest", "fragment"}
    assert len(SCRIPTS) >= 10, "the guides lost their examples, or the parser broke"


@pytest.mark.parametrize("block", SCRIPTS, ids=[block.id for block in SCRIPTS])
def test_docs_python_blocks_run(
    block: Block, threaded_server: FakeAtomaServer, tmp_path: Path
) -> None:
    # The same run as the README's blocks: $ATOMA_API_KEY and $ATOMA_BASE_URL point at the
    # fake server, stderr must stay empty (-X dev shows unclosed resources), PNGs are PNGs.
    run_python_block(block.code, threaded_server, tmp_path)


@pytest.mark.slow  # a pytest run in a fresh interpreter each: CI runs them
@pytest.mark.parametrize("block", PYTESTS, ids=[block.id for block in PYTESTS])
def test_docs_pytest_blocks_pass(block: Block, tmp_path: Path) -> None:
    (tmp_path / "test_from_docs.py").write_text(block.code)
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("ATOMA", "ATOMASDK"))}
    # The block needs no plugin; pytest-asyncio (installed for our own tests) would only
    # warn at start-up that this directory has no configuration for it.
    command = [sys.executable, "-X", "dev", "-m", "pytest", "-q", "-W", "error"]
    command += ["-p", "no:cacheprovider", "-p", "no:asyncio", "--rootdir", str(tmp_path)]
    done = subprocess.run(
        [*command, "test_from_docs.py"],
        cwd=tmp_path,
        env=clean,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert " passed" in done.stdout
    assert "skipped" not in done.stdout


def test_fragments_are_few_compile_and_say_why() -> None:
    assert len(FRAGMENTS) <= MAX_FRAGMENTS, [block.id for block in FRAGMENTS]
    for block in FRAGMENTS:
        assert block.reason, f"{block.id}: a fragment must say why it cannot run alone"
        compile(block.code, block.id, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


def test_getting_started_has_the_readmes_two_commands() -> None:
    index = (DOCS / "index.md").read_text()
    commands = [line for line in index.splitlines() if line.startswith("python3 -m venv .venv")]
    assert commands == COMMANDS


# Files that live beside the repository, not in it: a page must not send readers there.
_OUTSIDE = ("CONTRACT.md", "DESIGN.md", "/work/", "shared/spec")


@pytest.mark.parametrize("page", [*PAGES, ROOT / "mkdocs.yml"], ids=lambda page: page.name)
def test_docs_cite_nothing_outside_the_repository(page: Path) -> None:
    text = page.read_text()
    assert [name for name in _OUTSIDE if name in text] == []


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_test_a_page_cites_exists(page: Path) -> None:
    assert missing_tests(page.read_text()) == []


def _table(text: str, header: str) -> list[str]:
    """The table whose header line is ``header``, or starts with it."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append(line)
    return table


# Tables whose home is a docs page. README.md links to that page; where it shows the table
# too (the exit codes: tests/integration/test_cli.py reads them there), the two must be the same.
TABLES = [
    ("errors.md", "| class | status | when | may have been billed |"),
    ("errors.md", "| outcome | default |"),
    ("guide-cli.md", "| code | meaning |"),
]


@pytest.mark.parametrize(("page", "header"), TABLES, ids=[f"{p}:{h}" for p, h in TABLES])
def test_a_table_has_one_home_in_the_docs_and_the_readme_links_to_it(
    page: str, header: str
) -> None:
    home = _table((DOCS / page).read_text(), header)
    assert len(home) > 3  # the table is there, with rows
    copy = _table(README, header) if header in README.splitlines() else []
    assert copy in ([], home)
    assert f"](docs/{page})" in README or f"](docs/{page}#" in README


# The benchmark's tables are the other way round: their home is the README's Performance
# section, and docs/performance.md shows that section through a snippet (pymdownx.snippets).
PERFORMANCE_TABLES = ["| calls | client |", "| case | raw aiohttp req/s |"]


def _readme_snippet(name: str) -> str:
    start, end = f"<!-- --8<-- [start:{name}] -->", f"<!-- --8<-- [end:{name}] -->"
    assert README.count(start) == 1, start
    assert README.count(end) == 1, end
    return README.split(start)[1].split(end)[0]


def test_the_performance_page_shows_the_readmes_benchmark_tables() -> None:
    page = (DOCS / "performance.md").read_text()
    assert '--8<-- "README.md:performance"' in page.splitlines()
    shown = _readme_snippet("performance")
    assert shown in section(README, "Performance")
    for header in PERFORMANCE_TABLES:
        assert len(_table(shown, header)) > 3, header  # the table is there, with rows
    assert re.search(r"^Measured on \d{4}-\d{2}-\d{2}\b", shown, re.MULTILINE)  # and when
    assert "benchmarks/bench.py" in shown  # and how
    assert "](docs/performance.md)" in section(README, "Performance")


def _documented_names() -> set[str]:
    reference = (DOCS / "reference.md").read_text()
    return set(re.findall(r"^::: (\S+)$", reference, re.MULTILINE))


# Modules whose __all__ is public API, and the pytest plugin the package registers.
PUBLIC_MODULES = [
    atoma_images,
    atoma_images.testing,
    atoma_images.opentelemetry,
    atoma_images.pytest_plugin,
    atoma_images.redis,
]


def _fixtures(module: object) -> set[str]:
    """The public functions a module decorates with ``pytest.fixture``, read from its source.

    From the source, not from __all__: a fixture left out of __all__ is public all the same.
    """
    tree = ast.parse(Path(getattr(module, "__file__", "")).read_text())
    found = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for decorator in node.decorator_list:
                called = decorator.func if isinstance(decorator, ast.Call) else decorator
                if ast.unparse(called) in {"pytest.fixture", "fixture"}:
                    found.add(node.name)
    return {name for name in found if not name.startswith("_")}


def _public_names() -> set[str]:
    names = {f"{module.__name__}.{name}" for module in PUBLIC_MODULES for name in module.__all__}
    # The fixtures are defined in the top-level plugin module; their documented home
    # re-exports them.
    plugin = atoma_images.pytest_plugin
    return names | {f"{plugin.__name__}.{name}" for name in _fixtures(_atoma_images_pytestplugin)}


def test_reference_documents_every_public_name_once() -> None:
    reference = (DOCS / "reference.md").read_text()
    fixtures = _fixtures(_atoma_images_pytestplugin)
    assert fixtures <= set(atoma_images.pytest_plugin.__all__), "a fixture its home lacks"
    assert fixtures >= {"atoma_server", "atoma_client", "atoma_sync_client"}, fixtures
    public, documented = _public_names(), _documented_names()
    assert sorted(public - documented) == [], "public, but not in docs/reference.md"
    assert sorted(documented - public) == [], "in docs/reference.md, but not public"
    assert len(re.findall(r"^::: ", reference, re.MULTILINE)) == len(public)


@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None,
    reason="the docs extra is not installed: pip install -e '.[docs]'",
)
@pytest.mark.slow  # CI runs it, and builds the site in a stage of its own too
def test_site_builds_strict_with_every_public_name(tmp_path: Path) -> None:
    site = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "WARNING" not in done.stderr, done.stderr
    reference = (site / "reference" / "index.html").read_text()
    for name in sorted(_public_names()):
        assert f'id="{name}"' in reference, name
    # The README's benchmark tables, shown on the performance page.
    assert (site / "performance" / "index.html").read_text().count("<table>") >= 2
