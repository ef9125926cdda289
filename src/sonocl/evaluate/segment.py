"""`sonocl segment`: U-Net segmentation on a pretrained ResNet encoder, grouped k-fold cross-validation.

For each ``--init`` and each fold: a fresh encoder (`sonocl.evaluate.inits.load_init`) under a U-Net decoder
(`sonocl.evaluate.unet`) is trained on the training folds for ``--epochs`` epochs (Adam, cosine schedule,
Dice + BCE, joint image + mask augmentation) and the model of the **last** epoch predicts the test fold; no
choice is made on the test fold. Images and masks are squashed to ``--size``² for the network; predicted
probabilities are resized back to each image's original size, thresholded (``--threshold``, by default the
value with the best Dice on the fold's training images), optionally post-processed (largest component, holes
filled: ``--postprocess``, on by default when head circumferences are given) and scored there against the
original mask (`sonocl.evaluate.segmentation_metrics`). ``--jobs N`` trains and scores
fold runs in N spawned single-thread worker processes, with the same results as one process. See docs/segment.md.

Below the command line everything takes a `SegmentConfig`, validated when it is built.

Exit status: 0 done; 2 nothing was run (bad arguments, no images, images without a usable mask unless
``--skip-bad-masks``); 3 done, but some images were skipped (listed in results.json).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as dt
import functools
import io
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

from sonocl.data.splits import grouped_stratified_kfold
from sonocl.errors import ConfigError, UserError
from sonocl.evaluate import cache
from sonocl.evaluate import segmentation_metrics as sm
from sonocl.evaluate.engine import run_fold_tasks
from sonocl.evaluate.inits import default_label, load_init
from sonocl.evaluate.masks import MaskError, MaskPair, pair_images, read_grey, read_mask
from sonocl.evaluate.unet import JointAugment, UNet, dice_bce_loss
from sonocl.files import atomic_write_text, json_text, write_json
from sonocl.models import ARCHITECTURES
from sonocl.options import number_rule
from sonocl.outputs import SEGMENTATION, add_overwrite_argument, claim
from sonocl.progress import progress_report
from sonocl.runtime import resolve_device

SCHEMA = "sonocl.segment/1"
DEFAULT_MEAN, DEFAULT_STD = 0.5, 0.25
EXIT_OK, EXIT_SKIPPED = 0, 3
METRICS = ("dice", "iou", "hd95_px", "hd95_mm", "hc_abs_error_mm")
FOLD_PARTS = ("train", "calibrate", "predict", "score")
"""Where a fold run's time goes (``PART_seconds`` in results.json): calibrate = predicting and scoring the training
images for the threshold; score = scoring the test images at their original size (and their overlays)."""
THRESHOLDS = tuple(round(0.30 + 0.05 * k, 2) for k in range(11))
"""The candidate foreground thresholds of the calibration on the training images (`calibrate_threshold`)."""


class SegmentDataError(UserError, ValueError):
    """Images, names or a pixel-size table that cannot be segmented as asked; the message names the option and the fix."""


def _option(field: str) -> str:
    """The command-line flag of a `SegmentConfig` field (one name from flag to field)."""
    return "--" + field.replace("_", "-")


@dataclasses.dataclass(frozen=True)
class SegmentConfig:
    """Everything that defines a segmentation run; every field is the command-line option of the same name.

    Checked when built: a bad value raises `sonocl.errors.ConfigError` naming the option, before any image is read.
    """

    images: Path
    init: tuple[str, ...]
    """random | imagenet | a sonocl run directory, checkpoint or encoder.safetensors | a USCL/Meta-USCL file."""
    out: Path
    masks: Path | None = None
    """The mask root (default: ``images``)."""
    group_regex: str | None = None
    pixel_size: Path | None = None
    skip_bad_masks: bool = False
    name: tuple[str, ...] | None = None
    """Table label of each init (default: derived from the init)."""
    backbone: str | None = None
    """Architecture of every init; None: a sonocl encoder's own (the backbone it records), anything else a resnet18."""
    channels: int = 1
    freeze_encoder: bool = False
    mean: float | None = None
    """Normalisation of [0, 1] pixels (default: the encoder file's, else ``DEFAULT_MEAN``)."""
    std: float | None = None
    folds: int = 5
    size: int = 128
    epochs: int = 8
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    device: str = "auto"
    postprocess: bool | None = None
    """Keep the largest predicted component, holes filled, before scoring; None: on when head circumferences are given."""
    threshold: float | None = None
    """Foreground probability threshold; None: calibrated per fold on the training images (`calibrate_threshold`)."""
    jobs: int = 1
    overlays: int = 6
    overwrite: bool = False
    """Write into an --out that sonocl did not make (`sonocl.outputs`)."""

    def __post_init__(self) -> None:
        for field in ("images", "out", "masks", "pixel_size"):
            value = getattr(self, field)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, field, Path(value))
        for field in ("init", "name"):
            value = getattr(self, field)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, field, tuple(value))
        problems = [f"{_option(field)} {getattr(self, field)!r}: {rule}" for field, rule in self._failed_rules()]
        try:
            resolve_device(self.device)  # the one check of --device, whose message names it
        except ConfigError as error:
            problems.append(str(error))
        if problems:
            raise ConfigError("; ".join(problems))

    def _failed_rules(self) -> list[tuple[str, str]]:
        rules = {
            "size": (self.size >= 32, "must be ≥ 32 (the encoder halves it five times)"),
            "epochs": (self.epochs >= 1, "must be ≥ 1"),
            "batch_size": (self.batch_size >= 2, "must be ≥ 2 (BatchNorm needs two images a batch)"),
            "folds": (self.folds >= 2, "must be ≥ 2"),
            "seed": (self.seed >= 0, "must be ≥ 0"),
            "lr": (number_rule(self.lr, above=0) is None, "must be > 0 and finite"),
            "weight_decay": (number_rule(self.weight_decay, at_least=0) is None, "must be ≥ 0 and finite"),
            "mean": (self.mean is None or number_rule(self.mean) is None, "must be finite"),
            "std": (self.std is None or number_rule(self.std, above=0) is None, "must be > 0 and finite"),
            "threshold": (self.threshold is None or 0 < self.threshold < 1, "must be in (0, 1)"),
            "channels": (self.channels in (1, 3), "must be 1 or 3"),
            "backbone": (
                self.backbone is None or self.backbone in ARCHITECTURES,
                f"must be one of {', '.join(ARCHITECTURES)}",
            ),
            "jobs": (self.jobs >= 1, "must be ≥ 1"),
            "overlays": (self.overlays >= 0, "must be ≥ 0"),
            "init": (len(self.init) >= 1, "give at least one init"),
            "images": (self.images.is_dir(), "not a directory"),
            "masks": (self.masks is None or self.masks.is_dir(), "not a directory"),
            "pixel_size": (self.pixel_size is None or self.pixel_size.is_file(), "no such file"),
        }
        failed = [(field, rule) for field, (ok, rule) in rules.items() if not ok]
        if self.name is not None and len(self.name) != len(self.init):
            failed.append(("name", f"{len(self.name)} names for {len(self.init)} --init; give one per init or none"))
        elif len(set(self.labels)) != len(self.labels):
            failed.append(("name", f"init labels {list(self.labels)} must be unique; give --name"))
        if self.group_regex is not None:
            try:
                re.compile(self.group_regex)
            except re.error as error:
                failed.append(("group_regex", f"not a regular expression ({error})"))
        return failed

    @property
    def labels(self) -> tuple[str, ...]:
        """The table label of each init."""
        return self.name if self.name is not None else tuple(default_label(spec) for spec in self.init)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SegmentConfig:
        return cls(**{field.name: getattr(args, field.name) for field in dataclasses.fields(cls)})

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON values (paths as strings, tuples as lists)."""

        def plain(value: Any) -> Any:
            if isinstance(value, Path):
                return str(value)
            return list(value) if isinstance(value, tuple) else value

        return {field.name: plain(getattr(self, field.name)) for field in dataclasses.fields(self)}


def _default(field: str) -> Any:
    return next(f.default for f in dataclasses.fields(SegmentConfig) if f.name == field)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `SegmentConfig`, with its defaults."""
    data = parser.add_argument_group("data")
    data.add_argument("--images", required=True, type=Path, help="folder of images (searched recursively)")
    data.add_argument(
        "--masks",
        type=Path,
        default=None,
        help="folder of masks: a parallel tree, or the image folder itself (default: --images)",
    )
    data.add_argument(
        "--group-regex",
        default=None,
        help="regex on each image's relative path without extension; its first group (else the whole "
        "match) is the group id, e.g. '^(\\d+)' for HC18. Default: every image is its own group",
    )
    data.add_argument(
        "--pixel-size",
        type=Path,
        default=None,
        help="CSV with 'filename', 'pixel size(mm)' and optionally 'head circumference (mm)' (HC18): "
        "HD95 in mm and the head-circumference error",
    )
    data.add_argument(
        "--skip-bad-masks",
        action="store_true",
        help="run without the images whose mask is missing or mis-sized (listed; exit 3) instead of stopping",
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--init",
        nargs="+",
        action="extend",
        required=True,
        help="random | imagenet | a sonocl run directory, checkpoint or encoder.safetensors | a USCL/Meta-USCL file; "
        "several give one comparison table",
    )
    model.add_argument(
        "--name", nargs="+", action="extend", default=None, help="table label of each --init (default: derived)"
    )
    model.add_argument(
        "--backbone",
        default=_default("backbone"),
        choices=tuple(ARCHITECTURES),
        help="architecture (default: a sonocl encoder's own, else resnet18)",
    )
    model.add_argument(
        "--channels", type=int, default=_default("channels"), choices=(1, 3), help="stem channels (grey is copied to 3)"
    )
    model.add_argument(
        "--freeze-encoder", action="store_true", help="train the decoder only (encoder frozen, BN in eval mode)"
    )
    model.add_argument(
        "--mean",
        type=float,
        default=None,
        help=f"normalisation mean of [0, 1] pixels (default: the encoder file's, else {DEFAULT_MEAN})",
    )
    model.add_argument(
        "--std", type=float, default=None, help=f"normalisation std (default: the encoder file's, else {DEFAULT_STD})"
    )
    train = parser.add_argument_group("training")
    train.add_argument("--folds", type=int, default=_default("folds"))
    train.add_argument(
        "--size",
        type=int,
        default=_default("size"),
        help="square network input; masks are scored at the original size (default: %(default)s)",
    )
    train.add_argument("--epochs", type=int, default=_default("epochs"), help="(default: %(default)s)")
    train.add_argument("--batch-size", type=int, default=_default("batch_size"), help="(default: %(default)s)")
    train.add_argument(
        "--lr", type=float, default=_default("lr"), help="Adam learning rate, cosine decay to 0 (default: %(default)s)"
    )
    train.add_argument("--weight-decay", type=float, default=_default("weight_decay"))
    train.add_argument("--seed", type=int, default=_default("seed"), help="folds, initialisation and augmentation")
    train.add_argument("--device", default=_default("device"), help="auto | cpu | cuda | cuda:N")
    train.add_argument(
        "--jobs",
        type=int,
        default=_default("jobs"),
        help="fold runs trained and scored side by side in spawned worker processes, sharing torch's "
        "threads; same results as one process (default: %(default)s)",
    )
    output = parser.add_argument_group("output")
    output.add_argument(
        "--out", required=True, type=Path, help="output folder (results.json, results.md, per_image.csv, overlays/)"
    )
    add_overwrite_argument(output)
    output.add_argument(
        "--postprocess",
        action=argparse.BooleanOptionalAction,
        default=_default("postprocess"),
        help="keep the largest predicted component and fill its holes before scoring (default: on when "
        "--pixel-size gives head circumferences, else off)",
    )
    output.add_argument(
        "--threshold",
        type=float,
        default=_default("threshold"),
        help="foreground probability threshold (default: calibrated per fold on the training images: "
        f"the one of {THRESHOLDS[0]:.2f}, {THRESHOLDS[1]:.2f}, …, {THRESHOLDS[-1]:.2f} with the best "
        "mean Dice of the scored masks)",
    )
    output.add_argument(
        "--overlays", type=int, default=_default("overlays"), help="overlay PNGs per init (the first N images by name)"
    )


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


