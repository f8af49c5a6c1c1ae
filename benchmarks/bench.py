"""atoma-images against raw aiohttp, side by side, on loopback.

    python benchmarks/bench.py                  # both profiles (about 3 + 3 minutes)
    python benchmarks/bench.py --profile scale  # only the scale profile (about 3 minutes)
    python benchmarks/bench.py --instructions   # also count instructions (valgrind, +2 min)
    python benchmarks/bench.py --quick          # a smoke run with tiny counts

The server is a minimal asyncio HTTP/1.1 server (keep-alive, canned answers) in its own
process, pinned to the last core; every client trial runs in a fresh process pinned to the
first core, so peak RSS and CPU time belong to that trial alone. A server stops by itself
when the benchmark that started it is gone.

The loopback profile: each round runs raw aiohttp and atoma-images back to back (in
alternating order); a case's ratio is the median of its rounds' ratios, which cancels the
drift of a shared or virtual machine. Cases:
  small   a ~300-byte url answer, at 1, 16 and 128 requests in flight
  large   one 1024x1024 PNG as ~1.4 MB of base64, at 1 and 16 in flight
  sync    ImagesClient called in a loop vs raw aiohttp at 1 in flight
  retry   the default RetryPolicy vs RetryPolicy(max_retries=0), small, 1 in flight
  import  `import atoma_images` vs `import aiohttp`, fresh interpreters, interleaved
With --instructions, callgrind also counts the instructions one request costs each client:
a deterministic measure, unaffected by the machine's noise.

The scale profile: a server that answers every generation after 3 s (a 64x64 PNG as
base64), and 2,000 then 8,000 calls started at once through one client: atoma-images
(max_connections=<calls>, default Timeout and RetryPolicy), raw aiohttp (one ClientSession,
TCPConnector(limit=<calls>)) and, when installed, openai-python (`pip install openai`; it
is a benchmark-only peer, never a dependency of the package). Each trial reports its wall
time, CPU time, peak RSS, the worst lateness of a 10 ms ticker (how long the event loop was
blocked) and its errors by class. Raw aiohttp and atoma-images take about 30 s in all;
openai-python takes the rest (its 8,000 calls alone take 2 to 3 minutes of CPU).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import importlib.util
import json
import os
import platform
import resource
import socket
import statistics
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent  # the checkout whose atoma_images is measured
CORES = sorted(os.sched_getaffinity(0))
CLIENT_CORE, SERVER_CORE = CORES[0], CORES[-1]
PROMPT = "a lighthouse at dawn, watercolour"
KEY = "sk-bench"


def child_env() -> dict[str, str]:
    """The environment of every trial: this checkout first on the module path.

    A script's module path starts with its own folder (benchmarks/), so a trial would
    otherwise import whichever atoma_images is installed; with an editable install of
    another checkout, the benchmark would measure that checkout's code.
    """
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{path}" if path else str(ROOT)}


def package_under_test() -> str:
    """Where the trials import atoma_images from, as they see it."""
    command = [sys.executable, "-c", "import atoma_images; print(atoma_images.__file__)"]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=60, check=True, env=child_env()
    )
    return str(Path(done.stdout.strip()).parent)


# -- the server ---------------------------------------------------------------------------


def noise_png(width: int, height: int) -> bytes:
    """A real greyscale PNG that does not compress: about width*height bytes."""
    rows = b"".join(b"\x00" + os.urandom(width) for _ in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows, 0))
        + chunk(b"IEND", b"")
    )


def canned(body: dict[str, Any]) -> bytes:
    payload = json.dumps(body).encode()
    head = (
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    )
    return head.encode() + payload


def answers() -> dict[bytes, bytes]:
    small = {
        "created": 1732400000,
        "data": [
            {
                "url": "https://images.example/image-generation-6a0c1b9e-ec3d-4b0e-9b1a-3f1d.png",
                "revised_prompt": PROMPT,
            }
        ],
        "signature": "c2lnbmF0dXJlLW9mLXRoZS1ub2Rl",
        "response_hash": "aGFzaC1vZi10aGUtcmVzcG9uc2U=",
    }
    png = base64.b64encode(noise_png(1024, 1024)).decode()
    large = {**small, "data": [{"url": None, "b64_json": "data:image/png;base64," + png}]}
    thumbnail = base64.b64encode(noise_png(64, 64)).decode()
    scale = {"created": 1732400000, "data": [{"b64_json": thumbnail, "revised_prompt": PROMPT}]}
    return {
        b"/small/v1/images/generations": canned(small),
        b"/large/v1/images/generations": canned(large),
        b"/scale/v1/images/generations": canned(scale),
    }


class Answer(asyncio.Protocol):
    """Reads requests (headers + Content-Length body) and writes the canned answer.

    With a latency, each answer is written that many seconds after its request arrived:
    a generation's wait, without holding anything but a timer.
    """

    def __init__(self, table: dict[bytes, bytes], latency: float) -> None:
        self.table = table
        self.latency = latency
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = bytes(self.buffer[: end + 2]).lower()  # keep the last header's CRLF
            start = head.find(b"content-length:")
            length = int(head[start + 15 : head.find(b"\r\n", start)]) if start >= 0 else 0
            if len(self.buffer) < end + 4 + length:
                return
            path = head.split(b" ", 2)[1]
            answer = self.table.get(path, b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            if self.latency:
                asyncio.get_running_loop().call_later(self.latency, self.reply, answer)
            else:
                self.reply(answer)
            del self.buffer[: end + 4 + length]

    def reply(self, answer: bytes) -> None:
        assert self.transport is not None
        if not self.transport.is_closing():  # the client may have given up meanwhile
            self.transport.write(answer)


SERVER_LIFETIME = 3 * 3600  # seconds; a last resort: the server also stops with its parent


def serve(port_file: Path, latency: float, backlog: int) -> None:
    """Serve the canned answers on 127.0.0.1 until the parent process is gone."""
    os.sched_setaffinity(0, {SERVER_CORE})
    raise_open_files_limit(backlog + 64)
    table = answers()
    parent = os.getppid()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: Answer(table, latency), "127.0.0.1", 0, backlog=backlog
        )
        port = server.sockets[0].getsockname()[1]
        port_file.write_text(str(port))  # noqa: ASYNC240 - once, before serving
        deadline = loop.time() + SERVER_LIFETIME
        # Polled: nothing signals a parent's death (a killed parent cannot terminate us).
        while os.getppid() == parent and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.5)
        server.close()

    asyncio.run(main())


def raise_open_files_limit(needed: int) -> None:
    """Lift the soft limit on open files to the hard one: 8,000 sockets need more than 1,024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise SystemExit(f"{needed} open files are needed; the hard limit is {hard} (ulimit -Hn)")


