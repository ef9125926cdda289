"""The report's figures: matplotlib (Agg), readable labels with units, images never stretched.

Every function takes plain numbers (NumPy arrays, lists, dicts) and returns a `matplotlib.figure.Figure`; the
HTML page turns figures into embedded PNGs with `png_bytes`. Categorical colours come from the Okabe–Ito
palette (safe for the common colour-vision deficiencies), continuous ones from viridis / cividis.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any, cast

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (after selecting the Agg backend)
import numpy as np  # noqa: E402
from matplotlib.axis import Axis  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

OKABE_ITO = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")
"""Okabe & Ito (2008) colour-blind-safe categorical palette (blue first; yellow late: it is pale on white)."""
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
DPI = 100

plt.rcParams.update(
    {
        "font.size": 10,
        "axes.titlesize": 11,
        "axes.labelsize": 10,
        "legend.fontsize": 9,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.grid": True,
        "grid.alpha": 0.3,
        "figure.dpi": DPI,
        "savefig.dpi": DPI,
    }
)


def colour(index: int) -> str:
    return OKABE_ITO[index % len(OKABE_ITO)]


def png_bytes(figure: Figure) -> bytes:
    """The figure as PNG bytes; the figure is closed (the pyplot state machine keeps no reference)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight", facecolor="white")
    plt.close(figure)
    return buffer.getvalue()


def _figure(width: float, height: float) -> Figure:
    return plt.figure(figsize=(width, height), layout="constrained")


def _integer_ticks(axis: Axis) -> None:
    """Ticks at whole numbers only on ``axis``, whose default locator (an AutoLocator) is a MaxNLocator."""
    cast(MaxNLocator, axis.get_major_locator()).set_params(integer=True)


def _grid(count: int, columns: int, panel: tuple[float, float]) -> tuple[Figure, np.ndarray]:
    rows = max(1, math.ceil(count / columns))
    columns = min(columns, max(count, 1))
    figure, axes = plt.subplots(
        rows, columns, figsize=(panel[0] * columns, panel[1] * rows), layout="constrained", squeeze=False
    )
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return figure, axes


# ------------------------------------------------------------------------------------------ training


def training_curves(steps: Mapping[str, np.ndarray], epochs: Mapping[str, np.ndarray]) -> Figure:
    """Per-step loss (with its parts) and learning rate; per-epoch validation loss, kNN accuracy and collapse metric.

    ``steps``: ``step`` (optimiser steps done) and any of ``loss``, ``lr``, ``part_<name>``;
    ``epochs``: ``epoch`` and any of ``val_loss``, ``knn_acc``, ``embedding_std``. Absent or all-NaN series are
    left out; a run of a few steps is drawn with markers so that single points stay visible.
    """
    panels: list[tuple[str, Any]] = []
    step = np.asarray(steps.get("step", []), dtype=float)
    parts = sorted(k for k in steps if k.startswith("part_") and _has_values(steps[k]))
    loss_like = [k for k in parts if k[5:] not in ("weight_mean", "weight_std")]
    if _has_values(steps.get("loss")) or loss_like:
        panels.append(("loss", loss_like))
    if _has_values(steps.get("lr")):
        panels.append(("lr", None))
    epoch = np.asarray(epochs.get("epoch", []), dtype=float)
    for key in ("val_loss", "knn_acc", "embedding_std"):
        if _has_values(epochs.get(key)):
            panels.append((key, None))
    figure, axes = _grid(len(panels), 3 if len(panels) > 4 else 2, (4.6, 3.2))
    marker = "o" if len(step) <= 30 else None
    epoch_marker = "o"
    for ax, (key, extra) in zip(axes.flat, panels):
        if key == "loss":
            if _has_values(steps.get("loss")):
                ax.plot(step, steps["loss"], color=colour(0), marker=marker, ms=3, lw=1.4, label="total loss")
            for i, name in enumerate(extra, start=1):
                ax.plot(step, steps[name], color=colour(i), marker=marker, ms=3, lw=1.0, ls="--", label=name[5:])
            ax.set(title="training loss and its parts", xlabel="optimiser step", ylabel="loss (nats)")
            if extra:
                ax.legend(frameon=False)
        elif key == "lr":
            ax.plot(step, steps["lr"], color=colour(0), marker=marker, ms=3)
            ax.set(title="learning rate", xlabel="optimiser step", ylabel="learning rate")
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        elif key == "val_loss":
            ax.plot(epoch, epochs["val_loss"], color=colour(1), marker=epoch_marker)
            ax.set(title="validation loss (held-out videos)", xlabel="epoch", ylabel="InfoNCE loss (nats)")
        elif key == "knn_acc":
            ax.plot(epoch, 100 * np.asarray(epochs["knn_acc"], dtype=float), color=colour(2), marker=epoch_marker)
            ax.set(title="online kNN accuracy (held-out frames)", xlabel="epoch", ylabel="accuracy (%)", ylim=(0, 100))
        elif key == "embedding_std":
            ax.plot(epoch, epochs["embedding_std"], color=colour(3), marker=epoch_marker)
            ax.axhline(1.0, color="0.4", lw=0.8, ls=":")
            ax.set(
                title="collapse metric: std of normalised z × √D",
                xlabel="epoch",
                ylabel="std (1 = spread, 0 = collapsed)",
            )
            ax.set_ylim(bottom=0)
        _integer_ticks(ax.xaxis)
    return figure


