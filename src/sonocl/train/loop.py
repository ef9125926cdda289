"""The one pretraining loop for every method (``sonocl pretrain``).

Reads top to bottom: reproducibility → data (split, samplers, loader) → model, objective, optimiser,
schedules → resume → for each epoch: steps (views on the device, objective, finite check, scale →
backward → all-reduce → unscale → clip → step, momentum update), then validation, kNN and collapse
monitors, checkpoints → encoder export.

Randomness. The sampler is a pure function of (seed, epoch); the augmentation generator and torch's
global RNG are re-seeded from (seed, rank, global step) at the start of every step, so a run resumed at
step s draws exactly what the uninterrupted run drew there (the RNG states are in the checkpoint as
well). Validation and the monitors use their own fixed-seed generator and never touch the training state.

Outputs under ``RUN``: ``config.yaml`` (resolved configuration), ``metrics.csv``, ``tb/`` (TensorBoard),
``checkpoints/{last,best}.pt`` and ``encoder.safetensors`` (backbone of ``best.pt``).

``metrics.csv`` columns: ``kind`` (``step`` or ``epoch``), ``epoch`` (1-based), ``step`` (optimiser steps done,
over the run), ``lr``, ``momentum`` (target-network momentum, MoCo/BYOL), ``loss`` (the objective's total,
averaged over ranks), ``part_<name>`` (each loss part the objective reports), ``images_per_s`` (encoder images,
2 views × global batch, per second of wall time, data waiting included), ``val_loss`` (unweighted InfoNCE on
held-out videos, fixed seed), ``knn_acc`` (k-NN accuracy of held-out labelled frames against training ones),
``embedding_std`` (collapse metric of held-out z), ``seconds`` (wall time since the run started). Step rows
leave the epoch columns empty and the other way round.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from sonocl.train import distributed as ddp
from sonocl.train.checkpoint import link_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from sonocl.train.config import ConfigError, PretrainConfig, save_yaml
from sonocl.train.monitor import backbone_features, embedding_std, knn_accuracy, monitor_frames
from sonocl.train.schedules import lr_schedule, momentum_schedule

CHECKPOINT_FORMAT = 1
STEP_COLUMNS = ("lr", "momentum", "loss")
EPOCH_COLUMNS = ("val_loss", "knn_acc", "embedding_std")
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


# ------------------------------------------------------------------------------------------ data path

class _EpochBatches(torch.utils.data.Dataset):
    """The epoch's `PairBatch` list as a map-style dataset: item i = batch i with its frames gathered (uint8)."""

    def __init__(self, store: Any, batches: list[Any]) -> None:
        self.store = store
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        batch = self.batches[index]
        return {
            "frames": torch.from_numpy(self.store.gather(batch.frames)),
            "mix": torch.from_numpy(np.ascontiguousarray(batch.mix)),
            "video": torch.from_numpy(batch.video),
            "positive_group": torch.from_numpy(batch.positive_group),
            "weight": torch.from_numpy(batch.weight),
            "label": torch.from_numpy(batch.label),
        }


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def _loader(store: Any, batches: list[Any], workers: int, device: torch.device, seed: int) -> torch.utils.data.DataLoader:
    """Workers gather each batch's frames from the memory map; ``batch_size=None`` keeps the sampler's batches."""
    return torch.utils.data.DataLoader(
        _EpochBatches(store, batches),
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        worker_init_fn=_seed_worker if workers else None,
        generator=torch.Generator().manual_seed(seed),
        prefetch_factor=4 if workers else None,
    )


