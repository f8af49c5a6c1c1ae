"""``python -m atoma_images``: the command line, `atoma_images.cli`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
