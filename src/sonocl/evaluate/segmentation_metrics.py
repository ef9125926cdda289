"""Segmentation metrics on boolean masks (numpy/scipy): Dice, IoU, HD95, ellipse fit and head circumference.

Conventions for empty masks (documented in docs/segment.md):

- Dice and IoU are 1 when prediction and ground truth are both empty (nothing to find, nothing found), 0 when
  exactly one is empty.
- HD95 is 0 when both are empty; when exactly one is empty it is the image diagonal (the largest distance
  possible in the image), so a missed or hallucinated structure is penalised and means stay finite.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import ndimage


def _check(prediction: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    prediction = np.asarray(prediction, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction {prediction.shape} and ground truth {truth.shape} differ in shape")
    return prediction, truth


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """2|P∩T| / (|P| + |T|); 1 when both are empty."""
    prediction, truth = _check(prediction, truth)
    total = int(prediction.sum()) + int(truth.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(prediction, truth).sum()) / total


def iou(prediction: np.ndarray, truth: np.ndarray) -> float:
    """|P∩T| / |P∪T|; 1 when both are empty."""
    prediction, truth = _check(prediction, truth)
    union = int(np.logical_or(prediction, truth).sum())
    if union == 0:
        return 1.0
    return int(np.logical_and(prediction, truth).sum()) / union


def boundary(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-connected neighbour outside it (pixels on the image border count as boundary)."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask.copy()
    eroded = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(2, 1), border_value=0)
    return mask & ~eroded


def surface_distances(source: np.ndarray, target: np.ndarray, spacing: float = 1.0) -> np.ndarray:
    """Distance from each boundary pixel of ``source`` to the nearest boundary pixel of ``target`` (both non-empty)."""
    source_border = boundary(source)
    target_border = boundary(target)
    distance_to_target = ndimage.distance_transform_edt(~target_border, sampling=spacing)
    return distance_to_target[source_border]


def hd95(prediction: np.ndarray, truth: np.ndarray, spacing: float = 1.0) -> float:
    """95th percentile of the symmetric boundary distances (medpy's definition), in pixels × ``spacing``.

    Both empty → 0; exactly one empty → the image diagonal × ``spacing``.
    """
    prediction, truth = _check(prediction, truth)
    has_prediction, has_truth = bool(prediction.any()), bool(truth.any())
    if not has_prediction and not has_truth:
        return 0.0
    if has_prediction != has_truth:
        return math.hypot(*prediction.shape) * spacing
    distances = np.concatenate(
        [surface_distances(prediction, truth, spacing), surface_distances(truth, prediction, spacing)]
    )
    return float(np.percentile(distances, 95))


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of ``mask`` with its holes filled (empty stays empty)."""
    mask = np.asarray(mask, dtype=bool)
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return mask.copy()
    sizes = np.bincount(labels.ravel())[1:]
    component = labels == (int(np.argmax(sizes)) + 1)
    return ndimage.binary_fill_holes(component)


@dataclasses.dataclass(frozen=True)
class Ellipse:
    """Centre (x, y) in pixels, semi-axes a ≥ b in pixels, angle of the major axis in radians (from +x, towards +y)."""

    center_x: float
    center_y: float
    semi_major: float
    semi_minor: float
    angle: float

    def circumference(self, pixel_size: float = 1.0) -> float:
        """Ramanujan's first approximation π[3(a+b) − √((3a+b)(a+3b))], × ``pixel_size``."""
        a, b = self.semi_major, self.semi_minor
        return math.pi * (3 * (a + b) - math.sqrt((3 * a + b) * (a + 3 * b))) * pixel_size


def fit_ellipse(mask: np.ndarray) -> Ellipse | None:
    """The ellipse with the same area centroid and second moments as the filled largest component of ``mask``.

    A filled ellipse with semi-axes a, b has coordinate variances a²/4 and b²/4 along its axes, so the
    semi-axes are twice the square roots of the covariance eigenvalues. Pixels are treated as unit squares
    (variance + 1/12), which matters for small masks. ``None`` when the mask is empty.
    """
    component = largest_component(mask)
    ys, xs = np.nonzero(component)
    if xs.size == 0:
        return None
    coordinates = np.stack([xs, ys]).astype(np.float64)
    center = coordinates.mean(axis=1)
    covariance = np.cov(coordinates, bias=True) + np.eye(2) / 12.0
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    minor, major = np.sqrt(np.clip(eigenvalues, 0.0, None)) * 2.0
    angle = math.atan2(eigenvectors[1, 1], eigenvectors[0, 1])
    return Ellipse(float(center[0]), float(center[1]), float(major), float(minor), angle)


def head_circumference(mask: np.ndarray, pixel_size: float) -> float:
    """Circumference (mm) of the ellipse fitted to the mask's largest component; NaN for an empty mask."""
    ellipse = fit_ellipse(mask)
    return float("nan") if ellipse is None else ellipse.circumference(pixel_size)


def summarize(values: list[float] | np.ndarray) -> dict[str, float | int | None]:
    """mean, sample std (ddof=1; 0 for one value), median and n of the finite values; ``None`` when there are none."""
    array = np.asarray(values, dtype=np.float64)
    array = array[np.isfinite(array)]
    if array.size == 0:
        return {"mean": None, "std": None, "median": None, "n": 0}
    return {
        "mean": float(array.mean()),
        "std": float(array.std(ddof=1)) if array.size > 1 else 0.0,
        "median": float(np.median(array)),
        "n": int(array.size),
    }
