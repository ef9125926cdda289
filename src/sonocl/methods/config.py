"""The pretraining configuration: typed records that check their own values when built.

A method's preset (``sonocl/methods/<name>.py``) is one `PretrainConfig`; ``sonocl.train.config`` builds one from
the preset, YAML and the command line. Each section checks itself when built: a bad value (``augment.flip_p=2``) is
a `ConfigError` naming its key. ``options`` is the method's own options dataclass (`Options` and its subclasses);
that it belongs to the method named is checked where the method is resolved (`sonocl.train.config.resolve`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, TypeVar

import yaml

from sonocl.augment import AugmentConfig
from sonocl.backbones import name_problem
from sonocl.errors import ConfigError
from sonocl.options import MIN_IMAGE_SIDE, number_rule
from sonocl.pairs import ITEM_KINDS


def option(default: Any, help: str) -> Any:
    """A method option: its one default and the help text of its ``sonocl pretrain`` flag."""
    return field(default=default, metadata={"help": help})


@dataclass
class Options:
    """Options every method has. Subclasses add the method's own, each with `option` and a check in `check`."""

    temperature: float = option(0.5, "softmax temperature τ of the InfoNCE loss (and of the validation loss)")
    items: str | None = option(None, "what one sampler item is: videos or frames (default: the method's own)")

    def __post_init__(self) -> None:
        problems = self.check()
        if problems:
            raise ConfigError("; ".join(problems))

    def check(self) -> list[str]:
        """The problems of these values, each naming its key (empty when they can run)."""
        problems = []
        if self.temperature <= 0:
            problems.append(f"temperature must be > 0, not {self.temperature}")
        if self.items is not None and self.items not in ITEM_KINDS:
            problems.append(f"items must be one of {', '.join(ITEM_KINDS)}, not {self.items!r}")
        return problems


def fraction_problem(name: str, value: float) -> list[str]:
    """``[message]`` when ``value`` is outside [0, 1], else ``[]``."""
    return [] if 0.0 <= value <= 1.0 else [f"{name} must lie in [0, 1], not {value}"]


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
TRACKERS = ("wandb", "mlflow")
"""The experiment trackers a run can log to besides ``metrics.csv`` and TensorBoard (`sonocl.train.trackers`)."""
WANDB_MODES = ("offline", "online")
OPTIMIZERS = ("adam", "adamw", "sgd", "lars")
LR_SCALINGS = ("none", "linear", "sqrt")
IMAGENET_GREY_MEAN, IMAGENET_GREY_STD = 0.449, 0.226
"""ImageNet statistics averaged over the colour channels (AWCL normalises grey-as-RGB with ImageNet's)."""


