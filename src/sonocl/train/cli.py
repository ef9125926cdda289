"""``sonocl pretrain --store STORE --method M --out RUN [--config YAML] [overrides…] [--set key=value] [--resume]``.

Multi-GPU / multi-node: ``torchrun --nproc-per-node N -m sonocl pretrain …`` (``--batch-size`` is the global batch).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import typing
from pathlib import Path
from typing import Any

from sonocl.backbones import NAMES_HELP
from sonocl.methods import method_names, registry
from sonocl.methods.config import PRECISIONS, TRACKERS, WANDB_MODES, PretrainConfig
from sonocl.outputs import add_overwrite_argument
from sonocl.train.config import ConfigError, load_run_config, load_yaml, merge, parse_assignment, preset

# flag destination → configuration key (dotted), for the settings every method has; each method's own options
# (``sonocl/methods/``) become flags of their own in `_method_flags`.
OVERRIDES: dict[str, str] = {
    "store": "store",
    "store_weights": "store_weights",
    "epochs": "epochs",
    "steps": "steps",
    "batch_size": "batch_size",
    "size": "size",
    "lr": "optim.lr",
    "backbone": "model.backbone",
    "channels": "model.channels",
    "init": "model.init",
    "precision": "precision",
    "compile": "model.compile",
    "seed": "seed",
    "device": "device",
    "val_fraction": "val_fraction",
    "workers": "workers",
    "clip_grad": "optim.clip_grad",
    "deterministic": "deterministic",
    "threads": "threads",
    "checkpoint_every_steps": "checkpoint_every_steps",
    "sync_bn": "model.sync_bn",
    "progress": "progress",
    "trackers": "trackers",
    "wandb_project": "tracking.wandb_project",
    "wandb_entity": "tracking.wandb_entity",
    "wandb_mode": "tracking.wandb_mode",
    "mlflow_tracking_uri": "tracking.mlflow_tracking_uri",
    "mlflow_experiment": "tracking.mlflow_experiment",
}
_OPTION_PREFIX = "option_"


def _method_flags() -> dict[str, tuple[type, str, list[str]]]:
    """Option name → (type, help, methods that have it), over every registered method's options dataclass."""
    flags: dict[str, tuple[type, str, list[str]]] = {}
    for method in registry().values():
        hints = typing.get_type_hints(method.options)
        for option in dataclasses.fields(method.options):
            kind = next((a for a in typing.get_args(hints[option.name]) if a is not type(None)), hints[option.name])
            _, help_text, owners = flags.setdefault(option.name, (kind, option.metadata["help"], []))
            owners.append(method.name)
    return flags


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "Presets hold each method's original defaults (docs/methods.md); --config YAML, then the flags, then "
        "--set key=value override them (e.g. --set optim.weight_decay=1e-5 --set augment.blur_p=0.5). "
        "RUN/config.yaml holds the resolved configuration. Distributed: torchrun --nproc-per-node N -m sonocl pretrain …"
    )
    _data_arguments(parser.add_argument_group("data"))
    _run_arguments(parser.add_argument_group("run"))
    _override_arguments(parser.add_argument_group("overrides"))
    _tracker_arguments(
        parser.add_argument_group(
            "trackers (rank 0 logs to them besides metrics.csv and TensorBoard; pip install 'sonocl[trackers]'; "
            "a setting not given takes the tracker's environment variable, e.g. WANDB_MODE, MLFLOW_TRACKING_URI)"
        )
    )
    _method_option_arguments(
        parser.add_argument_group("method options (each applies to the methods named in its help)")
    )


def _data_arguments(data: argparse._ArgumentGroup) -> None:
    """The frame stores pretrained on, and their shares."""
    data.add_argument(
        "--store",
        action="append",
        help="frame store directory (sonocl ingest); give it again to pretrain on several stores at once, each giving "
        "an equal share of every epoch's pairs unless --store-weights says otherwise",
    )
    data.add_argument(
        "--store-weights",
        type=_weights,
        metavar="W,W,…",
        help="each --store's share of the pairs, in their order (e.g. 2,1; normalised)",
    )


