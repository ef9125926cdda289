"""Typed pretraining configuration, the per-method presets, YAML in and out.

A run's configuration is resolved in this order, later wins: the method's preset (the original paper or
reference code defaults, ``docs/methods.md``) → ``--config YAML`` → the command-line overrides → ``--set
key=value``. The resolved configuration is written to ``RUN/config.yaml`` and into every checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sonocl.errors import UserError

METHODS = ("simclr", "uscl", "meta-uscl", "awcl", "ivpp", "moco", "byol")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
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


@dataclass
class AugmentSection:
    """`sonocl.augment.AugmentConfig` without ``size`` and ``channels`` (top-level / model settings)."""

    crop_scale: tuple[float, float] = (0.8, 1.0)
    crop_ratio: tuple[float, float] = (0.8, 1.25)
    flip_p: float = 0.5
    brightness: float = 0.8
    contrast: float = 0.8
    jitter_p: float = 1.0
    gamma: float = 0.0
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    speckle_p: float = 0.0
    speckle_std: float = 0.1
    mean: float = 0.5
    std: float = 0.25


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


@dataclass
class ScheduleConfig:
    """Per-step learning-rate schedule: a warm-up, then a decay, evaluated at fractional epochs."""

    warmup_epochs: float = 0.0
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


@dataclass
class MethodConfig:
    """Options of the pair sampler and the objective; each is passed to the part that uses it."""

    temperature: float = 0.5
    base_temperature: float | None = None
    """SupCon's τ_b (AWCL reference 0.07); None: τ_b = τ."""
    semi_weight: float = 0.0
    """USCL's λ on the semi-supervised cross-entropy."""
    label_rate: float = 1.0
    label_column: str = "label"
    max_dist: int = 999
    delta_t: float = 1.0
    """IVPP: the most seconds between the two frames of a pair."""
    anatomy_column: str = "anatomy"
    anatomy_level: str = "fine"
    anatomy_ratio: float = 1.0
    items: str | None = None
    """``videos`` or ``frames``: what one sampler item is (None: the method's default)."""
    meta_every: int = 1
    meta_batch_size: int = 32
    meta_frame: str = "random"
    cmw_lr: float = 6e-5
    cmw_hidden: int = 10
    inner_lr: float | None = None
    """Meta-USCL virtual-step LR; None: the main optimiser's current LR (what the reference effectively uses)."""
    queue_size: int = 65536
    objective_options: dict[str, Any] = field(default_factory=dict)
    """Further keyword options for `sonocl.train.objectives.make_objective`."""
    sampler_options: dict[str, Any] = field(default_factory=dict)
    """Further keyword options for `sonocl.pairs.make_sampler`."""


