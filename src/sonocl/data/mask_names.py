"""Which files are segmentation masks rather than images, by name: the one rule of ingest and segmentation.

A mask is a file whose stem ends in ``_mask`` (any case), optionally numbered (``_mask_1``), or any file
under a folder named ``mask`` or ``masks`` (any case). ``sonocl ingest`` leaves such files out of a frame
store (a BUSI-style tree would otherwise store its masks as training images with class labels), and
``sonocl segment`` pairs images with them (`sonocl.evaluate.masks`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

MASK_DIR_NAMES = ("mask", "masks")
_MASK_SUFFIX = re.compile(r"_mask(?:_\d+)?$", re.IGNORECASE)


def is_mask_name(path: Path) -> bool:
    """Whether the file name marks a mask: ``NAME_mask.png``, ``NAME_Mask_2.png``."""
    return bool(_MASK_SUFFIX.search(path.stem))


def is_mask_folder(name: str) -> bool:
    """Whether a folder of this name holds masks (``mask``, ``Masks``…)."""
    return name.lower() in MASK_DIR_NAMES


def in_mask_folder(folders: Iterable[str]) -> bool:
    """Whether any of these folder names (a relative path's parents) is a mask folder."""
    return any(is_mask_folder(name) for name in folders)
