"""USCL (Chen et al., MICCAI 2021; ``docs/methods.md`` §1): mixed frames of one video as positives, other videos as
negatives, and a semi-supervised cross-entropy on labelled videos.

Preset (reference code, §1.7): Adam 3e-4, wd 1e-4, batch 32, 300 epochs, 10 epochs at a constant LR then
CosineAnnealingLR(T_max = 300) (quirk 11), τ 0.5, projection 512 → 512 → 256, a classifier on z, λ = 0.2, label
rate 1, crop (0.8–1, 0.8–1.25), jitter 0.8 always, normalisation 0.5 / 0.25, 224 px.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from sonocl.data.store import VideoTable
from sonocl.methods.base import Method
from sonocl.methods.config import (
    AugmentConfig,
    ModelConfig,
    OptimConfig,
    Options,
    PretrainConfig,
    ScheduleConfig,
    fraction_problem,
    option,
    options_of,
)
from sonocl.methods.objectives import GroupContrastive, Objective
from sonocl.models import ContrastiveModel
from sonocl.pairs import LABEL_DRAW_KEY, PairSampler, distinct


@dataclass
class USCLOptions(Options):
    semi_weight: float = option(0.2, "λ of the semi-supervised cross-entropy (USCL code default; 0 = self-supervised)")
    label_rate: float = option(1.0, "share of the labelled training videos whose labels the semi-supervised term uses")

    def check(self) -> list[str]:
        problems = super().check() + fraction_problem("label_rate", self.label_rate)
        if self.semi_weight < 0:
            problems.append(f"semi_weight must be ≥ 0, not {self.semi_weight}")
        return problems


class USCLSampler(PairSampler):
    """USCL sample-pair generation (§1.3).

    Three distinct frames f1, f2, f3 of one video, drawn uniformly with no order and no distance limit; one
    λ ~ Beta(0.5, 0.5) per item; views ``λ·f1 + (1−λ)·f2`` and ``λ·f3 + (1−λ)·f2`` of the *augmented* frames
    (``augment_first``; f2 is augmented once and shared). Videos of 2 frames give the two frames unmixed, of 1
    frame two augmentations of it. ``positive_group`` = video index, so no frame of an item's own video is
    ever its negative (with ``items="frames"`` a video may appear several times in a batch).

    Semi-supervised labels: ``ceil(#labelled videos × label_rate)`` of the videos that carry a value in
    ``label_column`` are drawn once from the seed (fixed for the run, unlike the reference's unseeded draw,
    quirk 12); their items carry the class code, all others -1. ``class_names`` lists the classes.
    """

    k = 3
    augment_first = True

    def __init__(
        self, *args: Any, label_rate: float = 1.0, label_column: str = "label", mixed: bool = True, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.mixed = mixed
        """False: the views are the augmented f1 and f2 unmixed (the reference's validation pairs, §1.7)."""
        if not 0.0 <= label_rate <= 1.0:
            raise ValueError(f"label_rate must lie in [0, 1], not {label_rate}")
        codes, self.class_names = self.store.label_codes(label_column)
        candidates = self.videos[codes[self.videos] >= 0]
        count = math.ceil(len(candidates) * label_rate)
        chosen = np.random.default_rng([self.seed, LABEL_DRAW_KEY]).choice(candidates, size=count, replace=False)
        self.labelled_videos = np.sort(chosen)  # fixed for the run
        self.label_columns = [label_column] if count else []
        self._video_label = np.full(self.store.num_videos, -1, dtype=np.int64)
        self._video_label[self.labelled_videos] = codes[self.labelled_videos]

    def _draw(self, rng, video, frame, position):
        n = len(video)
        length = self._length[video]
        lam = rng.beta(0.5, 0.5, size=n)
        local = distinct(rng, length, 3)
        if not self.mixed:
            lam[:] = 1.0
            local = local[:, [0, 2, 1]]  # views f1 and f2: λ = 1 picks the first and the last frame of each view
        mix = np.zeros((n, 2, 3))
        mix[:, 0, 0], mix[:, 0, 1] = lam, 1 - lam
        mix[:, 1, 2], mix[:, 1, 1] = lam, 1 - lam
        short = length < 3
        local[short] = [0, 1, 1]
        local[length == 1] = 0
        mix[short] = [[1, 0, 0], [0, 1, 0]]
        frames = self.store.video_offsets[video][:, None] + local
        return self._batch(frames, mix, video, video, label=self._video_label[video])


def preset() -> PretrainConfig:
    return PretrainConfig(
        method="uscl",
        size=224,
        model=ModelConfig(projection_hidden=512, projection_dim=256, classifier=True),
        augment=AugmentConfig(
            crop_scale=(0.8, 1.0),
            crop_ratio=(0.8, 1.25),
            brightness=0.8,
            contrast=0.8,
            jitter_p=1.0,
            mean=0.5,
            std=0.25,
        ),
        optim=OptimConfig(name="adam", lr=3e-4, weight_decay=1e-4),
        schedule=ScheduleConfig(warmup_fraction=10 / 300, warmup="constant", decay="cosine", cosine_span="total"),
        options=USCLOptions(),
    )


def _label_rate(cfg: PretrainConfig) -> float:
    """The label rate in effect: none is read when the semi-supervised term is off."""
    options = options_of(cfg, USCLOptions)
    return options.label_rate if options.semi_weight > 0 and cfg.model.classifier else 0.0


def sampler(
    cfg: PretrainConfig, store: VideoTable, videos: np.ndarray, batch_size: int, rank: int, world_size: int
) -> PairSampler:
    return USCLSampler(
        store,
        videos,
        batch_size,
        cfg.seed,
        rank,
        world_size,
        items=cfg.options.items,
        label_rate=_label_rate(cfg),
        label_column=cfg.label_column,
    )


def validation_sampler(
    cfg: PretrainConfig, store: VideoTable, videos: np.ndarray, batch_size: int, rank: int, world_size: int
) -> PairSampler:
    """Held-out pairs as the reference validates and selects (§1.7): two augmented frames of a video, unmixed."""
    return USCLSampler(
        store,
        videos,
        batch_size,
        cfg.seed,
        rank,
        world_size,
        items=cfg.options.items,
        label_rate=0.0,
        mixed=False,
    )


def objective(cfg: PretrainConfig, model: ContrastiveModel, sampler: PairSampler) -> Objective:
    options = options_of(cfg, USCLOptions)
    return GroupContrastive(options.temperature, semi_weight=options.semi_weight)


METHOD = Method(
    name="uscl",
    summary="three frames of one video mixed into a positive pair, + semi-supervised CE on labelled videos",
    paper="Chen et al., USCL: Pretraining Deep Ultrasound Image Diagnosis Model through Video Contrastive "
    "Representation Learning, MICCAI 2021",
    options=USCLOptions,
    preset=preset,
    sampler=sampler,
    objective=objective,
    validation_sampler=validation_sampler,
    uses_labels=lambda cfg: _label_rate(cfg) > 0,
)