def _encoder_normalisation(metadata: dict[str, Any]) -> tuple[float | None, float | None]:
    def scalar(value: Any) -> float | None:
        if value is None:
            return None
        values = value if isinstance(value, (list, tuple)) else [value]
        return float(np.mean([float(v) for v in values]))

    return scalar(metadata.get("mean")), scalar(metadata.get("std"))


# ------------------------------------------------------------------------------------------------------ data


@dataclasses.dataclass
class SegmentData:
    """The paired images, their groups and pixel sizes, and the images and masks squashed to the network size."""

    pairs: list[MaskPair]
    groups: list[str]
    pixels: list[dict[str, float] | None]
    """Pixel size (and head circumference) of each image, from ``--pixel-size``."""
    images: torch.Tensor
    """(N, 1, S, S) uint8."""
    masks: torch.Tensor
    """(N, 1, S, S) uint8 in {0, 1}."""
    shapes: list[tuple[int, int]]
    """Each image's original (H, W): where it is scored."""
    truth_bits: list[np.ndarray]
    """Each original-size mask, bit-packed (`truth`): read once at loading, not again for every init's scoring."""
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

    def truth(self, index: int) -> np.ndarray:
        """The ground-truth mask of image ``index`` at its original size, bool (H, W)."""
        height, width = self.shapes[index]
        return np.unpackbits(self.truth_bits[index], count=height * width).reshape(height, width).view(bool)


