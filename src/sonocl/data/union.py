"""Several frame stores read as one, for pretraining on more than one corpus (``sonocl pretrain --store A --store B``).

The union's videos are the stores' videos one store after another (video index = position in that order), its
frames likewise; nothing is copied: `StoreUnion.gather` reads each store's memory map. Frames of stores of
different stored sizes are brought to the largest one when gathered (bilinear, and anti-aliased when shrinking),
so that a batch holds one size; the run's augmentation then crops and resizes them to the run's size as it does
one store's frames.

Each store gives a share of a pretraining epoch's items, equal by default (a small corpus is not drowned by a large
one) or as ``weights`` say; `sonocl.pairs.PairSampler` draws the epoch's items by these shares, so that the pairs
of every batch, and their negatives, come from every store.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sonocl.data.store import FrameStore, StoreError, VideoTable


class StoreUnion(VideoTable):
    """The stores' video tables as one table, their frames gathered from each store's memory map."""

    def __init__(self, stores: Sequence[FrameStore], weights: Sequence[float] | None = None) -> None:
        if len(stores) < 2:
            raise ValueError("a union needs two stores or more")
        counts = [store.num_videos for store in stores]
        super().__init__(
            [video for store in stores for video in store.videos],
            np.repeat(np.arange(len(stores), dtype=np.int64), counts),
        )
        self.stores = list(stores)
        self.root = stores[0].root
        self.size = max(store.size for store in stores)
        self.source_weights = source_shares(weights or [1.0] * len(stores), [str(s.root) for s in stores])
        self._frame_starts = np.cumsum([0] + [store.num_frames for store in stores])

    @property
    def roots(self) -> list[Path]:
        return [store.root for store in self.stores]

    def gather(self, indices: np.ndarray) -> np.ndarray:
        """Frames at any array of global frame indices, shape ``indices.shape + (S, S)`` at the largest stored size."""
        indices = np.asarray(indices, dtype=np.int64)
        flat = indices.reshape(-1)
        out = np.empty((len(flat), self.size, self.size), dtype=np.uint8)
        source = np.searchsorted(self._frame_starts, flat, side="right") - 1
        for s in np.unique(source):
            chosen = source == s
            frames = self.stores[s].gather(flat[chosen] - self._frame_starts[s])
            out[chosen] = frames if self.stores[s].size == self.size else _resized(frames, self.size)
        return out.reshape(*indices.shape, self.size, self.size)


def _resized(frames: np.ndarray, size: int) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    pixels = torch.from_numpy(np.ascontiguousarray(frames)).unsqueeze(1).float()
    shrink = frames.shape[-1] > size
    resized = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
    return resized.round_().clamp_(0, 255).to(torch.uint8).squeeze(1).numpy()


def source_shares(weights: Sequence[float], names: Sequence[str]) -> tuple[float, ...]:
    """``weights`` normalised to shares that sum to 1; one per store, each finite and > 0 (named otherwise)."""
    if len(weights) != len(names):
        raise StoreError(f"{len(weights)} store weights for {len(names)} stores ({', '.join(names)}); give one each")
    bad = [f"{name}: {weight!r}" for name, weight in zip(names, weights) if not (math.isfinite(weight) and weight > 0)]
    if bad:
        raise StoreError(f"store weights must be finite and > 0; {'; '.join(bad)}")
    total = float(sum(weights))
    return tuple(float(weight) / total for weight in weights)


def open_stores(paths: Sequence[str | os.PathLike[str]], weights: Sequence[float] = ()) -> FrameStore | StoreUnion:
    """One store as itself, several as their `StoreUnion` (a store named twice is refused: its videos would count
    twice)."""
    if not paths:
        raise StoreError("no store given: name one or more with --store")
    resolved = [Path(path).resolve() for path in paths]
    repeated = sorted({str(path) for path in resolved if resolved.count(path) > 1})
    if repeated:
        raise StoreError(f"{repeated[0]}: named twice with --store; give each store once (--store-weights weighs them)")
    stores = [FrameStore.open(path) for path in paths]
    if len(stores) == 1:
        if weights and len(weights) != 1:
            raise StoreError(f"{len(weights)} store weights for one store ({paths[0]})")
        return stores[0]
    return StoreUnion(stores, weights or None)
