"""Generate an image confidentially: the prompt travels encrypted to a node in a TEE.

    pip install 'atoma-images[confidential]'
    python examples/confidential.py ["a prompt"] [output.png]

With ATOMA_API_KEY (or ATOMASDK_BEARER_AUTH) set, this calls the real Atoma API. Without a
key it starts the package's fake server in its confidential mode (a real X25519 node key,
encrypted answers) and says so, so the demo works offline too.
"""

from __future__ import annotations

import contextlib
import os
import sys

from atoma_images import ExtraNotInstalledError, ImagesClient, ResponseIntegrityError
from atoma_images.testing import FakeAtomaServer


def main(argv: list[str]) -> int:
    prompt = argv[1] if len(argv) > 1 else "a lighthouse at dawn, watercolour"
    output = argv[2] if len(argv) > 2 else "confidential.png"
    try:
        with contextlib.ExitStack() as stack:
            if os.environ.get("ATOMA_API_KEY") or os.environ.get("ATOMASDK_BEARER_AUTH"):
                client = stack.enter_context(ImagesClient())
            else:
                server = stack.enter_context(FakeAtomaServer(confidential=True))
                print(
                    f"No ATOMA_API_KEY set: using the fake confidential node at {server.base_url}"
                )
                client = stack.enter_context(ImagesClient("fake-key", base_url=server.base_url))
            # Locks a node for 512*512 compute units, encrypts the request for it, and
            # decrypts and checks the answer before returning it.
            result = client.generate(prompt, size="512x512", confidential=True)
            path = result.images[0].save(output)
    except ExtraNotInstalledError as error:
        print(error, file=sys.stderr)  # names the extra to install
        return 2
    except ResponseIntegrityError as error:
        print(f"the answer was not what the node sent: {error}", file=sys.stderr)
        return 1
    print(f"Saved {path} ({path.stat().st_size:,} bytes), decrypted and hash-checked")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
