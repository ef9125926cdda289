"""A fold run of `sonocl segment`, and all of them: train a U-Net on the training images, predict the test images,
score them at their original size.

One fold run (`run_fold`): a fresh encoder (`sonocl.evaluate.inits.load_init`) under a U-Net decoder
(`sonocl.evaluate.unet`) is trained on the fold's training images for ``epochs`` epochs (Adam, cosine schedule,
Dice + BCE, or cross-entropy + Dice for K ≥ 2 classes; joint image + mask augmentation) and the model of the
**last** epoch predicts the test images; no choice is made on them. Predicted probabilities are resized back to each
image's original size, thresholded (binary: ``threshold``, by default the value with the best Dice on the fold's
training images, `calibrate_threshold`; K classes: each pixel the class of the highest probability), optionally
post-processed (largest component, holes filled, per class) and scored there against the original mask, class by
class (`sonocl.evaluate.segmentation_metrics`); a K-class image's Dice, IoU and HD95 are the means over its classes. `run_folds` runs every fold run through the evaluation engine
(`sonocl.evaluate.engine`): kept in ``OUT/folds`` as each finishes, read back by a rerun with the same settings,
in ``jobs`` worker processes if asked.
"""

from __future__ import annotations

import dataclasses
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

from sonocl.errors import ConfigError
from sonocl.evaluate import cache
from sonocl.evaluate import segmentation_metrics as sm
from sonocl.evaluate.engine import FoldCache, FoldTask, run_fold_tasks
from sonocl.evaluate.inits import load_init
from sonocl.evaluate.masks import read_grey
from sonocl.evaluate.segment_config import SegmentConfig
from sonocl.evaluate.segment_data import SegmentData, SegmentDataError
from sonocl.evaluate.unet import JointAugment, UNet, segmentation_loss
from sonocl.files import atomic_write_text, json_text
from sonocl.progress import progress_report
from sonocl.runtime import resolve_device

METRICS = ("dice", "iou", "hd95_px", "hd95_mm", "hc_abs_error_mm")
"""The metrics of each image summarised per fold and over the images (`summary_of_images`); with K ≥ 2 classes the
first four are the means over the classes, and each class has its own (`metric_names`)."""
CLASS_METRICS = ("dice", "iou", "hd95_px", "hd95_mm")
FOLD_PARTS = ("train", "calibrate", "predict", "score")
"""Where a fold run's time goes (``PART_seconds`` in results.json): calibrate = predicting and scoring the training
images for the threshold; score = scoring the test images at their original size (and their overlays)."""
THRESHOLDS = tuple(round(0.30 + 0.05 * k, 2) for k in range(11))
"""The candidate foreground thresholds of the calibration on the training images (`calibrate_threshold`)."""


@dataclasses.dataclass(frozen=True)
class InitSpec:
    """One init as a fold run needs it: its label, ``--init`` value and normalisation."""

    label: str
    spec: str
    mean: float
    std: float
    weights: str = ""
    """The identity of the weights loaded (`sonocl.evaluate.cache.init_digest`)."""


@dataclasses.dataclass
class FoldResult:
    """A finished fold run: its results.json ``folds`` entry and its per-image rows."""

    task: FoldTask
    entry: dict[str, Any]
    rows: list[dict[str, Any]]


# ------------------------------------------------------------------------------------------- training, scoring


def metric_names(classes: tuple[str, ...]) -> tuple[str, ...]:
    """The metrics of a task with these foreground classes: `METRICS`, and ``dice_NAME`` … of each of K ≥ 2."""
    if len(classes) == 1:
        return METRICS
    return METRICS + tuple(f"{metric}_{name}" for name in classes for metric in CLASS_METRICS)


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
    """Train ``model`` on uint8 images and class-index masks (N, 1, S, S) on the CPU; returns the last epoch's mean
    loss."""
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
    classes = max(model.head.out_channels - 1, 1)
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
                y = masks[index].to(device)
                x, y = augment(x, y, generator, classes)
                x = (x - mean) / std
                if config.channels != 1:
                    x = x.expand(-1, config.channels, -1, -1)
                loss = segmentation_loss(model(x), y)
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
    """Probabilities on the CPU for uint8 images (N, 1, S, S): of the foreground (N, 1, S, S) for one class, of the
    background and each class (N, K + 1, S, S) for K ≥ 2."""
    model.eval()
    outputs = []
    for start in range(0, images.shape[0], batch_size):
        x = _normalise(images[start : start + batch_size].to(device), mean, std, channels)
        logits = model(x).float()
        outputs.append((torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)).cpu())
    return torch.cat(outputs)