def _run_arguments(run: argparse._ArgumentGroup) -> None:
    """The method, the run directory and the configuration over the method's preset."""
    run.add_argument(
        "--method",
        choices=method_names(),
        help="pretraining method (its preset is the base configuration): "
        + "; ".join(f"{m.name}: {m.summary}" for m in registry().values()),
    )
    run.add_argument("--out", required=True, type=Path, help="run directory for checkpoints, logs and the encoder")
    run.add_argument("--config", type=Path, help="YAML configuration (full or partial) applied over the preset")
    run.add_argument("--resume", action="store_true", help="continue the run in --out from checkpoints/last.pt")
    add_overwrite_argument(run)
    run.add_argument(
        "--set",
        dest="assignments",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set any configuration key, dotted (repeatable)",
    )
    run.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")


def _override_arguments(overrides: argparse._ArgumentGroup) -> None:
    """The settings every method has (`OVERRIDES`), each over the preset and --config."""
    overrides.add_argument(
        "--epochs", type=int, help="passes over the training videos (or frames); --steps replaces it"
    )
    overrides.add_argument(
        "--steps",
        type=int,
        help="budget in optimiser steps of --batch-size pairs each: equal steps and batch "
        "give methods equal budgets (pairs seen), whatever their epoch length",
    )
    overrides.add_argument("--batch-size", type=int, help="global batch (split over processes)")
    overrides.add_argument("--size", type=int, help="image side the store's frames are resized to on the device")
    overrides.add_argument("--lr", type=float, help="learning rate (× batch/256 for presets with linear scaling)")
    overrides.add_argument("--backbone", help=NAMES_HELP)
    overrides.add_argument("--channels", type=int, choices=(1, 3))
    overrides.add_argument("--init", help="random | imagenet | PATH (a sonocl run, checkpoint or encoder file)")
    overrides.add_argument("--precision", choices=PRECISIONS)
    overrides.add_argument("--compile", action="store_true", default=None, help="torch.compile the backbone")
    overrides.add_argument("--seed", type=int)
    overrides.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    overrides.add_argument("--val-fraction", type=float, help="share of videos (by group) held out for validation")
    overrides.add_argument("--workers", type=int, help="DataLoader workers gathering frames from the store")
    overrides.add_argument("--clip-grad", type=float, help="clip the gradient norm to this value")
    overrides.add_argument(
        "--deterministic",
        action="store_true",
        default=None,
        help="deterministic algorithms and one CPU thread (bit-exact resume on CPU)",
    )
    overrides.add_argument("--threads", type=int, help="CPU threads for torch")
    overrides.add_argument("--checkpoint-every-steps", type=int, help="also write last.pt every N steps")
    overrides.add_argument(
        "--sync-bn", action="store_true", default=None, help="synchronise BatchNorm across processes (CUDA)"
    )
    overrides.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")


def _tracker_arguments(trackers: argparse._ArgumentGroup) -> None:
    """Which experiment trackers the run also logs to, and their settings."""
    trackers.add_argument(
        "--tracker",
        dest="trackers",
        action="append",
        choices=TRACKERS,
        help="also log to Weights & Biases or MLflow (repeatable); a resumed run continues the same tracker runs",
    )
    trackers.add_argument("--wandb-project", metavar="NAME", help="W&B project (default: sonocl)")
    trackers.add_argument("--wandb-entity", metavar="NAME", help="W&B entity: a user or team (default: the account's)")
    trackers.add_argument(
        "--wandb-mode",
        choices=WANDB_MODES,
        help="offline (default): files under RUN/wandb, uploaded later by `wandb sync`; online: live",
    )
    trackers.add_argument(
        "--mlflow-tracking-uri", metavar="URI", help="MLflow tracking URI (default: the file store RUN/mlruns)"
    )
    trackers.add_argument("--mlflow-experiment", metavar="NAME", help="MLflow experiment name (default: sonocl)")


def _method_option_arguments(options: argparse._ArgumentGroup) -> None:
    """A flag for every option of the registered methods (`_method_flags`), stored under ``option_<name>``."""
    for name, (kind, help_text, owners) in _method_flags().items():
        options.add_argument(
            "--" + name.replace("_", "-"),
            dest=_OPTION_PREFIX + name,
            type=kind,
            help=f"{', '.join(owners)}: {help_text}".replace("%", "%%"),  # argparse formats help with %
        )


