"""The benchmark script runs (tiny counts); its numbers are never asserted here.

It starts several fresh interpreters, so it is `slow`: deselected by default, run by CI.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import ROOT

BENCH = ROOT / "benchmarks" / "bench.py"


@pytest.mark.slow
def test_benchmark_smoke_run_prints_its_table() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    for label in ("async small C=1", "async large C=16", "sync sequential", "retry policy"):
        assert f"| {label}" in done.stdout
    assert "import aiohttp:" in done.stdout
    # The scale profile runs too (its quick counts: 50 and 200 calls at once).
    for client in ("raw aiohttp", "atoma-images"):
        assert f"| 200 | {client} |" in done.stdout