def to_original_size(probability: torch.Tensor, shape: tuple[int, int]) -> np.ndarray:
    """(C, S, S) probabilities → float (C, H, W): bilinear resize to the original size, where masks are scored."""
    return F.interpolate(probability[None], size=shape, mode="bilinear", align_corners=False)[0].numpy()


def scored_masks(probability: np.ndarray, threshold: float | None, postprocess: bool) -> np.ndarray:
    """The masks that are scored, bool (K, H, W), from probabilities (C, H, W): one class, its probability >
    threshold; K ≥ 2, each pixel the class of the highest probability; post-processed (`sm.largest_component`) class
    by class if asked."""
    if probability.shape[0] == 1:
        planes = probability > threshold
    else:
        winner = probability.argmax(axis=0)
        planes = winner[None] == np.arange(1, probability.shape[0])[:, None, None]
    return np.stack([sm.largest_component(plane) for plane in planes]) if postprocess else planes


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
        totals += dice_by_threshold(to_original_size(probabilities[j], data.shapes[i])[0], data.truth(i)[0])
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


def score_image(
    prediction: np.ndarray,
    truth: np.ndarray,
    pixel: dict[str, float] | None,
    classes: tuple[str, ...] = ("foreground",),
) -> dict[str, Any]:
    """The metrics of one image from its predicted and true class planes, bool (K, H, W): for one class those of
    `score_mask`; for K ≥ 2 each class's Dice, IoU, HD95 and areas (``dice_NAME`` …) and their means over the
    classes as ``dice``, ``iou``, ``hd95_px``, ``hd95_mm`` (a class absent from both counts as found: Dice 1, HD95 0)."""
    if len(classes) == 1:
        return score_mask(prediction[0], truth[0], pixel)
    rows = [score_mask(p, t, pixel, circumference=False) for p, t in zip(prediction, truth)]
    row: dict[str, Any] = {metric: float(np.mean([r[metric] for r in rows])) for metric in CLASS_METRICS}
    row.update({key: rows[0][key] for key in ("pixel_size_mm", "hc_true_mm", "hc_pred_mm", "hc_abs_error_mm")})
    row["hc_fit_on_truth_mm"] = float("nan")
    for name, mine in zip(classes, rows):
        row.update({f"{key}_{name}": mine[key] for key in (*CLASS_METRICS, "pred_area_px", "true_area_px")})
    return row


def score_mask(
    prediction: np.ndarray, truth: np.ndarray, pixel: dict[str, float] | None, circumference: bool = True
) -> dict[str, Any]:
    """Dice, IoU, HD95 (px, and mm with a pixel size), areas and (with ``circumference``) the head circumference of
    one predicted mask against the true one, bool (H, W)."""
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
        if not circumference:
            return row
        row["hc_pred_mm"] = sm.head_circumference(prediction, spacing)
        row["hc_fit_on_truth_mm"] = sm.head_circumference(truth, spacing)
        if "hc_mm" in pixel:
            row["hc_true_mm"] = pixel["hc_mm"]
            # an empty prediction has no circumference: count it as the whole circumference missed
            predicted = row["hc_pred_mm"] if math.isfinite(row["hc_pred_mm"]) else 0.0
            row["hc_abs_error_mm"] = abs(predicted - pixel["hc_mm"])
    return row


def write_overlay(path: Path, image: np.ndarray, truth: np.ndarray, prediction: np.ndarray) -> None:
    """The grey image with the ground-truth contours in green and the predicted contours in red (2 px wide), of every
    class plane of ``truth`` and ``prediction`` (K, H, W)."""
    rgb = np.repeat(image[..., None], 3, axis=2).copy()
    for masks, colour in ((truth, (0, 255, 0)), (prediction, (255, 0, 0))):
        for mask in masks:
            contour = ndimage.binary_dilation(sm.boundary(mask), iterations=1)
            rgb[contour] = colour
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "item"


def summary_of_images(rows: list[dict[str, Any]], metrics: tuple[str, ...] = METRICS) -> dict[str, Any]:
    """Each of ``metrics`` (`metric_names`) summarised over the images of ``rows`` (`sm.summarize`)."""
    return {metric: sm.summarize([row[metric] for row in rows]) for metric in metrics}


# --------------------------------------------------------------------------------------------------- fold runs


