"""Scoring one segmentation at its original size: sonocl segment's code against the whole-image computation it replaced.

Per test image ``sonocl segment`` upsamples the predicted probability to the original size, thresholds it, keeps
the largest component with holes filled, and computes Dice, IoU, HD95 and the ellipse fits of the prediction and
the truth. The reference side does the same the previous way (`sonocl` before 2026-12-01): ndimage's erosion,
distance transform, labelling and ``binary_fill_holes`` over the whole 800×540 image, and the truth mask read
from its PNG again. Both sides score the same inputs in interleaved rounds and must agree (checked).

Inputs: the first ``--images`` HC18 masks; the "prediction" is each mask shrunk to 64 px (bilinear, antialiased)
with a stray 3×3 blob, as a network's output would be.

    .venv/bin/python benchmarks/segment_scoring.py [--data ../shared/data/hc18] [--images 40] [--rounds 3]

Writes ``benchmarks/out/segment_scoring.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from sonocl.evaluate import segmentation_metrics as sm
from sonocl.evaluate.masks import read_mask
from sonocl.evaluate.segment_folds import score_image, scored_masks, to_original_size

OUT = Path(__file__).resolve().parent / "out" / "segment_scoring.json"
CROSS = ndimage.generate_binary_structure(2, 1)


def _reference_hd95(prediction: np.ndarray, truth: np.ndarray, spacing: float) -> float:
    borders = [mask & ~ndimage.binary_erosion(mask, structure=CROSS, border_value=0) for mask in (prediction, truth)]
    distances = [
        ndimage.distance_transform_edt(~target, sampling=spacing)[source]
        for source, target in ((borders[0], borders[1]), (borders[1], borders[0]))
    ]
    return float(np.percentile(np.concatenate(distances), 95))


def _reference_largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return mask.copy()
    return ndimage.binary_fill_holes(labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:])))


def _reference_circumference(mask: np.ndarray, spacing: float) -> float:
    ys, xs = np.nonzero(mask)
    covariance = np.cov(np.stack([xs, ys]).astype(np.float64), bias=True) + np.eye(2) / 12.0
    b, a = np.sqrt(np.clip(np.linalg.eigvalsh(covariance), 0.0, None)) * 2.0
    return math.pi * (3 * (a + b) - math.sqrt((3 * a + b) * (a + 3 * b))) * spacing


def reference_score(probability: torch.Tensor, mask_file: Path, spacing: float) -> dict[str, float]:
    truth = read_mask(mask_file)
    upsampled = F.interpolate(probability[None], size=truth.shape, mode="bilinear", align_corners=False)[0, 0]
    prediction = _reference_largest_component((upsampled > 0.5).numpy())
    return {
        "dice": sm.dice(prediction, truth),
        "iou": sm.iou(prediction, truth),
        "hd95_px": _reference_hd95(prediction, truth, 1.0),
        "hc_pred_mm": _reference_circumference(prediction, spacing),
        "hc_fit_on_truth_mm": _reference_circumference(truth, spacing),
    }


def sonocl_score(
    probability: torch.Tensor, truth_bits: np.ndarray, shape: tuple[int, int], spacing: float
) -> dict[str, float]:
    truth = np.unpackbits(truth_bits, count=shape[0] * shape[1]).reshape(1, *shape).view(bool)
    prediction = scored_masks(to_original_size(probability, shape), 0.5, postprocess=True)
    return score_image(prediction, truth, {"pixel_size_mm": spacing})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/hc18"))
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    mask_files = sorted((args.data / "masks").glob("*.png"))[: args.images]
    truths = [read_mask(path) for path in mask_files]
    probabilities = []
    for truth in truths:
        small = F.interpolate(
            torch.from_numpy(truth.astype(np.float32))[None, None], size=(64, 64), mode="bilinear", antialias=True
        )[0]
        small[0, 5:8, 5:8] = 1.0  # a stray region for the post-processing to remove
        probabilities.append(small)
    packed = [np.packbits(truth) for truth in truths]
    spacing = 0.1
    for j in range(len(truths)):
        ours = sonocl_score(probabilities[j], packed[j], truths[j].shape, spacing)
        theirs = reference_score(probabilities[j], mask_files[j], spacing)
        for key, value in theirs.items():
            if not math.isclose(ours[key], value, rel_tol=1e-9, abs_tol=1e-9):
                raise AssertionError(f"{mask_files[j].name}: {key} {ours[key]} (sonocl) != {value} (reference)")
    rounds: dict[str, list[float]] = {"sonocl_ms_per_image": [], "reference_ms_per_image": []}
    for _ in range(args.rounds):
        for name, score in (
            ("sonocl_ms_per_image", lambda j: sonocl_score(probabilities[j], packed[j], truths[j].shape, spacing)),
            ("reference_ms_per_image", lambda j: reference_score(probabilities[j], mask_files[j], spacing)),
        ):
            start = time.perf_counter()
            for j in range(len(truths)):
                score(j)
            rounds[name].append(round(1000 * (time.perf_counter() - start) / len(truths), 1))
        print(", ".join(f"{name} {values[-1]}" for name, values in rounds.items()), flush=True)
    medians = {name: statistics.median(values) for name, values in rounds.items()}
    report = {
        "benchmark": "segment_scoring",
        "date": time.strftime("%Y-%m-%d"),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "images": len(truths),
        "image_size": list(truths[0].shape),
        "same_values": True,
        "rounds": rounds,
        "medians": medians,
        "speed_up": round(medians["reference_ms_per_image"] / medians["sonocl_ms_per_image"], 2),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["medians"]), f"speed-up {report['speed_up']}×; wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
