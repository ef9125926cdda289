"""What `sonocl segment` segments: the images paired with their masks, their groups and pixel sizes, loaded once.

Images are paired with their masks (`sonocl.evaluate.masks`), grouped by ``--group-regex`` (a group stays in one
fold), given their pixel size and head circumference by ``--pixel-size`` (an HC18-style CSV), and squashed to the
network size (uint8 in memory); each original mask is kept bit-packed, one plane per class, for scoring at the
original size. What the masks' values mean (one foreground class, or K indexed classes) is decided once for the data
set (`sonocl.evaluate.masks.mask_task`).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import re
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sonocl.errors import UserError
from sonocl.evaluate import cache
from sonocl.evaluate.masks import (
    MaskError,
    MaskPair,
    MaskTask,
    mask_task,
    pair_class_folders,
    pair_images,
    read_class_folders,
    read_grey,
    read_labels,
    read_mask,
)
from sonocl.evaluate.segment_config import SegmentConfig
from sonocl.progress import progress_report


class SegmentDataError(UserError, ValueError):
    """Images, names or a pixel-size table that cannot be segmented as asked; the message names the option and the fix."""


def image_groups(relatives: list[str], regex: str | None) -> list[str]:
    """The group id of each image: the regex's first group (else whole match) on its relative name, else the name."""
    if regex is None:
        return list(relatives)
    pattern = re.compile(regex)
    groups, unmatched = [], []
    for relative in relatives:
        match = pattern.search(relative)
        if match is None:
            unmatched.append(relative)
            continue
        groups.append(match.group(1) if pattern.groups else match.group(0))
    if unmatched:
        raise SegmentDataError(
            f"--group-regex {regex!r} does not match {len(unmatched)} image name(s), e.g. {unmatched[:3]}; "
            "it is searched in the path relative to --images, without extension"
        )
    return groups


def read_pixel_sizes(path: Path) -> dict[str, dict[str, float]]:
    """HC18-style CSV → {file name: {"pixel_size_mm": …, "hc_mm": … (when given)}}, keyed by name and by stem."""
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        columns = {name.strip().lower(): name for name in reader.fieldnames or []}
        name_column = next((columns[c] for c in columns if c in ("filename", "file", "image", "name")), None)
        size_column = next((columns[c] for c in columns if "pixel" in c and "size" in c), None)
        hc_column = next((columns[c] for c in columns if "circumference" in c or c in ("hc", "hc_mm")), None)
        if name_column is None or size_column is None:
            raise SegmentDataError(
                f"--pixel-size {path}: needs a 'filename' column and a 'pixel size(mm)' column, found {reader.fieldnames}"
            )
        table: dict[str, dict[str, float]] = {}
        for row in reader:
            entry = {"pixel_size_mm": float(row[size_column])}
            if hc_column is not None and row[hc_column].strip():
                entry["hc_mm"] = float(row[hc_column])
            name = row[name_column].strip()
            table[name] = entry
            table.setdefault(Path(name).stem, entry)
    return table


@dataclasses.dataclass
class SegmentData:
    """The paired images, their groups and pixel sizes, and the images and masks squashed to the network size."""

    pairs: list[MaskPair]
    task: MaskTask
    """The foreground classes (one: binary) and how the mask values are read."""
    groups: list[str]
    pixels: list[dict[str, float] | None]
    """Pixel size (and head circumference) of each image, from ``--pixel-size``."""
    images: torch.Tensor
    """(N, 1, S, S) uint8."""
    masks: torch.Tensor
    """(N, 1, S, S) uint8 class indices: 0 background, 1..K the classes (binary: {0, 1})."""
    shapes: list[tuple[int, int]]
    """Each image's original (H, W): where it is scored."""
    truth_bits: list[np.ndarray]
    """Each original-size mask as K bit-packed planes, one per class (`truth`): read once at loading, not again for
    every init's scoring."""
    skipped: list[tuple[str, str]]
    """(image, message) of the images left out by ``--skip-bad-masks``."""
    hd95_unit: str
    hc_available: bool

    @property
    def relatives(self) -> list[str]:
        return [pair.relative for pair in self.pairs]

    @functools.cached_property
    def digest(self) -> str:
        """The identity of what is segmented, by content (`sonocl.evaluate.cache`): images and masks as squashed,
        the original masks, the images' names, groups and pixel sizes."""
        arrays = (self.images.numpy(), self.masks.numpy(), *self.truth_bits)
        return cache.digest([cache.array_digest(*arrays), self.relatives, self.groups, self.pixels, self.shapes])

    @property
    def classes(self) -> int:
        """K, the number of foreground classes."""
        return len(self.task.classes)

    def truth(self, index: int) -> np.ndarray:
        """The ground truth of image ``index`` at its original size, bool (K, H, W): one plane per class."""
        height, width = self.shapes[index]
        count = self.classes * height * width
        return np.unpackbits(self.truth_bits[index], count=count).reshape(self.classes, height, width).view(bool)


