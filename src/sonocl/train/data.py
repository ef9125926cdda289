"""A pretraining run's data: the store, the grouped hold-out of videos, the method's samplers, the validation pairs,
the monitors' frames, and the one loader that gathers every step's frames."""

from __future__ import annotations

import math
import random
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sonocl.data.store import VideoTable
from sonocl.data.union import open_stores
from sonocl.errors import ConfigError, UserError
from sonocl.methods import Method
from sonocl.methods.config import PretrainConfig, replace
from sonocl.pairs import PairBatch, PairSampler
from sonocl.train import distributed as ddp
from sonocl.train.monitor import monitor_frames
from sonocl.train.replay import StepBatches, batch_tensors, split_videos, training_sampler

MONITOR_MAX_FRAMES = 4096
MONITOR_SHARE = 0.05
"""The automatic ``monitor_every`` keeps the monitors at about this share of the training compute. A monitored
frame is one forward pass in eval mode, about a third of a trained image's forward and backward; the validation
loss counts with them unless the run selects its best checkpoint, which computes it every epoch anyway."""
VALIDATION_SEED = 0x5EED
"""The seed of the validation pairs and of their views: every epoch's validation loss is of the same draw."""


@dataclass
class RunData:
    """The store, the video split and everything drawn from it: samplers, validation pairs, monitor frames."""

    store: VideoTable
    kept: np.ndarray
    held: np.ndarray
    sampler: PairSampler
    val_batches: list[PairBatch]
    meta_sampler: Any | None
    bank: tuple[np.ndarray, np.ndarray]
    """Training frames and labels of the kNN monitor."""
    query: tuple[np.ndarray, np.ndarray]
    """Held-out labelled frames of the kNN monitor."""
    collapse_frames: np.ndarray

    total_steps: int
    """The run's budget in optimiser steps (``steps``, else ``epochs`` × steps per epoch)."""
    monitor_every: int
    """Epochs between monitors (``cfg.monitor_every``, or the automatic interval)."""

    @property
    def store_shares(self) -> list[float]:
        """Each store's share of the training pairs (`PairSampler.source_items`; one store: all of them)."""
        counts = self.sampler.source_items()
        return [float(count) / counts.sum() for count in counts]

    @property
    def steps_per_epoch(self) -> int:
        return len(self.sampler)

    @property
    def num_epochs(self) -> int:
        """Epochs the budget spans (the last one may be partial)."""
        return math.ceil(self.total_steps / self.steps_per_epoch)


def build_data(cfg: PretrainConfig, method: Method, context: ddp.DistributedContext) -> RunData:
    """The store, the grouped hold-out of videos, the method's samplers and the monitors' frames."""
    store = open_stores(cfg.store, cfg.store_weights)
    kept, held = split_videos(cfg, store)
    batch_size = cfg.batch_size // context.world_size
    try:
        sampler = training_sampler(method, cfg, store, kept, batch_size, context.rank, context.world_size)
    except UserError:  # says what is wrong already (e.g. ivpp on videos without a frame rate)
        raise
    except ValueError as error:  # e.g. fewer training items than one batch
        raise ConfigError(
            f"{', '.join(cfg.store)}: {error} ({len(kept)} training videos of {store.num_videos}, --batch-size "
            f"{cfg.batch_size}); use a smaller --batch-size or more videos"
        ) from None
    meta_sampler = None
    if method.meta_sampler is not None:
        meta_sampler = method.meta_sampler(cfg, store, held, cfg.batch_size, context.rank, context.world_size)
    codes, _ = store.label_codes(cfg.label_column)
    bank, bank_labels = monitor_frames(store, kept, codes, cfg.knn_frames_per_video)
    query, query_labels = monitor_frames(store, held, codes, cfg.knn_frames_per_video)
    collapse, _ = monitor_frames(store, held if len(held) else kept, np.zeros_like(codes), cfg.knn_frames_per_video)
    bank, bank_labels, query, query_labels, collapse = (
        a[:MONITOR_MAX_FRAMES] for a in (bank, bank_labels, query, query_labels, collapse)
    )
    val_batches = validation_batches(cfg, method, store, held) if context.is_main else []
    monitored = len(np.unique(np.concatenate([bank, query, collapse])))  # `validation.monitors`: each frame once
    if cfg.export != "best":
        monitored += 2 * sum(len(b) for b in val_batches)
    trained = 2 * batch_size * context.world_size * len(sampler)
    return RunData(
        store=store,
        kept=kept,
        held=held,
        sampler=sampler,
        total_steps=cfg.steps or cfg.epochs * len(sampler),
        monitor_every=cfg.monitor_every or max(1, math.ceil(monitored / (3 * MONITOR_SHARE * trained))),
        val_batches=val_batches,
        meta_sampler=meta_sampler,
        bank=(bank, bank_labels),
        query=(query, query_labels),
        collapse_frames=collapse,
    )


def validation_batches(cfg: PretrainConfig, method: Method, store: VideoTable, held: np.ndarray) -> list[PairBatch]:
    """The held-out videos' pairs, drawn once with a fixed seed so that every epoch's validation loss is comparable."""
    if len(held) < 2:
        return []
    fixed = replace(cfg, seed=VALIDATION_SEED)
    build = method.validation_sampler or method.sampler
    try:
        probe = build(fixed, store, held, 1, 0, 1)
        return build(fixed, store, held, min(cfg.batch_size, len(probe)), 0, 1).batches(0)
    except ValueError as error:
        print(f"sonocl pretrain: no validation pairs from the held-out videos ({error})", file=sys.stderr)
        return []


class _RunBatches(torch.utils.data.Dataset):
    """Every remaining step of the run as one dataset: item i = the batch of global step ``first + i``, frames gathered.

    One DataLoader over the whole run, so its workers persist across epochs and prefetch across their boundaries
    (a loader per epoch restarts its workers and stalls the first step of every epoch). Each worker draws an epoch's
    batches once (the sampler is a pure function of the epoch) and gathers its steps' frames from the memory map.
    """

    def __init__(self, data: RunData, first: int) -> None:
        self.store, self.first, self.total = data.store, first, data.total_steps
        self.batch_of = StepBatches(data.sampler)

    def __len__(self) -> int:
        return self.total - self.first

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return batch_tensors(self.store, self.batch_of(self.first + index))


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def run_loader(data: RunData, first: int, workers: int, device: torch.device, seed: int) -> torch.utils.data.DataLoader:
    """``batch_size=None`` keeps the sampler's batches; persistent workers prefetch across epochs."""
    return torch.utils.data.DataLoader(
        _RunBatches(data, first),
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        worker_init_fn=_seed_worker if workers else None,
        generator=torch.Generator().manual_seed(seed),
        prefetch_factor=4 if workers else None,
        persistent_workers=workers > 0,
    )


def to_device(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}
