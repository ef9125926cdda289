from __future__ import annotations

import numpy as np
import pytest

from sonocl.data.splits import grouped_holdout, grouped_stratified_kfold


def _grouped_example(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """60 videos of 17 patients (1 to 7 videos each), 3 unbalanced classes, some unlabelled; one class per patient."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 8, size=17)
    groups = np.repeat([f"patient{g:02d}" for g in range(17)], sizes)[:60]
    patient_class = rng.choice([0, 0, 0, 1, 1, 2], size=17)
    labels = patient_class[np.unique(groups, return_inverse=True)[1]]
    labels[rng.random(labels.size) < 0.15] = -1
    return labels, groups


def test_kfold_never_leaks_and_covers_everything():
    labels, groups = _grouped_example()
    folds = grouped_stratified_kfold(labels, groups, n_splits=5, seed=0)
    assert len(folds) == 5
    test_count = np.zeros(labels.size, dtype=int)
    for train, test in folds:
        assert len(test) > 0
        assert np.intersect1d(train, test).size == 0
        np.testing.assert_array_equal(np.union1d(train, test), np.arange(labels.size))
        assert not set(groups[train]) & set(groups[test]), "a group on both sides of a fold"
        test_count[test] += 1
    assert (test_count == 1).all(), "every video, unlabelled ones included, in exactly one test fold"


def test_kfold_stratifies_singleton_groups_within_one():
    labels = np.array([0] * 23 + [1] * 9 + [2] * 4 + [-1] * 3)
    groups = np.arange(labels.size)
    for seed in range(5):
        folds = grouped_stratified_kfold(labels, groups, n_splits=5, seed=seed)
        for _, test in folds:
            for label, total in ((0, 23), (1, 9), (2, 4)):
                assert abs(np.sum(labels[test] == label) - total / 5) <= 1
        sizes = [len(test) for _, test in folds]
        assert max(sizes) - min(sizes) <= 1


def test_kfold_stratifies_patients_within_one_group():
    # 24 patients of 2 videos each; classes 12 / 8 / 4 patients.
    patient_class = np.array([0] * 12 + [1] * 8 + [2] * 4)
    labels, groups = np.repeat(patient_class, 2), np.repeat(np.arange(24), 2)
    for _, test in grouped_stratified_kfold(labels, groups, n_splits=4, seed=1):
        for label, total in ((0, 24), (1, 16), (2, 8)):
            assert abs(np.sum(labels[test] == label) - total / 4) <= 2


def test_kfold_is_deterministic_by_seed_and_seeds_differ():
    labels, groups = _grouped_example()

    def test_sets(seed: int) -> list[list[int]]:
        return [test.tolist() for _, test in grouped_stratified_kfold(labels, groups, n_splits=4, seed=seed)]

    assert test_sets(3) == test_sets(3)
    assert test_sets(3) != test_sets(4)


def test_kfold_refuses_more_folds_than_groups():
    labels = np.array([0, 1, 0, 1])
    with pytest.raises(ValueError, match="only 2"):
        grouped_stratified_kfold(labels, np.array(["a", "a", "b", "b"]), n_splits=3)
    with pytest.raises(ValueError, match="at least 2 folds"):
        grouped_stratified_kfold(labels, np.arange(4), n_splits=1)
    with pytest.raises(ValueError, match="integer class codes"):
        grouped_stratified_kfold(np.array(["x", "y"]), np.arange(2), n_splits=2)


def test_kfold_works_without_any_label():
    folds = grouped_stratified_kfold(np.full(10, -1), np.arange(10) // 2, n_splits=5)
    assert sorted(len(test) for _, test in folds) == [2] * 5


def test_holdout_holds_out_whole_groups_near_the_fraction():
    labels = np.array([0] * 24 + [1] * 12 + [2] * 4)
    kept, held = grouped_holdout(labels, np.arange(40), fraction=0.25, seed=0)
    assert len(held) == 10 and np.intersect1d(kept, held).size == 0
    np.testing.assert_array_equal(np.union1d(kept, held), np.arange(40))
    assert [np.sum(labels[held] == c) for c in (0, 1, 2)] == [6, 3, 1]

    labels, groups = _grouped_example()
    kept, held = grouped_holdout(labels, groups, fraction=0.3, seed=2)
    assert not set(groups[kept]) & set(groups[held])
    assert 0.2 <= len(held) / labels.size <= 0.4
    again = grouped_holdout(labels, groups, fraction=0.3, seed=2)
    np.testing.assert_array_equal(again[1], held)


def test_holdout_keeps_a_group_on_each_side():
    labels, groups = np.array([0, 0, 1, 1, 1]), np.array([0, 0, 0, 0, 1])
    for fraction in (0.01, 0.99):
        kept, held = grouped_holdout(labels, groups, fraction=fraction)
        assert len(kept) > 0 and len(held) > 0
    with pytest.raises(ValueError, match="strictly between"):
        grouped_holdout(labels, groups, fraction=1.0)
