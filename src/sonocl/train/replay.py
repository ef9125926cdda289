"""What a run drew, re-created from its configuration: the video split, the pair sampler, the batch of each global
step and the two views the step augmented from it.

The training loop and the report both call these, so "which videos were held out, which pairs were drawn at
step s, which views the encoder saw there" has one answer: the loop's loader hands it `batch_tensors` of
`StepBatches`' batch, and its step turns that into views (and local crops) with `step_views`; `replay_step` does the
same on the CPU.
Everything here is a pure function of the configuration and the store.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from sonocl.augment import BatchAugment, local_side, make_local_views, make_views
from sonocl.backbones import Backbone
from sonocl.data.splits import grouped_holdout
from sonocl.data.store import VideoTable
from sonocl.errors import ConfigError
from sonocl.methods import Method
from sonocl.methods.config import PretrainConfig
from sonocl.pairs import PairBatch, PairSampler
from sonocl.train.config import resolve


def split_videos(cfg: PretrainConfig, store: VideoTable) -> tuple[np.ndarray, np.ndarray]:
    """``(training, held_out)`` video indices in content order (`VideoTable.content_order`, so that two ingests of the
    same files pretrain alike): whole groups held out, ``val_fraction`` of the videos that ``cfg.exclude`` leaves, of
    each store on its own when the run reads several."""
    excluded = set(cfg.exclude)
    usable = store.content_order(v for v, video in enumerate(store.videos) if video.content_hash not in excluded)
    if excluded and len(usable) == store.num_videos:
        raise ConfigError(f"{store.root}: none of the {len(excluded)} excluded videos is in this store")
    if cfg.val_fraction <= 0:
        return usable, np.zeros(0, dtype=np.int64)
    codes, _ = store.label_codes(cfg.label_column)
    kept, held = [], []
    for source in np.unique(store.video_source[usable]):  # each store holds out its share: training sees every store
        videos = usable[store.video_source[usable] == source]
        groups = store.group_codes_of(videos)
        train, val = grouped_holdout(codes[videos], groups, cfg.val_fraction, cfg.seed + int(source))
        kept.append(videos[np.sort(np.asarray(train, dtype=np.int64))])
        held.append(videos[np.sort(np.asarray(val, dtype=np.int64))])
    return np.concatenate(kept), np.concatenate(held)


def training_sampler(
    method: Method,
    cfg: PretrainConfig,
    store: VideoTable,
    videos: np.ndarray,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
) -> PairSampler:
    """The method's pair sampler of ``videos`` (per-rank ``batch_size``), as the run builds it."""
    return method.sampler(cfg, store, videos, batch_size, rank, world_size)


def build_augment(cfg: PretrainConfig) -> BatchAugment:
    """The run's augmentation: its two views at ``size`` and, with ``augment.local_crops``, its local crops at
    `local_crop_side`."""
    local = local_crop_side(cfg) if cfg.augment.local_crops else None
    return BatchAugment(cfg.augment, cfg.size, cfg.model.channels, local_size=local)


def local_crop_side(cfg: PretrainConfig) -> int:
    """The side of the run's local crops: ``augment.local_size``, else 96/224 of ``size`` (DINO's 96 px beside 224)
    raised to the smallest side the backbone takes (a ViT's multiple of its patch, a ConvNeXt's 32 px), which a
    forward of the backbone on the meta device finds (no memory, no compute). A ``local_size`` the backbone does not
    take is a `ConfigError`."""
    wanted = local_side(cfg.size, cfg.augment)
    channels = cfg.model.channels
    with torch.device("meta"):
        backbone = Backbone.named(cfg.model.backbone).build(channels, cfg.size).eval()

    def takes(side: int) -> bool:
        try:
            with torch.no_grad():
                backbone(torch.empty(2, channels, side, side, device="meta"))
        except (RuntimeError, AssertionError, ValueError):  # a patch that does not divide it, a kernel too large
            return False
        return True

    if cfg.augment.local_size is not None:
        if not takes(wanted):
            raise ConfigError(
                f"augment.local_size {wanted}: {cfg.model.backbone} does not take {wanted} px images; choose another "
                "side, or leave it unset for the smallest one it takes above 96/224 of --size"
            )
        return wanted
    side = next((side for side in range(wanted, cfg.size + 1) if takes(side)), None)
    if side is None:
        raise ConfigError(
            f"{cfg.model.backbone} takes no side from {wanted} to {cfg.size} px for the local crops; set "
            "augment.local_size to one it takes"
        )
    return side


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of the augmentation draw at a global step (the loop re-seeds with it before every step)."""
    return (seed * 1_000_003 + rank * 7_919 + step * 104_729 + 12_345) % (2**63 - 1)


class StepBatches:
    """The sampler's batch of each global step: step s is batch ``s mod n`` of epoch ``s // n`` (n batches per
    epoch). An epoch's batches are drawn once (the sampler is a pure function of the epoch) and kept while its steps
    are asked for, so the loop's loader workers draw each epoch once."""

    def __init__(self, sampler: PairSampler) -> None:
        self.sampler = sampler
        self._epoch: tuple[int, list[PairBatch]] | None = None

    def __call__(self, step: int) -> PairBatch:
        epoch, index = divmod(step, len(self.sampler))
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, self.sampler.batches(epoch))
        return self._epoch[1][index]


