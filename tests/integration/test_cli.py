"""The command line, run as a user runs it: a subprocess with a real server behind it."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import importlib.util
import json
import os
import pty
import re
import signal
import socket
import subprocess
import time
import unicodedata
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from aiohttp import web

from atoma_images._models import DEFAULT_MODEL
from atoma_images.cli import EXIT_CODES, main
from atoma_images.testing import FakeAtomaServer, Reply, make_png

from helpers import API_KEY, COMMAND, ROOT, acli, cli, environment, serving, without_slow_step_notes
from pngcheck import png_size

README = (ROOT / "README.md").read_text()
GUIDE = (ROOT / "docs" / "guide-cli.md").read_text()


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("atoma-images: error")]


def test_fake_saves_pngs_and_prints_their_paths(tmp_path: Path) -> None:
    done = cli(
        "--fake", "a red fox", "-n", "2", "--size", "64x48", "-o", "out", cwd=tmp_path, key=None
    )
    assert done.returncode == 0, done.stderr
    paths = done.stdout.split()
    assert paths == ["out/a-red-fox-1.png", "out/a-red-fox-2.png"]
    assert [png_size(tmp_path / p) for p in paths] == [(64, 48), (64, 48)]
    assert "fake server" in done.stderr
    assert "Traceback" not in done.stderr
    # One prompt, no --max-compute-units: the run still ends with what it cost (2 x 64 x 48).
    assert done.stderr.splitlines()[-1] == "atoma-images: used 6,144 compute units"


@pytest.mark.skipif(
    importlib.util.find_spec("cryptography") is None,
    reason="needs the confidential extra: pip install 'atoma-images[confidential]'",
)
def test_fake_confidential_saves_pngs(tmp_path: Path) -> None:
    done = cli(
        "--fake", "--confidential", "a red fox", "-n", "2", "--size", "48x32", "--json",
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert record["files"] == ["a-red-fox-1.png", "a-red-fox-2.png"]
    assert [png_size(tmp_path / name) for name in record["files"]] == [(48, 32)] * 2


def test_a_second_run_does_not_overwrite(tmp_path: Path) -> None:
    first = cli("--fake", "fox", "--size", "16x16", cwd=tmp_path, key=None)
    second = cli("--fake", "fox", "--size", "16x16", cwd=tmp_path, key=None)
    assert (first.stdout.strip(), second.stdout.strip()) == ("fox-1.png", "fox_2-1.png")


def test_three_images_on_atoma_are_three_files(tmp_path: Path) -> None:
    done = cli("--fake", "a red fox", "-n", "3", "--size", "32x16", cwd=tmp_path, key=None)
    assert done.returncode == 0, done.stderr
    paths = done.stdout.split()
    assert paths == ["a-red-fox-1.png", "a-red-fox-2.png", "a-red-fox-3.png"]
    assert [png_size(tmp_path / p) for p in paths] == [(32, 16)] * 3
    assert done.stderr.splitlines()[-1] == "atoma-images: used 1,536 compute units"


@pytest.mark.parametrize(
    ("arguments", "phrase"),
    [(("--format", "url"), "nothing serves"), (("--size", "1000x1000"), "'992x992'")],
)
def test_what_atoma_cannot_answer_as_asked_is_refused_before_sending(
    tmp_path: Path, arguments: tuple[str, ...], phrase: str
) -> None:
    done = cli("--fake", "an owl", *arguments, cwd=tmp_path, key=None)
    assert done.returncode == EXIT_CODES["invalid input"]
    assert phrase in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_json_output_and_url_format(tmp_path: Path) -> None:
    done = cli(
        "--fake", "an owl", "--dialect", "openai", "--format", "url", "--json", "--size", "16x16",
        cwd=tmp_path, key=None,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (record,) = [json.loads(line) for line in done.stdout.splitlines()]
    assert record["prompt"] == "an owl"
    assert record["urls"][0].startswith("http://127.0.0.1:")
    assert png_size(tmp_path / record["files"][0]) == (16, 16)
    assert done.stderr.splitlines()[-1] == "atoma-images: used 256 compute units"  # not stdout


def test_prompts_file_reports_each_failure_and_goes_on(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a fox\n# a comment\n\nan owl\n" + "x" * 1001 + "\na boat\n")
    done = cli(
        "--fake",
        "--prompts-file",
        str(prompts),
        "--concurrency",
        "2",
        "--size",
        "16x16",
        "--json",
        "-o",
        "out",
        cwd=tmp_path,
        key=None,
    )
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(records) == 4
    failed = [r for r in records if "error" in r]
    assert len(failed) == 1
    assert failed[0]["error"]["type"] == "InvalidRequestError"
    assert done.returncode == EXIT_CODES["invalid input"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "001-a-fox-1.png",
        "002-an-owl-1.png",
        "004-a-boat-1.png",
    ]
    assert "4/4 done" in done.stderr
    assert sum("atoma-images: error" in line for line in done.stderr.splitlines()) == 1


@pytest.mark.parametrize(
    ("reply", "kind", "maybe_billed"),
    [
        (Reply(status=401), "authentication", False),
        (Reply(status=402), "balance", False),
        (
            Reply(status=400, body={"error": {"code": "FIAT_PAYMENTS_ONLY", "message": "m"}}),
            "balance",
            False,
        ),
        (Reply(status=429, headers={"Retry-After": "3600"}), "rate limit", False),
        (Reply(status=500), "server", False),
        (Reply(status=200, body="<html>not json</html>"), "invalid response", True),
        (Reply(fault="drop"), "connection", True),
    ],
)
def test_exit_codes_for_server_answers(
    threaded_server: FakeAtomaServer, tmp_path: Path, reply: Reply, kind: str, maybe_billed: bool
) -> None:
    threaded_server.enqueue(reply, times=3)
    done = cli(
        "fox",
        "--base-url",
        threaded_server.base_url,
        "--max-retries",
        "0",
        "--size",
        "16x16",
        cwd=tmp_path,
    )
    assert done.returncode == EXIT_CODES[kind], done.stderr
    error, cost = done.stderr.strip().splitlines()  # the error, then what the run cost
    assert error.startswith("atoma-images: error: ")
    # An error status is not billed; a lost or unreadable answer may have been (8 x 8 units).
    unknown = "; 256 more may have been billed" if maybe_billed else ""
    assert cost == f"atoma-images: used 0 compute units{unknown}"
    assert done.stdout == ""


def test_exit_codes_for_bad_input_no_key_and_no_server(tmp_path: Path) -> None:
    bad = cli("--fake", "fox", "--size", "8X8", cwd=tmp_path, key=None)
    assert bad.returncode == EXIT_CODES["invalid input"]
    assert "lowercase x" in bad.stderr
    no_key = cli("fox", cwd=tmp_path, key=None)
    assert no_key.returncode == EXIT_CODES["authentication"]
    assert "ATOMA_API_KEY" in no_key.stderr
    assert "--fake" in no_key.stderr
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    refused = cli(
        "fox", "--base-url", f"http://127.0.0.1:{port}/v1", "--max-retries", "0", cwd=tmp_path
    )
    assert refused.returncode == EXIT_CODES["connection"]
    usage = cli(cwd=tmp_path)
    assert usage.returncode == 2
    assert "give either a prompt or --prompts-file" in usage.stderr


def test_debug_shows_the_traceback(threaded_server: FakeAtomaServer, tmp_path: Path) -> None:
    threaded_server.enqueue(Reply(status=401))
    done = cli("fox", "--base-url", threaded_server.base_url, "--debug", cwd=tmp_path)
    assert done.returncode == EXIT_CODES["authentication"]
    assert "Traceback" in done.stderr


@pytest.mark.slow  # two runs, one on a pseudo-terminal: CI runs it
def test_spinner_only_on_a_terminal(threaded_server: FakeAtomaServer, tmp_path: Path) -> None:
    threaded_server.latency = 0.5
    arguments = ("fox", "--base-url", threaded_server.base_url, "--size", "16x16")
    piped = cli(*arguments, cwd=tmp_path)
    assert piped.returncode == 0
    assert "generating" not in piped.stderr
    leader, follower = pty.openpty()
    try:
        on_tty = cli(*arguments, cwd=tmp_path, stderr=follower)
        os.close(follower)
        shown = b""
        while True:
            try:
                data = os.read(leader, 4096)
            except OSError:  # the terminal closed
                break
            if not data:
                break
            shown += data
    finally:
        os.close(leader)
    assert on_tty.returncode == 0
    assert re.search(r"generating… \d+\.\ds", shown.decode())


def test_readme_and_the_guide_document_every_exit_code() -> None:
    for name, text in (("README", README), ("the guide", GUIDE)):
        for kind, code in EXIT_CODES.items():
            assert re.search(rf"\| {code} \| {kind}", text), f"{code} {kind} missing from {name}"


# -- --list-models and --check: asking the API, generating nothing --------------------------------


def test_list_models_prints_one_id_a_line_or_one_object_with_json(tmp_path: Path) -> None:
    listed = cli("--fake", "--list-models", cwd=tmp_path, key=None)
    assert (listed.returncode, listed.stdout) == (0, "black-forest-labs/FLUX.1-schnell\n")
    as_json = cli("--fake", "--list-models", "--json", "--dialect", "openai", cwd=tmp_path)
    records = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert as_json.returncode == 0, as_json.stderr
    assert [r["id"] for r in records] == ["dall-e-2", "dall-e-3", "gpt-image-1", DEFAULT_MODEL]
    assert {tuple(r) for r in records} == {("id", "object", "created", "owned_by")}
    # Nothing was generated: no usage line, and no file.
    for done in (listed, as_json):
        assert "compute units" not in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_check_passes_against_the_fake_in_both_dialects(tmp_path: Path) -> None:
    done = cli("--fake", "--check", cwd=tmp_path, key=None)
    assert done.returncode == EXIT_CODES["ok"], done.stderr
    said = r"ok: http://127\.0\.0\.1:\d+/v1 answers \('ok'\) and accepts the key; it serves 1 model"
    assert re.fullmatch(said, done.stdout.rstrip("\n")), done.stdout
    openai = cli("--fake", "--check", "--json", "--dialect", "openai", cwd=tmp_path, key=None)
    assert openai.returncode == EXIT_CODES["ok"], openai.stderr
    record = json.loads(openai.stdout)
    assert (record["ok"], record["health"], record["models"]) == (True, None, 4)
    assert "compute units" not in done.stderr + openai.stderr


@contextlib.asynccontextmanager
async def api_answering(health: int, models: int) -> AsyncIterator[str]:
    """An API whose /health and /v1/models answer these statuses; yields its base_url."""

    async def answer(request: web.Request) -> web.Response:
        status = health if request.path == "/health" else models
        if status == 200:
            body = {"message": "ok"} if request.path == "/health" else {"data": []}
            return web.json_response(body)
        code = {401: "AUTH_ERROR", 500: "INTERNAL_ERROR"}[status]
        return web.json_response({"error": {"code": code, "message": "no"}}, status=status)

    app = web.Application()
    app.router.add_get("/health", answer)
    app.router.add_get("/v1/models", answer)
    async with serving(app) as root:
        yield f"{root}/v1"


@pytest.mark.parametrize(
    ("health", "models", "kind"),
    [
        (200, 200, "ok"),
        (200, 401, "authentication"),  # up, but the key is refused
        (500, 200, "server"),  # the proxy says it is not healthy
        (200, 500, "server"),
    ],
)
async def test_check_exit_codes(health: int, models: int, kind: str, tmp_path: Path) -> None:
    async with api_answering(health, models) as base_url:
        done = await acli("--check", "--base-url", base_url, "--max-retries", "0", cwd=tmp_path)
    assert done.returncode == EXIT_CODES[kind], done.stderr
    assert API_KEY not in done.stdout + done.stderr
    assert "compute units" not in done.stderr  # nothing generated, nothing to count
    if kind != "ok":
        assert done.stdout == ""
        assert len(error_lines(done.stderr)) == 1


def test_check_exit_codes_without_a_server_or_a_key(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    refused = cli(
        "--check", "--base-url", f"http://127.0.0.1:{port}/v1", "--max-retries", "0", cwd=tmp_path
    )
    assert refused.returncode == EXIT_CODES["connection"], refused.stderr
    no_key = cli("--check", cwd=tmp_path, key=None)
    assert no_key.returncode == EXIT_CODES["authentication"]
    with_prompt = cli("--check", "fox", cwd=tmp_path)
    assert with_prompt.returncode == EXIT_CODES["invalid input"]
    assert "--list-models and --check take no prompt" in with_prompt.stderr


# -- text from the server never drives the terminal -----------------------------------------------

_BIDI_CONTROLS = {"LRE", "RLE", "LRO", "RLO", "PDF", "LRI", "RLI", "FSI", "PDI"}


def unprintable(text: str) -> list[str]:
    """What a terminal would act on (or reorder text by), but the newline ending a line."""
    return [
        char
        for char in text
        if char != "\n"
        and (
            unicodedata.category(char) in {"Cc", "Zl", "Zp", "Cs"}
            or unicodedata.bidirectional(char) in _BIDI_CONTROLS
        )
    ]


@contextlib.asynccontextmanager
async def hostile_server() -> AsyncIterator[str]:
    """Answers every request with a 500 whose message and request id hold terminal escapes."""
    body = json.dumps(
        {"error": {"code": "E\x1b[2J", "message": "boom\x1b]0;owned\x07\r\x9b31m\u2028\u202eevil"}}
    ).encode()
    answer = (
        b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\n"
        b"x-request-id: id\x1b[2J\x9b\x07z\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?i)\r\ncontent-length: *([0-9]+)", head)
            await reader.readexactly(int(length[1]) if length else 0)
            writer.write(answer)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"
    finally:
        server.close()
        await server.wait_closed()


async def test_server_text_is_shown_with_its_control_characters_escaped(tmp_path: Path) -> None:
    async with hostile_server() as base_url:
        single = await acli(
            "fox", "--base-url", base_url, "--max-retries", "0", cwd=tmp_path, dev_mode=False
        )
        (tmp_path / "prompts.txt").write_text("a \x1b]0;pwned\x07 fox\nan owl\n")
        batch = await acli(
            "--prompts-file",
            "prompts.txt",
            "--base-url",
            base_url,
            "--max-retries",
            "0",
            "--json",
            "--debug",
            cwd=tmp_path,
            dev_mode=False,
        )
    assert single.returncode == batch.returncode == EXIT_CODES["server"]
    assert single.stderr.splitlines() == [
        r"atoma-images: error: 500 Internal Server Error (E\x1b[2J): "
        r"boom\x1b]0;owned\x07\x0d\x9b31m\u2028\u202eevil [request id id\x1b[2J\udc9b\x07z]",
        "atoma-images: used 0 compute units",
    ]
    # With --debug: the error lines, the traceback and the log lines, all escaped.
    assert unprintable(batch.stderr) == []
    assert unprintable(batch.stdout) == []
    assert r'atoma-images: error ("a \x1b]0;pwned\x07 fox"): 500 ' in batch.stderr
    assert "Traceback" in batch.stderr
    assert r"-> 500 (" in batch.stderr  # the client's debug log, with the request id
    records = [json.loads(line) for line in batch.stdout.splitlines()]
    # JSON keeps the text exactly, escaped by the JSON encoder.
    assert {r["prompt"] for r in records} == {"a \x1b]0;pwned\x07 fox", "an owl"}
    assert all("boom\x1b]0;owned\x07\r" in r["error"]["message"] for r in records)


# -- options --------------------------------------------------------------------------------------


def test_fake_with_a_base_url_is_refused(tmp_path: Path) -> None:
    done = cli("--fake", "fox", "--base-url", "http://127.0.0.1:9/v1", cwd=tmp_path, key=None)
    assert done.returncode == EXIT_CODES["invalid input"]
    assert done.stderr.splitlines() == [
        "atoma-images: error: --fake runs its own server: it cannot be used with --base-url"
    ]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (("--concurrency", "0"), "invalid --concurrency: got 0; allowed: an integer >= 1"),
        (("--concurrency", "-3"), "invalid --concurrency: got -3; allowed: an integer >= 1"),
        (("-n", "0"), "invalid n: got 0; allowed: an integer from 1 to 10"),
        (("--size", "8X8"), "invalid size: got '8X8'"),
        (("--timeout", "0"), "invalid timeout.total: got 0.0"),
    ],
)
def test_a_bad_option_is_one_line_for_the_whole_batch(
    threaded_server: FakeAtomaServer, tmp_path: Path, option: tuple[str, str], message: str
) -> None:
    (tmp_path / "prompts.txt").write_text("a fox\nan owl\na boat\n")
    done = cli(
        "--prompts-file",
        "prompts.txt",
        "--base-url",
        threaded_server.base_url,
        *option,
        "-o",
        "out",
        cwd=tmp_path,
    )
    assert done.returncode == EXIT_CODES["invalid input"]
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"atoma-images: error: {message}")
    assert threaded_server.posts == []
    assert not (tmp_path / "out").exists()


def test_confidential_without_the_extra_is_one_line_for_the_whole_batch(
    threaded_server: FakeAtomaServer, tmp_path: Path
) -> None:
    (tmp_path / "prompts.txt").write_text("a fox\nan owl\na boat\n")
    done = cli(
        "--prompts-file",
        "prompts.txt",
        "--base-url",
        threaded_server.base_url,
        "--confidential",
        cwd=tmp_path,
        # cryptography made unimportable, as in a base install.
        sitecustomize="import sys\nsys.modules['cryptography'] = None\n",
    )
    assert done.returncode == EXIT_CODES["invalid input"]
    (line,) = done.stderr.splitlines()
    assert "pip install 'atoma-images[confidential]'" in line
    assert threaded_server.requests == []


# -- the prompts file -----------------------------------------------------------------------------


def test_a_prompts_file_that_is_not_utf8_is_one_line_naming_the_byte(
    threaded_server: FakeAtomaServer, tmp_path: Path
) -> None:
    (tmp_path / "prompts.txt").write_bytes("a fox\nun hibou \xe9tonné\n".encode("latin-1"))
    done = cli(
        "--base-url", threaded_server.base_url, "--prompts-file", "prompts.txt", cwd=tmp_path
    )
    assert done.returncode == EXIT_CODES["invalid input"]
    assert done.stderr.splitlines() == [
        "atoma-images: error: --prompts-file prompts.txt is not UTF-8: "
        "byte 0xe9 at offset 15 (line 2)"
    ]
    assert threaded_server.posts == []


def test_a_prompts_file_with_a_bom_indented_comments_and_a_line_separator(
    threaded_server: FakeAtomaServer, tmp_path: Path
) -> None:
    lines = "\ufeffa fox\r\n   # a note\r\n\tan owl\u2028at night\r\n"
    (tmp_path / "prompts.txt").write_bytes(lines.encode())
    done = cli(
        "--base-url",
        threaded_server.base_url,
        "--prompts-file",
        "prompts.txt",
        "--concurrency",
        "1",
        "--size",
        "16x16",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert [post.json()["prompt"] for post in threaded_server.posts] == [
        "a fox",
        "an owl\u2028at night",
    ]


# -- the output directory: checked before anything is paid for, and paid images kept --------------


def images_answer(prompt: str, n: int = 1, size: int = 8) -> dict[str, object]:
    image = base64.b64encode(make_png(size, size, prompt)).decode()
    return {"created": 1, "data": [{"b64_json": image}] * n}


@pytest.mark.parametrize(
    ("output", "reasons"),
    [
        ("a-file", {"exists and is not a directory"}),
        ("a-file/out", {"Not a directory"}),
        # Exists, but no one may create a file there (root included): made is not proven.
        ("/sys", {"Permission denied", "Read-only file system"}),
    ],
)
def test_an_unusable_output_directory_is_refused_before_anything_is_sent(
    threaded_server: FakeAtomaServer, tmp_path: Path, output: str, reasons: set[str]
) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    done = cli("fox", "--base-url", threaded_server.base_url, "-o", output, cwd=tmp_path)
    assert done.returncode == EXIT_CODES["invalid input"], done.stderr
    (line,) = done.stderr.splitlines()
    prefix = f"atoma-images: error: cannot save images in {output}: "
    assert line.startswith(prefix)
    assert line.removeprefix(prefix) in reasons
    assert done.stdout == ""
    assert threaded_server.posts == []


async def test_a_write_that_fails_mid_batch_keeps_the_paid_images_elsewhere(
    tmp_path: Path,
) -> None:
    out, spare_root = tmp_path / "out", tmp_path / "tmp"
    spare_root.mkdir()

    async def generations(request: web.Request) -> web.Response:
        body = await request.json()
        if body["prompt"] == "an owl":  # the directory is replaced while the owl is drawn
            out.rename(tmp_path / "gone")
            out.write_text("now a file")
        return web.json_response(images_answer(body["prompt"], size=16))

    app = web.Application()
    app.router.add_post("/v1/images/generations", generations)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a fox\nan owl\na boat\n")
    async with serving(app) as root:
        done = await acli(
            "--base-url",
            f"{root}/v1",
            "--prompts-file",
            str(prompts),
            "--concurrency",
            "1",
            "-o",
            "out",
            cwd=tmp_path,
            extra={"TMPDIR": str(spare_root)},
        )
    assert done.returncode == EXIT_CODES["not saved"], done.stderr
    (spare,) = spare_root.iterdir()
    assert done.stdout.splitlines() == [
        "out/001-a-fox-1.png",
        f"{spare}/002-an-owl-1.png",
        f"{spare}/003-a-boat-1.png",
    ]
    assert png_size(tmp_path / "gone" / "001-a-fox-1.png") == (16, 16)
    assert [png_size(spare / name) for name in ("002-an-owl-1.png", "003-a-boat-1.png")] == [
        (16, 16),
        (16, 16),
    ]
    errors = error_lines(done.stderr)
    assert len(errors) == 2
    for line, prompt in zip(errors, ("an owl", "a boat"), strict=True):
        assert line.startswith(f'atoma-images: error ("{prompt}"): generated and billed, but ')
        assert "cannot save in out ([Errno 17] File exists: 'out')" in line
        assert line.endswith(f"saved in {spare} instead")
    assert "3/3 done" in done.stderr
    assert "Traceback" not in done.stderr


async def test_a_name_another_run_takes_meanwhile_is_not_written_over(tmp_path: Path) -> None:
    out = tmp_path / "out"

    async def generations(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"created": 1, "data": [{"url": f"http://{request.host}/fox"}]})

    async def image(request: web.Request) -> web.Response:
        # Another run of the same prompt into the same folder saves its image meanwhile.
        (out / "fox-1.png").write_bytes(b"another run's paid image")
        return web.Response(body=make_png(8, 8), content_type="image/png")

    app = web.Application()
    app.router.add_post("/v1/images/generations", generations)
    app.router.add_get("/fox", image)
    async with serving(app) as root:
        done = await acli("fox", "--base-url", f"{root}/v1", "-o", "out", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["out/fox_2-1.png"]
    assert (out / "fox-1.png").read_bytes() == b"another run's paid image"
    assert png_size(out / "fox_2-1.png") == (8, 8)


def test_saving_a_prompt_never_lists_the_output_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Listing the folder for each prompt made a long run into a big folder quadratic: what a
    # save costs must not grow with the files the folder holds.
    out = tmp_path / "out"
    out.mkdir()
    for number in range(1, 31):
        (out / f"{number:03d}-a-fox-1.png").write_bytes(b"an earlier run's")
    listed: list[str] = []
    listdir, scandir = os.listdir, os.scandir

    def counted_listdir(path: object = ".") -> object:
        listed.append(os.fspath(path))  # type: ignore[call-overload]
        return listdir(path)  # type: ignore[call-overload]

    def counted_scandir(path: object = ".") -> object:
        listed.append(os.fspath(path))  # type: ignore[call-overload]
        return scandir(path)  # type: ignore[call-overload]

    monkeypatch.setattr(os, "listdir", counted_listdir)
    monkeypatch.setattr(os, "scandir", counted_scandir)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a fox\n" * 30)
    code = main(["--fake", "--prompts-file", str(prompts), "--size", "16x16", "-o", str(out)])
    assert code == 0
    saved = sorted(capsys.readouterr().out.splitlines())
    assert saved == [f"{out}/{number:03d}-a-fox_2-1.png" for number in range(1, 31)]
    assert [path for path in listed if Path(path) == out] == []


async def test_an_image_that_cannot_be_saved_anywhere_is_reported_billed_and_lost(
    tmp_path: Path,
) -> None:
    async def generations(request: web.Request) -> web.Response:
        return web.json_response(images_answer((await request.json())["prompt"], n=2, size=64))

    app = web.Application()
    app.router.add_post("/v1/images/generations", generations)
    (tmp_path / "tmp").mkdir()
    async with serving(app) as root:
        done = await acli(
            "fox",
            "--base-url",
            f"{root}/v1",
            "--json",
            cwd=tmp_path,
            # A full disk, everywhere: no file may grow past 1000 bytes (each image is ~8 KB);
            # the directory checks, which write nothing, pass.
            sitecustomize="import resource\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))\n",
            extra={"TMPDIR": str(tmp_path / "tmp")},
        )
    assert done.returncode == EXIT_CODES["not saved"], done.stderr
    line, cost = done.stderr.splitlines()
    assert cost == "atoma-images: used 1,048,576 compute units"  # billed, though lost
    assert line.startswith("atoma-images: error: generated and billed, but cannot save in . (")
    assert "File too large" in line
    assert line.endswith(": 2 images are lost")
    (record,) = [json.loads(text) for text in done.stdout.splitlines()]
    assert record["files"] == []
    assert record["error"]["message"] == line.removeprefix("atoma-images: error: ")
    assert record["error"]["exit_code"] == EXIT_CODES["not saved"]


async def test_a_paid_image_whose_download_fails_is_reported_billed(tmp_path: Path) -> None:
    async def generations(request: web.Request) -> web.Response:
        await request.read()
        root = f"http://{request.host}"
        return web.json_response(
            {"created": 1, "data": [{"url": f"{root}/files/kept"}, {"url": f"{root}/files/gone"}]}
        )

    async def files(request: web.Request) -> web.Response:
        if request.match_info["name"] == "gone":
            return web.json_response(
                {"error": {"code": "NOT_FOUND", "message": "expired"}}, status=404
            )
        return web.Response(body=make_png(8, 8), content_type="image/png")

    app = web.Application()
    app.router.add_post("/v1/images/generations", generations)
    app.router.add_get("/files/{name}", files)
    async with serving(app) as root:
        done = await acli(
            "fox",
            "--base-url",
            f"{root}/v1",
            "--dialect",
            "openai",
            "--format",
            "url",
            "--max-retries",
            "0",
            cwd=tmp_path,
        )
    assert done.returncode == EXIT_CODES["not saved"], done.stderr
    assert done.stdout.splitlines() == ["fox-1.png"]  # the image that did download is kept
    assert png_size(tmp_path / "fox-1.png") == (8, 8)
    assert done.stderr.splitlines() == [
        "atoma-images: error: generated and billed, but image 2 could not be fetched from "
        f"{root}/files/gone (404 Not Found (NOT_FOUND): expired)",
        "atoma-images: used 1,048,576 compute units",
    ]


@pytest.mark.parametrize(
    ("fox", "shown"),
    [
        (
            "http://user:s3cret@{host}/files/fox.png",
            "http://<credentials removed>@{host}/files/fox.png",
        ),
        ("http://{host}/files/hop", "http://{host}/files/hop"),  # a redirect to such a URL
    ],
)
async def test_a_download_url_with_a_password_is_reported_billed_and_the_batch_goes_on(
    tmp_path: Path, fox: str, shown: str
) -> None:
    async def generations(request: web.Request) -> web.Response:
        body = await request.json()
        url = f"http://{request.host}/files/owl.png"
        if body["prompt"] == "a fox":  # on the API's own origin, where the key goes
            url = fox.format(host=request.host)
        return web.json_response({"created": 1, "data": [{"url": url}]})

    async def hop(request: web.Request) -> web.Response:
        raise web.HTTPFound(f"http://user:s3cret@{request.host}/files/fox.png")

    async def image(request: web.Request) -> web.Response:
        return web.Response(body=make_png(8, 8), content_type="image/png")

    app = web.Application()
    app.router.add_post("/v1/images/generations", generations)
    app.router.add_get("/files/hop", hop)
    app.router.add_get("/files/{name}.png", image)
    (tmp_path / "prompts.txt").write_text("a fox\nan owl\n")
    async with serving(app) as root:
        done = await acli(
            *("--prompts-file", "prompts.txt", "--base-url", f"{root}/v1", "--concurrency", "1"),
            cwd=tmp_path,
        )
    assert done.returncode == EXIT_CODES["not saved"], done.stderr
    assert done.stdout.splitlines() == ["002-an-owl-1.png"]
    assert png_size(tmp_path / "002-an-owl-1.png") == (8, 8)
    (error,) = error_lines(done.stderr)
    assert error.startswith(
        'atoma-images: error ("a fox"): generated and billed, but image 1 could not be fetched '
        f"from {shown.format(host=root.removeprefix('http://'))} ("
    )
    assert "user:password@" in error
    assert "s3cret" not in done.stderr
    assert done.stderr.splitlines()[-1] == "atoma-images: used 2,097,152 compute units"


# -- Ctrl-C ---------------------------------------------------------------------------------------


def started(*arguments: str, cwd: Path) -> subprocess.Popen[str]:
    """The CLI running in the background (to be interrupted), its output piped."""
    return subprocess.Popen(
        [*COMMAND, *arguments],
        cwd=cwd,
        env=environment(cwd, API_KEY),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def interrupt_once(
    process: subprocess.Popen[str],
    ready: Callable[[], bool],
    signum: signal.Signals = signal.SIGINT,
) -> tuple[str, str]:
    """Ctrl-C the CLI (or send it ``signum``) once ``ready()`` (the server has the requests);
    its stdout and stderr."""
    try:
        deadline = time.monotonic() + 60
        while not ready() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ready()
        process.send_signal(signum)
        out, err = process.communicate(timeout=60)
        return out, without_slow_step_notes(err)
    finally:
        process.kill()
        process.wait()


@contextlib.contextmanager
def stalled_downloads() -> Iterator[tuple[str, Callable[[], bool]]]:
    """A root URL for images whose downloads are taken and never answered, and a ``ready()``
    that waits (up to 60 s) for the first: the CLI then holds a billed result, unsaved."""
    held: list[socket.socket] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(60)

        def fetching() -> bool:
            if not held:
                connection, _ = listener.accept()
                held.append(connection)  # kept open: the download neither ends nor fails
                assert connection.recv(4096).startswith(b"GET /files/")
            return True

        try:
            yield f"http://127.0.0.1:{listener.getsockname()[1]}/files", fetching
        finally:
            for connection in held:
                connection.close()


def test_ctrl_c_counts_only_finished_prompts_and_says_what_may_be_billed(
    threaded_server: FakeAtomaServer, tmp_path: Path
) -> None:
    threaded_server.enqueue(Reply())  # the first prompt is drawn at once ...
    threaded_server.enqueue(Reply(delay=60), times=2)  # ... the other two take their time
    (tmp_path / "prompts.txt").write_text("a fox\nan owl\na boat\n")
    arguments = ("--prompts-file", "prompts.txt", "--base-url", threaded_server.base_url)
    process = started(*arguments, "--size", "16x16", "--concurrency", "3", cwd=tmp_path)
    assert process.stderr is not None
    assert process.stderr.readline() == "1/3 done\n"
    out, err = interrupt_once(process, lambda: len(threaded_server.posts) == 3)
    assert process.returncode == EXIT_CODES["interrupted"]
    assert len(out.splitlines()) == 1  # the one image that came back is saved
    assert err.splitlines() == [
        "atoma-images: interrupted with 1/3 prompts done; "
        "2 requests were in flight: any already sent may still be billed",
        "atoma-images: used 256 compute units; 512 more may have been billed",
    ]


# What `timeout`, `docker stop`, systemd and Kubernetes (SIGTERM) and a closed terminal
# (SIGHUP) send stops a run as Ctrl-C does: it says what was billed, and exits with 128 + the
# signal's number.
STOPS = pytest.mark.parametrize(
    ("signum", "by", "kind"),
    [
        (signal.SIGINT, "", "interrupted"),
        (signal.SIGTERM, " by SIGTERM", "terminated"),
        (signal.SIGHUP, " by SIGHUP", "hung up"),
    ],
)


@STOPS
def test_a_stop_signal_of_one_prompt_says_it_may_be_billed(
    threaded_server: FakeAtomaServer, tmp_path: Path, signum: signal.Signals, by: str, kind: str
) -> None:
    threaded_server.enqueue(Reply(delay=60))
    process = started(
        "fox", "--base-url", threaded_server.base_url, "--size", "16x16", cwd=tmp_path
    )
    out, err = interrupt_once(process, lambda: len(threaded_server.posts) == 1, signum)
    assert process.returncode == EXIT_CODES[kind] == 128 + signum
    assert out == ""
    assert err.splitlines() == [
        f"atoma-images: interrupted{by}; 1 request was in flight: if already sent, it may "
        "still be billed",
        "atoma-images: used 0 compute units; 256 more may have been billed",
    ]


@STOPS
def test_a_stop_signal_while_a_paid_image_is_fetched_says_it_was_billed_and_where_it_is(
    threaded_server: FakeAtomaServer, tmp_path: Path, signum: signal.Signals, by: str, kind: str
) -> None:
    with stalled_downloads() as (files, fetching):
        url = f"{files}/fox\x1b]0;owned\x07.png"  # the server's text: shown escaped
        threaded_server.enqueue(Reply(body={"created": 1, "data": [{"url": url}]}))
        process = started(
            "fox", "--base-url", threaded_server.base_url, "--size", "16x16", cwd=tmp_path
        )
        out, err = interrupt_once(process, fetching, signum)
    assert process.returncode == EXIT_CODES[kind] == 128 + signum
    assert out == ""
    assert err.splitlines() == [
        "atoma-images: error: generated and billed, but interrupted before its images were "
        f"saved; their URLs: {files}/fox\\x1b]0;owned\\x07.png",
        f"atoma-images: interrupted{by}; 1 prompt was generated and billed but not saved",
        "atoma-images: used 256 compute units",
    ]


def test_ctrl_c_reports_every_billed_result_not_yet_saved_in_json_too(
    threaded_server: FakeAtomaServer, tmp_path: Path
) -> None:
    (tmp_path / "prompts.txt").write_text("a fox\nan owl\n")
    with stalled_downloads() as (files, fetching):
        url = f"{files}/image.png"
        threaded_server.enqueue(Reply(body={"created": 1, "data": [{"url": url}]}), times=2)
        arguments = ("--prompts-file", "prompts.txt", "--base-url", threaded_server.base_url)
        process = started(
            *arguments, "--size", "16x16", "--concurrency", "2", "--json", "--debug", cwd=tmp_path
        )
        assert process.stderr is not None
        # --debug logs each answer as it is read. Once both are, and the first result's image
        # is being fetched, the second waits in the batch, billed and not yet handed out.
        answered = 0
        while answered < 2:
            line = process.stderr.readline()
            assert line, "the CLI ended before both prompts were answered"
            answered += " POST " in line and " -> 200 " in line
        out, err = interrupt_once(process, fetching)
    assert process.returncode == EXIT_CODES["interrupted"]
    problem = (
        f"generated and billed, but interrupted before its images were saved; their URLs: {url}"
    )
    records = sorted((json.loads(line) for line in out.splitlines()), key=lambda r: r["prompt"])
    assert [r["prompt"] for r in records] == ["a fox", "an owl"]
    for record in records:
        assert (record["files"], record["urls"]) == ([], [url])
        assert record["error"]["type"] == "NotSaved"
        assert record["error"]["message"] == problem
        assert record["error"]["exit_code"] == EXIT_CODES["not saved"]
    lines = [line for line in err.splitlines() if line.startswith("atoma-images:")]
    assert sorted(lines[:2]) == [
        f'atoma-images: error ("a fox"): {problem}',
        f'atoma-images: error ("an owl"): {problem}',
    ]
    assert lines[2:] == [
        "atoma-images: interrupted with 0/2 prompts done; "
        "2 prompts were generated and billed but not saved",
        "atoma-images: used 512 compute units",
    ]


# -- an output that cannot take what is printed ----------------------------------------------------


def test_a_path_stdout_cannot_encode_is_printed_escaped_and_every_image_kept(
    tmp_path: Path,
) -> None:
    (tmp_path / "prompts.txt").write_text("a fox\nan owl\n")
    done = subprocess.run(
        [*COMMAND, "--fake", "--prompts-file", "prompts.txt", "--size", "16x16", "-o", "dessinés"],
        cwd=tmp_path,
        # Output redirected with a narrow encoding, into a folder whose name it cannot encode.
        env=environment(tmp_path, None, extra={"PYTHONIOENCODING": "ascii"}),
        capture_output=True,
        timeout=120,
        check=False,
    )
    stderr = without_slow_step_notes(done.stderr.decode())
    assert done.returncode == 0, stderr
    assert sorted(done.stdout.decode("ascii").splitlines()) == [
        "dessin\\xe9s/001-a-fox-1.png",
        "dessin\\xe9s/002-an-owl-1.png",
    ]
    assert [
        png_size(tmp_path / "dessinés" / name) for name in ("001-a-fox-1.png", "002-an-owl-1.png")
    ] == [(16, 16), (16, 16)]
    assert stderr.splitlines()[-1] == "atoma-images: used 512 compute units"


def test_a_result_whose_report_fails_does_not_discard_the_others(
    threaded_server: FakeAtomaServer, tmp_path: Path
) -> None:
    (tmp_path / "prompts.txt").write_text("a fox\na bad one\nan owl\n")
    threaded_server.enqueue(Reply(), Reply(status=400), Reply())
    with open("/dev/full", "w") as full:  # every write fails: ENOSPC
        done = subprocess.run(
            [
                *COMMAND,
                *("--base-url", threaded_server.base_url, "--prompts-file", "prompts.txt"),
                *("--json", "--size", "16x16", "--concurrency", "1"),
            ],
            cwd=tmp_path,
            env=environment(tmp_path, API_KEY),
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            check=False,
        )
    stderr = without_slow_step_notes(done.stderr)
    assert sorted(path.name for path in tmp_path.glob("*.png")) == [
        "001-a-fox-1.png",
        "003-an-owl-1.png",
    ]
    reason = "(OSError: [Errno 28] No space left on device)"
    assert error_lines(stderr) == [
        'atoma-images: error ("a fox"): generated, billed and saved as 001-a-fox-1.png, but '
        f"not reported {reason}",
        'atoma-images: error ("a bad one"): 400 Bad Request (REQUEST_ERROR): fake REQUEST_ERROR',
        f'atoma-images: error ("a bad one"): its error was not reported in full {reason}',
        'atoma-images: error ("an owl"): generated, billed and saved as 003-an-owl-1.png, but '
        f"not reported {reason}",
    ]
    assert stderr.splitlines()[-1] == "atoma-images: used 512 compute units"
    assert done.returncode == EXIT_CODES["unexpected"], stderr


# -- a reader that goes away ----------------------------------------------------------------------


async def test_a_reader_that_goes_away_does_not_stop_the_batch(tmp_path: Path) -> None:
    stdout_gone = asyncio.Event()

    async def generations(request: web.Request) -> web.Response:
        body = await request.json()
        if body["prompt"] != "a fox":
            await stdout_gone.wait()
        return web.json_response(images_answer(body["prompt"]))

    app = web.Application()
    app.router.add_post("/v1/images/generations", generations)
    (tmp_path / "prompts.txt").write_text("a fox\nan owl\na boat\n")
    read_end, write_end = os.pipe()
    async with serving(app) as root:
        try:
            process = await asyncio.create_subprocess_exec(
                *COMMAND,
                *("--prompts-file", "prompts.txt", "--base-url", f"{root}/v1"),
                *("--concurrency", "1", "-o", "out"),
                cwd=tmp_path,
                env=environment(tmp_path, API_KEY),
                stdout=write_end,
                stderr=subprocess.PIPE,
            )
            os.close(write_end)
            # As `atoma-images ... | head -1` does: read one line, then go.
            loop = asyncio.get_running_loop()
            first = b""
            while not first.endswith(b"\n"):
                first += await loop.run_in_executor(None, os.read, read_end, 4096)
        finally:
            os.close(read_end)
            stdout_gone.set()
        _, err = await asyncio.wait_for(process.communicate(), timeout=120)
    assert first == b"out/001-a-fox-1.png\n"
    assert process.returncode == 0, err
    assert "Traceback" not in err.decode()
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == [
        "001-a-fox-1.png",
        "002-an-owl-1.png",
        "003-a-boat-1.png",
    ]


def test_the_images_of_a_call_that_partly_failed_are_saved(
    threaded_server: FakeAtomaServer, tmp_path: Path
) -> None:
    # On Atoma, -n 3 is three requests: one is refused, the two others are billed and saved.
    threaded_server.enqueue(Reply(status=400))
    done = cli(
        "fox", "-n", "3", "--size", "16x16", "--base-url", threaded_server.base_url,
        "--max-retries", "0", cwd=tmp_path,
    )  # fmt: skip
    assert done.stdout.split() == ["fox-1.png", "fox-2.png"]
    assert [png_size(tmp_path / name) for name in done.stdout.split()] == [(16, 16)] * 2
    assert done.returncode == EXIT_CODES["server"], done.stderr  # an error status
    assert "400" in error_lines(done.stderr)[0]
    assert done.stderr.splitlines()[-1] == "atoma-images: used 512 compute units"
    assert threaded_server.billed_compute_units == 512
