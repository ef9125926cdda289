"""Pair samplers: which frames form the two views of each item, how they are mixed, which items are positives.

Pure index maths over a `FrameStore` (no pixels are read here). A sampler turns an epoch number into a list
of `PairBatch` es; pixels are gathered and augmented afterwards (`sonocl.augment.make_views`).

Determinism and sharding. Everything random in an epoch is drawn once for the *global* epoch order from
``numpy.random.default_rng([seed, epoch])``: the item permutation first, then every per-item draw for all
items. Rank ``r`` of ``W`` takes, at step ``s``, the items ``s·G + r·B … s·G + (r+1)·B`` of that order
(``B`` = per-rank batch, ``G = W·B``). So the ranks' shards are disjoint and equally long (``drop_last``),
and the concatenation of the ranks' batches at step ``s`` is exactly the batch a single process with batch
``G`` gets: a DDP run and a one-process run see the same pairs.

Methods and their references are in ``docs/methods.md`` (§1.3 USCL, §2.3 Meta-USCL, §3.2 AWCL, §4 IVPP).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from sonocl.data.store import FrameStore

ITEM_KINDS = ("videos", "frames")
_LABEL_DRAW_KEY = 0x5E1  # separates the run-level label draws from the per-epoch streams
_META_DRAW_KEY = 0x3E7A


@dataclass
class PairBatch:
    """One batch of B positive pairs, as index maths (see ``docs/internals.md``)."""

    frames: np.ndarray
    """int64 ``(B, k)`` global frame indices into the store."""
    mix: np.ndarray
    """float32 ``(B, 2, k)``: view v of item b is ``Σ_j mix[b, v, j] · frame_j``."""
    augment_first: bool
    """True: augment each of the k frames, then mix (USCL); False: mix the raw frames, then augment each view."""
    video: np.ndarray
    """int64 ``(B,)`` video index of each item."""
    positive_group: np.ndarray
    """int64 ``(B,)``: items with equal ids are positives of each other (besides their own other view)."""
    weight: np.ndarray
    """float32 ``(B,)`` prior pair weights (IVPP distance weight), 1 otherwise."""
    label: np.ndarray
    """int64 ``(B,)`` class for the semi-supervised cross-entropy, -1 when unlabelled."""

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, index: slice | np.ndarray) -> PairBatch:
        """The items at ``index`` (a slice or an index array) as a new batch."""
        return PairBatch(
            frames=self.frames[index],
            mix=self.mix[index],
            augment_first=self.augment_first,
            video=self.video[index],
            positive_group=self.positive_group[index],
            weight=self.weight[index],
            label=self.label[index],
        )


def _distinct(rng: np.random.Generator, sizes: np.ndarray, count: int) -> np.ndarray:
    """``count`` distinct integers drawn uniformly from ``range(sizes[i])`` for each row i; ``(len(sizes), count)``.

    Vectorised sequential draw: the j-th value is drawn from the ``size - j`` values left and shifted past the
    ones already taken (in increasing order), which is a uniform draw without replacement. Rows need
    ``sizes >= count``; rows where that fails get garbage and must be masked by the caller.
    """
    rows = len(sizes)
    taken = np.empty((rows, count), dtype=np.int64)
    for j in range(count):
        value = np.floor(rng.random(rows) * np.maximum(sizes - j, 1)).astype(np.int64)
        for previous in np.sort(taken[:, :j], axis=1).T:
            value += value >= previous
        taken[:, j] = value
    return taken


class PairSampler:
    """Base class: epoch order, rank sharding and batching; subclasses draw the pairs of the items.

    ``videos`` are the usable video indices (e.g. the training split). An item is one video
    (``items="videos"``) or one frame of those videos (``items="frames"``), once per epoch.
    """

    k: ClassVar[int]
    augment_first: ClassVar[bool] = False
    default_items: ClassVar[str] = "videos"

    def __init__(
        self,
        store: FrameStore,
        videos: np.ndarray,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        items: str | None = None,
    ) -> None:
        videos = np.asarray(videos, dtype=np.int64).reshape(-1)
        if len(videos) == 0:
            raise ValueError("no videos to sample pairs from")
        if videos.min() < 0 or videos.max() >= store.num_videos:
            raise ValueError(f"video indices must lie in 0…{store.num_videos - 1}, got {videos.min()}…{videos.max()}")
        if len(np.unique(videos)) != len(videos):
            raise ValueError("videos contains repeated indices")
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, not {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0…{world_size - 1} (world_size {world_size})")
        items = items or self.default_items
        if items not in ITEM_KINDS:
            raise ValueError(f"items must be one of {ITEM_KINDS}, not {items!r}")
        self.store = store
        self.videos = videos
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.items = items
        if items == "videos":
            self._item_video = videos
        else:
            self._item_video = np.concatenate(
                [np.full(store.videos[v].num_frames, v, dtype=np.int64) for v in videos]
            )
        self._item_frame = (
            np.concatenate([np.arange(store.video_offsets[v], store.video_offsets[v + 1]) for v in videos])
            if items == "frames"
            else None
        )
        self._length = np.diff(store.video_offsets)
        if len(self) == 0:
            raise ValueError(
                f"{len(self._item_video)} items ({items}) do not fill one global batch of "
                f"{batch_size} × {world_size} ranks; lower the batch size"
            )

    def __len__(self) -> int:
        """Batches per epoch (the same on every rank)."""
        return len(self._item_video) // (self.batch_size * self.world_size)

    def batches(self, epoch: int) -> list[PairBatch]:
        """This rank's batches of ``epoch``; deterministic in (seed, epoch), independent of rank and world size."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self._item_video))
        video = self._item_video[order]
        frame = self._item_frame[order] if self._item_frame is not None else None
        everything = self._draw(rng, video, frame, np.arange(len(order), dtype=np.int64))
        global_batch = self.batch_size * self.world_size
        start = self.rank * self.batch_size
        return [
            everything[step * global_batch + start : step * global_batch + start + self.batch_size]
            for step in range(len(self))
        ]

    def _draw(
        self, rng: np.random.Generator, video: np.ndarray, frame: np.ndarray | None, position: np.ndarray
    ) -> PairBatch:
        """The pairs of every item of the epoch, in epoch order.

        ``video`` per item; ``frame`` the item's own global frame index when items are frames; ``position``
        the item's place in the global epoch order (a unique id across ranks).
        """
        raise NotImplementedError

    def _random_frame(self, rng: np.random.Generator, video: np.ndarray) -> np.ndarray:
        """One frame index uniformly within each item's video."""
        return self.store.video_offsets[video] + np.floor(rng.random(len(video)) * self._length[video]).astype(np.int64)

    def _batch(
        self,
        frames: np.ndarray,
        mix: np.ndarray,
        video: np.ndarray,
        positive_group: np.ndarray,
        weight: np.ndarray | None = None,
        label: np.ndarray | None = None,
    ) -> PairBatch:
        n = len(frames)
        return PairBatch(
            frames=frames.astype(np.int64),
            mix=mix.astype(np.float32),
            augment_first=self.augment_first,
            video=video.astype(np.int64),
            positive_group=positive_group.astype(np.int64),
            weight=np.ones(n, dtype=np.float32) if weight is None else weight.astype(np.float32),
            label=np.full(n, -1, dtype=np.int64) if label is None else label.astype(np.int64),
        )


