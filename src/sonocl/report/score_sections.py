"""The evaluation's and the segmentation's parts of the `sonocl report` page, each a `page.Section` of an output
folder's results.json and predictions: the comparison table, confusion matrices, per-fold scores, accuracy by epoch,
ROC curves; the segmentation table, per-fold Dice, overlays.
"""

from __future__ import annotations

import csv
import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sonocl.evaluate.config import levels
from sonocl.evaluate.metrics import metric_columns, percent
from sonocl.files import read_json
from sonocl.provenance import where_pretrained
from sonocl.report.inputs import ReportError
from sonocl.report.page import Section, anchor, figure_html

SEGMENTATION_OVERLAYS = 6


def evaluation_section(path: Path) -> Section:
    results = read_json(path / "results.json", ReportError)
    config = results.get("config", {})
    inits = results.get("inits", [])
    classes = list(results.get("classes", []))
    section = Section(anchor("eval", path), f"Evaluation: {path.name}")
    section.text(
        f"Store {results.get('store')}: {results.get('num_videos')} videos, {results.get('num_frames')} frames, classes "
        f"{', '.join(classes)}. Protocol {config.get('protocol')}, recipe {config.get('recipe')} ({config.get('epochs')} "
        f"epochs, {config.get('size')} px), {config.get('folds')} folds × {config.get('seeds')} seed(s) grouped by "
        f"{config.get('group_by')}, epoch selection {config.get('selection')}."
    )
    if results.get("optimistic"):
        section.note("Optimistic numbers: each fold reports its best epoch by test accuracy (the papers' selection).")
    table = _comparison_table(path, inits, config.get("folds", 0) * config.get("seeds", 0))
    section.children.append(table)
    if not inits:
        table.note("results.json lists no inits yet.")
        return section
    section.children += [
        _confusion_section(path, inits, classes),
        _per_fold_section(path, inits),
        _roc_section(path, classes),
    ]
    return section


def _comparison_table(path: Path, inits: list[dict[str, Any]], runs: int) -> Section:
    unit = inits[0].get("unit", "video") if inits else "video"
    columns, scored = metric_columns(unit), levels(unit)
    rows = []
    for entry in inits:
        cells = [percent(entry.get("summary", {}).get(level, {}).get(key, {})) for _, level, key in columns]
        pooled = [
            f"{100 * entry['pooled'][level]['accuracy']:.1f}" for level in scored if level in entry.get("pooled", {})
        ]
        label = entry["label"] + (" (optimistic)" if entry.get("optimistic") else "")
        rows.append([label, where_pretrained(entry.get("pretraining_overlap") or {}), *cells, *pooled])
    table = Section(anchor("table", path), "Comparison table")
    table.table(
        ["init", "pretrained on", *[name for name, _, _ in columns], *[f"pooled {level} acc" for level in scored]],
        rows,
        caption=f"Mean ± std over {runs} fold runs, in %. Pooled = accuracy of the confusion matrix summed over "
        "folds and seeds.",
    )
    return table


def _confusion_section(path: Path, inits: list[dict[str, Any]], classes: list[str]) -> Section:
    from sonocl.report import figures

    confusion = Section(anchor("confusion", path), "Confusion matrices")
    matrices = [
        (f"{entry['label']}, {level} level", np.asarray(entry["pooled"][level]["confusion"]))
        for entry in inits
        for level in ("frame", "video")
        if level in entry.get("pooled", {})
    ]
    confusion.figure(
        figures.png_bytes(figures.confusion_matrices(matrices, classes)),
        "Pooled over folds (and seeds): rows are the true class, columns the predicted one; each cell "
        "shows the count and the share of its row (the class's recall on the diagonal).",
    )
    return confusion


def _per_fold_section(path: Path, inits: list[dict[str, Any]]) -> Section:
    from sonocl.report import figures

    folds = Section(anchor("folds", path), "Per-fold scores")
    scores = {
        entry["label"]: {
            f"{level} accuracy": [
                100 * run[level]["accuracy"]
                for run in entry.get("runs", [])
                if run.get(level, {}).get("accuracy") is not None
            ]
            for level in ("video", "frame")
        }
        for entry in inits
    }
    folds.figure(
        figures.png_bytes(figures.per_fold_scores(scores)),
        "Accuracy of every fold run (folds × seeds) at the video level (mean of the frame probabilities) and "
        "the frame level; the bar is their mean. A wide spread says the table's mean rests on few videos.",
    )
    curves = {
        entry["label"]: [run.get("test_accuracy_by_epoch") or [] for run in entry.get("runs", [])] for entry in inits
    }
    if any(any(r) for r in curves.values()):
        folds.figure(
            figures.png_bytes(figures.accuracy_by_epoch(curves)),
            "Test-fold frame accuracy after each fine-tuning epoch (thin: each fold run; thick: their mean). "
            "Shown for diagnosis only: choosing an epoch from it would select on the test folds.",
        )
    return folds


