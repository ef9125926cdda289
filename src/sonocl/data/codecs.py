"""How a store keeps its frames: raw (the default), or each frame compressed on its own, losslessly.

Chosen by measurement (`benchmarks/store_codecs.py`, docs/benchmarks.md: POCUS and covid_blues at 128 px): PNG at
level 6 makes a store 2.3× smaller and decodes 4,500–5,300 frames/s on one core; zlib at level 1 (on the raw bytes)
1.7× smaller, 13,000 frames/s. Lossy codecs are not offered: a store holds the data itself. A compressed part keeps
its frames back to back in ``frames.bin`` and where each ends (little-endian uint64) in ``frames.idx``.
"""

from __future__ import annotations

import io
import zlib

import numpy as np
from PIL import Image

CODECS = ("raw", "png", "zlib")
"""``raw``: S×S bytes per frame in ``frames.u8``; ``png``: PNG level 6; ``zlib``: zlib level 1 of the raw bytes."""


def encode(codec: str, frame: np.ndarray) -> bytes:
    """One uint8 (S, S) frame compressed with ``codec``."""
    if codec == "zlib":
        return zlib.compress(np.ascontiguousarray(frame).tobytes(), 1)
    if codec == "png":
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="PNG", compress_level=6)
        return buffer.getvalue()
    raise ValueError(f"no encoder for codec {codec!r}")


def decode(codec: str, data: bytes, size: int) -> np.ndarray:
    """The uint8 (S, S) frame that ``encode`` compressed."""
    if codec == "zlib":
        return np.frombuffer(zlib.decompress(data), dtype=np.uint8).reshape(size, size)
    if codec == "png":
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image)
    raise ValueError(f"no decoder for codec {codec!r}")
