"""What a run drew, re-created from its configuration: the video split, the pair sampler and each step's seed.

The training loop and the report both call these, so "which videos were held out, which pairs were drawn at
step s" has one answer. Everything here is a pure function of the configuration and the store.
"""

from __future__ import annotations

import numpy as np

from sonocl.augment import BatchAugment
from sonocl.data.splits import grouped_holdout
from sonocl.data.store import FrameStore
from sonocl.errors import ConfigError
from sonocl.methods import get_method
from sonocl.pairs import PairSampler
from sonocl.train.config import PretrainConfig


def split_videos(cfg: PretrainConfig, store: FrameStore) -> tuple[np.ndarray, np.ndarray]:
    """``(training, held_out)`` sorted video indices: whole groups held out, ``val_fraction`` of the videos that
    ``cfg.exclude`` leaves."""
    excluded = set(cfg.exclude)
    usable = np.array([v for v, video in enumerate(store.videos) if video.content_hash not in excluded], dtype=np.int64)
    if excluded and len(usable) == store.num_videos:
        raise ConfigError(f"{store.root}: none of the {len(excluded)} excluded videos is in this store")
    if cfg.val_fraction <= 0:
        return usable, np.zeros(0, dtype=np.int64)
    codes, _ = store.label_codes(cfg.label_column)
    kept, held = grouped_holdout(codes[usable], store.group_codes()[usable], cfg.val_fraction, cfg.seed)
    return np.sort(usable[np.asarray(kept, dtype=np.int64)]), np.sort(usable[np.asarray(held, dtype=np.int64)])


def training_sampler(
    cfg: PretrainConfig, store: FrameStore, videos: np.ndarray, batch_size: int, rank: int = 0, world_size: int = 1
) -> PairSampler:
    """The method's pair sampler of ``videos`` (per-rank ``batch_size``), as the run builds it."""
    return get_method(cfg.method).sampler(cfg, store, videos, batch_size, rank, world_size)


def build_augment(cfg: PretrainConfig) -> BatchAugment:
    return BatchAugment(cfg.augment, cfg.size, cfg.model.channels)


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of the augmentation draw at a global step (the loop re-seeds with it before every step)."""
    return (seed * 1_000_003 + rank * 7_919 + step * 104_729 + 12_345) % (2**63 - 1)