def resolve_config(args: argparse.Namespace) -> PretrainConfig:
    """Preset (or the run's saved config with --resume) → --config → flags → --set."""
    saved = args.out / "config.yaml"
    if args.resume and saved.exists():
        cfg = load_run_config(saved)  # a damaged file is one line naming it
    else:
        method = args.method
        file_data = load_yaml(args.config) if args.config else {}
        method = method or file_data.get("method")
        if not method:
            raise ConfigError("--method is required (or a method key in --config)")
        cfg = merge(preset(method), file_data)
    if args.method and args.method != cfg.method:
        if args.resume:
            raise ConfigError(f"{args.out} is a {cfg.method} run; it cannot be resumed as {args.method}")
        cfg = merge(cfg, {"method": args.method})
    updates: dict[str, Any] = {}
    flags = {dest: key for dest, key in OVERRIDES.items()}
    flags.update(
        {dest: "options." + dest[len(_OPTION_PREFIX) :] for dest in vars(args) if dest.startswith(_OPTION_PREFIX)}
    )
    for dest, key in flags.items():
        value = getattr(args, dest, None)
        if value is not None:
            node = updates
            parts = key.split(".")
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = value
    try:
        cfg = merge(cfg, updates)
    except ConfigError as error:
        given = [
            f"--{dest[len(_OPTION_PREFIX) :].replace('_', '-')}"
            for dest in flags
            if dest.startswith(_OPTION_PREFIX) and getattr(args, dest) is not None
        ]
        raise ConfigError(f"{error} (flags given: {' '.join(given)})" if given else str(error)) from None
    for assignment in args.assignments:
        cfg = merge(cfg, parse_assignment(assignment))
    if not (args.resume and saved.exists()):  # a resumed run's saved configuration has its backbone already
        cfg = _with_init_backbone(cfg, args)
    if not cfg.store:
        raise ConfigError("--store is required")
    if cfg.store_weights and len(cfg.store_weights) != len(cfg.store):
        raise ConfigError(
            f"--store-weights: {len(cfg.store_weights)} weights for {len(cfg.store)} stores; give one each"
        )
    stores = [str(Path(store).resolve()) for store in cfg.store]  # the run's config.yaml stays usable from anywhere
    return merge(cfg, {"store": stores})


def _weights(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected numbers separated by commas, e.g. 2,1") from None


def _with_init_backbone(cfg: PretrainConfig, args: argparse.Namespace) -> PretrainConfig:
    """``cfg`` built as its ``--init`` encoder: a sonocl encoder is trained on as the backbone it records (as every
    command loads one, `sonocl.models.init_arch`); a ``--backbone`` (or ``--set model.backbone``) that contradicts it
    is one line naming the file. A note says so when the encoder's backbone replaces the configured one."""
    if cfg.model.init in ("random", "imagenet"):
        return cfg
    from sonocl.models import init_arch

    requested = args.backbone
    for assignment in args.assignments:
        model = parse_assignment(assignment).get("model")
        if isinstance(model, dict) and "backbone" in model:
            requested = model["backbone"]
    arch = init_arch(cfg.model.init, requested)
    if arch == cfg.model.backbone:
        return cfg
    print(
        f"sonocl pretrain: --init {cfg.model.init} is a {arch} encoder, so the run is a {arch} (not the configured "
        f"{cfg.model.backbone})",
        file=sys.stderr,
    )
    return merge(cfg, {"model": {"backbone": arch}})


def run(args: argparse.Namespace) -> int:
    from sonocl.train.loop import NonFiniteLossError, pretrain

    cfg = resolve_config(args)  # a ConfigError is printed by sonocl.cli as one line
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    started = time.perf_counter()
    try:
        result = pretrain(cfg, args.out, resume=args.resume, overwrite=args.overwrite)
    except NonFiniteLossError as error:
        print(f"sonocl pretrain: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    if os.environ.get("RANK", "0") == "0":
        best = f", best validation loss {result.best_val_loss:.4f}" if result.best_val_loss is not None else ""
        knn = result.last_epoch_metrics.get("knn_acc")
        monitor = f", kNN accuracy {100 * knn:.1f} %" if knn is not None else ""
        share = result.training_seconds / max(result.seconds, 1e-9)
        selected = cfg.export == "best" and result.best_val_loss is not None
        chosen = "best checkpoint: the lowest held-out loss of every epoch" if selected else "last checkpoint"
        print(
            f"sonocl pretrain: done in {time.perf_counter() - started:.0f} s ({result.global_step} steps of "
            f"{cfg.batch_size}{best}{monitor}; {100 * share:.0f} % of the run's {result.seconds:.0f} s in optimiser "
            f"steps); wrote {args.out / 'encoder.safetensors'} ({chosen}), "
            f"metrics.csv, provenance.json and checkpoints/ in {args.out}",
            file=sys.stderr,
        )
    return 0
