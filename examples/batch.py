"""Many prompts at once: bounded concurrency, progress, and failures reported per prompt.

    python examples/batch.py [prompts.txt] [-o batch-out] [--concurrency 4]

One prompt per line. A prompt that fails is reported and the batch goes on; the summary
says how many succeeded. Without ATOMA_API_KEY it runs against the package's fake server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from pathlib import Path

from atoma_images import AsyncImagesClient, AtomaImagesError
from atoma_images.testing import FakeAtomaServer

SAMPLE_PROMPTS = ["a lighthouse at dawn", "an owl in the snow", "a red fox", "a paper boat"]


async def run_batch(
    client: AsyncImagesClient, prompts: list[str], directory: Path, concurrency: int
) -> dict[str, list[Path] | AtomaImagesError]:
    """Generate every prompt, at most ``concurrency`` at a time; never stop on a failure."""
    slots = asyncio.Semaphore(concurrency)
    outcomes: dict[str, list[Path] | AtomaImagesError] = {}

    async def one(number: int, prompt: str) -> None:
        async with slots:
            try:
                result = await client.generate(prompt, size="512x512")
                outcomes[prompt] = await client.save_all(result, directory, f"{number:03d}")
            except AtomaImagesError as error:  # this prompt failed; the others go on
                outcomes[prompt] = error
        status = "failed" if isinstance(outcomes[prompt], AtomaImagesError) else "ok"
        print(f"[{len(outcomes)}/{len(prompts)}] {status}: {prompt[:50]}", flush=True)

    await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts, start=1)))
    return outcomes


async def main(prompts: list[str], directory: Path, concurrency: int) -> int:
    async with contextlib.AsyncExitStack() as stack:
        if os.environ.get("ATOMA_API_KEY") or os.environ.get("ATOMASDK_BEARER_AUTH"):
            client = AsyncImagesClient()
        else:
            server = await stack.enter_async_context(FakeAtomaServer())
            print(f"No ATOMA_API_KEY set: using the fake server at {server.base_url}")
            client = AsyncImagesClient("fake-key", base_url=server.base_url)
        await stack.enter_async_context(client)
        outcomes = await run_batch(client, prompts, directory, concurrency)
    failures = {p: o for p, o in outcomes.items() if isinstance(o, AtomaImagesError)}
    for prompt, error in failures.items():
        print(f"FAILED {prompt[:50]!r}: {error}")
    print(f"{len(outcomes) - len(failures)} of {len(outcomes)} prompts saved to {directory}")
    return 1 if failures else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompts_file", nargs="?", type=Path)
    parser.add_argument("-o", "--output-dir", type=Path, default=Path("batch-out"))
    parser.add_argument("--concurrency", type=int, default=4)
    options = parser.parse_args()
    prompts = SAMPLE_PROMPTS
    if options.prompts_file:
        lines = options.prompts_file.read_text(encoding="utf-8").splitlines()
        prompts = [line.strip() for line in lines if line.strip()]
    sys.exit(asyncio.run(main(prompts, options.output_dir, options.concurrency)))
