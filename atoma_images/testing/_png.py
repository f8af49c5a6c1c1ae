"""Small, valid PNGs for the fake server's answers, written with zlib alone."""

from __future__ import annotations

import functools
import hashlib
import struct
import zlib

__all__ = ["make_png"]


@functools.lru_cache(maxsize=64)
def make_png(width: int, height: int, seed: str = "") -> bytes:
    """A valid RGB PNG of ``width`` x ``height``: a gradient whose colours depend on ``seed``."""
    tint = hashlib.sha256(seed.encode("utf-8", "surrogatepass")).digest()
    red = bytes(_ramp(tint[0], x, width) for x in range(width))
    row = bytearray(3 * width)
    row[0::3] = red
    row[2::3] = bytes([tint[2]]) * width
    raw = bytearray()
    for y in range(height):
        row[1::3] = bytes([_ramp(tint[1], y, height)]) * width
        raw += b"\x00"  # filter type: none
        raw += row
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"".join(
        [
            b"\x89PNG\r\n\x1a\n",
            _chunk(b"IHDR", header),
            _chunk(b"IDAT", zlib.compress(bytes(raw), 6)),
            _chunk(b"IEND", b""),
        ]
    )


def _ramp(start: int, index: int, span: int) -> int:
    # Rises from `start`, and folds back at 255 rather than wrapping (no visible seam).
    value = start + index * 256 // span
    return value if value < 256 else 511 - value


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
