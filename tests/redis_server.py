"""A real redis-server for the tests marked ``redis``, started and stopped by the tests.

It is Debian's ``redis-server`` package (``.ci/run`` installs it); when it is missing the
tests fail, saying so, rather than skip: a budget shared by replicas is tested for real or
not at all. Nothing is saved to disk (``--save ''``, ``--appendonly no``).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

MISSING = (
    "redis-server is not installed: the tests marked 'redis' need Debian's package "
    "(apt-get install -y redis-server), as .ci/run installs it"
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RedisServer:
    """One redis-server on 127.0.0.1, on a free port, in a temporary directory."""

    def __init__(self) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            pytest.fail(MISSING, pytrace=False)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._dir = tempfile.mkdtemp(prefix="atoma-images-redis-")
        self._process = subprocess.Popen(
            [
                executable,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", self._dir,
                "--logfile", str(Path(self._dir) / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self._wait_until_ready()

    def _wait_until_ready(self, seconds: float = 20.0) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                log = Path(self._dir, "redis.log")
                pytest.fail(
                    f"redis-server exited at once: {log.read_text() if log.exists() else ''}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.02)
        self.stop()
        pytest.fail(f"redis-server did not answer on port {self.port} in {seconds} s")

    def stop(self) -> None:
        """Stop it (and its data: nothing is saved). Safe to repeat."""
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        shutil.rmtree(self._dir, ignore_errors=True)