# -- one trial, in its own process ---------------------------------------------------------

Timing = tuple[float, float]  # (requests per second, CPU seconds per request)


async def raw_aiohttp(url: str, total: int, concurrency: int, warmup: int) -> Timing:
    import aiohttp

    body = {
        "model": "black-forest-labs/FLUX.1-schnell",
        "prompt": PROMPT,
        "n": 1,
        "size": "1024x1024",
    }
    headers = {"Authorization": f"Bearer {KEY}"}
    async with aiohttp.ClientSession() as session:

        async def one() -> None:
            async with session.post(url, json=body, headers=headers) as response:
                await response.json()

        return await drive(one, total, concurrency, warmup)


async def ours(base_url: str, total: int, concurrency: int, warmup: int, retries: bool) -> Timing:
    from atoma_images import AsyncImagesClient, RetryPolicy

    policy = None if retries else RetryPolicy(max_retries=0)
    async with AsyncImagesClient(KEY, base_url=base_url, retries=policy) as client:

        async def one() -> None:
            await client.generate(PROMPT)

        return await drive(one, total, concurrency, warmup)


async def drive(one: Any, total: int, concurrency: int, warmup: int) -> Timing:
    for _ in range(warmup):  # connections, caches
        await one()
    per_worker = max(1, total // concurrency)

    async def worker() -> None:
        for _ in range(per_worker):
            await one()

    cpu, started = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    done = per_worker * concurrency
    return done / (time.perf_counter() - started), (time.process_time() - cpu) / done


def sync_ours(base_url: str, total: int, warmup: int) -> Timing:
    from atoma_images import ImagesClient

    with ImagesClient(KEY, base_url=base_url) as client:
        for _ in range(warmup):
            client.generate(PROMPT)
        cpu, started = time.process_time(), time.perf_counter()  # both threads' CPU
        for _ in range(total):
            client.generate(PROMPT)
        return total / (time.perf_counter() - started), (time.process_time() - cpu) / total


def trial(impl: str, size: str, concurrency: int, total: int, port: int, warmup: int) -> None:
    os.sched_setaffinity(0, {CLIENT_CORE})
    base_url = f"http://127.0.0.1:{port}/{size}/v1"
    if impl == "raw":
        run = raw_aiohttp(base_url + "/images/generations", total, concurrency, warmup)
        rate, cpu = asyncio.run(run)
    elif impl in ("ours", "ours-no-retry"):
        run = ours(base_url, total, concurrency, warmup, retries=impl == "ours")
        rate, cpu = asyncio.run(run)
    else:
        rate, cpu = sync_ours(base_url, total, warmup)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"rps": rate, "cpu_ms": cpu * 1000, "rss_mb": rss}))


