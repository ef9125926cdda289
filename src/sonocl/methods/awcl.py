"""Anatomy-aware contrastive learning, AWCL (Fu et al., ECCV-W 2022; ``docs/methods.md`` §3): frames of the same
anatomy are positives of each other across scans (SupCon); the share of labelled frames is the anatomy ratio.

Preset (reference code, §3.6): Adam 1e-3, wd 1e-6, no schedule, batch 32, 10 epochs, 227 px, a 3-channel stem
(grey copied to RGB) with ImageNet normalisation, RandomResizedCrop with the default scale, jitter 0.4 with p 0.8,
extra gamma/brightness U(0.75, 1.25) on labelled frames, projection → 128, SupCon τ 0.5 and τ_b 0.07.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
    fraction_problem,
    option,
    options_of,
)
from sonocl.methods.objectives import GroupContrastive, Objective
from sonocl.models import ContrastiveModel
from sonocl.pairs import LABEL_DRAW_KEY, PairSampler, simclr_mix

LEVELS = ("fine", "coarse")


@dataclass
class AWCLOptions(Options):
    base_temperature: float | None = option(0.07, "SupCon's τ_b (the reference's 0.07); none: τ_b = τ")
    anatomy_column: str = option("anatomy", "the store's label column with the fine anatomy of each video")
    anatomy_level: str = option("fine", "fine: anatomy_column; coarse: coarse_column")
    coarse_column: str = option("anatomy_coarse", "the store's label column with the coarse anatomy")
    anatomy_ratio: float = option(1.0, "share of frames that keep their anatomy label (AWCL's anatomy ratio)")

    def check(self) -> list[str]:
        problems = super().check() + fraction_problem("anatomy_ratio", self.anatomy_ratio)
        if self.anatomy_level not in LEVELS:
            problems.append(f"anatomy_level must be one of {', '.join(LEVELS)}, not {self.anatomy_level!r}")
        if self.base_temperature is not None and self.base_temperature <= 0:
            problems.append(f"base_temperature must be > 0, not {self.base_temperature}")
        return problems


class AWCLSampler(PairSampler):
    """Instance items (two augmentations of one frame) with anatomy positives (§3.2, §3.5).

    An item whose video carries an anatomy label, and which keeps it under the anatomy ratio r, has
    ``positive_group`` = its anatomy class id, so every view of that anatomy in the batch is a positive
    (SupCon); every other item gets a unique id above all class ids, so unlabelled items are never positives of
    each other (quirk 25: the mask is built per sample).

    ``anatomy_level="coarse"`` maps the fine values through ``coarse_map`` when given, else reads the
    ``coarse_column``. Whether a frame keeps its label is drawn once per frame from the seed (a fixed label
    budget for the run, like USCL's label rate); ``label`` carries the kept class for optional supervision.
    """

    k = 1
    default_items = "frames"

    def __init__(
        self,
        *args: Any,
        anatomy_column: str = "anatomy",
        anatomy_level: str = "fine",
        coarse_map: dict[str, str] | None = None,
        coarse_column: str = "anatomy_coarse",
        anatomy_ratio: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if anatomy_level not in LEVELS:
            raise ValueError(f"anatomy_level must be one of {LEVELS}, not {anatomy_level!r}")
        if not 0.0 <= anatomy_ratio <= 1.0:
            raise ValueError(f"anatomy_ratio must lie in [0, 1], not {anatomy_ratio}")
        values = self.store.label_column(anatomy_column)
        if anatomy_level == "coarse":
            if coarse_map is not None:
                unmapped = sorted({v for v in values if v and v not in coarse_map})
                if unmapped:
                    raise ValueError(f"coarse_map has no entry for anatomy values {unmapped}")
                values = [coarse_map[v] if v else None for v in values]
            else:
                values = self.store.label_column(coarse_column)
        self.class_names = sorted({v for v in values if v})
        if not self.class_names:
            raise ValueError(f"no video of the store has a value in the anatomy column {anatomy_column!r}")
        lookup = {name: code for code, name in enumerate(self.class_names)}
        self._video_class = np.array([lookup.get(v, -1) if v else -1 for v in values], dtype=np.int64)
        keep = np.random.default_rng([self.seed, LABEL_DRAW_KEY]).random(self.store.num_frames) < anatomy_ratio
        self._frame_keeps = keep
        kept_any = np.array(
            [keep[self.store.video_offsets[v] : self.store.video_offsets[v + 1]].any() for v in self.videos]
        )
        self.labelled_videos = self.videos[kept_any & (self._video_class[self.videos] >= 0)]
        self.label_columns = [coarse_column if anatomy_level == "coarse" and coarse_map is None else anatomy_column]
        if not len(self.labelled_videos):
            self.label_columns = []

    def _draw(self, rng, video, frame, position):
        frames = frame if frame is not None else self._random_frame(rng, video)
        label = np.where(self._frame_keeps[frames], self._video_class[video], -1)
        group = np.where(label >= 0, label, len(self.class_names) + position)
        return self._batch(frames[:, None], simclr_mix(len(video)), video, group, label=label)


def preset() -> PretrainConfig:
    return PretrainConfig(
        method="awcl",
        export="last",
        size=227,
        epochs=10,
        model=ModelConfig(channels=3, projection_hidden=512, projection_dim=128),
        augment=AugmentConfig(
            crop_scale=(0.08, 1.0),
            crop_ratio=(0.75, 4 / 3),
            brightness=0.4,
            contrast=0.4,
            jitter_p=0.8,
            gamma=0.25,
            mean=IMAGENET_GREY_MEAN,
            std=IMAGENET_GREY_STD,
        ),
        optim=OptimConfig(name="adam", lr=1e-3, weight_decay=1e-6),
        schedule=ScheduleConfig(decay="none"),
        options=AWCLOptions(),
    )


def sampler(
    cfg: PretrainConfig, store: VideoTable, videos: np.ndarray, batch_size: int, rank: int, world_size: int
) -> PairSampler:
    o = options_of(cfg, AWCLOptions)
    return AWCLSampler(
        store,
        videos,
        batch_size,
        cfg.seed,
        rank,
        world_size,
        items=o.items,
        anatomy_column=o.anatomy_column,
        anatomy_level=o.anatomy_level,
        coarse_column=o.coarse_column,
        anatomy_ratio=o.anatomy_ratio,
    )


def objective(cfg: PretrainConfig, model: ContrastiveModel, sampler: PairSampler) -> Objective:
    options = options_of(cfg, AWCLOptions)
    return GroupContrastive(options.temperature, options.base_temperature)


METHOD = Method(
    name="awcl",
    summary="frames of the same anatomy (fine or coarse labels) are positives across scans",
    paper="Fu et al., Anatomy-Aware Contrastive Representation Learning for Fetal Ultrasound, ECCV Workshops 2022",
    options=AWCLOptions,
    preset=preset,
    sampler=sampler,
    objective=objective,
    uses_labels=lambda cfg: options_of(cfg, AWCLOptions).anatomy_ratio > 0,
)
