"""Many prompts at once with generate_many: bounded concurrency, a budget, failures per prompt.

    python examples/batch.py [prompts.txt] [-o batch-out] [--concurrency 4]
                             [--max-compute-units N]

One prompt per line, read lazily. A prompt that fails is reported and the batch goes on; the
summary says how many succeeded and what the batch cost. Without ATOMA_API_KEY it runs
against the package's fake server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from atoma_images import AsyncImagesClient, Budget
from atoma_images.testing import FakeAtomaServer

SAMPLE_PROMPTS = ["a lighthouse at dawn", "an owl in the snow", "a red fox", "a paper boat"]


def read_prompts(path: Path) -> Iterator[str]:
    """The file's prompts, one at a time: a file of a million lines is never held at once."""
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                yield line.strip()


def count_prompts(path: Path) -> int:
    """How many prompts the file holds: one pass that keeps nothing, for the progress line."""
    with path.open(encoding="utf-8") as lines:
        return sum(1 for line in lines if line.strip())


async def main(
    prompts: Iterable[str], total: int, directory: Path, concurrency: int, max_units: int | None
) -> int:
    budget = None if max_units is None else Budget(max_compute_units=max_units)
    async with contextlib.AsyncExitStack() as stack:
        if os.environ.get("ATOMA_API_KEY") or os.environ.get("ATOMASDK_BEARER_AUTH"):
            client = AsyncImagesClient(budget=budget)
        else:
            server = await stack.enter_async_context(FakeAtomaServer())
            print(f"No ATOMA_API_KEY set: using the fake server at {server.base_url}")
            client = AsyncImagesClient("fake-key", base_url=server.base_url, budget=budget)
        await stack.enter_async_context(client)
        batch = client.generate_many(prompts, concurrency=concurrency, size="512x512")
        async with batch:
            async for result in batch:
                done = f"[{batch.summary.results}/{total}]"
                if result.response is not None:
                    await client.save_all(result.response, directory, f"{result.index + 1:03d}")
                    print(f"{done} ok: {result.prompt[:50]}", flush=True)
                else:
                    print(f"{done} FAILED {result.prompt[:50]!r}: {result.error}", flush=True)
        summary, usage = batch.summary, client.usage
    print(f"{summary.responses} of {summary.results} prompts saved to {directory}")
    print(
        f"compute units: {usage.compute_units:,} billed, "
        f"{usage.maybe_billed_compute_units:,} may have been billed"
    )
    return 1 if summary.errors else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompts_file", nargs="?", type=Path)
    parser.add_argument("-o", "--output-dir", type=Path, default=Path("batch-out"))
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-compute-units", type=int)
    options = parser.parse_args()
    source: Iterable[str] = SAMPLE_PROMPTS
    total = len(SAMPLE_PROMPTS)
    if options.prompts_file:
        source, total = read_prompts(options.prompts_file), count_prompts(options.prompts_file)
    limits = (options.output_dir, options.concurrency, options.max_compute_units)
    sys.exit(asyncio.run(main(source, total, *limits)))