# -- the scale profile: one trial, in its own process ----------------------------------------

MODEL = "black-forest-labs/FLUX.1-schnell"
SCALE_SIZE = "64x64"
TICK = 0.01  # seconds between the ticker's wake-ups
# Beyond the server's latency, the time a trial's calls may take before the rest are
# counted as unfinished: connecting 8,000 sockets takes seconds, not minutes.
SCALE_SLACK = 240.0
SCALE_CALLS = (2000, 8000)
SCALE_LATENCY = 3.0  # seconds; a real generation takes 10 to 90
SCALE_REPEAT = 1
QUICK_CALLS = (50, 200)
QUICK_LATENCY = 0.5
# The targets atoma-images is held to against raw aiohttp at scale.
TARGET_CPU_RATIO = 1.10
TARGET_EXTRA_RSS_MB = 25.0
CLIENT_NAMES = {"raw": "raw aiohttp", "ours": "atoma-images", "openai": "openai-python"}
OPENAI_INSTALL = (
    "pip install openai (a peer for the benchmark only; atoma-images does not depend on it)"
)


class WrongAnswer(Exception):
    """A call returned, but not the one image the server sent."""


Call = Callable[[], Awaitable[None]]


@contextlib.asynccontextmanager
async def scale_client(impl: str, calls: int, base_url: str) -> AsyncIterator[Call]:
    """One client of ``impl`` sized for ``calls`` at once, and its call: one generation."""
    if impl == "raw":
        import aiohttp

        body = {"model": MODEL, "prompt": PROMPT, "n": 1, "size": SCALE_SIZE}
        headers = {"Authorization": f"Bearer {KEY}"}
        url = base_url + "/images/generations"
        connector = aiohttp.TCPConnector(limit=calls)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def raw_call() -> None:
                async with session.post(url, json=body, headers=headers) as response:
                    response.raise_for_status()
                    answer = await response.json()
                if len(answer["data"]) != 1:
                    raise WrongAnswer(answer)

            yield raw_call
    elif impl == "ours":
        from atoma_images import AsyncImagesClient

        async with AsyncImagesClient(KEY, base_url=base_url, max_connections=calls) as client:

            async def our_call() -> None:
                response = await client.generate(PROMPT, size=SCALE_SIZE)
                if len(response.images) != 1:
                    raise WrongAnswer(response)

            yield our_call
    else:
        import openai

        httpx = openai_http_module()
        limits = httpx.Limits(max_connections=calls, max_keepalive_connections=calls)
        async with openai.AsyncOpenAI(
            base_url=base_url,
            api_key=KEY,
            http_client=httpx.AsyncClient(limits=limits),
            max_retries=openai.DEFAULT_MAX_RETRIES,
        ) as peer:

            async def openai_call() -> None:
                response = await peer.images.generate(
                    model=MODEL, prompt=PROMPT, n=1, size=SCALE_SIZE
                )
                if len(response.data or ()) != 1:
                    raise WrongAnswer(response)

            yield openai_call


def openai_http_module() -> Any:
    """The httpx that openai-python is built on: httpx2 since openai 3, httpx before."""
    try:
        import httpx2
    except ImportError:
        import httpx

        return httpx
    return httpx2