def _to_device(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of the augmentation draw at a global step (also used by the report to re-create a run's pairs)."""
    return (seed * 1_000_003 + rank * 7_919 + step * 104_729 + 12_345) % (2**63 - 1)


# ----------------------------------------------------------------------------------------- options

def sampler_options(cfg: PretrainConfig) -> dict[str, Any]:
    """The keyword options of `sonocl.pairs.make_sampler` for ``cfg.method``."""
    o = cfg.options
    options: dict[str, Any] = {}
    if o.items is not None:
        options["items"] = o.items
    if cfg.method == "uscl":
        options.update(label_rate=o.label_rate, label_column=o.label_column)
    elif cfg.method == "meta-uscl":
        options.update(max_dist=o.max_dist)
    elif cfg.method == "ivpp":
        options.update(max_seconds=o.delta_t)
    elif cfg.method == "awcl":
        options.update(anatomy_column=o.anatomy_column, anatomy_level=o.anatomy_level, anatomy_ratio=o.anatomy_ratio)
    options.update(o.sampler_options)
    return options


def objective_options(cfg: PretrainConfig) -> dict[str, Any]:
    """The keyword options of `sonocl.train.objectives.make_objective` for ``cfg.method``."""
    o = cfg.options
    options: dict[str, Any] = {"temperature": o.temperature}
    if cfg.method == "uscl":
        options.update(semi_weight=o.semi_weight)
    elif cfg.method == "awcl":
        options.update(base_temperature=o.base_temperature)
    elif cfg.method == "meta-uscl":
        options.update(meta_every=o.meta_every, cmw_lr=o.cmw_lr, cmw_hidden=o.cmw_hidden, inner_lr=o.inner_lr)
    elif cfg.method == "moco":
        options.update(queue_size=o.queue_size)
        if cfg.schedule.ema_start is not None:
            options.update(moco_momentum=cfg.schedule.ema_start)
    elif cfg.method == "byol" and cfg.schedule.ema_start is not None:
        options.update(byol_momentum=cfg.schedule.ema_start)
    options.update(o.objective_options)
    return options


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


# ----------------------------------------------------------------------------------------- logging

class MetricsLog:
    """``metrics.csv`` (rank 0): one row per step and one per epoch; resumed runs drop rows past the checkpoint."""

    def __init__(self, path: Path, resume_step: int | None, resume_epoch: int | None) -> None:
        self.path = path
        self.fields: list[str] | None = None
        self.rows: list[dict[str, str]] = []
        if resume_step is not None and path.exists():
            with open(path, newline="", encoding="utf-8") as handle:
                reader = csv.DictReader(handle)
                self.fields = list(reader.fieldnames or []) or None
                for row in reader:
                    keep = int(row["step"]) <= resume_step if row["kind"] == "step" else int(row["epoch"]) <= (resume_epoch or 0)
                    if keep:
                        self.rows.append(row)
            self._rewrite()
        elif path.exists():
            path.unlink()
        self._handle = None

    def _rewrite(self) -> None:
        if self.fields is None:
            return
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.fields)
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(tmp, self.path)

    def write(self, row: dict[str, Any]) -> None:
        if self.fields is None:
            parts = [k for k in row if k.startswith("part_")]
            self.fields = ["kind", "epoch", "step", *STEP_COLUMNS, *parts, "images_per_s", *EPOCH_COLUMNS, "seconds"]
            self._rewrite()
            if not self.path.exists():
                with open(self.path, "w", newline="", encoding="utf-8") as handle:
                    csv.DictWriter(handle, fieldnames=self.fields).writeheader()
        if self._handle is None:
            self._handle = open(self.path, "a", newline="", encoding="utf-8")
        formatted = {k: (f"{v:.9g}" if isinstance(v, float) else v) for k, v in row.items() if k in self.fields}
        csv.DictWriter(self._handle, fieldnames=self.fields).writerow(formatted)
        self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


class _NullWriter:
    def add_scalar(self, *args: Any, **kwargs: Any) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def _tensorboard(path: Path, purge_step: int | None) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency; a broken install should not stop training
        print("sonocl pretrain: tensorboard is not importable; logging to metrics.csv only", file=sys.stderr)
        return _NullWriter()
    return SummaryWriter(str(path), purge_step=purge_step)


# --------------------------------------------------------------------------------------------- model

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


def _make_optimizer(cfg: PretrainConfig, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay)
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=o.betas, weight_decay=o.weight_decay)
    return torch.optim.Adam(params, lr=lr, betas=o.betas, weight_decay=o.weight_decay)


