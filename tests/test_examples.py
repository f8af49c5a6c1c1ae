"""The examples run as a user would run them, and write real PNGs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from atoma_images.testing import FakeAtomaServer

from conftest import API_KEY
from pngcheck import png_size

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(
    name: str, *arguments: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("ATOMA", "ATOMASDK"))}
    return subprocess.run(
        [sys.executable, "-X", "dev", str(EXAMPLES / name), *arguments],
        cwd=cwd,
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_quickstart_without_a_key_uses_the_fake_server(tmp_path: Path) -> None:
    done = run_example("quickstart.py", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert "fake server" in done.stdout
    assert png_size(tmp_path / "quickstart.png") == (1024, 1024)


def test_quickstart_with_a_key_calls_the_configured_api(
    tmp_path: Path, threaded_server: FakeAtomaServer
) -> None:
    done = run_example(
        "quickstart.py",
        "an owl",
        "owl.png",
        cwd=tmp_path,
        env={"ATOMA_API_KEY": API_KEY, "ATOMA_BASE_URL": threaded_server.base_url},
    )
    assert done.returncode == 0, done.stderr
    assert "fake server" not in done.stdout
    assert png_size(tmp_path / "owl.png") == (1024, 1024)
    assert threaded_server.posts[0].json()["prompt"] == "an owl"