async def scale_calls(impl: str, calls: int, base_url: str, limit: float) -> dict[str, Any]:
    """Start ``calls`` generations at once; wait at most ``limit`` seconds for them."""
    async with scale_client(impl, calls, base_url) as call:
        loop = asyncio.get_running_loop()
        worst_lag = 0.0
        ticking = True

        async def ticker() -> None:
            nonlocal worst_lag
            while ticking:
                due = loop.time() + TICK
                await asyncio.sleep(TICK)
                worst_lag = max(worst_lag, loop.time() - due)

        ticker_task = asyncio.ensure_future(ticker())
        await asyncio.sleep(TICK)  # the ticker is running before the first call starts
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        cpu, started = time.process_time(), time.perf_counter()
        tasks = [asyncio.ensure_future(call()) for _ in range(calls)]
        finished, unfinished = await asyncio.wait(tasks, timeout=limit)
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        ticking = False
        await ticker_task
        for task in unfinished:
            task.cancel()
        await asyncio.gather(*unfinished, return_exceptions=True)
    errors: collections.Counter[str] = collections.Counter()
    examples: dict[str, str] = {}
    for task in finished:
        error = task.exception()
        if error is not None:
            name = type(error).__name__
            errors[name] += 1
            examples.setdefault(name, str(error)[:300])
    if unfinished:
        errors[f"unfinished after {limit:g} s"] = len(unfinished)
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "rss_mb": rss,
        "rss_before_mb": rss_before,
        "lag_ms": worst_lag * 1000,
        "errors": dict(errors),
        "examples": examples,
    }


def scale_trial(impl: str, calls: int, port: int, latency: float) -> None:
    os.sched_setaffinity(0, {CLIENT_CORE})
    raise_open_files_limit(calls + 64)
    base_url = f"http://127.0.0.1:{port}/scale/v1"
    print(json.dumps(asyncio.run(scale_calls(impl, calls, base_url, latency + SCALE_SLACK))))


# -- the run --------------------------------------------------------------------------------

CASES = [
    # (label, size, concurrency, contender, baseline, requests in the full run)
    ("async small C=1", "small", 1, "ours", "raw", 2000),
    ("async small C=16", "small", 16, "ours", "raw", 3200),
    ("async small C=128", "small", 128, "ours", "raw", 3840),
    ("async large C=1", "large", 1, "ours", "raw", 250),
    ("async large C=16", "large", 16, "ours", "raw", 480),
    ("sync sequential", "small", 1, "sync", "raw", 2000),
    ("retry policy on vs off", "small", 1, "ours", "ours-no-retry", 2000),
]
WARMUP = 50


def trial_command(
    impl: str, size: str, concurrency: int, total: int, port: int, warmup: int
) -> list[str]:
    arguments = [impl, size, str(concurrency), str(total), str(port), str(warmup)]
    return [sys.executable, str(HERE), "--trial", *arguments]


def run_trial(impl: str, size: str, concurrency: int, total: int, port: int) -> dict[str, float]:
    command = trial_command(impl, size, concurrency, total, port, min(WARMUP, total))
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=300, check=True, env=child_env()
    )
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def import_times(repeat: int) -> dict[str, float]:
    """Median ms to import aiohttp and atoma_images in fresh interpreters, interleaved.

    An installed package has its .pyc files; PYTHONDONTWRITEBYTECODE (set on some CI
    machines) would make every import compile from source, which measures the compiler.
    """
    env = {k: v for k, v in child_env().items() if k != "PYTHONDONTWRITEBYTECODE"}
    code = "import time; t = time.perf_counter(); import {}; print(time.perf_counter() - t)"

    def once(module: str) -> float:
        command = [sys.executable, "-c", code.format(module)]
        done = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
        return float(done.stdout) * 1000

    modules = ("aiohttp", "atoma_images")
    for module in modules:
        once(module)  # writes the caches
    samples: dict[str, list[float]] = {module: [] for module in modules}
    for _ in range(repeat):
        for module in modules:
            samples[module].append(once(module))
    paired = zip(samples["aiohttp"], samples["atoma_images"], strict=True)
    medians = {module: statistics.median(values) for module, values in samples.items()}
    return {**medians, "extra": statistics.median(ours - theirs for theirs, ours in paired)}


