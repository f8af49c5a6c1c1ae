"""atoma-images against raw aiohttp, side by side, on loopback.

    python benchmarks/bench.py                  # the full run (about 3 minutes)
    python benchmarks/bench.py --instructions   # also count instructions (valgrind, +2 min)
    python benchmarks/bench.py --quick          # a smoke run with tiny counts

The server is a minimal asyncio HTTP/1.1 server (keep-alive, canned answers) in its own
process, pinned to the last core; every client trial runs in a fresh process pinned to the
first core, so peak RSS and CPU time belong to that trial alone. Each round runs raw aiohttp
and atoma-images back to back (in alternating order); a case's ratio is the median of its
rounds' ratios, which cancels the drift of a shared or virtual machine.

Cases:
  small   a ~300-byte url answer, at 1, 16 and 128 requests in flight
  large   one 1024x1024 PNG as ~1.4 MB of base64, at 1 and 16 in flight
  sync    ImagesClient called in a loop vs raw aiohttp at 1 in flight
  retry   the default RetryPolicy vs RetryPolicy(max_retries=0), small, 1 in flight
  import  `import atoma_images` vs `import aiohttp`, fresh interpreters, interleaved
With --instructions, callgrind also counts the instructions one request costs each client:
a deterministic measure, unaffected by the machine's noise.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
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
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
CORES = sorted(os.sched_getaffinity(0))
CLIENT_CORE, SERVER_CORE = CORES[0], CORES[-1]
PROMPT = "a lighthouse at dawn, watercolour"
KEY = "sk-bench"


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
    return {
        b"/small/v1/images/generations": canned(small),
        b"/large/v1/images/generations": canned(large),
    }


class Answer(asyncio.Protocol):
    """Reads requests (headers + Content-Length body) and writes the canned answer."""

    def __init__(self, table: dict[bytes, bytes]) -> None:
        self.table = table
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
            assert self.transport is not None
            self.transport.write(
                self.table.get(path, b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            )
            del self.buffer[: end + 4 + length]


def serve(port_file: Path) -> None:
    os.sched_setaffinity(0, {SERVER_CORE})
    table = answers()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: Answer(table), "127.0.0.1", 0, backlog=1024)
        port = server.sockets[0].getsockname()[1]
        port_file.write_text(str(port))  # noqa: ASYNC240 - once, before serving
        await asyncio.Event().wait()

    asyncio.run(main())


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
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def import_times(repeat: int) -> dict[str, float]:
    """Median ms to import aiohttp and atoma_images in fresh interpreters, interleaved.

    An installed package has its .pyc files; PYTHONDONTWRITEBYTECODE (set on some CI
    machines) would make every import compile from source, which measures the compiler.
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
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
        done = subprocess.run(command, capture_output=True, text=True, timeout=900, check=True)
        collected.append(int(done.stderr.split("Collected :")[1].split()[0]))
    return (collected[1] - collected[0]) / (counts[1] - counts[0])


def main() -> int:
    parser = argparse.ArgumentParser(description="atoma-images vs raw aiohttp on loopback")
    parser.add_argument("--quick", action="store_true", help="tiny counts, one round (smoke test)")
    parser.add_argument("--repeat", type=int, default=9, help="rounds of paired trials")
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="also count instructions per request with valgrind (deterministic; ~2 minutes)",
    )
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--trial", nargs=6, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.serve:
        serve(options.serve)
        return 0
    if options.trial:
        impl, size, *numbers = options.trial
        concurrency, total, port, warmup = map(int, numbers)
        trial(impl, size, concurrency, total, port, warmup)
        return 0

    repeat = 1 if options.quick else options.repeat
    port_file = Path(os.environ.get("TMPDIR", "/tmp")) / f"atoma-bench-{os.getpid()}.port"
    server = subprocess.Popen([sys.executable, str(HERE), "--serve", str(port_file)])
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text():
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("the benchmark server did not start")
            time.sleep(0.05)
        port = int(port_file.read_text())
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
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
    finally:
        server.terminate()
        server.wait()
        port_file.unlink(missing_ok=True)
    report(results, imports, instructions, quick=options.quick, repeat=repeat)
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


if __name__ == "__main__":
    sys.exit(main())