def _has_values(values: Any) -> bool:
    if values is None:
        return False
    array = np.asarray(values, dtype=float)
    return bool(array.size) and bool(np.isfinite(array).any())


def cmw_weight_summary(epoch: np.ndarray, mean: np.ndarray, std: np.ndarray) -> Figure:
    """Meta-USCL: mean ± std of the batch's CMW-Net pair weights per epoch (from the per-step training log)."""
    figure = _figure(5.0, 3.2)
    ax = figure.add_subplot()
    ax.errorbar(epoch, mean, yerr=std, color=colour(0), marker="o", capsize=3)
    ax.set(
        title="CMW-Net pair weights per epoch (mean ± std over steps' batches)",
        xlabel="epoch",
        ylabel="pair weight",
        ylim=(0, 1),
    )
    _integer_ticks(ax.xaxis)
    return figure


def weight_histograms(weights_by_epoch: Mapping[str, np.ndarray]) -> Figure:
    """One histogram of CMW-Net pair weights per key (an epoch, or a checkpoint), on a shared [0, 1] axis."""
    figure = _figure(5.0, 3.2)
    ax = figure.add_subplot()
    bins = np.linspace(0, 1, 41).tolist()
    for i, (name, weights) in enumerate(weights_by_epoch.items()):
        ax.hist(weights, bins=bins, histtype="step", lw=1.6, color=colour(i), label=f"{name} (n = {len(weights)})")
    ax.set(title="CMW-Net pair weights", xlabel="pair weight", ylabel="pairs")
    ax.legend(frameon=False)
    return figure


def weight_vs_cosine(
    cosine: np.ndarray, weight: np.ndarray, group: np.ndarray | None = None, group_names: Sequence[str] = ()
) -> Figure:
    """Scatter of each pair's CMW-Net weight against the cosine similarity of its two views' features."""
    figure = _figure(5.0, 3.6)
    ax = figure.add_subplot()
    if group is None:
        ax.scatter(cosine, weight, s=14, color=colour(0), alpha=0.7, edgecolors="none")
    else:
        for i, name in enumerate(group_names):
            chosen = group == i
            ax.scatter(
                cosine[chosen],
                weight[chosen],
                s=14,
                color=colour(i),
                marker=MARKERS[i % len(MARKERS)],
                alpha=0.7,
                edgecolors="none",
                label=name,
            )
        ax.legend(frameon=False)
    if len(cosine) > 2 and np.std(cosine) > 0 and np.std(weight) > 0:
        r = float(np.corrcoef(cosine, weight)[0, 1])
        ax.text(0.02, 0.97, f"Pearson r = {r:.2f}", transform=ax.transAxes, va="top")
    ax.set(
        title="pair weight vs. similarity of the pair",
        xlabel="cosine similarity of h(view 1), h(view 2)",
        ylabel="CMW-Net weight",
        ylim=(0, 1),
    )
    return figure


# ------------------------------------------------------------------------------------------- pairs


