"""The examples run as a user would run them, and write real PNGs."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from atoma_images import AsyncImagesClient
from atoma_images.testing import FakeAtomaServer, Reply

from helpers import API_KEY, ROOT
from pngcheck import png_size

EXAMPLES = ROOT / "examples"


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


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_async_service_answers_with_a_png_and_shuts_down_cleanly(tmp_path: Path) -> None:
    port = _free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("ATOMA", "ATOMASDK"))}
    service = subprocess.Popen(
        [sys.executable, "-X", "dev", str(EXAMPLES / "async_service.py"), "--port", str(port)],
        cwd=tmp_path,
        env=clean,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert service.poll() is None, service.communicate()
                assert time.monotonic() < deadline, "the service did not start"
                time.sleep(0.1)

        def post(body: bytes) -> tuple[int, bytes, str]:
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/imagine", data=body, method="POST"
            )
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    return response.status, response.read(), response.headers["Content-Type"]
            except urllib.error.HTTPError as error:
                return error.code, error.read(), error.headers["Content-Type"]

        status, png, kind = post(json.dumps({"prompt": "a red fox", "size": "96x64"}).encode())
        assert (status, kind) == (200, "image/png")
        assert png_size(png) == (96, 64)
        status, body, _ = post(json.dumps({"prompt": ""}).encode())
        assert status == 400
        assert "invalid prompt" in json.loads(body)["error"]
        assert post(b"not json")[0] == 400
    finally:
        service.send_signal(signal.SIGINT)
        out, err = service.communicate(timeout=30)
    assert service.returncode == 0, err
    assert "Traceback" not in err
    assert "Unclosed" not in err
    assert "fake server" in out


def test_batch_reports_failures_per_prompt_and_goes_on(
    tmp_path: Path, threaded_server: FakeAtomaServer
) -> None:
    threaded_server.enqueue(Reply(status=400))  # one of the prompts meets a 400
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(["a fox", "an owl", "x" * 1001, "a boat", "a kite"]) + "\n")
    done = run_example(
        "batch.py",
        str(prompts),
        "-o",
        "out",
        "--concurrency",
        "2",
        cwd=tmp_path,
        env={"ATOMA_API_KEY": API_KEY, "ATOMA_BASE_URL": threaded_server.base_url},
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr == ""
    assert "3 of 5 prompts saved" in done.stdout
    assert done.stdout.count("FAILED") == 2
    assert "invalid prompt" in done.stdout
    assert "400 Bad Request" in done.stdout
    assert [line for line in done.stdout.splitlines() if line.startswith("[5/5]")]
    saved = sorted((tmp_path / "out").iterdir())
    assert len(saved) == 3
    assert all(png_size(path) == (512, 512) for path in saved)


def test_bot_cancels_and_keeps_one_job_per_user(tmp_path: Path) -> None:
    done = run_example("bot.py", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    replies = [line for line in done.stdout.splitlines() if line.startswith("bot -> ")]
    assert "bot -> alice: busy: one image at a time (send /cancel to stop it)" in replies
    assert "bot -> bob: cancelled" in replies
    assert any(re.fullmatch(r"bot -> alice: [\d,]+ bytes of PNG", line) for line in replies)
    assert not any(line.startswith("bot -> bob: ") and "PNG" in line for line in replies)


async def test_bot_in_process_sends_the_image_bytes(server: FakeAtomaServer) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("bot_example", EXAMPLES / "bot.py")
    assert spec is not None
    assert spec.loader is not None
    bot_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bot_module)
    replies: list[tuple[str, bytes | str]] = []

    async def send(user: str, reply: bytes | str) -> None:
        replies.append((user, reply))

    server.latency = 0.2
    async with AsyncImagesClient(API_KEY, base_url=server.base_url) as client:
        bot = bot_module.ImageBot(client, send)
        inbox: asyncio.Queue[tuple[str, str] | None] = asyncio.Queue()
        for message in [("ann", "/imagine a fox"), ("ann", "/imagine again"), ("cy", "/cancel")]:
            inbox.put_nowait(message)
        inbox.put_nowait(None)
        await bot.run(inbox)
    assert replies[0] == ("ann", "busy: one image at a time (send /cancel to stop it)")
    assert replies[1] == ("cy", "nothing to cancel")
    user, image = replies[2]
    assert user == "ann"
    assert isinstance(image, bytes)
    assert png_size(image) == (512, 512)
    assert len(server.posts) == 1


@pytest.mark.skipif(
    importlib.util.find_spec("cryptography") is None,
    reason="needs the confidential extra: pip install 'atoma-images[confidential]'",
)
def test_confidential_example_runs_against_the_fake_node(tmp_path: Path) -> None:
    done = run_example("confidential.py", "a red fox", "fox.png", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert "fake confidential node" in done.stdout  # no key: offline
    assert "decrypted and hash-checked" in done.stdout
    assert png_size(tmp_path / "fox.png") == (512, 512)


def test_confidential_example_without_the_extra_names_it(tmp_path: Path) -> None:
    # cryptography made unimportable, as in a base install (a sitecustomize on the path).
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['cryptography'] = None\n")
    done = run_example("confidential.py", cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)})
    assert done.returncode == 2
    assert "pip install 'atoma-images[confidential]'" in done.stderr
    assert not (tmp_path / "confidential.png").exists()
