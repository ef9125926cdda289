"""Classification metrics (plain numpy, AUC from scikit-learn): frame- and video-level, per fold and pooled.

Conventions (each matches scikit-learn with ``zero_division=0`` where it has an equivalent):

- ``accuracy``: correct / total.
- ``balanced_accuracy``: mean recall over the classes present in the true labels.
- ``macro_f1``: mean F1 over the classes present in the true labels or the predictions.
- per class ``precision``, ``recall``, ``f1`` (0 where undefined) and ``support`` (true count), for every class.
- ``auc``: one-vs-rest ROC AUC per class, ``None`` for a class absent from the true labels (or the only class);
  ``macro_auc`` is the mean over the classes where it is defined (``None`` if none).
- ``confusion``: rows = true class, columns = predicted class.

Video-level metrics use the mean of a video's frame probabilities (`video_level`). The papers' "Total acc"
is the accuracy of the confusion matrix summed over folds (`pooled_metrics`), a micro-average over folds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """``(C, C)`` int64 counts, rows = true class, columns = predicted class."""
    labels = np.asarray(labels, dtype=np.int64)
    predicted = np.asarray(predicted, dtype=np.int64)
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels, predicted), 1)
    return matrix


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    numerator = numerator.astype(np.float64)
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)


def metrics_from_confusion(matrix: np.ndarray, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro-F1 and per-class precision/recall/F1/support of a confusion matrix."""
    matrix = np.asarray(matrix, dtype=np.int64)
    num_classes = matrix.shape[0]
    names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
    true_positive = np.diag(matrix)
    support = matrix.sum(axis=1)
    predicted_count = matrix.sum(axis=0)
    precision = _ratio(true_positive, predicted_count)
    recall = _ratio(true_positive, support)
    f1 = _ratio(2 * precision * recall, precision + recall)
    present = support > 0
    seen = present | (predicted_count > 0)
    total = int(matrix.sum())
    return {
        "n": total,
        "accuracy": float(true_positive.sum() / total) if total else float("nan"),
        "balanced_accuracy": float(recall[present].mean()) if present.any() else float("nan"),
        "macro_f1": float(f1[seen].mean()) if seen.any() else float("nan"),
        "per_class": {
            name: {
                "precision": float(precision[c]),
                "recall": float(recall[c]),
                "f1": float(f1[c]),
                "support": int(support[c]),
            }
            for c, name in enumerate(names)
        },
        "confusion": matrix.tolist(),
    }


def one_vs_rest_auc(labels: np.ndarray, probabilities: np.ndarray) -> list[float | None]:
    """ROC AUC of each class against the rest; ``None`` where the class is absent from ``labels`` (or is all of it)."""
    labels = np.asarray(labels, dtype=np.int64)
    aucs: list[float | None] = []
    for c in range(probabilities.shape[1]):
        positive = labels == c
        if positive.all() or not positive.any():
            aucs.append(None)
        else:
            aucs.append(float(roc_auc_score(positive, probabilities[:, c])))
    return aucs


def classification_metrics(
    labels: np.ndarray, probabilities: np.ndarray, class_names: Sequence[str] | None = None
) -> dict[str, Any]:
    """All metrics of one set of predictions: ``labels (N,)`` int, ``probabilities (N, C)``; prediction = argmax."""
    labels = np.asarray(labels, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    num_classes = probabilities.shape[1]
    result = metrics_from_confusion(confusion_matrix(labels, probabilities.argmax(axis=1), num_classes), class_names)
    aucs = one_vs_rest_auc(labels, probabilities)
    for auc, name in zip(aucs, result["per_class"]):
        result["per_class"][name]["auc"] = auc
    defined = [a for a in aucs if a is not None]
    result["macro_auc"] = float(np.mean(defined)) if defined else None
    return result


def video_level(
    probabilities: np.ndarray, labels: np.ndarray, videos: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean frame probability per video: ``(video ids (V,), labels (V,), probabilities (V, C))``, ids sorted.

    ``labels`` are per frame and must be constant within a video.
    """
    videos = np.asarray(videos)
    ids, inverse = np.unique(videos, return_inverse=True)
    sums = np.zeros((len(ids), probabilities.shape[1]), dtype=np.float64)
    np.add.at(sums, inverse, probabilities)
    counts = np.bincount(inverse, minlength=len(ids))
    video_labels = np.full(len(ids), -1, dtype=np.int64)
    video_labels[inverse] = labels
    if np.any(video_labels[inverse] != labels):
        raise ValueError("frames of one video carry different labels")
    return ids, video_labels, sums / counts[:, None]


def mean_std(values: Sequence[float | None]) -> dict[str, float | int | None]:
    """Mean and sample standard deviation (ddof = 1; 0 for a single value) of the defined values."""
    defined = np.array([v for v in values if v is not None and not np.isnan(v)], dtype=np.float64)
    if defined.size == 0:
        return {"mean": None, "std": None, "n": 0}
    std = float(defined.std(ddof=1)) if defined.size > 1 else 0.0
    return {"mean": float(defined.mean()), "std": std, "n": int(defined.size)}


SUMMARY_KEYS = ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc")


def summarize(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, float | int | None]]:
    """Mean ± std over runs (folds × seeds) of the headline metrics of `classification_metrics` outputs."""
    return {key: mean_std([run[key] for run in runs]) for key in SUMMARY_KEYS}


def pooled_metrics(matrices: Sequence[np.ndarray], class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Metrics of the confusion matrices summed over folds (and seeds): the papers' "Total acc" and per-class P/R/F1."""
    return metrics_from_confusion(np.sum(np.asarray(matrices, dtype=np.int64), axis=0), class_names)


METRIC_COLUMNS = (
    ("video acc", "video", "accuracy"),
    ("frame acc", "frame", "accuracy"),
    ("video bal. acc", "video", "balanced_accuracy"),
    ("video macro-F1", "video", "macro_f1"),
    ("video AUC", "video", "macro_auc"),
    ("frame bal. acc", "frame", "balanced_accuracy"),
    ("frame macro-F1", "frame", "macro_f1"),
    ("frame AUC", "frame", "macro_auc"),
)
"""(table heading, level, metric) of the comparison tables of ``results.md`` and the report."""


def metric_columns(unit: str = "video") -> tuple[tuple[str, str, str], ...]:
    """`METRIC_COLUMNS` of an evaluation scored per ``unit``: per patient, the patient-level columns come first."""
    if unit != "patient":
        return METRIC_COLUMNS
    patient = tuple((heading.replace("video", "patient"), "patient", key) for heading, level, key in METRIC_COLUMNS[:5]
                    if level == "video")  # fmt: skip
    return (*patient, *METRIC_COLUMNS)


def percent(stats: Mapping[str, Any] | None) -> str:
    """``"87.5 ± 4.2"`` (mean ± std of a `summarize` entry, in %), ``"87.5"`` without a std, ``"–"`` without a mean."""
    if not stats or stats.get("mean") is None:
        return "–"
    std = stats.get("std")
    return f"{100 * stats['mean']:.1f} ± {100 * std:.1f}" if std is not None else f"{100 * stats['mean']:.1f}"
