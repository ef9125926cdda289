"""Intra-video positive pairs, IVPP (VanBerlo, Wong, Hoey, Arntfield; Frontiers in Imaging 2024; ``docs/methods.md`` §4):
two distinct frames of one video at most δt seconds apart, weighted by their distance.

Preset: SimCLR's optimisation (the paper builds IVPP on SimCLR) with δt = 1 s, the code default for SimCLR, and a
milder augmentation than SimCLR's: the two frames already differ, and the paper's pipeline keeps most of the field of
view (crop 0.8–1, jitter 0.4 with p 0.8, no blur; docs/methods.md says what was and was not retrieved of it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from sonocl.data.store import FrameStore
from sonocl.errors import ConfigError
from sonocl.methods.base import Method, Options, option
from sonocl.methods.simclr import preset as simclr_preset
from sonocl.pairs import PairSampler
from sonocl.train.config import IMAGENET_GREY_MEAN, IMAGENET_GREY_STD, AugmentConfig, PretrainConfig, replace
from sonocl.train.objectives import GroupContrastive, Objective


@dataclass
class IVPPOptions(Options):
    delta_t: float = option(1.0, "most seconds between the two frames of a pair (IVPP's δt)")

    def check(self) -> list[str]:
        problems = super().check()
        if self.delta_t <= 0:
            problems.append(f"delta_t must be > 0 seconds, not {self.delta_t}")
        return problems


class IVPPSampler(PairSampler):
    """Two distinct frames of one video at most ``delta_t`` seconds apart in the store's real timestamps, unmixed.

    Pair weight ``sw = (Δmax − Δ + 1) / (Δmax + 1)`` with ``Δmax = int(delta_t · fps)`` and Δ the distance in
    frames *of the source video*, from the timestamps: ``Δ = round(|t₂ − t₁| · fps)`` (clipped to
    ``[1/(Δmax+1), 1]``). So a store ingested with ``--fps``/``--stride`` weighs a pair as the full-rate video
    does for the same two moments (counting stored frames there would flatten the weights). The first frame is
    the item's frame (``items="frames"``) or uniform in its video; a frame with no neighbour within ``delta_t``
    is paired with itself (weight 1). fps is the source video's as ingest recorded it; a video of several frames
    whose rate is unknown (a frame folder, DICOM without Frame Time) is refused, naming it and ``--frame-rate``:
    its stored times count frames, not seconds, and δt would silently be a number of frames.
    """

    k = 2
    _TIME_SLACK = 1e-6  # timestamps are stored rounded to 1 µs

    def __init__(self, *args: Any, delta_t: float = 1.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if delta_t <= 0:
            raise ValueError(f"delta_t must be > 0, not {delta_t}")
        self.delta_t = delta_t
        time = self.store.frame_time
        records = [self.store.videos[int(v)] for v in self.videos]
        unknown = [record.id for record in records if not record.fps and record.num_frames > 1]
        if unknown:
            listed = ", ".join(unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
            raise ConfigError(
                f"{self.store.root}: ivpp pairs frames at most delta_t seconds apart, but {len(unknown)} videos record "
                f"no frame rate ({listed}); ingest them again with --frame-rate F (their frames per second)"
            )
        fps = np.ones(self.store.num_videos)  # a still's: it pairs with itself, whatever the rate
        for v, record in zip(self.videos, records):
            fps[v] = record.fps or 1.0
        self._fps = fps
        self._max_frames = np.floor(delta_t * fps + 1e-9).astype(np.int64)
        # One sorted key over the whole store: within a video its time, videos apart by more than any window.
        span = float(time.max() - time.min()) if len(time) else 0.0
        self._key = self.store.frame_video * (span + 2 * delta_t + 1.0) + time
        backwards = np.flatnonzero(np.diff(self._key) < 0)
        if len(backwards):
            bad = self.store.videos[int(self.store.frame_video[backwards[0]])]
            raise ValueError(f"video {bad.id}: timestamps are not in increasing order; IVPP needs real frame times")

    def _draw(self, rng, video, frame, position):
        first = frame if frame is not None else self._random_frame(rng, video)
        centre = self._key[first]
        low = np.searchsorted(self._key, centre - self.delta_t - self._TIME_SLACK, side="left")
        high = np.searchsorted(self._key, centre + self.delta_t + self._TIME_SLACK, side="right")
        others = high - low - 1
        second = low + np.floor(rng.random(len(video)) * np.maximum(others, 0)).astype(np.int64)
        second += second >= first
        second = np.where(others > 0, second, first)
        delta_max = self._max_frames[video]
        delta = np.rint(np.abs(self.store.frame_time[second] - self.store.frame_time[first]) * self._fps[video])
        weight = np.clip((delta_max - delta + 1) / (delta_max + 1), 1.0 / (delta_max + 1), 1.0)
        mix = np.broadcast_to(np.eye(2), (len(video), 2, 2))
        return self._batch(np.stack([first, second], axis=1), mix, video, video, weight=weight)


IVPP_AUGMENT = AugmentConfig(
    crop_scale=(0.8, 1.0),
    crop_ratio=(0.8, 1.25),
    brightness=0.4,
    contrast=0.4,
    jitter_p=0.8,
    mean=IMAGENET_GREY_MEAN,
    std=IMAGENET_GREY_STD,
)


def preset() -> PretrainConfig:
    return replace(simclr_preset(), method="ivpp", augment=IVPP_AUGMENT, options=IVPPOptions())


def sampler(
    cfg: PretrainConfig, store: FrameStore, videos: np.ndarray, batch_size: int, rank: int, world_size: int
) -> PairSampler:
    return IVPPSampler(
        store, videos, batch_size, cfg.seed, rank, world_size, items=cfg.options.items, delta_t=cfg.options.delta_t
    )


def objective(cfg: PretrainConfig, model: nn.Module, sampler: PairSampler) -> Objective:
    return GroupContrastive(cfg.options.temperature)


METHOD = Method(
    name="ivpp",
    summary="two frames of one video at most δt seconds apart, weighted by their distance",
    paper="VanBerlo et al., Intra-video positive pairs in self-supervised learning for ultrasound, "
    "Frontiers in Imaging 2024",
    options=IVPPOptions,
    preset=preset,
    sampler=sampler,
    objective=objective,
)
