"""Images as files: the format from the bytes themselves, and one name per image.

Where this module fits, and why it is built so: docs/architecture.md.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["image_extension", "write_images"]


def image_extension(data: bytes) -> str:
    """``"png"``, ``"jpeg"`` or ``"webp"`` from the magic bytes; ``"bin"`` for anything else."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "bin"


def write_images(
    images: Sequence[bytes], directory: str | os.PathLike[str], stem: str
) -> list[Path]:
    """Write ``stem-1.png``, ``stem-2.jpeg``, ... into ``directory`` (made if missing)."""
    if not stem or os.sep in stem or (os.altsep and os.altsep in stem):
        raise ValueError(f"stem must be a plain file name without a directory, got {stem!r}")
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, data in enumerate(images, start=1):
        path = folder / f"{stem}-{number}.{image_extension(data)}"
        path.write_bytes(data)
        paths.append(path)
    return paths