def _squashed(
    pairs: list[MaskPair], size: int, task: MaskTask
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]], list[np.ndarray]]:
    """Images (N, 1, S, S) uint8 and masks (N, 1, S, S) uint8 class indices squashed to S², each original (H, W) and
    each original mask as bit-packed class planes. A mask is squashed class plane by class plane (bilinear), each
    pixel taking the class with the most weight (background included): for one class, the plane > 1/2."""
    images = np.empty((len(pairs), 1, size, size), dtype=np.uint8)
    masks = np.empty((len(pairs), 1, size, size), dtype=np.uint8)
    shapes, truth_bits = [], []
    classes = np.arange(1, len(task.classes) + 1, dtype=np.uint8)[:, None, None]
    with progress_report(len(pairs), "loading", "image", leave=False) as progress:  # whole lines in a log
        for i, pair in enumerate(pairs):
            grey = read_grey(pair.image)
            if pair.classes is not None:
                labels = read_class_folders(pair.classes)
            else:
                labels = read_labels(pair.masks, len(task.classes)) if task.indexed else read_mask(pair.masks)
            planes = labels[None] == classes if task.indexed else labels[None]
            shapes.append(grey.shape)
            truth_bits.append(np.packbits(planes))
            images[i, 0] = np.asarray(Image.fromarray(grey).resize((size, size), Image.Resampling.BILINEAR))
            masks[i, 0] = _squashed_labels(planes, size)
            progress.update(1)
    return torch.from_numpy(images), torch.from_numpy(masks), shapes, truth_bits


def _squashed_labels(planes: np.ndarray, size: int) -> np.ndarray:
    """Class planes bool (K, H, W) → class indices uint8 (S, S): each plane resized bilinearly, each pixel the class
    of the largest weight, background (1 − the planes' sum) included; K = 1: the plane > 127 of 255, as always."""
    resized = [
        np.asarray(Image.fromarray(plane.astype(np.uint8) * 255).resize((size, size), Image.Resampling.BILINEAR))
        for plane in planes
    ]
    if len(resized) == 1:
        return (resized[0] > 127).astype(np.uint8)
    weights = np.stack(resized).astype(np.int16)
    background = 255 - weights.sum(axis=0, keepdims=True)
    return np.argmax(np.concatenate([background, weights]), axis=0).astype(np.uint8)


def load_data(config: SegmentConfig) -> SegmentData:
    """Pair the images with their masks (stopping on a bad mask unless ``skip_bad_masks``), group them, look up
    their pixel sizes and load them at the network size."""
    pixel_table = read_pixel_sizes(config.pixel_size) if config.pixel_size else None
    folders = config.class_folders
    pairing = pair_class_folders(config.images, folders) if folders else pair_images(config.images, config.masks)
    for image, message in pairing.errors:
        print(f"sonocl segment: {image}: {message}", file=sys.stderr)
    if pairing.errors and not config.skip_bad_masks:
        raise MaskError(
            f"{len(pairing.errors)} image(s) without a usable mask (listed above); fix them, or pass --skip-bad-masks "
            "to run without them"
        )
    pairs = pairing.pairs
    if not pairs:
        raise MaskError(f"{config.images}: no image with a mask found")
    if folders:
        task = MaskTask(tuple(name for name, _ in folders), indexed=True)
    else:
        task = mask_task(pairs, config.mask_classes, config.class_names)
    if config.threshold is not None and not task.binary:
        raise SegmentDataError(
            f"--threshold {config.threshold}: the masks hold {len(task.classes)} classes, and each pixel takes the "
            "class of the highest probability; a threshold applies to binary masks only"
        )
    groups = image_groups([pair.relative for pair in pairs], config.group_regex)
    if config.folds > len(set(groups)):  # refused before any image is read
        count = len(set(groups))
        unit = "group" if config.group_regex else "image"
        unit += ("s" if count != 1 else "") + ("" if config.group_regex else ", each its own group")
        fix = f"use --folds {count} or fewer" if count >= 2 else "k-fold needs at least 2 groups"
        raise SegmentDataError(
            f"{config.images}: --folds {config.folds} needs {config.folds} or more groups, each kept in one fold, "
            f"but there are {count} {unit}; {fix}"
        )
    pixels = [
        (pixel_table.get(pair.image.name) or pixel_table.get(pair.relative) or pixel_table.get(pair.image.stem))
        if pixel_table is not None
        else None
        for pair in pairs
    ]
    if pixel_table is not None:
        missing = [pair.image.name for pair, pixel in zip(pairs, pixels) if pixel is None]
        if missing:
            print(
                f"sonocl segment: {len(missing)} image(s) not in {config.pixel_size} (no mm metrics for them), "
                f"e.g. {missing[:3]}",
                file=sys.stderr,
            )
    images, masks, shapes, truth_bits = _squashed(pairs, config.size, task)
    return SegmentData(
        pairs=pairs,
        task=task,
        groups=groups,
        pixels=pixels,
        images=images,
        masks=masks,
        shapes=shapes,
        truth_bits=truth_bits,
        skipped=pairing.errors,
        hd95_unit="mm" if pixel_table is not None and all(p is not None for p in pixels) else "px",
        hc_available=task.binary and pixel_table is not None and any(p is not None and "hc_mm" in p for p in pixels),
    )
