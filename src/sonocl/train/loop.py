"""The one pretraining loop for every method (``sonocl pretrain``).

Reads top to bottom, as DINO's ``main_dino.py``: `pretrain` calls `setup`, which builds a `Run`
(`sonocl.train.run`: data from `sonocl.train.data`, model and optimiser from `sonocl.train.model`, objective,
scaler, schedules, logs) and restores it from ``last.pt`` on resume; then for each epoch `train_one_epoch` (views
on the device, objective, finite check, scale → backward → all-reduce → unscale → clip → step, momentum update)
and `end_of_epoch` (validation loss and monitors, `sonocl.train.validation`; checkpoints); then the encoder
export. Everything method-specific comes from the method's module
(``sonocl/methods/``): the sampler, the objective and, for Meta-USCL, the meta set.

Randomness. The sampler is a pure function of (seed, epoch); the augmentation generator and torch's
global RNG are re-seeded from (seed, rank, global step) at the start of every step, so a run resumed at
step s draws exactly what the uninterrupted run drew there (the RNG states are in the checkpoint as
well). Validation and the monitors use their own fixed-seed generator and never touch the training state.

Outputs under ``RUN``: ``config.yaml`` (resolved configuration), ``provenance.json`` (which videos it trained on,
whose labels it used, which it held out: `sonocl.provenance`), ``metrics.csv``, ``tb/`` (TensorBoard),
``checkpoints/{last,best}.pt`` and ``encoder.safetensors`` (backbone of ``best.pt`` or ``last.pt``, ``cfg.export``);
with ``--tracker``, ``trackers.json`` and the trackers' own files (``wandb/``, ``mlruns/``: `sonocl.train.trackers`).

``metrics.csv`` columns: ``kind`` (``step`` or ``epoch``), ``epoch`` (1-based), ``step`` (optimiser steps done,
over the run), ``lr``, ``momentum`` (target-network momentum, MoCo/BYOL), ``loss`` (the objective's total,
averaged over ranks), ``part_<name>`` (each loss part the objective reports), ``images_per_s`` (2 views × global
batch per second of wall time, data waiting included: the pair rate × 2 for every method, so runs compare by the
pairs they draw, although MAE encodes only the first view and DINO adds its local crops), ``step_seconds`` (the
optimiser step alone: forward, backward, update), ``val_loss`` (unweighted InfoNCE on held-out videos, fixed seed), ``knn_acc``
(k-NN accuracy of held-out labelled frames against training ones), ``embedding_std`` (collapse metric of held-out
z), ``seconds`` (wall time of the run, its resumed parts included). Step rows leave the epoch columns empty and
the other way round. The sum of ``step_seconds`` over the last ``seconds`` is the run's efficiency: the share of
its wall time spent training rather than waiting for data, monitoring or checkpointing.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sonocl import outputs, provenance
from sonocl.augment import make_views
from sonocl.data.store import directory_lock
from sonocl.errors import ConfigError
from sonocl.methods.config import PretrainConfig
from sonocl.methods.objectives import BatchTensors, StepContext
from sonocl.progress import progress_report
from sonocl.train import distributed as ddp
from sonocl.train.checkpoint import (
    link_checkpoint,
    load_checkpoint,
    remove_stale_temporaries,
    reproducible,
    save_checkpoint,
    snapshot,
)
from sonocl.train.config import resolve, save_yaml
from sonocl.train.data import build_data, run_loader, to_device
from sonocl.train.logs import RunLogs
from sonocl.train.model import (
    base_lr,
    build_run_model,
    export_encoder,
    make_optimizer,
    resolve_precision,
    set_train_mode,
)
from sonocl.train.replay import build_augment, step_seed, step_views
from sonocl.train.run import PretrainResult, Run, checkpoint_state, restore
from sonocl.train.schedules import lr_schedule, momentum_schedule
from sonocl.train.trackers import require_trackers
from sonocl.train.validation import monitors, validation_loss


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the loss parts."""


# ---------------------------------------------------------------------------------------------- main


