"""One pretraining run's state (`Run`): what `sonocl.train.loop` builds, advances and checkpoints, and its result."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from sonocl.augment import BatchAugment
from sonocl.methods import Method
from sonocl.methods.config import PretrainConfig
from sonocl.methods.objectives import BatchTensors, Objective
from sonocl.models import ContrastiveModel
from sonocl.progress import Progress
from sonocl.train import distributed as ddp
from sonocl.train.checkpoint import STATEFUL, Checkpoint, rng_state, set_rng_state
from sonocl.train.data import RunData
from sonocl.train.logs import RunLogs
from sonocl.train.model import AUTOCAST_DTYPES, encoder_metadata

HeldOutViews = tuple[Tensor, Tensor, BatchTensors]
"""One held-out batch as the validation loss takes it: its two views and its targets."""


@dataclass
class PretrainResult:
    out: Path
    global_step: int
    epochs_done: int
    best_val_loss: float | None
    last_epoch_metrics: dict[str, float]
    seconds: float
    """Wall time of the run, resumed parts included."""
    training_seconds: float
    """The part of it inside the optimiser steps; ``training_seconds / seconds`` is the run's efficiency."""


@dataclass
class Run:
    """Everything one pretraining run holds; built by `setup`, advanced by `train_one_epoch` and `end_of_epoch`."""

    cfg: PretrainConfig
    out: Path
    method: Method
    context: ddp.DistributedContext
    device: torch.device
    precision: str
    memory_format: torch.memory_format
    data: RunData
    model: ContrastiveModel
    objective: Objective
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    params: list[nn.Parameter]
    lrs: np.ndarray
    momenta: np.ndarray | None
    augment: BatchAugment
    generator: torch.Generator
    gather: Callable[[Tensor], Tensor] | None
    batches: Iterator[dict[str, Tensor]] | None = None
    """The run's one loader over every remaining step (workers persist across epochs)."""
    progress: Progress | None = None
    """One report over the whole run: a bar on a terminal, a line every tenth or 30 s in a log."""
    log: RunLogs | None = None
    """Rank 0's logs: ``metrics.csv``, TensorBoard and the trackers (None on the other ranks)."""
    epoch: int = 0
    """Position: the epoch in progress (0-based) and the steps of it already done."""
    step_in_epoch: int = 0
    best_val_loss: float | None = None
    epoch_metrics: dict[str, float] = field(default_factory=dict)
    training_seconds: float = 0.0
    """Wall time inside the optimiser steps (forward, backward, update): the model-only share of the run."""
    started: float = field(default_factory=time.perf_counter)
    """When this process began the run (before `setup`), moved back on resume by the seconds the run had been
    going at its last checkpoint (``elapsed_seconds``)."""
    saved_at: float = field(default_factory=time.perf_counter)
    best_snapshot: dict[str, Any] | None = None
    """The checkpoint of the latest better epoch kept in memory (`sonocl.train.checkpoint.snapshot`); its buffers are
    reused by the next better epoch."""
    best_unsaved: bool = False
    """Whether ``best_snapshot`` is better than ``best.pt``: written with the next ``last.pt``."""
    held_out_views: list[HeldOutViews] | None = None
    """The validation loss's views, the same at every epoch, once made (`sonocl.train.validation`)."""

    @property
    def global_step(self) -> int:
        """Steps done; never past the total, since the last epoch of a ``--steps`` budget may be short."""
        return min(self.epoch * self.data.steps_per_epoch + self.step_in_epoch, self.data.total_steps)

    @property
    def elapsed_seconds(self) -> float:
        """Wall time of the run so far, over every process that continued it."""
        return time.perf_counter() - self.started

    @property
    def last_path(self) -> Path:
        return self.out / "checkpoints" / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.out / "checkpoints" / "best.pt"

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return AUTOCAST_DTYPES.get(self.precision)

    def stateful(self) -> dict[str, Any]:
        """The objects a checkpoint saves and restores by name (`sonocl.train.checkpoint.STATEFUL`)."""
        return {name: getattr(self, name) for name in STATEFUL}


def checkpoint_state(run: Run) -> dict[str, Any]:
    """The run's `Checkpoint`, as the dict ``torch.save`` writes."""
    return Checkpoint(
        config=run.cfg.to_dict(),
        states={name: obj.state_dict() for name, obj in run.stateful().items()},
        epoch=run.epoch,
        step_in_epoch=run.step_in_epoch,
        best_val_loss=run.best_val_loss,
        elapsed_seconds=run.elapsed_seconds,
        training_seconds=run.training_seconds,
        global_step=run.global_step,
        steps_per_epoch=run.data.steps_per_epoch,
        world_size=run.context.world_size,
        metrics=run.epoch_metrics,
        rng=rng_state({"augment": run.generator}),
        encoder_metadata=encoder_metadata(run.cfg),
    ).to_state()


def restore(run: Run, state: dict[str, Any]) -> None:
    """Load the checkpoint ``state`` into ``run`` by name (`Checkpoint.from_state` names a key that does not fit)."""
    checkpoint = Checkpoint.from_state(state, run.last_path)
    _warn_if_changed(run.cfg, checkpoint, run.context)
    for name, obj in run.stateful().items():
        obj.load_state_dict(checkpoint.states[name])
    run.epoch, run.step_in_epoch = checkpoint.epoch, checkpoint.step_in_epoch
    run.best_val_loss, run.training_seconds = checkpoint.best_val_loss, checkpoint.training_seconds
    run.started -= checkpoint.elapsed_seconds
    run.epoch_metrics = dict(checkpoint.metrics)
    if run.context.world_size == 1:
        set_rng_state(checkpoint.rng, {"augment": run.generator})


def _warn_if_changed(cfg: PretrainConfig, checkpoint: Checkpoint, context: ddp.DistributedContext) -> None:
    """A line for each setting a resumed run changes that makes it differ from an uninterrupted one."""
    current = cfg.to_dict()  # as the checkpoint keeps it (lists, not tuples: a tuple never equals the saved list)
    for key in ("method", "store", "batch_size", "size", "seed", "epochs", "steps"):
        if checkpoint.config.get(key) != current.get(key):
            print(
                f"sonocl pretrain: resuming with {key} {current.get(key)!r} (the run used "
                f"{checkpoint.config.get(key)!r}); the result will differ from an uninterrupted run",
                file=sys.stderr,
            )
    if checkpoint.world_size != context.world_size:
        print(
            f"sonocl pretrain: resuming on {context.world_size} processes (the run used {checkpoint.world_size})",
            file=sys.stderr,
        )
