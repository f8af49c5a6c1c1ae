"""Generate one image and save it as a PNG.

    python examples/quickstart.py ["a prompt"] [output.png]

With ATOMA_API_KEY (or ATOMASDK_BEARER_AUTH) set, this calls the real Atoma API. Without a
key it starts the package's fake server and says so, so the demo works offline too.
"""

from __future__ import annotations

import contextlib
import os
import sys

from atoma_images import ImagesClient
from atoma_images.testing import FakeAtomaServer


def main(argv: list[str]) -> int:
    prompt = argv[1] if len(argv) > 1 else "a lighthouse at dawn, watercolour"
    output = argv[2] if len(argv) > 2 else "quickstart.png"
    with contextlib.ExitStack() as stack:
        if os.environ.get("ATOMA_API_KEY") or os.environ.get("ATOMASDK_BEARER_AUTH"):
            client = stack.enter_context(ImagesClient())
        else:
            server = stack.enter_context(FakeAtomaServer())
            print(f"No ATOMA_API_KEY set: using the built-in fake server at {server.base_url}")
            client = stack.enter_context(ImagesClient("fake-key", base_url=server.base_url))
        result = client.generate(prompt, size="1024x1024")
        path = result.images[0].save(output)
    print(f"Saved {path} ({path.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
