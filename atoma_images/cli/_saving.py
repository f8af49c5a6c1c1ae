"""Where the command line keeps a paid image: a file of its own, created exclusively, and a
spare directory when the output directory refuses it, so that a billed image is never lost
silently and never written over another.
"""

from __future__ import annotations

import asyncio
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

from atoma_images._checks import without_credentials
from atoma_images._client import AsyncImagesClient
from atoma_images._errors import AtomaImagesError
from atoma_images._files import write_new_images
from atoma_images._models import ImagesResponse

__all__ = ["SpareDirectory", "keep_images", "stem_for"]


def stem_for(prompt: str, index: int | None) -> str:
    """A file stem from the prompt, and its place in the batch when there is one.

    Images are saved as ``<stem>-<n>.<ext>``; `write_new_images` takes ``<stem>_2`` when an
    earlier run has the name (the slug itself never contains ``_``), so nothing is
    overwritten, and the folder is never listed: a save costs the same however many files
    the folder holds.
    """
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:40].strip("-") or "image"
    return slug if index is None else f"{index + 1:03d}-{slug}"


class SpareDirectory:
    """A temporary directory, made on first use, for paid images the output directory refused."""

    def __init__(self) -> None:
        self.path: Path | None = None

    def save(self, images: Sequence[bytes], stem: str) -> list[Path]:
        """Write ``images`` as `write_new_images` does; raises OSError if that fails here too."""
        if self.path is None:
            self.path = Path(tempfile.mkdtemp(prefix="atoma-images-unsaved-"))
        return write_new_images(images, self.path, stem)


async def keep_images(
    client: AsyncImagesClient,
    result: ImagesResponse,
    directory: Path,
    stem: str,
    spare: SpareDirectory,
) -> tuple[list[Path], list[str]]:
    """Fetch and save every image of a paid result, elsewhere if ``directory`` fails.

    Returns:
        Where the images are, and what went wrong (empty when all are in ``directory``).
    """
    problems: list[str] = []
    fetched = await asyncio.gather(
        *(client.download(image) for image in result.images), return_exceptions=True
    )
    images: list[bytes] = []
    for number, (image, item) in enumerate(zip(result.images, fetched, strict=True), start=1):
        if isinstance(item, bytes):
            images.append(item)
        elif isinstance(item, AtomaImagesError):
            source = f" from {without_credentials(image.url)}" if image.url else ""
            problems.append(f"image {number} could not be fetched{source} ({item})")
        else:
            raise item
    if not images:
        return [], problems
    try:
        return write_new_images(images, directory, stem), problems
    except OSError as error:
        problems.append(f"cannot save in {directory} ({error})")
    try:
        paths = spare.save(images, stem)
    except OSError as error:
        count = "1 image is" if len(images) == 1 else f"{len(images)} images are"
        problems.append(f"nor in a temporary directory ({error}): {count} lost")
        return [], problems
    problems.append(f"saved in {spare.path} instead")
    return paths, problems
