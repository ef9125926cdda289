"""Typed pretraining configuration, the per-method presets, YAML in and out.

A run's configuration is resolved in this order, later wins: the method's preset (``sonocl/methods/``, the
original paper or reference code defaults, ``docs/methods.md``) → ``--config YAML`` → the command-line overrides
→ ``--set key=value``. The resolved configuration is written to ``RUN/config.yaml`` and into every checkpoint.

One type per concept, each checking itself when built: a bad value (``augment.flip_p=2``) is a `ConfigError`
naming its key when the configuration is loaded, before anything is built. ``options`` is the method's own
options dataclass (`sonocl.methods.base.Options` and its subclasses).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sonocl.augment import AugmentConfig
from sonocl.data.store import atomic_write_text
from sonocl.errors import ConfigError
from sonocl.methods import Options, get_method, method_names
from sonocl.options import MIN_IMAGE_SIDE, load_yaml_text, number_rule

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
OPTIMIZERS = ("adam", "adamw", "sgd")
LR_SCALINGS = ("none", "linear", "sqrt")
BACKBONES = ("resnet18", "resnet34", "resnet50")
IMAGENET_GREY_MEAN, IMAGENET_GREY_STD = 0.449, 0.226
"""ImageNet statistics averaged over the colour channels (AWCL normalises grey-as-RGB with ImageNet's)."""


@dataclass
class ModelConfig:
    backbone: str = "resnet18"
    channels: int = 1
    """1: a greyscale stem (a third of the stem's work); 3: grey copied to three channels."""
    init: str = "random"
    """``random``, ``imagenet`` or the path of a sonocl run, checkpoint or encoder file."""
    projection_hidden: int = 512
    projection_dim: int = 128
    projection_batch_norm: bool = False
    predictor_hidden: int = 0
    """BYOL's predictor MLP width (0: none)."""
    classifier: bool = False
    """USCL's semi-supervised classifier on z (one output per class of the store's label column)."""
    sync_bn: bool = False
    """Synchronise BatchNorm statistics across ranks (DDP on CUDA only: torch's SyncBatchNorm needs a GPU)."""
    freeze_bn: bool = False
    """Keep every BatchNorm in eval mode (running statistics, not updated) while training."""
    channels_last: bool | None = None
    """None: on CUDA only."""
    compile: bool = False
    """``torch.compile`` the backbone (in place, so checkpoint keys do not change)."""

    def __post_init__(self) -> None:
        _raise_problems(
            [
                *_choice("backbone", self.backbone, BACKBONES),
                *_choice("channels", self.channels, (1, 3)),
                *(
                    []
                    if self.projection_hidden >= 1 and self.projection_dim >= 1
                    else [
                        f"projection_hidden and projection_dim must be ≥ 1 (got {self.projection_hidden}, {self.projection_dim})"
                    ]
                ),
            ]
        )


@dataclass
class OptimConfig:
    name: str = "adam"
    """``adam``, ``adamw`` or ``sgd``."""
    lr: float = 3e-4
    lr_scaling: str = "none"
    """``none``: ``lr`` is the learning rate; ``linear``: it is ``lr × global batch / 256`` (SimCLR, MoCo, BYOL)."""
    weight_decay: float = 1e-4
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: float | None = None
    """Clip the global gradient norm to this value (None: no clipping)."""

    def __post_init__(self) -> None:
        _raise_problems(
            [
                *_choice("name", self.name, OPTIMIZERS),
                *_choice("lr_scaling", self.lr_scaling, LR_SCALINGS),
                *_number("lr", self.lr, "--lr", above=0),
                *_number("weight_decay", self.weight_decay, at_least=0),
                *_number("momentum", self.momentum, at_least=0, below=1),
                *[problem for beta in self.betas for problem in _number("betas", beta, at_least=0, below=1)][:1],
                *([] if self.clip_grad is None else _number("clip_grad", self.clip_grad, "--clip-grad", above=0)),
            ]
        )


@dataclass
class ScheduleConfig:
    """Per-step learning-rate schedule: a warm-up, then a decay, over the run's progress (`sonocl.train.schedules`)."""

    warmup_fraction: float = 0.0
    """Share of the run spent warming up: the paper's warm-up epochs over its epochs (USCL 10 / 300)."""
    warmup: str = "linear"
    """``linear`` (0 → lr), ``constant`` (USCL: lr, quirk 11) or ``exponential`` (Meta-USCL: 0.1 + 0.9·exp(−5(1−e/W)²))."""
    decay: str = "cosine"
    """``cosine`` or ``none``."""
    cosine_span: str = "after_warmup"
    """``after_warmup``: the cosine spans epochs − warm-up and ends at ``min_lr`` (Meta-USCL, SimCLR); ``total``: its
    period is all epochs, started after the warm-up, so it stops short of ``min_lr`` (USCL's CosineAnnealingLR(300)
    stepped from epoch 10)."""
    min_lr: float = 0.0
    ema_start: float | None = None
    """Target-network momentum at step 0 (MoCo, BYOL); None: no momentum schedule."""
    ema_end: float | None = None
    """Momentum at the last step (cosine from ``ema_start``); None: constant ``ema_start``."""

    def __post_init__(self) -> None:
        _raise_problems(
            [
                *_choice("warmup", self.warmup, ("linear", "constant", "exponential")),
                *_choice("decay", self.decay, ("cosine", "none")),
                *_choice("cosine_span", self.cosine_span, ("after_warmup", "total")),
                *(
                    []
                    if 0 <= self.warmup_fraction < 1
                    else [f"warmup_fraction must lie in [0, 1), not {self.warmup_fraction}"]
                ),
                *[
                    f"{name} must lie in [0, 1], not {value}"
                    for name, value in (("ema_start", self.ema_start), ("ema_end", self.ema_end))
                    if value is not None and not 0 <= value <= 1
                ],
                *_number("min_lr", self.min_lr, at_least=0),
            ]
        )


@dataclass
class PretrainConfig:
    method: str = "uscl"
    store: str = ""
    epochs: int = 300
    steps: int | None = None
    """The budget in optimiser steps of ``batch_size`` pairs each (pairs seen = steps × batch_size); it replaces
    ``epochs`` when set, so that methods whose epochs differ in length (videos or frames as items) get equal budgets."""
    batch_size: int = 32
    """Per-step batch over all ranks (each rank gets batch_size / world_size)."""
    size: int = 224
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    """``auto``: bf16 on a CUDA device that supports it, else fp32."""
    deterministic: bool = False
    threads: int | None = None
    """CPU threads for torch (None: torch's default; 1 with ``deterministic`` unless set)."""
    workers: int = 2
    exclude: list[str] = field(default_factory=list)
    """Content hashes of videos this run must never see, not even held out (a fold's test videos, ``sonocl study``)."""
    val_fraction: float = 0.2
    export: str = "best"
    """Which checkpoint ``encoder.safetensors`` holds: ``best`` (lowest validation InfoNCE, as USCL's and Meta-USCL's
    reference code select) or ``last`` (the methods whose papers take the final model: the InfoNCE of held-out pairs
    says nothing about BYOL, and AWCL's reference keeps every epoch without selecting)."""
    checkpoint_every_steps: int = 0
    """Also write ``last.pt`` every N steps (0: only at epoch ends, see ``checkpoint_every_seconds``)."""
    checkpoint_every_seconds: float = 60.0
    """Write ``last.pt`` at the end of an epoch once this long has passed since the last one (and after monitors)."""
    monitor_every: int = 0
    """Run the validation loss, kNN and collapse monitors every N epochs and after the last (0: automatic, so that
    they cost about a tenth of the training compute: N = ⌈3 · monitor images / training images per epoch⌉)."""
    label_column: str = "label"
    """The store's class column: the kNN monitor's labels and USCL's semi-supervised classes."""
    knn_k: int = 20
    knn_frames_per_video: int = 8
    progress: bool = True
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    options: Options = field(default_factory=Options)
    """The method's own options: an instance of ``get_method(method).options``."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """The checks across sections (each section checks its own values when built)."""
        problems = [
            *_choice("method", self.method, method_names()),
            *_choice("precision", self.precision, PRECISIONS),
            *_choice("export", self.export, ("best", "last")),
        ]
        if self.batch_size < 2:
            problems.append(
                f"batch_size (--batch-size) {self.batch_size}: must be ≥ 2: contrastive learning contrasts each pair "
                "with the batch's other pairs, so a batch needs at least 2"
            )
        problems += [
            *_number("epochs", self.epochs, "--epochs", at_least=1),
            *([] if self.steps is None else _number("steps", self.steps, "--steps", at_least=1)),
            *_number("size", self.size, "--size", at_least=MIN_IMAGE_SIDE),
            *_number("val_fraction", self.val_fraction, "--val-fraction", at_least=0, below=1),
            *_number("seed", self.seed, "--seed", at_least=0),
            *([] if self.threads is None else _number("threads", self.threads, "--threads", at_least=1)),
            *_number("workers", self.workers, "--workers", at_least=0),
            *_number("checkpoint_every_steps", self.checkpoint_every_steps, "--checkpoint-every-steps", at_least=0),
            *_number("checkpoint_every_seconds", self.checkpoint_every_seconds, at_least=0),
            *_number("monitor_every", self.monitor_every, at_least=0),
            *_number("knn_k", self.knn_k, at_least=1),
            *_number("knn_frames_per_video", self.knn_frames_per_video, at_least=1),
        ]
        # The sections checked in their own modules (the method's options, augmentation): no NaN or infinity either.
        problems += [*_non_finite("options", self.options, flags=True), *_non_finite("augment", self.augment)]
        if not problems and type(self.options) is not get_method(self.method).options:
            problems.append(
                f"options are {type(self.options).__name__}, not {self.method}'s "
                f"{get_method(self.method).options.__name__}"
            )
        _raise_problems(problems)

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _choice(name: str, value: Any, allowed: tuple[Any, ...]) -> list[str]:
    return [] if value in allowed else [f"{name} {value!r} is not one of {', '.join(map(str, allowed))}"]


def _number(key: str, value: Any, flag: str | None = None, **bounds: float) -> list[str]:
    """``["key (--flag) value: must be …"]`` when ``value`` is not finite or out of ``bounds`` (`number_rule`)."""
    problem = number_rule(value, **bounds)
    return [f"{key}{f' ({flag})' if flag else ''} {value!r}: {problem}"] if problem else []


def _non_finite(section: str, values: Any, flags: bool = False) -> list[str]:
    """``section.key (--key) nan: must be finite`` for each float of the dataclass ``values`` that is NaN or infinite."""
    if not dataclasses.is_dataclass(values):
        return []
    problems = []
    for name, value in dataclasses.asdict(values).items():
        numbers = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(number, float) and not math.isfinite(number) for number in numbers):
            flag = f" (--{name.replace('_', '-')})" if flags else ""
            problems.append(f"{section}.{name}{flag} {value!r}: must be finite")
    return problems


def _raise_problems(problems: list[str]) -> None:
    if problems:
        raise ConfigError("; ".join(problems))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------- presets


def preset(method: str) -> PretrainConfig:
    """The original defaults of ``method``: its module's preset (``sonocl/methods/<method>.py``)."""
    return get_method(method).preset()


def replace(cfg: PretrainConfig, **changes: Any) -> PretrainConfig:
    """``cfg`` with ``changes`` (validated, as every configuration is when built)."""
    return dataclasses.replace(cfg, **changes)


# --------------------------------------------------------------------------------------- dict / YAML


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """``value`` (from YAML or the command line) as the type ``hint`` of field ``key``."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _coerce(value, option, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0])
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _from_dict(hint, value, key + ".")
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """``cls(**data)`` with every value coerced to its field's type; errors name the dotted key."""
    hints = _field_types(cls)
    if cls is PretrainConfig and isinstance(data.get("options", {}), dict):
        method = data.get("method", PretrainConfig.method)
        if method in method_names():  # the options type is the method's; an unknown method is reported below
            hints["options"] = get_method(method).options
    unknown = sorted(set(data) - set(hints))
    if unknown:
        owners = _option_owners(unknown) if issubclass(cls, Options) else ""
        raise ConfigError(
            f"unknown configuration key(s) {', '.join(prefix + u for u in unknown)}{owners}; "
            f"valid keys here: {', '.join(prefix + k for k in hints)}"
        )
    values = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    try:
        return cls(**values)
    except ConfigError as error:
        raise ConfigError(f"{prefix[:-1]}: {error}" if prefix else str(error)) from None


def _option_owners(names: list[str]) -> str:
    """`` (max_dist is an option of meta-uscl)`` for option names that other methods have."""
    from sonocl.methods import registry

    owners = {name: [m.name for m in registry().values() if name in m.option_names()] for name in names}
    said = [f"{name} is an option of {', '.join(methods)}" for name, methods in owners.items() if methods]
    return f" ({'; '.join(said)})" if said else ""


def merge(cfg: PretrainConfig, data: dict[str, Any]) -> PretrainConfig:
    """``cfg`` updated by the (nested, possibly partial) mapping ``data``; unknown keys are an error.

    When ``data`` changes the method, the options start from the new method's defaults (another method's options
    do not carry over)."""
    base = cfg.to_dict()
    method = data.get("method", cfg.method)
    if method != cfg.method and method in method_names():
        base["options"] = _plain(dataclasses.asdict(get_method(method).options()))
    return _from_dict(PretrainConfig, _deep_update(base, data))


def _deep_update(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_update(out[key], value)
        else:
            out[key] = value
    return out


def from_dict(data: dict[str, Any]) -> PretrainConfig:
    """A full configuration from a mapping; missing keys take the preset of ``data['method']``."""
    if "method" not in data:
        raise ConfigError(f"no method key; set one of {', '.join(method_names())}")
    return merge(preset(data["method"]), data)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
        raise ConfigError(f"{path}: cannot read the configuration ({reason})") from error
    data = load_yaml_text(text, str(path)) or {}  # refuses aliases: a YAML bomb never expands
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the configuration must be a mapping of keys to values")
    return data


def load_run_config(path: str | Path) -> PretrainConfig:
    """A run's saved ``config.yaml`` (`save_yaml`) as its configuration: what ``--resume``, ``sonocl export`` and
    ``sonocl report`` read. A file that cannot be read, or is not a valid configuration, is one `ConfigError` line
    naming it, the key and the fix."""
    path = Path(path)
    data = load_yaml(path)  # its errors name the file
    try:
        method = data.get("method", "uscl")
        if not isinstance(method, str):
            raise ConfigError(f"method: expected a string, got {method!r}")
        return merge(preset(method), data)
    except ConfigError as error:
        raise ConfigError(
            f"{path}: {error}; this run's configuration is damaged: correct that key (each of its checkpoints "
            "keeps the configuration under 'config')"
        ) from None


def parse_assignment(text: str) -> dict[str, Any]:
    """``a.b=value`` → ``{"a": {"b": value}}``, the value parsed as YAML (``0.1``, ``true``, ``[0.5, 1]``, ``null``)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set optim.weight_decay=1e-5")
    key, raw = text.split("=", 1)
    value = load_yaml_text(raw, f"--set {key.strip()}") if raw.strip() else ""
    out: dict[str, Any] = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def save_yaml(cfg: PretrainConfig, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(path), cfg.to_yaml())
