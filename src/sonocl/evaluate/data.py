"""The evaluated frames of a store and their folds: frame sampling, grouped stratified k-fold, inner validation."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import torch

from sonocl.augment import resize_to
from sonocl.data.store import FrameStore
from sonocl.errors import ConfigError
from sonocl.evaluate.config import EvalConfig


def sample_frames(timestamps: np.ndarray, fps: float, max_frames: int) -> np.ndarray:
    """Positions of the frames nearest to the times t0, t0 + 1/fps, … (duplicates dropped), the first ``max_frames``.

    ``fps = 0`` keeps every frame; ``max_frames = 0`` keeps all the sampled ones. A still image gives ``[0]``.
    """
    timestamps = np.asarray(timestamps, dtype=np.float64)
    if fps > 0 and len(timestamps) > 1:
        targets = np.arange(timestamps[0], timestamps[-1] + 0.5 / fps, 1.0 / fps)
        right = np.clip(np.searchsorted(timestamps, targets), 1, len(timestamps) - 1)
        left = right - 1
        nearest = np.where(targets - timestamps[left] <= timestamps[right] - targets, left, right)
        positions = np.unique(nearest)
    else:
        positions = np.arange(len(timestamps))
    return positions[:max_frames] if max_frames > 0 else positions


@dataclasses.dataclass
class EvalData:
    """The sampled frames of the evaluated videos, resized once, and their video table: videos in the order of their
    content hashes, groups numbered as they first appear in it, so that the same videos give the same folds in any
    store they were ingested into."""

    images: torch.Tensor
    """``(N, 1, size, size)`` uint8 frames."""
    frame_video: np.ndarray
    """``(N,)`` index into the evaluated videos (not the store's)."""
    frame_index: np.ndarray
    """``(N,)`` position of the frame within its video in the store."""
    video_ids: list[str]
    video_hashes: list[str]
    """Content hash of each evaluated video (matched against a pretraining run's provenance)."""
    video_labels: np.ndarray
    video_groups: np.ndarray
    class_names: list[str]

    @property
    def frame_labels(self) -> np.ndarray:
        return self.video_labels[self.frame_video]

    @functools.cached_property
    def digest(self) -> str:
        """The identity of what is evaluated, by content (`sonocl.evaluate.cache`): the frames as resized, the videos
        they come from, their labels, class names and groups."""
        from sonocl.evaluate.cache import array_digest, digest

        arrays = (self.images.numpy(), self.frame_video, self.frame_index, self.video_labels, self.video_groups)
        return digest([array_digest(*arrays), self.class_names, self.video_ids, self.video_hashes])

    def frames_of(self, videos: np.ndarray) -> np.ndarray:
        """Frame indices (into ``images``) of the given evaluated videos."""
        return np.flatnonzero(np.isin(self.frame_video, videos))


def class_members(classes: tuple[str, ...], present: list[str]) -> list[tuple[str, tuple[str, ...]]]:
    """(class name, the store labels it holds) of each ``--classes`` entry: a label of the store as itself; ``A+B``
    the labels A and B merged into a class named ``A+B``; ``NAME=A+B`` the same class named NAME."""
    members: list[tuple[str, tuple[str, ...]]] = []
    for entry in classes:
        if entry in present:  # a label that itself holds "+" or "=" (e.g. findings "B-lines+A-lines") is that label
            members.append((entry, (entry,)))
            continue
        name, _, merged = entry.rpartition("=")
        labels = tuple(label.strip() for label in merged.split("+") if label.strip())
        members.append((name.strip() or "+".join(labels), labels))
    return members


def _class_lookup(store: FrameStore, config: EvalConfig, present: list[str]) -> tuple[list[str], dict[str, int]]:
    """The class names and, for every store label kept, its class code; one line naming what does not fit."""
    where = f"{store.root}: column {config.label_column!r}"
    if not config.classes:
        return present, {name: code for code, name in enumerate(present)}
    members = class_members(config.classes, present)
    unknown = [label for _, labels in members for label in labels if label not in present]
    if unknown:
        raise ConfigError(f"{where}: no videos labelled {unknown}; labels are {present}")
    lookup: dict[str, int] = {}
    for code, (_, labels) in enumerate(members):
        for label in labels:
            if label in lookup:
                raise ConfigError(f"{where}: label {label!r} is in two classes of --classes {','.join(config.classes)}")
            lookup[label] = code
    names = [name for name, _ in members]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: --classes names a class twice ({names})")
    return names, lookup


def _check_patient_labels(store: FrameStore, config: EvalConfig, kept: list[int], labels: list[int]) -> None:
    """``unit="patient"``: every video of a patient (group) must be of one class."""
    first: dict[str, tuple[int, int]] = {}
    for video, label in zip(kept, labels):
        group = store.videos[video].group
        seen, code = first.setdefault(group, (video, label))
        if code != label:
            raise ConfigError(
                f"{store.root}: --unit patient needs one {config.label_column!r} class per patient, but videos "
                f"{store.videos[seen].id} and {store.videos[video].id} of one patient differ ("
                f"{store.label_column(config.label_column)[seen]!r}, {store.label_column(config.label_column)[video]!r})"
            )


def load_eval_data(store: FrameStore, config: EvalConfig) -> EvalData:
    """Labelled videos of ``store`` (only ``config.classes`` if given, in that order, merged as they say), frames
    sampled and resized."""
    values = store.label_column(config.label_column)
    present = sorted({v for v in values if v})
    class_names, lookup = _class_lookup(store, config, present)
    if len(class_names) < 2:
        raise ConfigError(
            f"{store.root}: need at least 2 classes in column {config.label_column!r}, found {class_names}"
        )
    # Content order, groups numbered as they first appear in it: the folds are a function of the videos, their labels
    # and groups, never of the order in which ingest happened to commit them (its workers finish in any order).
    kept = store.content_order(v for v, value in enumerate(values) if value in lookup).tolist()
    if config.unit == "patient":
        _check_patient_labels(store, config, kept, [lookup[values[v]] for v in kept])
    groups = np.zeros(store.num_videos, dtype=np.int64)
    groups[kept] = store.group_codes_of(np.asarray(kept, dtype=np.int64))
    check_folds(config, len(set(groups[kept].tolist())) if config.group_by == "group" else len(kept), str(store.root))
    frame_video, frame_index, global_index = [], [], []
    for position, v in enumerate(kept):
        start, stop = store.video_offsets[v], store.video_offsets[v + 1]
        chosen = sample_frames(store.frame_time[start:stop], config.fps, config.frames_per_video)
        frame_video.append(np.full(len(chosen), position, dtype=np.int64))
        frame_index.append(chosen)
        global_index.append(start + chosen)
    indices = np.concatenate(global_index)
    images = torch.empty((len(indices), 1, config.size, config.size), dtype=torch.uint8)
    for begin in range(0, len(indices), 512):
        chunk = torch.from_numpy(store.gather(indices[begin : begin + 512]))
        images[begin : begin + len(chunk)] = resize_to(chunk, config.size).mul_(255.0).round_().to(torch.uint8)
    return EvalData(
        images=images,
        frame_video=np.concatenate(frame_video),
        frame_index=np.concatenate(frame_index).astype(np.int64),
        video_ids=[store.videos[v].id for v in kept],
        video_hashes=[store.videos[v].content_hash for v in kept],
        video_labels=np.array([lookup[values[v]] for v in kept], dtype=np.int64),
        video_groups=groups[kept],
        class_names=class_names,
    )


def has_patient_groups(store: FrameStore) -> bool:
    """Whether the store's group ids are real groups (patients or sources) rather than one id per video."""
    return any(video.group != video.id for video in store.videos)


def check_disjoint(train: np.ndarray, test: np.ndarray, data: EvalData, by_group: bool) -> None:
    """Raise if a video (or, grouping by group, a group) is in both the training and the test videos of a fold."""
    shared = np.intersect1d(train, test)
    if shared.size:
        raise AssertionError(f"videos in both train and test of a fold: {[data.video_ids[v] for v in shared[:5]]}")
    if by_group:
        shared_groups = np.intersect1d(data.video_groups[train], data.video_groups[test])
        if shared_groups.size:
            raise AssertionError(f"groups in both train and test of a fold: {shared_groups[:5].tolist()}")


def check_folds(config: EvalConfig, count: int, source: str) -> None:
    """Refuse ``--folds`` above the ``count`` of groups (or videos) to split, naming ``source`` and what works."""
    if config.folds <= count:
        return
    unit = "patient/source group" if config.group_by == "group" else "video"
    fix = f"use --folds {count} or fewer" if count >= 2 else "k-fold needs at least 2; add labelled videos"
    raise ConfigError(
        f"{source}: --folds {config.folds} needs {config.folds} or more {unit}s, each kept in one fold, but there "
        f"are {count} labelled {unit}{'s' if count != 1 else ''}; {fix}"
    )


def fold_splits(data: EvalData, config: EvalConfig, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified folds over the evaluated videos, grouped by video or by group id; checked disjoint."""
    from sonocl.data.splits import grouped_stratified_kfold

    groups = data.video_groups if config.group_by == "group" else np.arange(len(data.video_ids))
    check_folds(config, len(np.unique(groups)), "the evaluated videos")
    folds = grouped_stratified_kfold(data.video_labels, groups, config.folds, seed)
    for train, test in folds:
        check_disjoint(np.asarray(train), np.asarray(test), data, config.group_by == "group")
    return [(np.asarray(train, dtype=np.int64), np.asarray(test, dtype=np.int64)) for train, test in folds]


def inner_validation(data: EvalData, train: np.ndarray, config: EvalConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split the training videos of a fold into (fit, validation) videos, grouped as the folds are."""
    from sonocl.data.splits import grouped_holdout

    groups = data.video_groups[train] if config.group_by == "group" else train
    kept, held = grouped_holdout(data.video_labels[train], groups, config.inner_val_fraction, seed)
    fit, val = train[np.asarray(kept, dtype=np.int64)], train[np.asarray(held, dtype=np.int64)]
    check_disjoint(fit, val, data, config.group_by == "group")
    return fit, val
