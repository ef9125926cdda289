"""`sonocl segment`: U-Net segmentation on a pretrained encoder, grouped k-fold cross-validation.

For each ``--init`` and each fold, a U-Net on a fresh encoder is trained on the training folds and the model of the
last epoch predicts the test fold, scored at each image's original size (`sonocl.evaluate.segment_folds`); the
images, masks, groups and pixel sizes are read once (`sonocl.evaluate.segment_data`). ``--jobs N`` trains and
scores fold runs in N spawned single-thread worker processes, with the same results as one process. This module is
the command: its options, the run, and its files (results.json, results.md, per_image.csv; overlays/ come from the
fold runs). See docs/segment.md.

Below the command line everything takes a `SegmentConfig` (`sonocl.evaluate.segment_config`), validated when it
is built.

Exit status: 0 done; 2 nothing was run (bad arguments, no images, images without a usable mask unless
``--skip-bad-masks``); 3 done, but some images were skipped (listed in results.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sonocl.backbones import NAMES_HELP
from sonocl.data.splits import grouped_stratified_kfold
from sonocl.evaluate import cache
from sonocl.evaluate import segmentation_metrics as sm
from sonocl.evaluate.engine import Splits, fold_tasks, markdown_table, write_results
from sonocl.evaluate.inits import load_init
from sonocl.evaluate.masks import MaskPair
from sonocl.evaluate.segment_config import DEFAULT_MEAN, DEFAULT_STD, MASK_CLASSES, SegmentConfig
from sonocl.evaluate.segment_data import SegmentData, load_data
from sonocl.evaluate.segment_folds import (
    FOLD_PARTS,
    THRESHOLDS,
    FoldResult,
    InitSpec,
    metric_names,
    run_folds,
    summary_of_images,
)
from sonocl.options import field_default
from sonocl.outputs import SEGMENTATION, add_overwrite_argument, claim
from sonocl.runtime import resolve_device

SCHEMA = "sonocl.segment/1"
EXIT_OK, EXIT_SKIPPED = 0, 3

# ---------------------------------------------------------------------------------------------------- options


def _default(field: str) -> Any:
    """The default of a `SegmentConfig` field: the option's."""
    return field_default(SegmentConfig, field)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `SegmentConfig`, with its defaults."""
    _data_arguments(parser.add_argument_group("data"))
    _model_arguments(parser.add_argument_group("model"))
    _training_arguments(parser.add_argument_group("training"))
    _output_arguments(parser.add_argument_group("output"))


def _data_arguments(data: argparse._ArgumentGroup) -> None:
    """The images, their masks, groups and pixel sizes."""
    data.add_argument("--images", required=True, type=Path, help="folder of images (searched recursively)")
    data.add_argument(
        "--masks",
        type=Path,
        default=None,
        help="folder of masks: a parallel tree, or the image folder itself (default: --images)",
    )
    data.add_argument(
        "--mask-classes",
        choices=MASK_CLASSES,
        default=_default("mask_classes"),
        help="how mask values are read: binary (one class: value > max / 2), indexed (values 0..K: K classes, e.g. "
        "palette PNGs), or auto: binary for 0 and one other value, indexed for 0..K (default: %(default)s)",
    )
    data.add_argument(
        "--class-names",
        nargs="+",
        default=None,
        help="names of the classes of mask values 1..K, e.g. nerve vessel (default: class1 … classK)",
    )
    data.add_argument(
        "--class-masks",
        nargs="+",
        default=None,
        metavar="NAME=FOLDER",
        help="one folder of binary masks per class instead of --masks, e.g. nerve=masks/nerve vessel=masks/vessel "
        "(each paired with the images as --masks is; a later class wins where two masks overlap)",
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


def _model_arguments(model: argparse._ArgumentGroup) -> None:
    """The inits, their labels, the backbone and the input normalisation."""
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
        help=f"{NAMES_HELP} (default: a sonocl encoder's own, else resnet18)",
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


def _training_arguments(train: argparse._ArgumentGroup) -> None:
    """The folds, the input size, the optimisation, the seed and where fold runs are computed."""
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


def _output_arguments(output: argparse._ArgumentGroup) -> None:
    """Where results go, and how predictions are turned into the masks that are scored."""
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


# -------------------------------------------------------------------------------------------------------- run


def run(args: argparse.Namespace) -> int:
    return segment(SegmentConfig.from_args(args))


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
    claim(config.out, SEGMENTATION, overwrite=config.overwrite)
    fold_results = run_folds(data, inits, config, fold_tasks([(config.seed, splits)], len(inits)))
    results = _results(config, device, data, splits, inits, reports, fold_results)
    entries = [result.entry for result in fold_results]
    results["timing"] = {
        "jobs": config.jobs,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "load_seconds": round(load_seconds, 1),
        **{f"{part}_seconds": round(sum(e[f"{part}_seconds"] for e in entries), 1) for part in FOLD_PARTS},
    }
    results["wall_seconds"] = results["timing"]["wall_seconds"]
    rows = [row for result in fold_results for row in result.rows]
    markdown = render_markdown(results)
    write_results(config.out, results, markdown, "per_image.csv", _csv_rows(rows))
    print(markdown)
    return EXIT_SKIPPED if data.skipped else EXIT_OK


def _resolve_inits(config: SegmentConfig) -> tuple[list[InitSpec], list[dict[str, Any]]]:
    """Load every init once before any training (a bad path fails in seconds): its normalisation and load report."""
    inits, reports = [], []
    for spec, label in zip(config.init, config.labels):
        _, report = load_init(spec, config.backbone, config.channels, config.size)
        print(str(report), file=sys.stderr)
        meta_mean, meta_std = _encoder_normalisation(report.metadata)
        mean = config.mean if config.mean is not None else (meta_mean if meta_mean is not None else DEFAULT_MEAN)
        std = config.std if config.std is not None else (meta_std if meta_std is not None else DEFAULT_STD)
        inits.append(InitSpec(label, spec, mean, std, cache.init_digest(report)))
        reports.append(report.to_dict())
    return inits, reports


def _encoder_normalisation(metadata: dict[str, Any]) -> tuple[float | None, float | None]:
    """The mean and std an encoder file records (a scalar, or the mean of per-channel values), None where none."""

    def scalar(value: Any) -> float | None:
        if value is None:
            return None
        values = value if isinstance(value, (list, tuple)) else [value]
        return float(np.mean([float(v) for v in values]))

    return scalar(metadata.get("mean")), scalar(metadata.get("std"))


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


# ------------------------------------------------------------------------------------------------ results.json


def _results(
    config: SegmentConfig,
    device: torch.device,
    data: SegmentData,
    splits: Splits,
    inits: list[InitSpec],
    reports: list[dict[str, Any]],
    fold_results: list[FoldResult],
) -> dict[str, Any]:
    """results.json but its ``timing``: the settings, the environment, the data and folds, every init's entry."""
    results: dict[str, Any] = {
        "schema": SCHEMA,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "config": {**config.to_dict(), "device": str(device)},
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device)},
        "data": _data_section(data, splits),
        "inits": [_init_entry(index, init, report, fold_results, data) for index, (init, report) in
                  enumerate(zip(inits, reports))],
    }  # fmt: skip
    if config.pixel_size is not None:
        method_errors = [
            abs(row["hc_fit_on_truth_mm"] - row["hc_true_mm"])
            for result in fold_results
            for row in result.rows
            if row["init"] == inits[0].label and math.isfinite(row["hc_true_mm"])
        ]
        results["data"]["hc_fit_on_truth_abs_error_mm"] = sm.summarize(method_errors)
    return results


