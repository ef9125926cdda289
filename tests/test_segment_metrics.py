"""Segmentation metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from sonocl.evaluate import segmentation_metrics as sm


def _ellipse(shape: tuple[int, int], cx: float, cy: float, a: float, b: float, angle: float = 0.0) -> np.ndarray:
    ys, xs = np.mgrid[: shape[0], : shape[1]].astype(np.float64)
    c, s = math.cos(angle), math.sin(angle)
    u = (xs - cx) * c + (ys - cy) * s
    v = -(xs - cx) * s + (ys - cy) * c
    return (u / a) ** 2 + (v / b) ** 2 <= 1


def test_dice_and_iou_by_hand() -> None:
    prediction = np.array([[1, 1, 0], [0, 1, 0], [0, 0, 0]], dtype=bool)  # 3 pixels
    truth = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 1]], dtype=bool)  # 4 pixels, 2 shared
    assert sm.dice(prediction, truth) == pytest.approx(2 * 2 / (3 + 4))
    assert sm.iou(prediction, truth) == pytest.approx(2 / 5)


def test_empty_conventions() -> None:
    empty = np.zeros((4, 6), dtype=bool)
    full = np.zeros((4, 6), dtype=bool)
    full[1:3, 1:3] = True
    assert sm.dice(empty, empty) == 1.0 and sm.iou(empty, empty) == 1.0 and sm.hd95(empty, empty) == 0.0
    assert sm.dice(full, empty) == 0.0 and sm.iou(empty, full) == 0.0
    assert sm.hd95(full, empty) == pytest.approx(math.hypot(4, 6))
    assert sm.hd95(empty, full, spacing=0.5) == pytest.approx(0.5 * math.hypot(4, 6))


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        sm.dice(np.zeros((3, 3)), np.zeros((3, 4)))


def test_hd95_of_two_shifted_squares() -> None:
    """A 10×10 square and the same square shifted 3 px right.

    A's left column (x = 5) is 3 px from B's nearest boundary pixel (x = 8), B's right column likewise from A's;
    every other boundary pixel is 0–3 px away. So the maximum is 3 and, as more than 5 % of the 72 boundary
    distances equal 3, so is the 95th percentile.
    """
    a = np.zeros((20, 24), dtype=bool)
    a[5:15, 5:15] = True
    b = np.zeros_like(a)
    b[5:15, 8:18] = True
    distances = np.concatenate([sm.surface_distances(a, b), sm.surface_distances(b, a)])
    assert distances.max() == pytest.approx(3.0)
    assert np.sum(distances == 3.0) / distances.size > 0.05
    assert sm.hd95(a, b) == pytest.approx(3.0)
    assert sm.hd95(a, b, spacing=0.2) == pytest.approx(0.6)
    assert sm.hd95(a, a) == 0.0


def test_hd95_is_the_95th_percentile_not_the_maximum() -> None:
    """One far-away stray pixel raises the Hausdorff distance but not HD95."""
    truth = np.zeros((60, 60), dtype=bool)
    truth[10:40, 10:40] = True
    prediction = truth.copy()
    prediction[55, 55] = True
    distances = np.concatenate([sm.surface_distances(prediction, truth), sm.surface_distances(truth, prediction)])
    assert distances.max() == pytest.approx(math.hypot(16, 16))
    assert sm.hd95(prediction, truth) == 0.0


def test_ellipse_fit_and_circumference_within_one_percent() -> None:
    a, b, pixel = 150.0, 100.0, 0.12
    mask = _ellipse((400, 500), cx=260.0, cy=190.0, a=a, b=b, angle=math.radians(30))
    ellipse = sm.fit_ellipse(mask)
    assert ellipse.center_x == pytest.approx(260.0, abs=0.5)
    assert ellipse.center_y == pytest.approx(190.0, abs=0.5)
    assert ellipse.semi_major == pytest.approx(a, rel=0.01)
    assert ellipse.semi_minor == pytest.approx(b, rel=0.01)
    assert math.degrees(ellipse.angle) % 180 == pytest.approx(30.0, abs=1.0)
    true_circumference = math.pi * (3 * (a + b) - math.sqrt((3 * a + b) * (a + 3 * b))) * pixel
    assert sm.head_circumference(mask, pixel) == pytest.approx(true_circumference, rel=0.01)


def test_ramanujan_on_a_circle_and_a_known_ellipse() -> None:
    assert sm.Ellipse(0, 0, 10.0, 10.0, 0).circumference() == pytest.approx(2 * math.pi * 10)
    # a=2, b=1: the exact perimeter is 9.688448…; Ramanujan I is accurate to ~1e-5 here
    assert sm.Ellipse(0, 0, 2.0, 1.0, 0).circumference() == pytest.approx(9.688448, rel=1e-4)


def test_postprocessing_restores_the_circumference_of_a_holed_mask_with_a_stray_blob() -> None:
    """The fit counts every pixel it is given; `largest_component` (the post-processing) drops the stray blob and
    fills the hole, which gives back the clean mask's circumference."""
    mask = _ellipse((300, 300), 150, 150, 80, 60)
    reference = sm.head_circumference(mask, 1.0)
    holed = mask.copy()
    holed[140:160, 140:160] = False  # a hole
    holed[5:9, 5:9] = True  # a small stray blob
    assert sm.head_circumference(holed, 1.0) > reference + 5
    assert np.array_equal(sm.largest_component(holed), mask)
    assert sm.head_circumference(sm.largest_component(holed), 1.0) == pytest.approx(reference)
    assert math.isnan(sm.head_circumference(np.zeros((10, 10), dtype=bool), 1.0))
    assert not sm.largest_component(np.zeros((10, 10), dtype=bool)).any()


