"""Pair samplers: which frames form the two views of each item, how they are mixed, which items are positives.

Pure index maths over a store's video table (`VideoTable`: one store, or several read as one; no pixels are read
here). A sampler turns an epoch number into a list of `PairBatch` es; pixels are gathered and augmented afterwards
(`sonocl.augment.make_views`).

Determinism and sharding. Everything random in an epoch is drawn once for the *global* epoch order from
``numpy.random.default_rng([seed, epoch])``: the item permutation first, then every per-item draw for all
items. Rank ``r`` of ``W`` takes, at step ``s``, the items ``s·G + r·B … s·G + (r+1)·B`` of that order
(``B`` = per-rank batch, ``G = W·B``). So the ranks' shards are disjoint and equally long (``drop_last``),
and the concatenation of the ranks' batches at step ``s`` is exactly the batch a single process with batch
``G`` gets: a DDP run and a one-process run see the same pairs.

This module holds the shared machinery and the instance sampler of SimCLR, MoCo and BYOL; each method's own
sampler lives in its module under ``sonocl/methods/`` (``docs/methods.md``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from sonocl.data.store import VideoTable

ITEM_KINDS = ("videos", "frames")
"""What one sampler item is: a video (its frames drawn inside) or a frame."""

LABEL_DRAW_KEY = 0x5E1
"""Separates a run's one-off label draws (USCL label rate, AWCL anatomy ratio) from the per-epoch streams."""
META_DRAW_KEY = 0x3E7A
"""Separates Meta-USCL's meta-batch draws from the training pairs' streams."""


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


def distinct(rng: np.random.Generator, sizes: np.ndarray, count: int) -> np.ndarray:
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
        store: VideoTable,
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
            self._item_video = np.concatenate([np.full(store.videos[v].num_frames, v, dtype=np.int64) for v in videos])
        self._item_frame = (
            np.concatenate([np.arange(store.video_offsets[v], store.video_offsets[v + 1]) for v in videos])
            if items == "frames"
            else None
        )
        self._length = np.diff(store.video_offsets)
        self.labelled_videos = np.zeros(0, dtype=np.int64)
        """Video indices whose labels the pairs carry (USCL's label rate, AWCL's anatomy): for the provenance."""
        self.label_columns: list[str] = []
        """The store columns those labels come from."""
        self.class_names: list[str] = []
        """The classes of the labels the pairs carry, by code (a classifier head has one output per class)."""
        if len(self) == 0:
            raise ValueError(
                f"{len(self._item_video)} items ({items}) do not fill one global batch of "
                f"{batch_size} × {world_size} ranks; lower the batch size"
            )

    @property
    def num_items(self) -> int:
        """Items per epoch over all ranks (videos or frames of the sampled videos)."""
        return len(self._item_video)

    def __len__(self) -> int:
        """Batches per epoch (the same on every rank)."""
        return len(self._item_video) // (self.batch_size * self.world_size)

    def batches(self, epoch: int) -> list[PairBatch]:
        """This rank's batches of ``epoch``; deterministic in (seed, epoch), independent of rank and world size."""
        rng = np.random.default_rng([self.seed, epoch])
        order = self._epoch_order(rng)
        video = self._item_video[order]
        frame = self._item_frame[order] if self._item_frame is not None else None
        everything = self._draw(rng, video, frame, np.arange(len(order), dtype=np.int64))
        global_batch = self.batch_size * self.world_size
        start = self.rank * self.batch_size
        return [
            everything[step * global_batch + start : step * global_batch + start + self.batch_size]
            for step in range(len(self))
        ]

    def source_items(self) -> np.ndarray:
        """Items each store gives an epoch (`sonocl.data.union.StoreUnion`): the stores' shares of `num_items`, by
        largest remainder over the stores this sampler's videos come from; one store gives them all."""
        weights = np.asarray(self.store.source_weights, dtype=np.float64)
        present = np.zeros(len(weights), dtype=bool)
        present[np.unique(self.store.video_source[self._item_video])] = True
        exact = self.num_items * np.where(present, weights, 0.0) / weights[present].sum()
        counts = np.floor(exact).astype(np.int64)
        remainder = np.argsort(-(exact - counts), kind="stable")[: self.num_items - counts.sum()]
        counts[remainder] += 1
        return counts

    def _epoch_order(self, rng: np.random.Generator) -> np.ndarray:
        """The epoch's items in order: a permutation of them; from several stores, each store's `source_items` of its
        own (its items shuffled, repeated or cut short to fill its share), shuffled together."""
        if len(self.store.source_weights) == 1:
            return rng.permutation(self.num_items)
        source = self.store.video_source[self._item_video]
        parts = []
        for store, count in enumerate(self.source_items()):
            members = np.flatnonzero(source == store)
            if count:
                rounds = -(-count // len(members))
                parts.append(np.concatenate([rng.permutation(members) for _ in range(rounds)])[:count])
        chosen = np.concatenate(parts)
        return chosen[rng.permutation(len(chosen))]

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


def simclr_mix(n: int) -> np.ndarray:
    return np.ones((n, 2, 1), dtype=np.float32)


class InstanceSampler(PairSampler):
    """SimCLR / MoCo / BYOL: two augmentations of one frame; every item its own positive group.

    With ``items="videos"`` the frame is drawn uniformly from the item's video.
    """

    k = 1
    default_items = "frames"

    def _draw(self, rng, video, frame, position):
        frames = (frame if frame is not None else self._random_frame(rng, video))[:, None]
        return self._batch(frames, simclr_mix(len(video)), video, position)
