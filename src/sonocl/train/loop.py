"""The one pretraining loop for every method (``sonocl pretrain``).

Reads top to bottom, as DINO's ``main_dino.py``: `pretrain` calls `setup`, which builds a `Run` (data, model,
objective, optimiser, scaler, schedules, monitors, logs) and restores it from ``last.pt`` on resume; then for
each epoch `train_one_epoch` (views on the device, objective, finite check, scale → backward → all-reduce →
unscale → clip → step, momentum update) and `end_of_epoch` (validation, kNN and collapse monitors,
checkpoints); then the encoder export. Everything method-specific comes from the method's module
(``sonocl/methods/``): the sampler, the objective and, for Meta-USCL, the meta set.

Randomness. The sampler is a pure function of (seed, epoch); the augmentation generator and torch's
global RNG are re-seeded from (seed, rank, global step) at the start of every step, so a run resumed at
step s draws exactly what the uninterrupted run drew there (the RNG states are in the checkpoint as
well). Validation and the monitors use their own fixed-seed generator and never touch the training state.

Outputs under ``RUN``: ``config.yaml`` (resolved configuration), ``provenance.json`` (which videos it trained on,
whose labels it used, which it held out: `sonocl.provenance`), ``metrics.csv``, ``tb/`` (TensorBoard),
``checkpoints/{last,best}.pt`` and ``encoder.safetensors`` (backbone of ``best.pt`` or ``last.pt``, ``cfg.export``).

``metrics.csv`` columns: ``kind`` (``step`` or ``epoch``), ``epoch`` (1-based), ``step`` (optimiser steps done,
over the run), ``lr``, ``momentum`` (target-network momentum, MoCo/BYOL), ``loss`` (the objective's total,
averaged over ranks), ``part_<name>`` (each loss part the objective reports), ``images_per_s`` (encoder images,
2 views × global batch, per second of wall time, data waiting included), ``step_seconds`` (the optimiser step
alone: forward, backward, update), ``val_loss`` (unweighted InfoNCE on held-out videos, fixed seed), ``knn_acc``
(k-NN accuracy of held-out labelled frames against training ones), ``embedding_std`` (collapse metric of held-out
z), ``seconds`` (wall time of the run, its resumed parts included). Step rows leave the epoch columns empty and
the other way round. The sum of ``step_seconds`` over the last ``seconds`` is the run's efficiency: the share of
its wall time spent training rather than waiting for data, monitoring or checkpointing.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from sonocl import outputs, provenance
from sonocl.augment import BatchAugment, make_views
from sonocl.data.store import FrameStore, directory_lock
from sonocl.errors import ConfigError, UserError
from sonocl.methods import Method, get_method
from sonocl.pairs import PairBatch, PairSampler
from sonocl.progress import Progress, progress_report
from sonocl.train import distributed as ddp
from sonocl.train.checkpoint import (
    link_checkpoint,
    load_checkpoint,
    remove_stale_temporaries,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from sonocl.train.config import PretrainConfig, replace, save_yaml
from sonocl.train.logs import MetricsLog, NullWriter, tensorboard
from sonocl.train.monitor import backbone_features, embedding_std, knn_accuracy, monitor_frames
from sonocl.train.objectives import BatchTensors, Objective, StepContext
from sonocl.train.replay import (
    StepBatches,
    batch_tensors,
    build_augment,
    split_videos,
    step_seed,
    step_views,
    training_sampler,
)
from sonocl.train.schedules import lr_schedule, momentum_schedule

CHECKPOINT_FORMAT = 3
STATEFUL = ("model", "objective", "optimizer", "scaler")
"""The objects a checkpoint saves and restores by key (their ``state_dict``)."""
POSITION = ("epoch", "step_in_epoch", "best_val_loss", "elapsed_seconds", "training_seconds")
MONITOR_MAX_FRAMES = 4096
_VALIDATION_SEED = 0x5EED


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the loss parts."""


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
class RunData:
    """The store, the video split and everything drawn from it: samplers, validation pairs, monitor frames."""

    store: FrameStore
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
    def steps_per_epoch(self) -> int:
        return len(self.sampler)

    @property
    def num_epochs(self) -> int:
        """Epochs the budget spans (the last one may be partial)."""
        return math.ceil(self.total_steps / self.steps_per_epoch)


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
    model: nn.Module
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
    log: MetricsLog | None = None
    writer: Any = field(default_factory=NullWriter)
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
    """The checkpoint of a better epoch than ``best.pt`` holds, kept in memory until the next checkpoint write."""

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
        """The objects saved and restored by key; see `checkpoint_state` and `restore`."""
        return {"model": self.model, "objective": self.objective, "optimizer": self.optimizer, "scaler": self.scaler}