def _random_blobs(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """A few smoothed random blobs, some touching the image border, some with holes."""
    return ndimage.gaussian_filter(rng.random(shape), 3) > 0.53


def test_fast_metrics_equal_the_reference_computations() -> None:
    """Boundary (shifted ANDs), surface distances (k-d tree), hole filling (background labels) and the cropped
    post-processing equal ndimage's erosion, distance transform, ``binary_fill_holes`` and a whole-image
    largest component, on masks that touch the border and hold several components and holes."""
    rng = np.random.default_rng(0)
    cross = ndimage.generate_binary_structure(2, 1)
    for _ in range(30):
        prediction, truth = _random_blobs(rng, (70, 90)), _random_blobs(rng, (70, 90))
        reference_boundary = prediction & ~ndimage.binary_erosion(prediction, structure=cross, border_value=0)
        assert np.array_equal(sm.boundary(prediction), reference_boundary)
        edt = ndimage.distance_transform_edt(~sm.boundary(truth), sampling=0.3)
        assert np.allclose(sm.surface_distances(prediction, truth, 0.3), edt[reference_boundary], rtol=1e-12)
        assert np.array_equal(sm.fill_holes(prediction), ndimage.binary_fill_holes(prediction))
        labels, _ = ndimage.label(prediction, structure=np.ones((3, 3), dtype=bool))
        largest = labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
        assert np.array_equal(sm.largest_component(prediction), ndimage.binary_fill_holes(largest))
    blob = np.zeros((40, 50), dtype=bool)
    blob[0:10, 45:50] = True  # in the corner
    assert sm.bounding_box(blob) == (slice(0, 11), slice(44, 51))
    assert sm.bounding_box(np.zeros((4, 4), dtype=bool)) is None


def test_summarize() -> None:
    summary = sm.summarize([1.0, 2.0, 3.0, float("nan")])
    assert summary == {"mean": 2.0, "std": pytest.approx(1.0), "median": 2.0, "n": 3}
    assert sm.summarize([]) == {"mean": None, "std": None, "median": None, "n": 0}
    assert sm.summarize([5.0])["std"] == 0.0
