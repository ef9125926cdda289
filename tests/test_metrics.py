"""Classification metrics against hand-computed values (and scikit-learn where it has the same definition)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score

from sonocl.evaluate.metrics import (
    classification_metrics,
    confusion_matrix,
    mean_std,
    one_vs_rest_auc,
    pooled_metrics,
    video_level,
)

LABELS = np.array([0, 0, 1, 1, 2, 2])
PREDICTED = np.array([0, 1, 1, 1, 2, 0])


def _one_hot(predicted: np.ndarray, num_classes: int = 3) -> np.ndarray:
    return np.eye(num_classes)[predicted] * 0.7 + 0.1


def test_hand_computed_three_class():
    # confusion: [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    result = classification_metrics(LABELS, _one_hot(PREDICTED), ["a", "b", "c"])
    assert result["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert result["accuracy"] == pytest.approx(4 / 6)
    # precision 1/2, 2/3, 1/1; recall 1/2, 2/2, 1/2; F1 1/2, 4/5, 2/3
    per_class = result["per_class"]
    assert [per_class[n]["precision"] for n in "abc"] == pytest.approx([0.5, 2 / 3, 1.0])
    assert [per_class[n]["recall"] for n in "abc"] == pytest.approx([0.5, 1.0, 0.5])
    assert [per_class[n]["f1"] for n in "abc"] == pytest.approx([0.5, 0.8, 2 / 3])
    assert [per_class[n]["support"] for n in "abc"] == [2, 2, 2]
    assert result["balanced_accuracy"] == pytest.approx(2 / 3)
    assert result["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)


def test_hand_computed_auc_and_absent_class():
    labels = np.array([0, 0, 1, 1])
    # class-1 scores 0.1, 0.6 (negatives) vs 0.4, 0.9 (positives): 3 of 4 pairs ordered → AUC 0.75
    probabilities = np.array([[0.9, 0.1, 0.0], [0.4, 0.6, 0.0], [0.6, 0.4, 0.0], [0.1, 0.9, 0.0]])
    aucs = one_vs_rest_auc(labels, probabilities)
    assert aucs[1] == pytest.approx(0.75) and aucs[0] == pytest.approx(0.75)
    assert aucs[2] is None  # class 2 absent from this fold
    result = classification_metrics(labels, probabilities)
    assert result["macro_auc"] == pytest.approx(0.75)
    # an absent class that is never predicted does not dilute balanced accuracy or macro-F1
    assert result["balanced_accuracy"] == pytest.approx(0.5 * (0.5 + 0.5))
    assert result["per_class"]["2"]["support"] == 0


def test_matches_sklearn_on_random_predictions():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 200)
    probabilities = rng.dirichlet(np.ones(4), 200)
    result = classification_metrics(labels, probabilities)
    predicted = probabilities.argmax(1)
    assert result["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, predicted))
    assert result["macro_f1"] == pytest.approx(f1_score(labels, predicted, average="macro", zero_division=0))


def test_video_level_mean_of_frame_probabilities():
    probabilities = np.array([[0.8, 0.2], [0.4, 0.6], [0.1, 0.9], [0.3, 0.7]])
    ids, labels, video_probs = video_level(probabilities, np.array([0, 0, 1, 1]), np.array([5, 5, 2, 2]))
    assert ids.tolist() == [2, 5] and labels.tolist() == [1, 0]
    np.testing.assert_allclose(video_probs, [[0.2, 0.8], [0.6, 0.4]])
    with pytest.raises(ValueError):
        video_level(probabilities, np.array([0, 1, 1, 1]), np.array([5, 5, 2, 2]))


def test_pooled_confusion_is_a_micro_average():
    fold1 = confusion_matrix(np.array([0, 0, 1]), np.array([0, 0, 0]), 2)  # 2/3 correct
    fold2 = confusion_matrix(np.array([1]), np.array([1]), 2)  # 1/1 correct
    pooled = pooled_metrics([fold1, fold2], ["x", "y"])
    assert pooled["confusion"] == [[2, 0], [1, 1]]
    assert pooled["accuracy"] == pytest.approx(3 / 4)  # not the mean of fold accuracies (5/6)


def test_mean_std():
    assert mean_std([1.0, 3.0]) == {"mean": 2.0, "std": pytest.approx(np.sqrt(2.0)), "n": 2}
    assert mean_std([0.5, None]) == {"mean": 0.5, "std": 0.0, "n": 1}
    assert mean_std([None]) == {"mean": None, "std": None, "n": 0}