def _simclr_mix(n: int) -> np.ndarray:
    return np.ones((n, 2, 1), dtype=np.float32)


class InstanceSampler(PairSampler):
    """SimCLR / MoCo / BYOL: two augmentations of one frame; every item its own positive group.

    With ``items="videos"`` the frame is drawn uniformly from the item's video.
    """

    k = 1
    default_items = "frames"

    def _draw(self, rng, video, frame, position):
        frames = (frame if frame is not None else self._random_frame(rng, video))[:, None]
        return self._batch(frames, _simclr_mix(len(video)), video, position)


class USCLSampler(PairSampler):
    """USCL sample-pair generation (Chen et al., MICCAI 2021; ``docs/methods.md`` §1.3).

    Three distinct frames f1, f2, f3 of one video, drawn uniformly with no order and no distance limit; one
    λ ~ Beta(0.5, 0.5) per item; views ``λ·f1 + (1−λ)·f2`` and ``λ·f3 + (1−λ)·f2`` of the *augmented* frames
    (``augment_first``; f2 is augmented once and shared). Videos of 2 frames give the two frames unmixed, of 1
    frame two augmentations of it. ``positive_group`` = video index, so no frame of an item's own video is
    ever its negative (with ``items="frames"`` a video may appear several times in a batch).

    Semi-supervised labels: ``ceil(#labelled videos × label_rate)`` of the videos that carry a value in
    ``label_column`` are drawn once from the seed (fixed for the run, unlike the reference's unseeded draw,
    quirk 12); their items carry the class code, all others -1. ``class_names`` lists the classes.
    """

    k = 3
    augment_first = True

    def __init__(self, *args: Any, label_rate: float = 1.0, label_column: str = "label", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not 0.0 <= label_rate <= 1.0:
            raise ValueError(f"label_rate must lie in [0, 1], not {label_rate}")
        codes, self.class_names = self.store.label_codes(label_column)
        candidates = self.videos[codes[self.videos] >= 0]
        count = math.ceil(len(candidates) * label_rate)
        chosen = np.random.default_rng([self.seed, _LABEL_DRAW_KEY]).choice(candidates, size=count, replace=False)
        self.labelled_videos = np.sort(chosen)
        """Video indices whose items carry their class (fixed for the run)."""
        self._video_label = np.full(self.store.num_videos, -1, dtype=np.int64)
        self._video_label[self.labelled_videos] = codes[self.labelled_videos]

    def _draw(self, rng, video, frame, position):
        n = len(video)
        length = self._length[video]
        lam = rng.beta(0.5, 0.5, size=n)
        local = _distinct(rng, length, 3)
        mix = np.zeros((n, 2, 3))
        mix[:, 0, 0], mix[:, 0, 1] = lam, 1 - lam
        mix[:, 1, 2], mix[:, 1, 1] = lam, 1 - lam
        short = length < 3
        local[short] = [0, 1, 1]
        local[length == 1] = 0
        mix[short] = [[1, 0, 0], [0, 1, 0]]
        frames = self.store.video_offsets[video][:, None] + local
        return self._batch(frames, mix, video, video, label=self._video_label[video])


class MetaUSCLSampler(PairSampler):
    """Meta-USCL positive-pair interpolation (Chen et al., IEEE TMI 2023; ``docs/methods.md`` §2.3).

    An ordered triplet F0, F1, F2 at offsets 0 < d1 < d2 ≤ min(L−1, max_dist) from a uniform start;
    α, β ~ Beta(3, 5) independently; views ``(1−α)·F0 + α·F1`` and ``β·F1 + (1−β)·F2`` mixed on the raw
    frames, then augmented independently. Fallbacks: a video (or max_dist) that allows only two frames gives
    two frames at most max_dist apart, unmixed; a one-frame video gives frame 0 twice.
    """

    k = 3

    def __init__(self, *args: Any, max_dist: int = 999, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if max_dist < 1:
            raise ValueError(f"max_dist must be ≥ 1 frame, not {max_dist}")
        self.max_dist = max_dist

    def _draw(self, rng, video, frame, position):
        n = len(video)
        length = self._length[video]
        reach = np.minimum(length - 1, self.max_dist)
        offsets = np.sort(_distinct(rng, reach, 2), axis=1) + 1
        single = reach < 2
        offsets[single, 0] = np.floor(rng.random(int(single.sum())) * reach[single]).astype(np.int64) + 1
        offsets[single, 1] = offsets[single, 0]
        offsets[length == 1] = 0
        start = np.floor(rng.random(n) * (length - offsets[:, 1])).astype(np.int64)
        alpha, beta = rng.beta(3, 5, size=n), rng.beta(3, 5, size=n)
        mix = np.zeros((n, 2, 3))
        mix[:, 0, 0], mix[:, 0, 1] = 1 - alpha, alpha
        mix[:, 1, 1], mix[:, 1, 2] = beta, 1 - beta
        mix[single] = [[1, 0, 0], [0, 0, 1]]
        local = np.stack([start, start + offsets[:, 0], start + offsets[:, 1]], axis=1)
        frames = self.store.video_offsets[video][:, None] + local
        return self._batch(frames, mix, video, video)


class MetaSetSampler:
    """Meta-USCL's meta set: two augmentations of one frame of a held-out video per pair (§2.7).

    The reference draws a fresh random meta batch every step (quirk 17, made explicit here as ``batch(epoch,
    step)``) and always uses frame 0 of each video (quirk 18), which makes the meta signal weak: each meta
    video offers one image for the whole run. ``meta_frame="random"`` (default) draws the frame per pair;
    ``"first"`` reproduces the reference. When the global meta batch outgrows the held-out videos, videos are
    drawn with replacement; repeats share ``positive_group`` (the video index) and so are positives.
    """

    META_FRAMES = ("first", "random")

    def __init__(
        self,
        store: FrameStore,
        videos: np.ndarray,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        meta_frame: str = "random",
    ) -> None:
        videos = np.asarray(videos, dtype=np.int64).reshape(-1)
        if len(videos) == 0:
            raise ValueError("the meta set needs at least one held-out video")
        if meta_frame not in self.META_FRAMES:
            raise ValueError(f"meta_frame must be one of {self.META_FRAMES}, not {meta_frame!r}")
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"invalid meta batch {batch_size} / rank {rank} / world_size {world_size}")
        self.store, self.videos, self.batch_size, self.seed = store, videos, batch_size, seed
        self.rank, self.world_size, self.meta_frame = rank, world_size, meta_frame

    def batch(self, epoch: int, step: int) -> PairBatch:
        """This rank's meta batch for training step ``step`` of ``epoch`` (deterministic, resumable)."""
        rng = np.random.default_rng([self.seed, _META_DRAW_KEY, epoch, step])
        total = self.batch_size * self.world_size
        video = rng.choice(self.videos, size=total, replace=total > len(self.videos))
        frames = self.store.video_offsets[video]
        if self.meta_frame == "random":
            frames = frames + np.floor(rng.random(total) * np.diff(self.store.video_offsets)[video]).astype(np.int64)
        shard = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        return PairBatch(
            frames=frames[shard, None].astype(np.int64),
            mix=_simclr_mix(self.batch_size),
            augment_first=False,
            video=video[shard].astype(np.int64),
            positive_group=video[shard].astype(np.int64),
            weight=np.ones(self.batch_size, dtype=np.float32),
            label=np.full(self.batch_size, -1, dtype=np.int64),
        )


class IVPPSampler(PairSampler):
    """Intra-video positive pairs (VanBerlo et al. 2024; ``docs/methods.md`` §4).

    Two distinct frames of one video at most ``max_seconds`` apart in the store's real timestamps, unmixed;
    pair weight ``sw = (Δmax − Δ + 1) / (Δmax + 1)`` with ``Δmax = int(max_seconds · fps)`` and Δ the frame
    distance (clipped to ``[1/(Δmax+1), 1]`` for irregular timestamps). The first frame is the item's frame
    (``items="frames"``) or uniform in its video; a frame with no neighbour within ``max_seconds`` is paired
    with itself (weight 1). fps is the video's, else estimated from its median frame interval.
    """

    k = 2
    _TIME_SLACK = 1e-6  # timestamps are stored rounded to 1 µs

    def __init__(self, *args: Any, max_seconds: float = 1.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if max_seconds <= 0:
            raise ValueError(f"max_seconds must be > 0, not {max_seconds}")
        self.max_seconds = max_seconds
        time, offsets = self.store.frame_time, self.store.video_offsets
        fps = np.ones(self.store.num_videos)
        for v in self.videos:
            stamps = time[offsets[v] : offsets[v + 1]]
            recorded = self.store.videos[v].fps
            interval = float(np.median(np.diff(stamps))) if len(stamps) > 1 else 0.0
            fps[v] = recorded if recorded else (1.0 / interval if interval > 0 else 1.0)
        self._max_frames = np.floor(max_seconds * fps + 1e-9).astype(np.int64)
        # One sorted key over the whole store: within a video its time, videos apart by more than any window.
        span = float(time.max() - time.min()) if len(time) else 0.0
        self._key = self.store.frame_video * (span + 2 * max_seconds + 1.0) + time
        backwards = np.flatnonzero(np.diff(self._key) < 0)
        if len(backwards):
            bad = self.store.videos[int(self.store.frame_video[backwards[0]])]
            raise ValueError(f"video {bad.id}: timestamps are not in increasing order; IVPP needs real frame times")

    def _draw(self, rng, video, frame, position):
        first = frame if frame is not None else self._random_frame(rng, video)
        centre = self._key[first]
        low = np.searchsorted(self._key, centre - self.max_seconds - self._TIME_SLACK, side="left")
        high = np.searchsorted(self._key, centre + self.max_seconds + self._TIME_SLACK, side="right")
        others = high - low - 1
        second = low + np.floor(rng.random(len(video)) * np.maximum(others, 0)).astype(np.int64)
        second += second >= first
        second = np.where(others > 0, second, first)
        delta_max = self._max_frames[video]
        delta = np.abs(second - first)
        weight = np.clip((delta_max - delta + 1) / (delta_max + 1), 1.0 / (delta_max + 1), 1.0)
        mix = np.broadcast_to(np.eye(2), (len(video), 2, 2))
        return self._batch(np.stack([first, second], axis=1), mix, video, video, weight=weight)


class AWCLSampler(PairSampler):
    """Anatomy-aware contrastive learning (Fu et al., ECCV-W 2022; ``docs/methods.md`` §3.2, §3.5).

    Instance items (two augmentations of one frame). An item whose video carries an anatomy label, and
    which keeps it under the anatomy ratio r, has ``positive_group`` = its anatomy class id, so every view
    of that anatomy in the batch is a positive (SupCon); every other item gets a unique id above all class
    ids, so unlabelled items are never positives of each other (quirk 25: the mask is built per sample).

    ``anatomy_level="coarse"`` maps the fine values through ``coarse_map`` when given, else reads the
    ``coarse_column``. Whether a frame keeps its label is drawn once per frame from the seed (a fixed label
    budget for the run, like USCL's label rate); ``label`` carries the kept class for optional supervision.
    """

    k = 1
    default_items = "frames"
    LEVELS = ("fine", "coarse")

    def __init__(
        self,
        *args: Any,
        anatomy_column: str = "anatomy",
        anatomy_level: str = "fine",
        coarse_map: Mapping[str, str] | None = None,
        coarse_column: str = "anatomy_coarse",
        anatomy_ratio: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if anatomy_level not in self.LEVELS:
            raise ValueError(f"anatomy_level must be one of {self.LEVELS}, not {anatomy_level!r}")
        if not 0.0 <= anatomy_ratio <= 1.0:
            raise ValueError(f"anatomy_ratio must lie in [0, 1], not {anatomy_ratio}")
        values = self.store.label_column(anatomy_column)
        if anatomy_level == "coarse":
            if coarse_map is not None:
                unmapped = sorted({v for v in values if v and v not in coarse_map})
                if unmapped:
                    raise ValueError(f"coarse_map has no entry for anatomy values {unmapped}")
                values = [coarse_map[v] if v else None for v in values]
            else:
                values = self.store.label_column(coarse_column)
        self.class_names = sorted({v for v in values if v})
        if not self.class_names:
            raise ValueError(f"no video of the store has a value in the anatomy column {anatomy_column!r}")
        lookup = {name: code for code, name in enumerate(self.class_names)}
        self._video_class = np.array([lookup.get(v, -1) if v else -1 for v in values], dtype=np.int64)
        keep = np.random.default_rng([self.seed, _LABEL_DRAW_KEY]).random(self.store.num_frames) < anatomy_ratio
        self._frame_keeps = keep

    def _draw(self, rng, video, frame, position):
        frames = frame if frame is not None else self._random_frame(rng, video)
        label = np.where(self._frame_keeps[frames], self._video_class[video], -1)
        group = np.where(label >= 0, label, len(self.class_names) + position)
        return self._batch(frames[:, None], _simclr_mix(len(video)), video, group, label=label)


SAMPLERS: dict[str, type[PairSampler]] = {
    "simclr": InstanceSampler,
    "moco": InstanceSampler,
    "byol": InstanceSampler,
    "uscl": USCLSampler,
    "meta-uscl": MetaUSCLSampler,
    "ivpp": IVPPSampler,
    "awcl": AWCLSampler,
}


def make_sampler(
    method: str,
    store: FrameStore,
    videos: np.ndarray,
    batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    **options: Any,
) -> PairSampler:
    """The pair sampler of ``method`` with its options (``items``, ``label_rate``, ``max_dist``, …)."""
    if method not in SAMPLERS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[method](store, videos, batch_size, seed, rank, world_size, **options)