def batch_tensors(store: VideoTable, batch: PairBatch) -> dict[str, Tensor]:
    """A batch as the loader hands it to the step: its frames gathered from the store (uint8), its arrays as tensors."""
    return {
        "frames": torch.from_numpy(store.gather(batch.frames)),
        "mix": torch.from_numpy(np.ascontiguousarray(batch.mix)),
        "video": torch.from_numpy(batch.video),
        "positive_group": torch.from_numpy(batch.positive_group),
        "weight": torch.from_numpy(batch.weight),
        "label": torch.from_numpy(batch.label),
    }


def step_views(
    cfg: PretrainConfig,
    augment: BatchAugment,
    generator: torch.Generator,
    batch: dict[str, Tensor],
    augment_first: bool,
    step: int,
    rank: int = 0,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The two views and the local crops (None without, `make_local_views`) of global ``step``'s batch
    (`batch_tensors`, on the generator's device): ``generator`` re-seeded with `step_seed`, then `make_views`, with
    the extra gamma (``augment.gamma`` > 0, AWCL) on the batch's labelled items, then the local crops."""
    generator.manual_seed(step_seed(cfg.seed, rank, step))
    extra = batch["label"] >= 0 if cfg.augment.gamma > 0 else None
    with torch.no_grad():
        view1, view2 = make_views(batch["frames"], batch["mix"], augment_first, augment, generator, extra)
        return view1, view2, make_local_views(batch["frames"], batch["mix"], augment, generator)


@dataclass
class ReplayedStep:
    """What one global step of a run drew: the video split, the step's batch and the two views made of it."""

    step: int
    kept: np.ndarray
    """Training videos (sorted indices)."""
    held: np.ndarray
    """Held-out videos."""
    batch: PairBatch
    view1: Tensor
    """``(B, C, size, size)`` normalised, as the encoder got them (drawn on the CPU)."""
    view2: Tensor


class RunReplay:
    """A run's split, sampler and augmentation re-built from its configuration and store, for rank ``rank`` of
    ``world_size`` (per-rank batch ``batch_size // world_size``, as the loop's); `step` replays any global step.

    The views are drawn on the CPU: a run trained on a GPU drew its augmentation from the GPU's generator, so there
    the replayed batch is the same and the views are another draw from the same distribution.
    """

    def __init__(self, cfg: PretrainConfig, store: VideoTable, rank: int = 0, world_size: int = 1) -> None:
        self.cfg, self.store, self.rank = cfg, store, rank
        self.kept, self.held = split_videos(cfg, store)
        method = resolve(cfg)
        self.sampler = training_sampler(method, cfg, store, self.kept, cfg.batch_size // world_size, rank, world_size)
        self.batch_of = StepBatches(self.sampler)
        self.augment = build_augment(cfg)
        self.generator = torch.Generator()

    @property
    def steps_per_epoch(self) -> int:
        return len(self.sampler)

    def step(self, step: int) -> ReplayedStep:
        batch = self.batch_of(step)
        tensors = batch_tensors(self.store, batch)
        augment_first = type(self.sampler).augment_first
        view1, view2, _ = step_views(self.cfg, self.augment, self.generator, tensors, augment_first, step, self.rank)
        return ReplayedStep(step, self.kept, self.held, batch, view1, view2)


def replay_step(cfg: PretrainConfig, store: VideoTable, step: int, rank: int = 0, world_size: int = 1) -> ReplayedStep:
    """The held-out and training videos, the batch drawn at global ``step`` (0-based) and its two views, as the
    loop made them (see `RunReplay`)."""
    return RunReplay(cfg, store, rank, world_size).step(step)
