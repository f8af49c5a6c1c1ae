"""The types users see: a correct script type-checks clean, every planted mistake is caught.

mypy --strict and pyright read a user's script the way an IDE does. A typing regression (an
argument typed ``str`` that should be a ``Literal``, an ``Any`` leaking out of a result) lets
a mistake through to the server, so it fails here first. Slow (two type checkers): CI runs it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

CORRECT = """\
import asyncio

from atoma_images import AsyncImagesClient, ImagesClient, RetryPolicy, Timeout


async def main() -> bytes:
    async with AsyncImagesClient("k", timeout=Timeout(read=90), retries=RetryPolicy()) as client:
        result = await client.generate("a fox", n=2, size="512x512", response_format="b64_json")
        return result.images[0].decode()


with ImagesClient("k", timeout=30.0) as sync_client:
    image = sync_client.generate("an owl", response_format="url").images[0]
    address: str | None = image.url
asyncio.run(main())
"""

# Each line is a mistake a user makes; each must be an error on its own line.
MISTAKES = [
    'ImagesClient("k").generate("a fox", response_format="png")',  # not url or b64_json
    'ImagesClient("k").generate("a fox", n="2")',  # a number as a string
    'ImagesClient("k").generate(prompt=3)',  # a prompt that is not text
    'ImagesClient("k").generate("a fox", sizes="512x512")',  # no such argument
    'ImagesClient("k", timeout="10")',  # seconds as a string
    'ImagesClient("k", retries=3)',  # a count where a policy goes
    'ImagesClient("k").generate("a fox").images[0].url.upper()',  # url may be None
    'len(ImagesClient("k").generate("a fox").created)',  # created is an int
]
WRONG = "from atoma_images import ImagesClient\n\n" + "\n".join(MISTAKES) + "\n"
FIRST_MISTAKE_LINE = 3


def run(tool: list[str], script: Path) -> str:
    done = subprocess.run(
        [*tool, str(script)], capture_output=True, text=True, timeout=300, check=False
    )
    return done.stdout + done.stderr


def checkers() -> dict[str, list[str]]:
    found = {"mypy": [sys.executable, "-m", "mypy", "--strict", "--no-incremental"]}
    pyright = shutil.which("pyright") or str(Path(sys.executable).with_name("pyright"))
    if Path(pyright).exists():
        found["pyright"] = [pyright]
    return found


def test_both_type_checkers_are_installed() -> None:
    # The dev extra brings both; a check that silently ran one of them would hide half.
    assert set(checkers()) == {"mypy", "pyright"}


@pytest.mark.parametrize("checker", ["mypy", "pyright"])
def test_a_correct_script_type_checks_clean(checker: str, tmp_path: Path) -> None:
    script = tmp_path / "correct.py"
    script.write_text(CORRECT)
    output = run(checkers()[checker], script)
    assert re.search(r"\b0 errors\b|Success: no issues found", output), output


@pytest.mark.parametrize("checker", ["mypy", "pyright"])
def test_every_planted_mistake_is_an_error(checker: str, tmp_path: Path) -> None:
    script = tmp_path / "wrong.py"
    script.write_text(WRONG)
    output = run(checkers()[checker], script)
    # mypy: "wrong.py:5: error: ..."; pyright: "wrong.py:5:13 - error: ..."
    flagged = {int(n) for n in re.findall(r"wrong\.py:(\d+)(?::\d+)?:? -? ?error", output)}
    expected = set(range(FIRST_MISTAKE_LINE, FIRST_MISTAKE_LINE + len(MISTAKES)))
    missed = {MISTAKES[n - FIRST_MISTAKE_LINE] for n in expected - flagged}
    assert not missed, output