# ---------------------------------------------------------------------------------------------- main


def pretrain(
    cfg: PretrainConfig, out: str | os.PathLike[str], resume: bool = False, overwrite: bool = False
) -> PretrainResult:
    """Pretrain ``cfg.method`` on ``cfg.store``, writing everything under ``out`` (see the module docstring).

    ``out`` must be new, empty or a run directory (`sonocl.outputs`); ``overwrite`` writes into another folder."""
    started = time.perf_counter()  # the run's wall time includes building it
    cfg.validate()
    context, device = ddp.init_distributed(cfg.device)
    try:
        if context.is_main:
            outputs.claim(out, outputs.RUN, overwrite=overwrite)
        with _reproducibility(cfg), _run_lock(Path(out), context):
            run = setup(cfg, Path(out), resume, context, device, started)
            try:
                for epoch in range(run.epoch, run.data.num_epochs):
                    train_one_epoch(run, epoch)
                    end_of_epoch(run, epoch)
            except KeyboardInterrupt:
                if context.is_main:
                    save_checkpoints(run)
                    export_encoder(run)
                    print(
                        f"\ninterrupted: {run.last_path} saved at epoch {run.epoch + 1}, step {run.step_in_epoch}; "
                        f"continue with --resume",
                        file=sys.stderr,
                    )
                raise
            finally:
                run.progress.close()
                run.writer.close()
                if run.log is not None:
                    run.log.close()
            if context.is_main:
                export_encoder(run)
            ddp.barrier(context)
            return PretrainResult(run.out, run.data.total_steps, run.data.num_epochs, run.best_val_loss,
                                  run.epoch_metrics, run.elapsed_seconds, run.training_seconds)  # fmt: skip
    finally:
        ddp.shutdown(context)


# --------------------------------------------------------------------------------------------- setup


def setup(cfg: PretrainConfig, out: Path, resume: bool, context: ddp.DistributedContext, device: torch.device,
          started: float) -> Run:  # fmt: skip
    """Build the `Run`: data, model, objective, optimiser, scaler, schedules, logs; restored from ``last.pt`` on resume."""
    resume = _check_run_directory(out, resume, context)
    if cfg.batch_size % context.world_size:
        raise ConfigError(f"batch_size {cfg.batch_size} does not split over {context.world_size} processes")
    method = get_method(cfg.method)
    precision = resolve_precision(cfg.precision, device)
    channels_last = cfg.model.channels_last if cfg.model.channels_last is not None else device.type == "cuda"
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    # ---- data: grouped hold-out of videos, samplers, monitor frames
    data = build_data(cfg, method, context)

    # ---- model, objective, optimiser, schedules
    model = build_run_model(cfg, data, context, device, memory_format)
    objective = method.objective(cfg, model, data.sampler).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    lr, total = base_lr(cfg), data.total_steps
    momenta = cfg.schedule.ema_start is not None
    run = Run(
        cfg=cfg, out=out, method=method, context=context, device=device, precision=precision,
        memory_format=memory_format, data=data, model=model, objective=objective, params=params,
        optimizer=make_optimizer(cfg, params, lr), scaler=torch.amp.GradScaler(device.type, enabled=precision == "fp16"),
        lrs=lr_schedule(lr, total, cfg.schedule),
        momenta=momentum_schedule(cfg.schedule.ema_start, cfg.schedule.ema_end, total) if momenta else None,
        augment=build_augment(cfg), generator=torch.Generator(device=device), gather=ddp.make_gather(context),
        started=started,
    )  # fmt: skip

    # ---- resume, loader, logs
    if resume:
        restore(run, load_checkpoint(run.last_path))
    global_step = run.global_step
    if resume and global_step == total and context.is_main:
        print(f"sonocl pretrain: {out} is complete ({total} steps); nothing left to train", file=sys.stderr)
    run.batches = iter(_loader(data, global_step, cfg.workers, device, cfg.seed + global_step))
    run.progress = progress_report(total, f"pretrain {cfg.method}", "step", initial=global_step,
                                   enabled=context.is_main and cfg.progress)  # fmt: skip
    if context.is_main:
        _start_logs(run, global_step, resume)
    return run