def _roc_section(path: Path, classes: list[str]) -> Section:
    from sonocl.report import figures

    roc = Section(anchor("roc", path), "ROC curves")
    predictions = path / "predictions.csv"
    if not predictions.is_file():
        roc.note(f"{predictions} is missing: no ROC curves.")
        return roc
    per_init = roc_from_predictions(predictions, classes)
    if per_init:
        roc.figure(
            figures.png_bytes(figures.roc_curves(per_init)),
            "Frame-level one-vs-rest ROC from predictions.csv, pooled over folds (and seeds): each test "
            "frame's predicted probability of the class against whether it belongs to it.",
        )
    else:
        roc.note("predictions.csv has no rows with two classes present.")
    return roc


def roc_from_predictions(
    path: Path, classes: Sequence[str]
) -> dict[str, list[tuple[str, np.ndarray, np.ndarray, float]]]:
    """Per init, per class present among the labels: (class, fpr, tpr, AUC) from ``predictions.csv``."""
    from sklearn.metrics import roc_auc_score, roc_curve

    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    out: dict[str, list[tuple[str, np.ndarray, np.ndarray, float]]] = {}
    for init in dict.fromkeys(row["init"] for row in rows):
        chosen = [row for row in rows if row["init"] == init]
        labels = np.array([row["label"] for row in chosen])
        curves = []
        for name in classes:
            positive = labels == name
            if positive.all() or not positive.any() or f"p_{name}" not in chosen[0]:
                continue
            scores = np.array([float(row[f"p_{name}"]) for row in chosen])
            fpr, tpr, _ = roc_curve(positive, scores)
            curves.append((name, fpr, tpr, float(roc_auc_score(positive, scores))))
        if curves:
            out[init] = curves
    return out


# ---------------------------------------------------------------------------------------- segmentation


def segmentation_section(path: Path) -> Section:
    from sonocl.report import figures

    results = read_json(path / "results.json", ReportError)
    data = results.get("data", {})
    config = results.get("config", {})
    inits = results.get("inits", [])
    section = Section(anchor("seg", path), f"Segmentation: {path.name}")
    section.text(
        f"{data.get('num_images')} images in {data.get('num_groups')} groups, {config.get('folds')}-fold grouped "
        f"CV, input {config.get('size')} px, {config.get('epochs')} epochs; last-epoch model on each test fold."
    )
    hd = "hd95_mm" if data.get("hd95_unit") == "mm" else "hd95_px"
    header = ["init", "Dice", "IoU", "HD95 (mm)" if hd == "hd95_mm" else "HD95 (px)"]
    has_hc = bool(data.get("hc_available"))
    if has_hc:
        header.append("HC abs. error (mm)")
    rows = []
    for entry in inits:
        summary = entry.get("summary", {})
        cells = [
            entry.get("name"),
            _mean_std(summary.get("dice"), 3),
            _mean_std(summary.get("iou"), 3),
            _mean_std(summary.get(hd), 2),
        ]
        if has_hc:
            cells.append(_mean_std(summary.get("hc_abs_error_mm"), 2))
        rows.append(cells)
    section.table(header, rows, caption="Mean ± std over folds of each fold's mean.")
    if data.get("skipped"):
        section.note(f"{len(data['skipped'])} image(s) were skipped (no usable mask); see results.json.")
    per_fold = {
        entry.get("name"): [
            fold["metrics"]["dice"]["mean"]
            for fold in entry.get("folds", [])
            if fold.get("metrics", {}).get("dice", {}).get("mean") is not None
        ]
        for entry in inits
    }
    if any(per_fold.values()):
        section.figure(
            figures.png_bytes(figures.segmentation_scores(per_fold)),
            "Mean Dice of each test fold (points) and their mean (bar).",
        )
    overlays = Section(anchor("overlays", path), "Segmentation overlays")
    section.children.append(overlays)
    folders = sorted(p for p in (path / "overlays").glob("*") if p.is_dir()) if (path / "overlays").is_dir() else []
    if not folders:
        overlays.note("No overlays/ folder.")
    for folder in folders:
        pngs = sorted(folder.glob("*.png"))[:SEGMENTATION_OVERLAYS]
        parts = [figure_html(png.read_bytes(), png.stem, f"{folder.name}: {png.stem}") for png in pngs]
        overlays.body.append(f'<h4>{html.escape(folder.name)}</h4><div class="gallery">{"".join(parts)}</div>')
    if folders:
        overlays.text("Ground-truth contour in green, predicted contour in red, at each image's original size.")
    return section


def _mean_std(stats: dict[str, Any] | None, digits: int) -> str:
    if not stats or stats.get("mean") is None:
        return "–"
    return f"{stats['mean']:.{digits}f} ± {(stats.get('std') or 0):.{digits}f}"