def pair_gallery(items: Sequence[Mapping[str, Any]]) -> Figure:
    """Rows of: the k source frames (uint8 ``(S, S)``), then view 1 and view 2 (``(s, s)`` in [0, 1]).

    Each item: ``sources`` list of frames, ``source_titles``, ``views`` (two images), ``view_titles``, ``title``.
    """
    columns = max(len(item["sources"]) for item in items) + 2
    figure, axes = plt.subplots(
        len(items), columns, figsize=(1.9 * columns, 2.25 * len(items)), squeeze=False, layout="constrained"
    )
    for row, item in zip(axes, items):
        k = len(item["sources"])
        for j, ax in enumerate(row):
            ax.axis("off")
            if j < k:
                ax.imshow(item["sources"][j], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
                ax.set_title(item["source_titles"][j], fontsize=8)
            elif j >= columns - 2:
                v = j - (columns - 2)
                ax.imshow(item["views"][v], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
                ax.set_title(item["view_titles"][v], fontsize=8)
        row[0].text(
            -0.08, 0.5, item["title"], transform=row[0].transAxes, rotation=90, ha="right", va="center", fontsize=8
        )
    return figure


# --------------------------------------------------------------------------------------- embeddings


def embedding_map(
    xy: np.ndarray, labels: np.ndarray, label_names: Sequence[str], videos: np.ndarray, method: str
) -> Figure:
    """Two panels of the same 2-D map: coloured by class (``labels`` −1 = unlabelled) and by video index."""
    figure = _figure(10.5, 4.6)
    left, right = figure.subplots(1, 2)
    for i, name in enumerate(label_names):
        chosen = labels == i
        left.scatter(
            xy[chosen, 0],
            xy[chosen, 1],
            s=12,
            color=colour(i),
            marker=MARKERS[i % len(MARKERS)],
            alpha=0.8,
            edgecolors="none",
            label=f"{name} ({int(chosen.sum())})",
        )
    unlabelled = labels < 0
    if unlabelled.any():
        left.scatter(
            xy[unlabelled, 0],
            xy[unlabelled, 1],
            s=10,
            color="0.7",
            alpha=0.6,
            edgecolors="none",
            label=f"unlabelled ({int(unlabelled.sum())})",
        )
    left.legend(frameon=False, markerscale=1.5, loc="best")
    left.set(title=f"{method}, coloured by class", xlabel=f"{method} 1", ylabel=f"{method} 2")
    distinct = np.unique(videos)
    if len(distinct) <= len(OKABE_ITO):
        for i, v in enumerate(distinct):
            chosen = videos == v
            right.scatter(xy[chosen, 0], xy[chosen, 1], s=12, color=colour(i), alpha=0.8, edgecolors="none")
    else:
        points = right.scatter(xy[:, 0], xy[:, 1], s=12, c=videos, cmap="viridis", alpha=0.8, edgecolors="none")
        figure.colorbar(points, ax=right, label="video index in the store")
    right.set(title=f"{method}, coloured by video ({len(distinct)} videos)", xlabel=f"{method} 1", ylabel=f"{method} 2")
    for ax in (left, right):
        ax.set_aspect("equal", adjustable="datalim")
        ax.tick_params(labelbottom=False, labelleft=False)
    return figure


# --------------------------------------------------------------------------------------- evaluation


def confusion_matrices(matrices: Sequence[tuple[str, np.ndarray]], classes: Sequence[str]) -> Figure:
    """One panel per (title, counts ``(C, C)``): rows true, columns predicted; cells show count and row %."""
    figure, axes = _grid(len(matrices), min(2, len(matrices)), (2.4 + 0.5 * len(classes), 2.2 + 0.5 * len(classes)))
    for ax, (title, matrix) in zip(axes.flat, matrices):
        matrix = np.asarray(matrix, dtype=float)
        rows = matrix.sum(axis=1, keepdims=True)
        share = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
        ax.imshow(share, cmap="cividis", vmin=0, vmax=1)
        ax.grid(False)
        for (i, j), count in np.ndenumerate(matrix):
            ax.text(
                j,
                i,
                f"{int(count)}\n{100 * share[i, j]:.0f}%",
                ha="center",
                va="center",
                fontsize=9,
                color="black" if share[i, j] > 0.5 else "white",
            )
        ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
        ax.set_yticks(range(len(classes)), classes)
        ax.set(title=title, xlabel="predicted class", ylabel="true class")
    return figure


def per_fold_scores(
    scores: Mapping[str, Mapping[str, Sequence[float]]],
    ylabel: str = "accuracy (%)",
    ylim: tuple[float, float] = (0, 100),
) -> Figure:
    """Dot plot: for each init (x) and level (colour), every fold run's score and their mean (bar)."""
    inits = list(scores)
    levels = sorted({level for by_level in scores.values() for level in by_level})
    figure = _figure(max(4.5, 1.4 * len(inits) * len(levels) + 1.5), 3.4)
    ax = figure.add_subplot()
    width = 0.8 / max(len(levels), 1)
    rng = np.random.default_rng(0)
    for li, level in enumerate(levels):
        for ii, init in enumerate(inits):
            values = np.asarray(scores[init].get(level, []), dtype=float)
            values = values[np.isfinite(values)]
            if not len(values):
                continue
            x = ii - 0.4 + width * (li + 0.5)
            jitter = rng.uniform(-width * 0.25, width * 0.25, len(values))
            ax.scatter(
                x + jitter,
                values,
                s=22,
                color=colour(li),
                marker=MARKERS[li],
                alpha=0.85,
                edgecolors="none",
                label=level if ii == 0 else None,
                zorder=3,
            )
            ax.hlines(values.mean(), x - width * 0.4, x + width * 0.4, color=colour(li), lw=2.2, zorder=2)
    ax.set_xticks(range(len(inits)), inits)
    ax.set(title="score of each fold run (bar: mean)", ylabel=ylabel, xlabel="encoder init", ylim=ylim)
    ax.set_xlim(-0.6, len(inits) - 0.4)
    ax.legend(frameon=False)
    return figure


def roc_curves(curves: Mapping[str, Sequence[tuple[str, np.ndarray, np.ndarray, float]]]) -> Figure:
    """One panel per init; per class ``(class name, false positive rate, true positive rate, AUC)``, one-vs-rest."""
    figure, axes = _grid(len(curves), min(3, len(curves)), (3.8, 3.6))
    for ax, (init, per_class) in zip(axes.flat, curves.items()):
        for i, (name, fpr, tpr, auc) in enumerate(per_class):
            ax.plot(
                fpr, tpr, color=colour(i), lw=1.6, ls=("-", "--", "-.", ":")[i % 4], label=f"{name} (AUC {auc:.2f})"
            )
        ax.plot([0, 1], [0, 1], color="0.6", lw=0.8, ls=":")
        ax.set(
            title=f"{init}: ROC, one vs. rest (frames)",
            xlabel="false positive rate",
            ylabel="true positive rate",
            xlim=(0, 1),
            ylim=(0, 1.01),
        )
        ax.set_aspect("equal")
        ax.legend(frameon=False, loc="lower right")
    return figure


def accuracy_by_epoch(curves: Mapping[str, Sequence[Sequence[float]]]) -> Figure:
    """Test accuracy of each fold run by fine-tuning epoch, one colour per init (thin: runs, thick: their mean)."""
    figure = _figure(5.2, 3.4)
    ax = figure.add_subplot()
    for i, (init, curve_runs) in enumerate(curves.items()):
        runs = [np.asarray(r, dtype=float) for r in curve_runs if r]
        if not runs:
            continue
        for r in runs:
            ax.plot(np.arange(1, len(r) + 1), 100 * r, color=colour(i), lw=0.7, alpha=0.35)
        length = min(len(r) for r in runs)
        mean = np.mean([r[:length] for r in runs], axis=0)
        ax.plot(np.arange(1, length + 1), 100 * mean, color=colour(i), lw=2.0, label=init)
    ax.set(title="test-fold frame accuracy while fine-tuning", xlabel="epoch", ylabel="accuracy (%)", ylim=(0, 100))
    ax.legend(frameon=False)
    return figure


# ---------------------------------------------------------------------------------------- Grad-CAM


def gradcam_grid(items: Sequence[Mapping[str, Any]], columns: int = 3) -> Figure:
    """Pairs of panels per item: the frame (grey, ``(s, s)`` in [0, 1]) and the frame with its CAM (``(s, s)``
    in [0, 1], ``inferno``) overlaid; ``title`` above each pair."""
    figure, axes = _grid(2 * len(items), 2 * columns, (2.0, 2.3))
    for index, item in enumerate(items):
        image_ax, cam_ax = axes.flat[2 * index], axes.flat[2 * index + 1]
        for ax in (image_ax, cam_ax):
            ax.imshow(item["image"], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.axis("off")
        cam_ax.imshow(item["cam"], cmap="inferno", vmin=0, vmax=1, alpha=0.5, interpolation="bilinear")
        image_ax.set_title(item["title"], fontsize=8.5, loc="left")
    return figure


def segmentation_scores(per_fold: Mapping[str, Sequence[float]]) -> Figure:
    """Dice of each fold (points) and their mean (bar), one column per init."""
    return per_fold_scores(
        {init: {"Dice": list(values)} for init, values in per_fold.items()}, ylabel="Dice", ylim=(0, 1)
    )
