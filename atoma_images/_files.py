"""Images as files: the format from the bytes themselves, and one name per image."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["image_extension", "write_images", "write_new_images"]


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
    folder = _folder(directory, stem)
    paths = []
    for number, data in enumerate(images, start=1):
        path = folder / _name(stem, number, data)
        path.write_bytes(data)
        paths.append(path)
    return paths


def write_new_images(
    images: Sequence[bytes], directory: str | os.PathLike[str], stem: str
) -> list[Path]:
    """Write each image to a file of its own, never over an existing file.

    Named as `write_images` names them, each file is created exclusively (``open(path,
    "xb")``): when a name is taken, by anything (another run, another program), that image
    and the next ones go to the next stem, ``stem_2``, ``stem_3``, ... Listing ``directory``
    would cost a run time in the number of files it holds, and would still race with
    whatever writes there; the exclusive create is the one check that cannot.
    """
    folder = _folder(directory, stem)
    paths = []
    tries = 1
    for number, data in enumerate(images, start=1):
        while True:
            path = folder / _name(stem if tries == 1 else f"{stem}_{tries}", number, data)
            try:
                with path.open("xb") as file:
                    file.write(data)
            except FileExistsError:
                tries += 1
                continue
            paths.append(path)
            break
    return paths


def _folder(directory: str | os.PathLike[str], stem: str) -> Path:
    """``directory``, made if missing, once ``stem`` is known to be a plain file name."""
    if not stem or os.sep in stem or (os.altsep and os.altsep in stem):
        raise ValueError(f"stem must be a plain file name without a directory, got {stem!r}")
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _name(stem: str, number: int, data: bytes) -> str:
    return f"{stem}-{number}.{image_extension(data)}"