def pretrain(
    cfg: PretrainConfig, out: str | os.PathLike[str], resume: bool = False, overwrite: bool = False
) -> PretrainResult:
    """Pretrain ``cfg.method`` on ``cfg.store``, writing everything under ``out`` (see the module docstring).

    ``out`` must be new, empty or a run directory (`sonocl.outputs`); ``overwrite`` writes into another folder."""
    started = time.perf_counter()  # the run's wall time includes building it
    cfg.validate()
    require_trackers(cfg.trackers)
    context, device = ddp.init_distributed(cfg.device)
    try:
        if context.is_main:
            outputs.claim(Path(out), outputs.RUN, overwrite=overwrite)
        with reproducible(cfg.seed, cfg.deterministic, cfg.threads), _run_lock(Path(out), context):
            run = setup(cfg, Path(out), resume, context, device, started)
            try:
                for epoch in range(run.epoch, run.data.num_epochs):
                    train_one_epoch(run, epoch)
                    end_of_epoch(run, epoch)
            except KeyboardInterrupt:
                if context.is_main:
                    save_checkpoints(run)
                    export_encoder(run.cfg, run.out)
                    print(
                        f"\ninterrupted: {run.last_path} saved at epoch {run.epoch + 1}, step {run.step_in_epoch}; "
                        f"continue with --resume",
                        file=sys.stderr,
                    )
                raise
            else:
                if context.is_main:
                    export_encoder(run.cfg, run.out)
                if run.log is not None:
                    run.log.finish(run.global_step, run.elapsed_seconds, run.training_seconds, run.best_val_loss)
            finally:
                if run.progress is not None:
                    run.progress.close()
                if run.log is not None:
                    run.log.close()
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
    method = resolve(cfg)
    precision = resolve_precision(cfg.precision, device)
    channels_last = cfg.model.channels_last if cfg.model.channels_last is not None else device.type == "cuda"
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    # ---- data: grouped hold-out of videos, samplers, monitor frames
    data = build_data(cfg, method, context)

    # ---- model, objective, optimiser, schedules
    model = build_run_model(cfg, method, data, context, device, memory_format)
    objective = method.objective(cfg, model, data.sampler).to(device)
    params = [p for p in (*model.parameters(), *objective.trained_parameters()) if p.requires_grad]
    lr, total = base_lr(cfg), data.total_steps
    ema_start = cfg.schedule.ema_start
    run = Run(
        cfg=cfg, out=out, method=method, context=context, device=device, precision=precision,
        memory_format=memory_format, data=data, model=model, objective=objective, params=params,
        optimizer=make_optimizer(cfg, params, lr), scaler=torch.amp.GradScaler(device.type, enabled=precision == "fp16"),
        lrs=lr_schedule(lr, total, cfg.schedule),
        momenta=momentum_schedule(ema_start, cfg.schedule.ema_end, total) if ema_start is not None else None,
        augment=build_augment(cfg), generator=torch.Generator(device=device), gather=ddp.make_gather(context),
        started=started,
    )  # fmt: skip

    # ---- resume, loader, logs
    if resume:
        restore(run, load_checkpoint(run.last_path))
    global_step = run.global_step
    if resume and global_step == total and context.is_main:
        print(f"sonocl pretrain: {out} is complete ({total} steps); nothing left to train", file=sys.stderr)
    run.batches = iter(run_loader(data, global_step, cfg.workers, device, cfg.seed + global_step))
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


def _start_logs(run: Run, global_step: int, resume: bool) -> None:
    """``config.yaml``, ``provenance.json``, the logs (rank 0: ``metrics.csv``, TensorBoard, the trackers), and the
    run's first line."""
    cfg, data, out = run.cfg, run.data, run.out
    out.mkdir(parents=True, exist_ok=True)
    save_yaml(cfg, out / "config.yaml")
    record = run_provenance(run, resume)
    provenance.write(out, record)
    run.log = RunLogs.open(cfg, out, (global_step, run.epoch) if resume else None, record)
    processes = f", {run.context.world_size} processes" if run.context.enabled else ""
    print(f"sonocl pretrain: {cfg.method} on {data.store.num_videos} videos ({len(data.kept)} train, {len(data.held)} "
          f"held out), {data.total_steps} steps ({data.steps_per_epoch}/epoch, {data.num_epochs} epochs) of batch "
          f"{cfg.batch_size} = {data.total_steps * cfg.batch_size} pairs, {run.precision}, {run.device}{processes}",
          file=sys.stderr)  # fmt: skip
    if len(data.store.roots) > 1:
        sources = data.store.video_source.tolist()
        for source, (root, share) in enumerate(zip(data.store.roots, data.store_shares)):
            print(f"sonocl pretrain:   {root}: {sources.count(source)} videos, {100 * share:.1f} % of the pairs",
                  file=sys.stderr)  # fmt: skip


def run_provenance(run: Run, resume: bool) -> dict[str, Any]:
    """What this part of the run sees, joined to what its earlier parts (on resume) and its ``--init``'s
    pretraining saw: the record only grows (`sonocl.provenance`)."""
    cfg, data = run.cfg, run.data
    record = provenance.record(data.store, data.kept, data.sampler.labelled_videos, data.held, method=cfg.method,
                               label_columns=data.sampler.label_columns, steps=data.total_steps,
                               batch_size=cfg.batch_size, shares=data.store_shares)  # fmt: skip
    earlier = provenance.read(run.out) if resume else None
    if earlier is not None:
        record = provenance.combine(earlier, record)
    ancestor = provenance.find(cfg.model.init)
    if ancestor is not None:
        record = provenance.inherit(record, ancestor, cfg.model.init)
    return record


# --------------------------------------------------------------------------------------------- train


