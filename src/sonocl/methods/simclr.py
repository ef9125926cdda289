"""SimCLR (Chen, Kornblith, Norouzi, Hinton; ICML 2020): two augmentations of one frame, every other view a negative.

Preset: the paper's recipe with Adam 1e-3 standing in for LARS (no LARS at the batch sizes this tool runs at:
at batch 32 on the phantom, Adam 1e-3 led SGD with the paper's linear and square-root scaling on both seeds,
``docs/methods.md`` §5, ``benchmarks/baseline_lr_sweep.py``), τ 0.5, projection feature → 512 → 128, 10-epoch
linear warm-up then cosine, the paper's strong crop (0.08–1), jitter with p 0.8 and blur with p 0.5 (saturation
and hue have no effect on grey frames).
"""

from __future__ import annotations

import numpy as np

from sonocl.data.store import VideoTable
from sonocl.methods.base import Method
from sonocl.methods.config import (
    IMAGENET_GREY_MEAN,
    IMAGENET_GREY_STD,
    AugmentConfig,
    ModelConfig,
    OptimConfig,
    Options,
    PretrainConfig,
    ScheduleConfig,
)
from sonocl.methods.objectives import GroupContrastive, Objective
from sonocl.models import ContrastiveModel
from sonocl.pairs import InstanceSampler, PairSampler

SIMCLR_AUGMENT = AugmentConfig(
    crop_scale=(0.08, 1.0),
    crop_ratio=(0.75, 4 / 3),
    brightness=0.8,
    contrast=0.8,
    jitter_p=0.8,
    blur_p=0.5,
    mean=IMAGENET_GREY_MEAN,
    std=IMAGENET_GREY_STD,
)
"""SimCLR's augmentation on grey frames; MoCo v2 and BYOL start from it."""


def preset() -> PretrainConfig:
    return PretrainConfig(
        method="simclr",
        export="last",
        size=224,
        model=ModelConfig(projection_hidden=512, projection_dim=128),
        augment=SIMCLR_AUGMENT,
        optim=OptimConfig(name="adam", lr=1e-3, lr_scaling="none", weight_decay=1e-6),
        schedule=ScheduleConfig(warmup_fraction=10 / 100, warmup="linear", decay="cosine"),
        options=Options(),
    )


def sampler(
    cfg: PretrainConfig, store: VideoTable, videos: np.ndarray, batch_size: int, rank: int, world_size: int
) -> PairSampler:
    return InstanceSampler(store, videos, batch_size, cfg.seed, rank, world_size, items=cfg.options.items)


def objective(cfg: PretrainConfig, model: ContrastiveModel, sampler: PairSampler) -> Objective:
    return GroupContrastive(cfg.options.temperature)


METHOD = Method(
    name="simclr",
    summary="two augmentations of one frame (instance discrimination)",
    paper="Chen et al., A Simple Framework for Contrastive Learning of Visual Representations, ICML 2020",
    options=Options,
    preset=preset,
    sampler=sampler,
    objective=objective,
)