def _squashed(
    pairs: list[MaskPair], size: int
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]], list[np.ndarray]]:
    """Images (N, 1, S, S) uint8 and masks (N, 1, S, S) uint8 {0, 1} squashed to S², each original (H, W) and
    each original mask bit-packed."""
    images = np.empty((len(pairs), 1, size, size), dtype=np.uint8)
    masks = np.empty((len(pairs), 1, size, size), dtype=np.uint8)
    shapes, truth_bits = [], []
    with progress_report(len(pairs), "loading", "image", leave=False) as progress:  # whole lines in a log
        for i, pair in enumerate(pairs):
            grey = read_grey(pair.image)
            mask = read_mask(pair.masks)
            shapes.append(grey.shape)
            truth_bits.append(np.packbits(mask))
            images[i, 0] = np.asarray(Image.fromarray(grey).resize((size, size), Image.Resampling.BILINEAR))
            resized = Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.Resampling.BILINEAR)
            masks[i, 0] = np.asarray(resized) > 127
            progress.update(1)
    return torch.from_numpy(images), torch.from_numpy(masks), shapes, truth_bits


def load_data(config: SegmentConfig) -> SegmentData:
    """Pair the images with their masks (stopping on a bad mask unless ``skip_bad_masks``), group them, look up
    their pixel sizes and load them at the network size."""
    pixel_table = read_pixel_sizes(config.pixel_size) if config.pixel_size else None
    pairing = pair_images(config.images, config.masks)
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
    images, masks, shapes, truth_bits = _squashed(pairs, config.size)
    return SegmentData(
        pairs=pairs,
        groups=groups,
        pixels=pixels,
        images=images,
        masks=masks,
        shapes=shapes,
        truth_bits=truth_bits,
        skipped=pairing.errors,
        hd95_unit="mm" if pixel_table is not None and all(p is not None for p in pixels) else "px",
        hc_available=pixel_table is not None and any(p is not None and "hc_mm" in p for p in pixels),
    )