def train_one_epoch(run: Run, epoch: int) -> None:
    """The epoch's remaining steps: each one seeded from (seed, rank, step), so a resumed run draws the same."""
    cfg, data = run.cfg, run.data
    first = run.step_in_epoch if epoch == run.epoch else 0
    last = min(data.steps_per_epoch, data.total_steps - epoch * data.steps_per_epoch)  # the budget may end mid-epoch
    augment_first = type(data.sampler).augment_first
    batches, progress = run.batches, run.progress
    assert batches is not None and progress is not None, "setup starts the loader and the progress report"
    set_train_mode(run.model, cfg.model.freeze_bn)
    tick = time.perf_counter()
    for step_in_epoch in range(first, last):
        host_batch = next(batches)
        global_step = epoch * data.steps_per_epoch + step_in_epoch
        lr = float(run.lrs[global_step])
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        momentum = float(run.momenta[global_step]) if run.momenta is not None else None
        torch.manual_seed(step_seed(cfg.seed, run.context.rank, global_step))

        batch = to_device(host_batch, run.device)
        view1, view2, local = step_views(cfg, run.augment, run.generator, batch, augment_first, global_step,
                                         run.context.rank)  # fmt: skip
        targets = BatchTensors(batch["positive_group"], batch["weight"], batch["label"], batch["video"])
        step_context = StepContext(
            step=global_step,
            optimizer=run.optimizer,
            lr=lr,
            gather=run.gather,
            meta_views=_meta_views(run, epoch, step_in_epoch),
            local_views=None if local is None else local.contiguous(memory_format=run.memory_format),
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
            progress.set_postfix(
                epoch=epoch + 1,
                loss=f"{values['loss']:.4f}",
                lr=f"{lr:.3g}",
                img_s=f"{images_per_s:.0f}",
                refresh=False,
            )
        progress.update(1)
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
    assert run.log is not None, "rank 0 logs, and its setup opened metrics.csv"
    run.log.step(
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


# ------------------------------------------------------------------------------------- end of epoch


def end_of_epoch(run: Run, epoch: int) -> None:
    """Rank 0: the held-out loss every epoch when the run exports its best checkpoint (the model selection of USCL's
    and Meta-USCL's reference code), else with the monitors; the monitors every ``monitor_every`` epochs and after the
    last; ``last.pt`` (and ``best.pt``) every ``checkpoint_every_seconds`` and after the last epoch. A better epoch
    between checkpoint writes is kept in memory (`Run.best_snapshot`) and written with the next ``last.pt``."""
    data, done = run.data, epoch + 1
    monitored = done % data.monitor_every == 0 or done == data.num_epochs
    selecting = run.cfg.export == "best" and bool(data.val_batches)
    run.epoch, run.step_in_epoch = done, 0
    improved = False
    if run.context.is_main and (monitored or selecting):
        val_loss = validation_loss(run)
        # Without held-out pairs there is no model selection: best is the latest monitored epoch.
        improved = val_loss is None or run.best_val_loss is None or val_loss < run.best_val_loss
        if val_loss is not None and improved:
            run.best_val_loss = val_loss
        if monitored:
            run.epoch_metrics = {**({"val_loss": val_loss} if val_loss is not None else {}), **monitors(run)}
            _log_epoch(run, done)
    due = done == data.num_epochs or time.perf_counter() - run.saved_at >= run.cfg.checkpoint_every_seconds
    if run.context.is_main and due:
        if improved:
            run.best_unsaved = False  # superseded: best.pt becomes this epoch's last.pt
        save_checkpoints(run)
        if improved:
            link_checkpoint(run.last_path, run.best_path)
    elif run.context.is_main and improved:
        run.best_snapshot = snapshot(checkpoint_state(run), into=run.best_snapshot)
        run.best_unsaved = True
    ddp.barrier(run.context)


def _log_epoch(run: Run, done: int) -> None:
    """The monitored epoch's row of ``metrics.csv`` and its scalars (`RunLogs.epoch`), and its line."""
    data = run.data
    step = min(done * data.steps_per_epoch, data.total_steps)
    assert run.log is not None and run.progress is not None, "rank 0 logs: setup opened metrics.csv and the report"
    run.log.epoch({"kind": "epoch", "epoch": done, "step": step, **run.epoch_metrics, "seconds": run.elapsed_seconds})
    run.progress.write(
        f"epoch {done}/{data.num_epochs} (step {step}): "
        + ", ".join(f"{k} {v:.4f}" for k, v in run.epoch_metrics.items()),
        file=sys.stderr,
    )


def save_checkpoints(run: Run) -> None:
    """``best.pt`` when a better epoch is held in memory, then ``last.pt`` (in that order: a kill between the two
    leaves a ``best.pt`` at least as good as ``last.pt`` records)."""
    if run.best_unsaved and run.best_snapshot is not None:
        save_checkpoint(run.best_snapshot, run.best_path)
        run.best_unsaved = False
    save_checkpoint(checkpoint_state(run), run.last_path)
    run.saved_at = time.perf_counter()


# ----------------------------------------------------------------------------------------- parts


def _synchronised_clock(device: torch.device) -> float:
    """``perf_counter`` once the device's queued work is done (on CUDA, kernels run after the call returns)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@contextlib.contextmanager
def _run_lock(out: Path, context: ddp.DistributedContext) -> Iterator[None]:
    """One writer per run directory (rank 0 holds ``RUN/.lock``; released by the kernel if the process dies)."""
    if not context.is_main:
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    with directory_lock(out, "run directory"):
        yield