@dataclass
class ModelConfig:
    backbone: str = "resnet18"
    """A torchvision ResNet or ``timm:<model>`` (`sonocl.backbones`)."""
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
                *([problem] if (problem := name_problem(self.backbone)) else []),
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
    """``adam``, ``adamw`` (no decay on biases and normalisation weights, as DINO and MAE), ``sgd`` or ``lars``
    (`sonocl.train.lars`: for large batches; no decay or trust ratio on biases and normalisation weights)."""
    lr: float = 3e-4
    lr_scaling: str = "none"
    """``none``: ``lr`` is the learning rate; ``linear``: it is ``lr × global batch / 256`` (SimCLR, MoCo, BYOL)."""
    weight_decay: float = 1e-4
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: float | None = None
    """Clip the global gradient norm to this value (None: no clipping)."""
    trust_coefficient: float = 0.001
    """LARS's η: the update of a weight is scaled to η·‖w‖/‖g + wd·w‖ of the weight (``lars`` only)."""

    def __post_init__(self) -> None:
        _raise_problems(
            [
                *_choice("name", self.name, OPTIMIZERS),
                *_choice("lr_scaling", self.lr_scaling, LR_SCALINGS),
                *_number("lr", self.lr, "--lr", above=0),
                *_number("weight_decay", self.weight_decay, at_least=0),
                *_number("momentum", self.momentum, at_least=0, below=1),
                *_number("trust_coefficient", self.trust_coefficient, above=0),
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
class TrackingConfig:
    """The settings of the ``trackers`` (`sonocl.train.trackers`). A setting left unset takes the tracker's own
    environment variable when it is set, else sonocl's default."""

    wandb_project: str | None = None
    """W&B project (None: ``WANDB_PROJECT``, else ``sonocl``)."""
    wandb_entity: str | None = None
    """W&B entity, a user or team (None: ``WANDB_ENTITY``, else the account's default)."""
    wandb_mode: str | None = None
    """``offline`` (files under the run directory, uploaded by ``wandb sync``) or ``online`` (None: ``WANDB_MODE``,
    else ``offline``: nothing leaves the machine unless asked)."""
    mlflow_tracking_uri: str | None = None
    """MLflow tracking URI (None: ``MLFLOW_TRACKING_URI``, else the file store ``RUN/mlruns``)."""
    mlflow_experiment: str | None = None
    """MLflow experiment name (None: ``MLFLOW_EXPERIMENT_NAME``, else ``sonocl``)."""

    def __post_init__(self) -> None:
        _raise_problems([] if self.wandb_mode is None else _choice("wandb_mode", self.wandb_mode, WANDB_MODES))


@dataclass
class PretrainConfig:
    method: str
    """The registered method (`sonocl.methods.registry`); no default: a configuration names its method."""
    store: tuple[str, ...] = ()
    """The frame stores pretrained on: one, or several read as one (`sonocl.data.union.StoreUnion`); a single path in
    a YAML file is a list of one."""
    store_weights: tuple[float, ...] = ()
    """Each store's share of an epoch's items, in the order of ``store`` (normalised; empty: equal shares)."""
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
    """Write ``last.pt`` at the end of an epoch once this long has passed since the last one, and after the last
    epoch."""
    monitor_every: int = 0
    """Run the validation loss, kNN and collapse monitors every N epochs and after the last (0: automatic, so that
    they cost about a twentieth of the training compute: N = ⌈monitor images / (0.15 · training images per epoch)⌉,
    `sonocl.train.data.MONITOR_SHARE`). A run that exports its best checkpoint computes the validation loss every
    epoch."""
    label_column: str = "label"
    """The store's class column: the kNN monitor's labels and USCL's semi-supervised classes."""
    knn_k: int = 20
    knn_frames_per_video: int = 8
    progress: bool = True
    trackers: tuple[str, ...] = ()
    """Experiment trackers the run logs to besides ``metrics.csv`` and TensorBoard: ``wandb``, ``mlflow`` (rank 0;
    each needs its package: ``pip install 'sonocl[trackers]'``)."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    options: Options = field(default_factory=Options)
    """The method's own options: an instance of the method's ``options`` class."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """The checks across sections (each section checks its own values when built)."""
        problems = [
            *_choice("precision", self.precision, PRECISIONS),
            *_choice("export", self.export, ("best", "last")),
            *[problem for name in self.trackers for problem in _choice("trackers", name, TRACKERS)],
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
        _raise_problems(problems)

    def to_dict(self) -> dict[str, Any]:
        return plain(dataclasses.asdict(self))

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
    if not dataclasses.is_dataclass(values) or isinstance(values, type):  # values: an instance, not a class
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


def plain(value: Any) -> Any:
    """``value`` with every tuple a list, nested: what YAML and JSON write."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping with dotted keys: ``{"optim": {"lr": 1e-3}}`` → ``{"optim.lr": 1e-3}`` (the keys of ``--set``)."""
    flattened: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flattened.update(flat(value, f"{prefix}{key}."))
        else:
            flattened[prefix + key] = value
    return flattened


def replace(cfg: PretrainConfig, **changes: Any) -> PretrainConfig:
    """``cfg`` with ``changes`` (validated, as every configuration is when built)."""
    return dataclasses.replace(cfg, **changes)


OptionsType = TypeVar("OptionsType", bound=Options)


def options_of(cfg: PretrainConfig, kind: type[OptionsType]) -> OptionsType:
    """``cfg.options`` as the method's own options class ``kind``, typed (`sonocl.train.config.resolve` checks the
    same once per run); a configuration of another method is a `ConfigError` naming both classes."""
    if not isinstance(cfg.options, kind):
        raise ConfigError(f"{cfg.method}: options are {type(cfg.options).__name__}, not {kind.__name__}")
    return cfg.options
