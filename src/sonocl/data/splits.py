"""Grouped, stratified splits of videos: k-fold and hold-out.

Consecutive frames of a video are near copies and a patient's videos look alike, so any split that
puts one video (or one patient) on both sides leaks and inflates every score. These splits move whole
groups (videos or patients), and balance classes across the sides as closely as the groups allow.

The algorithm is a greedy one: groups are taken largest first (ties broken by the seed, which is
what makes different seeds give different splits) and each goes to the side whose per-class counts
it brings closest to that side's target, measured as the chi-square-like sum over classes of
``(count - target)**2 / target``, so that rare classes weigh as much as common ones. Ties go to the
side least filled relative to its share, which also spreads unlabelled groups.
"""

from __future__ import annotations

import numpy as np


def _validate(labels: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels)
    groups = np.asarray(groups)
    if labels.ndim != 1 or groups.shape != labels.shape:
        raise ValueError(
            f"labels and groups must be 1-D and of equal length, got shapes {labels.shape} and {groups.shape}"
        )
    if labels.size == 0:
        raise ValueError("nothing to split: no items")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integer class codes (-1 = unlabelled), got dtype {labels.dtype}")
    return labels, groups


def _assign_groups(
    labels: np.ndarray, groups: np.ndarray, shares: np.ndarray, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Side of every group (indexed by `np.unique` order), and the group index of every item."""
    group_names, group_of_item = np.unique(groups, return_inverse=True)
    num_groups, num_sides = len(group_names), len(shares)
    labelled = labels >= 0
    classes, class_of_item = np.unique(labels[labelled], return_inverse=True)
    class_counts = np.zeros((num_groups, len(classes)))
    np.add.at(class_counts, (group_of_item[labelled], class_of_item), 1)
    sizes = np.bincount(group_of_item, minlength=num_groups)

    target = shares[:, None] * class_counts.sum(axis=0)[None, :]
    target_size = shares * labels.size
    side_counts = np.zeros((num_sides, len(classes)))
    side_sizes = np.zeros(num_sides)
    side_of_group = np.empty(num_groups, dtype=np.int64)

    order = np.random.default_rng(seed).permutation(num_groups)
    order = order[np.argsort(-sizes[order], kind="stable")]
    for group in order:
        counts = class_counts[group]
        # Increase of sum((count - target)^2 / target) if the group joins each side.
        cost = (counts * (2 * (side_counts - target) + counts) / target).sum(axis=1)
        fill = side_sizes / target_size
        side = np.lexsort((np.arange(num_sides), fill, np.round(cost, 9)))[0]
        side_of_group[group] = side
        side_counts[side] += counts
        side_sizes[side] += sizes[group]
    return side_of_group, group_of_item


def grouped_stratified_kfold(
    labels: np.ndarray, groups: np.ndarray, n_splits: int, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(train_indices, test_indices)`` over items for each of ``n_splits`` folds.

    Every group lies in exactly one test fold; labels of -1 (unlabelled) are assigned like the rest
    but do not count for stratification. The same arguments give the same folds.
    """
    labels, groups = _validate(labels, groups)
    num_groups = len(np.unique(groups))
    if n_splits < 2:
        raise ValueError(f"n_splits={n_splits}: need at least 2 folds")
    if n_splits > num_groups:
        raise ValueError(
            f"n_splits={n_splits} folds need at least {n_splits} groups, but there are only {num_groups}; "
            "use fewer folds or finer groups"
        )
    side_of_group, group_of_item = _assign_groups(labels, groups, np.full(n_splits, 1.0 / n_splits), seed)
    fold_of_item = side_of_group[group_of_item]
    return [(np.flatnonzero(fold_of_item != fold), np.flatnonzero(fold_of_item == fold)) for fold in range(n_splits)]


def grouped_holdout(
    labels: np.ndarray, groups: np.ndarray, fraction: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``(kept, held_out)`` item indices: whole groups held out, about ``fraction`` of the items, stratified.

    With two or more groups each side gets at least one, however small or large ``fraction`` is.
    """
    labels, groups = _validate(labels, groups)
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction={fraction}: the held-out share must lie strictly between 0 and 1")
    side_of_group, group_of_item = _assign_groups(labels, groups, np.array([1.0 - fraction, fraction]), seed)
    if len(side_of_group) >= 2:
        sizes = np.bincount(group_of_item, minlength=len(side_of_group))
        for empty_side in (0, 1):
            if not np.any(side_of_group == empty_side):
                candidates = np.flatnonzero(side_of_group != empty_side)
                side_of_group[candidates[np.argmin(sizes[candidates])]] = empty_side
    held_out = side_of_group[group_of_item] == 1
    return np.flatnonzero(~held_out), np.flatnonzero(held_out)
