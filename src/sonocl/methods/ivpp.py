"""Intra-video positive pairs, IVPP (VanBerlo, Wong, Hoey, Arntfield; Frontiers in Imaging 2024; ``docs/methods.md`` §4):
two frames of one video at most δt seconds apart, weighted by their distance.

Preset: the reference code's ``ncus_simclr`` (github.com/bvanberl/IVPP, ``config.yml``): τ = 0.1, δt = 1.5 s,
distance weights, its ``ncus`` augmentation (crop area 0.4–1 at aspect ratio 0.4–0.6, brightness and contrast ±0.25,
Gaussian blur σ 0.1–2 with p 0.25) and its projector (768 → BatchNorm → ReLU → 768), with SimCLR's Adam 1e-3
standing in for its LARS (§5) and its warm-up share (2 of 500 epochs). ``--objective vicreg`` and
``--objective barlow_twins`` are the reference's ``ncus_vicreg`` and ``ncus_barlow_twins``, each with its own δt and
pair weights unless they are set.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor

from sonocl.data.store import VideoTable
from sonocl.errors import ConfigError
from sonocl.losses import BarlowTwinsLoss, VICRegLoss
from sonocl.methods.base import Method
from sonocl.methods.config import (
    IMAGENET_GREY_MEAN,
    IMAGENET_GREY_STD,
    AugmentConfig,
    Options,
    PretrainConfig,
    option,
    options_of,
    replace,
)
from sonocl.methods.objectives import BatchTensors, GroupContrastive, Objective, StepContext
from sonocl.methods.simclr import preset as simclr_preset
from sonocl.models import ContrastiveModel
from sonocl.pairs import PairSampler

OBJECTIVE_DEFAULTS: dict[str, tuple[float, str]] = {
    "simclr": (1.5, "distance"),
    "vicreg": (0.5, "distance"),
    "barlow_twins": (3.0, "uniform"),
}
"""Objective → (δt in seconds, pair weights) of the reference's ``config.yml`` (``pretrain.hparams.ncus_simclr``,
``ncus_vicreg``, ``ncus_barlow_twins``: ``max_time_delta`` and ``sample_weights``)."""
PAIR_WEIGHTS = ("distance", "uniform")


@dataclass
class IVPPOptions(Options):
    temperature: float = option(0.1, "softmax temperature τ of the InfoNCE loss (and of the validation loss)")
    objective: str = option(
        "simclr",
        "simclr (NT-Xent), vicreg or barlow_twins: the reference's ncus_simclr, ncus_vicreg, ncus_barlow_twins",
    )
    delta_t: float | None = option(
        None,
        "most seconds between the two frames of a pair (IVPP's δt); none: the objective's "
        "(the reference's 1.5 simclr, 0.5 vicreg, 3 barlow_twins)",
    )
    pair_weights: str | None = option(
        None,
        "distance: (Δmax − Δ + 1)/(Δmax + 1); uniform: 1; none: the objective's (the reference's "
        "distance for simclr and vicreg, uniform for barlow_twins)",
    )
    vicreg_lambda: float = option(25.0, "VICReg's invariance weight λ (the reference's)")
    vicreg_mu: float = option(25.0, "VICReg's variance weight μ (the reference's)")
    vicreg_nu: float = option(1.0, "VICReg's covariance weight ν (the reference's)")
    barlow_lambda: float = option(0.005, "Barlow Twins' redundancy-reduction weight λ (the reference's)")

    def check(self) -> list[str]:
        problems = super().check()
        if self.objective not in OBJECTIVE_DEFAULTS:
            problems.append(f"objective must be one of {', '.join(OBJECTIVE_DEFAULTS)}, not {self.objective!r}")
        if self.delta_t is not None and not self.delta_t > 0:
            problems.append(f"delta_t must be > 0 seconds, not {self.delta_t}")
        if self.pair_weights is not None and self.pair_weights not in PAIR_WEIGHTS:
            problems.append(f"pair_weights must be one of {', '.join(PAIR_WEIGHTS)}, not {self.pair_weights!r}")
        for name in ("vicreg_lambda", "vicreg_mu", "vicreg_nu", "barlow_lambda"):
            if not getattr(self, name) >= 0:
                problems.append(f"{name} must be ≥ 0, not {getattr(self, name)}")
        return problems

    def seconds(self) -> float:
        """δt: the one set, else the objective's."""
        return self.delta_t if self.delta_t is not None else OBJECTIVE_DEFAULTS[self.objective][0]

    def weights(self) -> str:
        """``distance`` or ``uniform``: the one set, else the objective's."""
        return self.pair_weights if self.pair_weights is not None else OBJECTIVE_DEFAULTS[self.objective][1]