def _export_encoder(cfg: PretrainConfig, checkpoint_path: Path, out: Path) -> None:
    from sonocl.models import ENCODER_FILE, build_backbone, checkpoint_backbone_state, save_encoder

    state = checkpoint_backbone_state(load_checkpoint(checkpoint_path))
    backbone = build_backbone(cfg.model.backbone, cfg.model.channels, state)
    save_encoder(backbone, out / ENCODER_FILE, encoder_metadata(cfg))


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


# ---------------------------------------------------------------------------------------------- loop

def pretrain(cfg: PretrainConfig, out: str | os.PathLike[str], resume: bool = False) -> PretrainResult:
    """Pretrain ``cfg.method`` on ``cfg.store``, writing everything under ``out`` (see the module docstring)."""
    cfg.validate()
    context, device = ddp.init_distributed(cfg.device)
    try:
        with _reproducibility(cfg):
            return _pretrain(cfg, Path(out), resume, context, device)
    finally:
        ddp.shutdown(context)


def _pretrain(
    cfg: PretrainConfig, out: Path, resume: bool, context: ddp.DistributedContext, device: torch.device
) -> PretrainResult:
    from sonocl.augment import AugmentConfig, BatchAugment, make_views
    from sonocl.data.splits import grouped_holdout
    from sonocl.data.store import FrameStore
    from sonocl.pairs import MetaSetSampler, make_sampler
    from sonocl.train.objectives import BatchTensors, StepContext, make_objective

    main = context.is_main
    checkpoints = out / "checkpoints"
    last_path, best_path = checkpoints / "last.pt", checkpoints / "best.pt"
    if resume and not last_path.exists():
        if main:  # killed before its first checkpoint: nothing to continue from, so start over
            print(f"sonocl pretrain: {last_path} does not exist yet; starting {out} from the beginning", file=sys.stderr)
        resume = False
    if not resume and last_path.exists():
        raise ConfigError(f"{out} already holds a run ({last_path}); pass --resume to continue it or choose a new --out")
    if cfg.batch_size % context.world_size:
        raise ConfigError(f"batch_size {cfg.batch_size} does not split over {context.world_size} processes")
    batch_size = cfg.batch_size // context.world_size
    precision = resolve_precision(cfg.precision, device)
    autocast_dtype = AUTOCAST_DTYPES.get(precision)
    channels_last = cfg.model.channels_last if cfg.model.channels_last is not None else device.type == "cuda"
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    # ---- data: grouped hold-out of videos, samplers ------------------------------------------------
    store = FrameStore.open(cfg.store)
    codes, class_names = store.label_codes(cfg.options.label_column)
    if cfg.val_fraction > 0:
        kept, held = grouped_holdout(codes, store.group_codes(), cfg.val_fraction, cfg.seed)
        kept, held = np.sort(np.asarray(kept, dtype=np.int64)), np.sort(np.asarray(held, dtype=np.int64))
    else:
        kept, held = np.arange(store.num_videos, dtype=np.int64), np.zeros(0, dtype=np.int64)
    options = sampler_options(cfg)
    sampler = make_sampler(cfg.method, store, kept, batch_size, cfg.seed, context.rank, context.world_size, **options)
    steps_per_epoch = len(sampler)
    total_steps = cfg.epochs * steps_per_epoch
    val_batches = _validation_batches(cfg, store, held, options) if main else []
    meta_sampler = None
    if cfg.method == "meta-uscl":
        if len(held) == 0:
            raise ConfigError("meta-uscl draws its meta set from the held-out videos; set --val-fraction > 0")
        meta_sampler = MetaSetSampler(store, held, max(1, cfg.options.meta_batch_size // context.world_size),
                                      cfg.seed + 2, context.rank, context.world_size, meta_frame=cfg.options.meta_frame)
    bank_frames, bank_labels = monitor_frames(store, kept, codes, cfg.knn_frames_per_video)
    query_frames, query_labels = monitor_frames(store, held, codes, cfg.knn_frames_per_video)
    collapse_frames, _ = monitor_frames(store, held if len(held) else kept, np.zeros_like(codes), cfg.knn_frames_per_video)
    bank_frames, bank_labels = bank_frames[:MONITOR_MAX_FRAMES], bank_labels[:MONITOR_MAX_FRAMES]
    query_frames, query_labels = query_frames[:MONITOR_MAX_FRAMES], query_labels[:MONITOR_MAX_FRAMES]
    collapse_frames = collapse_frames[:MONITOR_MAX_FRAMES]

    # ---- model, objective, optimiser, schedules ----------------------------------------------------
    num_classes = len(getattr(sampler, "class_names", class_names)) if cfg.model.classifier else 0
    model = build_model(cfg, num_classes)
    if cfg.model.sync_bn and context.enabled:
        if device.type != "cuda":
            raise ConfigError("--sync-bn needs CUDA (torch's SyncBatchNorm has no CPU kernel); use model.freeze_bn on CPU")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device, memory_format=memory_format)
    if cfg.model.compile:
        model.backbone.compile()
    objective = make_objective(cfg.method, model, **objective_options(cfg)).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    base_lr = cfg.optim.lr * (cfg.batch_size / 256 if cfg.optim.lr_scaling == "linear" else 1.0)
    optimizer = _make_optimizer(cfg, params, base_lr)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    lrs = lr_schedule(base_lr, cfg.epochs, steps_per_epoch, cfg.schedule)
    momenta = (momentum_schedule(cfg.schedule.ema_start, cfg.schedule.ema_end, total_steps)
               if cfg.schedule.ema_start is not None else None)
    augment = BatchAugment(AugmentConfig(size=cfg.size, channels=cfg.model.channels, **vars(cfg.augment)))
    generator = torch.Generator(device=device)
    gather = ddp.make_gather(context)

    # ---- resume ------------------------------------------------------------------------------------
    start_epoch, start_step, best_val = 0, 0, None
    if resume:
        state = load_checkpoint(last_path)
        _check_resumable(cfg, state, context)
        model.load_state_dict(state["model"])
        objective.load_state_dict(state["objective"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, start_step, best_val = state["epoch"], state["step_in_epoch"], state["best_val_loss"]
        if context.world_size == 1:
            set_rng_state(state["rng"], {"augment": generator})
    global_step = start_epoch * steps_per_epoch + start_step

    def checkpoint(epoch: int, step_in_epoch: int, metrics: dict[str, float]) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "config": cfg.to_dict(),
            "model": model.state_dict(),
            "objective": objective.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "global_step": epoch * steps_per_epoch + step_in_epoch,
            "steps_per_epoch": steps_per_epoch,
            "world_size": context.world_size,
            "schedule": {"lr": lrs.tolist(), "momentum": momenta.tolist() if momenta is not None else []},
            "best_val_loss": best_val,
            "metrics": metrics,
            "rng": rng_state({"augment": generator}),
            "encoder_metadata": encoder_metadata(cfg),
        }

    # ---- logging -----------------------------------------------------------------------------------
    started = time.perf_counter()
    log: MetricsLog | None = None
    writer: Any = _NullWriter()
    if main:
        out.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, out / "config.yaml")
        log = MetricsLog(out / "metrics.csv", global_step if resume else None, start_epoch if resume else None)
        writer = _tensorboard(out / "tb", global_step if resume else None)
        print(f"sonocl pretrain: {cfg.method} on {store.num_videos} videos ({len(kept)} train, {len(held)} held out), "
              f"{steps_per_epoch} steps/epoch × {cfg.epochs} epochs, batch {cfg.batch_size}, {precision}, {device}"
              + (f", {context.world_size} processes" if context.enabled else ""), file=sys.stderr)

    def progress_bar(epoch: int, initial: int) -> Any:
        from tqdm import tqdm

        return tqdm(total=steps_per_epoch, initial=initial, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step",
                    disable=not (main and cfg.progress), dynamic_ncols=True, mininterval=1.0, file=sys.stderr)

    position = (start_epoch, start_step)
    epoch_metrics: dict[str, float] = {}
    _set_train_mode(model, cfg.model.freeze_bn)
    try:
        for epoch in range(start_epoch, cfg.epochs):
            first = start_step if epoch == start_epoch else 0
            batches = sampler.batches(epoch)[first:]
            loader = _loader(store, batches, cfg.workers, device, cfg.seed + epoch)
            bar = progress_bar(epoch, first)
            tick = time.perf_counter()
            for step_in_epoch, host_batch in enumerate(loader, start=first):
                global_step = epoch * steps_per_epoch + step_in_epoch
                lr = float(lrs[global_step])
                for group in optimizer.param_groups:
                    group["lr"] = lr
                momentum = float(momenta[global_step]) if momenta is not None else None
                seed_of_step = step_seed(cfg.seed, context.rank, global_step)
                generator.manual_seed(seed_of_step)
                torch.manual_seed(seed_of_step)

                batch = _to_device(host_batch, device)
                extra = batch["label"] >= 0 if cfg.augment.gamma > 0 else None
                with torch.no_grad():
                    view1, view2 = make_views(batch["frames"], batch["mix"], batches[0].augment_first, augment, generator, extra)
                view1 = view1.contiguous(memory_format=memory_format)
                view2 = view2.contiguous(memory_format=memory_format)
                targets = BatchTensors(batch["positive_group"], batch["weight"], batch["label"])
                meta_views = _meta_views(meta_sampler, store, augment, make_views, generator, device, memory_format,
                                         epoch, step_in_epoch) if meta_sampler is not None else None
                step_context = StepContext(step=global_step, optimizer=optimizer, lr=lr, meta_views=meta_views, gather=gather)

                optimizer.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                    loss, parts = objective(model, view1, view2, targets, step_context)
                names = list(parts)
                values_list = [float(loss.detach()), *(float(parts[n]) for n in names)]
                if context.enabled:
                    values_list = ddp.all_mean(values_list, context, device)
                if not all(math.isfinite(v) for v in values_list[:1]):
                    detail = ", ".join(f"{n}={v:.6g}" for n, v in zip(names, values_list[1:]))
                    raise NonFiniteLossError(
                        f"non-finite loss {values_list[0]} at step {global_step + 1} (epoch {epoch + 1}, step "
                        f"{step_in_epoch + 1} of {steps_per_epoch}, lr {lr:.3g}); loss parts: {detail or 'none'}. "
                        f"Try a lower --lr, --clip-grad, or --precision fp32; {last_path} holds the last good state"
                    )
                scaler.scale(loss).backward()
                ddp.average_gradients(params, context)
                if cfg.optim.clip_grad:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip_grad)
                scaler.step(optimizer)
                scaler.update()
                objective.after_step(model, momentum)
                position = (epoch, step_in_epoch + 1)

                now = time.perf_counter()
                images_per_s = 2 * cfg.batch_size / max(now - tick, 1e-9)
                tick = now
                if main:
                    row = {"kind": "step", "epoch": epoch + 1, "step": global_step + 1, "lr": lr,
                           "momentum": momentum if momentum is not None else "", "loss": values_list[0],
                           **{f"part_{n}": v for n, v in zip(names, values_list[1:])},
                           "images_per_s": images_per_s, "seconds": now - started}
                    log.write(row)
                    writer.add_scalar("train/loss", values_list[0], global_step + 1)
                    writer.add_scalar("train/lr", lr, global_step + 1)
                    writer.add_scalar("train/images_per_s", images_per_s, global_step + 1)
                    for n, v in zip(names, values_list[1:]):
                        writer.add_scalar(f"train/{n}", v, global_step + 1)
                    bar.set_postfix(loss=f"{values_list[0]:.4f}", lr=f"{lr:.3g}", img_s=f"{images_per_s:.0f}", refresh=False)
                bar.update(1)
                every = cfg.checkpoint_every_steps
                if main and every and (step_in_epoch + 1) % every == 0 and step_in_epoch + 1 < steps_per_epoch:
                    save_checkpoint(checkpoint(epoch, step_in_epoch + 1, epoch_metrics), last_path)
            bar.close()

            # ---- end of epoch: validation, monitors, checkpoints ------------------------------------
            if main:
                epoch_metrics = _evaluate(cfg, model, objective, store, val_batches, augment, make_views, device,
                                          memory_format, autocast_dtype, (bank_frames, bank_labels),
                                          (query_frames, query_labels), collapse_frames)
                val_loss = epoch_metrics.get("val_loss")
                # Without held-out pairs there is no model selection: best is the latest epoch.
                improved = val_loss is None or best_val is None or val_loss < best_val
                if val_loss is not None and improved:
                    best_val = val_loss
                position = (epoch + 1, 0)
                save_checkpoint(checkpoint(epoch + 1, 0, epoch_metrics), last_path)
                if improved:
                    link_checkpoint(last_path, best_path)
                log.write({"kind": "epoch", "epoch": epoch + 1, "step": (epoch + 1) * steps_per_epoch,
                           **epoch_metrics, "seconds": time.perf_counter() - started})
                for name, value in epoch_metrics.items():
                    writer.add_scalar(f"val/{name}", value, (epoch + 1) * steps_per_epoch)
                writer.flush()
                print(f"epoch {epoch + 1}/{cfg.epochs}: " + ", ".join(f"{k} {v:.4f}" for k, v in epoch_metrics.items()),
                      file=sys.stderr)
            ddp.barrier(context)
            _set_train_mode(model, cfg.model.freeze_bn)
    except KeyboardInterrupt:
        if main:
            save_checkpoint(checkpoint(*position, epoch_metrics), last_path)
            _export_encoder(cfg, best_path if best_path.exists() else last_path, out)
            print(f"\ninterrupted: {last_path} saved at epoch {position[0] + 1}, step {position[1]}; "
                  f"continue with --resume", file=sys.stderr)
        raise
    finally:
        if main:
            writer.close()
            if log is not None:
                log.close()

    if main:
        _export_encoder(cfg, best_path if best_path.exists() else last_path, out)
    ddp.barrier(context)
    return PretrainResult(out, cfg.epochs * steps_per_epoch, cfg.epochs, best_val, epoch_metrics)