@dataclass
class PretrainConfig:
    method: str = "uscl"
    store: str = ""
    epochs: int = 300
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
    val_fraction: float = 0.2
    checkpoint_every_steps: int = 0
    """Also write ``last.pt`` every N steps (0: at the end of each epoch only)."""
    knn_k: int = 20
    knn_frames_per_video: int = 8
    progress: bool = True
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentSection = field(default_factory=AugmentSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    options: MethodConfig = field(default_factory=MethodConfig)

    def validate(self) -> None:
        problems = []
        if self.method not in METHODS:
            problems.append(f"method {self.method!r} is not one of {', '.join(METHODS)}")
        if self.precision not in PRECISIONS:
            problems.append(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.model.backbone not in BACKBONES:
            problems.append(f"backbone {self.model.backbone!r} is not one of {', '.join(BACKBONES)}")
        if self.model.channels not in (1, 3):
            problems.append(f"channels must be 1 or 3, not {self.model.channels}")
        if self.epochs < 1 or self.batch_size < 1 or self.size < 8:
            problems.append(f"need epochs ≥ 1, batch_size ≥ 1 and size ≥ 8 (got {self.epochs}, {self.batch_size}, {self.size})")
        if not 0.0 <= self.val_fraction < 1.0:
            problems.append(f"val_fraction must lie in [0, 1), not {self.val_fraction}")
        if self.optim.name not in ("adam", "adamw", "sgd"):
            problems.append(f"optim.name {self.optim.name!r} is not adam, adamw or sgd")
        if self.optim.lr_scaling not in ("none", "linear"):
            problems.append(f"optim.lr_scaling {self.optim.lr_scaling!r} is not none or linear")
        if self.schedule.warmup not in ("linear", "constant", "exponential"):
            problems.append(f"schedule.warmup {self.schedule.warmup!r} is not linear, constant or exponential")
        if self.schedule.decay not in ("cosine", "none"):
            problems.append(f"schedule.decay {self.schedule.decay!r} is not cosine or none")
        if self.schedule.cosine_span not in ("after_warmup", "total"):
            problems.append(f"schedule.cosine_span {self.schedule.cosine_span!r} is not after_warmup or total")
        if self.options.meta_every < 1:
            problems.append(f"meta_every must be ≥ 1, not {self.options.meta_every}")
        if self.checkpoint_every_steps < 0:
            problems.append("checkpoint_every_steps must be ≥ 0")
        if problems:
            raise ConfigError("invalid configuration: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


class ConfigError(UserError, ValueError):
    """A configuration that cannot run; the message names the key and the allowed values."""


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------- presets

def preset(method: str) -> PretrainConfig:
    """The original defaults of ``method`` (``docs/methods.md`` §1.7 USCL, §2.8 Meta-USCL, §3.6 AWCL, §4 IVPP).

    SimCLR, MoCo v2 and BYOL use their papers' recipes with SGD standing in for LARS (SimCLR, BYOL) and the
    linear LR scaling rule (lr × batch / 256).
    """
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    cfg = PretrainConfig(method=method)
    simclr_augment = AugmentSection(
        crop_scale=(0.08, 1.0), crop_ratio=(0.75, 4 / 3), brightness=0.8, contrast=0.8, jitter_p=0.8, blur_p=0.5,
        mean=IMAGENET_GREY_MEAN, std=IMAGENET_GREY_STD,
    )
    if method == "uscl":
        # USCL (MICCAI 2021): Adam 3e-4, wd 1e-4, batch 32, 300 epochs; 10 epochs at constant LR then
        # CosineAnnealingLR(T_max=300); τ 0.5; g 512→512→256; 12-way classifier on z with λ = 0.2, label rate 1.
        cfg.size = 224
        cfg.model = ModelConfig(projection_hidden=512, projection_dim=256, classifier=True)
        cfg.augment = AugmentSection(crop_scale=(0.8, 1.0), crop_ratio=(0.8, 1.25), brightness=0.8, contrast=0.8,
                                     jitter_p=1.0, mean=0.5, std=0.25)
        cfg.optim = OptimConfig(name="adam", lr=3e-4, weight_decay=1e-4)
        cfg.schedule = ScheduleConfig(warmup_epochs=10, warmup="constant", decay="cosine", cosine_span="total")
        cfg.options = MethodConfig(temperature=0.5, semi_weight=0.2, label_rate=1.0)
    elif method == "meta-uscl":
        # Meta-USCL (TMI 2023): SGD 0.1, momentum 0.9, wd 1e-4, batch 32, 300 epochs, exponential warm-up over
        # 10 epochs then cosine; g 512→512→128; crop (0.7, 1), jitter 0.64; norm 0.18/0.24; size 64; CMW-Net Adam 6e-5.
        cfg.size = 64
        cfg.model = ModelConfig(projection_hidden=512, projection_dim=128)
        cfg.augment = AugmentSection(crop_scale=(0.7, 1.0), crop_ratio=(0.8, 1.25), brightness=0.64, contrast=0.64,
                                     jitter_p=1.0, mean=0.18, std=0.24)
        cfg.optim = OptimConfig(name="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4)
        cfg.schedule = ScheduleConfig(warmup_epochs=10, warmup="exponential", decay="cosine", cosine_span="after_warmup")
        cfg.options = MethodConfig(temperature=0.5, max_dist=999, meta_every=1, meta_batch_size=32, cmw_lr=6e-5,
                                   cmw_hidden=10)
    elif method == "awcl":
        # AWCL (ECCV-W 2022): Adam 1e-3, wd 1e-6, no schedule, batch 32, 10 epochs; RRC 227 (default scale),
        # jitter 0.4 with p 0.8, ImageNet normalisation of grey-as-RGB; g → 128; SupCon τ 0.5, τ_b 0.07.
        cfg.size = 227
        cfg.epochs = 10
        cfg.model = ModelConfig(channels=3, projection_hidden=512, projection_dim=128)
        cfg.augment = AugmentSection(crop_scale=(0.08, 1.0), crop_ratio=(0.75, 4 / 3), brightness=0.4, contrast=0.4,
                                     jitter_p=0.8, gamma=0.25, mean=IMAGENET_GREY_MEAN, std=IMAGENET_GREY_STD)
        cfg.optim = OptimConfig(name="adam", lr=1e-3, weight_decay=1e-6)
        cfg.schedule = ScheduleConfig(warmup_epochs=0, decay="none")
        cfg.options = MethodConfig(temperature=0.5, base_temperature=0.07, anatomy_column="anatomy")
    elif method in ("simclr", "ivpp"):
        # SimCLR (Chen et al. 2020): LARS 0.3 × B/256 (SGD here), wd 1e-6, 10-epoch linear warm-up, cosine; τ 0.5;
        # g feature→feature→128. IVPP (VanBerlo et al. 2024) is SimCLR with intra-video pairs ≤ δt = 1 s apart.
        cfg.size = 224
        cfg.model = ModelConfig(projection_hidden=512, projection_dim=128)
        cfg.augment = copy.deepcopy(simclr_augment)
        cfg.optim = OptimConfig(name="sgd", lr=0.3, lr_scaling="linear", momentum=0.9, weight_decay=1e-6)
        cfg.schedule = ScheduleConfig(warmup_epochs=10, warmup="linear", decay="cosine")
        cfg.options = MethodConfig(temperature=0.5, delta_t=1.0)
    elif method == "moco":
        # MoCo v2 (Chen et al. 2020): SGD 0.03 × B/256, momentum 0.9, wd 1e-4, cosine, no warm-up; τ 0.2; queue
        # 65536; key-encoder momentum 0.999; MLP head feature→feature→128; blur added to the augmentation.
        cfg.size = 224
        cfg.model = ModelConfig(projection_hidden=512, projection_dim=128)
        cfg.augment = copy.deepcopy(simclr_augment)
        cfg.augment.crop_scale = (0.2, 1.0)
        cfg.augment.brightness = cfg.augment.contrast = 0.4
        cfg.optim = OptimConfig(name="sgd", lr=0.03, lr_scaling="linear", momentum=0.9, weight_decay=1e-4)
        cfg.schedule = ScheduleConfig(warmup_epochs=0, decay="cosine", ema_start=0.999)
        cfg.options = MethodConfig(temperature=0.2, queue_size=65536)
    elif method == "byol":
        # BYOL (Grill et al. 2020): LARS 0.2 × B/256 (SGD here), wd 1.5e-6, 10-epoch warm-up, cosine; target
        # momentum 0.996 → 1 (cosine); projector 4096 (BN) → 256, predictor 4096 → 256.
        cfg.size = 224
        cfg.model = ModelConfig(projection_hidden=4096, projection_dim=256, projection_batch_norm=True,
                                predictor_hidden=4096)
        cfg.augment = copy.deepcopy(simclr_augment)
        cfg.augment.brightness = cfg.augment.contrast = 0.4
        cfg.optim = OptimConfig(name="sgd", lr=0.2, lr_scaling="linear", momentum=0.9, weight_decay=1.5e-6)
        cfg.schedule = ScheduleConfig(warmup_epochs=10, warmup="linear", decay="cosine", ema_start=0.996, ema_end=1.0)
        cfg.options = MethodConfig()
    return cfg


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
    hints = _field_types(cls)
    unknown = sorted(set(data) - set(hints))
    if unknown:
        raise ConfigError(f"unknown configuration key(s) {', '.join(prefix + u for u in unknown)}; "
                          f"valid keys here: {', '.join(prefix + k for k in hints)}")
    return cls(**{k: _coerce(v, hints[k], prefix + k) for k, v in data.items()})


def merge(cfg: PretrainConfig, data: dict[str, Any]) -> PretrainConfig:
    """``cfg`` updated by the (nested, possibly partial) mapping ``data``; unknown keys are an error."""
    merged = _deep_update(cfg.to_dict(), data)
    return _from_dict(PretrainConfig, merged)


def _deep_update(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in ("objective_options", "sampler_options"):
            out[key] = _deep_update(out[key], value)
        else:
            out[key] = value
    return out


def from_dict(data: dict[str, Any]) -> PretrainConfig:
    """A full configuration from a mapping; missing keys take the preset of ``data['method']``."""
    method = data.get("method", "uscl")
    return merge(preset(method), data)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"{path}: cannot read the configuration ({error})") from error
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the configuration must be a mapping of keys to values")
    return data


def parse_assignment(text: str) -> dict[str, Any]:
    """``a.b=value`` → ``{"a": {"b": value}}``, the value parsed as YAML (``0.1``, ``true``, ``[0.5, 1]``, ``null``)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set optim.weight_decay=1e-5")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as error:
        raise ConfigError(f"--set {text!r}: cannot parse the value ({error})") from error
    out: dict[str, Any] = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def save_yaml(cfg: PretrainConfig, path: str | Path) -> None:
    from sonocl.data.store import atomic_write_text

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(path), cfg.to_yaml())