INSTRUCTION_CASES = [
    # (label, size, baseline, contender, the two request counts whose difference is taken)
    ("small", "small", "raw", "ours", (100, 200)),
    ("large", "large", "raw", "ours", (20, 40)),
    # The same code on a call that succeeds: counting shows it where timing cannot.
    ("retry policy on vs off (small)", "small", "ours-no-retry", "ours", (100, 200)),
]


def instructions_per_request(impl: str, size: str, counts: tuple[int, int], port: int) -> float:
    """Instructions one request costs the client, counted by callgrind.

    Two runs of different lengths without warm-up; their difference cancels start-up.
    """
    collected = []
    for total in counts:
        command = [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            *trial_command(impl, size, 1, total, port, 0),
        ]
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=900, check=True, env=child_env()
        )
        collected.append(int(done.stderr.split("Collected :")[1].split()[0]))
    return (collected[1] - collected[0]) / (counts[1] - counts[0])


@contextlib.contextmanager
def started_server(latency: float, backlog: int) -> Iterator[int]:
    """The benchmark server in its own process; yields its port and stops it afterwards."""
    port_file = Path(os.environ.get("TMPDIR", "/tmp")) / f"atoma-bench-{os.getpid()}.port"
    port_file.unlink(missing_ok=True)
    command = [sys.executable, str(HERE), "--serve", str(port_file)]
    command += ["--latency", str(latency), "--backlog", str(backlog)]
    server = subprocess.Popen(command)
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text():
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("the benchmark server did not start")
            time.sleep(0.05)
        port = int(port_file.read_text())
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        yield port
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=30)
        port_file.unlink(missing_ok=True)


def run_loopback(options: argparse.Namespace) -> None:
    repeat = 1 if options.quick else options.repeat
    with started_server(latency=0.0, backlog=1024) as port:
        results: dict[tuple[str, str], list[dict[str, float]]] = {}
        for round_ in range(repeat):
            for label, size, concurrency, contender, baseline, total in CASES:
                count = 40 if options.quick else total
                # Back to back, in alternating order, so drift on the machine hits both.
                pair = (baseline, contender) if round_ % 2 == 0 else (contender, baseline)
                for impl in pair:
                    results.setdefault((label, impl), []).append(
                        run_trial(impl, size, concurrency, count, port)
                    )
        imports = import_times(3 if options.quick else 11)
        instructions = {}
        if options.instructions:
            for label, size, baseline, contender, counts in INSTRUCTION_CASES:
                for impl in (baseline, contender):
                    instructions[(label, impl)] = instructions_per_request(impl, size, counts, port)
    report(results, imports, instructions, quick=options.quick, repeat=repeat)


def run_scale(options: argparse.Namespace) -> None:
    calls_cases = options.calls or (QUICK_CALLS if options.quick else SCALE_CALLS)
    latency = options.latency
    if latency is None:
        latency = QUICK_LATENCY if options.quick else SCALE_LATENCY
    repeat = 1 if options.quick else options.scale_repeat
    impls = ["raw", "ours"]
    if importlib.util.find_spec("openai") is None:
        skipped = (
            f"openai-python is not installed here, so it was left out; to add it: {OPENAI_INSTALL}"
        )
    else:
        impls.append("openai")
        skipped = ""
    results: dict[tuple[int, str], list[dict[str, Any]]] = {}
    # The backlog is also the number of connections the server gets ready to hold.
    with started_server(latency, backlog=max(calls_cases)) as port:
        for round_ in range(repeat):
            for calls in calls_cases:
                for impl in impls if round_ % 2 == 0 else impls[::-1]:
                    results.setdefault((calls, impl), []).append(
                        run_scale_trial(impl, calls, port, latency)
                    )
    scale_report(results, calls_cases, impls, latency=latency, repeat=repeat, quick=options.quick)
    if skipped:
        print(f"\n{skipped}")