def _check_resumable(cfg: PretrainConfig, state: dict[str, Any], context: ddp.DistributedContext) -> None:
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"checkpoint format {state.get('format')} is not {CHECKPOINT_FORMAT}; it was written by another sonocl")
    saved = state["config"]
    for key in ("method", "store", "batch_size", "size", "seed", "epochs"):
        if saved.get(key) != getattr(cfg, key):
            print(f"sonocl pretrain: resuming with {key} {getattr(cfg, key)!r} (the run used {saved.get(key)!r}); "
                  f"the result will differ from an uninterrupted run", file=sys.stderr)
    if state.get("world_size", 1) != context.world_size:
        print(f"sonocl pretrain: resuming on {context.world_size} processes (the run used {state.get('world_size')})",
              file=sys.stderr)


def _validation_batches(cfg: PretrainConfig, store: Any, held: np.ndarray, options: dict[str, Any]) -> list[Any]:
    """The held-out videos' pairs, drawn once with a fixed seed so that every epoch's validation loss is comparable."""
    from sonocl.pairs import make_sampler

    if len(held) == 0:
        return []
    try:
        probe = make_sampler(cfg.method, store, held, 1, _VALIDATION_SEED, **options)
    except ValueError as error:
        print(f"sonocl pretrain: no validation pairs from the held-out videos ({error})", file=sys.stderr)
        return []
    items = len(probe)
    if items < 2:
        return []
    sampler = make_sampler(cfg.method, store, held, min(cfg.batch_size, items), _VALIDATION_SEED, **options)
    return sampler.batches(0)