# ------------------------------------------------------------------------------------------- training, scoring


def train_fold(
    model: UNet,
    images: torch.Tensor,
    masks: torch.Tensor,
    config: SegmentConfig,
    mean: float,
    std: float,
    device: torch.device,
    generator: torch.Generator,
    description: str,
    bar_position: int = 0,
) -> float:
    """Train ``model`` on uint8 images/masks (N, 1, S, S) on the CPU; returns the last epoch's mean loss."""
    if config.freeze_encoder:
        for parameter in model.encoder.parameters():
            parameter.requires_grad_(False)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=config.lr, weight_decay=config.weight_decay)
    n, batch_size = images.shape[0], config.batch_size
    batches_per_epoch = n // batch_size + (1 if n % batch_size >= 2 else 0)  # a batch of 1 breaks BatchNorm
    if batches_per_epoch == 0:
        raise SegmentDataError(f"{n} training image(s) in a fold: BatchNorm needs at least 2; use fewer --folds")
    total_steps = config.epochs * batches_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total_steps))
    )
    augment = JointAugment(config.size)
    epoch_loss = float("nan")
    with progress_report(total_steps, description, "step", leave=False, position=bar_position) as bar:
        for epoch in range(config.epochs):
            model.train()
            if config.freeze_encoder:
                model.encoder.eval()
            order = torch.randperm(n, generator=generator)
            losses = []
            for step in range(batches_per_epoch):
                index = order[step * batch_size : (step + 1) * batch_size]
                x = images[index].to(device).float().div_(255.0)
                y = masks[index].to(device).float()
                x, y = augment(x, y, generator)
                x = (x - mean) / std
                if config.channels != 1:
                    x = x.expand(-1, config.channels, -1, -1)
                loss = dice_bce_loss(model(x), y)
                if not torch.isfinite(loss):
                    raise ConfigError(
                        f"--lr {config.lr}: {description}: non-finite loss at epoch {epoch + 1}, "
                        f"step {step + 1}; lower --lr"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                losses.append(loss.item())
                bar.update(1)
                bar.set_postfix(epoch=f"{epoch + 1}/{config.epochs}", loss=f"{losses[-1]:.3f}")
            epoch_loss = float(np.mean(losses))
    return epoch_loss


def _normalise(images_u8: torch.Tensor, mean: float, std: float, channels: int) -> torch.Tensor:
    x = (images_u8.float() / 255.0 - mean) / std
    return x.expand(-1, channels, -1, -1) if channels != 1 else x


@torch.no_grad()
def predict(
    model: UNet, images: torch.Tensor, mean: float, std: float, channels: int, device: torch.device, batch_size: int
) -> torch.Tensor:
    """Foreground probabilities (N, 1, S, S) on the CPU for uint8 images (N, 1, S, S)."""
    model.eval()
    outputs = []
    for start in range(0, images.shape[0], batch_size):
        x = _normalise(images[start : start + batch_size].to(device), mean, std, channels)
        outputs.append(torch.sigmoid(model(x).float()).cpu())
    return torch.cat(outputs)


def to_original_size(probability: torch.Tensor, shape: tuple[int, int]) -> np.ndarray:
    """(1, S, S) probability → float (H, W): bilinear resize to the original size, where masks are scored."""
    return F.interpolate(probability[None], size=shape, mode="bilinear", align_corners=False)[0, 0].numpy()


def scored_mask(probability: np.ndarray, threshold: float, postprocess: bool) -> np.ndarray:
    """The mask that is scored: probability (H, W) > threshold, post-processed (`sm.largest_component`) if asked."""
    mask = probability > threshold
    return sm.largest_component(mask) if postprocess else mask


def calibrate_threshold(
    probabilities: torch.Tensor, images: np.ndarray, data: SegmentData
) -> tuple[float, list[float]]:
    """The threshold of `THRESHOLDS` with the best mean Dice of ``probability > threshold`` (before post-processing)
    on the given (training) images at their original size, and the mean Dice of each.

    Why: on HC18 the 0.5 contour of the trained U-Net lies outside the head — on the training images as on the
    test fold, by the same amount (docs/segment.md, Threshold) — and the head circumference inherits that bias.
    The training images show it, so the threshold is chosen there, never on the test fold.
    """
    totals = np.zeros(len(THRESHOLDS))
    for j, i in enumerate(images):
        totals += dice_by_threshold(to_original_size(probabilities[j], data.shapes[i]), data.truth(i))
    means = (totals / max(len(images), 1)).tolist()
    return THRESHOLDS[int(np.argmax(means))], means


def dice_by_threshold(probability: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """`sm.dice` of ``probability > t`` against ``truth`` for every t of `THRESHOLDS`, in one pass over the pixels:
    each pixel above the lowest threshold is counted once, by how many thresholds it exceeds."""
    edges = np.asarray(THRESHOLDS, dtype=probability.dtype)  # compared in the probability's precision, as `p > t` is
    candidates = probability > edges[0]
    exceeded = np.searchsorted(edges, probability[candidates], side="left")  # thresholds t < p of each pixel
    exceeded_in_truth = np.searchsorted(edges, probability[candidates & truth], side="left")

    def above(counts: np.ndarray) -> np.ndarray:  # pixels over each threshold
        return np.cumsum(np.bincount(counts, minlength=len(edges) + 1)[::-1])[::-1][1:]

    predicted, intersection, true_area = above(exceeded), above(exceeded_in_truth), int(truth.sum())
    total = predicted + true_area
    return np.where(total > 0, 2.0 * intersection / np.maximum(total, 1), 1.0)


def score_image(prediction: np.ndarray, truth: np.ndarray, pixel: dict[str, float] | None) -> dict[str, Any]:
    row: dict[str, Any] = {
        "dice": sm.dice(prediction, truth),
        "iou": sm.iou(prediction, truth),
        "hd95_px": sm.hd95(prediction, truth),
        "hd95_mm": float("nan"),
        "pred_area_px": int(prediction.sum()),
        "true_area_px": int(truth.sum()),
        "pixel_size_mm": float("nan"),
        "hc_true_mm": float("nan"),
        "hc_pred_mm": float("nan"),
        "hc_abs_error_mm": float("nan"),
        "hc_fit_on_truth_mm": float("nan"),
    }
    if pixel is not None:
        spacing = pixel["pixel_size_mm"]
        row["pixel_size_mm"] = spacing
        row["hd95_mm"] = row["hd95_px"] * spacing
        row["hc_pred_mm"] = sm.head_circumference(prediction, spacing)
        row["hc_fit_on_truth_mm"] = sm.head_circumference(truth, spacing)
        if "hc_mm" in pixel:
            row["hc_true_mm"] = pixel["hc_mm"]
            # an empty prediction has no circumference: count it as the whole circumference missed
            predicted = row["hc_pred_mm"] if math.isfinite(row["hc_pred_mm"]) else 0.0
            row["hc_abs_error_mm"] = abs(predicted - pixel["hc_mm"])
    return row


def write_overlay(path: Path, image: np.ndarray, truth: np.ndarray, prediction: np.ndarray) -> None:
    """The grey image with the ground-truth contour in green and the predicted contour in red (2 px wide)."""
    rgb = np.repeat(image[..., None], 3, axis=2).copy()
    for mask, colour in ((truth, (0, 255, 0)), (prediction, (255, 0, 0))):
        contour = ndimage.binary_dilation(sm.boundary(mask), iterations=1)
        rgb[contour] = colour
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "item"


# --------------------------------------------------------------------------------------------------- fold runs


@dataclasses.dataclass(frozen=True)
class InitSpec:
    """One init as a fold run needs it: its label, ``--init`` value and normalisation."""

    label: str
    spec: str
    mean: float
    std: float
    weights: str = ""
    """The identity of the weights loaded (`sonocl.evaluate.cache.init_digest`)."""


@dataclasses.dataclass(frozen=True)
class FoldTask:
    """One fold run: which init, the fold, its training and test image indices."""

    init: int
    fold: int
    train: np.ndarray
    test: np.ndarray


@dataclasses.dataclass
class FoldResult:
    """A finished fold run: its results.json ``folds`` entry and its per-image rows."""

    task: FoldTask
    entry: dict[str, Any]
    rows: list[dict[str, Any]]


def run_fold(
    data: SegmentData, init: InitSpec, config: SegmentConfig, task: FoldTask, bar_position: int = 0
) -> FoldResult:
    """Train, predict and score one fold; seeded by (seed, fold) only, so any process gives the same run."""
    device = resolve_device(config.device)
    seed = config.seed * 1000 + task.fold
    torch.manual_seed(seed)  # the random init's weights and the decoder's
    backbone, _ = load_init(init.spec, config.backbone, config.channels)
    model = UNet(backbone).to(device)
    description = f"{init.label} fold {task.fold + 1}/{config.folds}"
    started = time.perf_counter()
    final_loss = train_fold(
        model,
        data.images[task.train],
        data.masks[task.train],
        config,
        init.mean,
        init.std,
        device,
        torch.Generator().manual_seed(seed),
        description,
        bar_position,
    )
    trained = time.perf_counter()
    threshold, train_dice = config.threshold, None
    if threshold is None:
        train_probabilities = predict(
            model, data.images[task.train], init.mean, init.std, config.channels, device, config.batch_size
        )
        threshold, train_dice = calibrate_threshold(train_probabilities, task.train, data)
    calibrated = time.perf_counter()
    probabilities = predict(
        model, data.images[task.test], init.mean, init.std, config.channels, device, config.batch_size
    )
    predicted = time.perf_counter()
    rows = []
    for j, i in enumerate(task.test):
        prediction = scored_mask(
            to_original_size(probabilities[j], data.shapes[i]), threshold, bool(config.postprocess)
        )
        truth = data.truth(i)
        row = {
            "init": init.label,
            "fold": task.fold,
            "image": data.pairs[i].relative,
            "group": data.groups[i],
            "height": data.shapes[i][0],
            "width": data.shapes[i][1],
        }
        row.update(score_image(prediction, truth, data.pixels[i]))
        rows.append(row)
        if i < config.overlays:
            write_overlay(
                config.out / "overlays" / _safe_name(init.label) / f"{_safe_name(data.pairs[i].relative)}.png",
                read_grey(data.pairs[i].image),
                truth,
                prediction,
            )
    scored = time.perf_counter()
    entry: dict[str, Any] = {
        "fold": task.fold,
        "num_train": int(len(task.train)),
        "num_test": int(len(task.test)),
        "final_train_loss": final_loss,
        "threshold": threshold,
        "train_dice_by_threshold": train_dice,
        "train_seconds": round(trained - started, 2),
        "calibrate_seconds": round(calibrated - trained, 2),
        "predict_seconds": round(predicted - calibrated, 2),
        "score_seconds": round(scored - predicted, 2),
        "metrics": _summary_of_images(rows),
    }
    tqdm.write(
        f"{description}: Dice {entry['metrics']['dice']['mean']:.3f} ({scored - started:.0f} s)", file=sys.stderr
    )
    return FoldResult(task, entry, rows)


def run_folds(
    data: SegmentData, inits: list[InitSpec], config: SegmentConfig, tasks: list[FoldTask]
) -> list[FoldResult]:
    """Every fold run, in the order of ``tasks``; with ``config.jobs > 1`` in that many spawned worker processes,
    each with an equal share of torch's threads (`sonocl.workers.map_unordered`, as `sonocl evaluate --jobs`). A
    run's result does not depend on the process that ran it, up to float rounding from a different thread count."""
    done: dict[tuple[int, int], FoldResult] = {}

    def keep(result: FoldResult) -> None:
        done[(result.task.init, result.task.fold)] = result

    def announce(read_back: int, total: int) -> None:
        if read_back:
            print(f"sonocl segment: {read_back} of {total} fold runs read back from {config.out / 'folds'}",
                  file=sys.stderr)  # fmt: skip

    run_fold_tasks(
        tasks,
        load=lambda task: load_fold(config, inits[task.init], task, data),
        run_here=lambda task: run_fold(data, inits[task.init], config, task),
        worker=_fold_in_worker,
        shared={"data": data, "models": inits, "config": config},
        jobs=config.jobs,
        save=lambda result: save_fold(config, inits[result.task.init], result, data),
        on_result=keep,
        announce=announce,
    )
    return [done[(task.init, task.fold)] for task in tasks]


def _fold_path(config: SegmentConfig, task: FoldTask) -> Path:
    return config.out / "folds" / f"init{task.init}_fold{task.fold}.json"


def _fold_key(config: SegmentConfig, init: InitSpec, task: FoldTask, data: SegmentData) -> dict[str, str]:
    """What a fold run depends on (`sonocl.evaluate.cache`): the settings (not where or how many at once it ran) and
    its test images, the images and masks, the init's weights."""
    settings = {k: v for k, v in config.to_dict().items() if k not in ("out", "jobs", "device", "overwrite")}
    init_settings = {k: v for k, v in dataclasses.asdict(init).items() if k != "weights"}
    return cache.fold_key({"config": settings, "init": init_settings, "test": task.test.tolist()}, data.digest,
                          init.weights)  # fmt: skip


def save_fold(config: SegmentConfig, init: InitSpec, result: FoldResult, data: SegmentData) -> None:
    """One finished fold run, written atomically (a kill leaves it absent or complete)."""
    path = _fold_path(config, result.task)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = cache.encode(_fold_key(config, init, result.task, data))
    record = {"key": key, "entry": result.entry, "rows": result.rows}
    atomic_write_text(path, json_text(record, nan=True))  # NaN kept: the cache gives back the floats it was given


def load_fold(config: SegmentConfig, init: InitSpec, task: FoldTask, data: SegmentData) -> FoldResult | None:
    """The saved run of ``task`` if it was made with the same settings, init, images and masks, else None."""
    path = _fold_path(config, task)
    if not path.is_file():
        return None
    try:  # a kept run is a cache: a damaged one (cut short, overwritten) is computed again, with a line naming it
        record = json.loads(path.read_text(encoding="utf-8"))
        saved, entry, rows = str(record.get("key")), record["entry"], record["rows"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        reason = (
            "not UTF-8 text" if isinstance(error, UnicodeDecodeError) else str(error).strip() or type(error).__name__
        )
        print(f"{path}: a damaged kept fold run ({reason.splitlines()[0]}); computing it again", file=sys.stderr)
        return None
    if not cache.matches(saved, _fold_key(config, init, task, data), path):
        return None
    return FoldResult(task, entry, rows)


def _fold_in_worker(task: FoldTask, state: dict[str, Any]) -> FoldResult:
    return run_fold(state["data"], state["models"][task.init], state["config"], task, state["bar_position"])


# ---------------------------------------------------------------------------------------------------- outputs


def _summary_of_images(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {metric: sm.summarize([row[metric] for row in rows]) for metric in METRICS}


def _across_folds(folds: list[dict[str, Any]]) -> dict[str, Any]:
    """mean ± std over folds of each fold's mean."""
    summary = {}
    for metric in METRICS:
        means = [fold["metrics"][metric]["mean"] for fold in folds]
        summary[metric] = sm.summarize([np.nan if m is None else m for m in means])
    return summary


def _format(summary: dict[str, Any], digits: int) -> str:
    if summary["mean"] is None:
        return "–"
    return f"{summary['mean']:.{digits}f} ± {summary['std']:.{digits}f}"


def _median(summary: dict[str, Any], digits: int) -> str:
    return "–" if summary["median"] is None else f"{summary['median']:.{digits}f}"


def write_markdown(path: Path, results: dict[str, Any]) -> None:
    hd_metric = "hd95_mm" if results["data"]["hd95_unit"] == "mm" else "hd95_px"
    hd_label = "HD95 (mm)" if hd_metric == "hd95_mm" else "HD95 (px)"
    has_hc = results["data"]["hc_available"]
    columns = [("dice", "Dice", 3), ("iou", "IoU", 3), (hd_metric, hd_label, 2)]
    columns += [("hc_abs_error_mm", "HC abs. error (mm)", 2)] if has_hc else []
    header = (
        ["init"]
        + [label for _, label, _ in columns]
        + [f"{label} median" for metric, label, _ in columns if metric != "iou"]
    )
    config = results["config"]
    lines = [
        f"# sonocl segment — {config['folds']}-fold grouped CV, {results['data']['num_images']} images, "
        f"{results['data']['num_groups']} groups",
        "",
        "Mean ± std (sample, ddof=1) over folds of each fold's mean; median over all test images (each image is "
        "tested once); last-epoch model, no selection on the test fold.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for init in results["inits"]:
        note = init.get("pretraining_overlap", {}).get("note")
        cells = [init["name"] + (f" [{note}]" if note else "")]
        cells += [_format(init["summary"][metric], digits) for metric, _, digits in columns]
        cells += [_median(init["pooled"][metric], digits) for metric, _, digits in columns if metric != "iou"]
        lines.append("| " + " | ".join(cells) + " |")
    folds = config["folds"]
    lines += [
        "",
        "Dice per fold:",
        "",
        "| init | " + " | ".join(f"fold {k + 1}" for k in range(folds)) + " | pooled (images) |",
        "|---|" + "---|" * (folds + 1),
    ]
    for init in results["inits"]:
        per_fold = [f"{fold['metrics']['dice']['mean']:.3f}" for fold in init["folds"]]
        lines.append(f"| {init['name']} | " + " | ".join(per_fold) + f" | {_format(init['pooled']['dice'], 3)} |")
    timing = results["timing"]
    lines += [
        "",
        f"Backbone {config['backbone'] or 'of each encoder (else resnet18)'} ({config['channels']}-channel stem), input {config['size']}², "
        f"{config['epochs']} epochs, batch {config['batch_size']}, Adam lr {config['lr']} (cosine), "
        f"{'frozen' if config['freeze_encoder'] else 'fine-tuned'} encoder, seed {config['seed']}.",
        "Post-processing: "
        + (
            "the largest predicted component, holes filled, is scored."
            if config["postprocess"]
            else "none (every predicted pixel is scored)."
        ),
        "Threshold: "
        + (
            f"{config['threshold']} (fixed)."
            if config["threshold"] is not None
            else "calibrated per fold on the training images (best mean Dice): "
            + ", ".join(f"{fold['threshold']:.2f}" for fold in results["inits"][0]["folds"])
            + (" for the first init." if len(results["inits"]) > 1 else ".")
        ),
        "Dice/IoU = 1 and HD95 = 0 when prediction and truth are both empty; HD95 = image diagonal when exactly one is.",
    ]
    if has_hc:
        method = results["data"]["hc_fit_on_truth_abs_error_mm"]
        lines.append(
            "HC: ellipse (moments) fitted to the scored prediction, Ramanujan circumference × pixel size. "
            f"The same fit on the ground-truth masks is off by {_format(method, 2)} mm (the method's own error)."
        )
    lines.append(
        f"Wall time {timing['wall_seconds']:.0f} s with --jobs {timing['jobs']}: loading {timing['load_seconds']:.0f} s; "
        f"fold runs {timing['train_seconds']:.0f} s training, {timing['calibrate_seconds']:.0f} s calibrating the "
        f"threshold, {timing['predict_seconds']:.0f} s predicting, {timing['score_seconds']:.0f} s scoring at the "
        "original size (summed over runs)."
    )
    if results["data"]["skipped"]:
        lines.append(f"**{len(results['data']['skipped'])} image(s) skipped** (no usable mask): see results.json.")
    atomic_write_text(path, "\n".join(lines) + "\n")


def _write_per_image(path: Path, rows: list[dict[str, Any]]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()})
    atomic_write_text(path, text.getvalue())


# ------------------------------------------------------------------------------------------------------- run


def run(args: argparse.Namespace) -> int:
    return segment(SegmentConfig.from_args(args))


def _resolve_inits(config: SegmentConfig) -> tuple[list[InitSpec], list[dict[str, Any]]]:
    """Load every init once before any training (a bad path fails in seconds): its normalisation and load report."""
    inits, reports = [], []
    for spec, label in zip(config.init, config.labels):
        _, report = load_init(spec, config.backbone, config.channels)
        print(str(report), file=sys.stderr)
        meta_mean, meta_std = _encoder_normalisation(report.metadata)
        mean = config.mean if config.mean is not None else (meta_mean if meta_mean is not None else DEFAULT_MEAN)
        std = config.std if config.std is not None else (meta_std if meta_std is not None else DEFAULT_STD)
        inits.append(InitSpec(label, spec, mean, std, cache.init_digest(report)))
        reports.append(report.to_dict())
    return inits, reports


def pretraining_overlap(spec: str, pairs: list[MaskPair]) -> dict[str, Any]:
    """How many of the segmented images the encoder's pretraining saw (`sonocl.provenance`, by the sha256 of the image
    file, as ingest hashes its sources). Masks are never a pretraining label, so an overlap is transductive: stamped."""
    import hashlib

    from sonocl.provenance import check_fold, find, summarise

    provenance = find(spec)
    if provenance is None:
        return {"test_images": len(pairs), "seen": 0, "note": "", "provenance": "none"}
    hashes = [hashlib.sha256(pair.image.read_bytes()).hexdigest() for pair in pairs]
    stamp = summarise([check_fold(provenance, hashes)])
    stamp["note"] = f"transductive: {stamp['seen']} of {len(pairs)} images seen in pretraining" if stamp["seen"] else ""
    stamp["provenance"] = "recorded"
    if stamp["note"]:
        print(f"{spec}: {stamp['note']}", file=sys.stderr)
    return stamp


def _data_section(data: Any, splits: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """results.json's ``data``: the images, groups, units, skipped files and each fold's test images."""
    return {
        "num_images": len(data.pairs),
        "num_groups": len(set(data.groups)),
        "hd95_unit": data.hd95_unit,
        "hc_available": data.hc_available,
        "skipped": [{"image": image, "error": message} for image, message in data.skipped],
        "folds": [
            {
                "fold": k,
                "num_train": int(len(train)),
                "num_test": int(len(test)),
                "test_images": [data.relatives[i] for i in test],
            }
            for k, (train, test) in enumerate(splits)
        ],  # fmt: skip
    }


def _init_entry(index: int, init: Any, report: Any, fold_results: list[Any], data: Any) -> dict[str, Any]:
    """results.json's entry of one init: its folds, their summary, the pooled images, time and pretraining overlap."""
    mine = [result for result in fold_results if result.task.init == index]
    entries = [result.entry for result in mine]
    return {
        "name": init.label,
        "init": init.spec,
        "init_report": report,
        "mean": init.mean,
        "std": init.std,
        "folds": entries,
        "summary": _across_folds(entries),
        "pooled": _summary_of_images([row for result in mine for row in result.rows]),
        "seconds": round(sum(e[f"{part}_seconds"] for e in entries for part in FOLD_PARTS), 1),
        "pretraining_overlap": pretraining_overlap(init.spec, data.pairs),
    }


def segment(config: SegmentConfig) -> int:
    """Run the cross-validation of ``config``; writes results.json, results.md, per_image.csv and overlays.

    ``config.postprocess`` None is resolved here, once the data says whether head circumferences are given."""
    started = time.perf_counter()
    device = resolve_device(config.device)
    inits, reports = _resolve_inits(config)
    data = load_data(config)
    load_seconds = time.perf_counter() - started
    if config.postprocess is None:
        config = dataclasses.replace(config, postprocess=data.hc_available)
    splits = grouped_stratified_kfold(
        np.zeros(len(data.pairs), dtype=np.int64), np.asarray(data.groups), config.folds, config.seed
    )
    tasks = [
        FoldTask(init, k, np.asarray(train), np.asarray(test))
        for init in range(len(inits))
        for k, (train, test) in enumerate(splits)
    ]
    claim(config.out, SEGMENTATION, overwrite=config.overwrite)
    fold_results = run_folds(data, inits, config, tasks)

    results: dict[str, Any] = {
        "schema": SCHEMA,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "config": {**config.to_dict(), "device": str(device)},
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device)},
        "data": _data_section(data, splits),
        "inits": [_init_entry(index, init, report, fold_results, data) for index, (init, report) in
                  enumerate(zip(inits, reports))],
    }  # fmt: skip
    rows = [row for result in fold_results for row in result.rows]
    if config.pixel_size is not None:
        method_errors = [
            abs(row["hc_fit_on_truth_mm"] - row["hc_true_mm"])
            for row in rows
            if row["init"] == inits[0].label and math.isfinite(row["hc_true_mm"])
        ]
        results["data"]["hc_fit_on_truth_abs_error_mm"] = sm.summarize(method_errors)
    entries = [result.entry for result in fold_results]
    results["timing"] = {
        "jobs": config.jobs,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "load_seconds": round(load_seconds, 1),
        **{f"{part}_seconds": round(sum(e[f"{part}_seconds"] for e in entries), 1) for part in FOLD_PARTS},
    }
    results["wall_seconds"] = results["timing"]["wall_seconds"]

    write_json(config.out / "results.json", results)
    write_markdown(config.out / "results.md", results)
    _write_per_image(config.out / "per_image.csv", rows)
    print((config.out / "results.md").read_text())
    return EXIT_SKIPPED if data.skipped else EXIT_OK