def _check_run_directory(out: Path, resume: bool, context: ddp.DistributedContext) -> bool:
    """Whether to resume: a run without ``last.pt`` starts over; a new run never overwrites an old one."""
    from sonocl.models import ENCODER_FILE

    last_path = out / "checkpoints" / "last.pt"
    if not last_path.exists() and (out / ENCODER_FILE).exists():
        raise ConfigError(
            f"{out} holds a finished run ({out / ENCODER_FILE}) without its checkpoints/last.pt, so it can be neither "
            "resumed nor replaced; choose a new --out"
        )
    if resume and not last_path.exists():
        if context.is_main:  # killed before its first checkpoint: nothing to continue from, so start over
            print(
                f"sonocl pretrain: {last_path} does not exist yet; starting {out} from the beginning", file=sys.stderr
            )
        resume = False
    remove_stale_temporaries(last_path.parent)
    if not resume and last_path.exists():
        raise ConfigError(
            f"{out} already holds a run ({last_path}); pass --resume to continue it or choose a new --out"
        )
    return resume


def build_run_model(cfg: PretrainConfig, data: RunData, context: ddp.DistributedContext, device: torch.device,
                    memory_format: torch.memory_format) -> nn.Module:  # fmt: skip
    """The `ContrastiveModel` on the device (a classifier over the sampler's classes when the method has one)."""
    num_classes = len(getattr(data.sampler, "class_names", ())) if cfg.model.classifier else 0
    model = build_model(cfg, num_classes)
    if cfg.model.sync_bn and context.enabled:
        if device.type != "cuda":
            raise ConfigError(
                "--sync-bn needs CUDA (torch's SyncBatchNorm has no CPU kernel); use model.freeze_bn on CPU"
            )
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device, memory_format=memory_format)
    if cfg.model.compile:
        model.backbone.compile()
    return model


def _start_logs(run: Run, global_step: int, resume: bool) -> None:
    """``config.yaml``, ``provenance.json``, ``metrics.csv`` and TensorBoard (rank 0), and the run's first line."""
    cfg, data, out = run.cfg, run.data, run.out
    out.mkdir(parents=True, exist_ok=True)
    save_yaml(cfg, out / "config.yaml")
    provenance.write(out, run_provenance(run, resume))
    run.log = MetricsLog(out / "metrics.csv", global_step if resume else None, run.epoch if resume else None)
    run.writer = tensorboard(out / "tb", global_step if resume else None)
    processes = f", {run.context.world_size} processes" if run.context.enabled else ""
    print(f"sonocl pretrain: {cfg.method} on {data.store.num_videos} videos ({len(data.kept)} train, {len(data.held)} "
          f"held out), {data.total_steps} steps ({data.steps_per_epoch}/epoch, {data.num_epochs} epochs) of batch "
          f"{cfg.batch_size} = {data.total_steps * cfg.batch_size} pairs, {run.precision}, {run.device}{processes}",
          file=sys.stderr)  # fmt: skip


def run_provenance(run: Run, resume: bool) -> dict[str, Any]:
    """What this part of the run sees, joined to what its earlier parts (on resume) and its ``--init``'s
    pretraining saw: the record only grows (`sonocl.provenance`)."""
    cfg, data = run.cfg, run.data
    record = provenance.record(data.store, data.kept, data.sampler.labelled_videos, data.held, method=cfg.method,
                               label_columns=data.sampler.label_columns, steps=data.total_steps,
                               batch_size=cfg.batch_size)  # fmt: skip
    earlier = provenance.read(run.out) if resume else None
    if earlier is not None:
        record = provenance.combine(earlier, record)
    ancestor = provenance.find(cfg.model.init)
    if ancestor is not None:
        record = provenance.inherit(record, ancestor, cfg.model.init)
    return record