def _meta_views(
    meta_sampler: Any, store: Any, augment: nn.Module, make_views: Callable[..., Any], generator: torch.Generator,
    device: torch.device, memory_format: torch.memory_format, epoch: int, step: int,
) -> Callable[[], tuple[Tensor, Tensor]]:
    """The meta batch of this step, built only when the objective asks for it (every ``meta_every`` steps)."""

    def views() -> tuple[Tensor, Tensor]:
        batch = meta_sampler.batch(epoch, step)
        frames = torch.from_numpy(store.gather(batch.frames)).to(device, non_blocking=True)
        with torch.no_grad():
            view1, view2 = make_views(frames, batch.mix, batch.augment_first, augment, generator)
        return view1.contiguous(memory_format=memory_format), view2.contiguous(memory_format=memory_format)

    return views


@torch.no_grad()
def _evaluate(
    cfg: PretrainConfig, model: nn.Module, objective: nn.Module, store: Any, val_batches: list[Any], augment: nn.Module,
    make_views: Callable[..., Any], device: torch.device, memory_format: torch.memory_format,
    autocast_dtype: torch.dtype | None, bank: tuple[np.ndarray, np.ndarray], query: tuple[np.ndarray, np.ndarray],
    collapse_frames: np.ndarray,
) -> dict[str, float]:
    """Validation loss (unweighted InfoNCE, eval mode, fixed seed), kNN accuracy and the collapse metric."""
    from sonocl.train.objectives import BatchTensors

    model.eval()
    metrics: dict[str, float] = {}
    autocast = dict(dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None)
    if val_batches:
        generator = torch.Generator(device=device).manual_seed(cfg.seed + _VALIDATION_SEED)
        total, count = 0.0, 0
        for batch in val_batches:
            frames = torch.from_numpy(store.gather(batch.frames)).to(device)
            view1, view2 = make_views(frames, batch.mix, batch.augment_first, augment, generator)
            targets = BatchTensors(
                positive_group=torch.from_numpy(batch.positive_group).to(device),
                weight=torch.ones(len(batch), device=device),
                label=torch.from_numpy(batch.label).to(device),
            )
            with torch.autocast(device.type, **autocast):
                loss = objective.validation_loss(model, view1.contiguous(memory_format=memory_format),
                                                 view2.contiguous(memory_format=memory_format), targets)
            total += float(loss) * len(batch)
            count += len(batch)
        metrics["val_loss"] = total / count
    features = dict(size=cfg.size, mean=cfg.augment.mean, std=cfg.augment.std, channels=cfg.model.channels,
                    device=device, memory_format=memory_format, autocast_dtype=autocast_dtype)
    if len(collapse_frames) >= 2:
        h = backbone_features(model.backbone, store, collapse_frames, **features)
        z = model.projector(h.to(device)).float()
        metrics["embedding_std"] = embedding_std(z)
    bank_frames, bank_labels = bank
    query_frames, query_labels = query
    if len(bank_frames) and len(query_frames):
        bank_h = backbone_features(model.backbone, store, bank_frames, **features)
        query_h = backbone_features(model.backbone, store, query_frames, **features)
        metrics["knn_acc"] = knn_accuracy(bank_h, torch.from_numpy(bank_labels), query_h, torch.from_numpy(query_labels),
                                          k=cfg.knn_k)
    return metrics