def run_fold(
    data: SegmentData, init: InitSpec, config: SegmentConfig, task: FoldTask, bar_position: int = 0
) -> FoldResult:
    """Train, predict and score one fold; seeded by (seed, fold) only, so any process gives the same run."""
    device = resolve_device(config.device)
    seed = config.seed * 1000 + task.fold
    torch.manual_seed(seed)  # the random init's weights and the decoder's
    backbone, _ = load_init(init.spec, config.backbone, config.channels, config.size)
    model = UNet(backbone, classes=data.classes).to(device)
    description = f"{init.label} fold {task.fold + 1}/{task.folds}"
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
    if threshold is None and data.task.binary:
        train_probabilities = predict(
            model, data.images[task.train], init.mean, init.std, config.channels, device, config.batch_size
        )
        threshold, train_dice = calibrate_threshold(train_probabilities, task.train, data)
    calibrated = time.perf_counter()
    probabilities = predict(
        model, data.images[task.test], init.mean, init.std, config.channels, device, config.batch_size
    )
    predicted = time.perf_counter()
    rows = score_test_images(probabilities, threshold, data, init, config, task)
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
        "metrics": summary_of_images(rows, metric_names(data.task.classes)),
    }
    tqdm.write(
        f"{description}: Dice {entry['metrics']['dice']['mean']:.3f} ({scored - started:.0f} s)", file=sys.stderr
    )
    return FoldResult(task, entry, rows)


def score_test_images(
    probabilities: torch.Tensor,
    threshold: float | None,
    data: SegmentData,
    init: InitSpec,
    config: SegmentConfig,
    task: FoldTask,
) -> list[dict[str, Any]]:
    """The per-image rows of a fold's test images, scored at their original size; the overlays of the first
    ``config.overlays`` images."""
    rows = []
    for j, i in enumerate(task.test):
        prediction = scored_masks(
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
        row.update(score_image(prediction, truth, data.pixels[i], data.task.classes))
        rows.append(row)
        if i < config.overlays:
            write_overlay(
                config.out / "overlays" / _safe_name(init.label) / f"{_safe_name(data.pairs[i].relative)}.png",
                read_grey(data.pairs[i].image),
                truth,
                prediction,
            )
    return rows


def run_folds(
    data: SegmentData, inits: list[InitSpec], config: SegmentConfig, tasks: list[FoldTask]
) -> list[FoldResult]:
    """Every fold run, in the order of ``tasks`` (init-major); with ``config.jobs > 1`` in that many spawned worker
    processes, each with an equal share of torch's threads (`sonocl.workers.map_unordered`, as `sonocl evaluate
    --jobs`). A run's result does not depend on the process that ran it, up to float rounding from a different thread
    count. Each is kept in ``OUT/folds/init<I>_fold<K>.json`` as it finishes, and read back by a rerun with the same
    settings, init, images and masks."""
    results: list[FoldResult] = []

    def announce(read_back: int, total: int) -> None:
        if read_back:
            print(f"sonocl segment: {read_back} of {total} fold runs read back from {config.out / 'folds'}",
                  file=sys.stderr)  # fmt: skip

    run_fold_tasks(
        tasks,
        cache=FoldCache(
            lambda task: config.out / "folds" / f"init{task.init}_fold{task.fold}.json",
            lambda task: fold_key(config, inits[task.init], task, data),
            _read_fold,
            _write_fold,
        ),
        run_here=lambda task: run_fold(data, inits[task.init], config, task),
        worker=_fold_in_worker,
        shared={"data": data, "models": inits, "config": config},
        jobs=config.jobs,
        on_result=results.append,
        announce=announce,
    )
    return sorted(results, key=lambda result: (result.task.init, result.task.fold))


def fold_key(config: SegmentConfig, init: InitSpec, task: FoldTask, data: SegmentData) -> dict[str, str]:
    """What a fold run depends on (`sonocl.evaluate.cache`): the settings (not where or how many at once it ran) and
    its test images, the images and masks, the init's weights."""
    settings = {k: v for k, v in config.to_dict().items() if k not in ("out", "jobs", "device", "overwrite")}
    init_settings = {k: v for k, v in dataclasses.asdict(init).items() if k != "weights"}
    return cache.fold_key({"config": settings, "init": init_settings, "test": task.test.tolist()}, data.digest,
                          init.weights)  # fmt: skip


def _write_fold(path: Path, key: str, result: FoldResult) -> None:
    record = {"key": key, "entry": result.entry, "rows": result.rows}
    atomic_write_text(path, json_text(record, nan=True))  # NaN kept: the cache gives back the floats it was given


def _read_fold(path: Path, task: FoldTask) -> tuple[str, FoldResult]:
    record = json.loads(path.read_text(encoding="utf-8"))
    return str(record.get("key")), FoldResult(task, record["entry"], record["rows"])


def _fold_in_worker(task: FoldTask, state: dict[str, Any]) -> FoldResult:
    return run_fold(state["data"], state["models"][task.init], state["config"], task, state["bar_position"])