class IVPPSampler(PairSampler):
    """Two distinct frames of one video at most ``delta_t`` seconds apart in the store's real timestamps, unmixed.

    Pair weight ``sw = (Δmax − Δ + 1) / (Δmax + 1)`` with ``Δmax = int(delta_t · fps)`` and Δ the distance in
    frames *of the source video*, from the timestamps: ``Δ = round(|t₂ − t₁| · fps)`` (clipped to
    ``[1/(Δmax+1), 1]``). So a store ingested with ``--fps``/``--stride`` weighs a pair as the full-rate video
    does for the same two moments (counting stored frames there would flatten the weights). The first frame is
    the item's frame (``items="frames"``) or uniform in its video; a frame with no neighbour within ``delta_t``
    is paired with itself (weight 1); ``pair_weights="uniform"`` gives every pair weight 1. fps is the source
    video's as ingest recorded it; a video of several frames whose rate is unknown (a frame folder, DICOM without
    Frame Time) is refused, naming it and ``--frame-rate``: its stored times count frames, not seconds, and δt
    would silently be a number of frames.
    """

    k = 2
    _TIME_SLACK = 1e-6  # timestamps are stored rounded to 1 µs

    def __init__(self, *args: Any, delta_t: float = 1.5, pair_weights: str = "distance", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if delta_t <= 0:
            raise ValueError(f"delta_t must be > 0, not {delta_t}")
        if pair_weights not in PAIR_WEIGHTS:
            raise ValueError(f"pair_weights must be one of {', '.join(PAIR_WEIGHTS)}, not {pair_weights!r}")
        self.delta_t = delta_t
        self.pair_weights = pair_weights
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
        if self.pair_weights == "uniform":
            weight = np.ones_like(weight)
        mix = np.broadcast_to(np.eye(2), (len(video), 2, 2))
        return self._batch(np.stack([first, second], axis=1), mix, video, video, weight=weight)


class RedundancyReduction(Objective):
    """IVPP's ``ncus_vicreg`` and ``ncus_barlow_twins``: `VICRegLoss` or `BarlowTwinsLoss` of the two views'
    projections, with the batch's pair weights (ones when ``pair_weights`` is uniform).

    Both losses read batch statistics, so under DDP each rank computes the loss of the gathered global batch: the
    gather sums every rank's gradient back to its owner and DDP averages, so the step is the one-process step of the
    global batch. The validation loss stays the base class's InfoNCE (``val_loss`` means one thing in every run).
    """

    def __init__(self, name: str, loss: VICRegLoss | BarlowTwinsLoss, temperature: float) -> None:
        super().__init__(temperature)
        self.name = name
        self.loss = loss

    def forward(
        self, model: ContrastiveModel, view1: Tensor, view2: Tensor, batch: BatchTensors, context: StepContext
    ) -> tuple[Tensor, dict[str, float]]:
        _, z1 = model(view1)
        _, z2 = model(view2)
        weight = batch.weight
        if context.gather is not None:
            z1, z2, weight = context.gather(z1), context.gather(z2), context.gather(weight.float())
        parts = self.loss.terms(z1, z2, weight)
        return self.loss.total(parts), {name: float(term.detach()) for name, term in parts.items()}


IVPP_AUGMENT = AugmentConfig(
    crop_scale=(0.4, 1.0),
    crop_ratio=(0.4, 0.6),
    flip_p=0.5,
    brightness=0.25,
    contrast=0.25,
    jitter_p=0.5,
    blur_p=0.25,
    blur_sigma=(0.1, 2.0),
    mean=IMAGENET_GREY_MEAN,
    std=IMAGENET_GREY_STD,
)
"""The reference's ``ncus`` pipeline (``config.yml`` ``augment.ncus``; ``src/data/augmentation/pipelines.py``
``get_ncus_augmentations``). sonocl draws brightness and contrast together with one ``jitter_p``, where the
reference draws each with its own p 0.5 (``docs/methods.md`` §4)."""


def preset() -> PretrainConfig:
    simclr = simclr_preset()
    return replace(
        simclr,
        method="ivpp",
        model=dataclasses.replace(simclr.model, projection_hidden=768, projection_dim=768, projection_batch_norm=True),
        augment=IVPP_AUGMENT,
        schedule=dataclasses.replace(simclr.schedule, warmup_fraction=2 / 500, min_lr=simclr.optim.lr * 1e-3),
        options=IVPPOptions(),
    )


def sampler(
    cfg: PretrainConfig, store: VideoTable, videos: np.ndarray, batch_size: int, rank: int, world_size: int
) -> PairSampler:
    options = options_of(cfg, IVPPOptions)
    return IVPPSampler(
        store,
        videos,
        batch_size,
        cfg.seed,
        rank,
        world_size,
        items=options.items,
        delta_t=options.seconds(),
        pair_weights=options.weights(),
    )


def objective(cfg: PretrainConfig, model: ContrastiveModel, sampler: PairSampler) -> Objective:
    options = options_of(cfg, IVPPOptions)
    if options.objective == "vicreg":
        loss = VICRegLoss(options.vicreg_lambda, options.vicreg_mu, options.vicreg_nu)
        return RedundancyReduction("vicreg", loss, options.temperature)
    if options.objective == "barlow_twins":
        return RedundancyReduction("barlow_twins", BarlowTwinsLoss(options.barlow_lambda), options.temperature)
    return GroupContrastive(options.temperature)


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