def build_data(cfg: PretrainConfig, method: Method, context: ddp.DistributedContext) -> RunData:
    """The store, the grouped hold-out of videos, the method's samplers and the monitors' frames."""
    store = FrameStore.open(cfg.store)
    kept, held = split_videos(cfg, store)
    batch_size = cfg.batch_size // context.world_size
    try:
        sampler = training_sampler(cfg, store, kept, batch_size, context.rank, context.world_size)
    except UserError:  # says what is wrong already (e.g. ivpp on videos without a frame rate)
        raise
    except ValueError as error:  # e.g. fewer training items than one batch
        raise ConfigError(
            f"{cfg.store}: {error} ({len(kept)} training videos of {store.num_videos}, --batch-size "
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
    val_batches = validation_batches(cfg, store, held) if context.is_main else []
    monitored = len(bank) + len(query) + len(collapse) + 2 * sum(len(b) for b in val_batches)
    trained = 2 * batch_size * context.world_size * len(sampler)
    return RunData(
        store=store,
        kept=kept,
        held=held,
        sampler=sampler,
        total_steps=cfg.steps or cfg.epochs * len(sampler),
        monitor_every=cfg.monitor_every or max(1, math.ceil(3 * monitored / trained)),
        val_batches=val_batches,
        meta_sampler=meta_sampler,
        bank=(bank, bank_labels),
        query=(query, query_labels),
        collapse_frames=collapse,
    )


def validation_batches(cfg: PretrainConfig, store: FrameStore, held: np.ndarray) -> list[PairBatch]:
    """The held-out videos' pairs, drawn once with a fixed seed so that every epoch's validation loss is comparable."""
    if len(held) < 2:
        return []
    fixed = replace(cfg, seed=_VALIDATION_SEED)
    method = get_method(cfg.method)
    build = method.validation_sampler or method.sampler
    try:
        probe = build(fixed, store, held, 1, 0, 1)
        return build(fixed, store, held, min(cfg.batch_size, len(probe)), 0, 1).batches(0)
    except ValueError as error:
        print(f"sonocl pretrain: no validation pairs from the held-out videos ({error})", file=sys.stderr)
        return []


def base_lr(cfg: PretrainConfig) -> float:
    """``optim.lr`` scaled to the global batch: × B/256 (``linear``), × √(B/256) (``sqrt``), or as given."""
    scale = {"none": 1.0, "linear": cfg.batch_size / 256, "sqrt": math.sqrt(cfg.batch_size / 256)}
    return cfg.optim.lr * scale[cfg.optim.lr_scaling]


# ------------------------------------------------------------------------------------ checkpoints


def checkpoint_state(run: Run) -> dict[str, Any]:
    """Every stateful object by key (`Run.stateful`), the position in the run, RNG states and metadata."""
    return {
        "format": CHECKPOINT_FORMAT,
        "config": run.cfg.to_dict(),
        **{name: obj.state_dict() for name, obj in run.stateful().items()},
        "epoch": run.epoch,
        "step_in_epoch": run.step_in_epoch,
        "best_val_loss": run.best_val_loss,
        "elapsed_seconds": run.elapsed_seconds,
        "training_seconds": run.training_seconds,
        "global_step": run.global_step,
        "steps_per_epoch": run.data.steps_per_epoch,
        "world_size": run.context.world_size,
        "metrics": run.epoch_metrics,
        "rng": rng_state({"augment": run.generator}),
        "encoder_metadata": encoder_metadata(run.cfg),
    }


CHECKPOINT_KEYS = frozenset(
    {
        "format",
        "config",
        *STATEFUL,
        *POSITION,
        "global_step",
        "steps_per_epoch",
        "world_size",
        "metrics",
        "rng",
        "encoder_metadata",
    }
)


def restore(run: Run, state: dict[str, Any]) -> None:
    """Load ``state`` into ``run`` by key; a missing or unexpected key is an error that names it."""
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(
            f"{run.last_path}: checkpoint format {state.get('format')} is not {CHECKPOINT_FORMAT}; it was "
            f"written by another sonocl version"
        )
    missing, unexpected = sorted(CHECKPOINT_KEYS - set(state)), sorted(set(state) - CHECKPOINT_KEYS)
    if missing or unexpected:
        raise ConfigError(
            f"{run.last_path}: checkpoint keys do not match this sonocl (missing: {missing or 'none'}; "
            f"unexpected: {unexpected or 'none'})"
        )
    _check_resumable(run.cfg, state, run.context)
    for name, obj in run.stateful().items():
        obj.load_state_dict(state[name])
    run.epoch, run.step_in_epoch, run.best_val_loss, elapsed, run.training_seconds = (state[key] for key in POSITION)
    run.started -= elapsed
    run.epoch_metrics = dict(state["metrics"])
    if run.context.world_size == 1:
        set_rng_state(state["rng"], {"augment": run.generator})


def _check_resumable(cfg: PretrainConfig, state: dict[str, Any], context: ddp.DistributedContext) -> None:
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(
            f"checkpoint format {state.get('format')} is not {CHECKPOINT_FORMAT}; it was written by another sonocl"
        )
    saved = state["config"]
    for key in ("method", "store", "batch_size", "size", "seed", "epochs", "steps"):
        if saved.get(key) != getattr(cfg, key):
            print(
                f"sonocl pretrain: resuming with {key} {getattr(cfg, key)!r} (the run used {saved.get(key)!r}); "
                f"the result will differ from an uninterrupted run",
                file=sys.stderr,
            )
    if state.get("world_size", 1) != context.world_size:
        print(
            f"sonocl pretrain: resuming on {context.world_size} processes (the run used {state.get('world_size')})",
            file=sys.stderr,
        )


# --------------------------------------------------------------------------------------------- train


def train_one_epoch(run: Run, epoch: int) -> None:
    """The epoch's remaining steps: each one seeded from (seed, rank, step), so a resumed run draws the same."""
    cfg, data = run.cfg, run.data
    first = run.step_in_epoch if epoch == run.epoch else 0
    last = min(data.steps_per_epoch, data.total_steps - epoch * data.steps_per_epoch)  # the budget may end mid-epoch
    augment_first = type(data.sampler).augment_first
    _set_train_mode(run.model, cfg.model.freeze_bn)
    tick = time.perf_counter()
    for step_in_epoch in range(first, last):
        host_batch = next(run.batches)
        global_step = epoch * data.steps_per_epoch + step_in_epoch
        lr = float(run.lrs[global_step])
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        momentum = float(run.momenta[global_step]) if run.momenta is not None else None
        torch.manual_seed(step_seed(cfg.seed, run.context.rank, global_step))

        batch = _to_device(host_batch, run.device)
        view1, view2 = step_views(cfg, run.augment, run.generator, batch, augment_first, global_step, run.context.rank)
        targets = BatchTensors(batch["positive_group"], batch["weight"], batch["label"], batch["video"])
        step_context = StepContext(
            step=global_step,
            optimizer=run.optimizer,
            lr=lr,
            gather=run.gather,
            meta_views=_meta_views(run, epoch, step_in_epoch),
        )
        view1 = view1.contiguous(memory_format=run.memory_format)
        view2 = view2.contiguous(memory_format=run.memory_format)
        started = _synchronised_clock(run.device)
        values = train_step(run, view1, view2, targets, step_context)
        run.objective.after_step(run.model, momentum)
        step_seconds = _synchronised_clock(run.device) - started
        run.training_seconds += step_seconds
        run.epoch, run.step_in_epoch = epoch, step_in_epoch + 1

        now = time.perf_counter()
        images_per_s = 2 * cfg.batch_size / max(now - tick, 1e-9)
        tick = now
        if run.context.is_main:
            _log_step(run, epoch, global_step, lr, momentum, values, images_per_s, step_seconds)
            run.progress.set_postfix(
                epoch=epoch + 1,
                loss=f"{values['loss']:.4f}",
                lr=f"{lr:.3g}",
                img_s=f"{images_per_s:.0f}",
                refresh=False,
            )
        run.progress.update(1)
        every = cfg.checkpoint_every_steps
        if run.context.is_main and every and run.step_in_epoch % every == 0 and run.step_in_epoch < last:
            save_checkpoints(run)


def train_step(run: Run, view1: Tensor, view2: Tensor, targets: BatchTensors, context: StepContext) -> dict[str, float]:
    """One optimiser step in DINO's order: forward, finite check, scale → backward → all-reduce → unscale → clip →
    step → update. Returns the loss and its parts, averaged over ranks."""
    run.optimizer.zero_grad(set_to_none=True)
    dtype = run.autocast_dtype
    with torch.autocast(run.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        loss, parts = run.objective(run.model, view1, view2, targets, context)
    names = list(parts)
    values = [float(loss.detach()), *(float(parts[n]) for n in names)]
    if run.context.enabled:
        values = ddp.all_mean(values, run.context, run.device)
    if not math.isfinite(values[0]):
        detail = ", ".join(f"{n}={v:.6g}" for n, v in zip(names, values[1:]))
        epoch, step = divmod(context.step, run.data.steps_per_epoch)
        saved = (
            f"; {run.last_path} holds the last good state"
            if run.last_path.exists()
            else "; no checkpoint was written before it"
        )
        raise NonFiniteLossError(
            f"non-finite loss {values[0]} at step {context.step + 1} (epoch {epoch + 1}, step {step + 1} of "
            f"{run.data.steps_per_epoch}, lr {context.lr:.3g}); loss parts: {detail or 'none'}. Try a lower --lr, "
            f"--clip-grad, or --precision fp32{saved}"
        )
    run.scaler.scale(loss).backward()
    ddp.average_gradients(run.params, run.context)
    if run.cfg.optim.clip_grad:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.params, run.cfg.optim.clip_grad)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    return {"loss": values[0], **dict(zip(names, values[1:]))}


def _meta_views(run: Run, epoch: int, step: int) -> Callable[[], tuple[Tensor, Tensor, Tensor]] | None:
    """The meta batch of this step, built only when the objective asks for it (Meta-USCL, every ``meta_every``)."""
    meta_sampler = run.data.meta_sampler
    if meta_sampler is None:
        return None

    def views() -> tuple[Tensor, Tensor, Tensor]:
        batch = meta_sampler.batch(epoch, step)
        frames = torch.from_numpy(run.data.store.gather(batch.frames)).to(run.device, non_blocking=True)
        with torch.no_grad():
            view1, view2 = make_views(frames, batch.mix, batch.augment_first, run.augment, run.generator)
        group = torch.from_numpy(batch.positive_group).to(run.device)
        return (
            view1.contiguous(memory_format=run.memory_format),
            view2.contiguous(memory_format=run.memory_format),
            group,
        )

    return views


def _log_step(
    run: Run,
    epoch: int,
    global_step: int,
    lr: float,
    momentum: float | None,
    values: dict[str, float],
    images_per_s: float,
    step_seconds: float,
) -> None:
    parts = {f"part_{n}": v for n, v in values.items() if n != "loss"}
    run.log.write(
        {
            "kind": "step",
            "epoch": epoch + 1,
            "step": global_step + 1,
            "lr": lr,
            "momentum": momentum if momentum is not None else "",
            "loss": values["loss"],
            **parts,
            "images_per_s": images_per_s,
            "step_seconds": step_seconds,
            "seconds": run.elapsed_seconds,
        }
    )
    for name, value in (
        ("loss", values["loss"]),
        ("lr", lr),
        ("images_per_s", images_per_s),
        *((n, v) for n, v in values.items() if n != "loss"),
    ):
        run.writer.add_scalar(f"train/{name}", value, global_step + 1)


# ------------------------------------------------------------------------------------- end of epoch


def end_of_epoch(run: Run, epoch: int) -> None:
    """Rank 0: the held-out loss every epoch when the run exports its best checkpoint (the model selection of USCL's
    and Meta-USCL's reference code), else with the monitors; the monitors every ``monitor_every`` epochs and after the
    last, with ``last.pt`` (and ``best.pt``); between them ``last.pt`` every ``checkpoint_every_seconds``. A better
    epoch between checkpoint writes is kept in memory (`Run.best_snapshot`) and written with the next ``last.pt``."""
    data, done = run.data, epoch + 1
    monitored = done % data.monitor_every == 0 or done == data.num_epochs
    selecting = run.cfg.export == "best" and bool(data.val_batches)
    run.epoch, run.step_in_epoch = done, 0
    if run.context.is_main and (monitored or selecting):
        val_loss = validation_loss(run)
        # Without held-out pairs there is no model selection: best is the latest monitored epoch.
        improved = val_loss is None or run.best_val_loss is None or val_loss < run.best_val_loss
        if val_loss is not None and improved:
            run.best_val_loss = val_loss
        if monitored:
            run.epoch_metrics = {**({"val_loss": val_loss} if val_loss is not None else {}), **monitors(run)}
            if improved:
                run.best_snapshot = None  # superseded: best.pt becomes this epoch's last.pt
            save_checkpoints(run)
            if improved:
                link_checkpoint(run.last_path, run.best_path)
            _log_epoch(run, done)
            ddp.barrier(run.context)
            return
        if improved:
            run.best_snapshot = copy.deepcopy(checkpoint_state(run))
    if run.context.is_main and time.perf_counter() - run.saved_at >= run.cfg.checkpoint_every_seconds:
        save_checkpoints(run)
    ddp.barrier(run.context)


def _log_epoch(run: Run, done: int) -> None:
    """The monitored epoch's row of ``metrics.csv``, its TensorBoard scalars and its line."""
    data = run.data
    step = min(done * data.steps_per_epoch, data.total_steps)
    run.log.write({"kind": "epoch", "epoch": done, "step": step, **run.epoch_metrics, "seconds": run.elapsed_seconds})
    for name, value in run.epoch_metrics.items():
        run.writer.add_scalar(f"val/{name}", value, step)
    run.writer.flush()
    run.progress.write(
        f"epoch {done}/{data.num_epochs} (step {step}): "
        + ", ".join(f"{k} {v:.4f}" for k, v in run.epoch_metrics.items()),
        file=sys.stderr,
    )


def save_checkpoints(run: Run) -> None:
    """``best.pt`` when a better epoch is held in memory, then ``last.pt`` (in that order: a kill between the two
    leaves a ``best.pt`` at least as good as ``last.pt`` records)."""
    if run.best_snapshot is not None:
        save_checkpoint(run.best_snapshot, run.best_path)
        run.best_snapshot = None
    save_checkpoint(checkpoint_state(run), run.last_path)
    run.saved_at = time.perf_counter()


@torch.no_grad()
def validation_loss(run: Run) -> float | None:
    """The unweighted loss of the held-out pairs (eval mode, fixed seed); None without held-out pairs."""
    cfg, data, model, device = run.cfg, run.data, run.model, run.device
    if not data.val_batches:
        return None
    model.eval()
    dtype = run.autocast_dtype
    generator = torch.Generator(device=device).manual_seed(cfg.seed + _VALIDATION_SEED)
    total, count = 0.0, 0
    for batch in data.val_batches:
        frames = torch.from_numpy(data.store.gather(batch.frames)).to(device)
        view1, view2 = make_views(frames, batch.mix, batch.augment_first, run.augment, generator)
        targets = BatchTensors(
            positive_group=torch.from_numpy(batch.positive_group).to(device),
            weight=torch.ones(len(batch), device=device),
            label=torch.from_numpy(batch.label).to(device),
        )
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = run.objective.validation_loss(
                model,
                view1.contiguous(memory_format=run.memory_format),
                view2.contiguous(memory_format=run.memory_format),
                targets,
            )
        total += float(loss) * len(batch)
        count += len(batch)
    return total / count


@torch.no_grad()
def monitors(run: Run) -> dict[str, float]:
    """The kNN accuracy and the collapse metric (eval mode); the held-out loss is `validation_loss`."""
    cfg, data, model, device = run.cfg, run.data, run.model, run.device
    model.eval()
    metrics: dict[str, float] = {}
    dtype = run.autocast_dtype
    features = dict(
        size=cfg.size,
        mean=cfg.augment.mean,
        std=cfg.augment.std,
        channels=cfg.model.channels,
        device=device,
        memory_format=run.memory_format,
        autocast_dtype=dtype,
    )
    if len(data.collapse_frames) >= 2:
        h = backbone_features(model.backbone, data.store, data.collapse_frames, **features)
        metrics["embedding_std"] = embedding_std(model.projector(h.to(device)).float())
    (bank_frames, bank_labels), (query_frames, query_labels) = data.bank, data.query
    if len(bank_frames) and len(query_frames):
        bank_h = backbone_features(model.backbone, data.store, bank_frames, **features)
        query_h = backbone_features(model.backbone, data.store, query_frames, **features)
        metrics["knn_acc"] = knn_accuracy(
            bank_h, torch.from_numpy(bank_labels), query_h, torch.from_numpy(query_labels), k=cfg.knn_k
        )
    return metrics


# ----------------------------------------------------------------------------------------- parts


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


def _loader(data: RunData, first: int, workers: int, device: torch.device, seed: int) -> torch.utils.data.DataLoader:
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


def _to_device(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def _synchronised_clock(device: torch.device) -> float:
    """``perf_counter`` once the device's queued work is done (on CUDA, kernels run after the call returns)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


AUTOCAST_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}
"""The autocast dtype of each mixed precision (fp32 runs without autocast)."""


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return precision


def encoder_metadata(cfg: PretrainConfig) -> dict[str, Any]:
    return {
        "arch": cfg.model.backbone,
        "channels": cfg.model.channels,
        "size": cfg.size,
        "mean": cfg.augment.mean,
        "std": cfg.augment.std,
        "method": cfg.method,
    }


def build_model(cfg: PretrainConfig, num_classes: int) -> nn.Module:
    from sonocl.models import ContrastiveModel, feature_dim, init_backbone

    backbone = init_backbone(cfg.model.init, cfg.model.backbone, cfg.model.channels)
    return ContrastiveModel(
        backbone,
        feature_dim(cfg.model.backbone),
        projection_hidden=cfg.model.projection_hidden,
        projection_dim=cfg.model.projection_dim,
        num_classes=num_classes,
        projection_batch_norm=cfg.model.projection_batch_norm,
        predictor_hidden=cfg.model.predictor_hidden,
    )


def _set_train_mode(model: nn.Module, freeze_bn: bool) -> None:
    model.train()
    if freeze_bn:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def make_optimizer(cfg: PretrainConfig, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay)
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=o.betas, weight_decay=o.weight_decay)
    return torch.optim.Adam(params, lr=lr, betas=o.betas, weight_decay=o.weight_decay)


def export_encoder(run: Run) -> None:
    """``encoder.safetensors`` from ``best.pt`` or ``last.pt`` (``cfg.export``), with the encoder's metadata."""
    from sonocl.models import ENCODER_FILE, build_backbone, checkpoint_backbone_state, save_encoder

    cfg = run.cfg
    source = run.best_path if cfg.export == "best" and run.best_path.exists() else run.last_path
    state = checkpoint_backbone_state(load_checkpoint(source))
    backbone = build_backbone(cfg.model.backbone, cfg.model.channels, state)
    save_encoder(backbone, run.out / ENCODER_FILE, {**encoder_metadata(cfg), "checkpoint": source.name})


@contextlib.contextmanager
def _run_lock(out: Path, context: ddp.DistributedContext) -> Iterator[None]:
    """One writer per run directory (rank 0 holds ``RUN/.lock``; released by the kernel if the process dies)."""
    if not context.is_main:
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    with directory_lock(out, "run directory"):
        yield


@contextlib.contextmanager
def _reproducibility(cfg: PretrainConfig) -> Iterator[None]:
    """Seeds; deterministic algorithms and a fixed thread count with ``cfg.deterministic`` (restored afterwards)."""
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    previous_threads = torch.get_num_threads()
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    torch.manual_seed(cfg.seed)
    threads = cfg.threads if cfg.threads is not None else (1 if cfg.deterministic else None)
    if threads is not None:
        torch.set_num_threads(threads)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous_deterministic)
        torch.set_num_threads(previous_threads)