def _data_section(data: SegmentData, splits: Splits) -> dict[str, Any]:
    """results.json's ``data``: the images, groups, units, skipped files and each fold's test images."""
    return {
        "num_images": len(data.pairs),
        "num_groups": len(set(data.groups)),
        "classes": list(data.task.classes),
        "mask_values": "class indices" if data.task.indexed else "binarised",
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


def _init_entry(
    index: int, init: InitSpec, report: dict[str, Any], fold_results: list[FoldResult], data: SegmentData
) -> dict[str, Any]:
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
        "summary": _across_folds(entries, metric_names(data.task.classes)),
        "pooled": summary_of_images([row for result in mine for row in result.rows], metric_names(data.task.classes)),
        "seconds": round(sum(e[f"{part}_seconds"] for e in entries for part in FOLD_PARTS), 1),
        "pretraining_overlap": pretraining_overlap(init.spec, data.pairs),
    }


def _across_folds(folds: list[dict[str, Any]], metrics: tuple[str, ...]) -> dict[str, Any]:
    """mean ± std over folds of each fold's mean."""
    summary = {}
    for metric in metrics:
        means = [fold["metrics"][metric]["mean"] for fold in folds]
        summary[metric] = sm.summarize([np.nan if m is None else m for m in means])
    return summary