def run_scale_trial(impl: str, calls: int, port: int, latency: float) -> dict[str, Any]:
    """One scale trial in a fresh process: its figures, or why it failed."""
    command = [sys.executable, str(HERE), "--scale-trial", impl, str(calls), str(port)]
    limit = latency + SCALE_SLACK + 120  # the calls' own limit, plus start-up and closing
    try:
        done = subprocess.run(
            [*command, str(latency)],
            capture_output=True,
            text=True,
            timeout=limit,
            check=False,
            env=child_env(),
        )
    except subprocess.TimeoutExpired:
        return {"failed": f"the trial process did not finish within {limit:g} s"}
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"failed": f"the trial process exited with {done.returncode}: {last[:300]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> int:
    parser = argparse.ArgumentParser(description="atoma-images vs raw aiohttp on loopback")
    parser.add_argument(
        "--profile",
        choices=("all", "loopback", "scale"),
        default="all",
        help="loopback: request rates at 1 to 128 in flight; scale: thousands of slow calls "
        "at once (default: both)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny counts, one round (smoke test)")
    parser.add_argument("--repeat", type=int, default=9, help="rounds of paired loopback trials")
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="also count instructions per request with valgrind (deterministic; ~2 minutes)",
    )
    parser.add_argument(
        "--calls",
        type=int,
        nargs="+",
        help=f"scale: calls at once, one case each (default: {' '.join(map(str, SCALE_CALLS))})",
    )
    parser.add_argument(
        "--latency",
        type=float,
        help=f"scale: seconds the server takes per generation (default: {SCALE_LATENCY:g})",
    )
    parser.add_argument(
        "--scale-repeat", type=int, default=SCALE_REPEAT, help="rounds of scale trials"
    )
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--backlog", type=int, default=1024, help=argparse.SUPPRESS)
    parser.add_argument("--trial", nargs=6, help=argparse.SUPPRESS)
    parser.add_argument("--scale-trial", nargs=4, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.serve:
        serve(options.serve, options.latency or 0.0, options.backlog)
        return 0
    if options.trial:
        impl, size, *numbers = options.trial
        concurrency, total, port, warmup = map(int, numbers)
        trial(impl, size, concurrency, total, port, warmup)
        return 0
    if options.scale_trial:
        impl, calls, port, latency = options.scale_trial
        scale_trial(impl, int(calls), int(port), float(latency))
        return 0

    print(f"atoma-images under test: {package_under_test()}")
    if options.profile in ("all", "loopback"):
        started = time.monotonic()
        run_loopback(options)
        print(f"\n(the loopback profile took {time.monotonic() - started:.0f} s)")
    if options.profile in ("all", "scale"):
        started = time.monotonic()
        run_scale(options)
        print(f"\n(the scale profile took {time.monotonic() - started:.0f} s)")
    return 0


def report(
    results: dict[tuple[str, str], list[dict[str, float]]],
    imports: dict[str, float],
    instructions: dict[tuple[str, str], float],
    *,
    quick: bool,
    repeat: int,
) -> None:
    def median(label: str, impl: str, key: str) -> float:
        return statistics.median(r[key] for r in results[(label, impl)])

    print(
        f"\nloopback, {platform.python_implementation()} {platform.python_version()}, "
        f"{platform.machine()}, {os.cpu_count()} cores; server on core {SERVER_CORE} "
        f"(minimal asyncio HTTP/1.1), client on core {CLIENT_CORE}; "
        f"medians of {repeat} rounds; ratio = median of the rounds' paired ratios"
        f"{' (QUICK: counts too small to mean much)' if quick else ''}\n"
    )
    print(
        "| case | baseline | req/s | CPU ms/req | peak RSS MB "
        "| atoma-images req/s | CPU ms/req | peak RSS MB | ratio |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, _, _, contender, baseline, _ in CASES:
        row = [label, "policy off" if baseline == "ours-no-retry" else "raw aiohttp"]
        for impl in (baseline, contender):
            row += [
                f"{median(label, impl, 'rps'):,.0f}",
                f"{median(label, impl, 'cpu_ms'):.3f}",
                f"{median(label, impl, 'rss_mb'):.1f}",
            ]
        pairs = zip(results[(label, contender)], results[(label, baseline)], strict=True)
        ratio = statistics.median(ours["rps"] / theirs["rps"] for ours, theirs in pairs)
        print("| " + " | ".join([*row, f"{ratio:.2f}x"]) + " |")
    print(
        f"\nimport aiohttp: {imports['aiohttp']:.0f} ms; import atoma_images (aiohttp "
        f"included): {imports['atoma_images']:.0f} ms; paired difference {imports['extra']:+.0f} ms"
    )
    if instructions:
        print("\n| instructions per request, C=1 (callgrind) | baseline | atoma-images | ratio |")
        print("|---|---:|---:|---:|")
        for label, _, baseline, contender, _ in INSTRUCTION_CASES:
            theirs, ours = instructions[(label, baseline)], instructions[(label, contender)]
            print(f"| {label} | {theirs:,.0f} | {ours:,.0f} | {theirs / ours:.2f}x |")


def scale_report(
    results: dict[tuple[int, str], list[dict[str, Any]]],
    calls_cases: tuple[int, ...],
    impls: list[str],
    *,
    latency: float,
    repeat: int,
    quick: bool,
) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    somaxconn = Path("/proc/sys/net/core/somaxconn")
    cap = somaxconn.read_text().strip() if somaxconn.exists() else "unknown"
    rounds = (
        f"medians of {repeat} rounds, ratios the median of the rounds' paired ratios"
        if repeat > 1
        else "one round"
    )
    print(
        f"\nscale, {platform.python_implementation()} {platform.python_version()}, "
        f"{os.cpu_count()} cores; the server (core {SERVER_CORE}) answers every generation "
        f"after {latency:g} s with a {SCALE_SIZE} PNG as base64; all calls start at once "
        f"through one client, in a fresh process per trial (core {CLIENT_CORE}); open files "
        f"raised to the hard limit ({hard}); listen backlog {max(calls_cases)} (the kernel "
        f"caps it at net.core.somaxconn = {cap}); {rounds}"
        f"{' (QUICK: counts too small to mean much)' if quick else ''}\n"
        f"targets for atoma-images: CPU <= {TARGET_CPU_RATIO:.2f}x raw aiohttp, "
        f"peak RSS <= raw + {TARGET_EXTRA_RSS_MB:g} MB, no errors\n"
    )
    print(
        "| calls | client | wall s | CPU s | CPU vs raw | peak RSS MB (before the calls) "
        "| RSS vs raw "
        "| worst loop lag ms | errors | targets |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---|---|")
    examples: list[str] = []
    for calls in calls_cases:
        baseline = results[(calls, "raw")]
        for impl in impls:
            runs = results[(calls, impl)]
            row = [f"{calls:,}", CLIENT_NAMES[impl]]
            failed = [run["failed"] for run in runs if "failed" in run]
            if failed or any("failed" in run for run in baseline):
                why = f"trial failed: {failed[0]}" if failed else "the raw aiohttp trial failed"
                print("| " + " | ".join([*row, *["-"] * 6, why, "-"]) + " |")
                continue
            errors: collections.Counter[str] = collections.Counter()
            for run in runs:
                errors.update(run["errors"])
                for name, message in run["examples"].items():
                    examples.append(f"{calls:,} calls, {CLIENT_NAMES[impl]}, {name}: {message}")
            pairs = list(zip(runs, baseline, strict=True))
            cpu_ratio = statistics.median(run["cpu_s"] / raw["cpu_s"] for run, raw in pairs)
            extra_rss = statistics.median(run["rss_mb"] - raw["rss_mb"] for run, raw in pairs)
            row += [
                f"{statistics.median(run['wall_s'] for run in runs):.2f}",
                f"{statistics.median(run['cpu_s'] for run in runs):.2f}",
                "-" if impl == "raw" else f"{cpu_ratio:.2f}x",
                f"{statistics.median(run['rss_mb'] for run in runs):.1f} "
                f"({statistics.median(run['rss_before_mb'] for run in runs):.1f})",
                "-" if impl == "raw" else f"{extra_rss:+.1f} MB",
                f"{statistics.median(run['lag_ms'] for run in runs):.0f}",
                ", ".join(f"{name} {count}" for name, count in sorted(errors.items())) or "none",
            ]
            if impl == "ours":
                met = [
                    f"CPU {'met' if cpu_ratio <= TARGET_CPU_RATIO else 'MISSED'}",
                    f"RSS {'met' if extra_rss <= TARGET_EXTRA_RSS_MB else 'MISSED'}",
                    f"errors {'met' if not errors else 'MISSED'}",
                ]
                row.append(", ".join(met))
            else:
                row.append("baseline" if impl == "raw" else "peer (no target)")
            print("| " + " | ".join(row) + " |")
    for example in examples:
        print(f"\n{example}")


if __name__ == "__main__":
    sys.exit(main())
