"""A strict PNG reader for tests: every chunk's CRC, the IHDR size, and IDAT that inflates."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path


def png_size(data: bytes | Path) -> tuple[int, int]:
    """(width, height) of a valid 8-bit RGB or RGBA PNG; AssertionError for anything else."""
    if isinstance(data, Path):
        data = data.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    offset, idat, header = 8, b"", None
    kind = b""
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind = data[offset + 4 : offset + 8]
        body = data[offset + 8 : offset + 8 + length]
        (crc,) = struct.unpack(">I", data[offset + 8 + length : offset + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"bad CRC in {kind!r}"
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        offset += 12 + length
    assert kind == b"IEND", "no IEND chunk"
    assert header is not None, "no IHDR chunk"
    width, height, depth, colour = header[:4]
    channels = {2: 3, 6: 4}[colour]
    assert depth == 8
    assert len(zlib.decompress(idat)) == height * (1 + width * channels), "IDAT size is wrong"
    return width, height