def _csv_rows(rows: list[dict[str, Any]]) -> list[list[Any]]:
    """per_image.csv: the columns of the per-image rows, then their values, a non-finite number left empty."""
    columns = list(rows[0])
    return [columns, *([_cell(row[column]) for column in columns] for row in rows)]


def _cell(value: Any) -> Any:
    return "" if isinstance(value, float) and not math.isfinite(value) else value


# -------------------------------------------------------------------------------------------------- results.md


def _format(summary: dict[str, Any], digits: int) -> str:
    if summary["mean"] is None:
        return "–"
    return f"{summary['mean']:.{digits}f} ± {summary['std']:.{digits}f}"


def _median(summary: dict[str, Any], digits: int) -> str:
    return "–" if summary["median"] is None else f"{summary['median']:.{digits}f}"


def render_markdown(results: dict[str, Any]) -> str:
    """results.md: the init × metric table (mean ± std over folds, median over images), Dice per fold, the settings."""
    config = results["config"]
    lines = [
        f"# sonocl segment — {config['folds']}-fold grouped CV, {results['data']['num_images']} images, "
        f"{results['data']['num_groups']} groups",
        "",
        "Mean ± std (sample, ddof=1) over folds of each fold's mean; median over all test images (each image is "
        "tested once); last-epoch model, no selection on the test fold.",
        "",
        *_metric_table(results),
        "",
        "Dice per fold:",
        "",
        *_dice_table(results),
        "",
        *_settings_lines(results),
    ]
    return "\n".join(lines) + "\n"


def _metric_table(results: dict[str, Any]) -> list[str]:
    """Each init's mean ± std over folds of Dice, IoU, HD95 (and the HC error), and the medians over images."""
    hd_metric = "hd95_mm" if results["data"]["hd95_unit"] == "mm" else "hd95_px"
    hd_label = "HD95 (mm)" if hd_metric == "hd95_mm" else "HD95 (px)"
    classes = results["data"].get("classes", ["foreground"])
    mean = " (mean of classes)" if len(classes) > 1 else ""
    columns = [("dice", f"Dice{mean}", 3), ("iou", f"IoU{mean}", 3), (hd_metric, f"{hd_label}{mean}", 2)]
    columns += [("hc_abs_error_mm", "HC abs. error (mm)", 2)] if results["data"]["hc_available"] else []
    medians = [(metric, label, digits) for metric, label, digits in columns if metric != "iou"]
    if len(classes) > 1:
        columns += [(f"{metric}_{name}", f"{label} {name}", digits) for name in classes
                    for metric, label, digits in (("dice", "Dice", 3), (hd_metric, hd_label, 2))]  # fmt: skip
    header = ["init", *(label for _, label, _ in columns), *(f"{label} median" for _, label, _ in medians)]
    rows = []
    for init in results["inits"]:
        note = init.get("pretraining_overlap", {}).get("note")
        rows.append(
            [
                init["name"] + (f" [{note}]" if note else ""),
                *(_format(init["summary"][metric], digits) for metric, _, digits in columns),
                *(_median(init["pooled"][metric], digits) for metric, _, digits in medians),
            ]
        )
    return markdown_table(header, rows)


def _dice_table(results: dict[str, Any]) -> list[str]:
    """Each init's mean Dice of each fold, and over the pooled images."""
    header = ["init", *(f"fold {k + 1}" for k in range(results["config"]["folds"])), "pooled (images)"]
    rows = [
        [init["name"], *(f"{fold['metrics']['dice']['mean']:.3f}" for fold in init["folds"]),
         _format(init["pooled"]["dice"], 3)]
        for init in results["inits"]
    ]  # fmt: skip
    return markdown_table(header, rows)


def _settings_lines(results: dict[str, Any]) -> list[str]:
    """How the numbers were made: model and training, post-processing, threshold, conventions, HC, time, skips."""
    config, timing = results["config"], results["timing"]
    classes = results["data"].get("classes", ["foreground"])
    lines = [
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
            f"none: {len(classes)} classes ({', '.join(classes)}), each pixel the class of the highest probability."
            if len(classes) > 1
            else f"{config['threshold']} (fixed)."
            if config["threshold"] is not None
            else "calibrated per fold on the training images (best mean Dice): "
            + ", ".join(f"{fold['threshold']:.2f}" for fold in results["inits"][0]["folds"])
            + (" for the first init." if len(results["inits"]) > 1 else ".")
        ),
        "Dice/IoU = 1 and HD95 = 0 when prediction and truth are both empty; HD95 = image diagonal when exactly one is.",
    ]
    if results["data"]["hc_available"]:
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
    return lines
