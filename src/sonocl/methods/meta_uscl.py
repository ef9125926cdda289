"""Meta-USCL (Chen, Zhang, Ding, Liu; IEEE TMI 2023; ``docs/methods.md`` §2): ordered frame triplets interpolated into
positive pairs, each pair weighted by a CMW-Net learned by bilevel meta-learning on held-out videos.

Preset (reference code, §2.8): SGD 0.1, momentum 0.9, wd 1e-4, batch 32, 300 epochs, exponential warm-up over 10
epochs then cosine, projection 512 → 512 → 128, crop (0.7–1), jitter 0.64, normalisation 0.18 / 0.24, 64 px,
CMW-Net 1024 → 10 → 1 trained by Adam 6e-5, meta batch 32 every step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from sonocl.data.store import VideoTable
from sonocl.errors import ConfigError
from sonocl.methods import meta_step
from sonocl.methods.base import Method
from sonocl.methods.config import (
    AugmentConfig,
    ModelConfig,
    OptimConfig,
    Options,
    PretrainConfig,
    ScheduleConfig,
    option,
    options_of,
)
from sonocl.methods.objectives import BatchTensors, Objective, StepContext
from sonocl.models import CMWNet, ContrastiveModel
from sonocl.pairs import META_DRAW_KEY, PairBatch, PairSampler, distinct, simclr_mix

META_FRAMES = ("first", "random")


@dataclass
class MetaUSCLOptions(Options):
    max_dist: int = option(999, "most frames between the first and the last frame of a triplet")
    meta_every: int = option(1, "run the meta step every K training steps (1: every step, as the paper)")
    meta_batch_size: int = option(32, "held-out pairs per meta step (over all processes)")
    meta_frame: str = option("random", "frame of a held-out video in a meta pair: random, or first (the reference's)")
    cmw_lr: float = option(6e-5, "Adam learning rate of the CMW-Net")
    cmw_hidden: int = option(10, "hidden width of the CMW-Net")
    inner_lr: float | None = option(None, "virtual-step LR; none: the main optimiser's current LR (the reference's)")

    def check(self) -> list[str]:
        problems = super().check()
        for name in ("max_dist", "meta_every", "meta_batch_size", "cmw_hidden"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be ≥ 1, not {getattr(self, name)}")
        if self.meta_frame not in META_FRAMES:
            problems.append(f"meta_frame must be one of {', '.join(META_FRAMES)}, not {self.meta_frame!r}")
        if self.cmw_lr <= 0 or (self.inner_lr is not None and self.inner_lr <= 0):
            problems.append("cmw_lr and inner_lr must be > 0")
        return problems


class MetaUSCLSampler(PairSampler):
    """Meta-USCL positive-pair interpolation (§2.3).

    An ordered triplet F0, F1, F2 at offsets 0 < d1 < d2 ≤ min(L−1, max_dist) from a uniform start;
    α, β ~ Beta(3, 5) independently; views ``(1−α)·F0 + α·F1`` and ``β·F1 + (1−β)·F2`` mixed on the raw
    frames, then augmented independently. Fallbacks: a video (or max_dist) that allows only two frames gives
    two frames at most max_dist apart, unmixed; a one-frame video gives frame 0 twice.
    """

    k = 3

    def __init__(self, *args: Any, max_dist: int = 999, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if max_dist < 1:
            raise ValueError(f"max_dist must be ≥ 1 frame, not {max_dist}")
        self.max_dist = max_dist

    def _draw(self, rng, video, frame, position):
        n = len(video)
        length = self._length[video]
        reach = np.minimum(length - 1, self.max_dist)
        offsets = np.sort(distinct(rng, reach, 2), axis=1) + 1
        single = reach < 2
        offsets[single, 0] = np.floor(rng.random(int(single.sum())) * reach[single]).astype(np.int64) + 1
        offsets[single, 1] = offsets[single, 0]
        offsets[length == 1] = 0
        start = np.floor(rng.random(n) * (length - offsets[:, 1])).astype(np.int64)
        alpha, beta = rng.beta(3, 5, size=n), rng.beta(3, 5, size=n)
        mix = np.zeros((n, 2, 3))
        mix[:, 0, 0], mix[:, 0, 1] = 1 - alpha, alpha
        mix[:, 1, 1], mix[:, 1, 2] = beta, 1 - beta
        mix[single] = [[1, 0, 0], [0, 0, 1]]
        local = np.stack([start, start + offsets[:, 0], start + offsets[:, 1]], axis=1)
        frames = self.store.video_offsets[video][:, None] + local
        return self._batch(frames, mix, video, video)


class MetaSetSampler:
    """Meta-USCL's meta set: two augmentations of one frame of a held-out video per pair (§2.7).

    The reference draws a fresh random meta batch every step (quirk 17, made explicit here as ``batch(epoch,
    step)``) and always uses frame 0 of each video (quirk 18), which makes the meta signal weak: each meta
    video offers one image for the whole run. ``meta_frame="random"`` (default) draws the frame per pair;
    ``"first"`` reproduces the reference. When the global meta batch outgrows the held-out videos, videos are
    drawn with replacement; repeats share ``positive_group`` (the video index) and so are positives.
    """

    def __init__(
        self,
        store: VideoTable,
        videos: np.ndarray,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        meta_frame: str = "random",
    ) -> None:
        videos = np.asarray(videos, dtype=np.int64).reshape(-1)
        if len(videos) == 0:
            raise ValueError("the meta set needs at least one held-out video")
        if meta_frame not in META_FRAMES:
            raise ValueError(f"meta_frame must be one of {META_FRAMES}, not {meta_frame!r}")
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"invalid meta batch {batch_size} / rank {rank} / world_size {world_size}")
        self.store, self.videos, self.batch_size, self.seed = store, videos, batch_size, seed
        self.rank, self.world_size, self.meta_frame = rank, world_size, meta_frame

    def batch(self, epoch: int, step: int) -> PairBatch:
        """This rank's meta batch for training step ``step`` of ``epoch`` (deterministic, resumable)."""
        rng = np.random.default_rng([self.seed, META_DRAW_KEY, epoch, step])
        total = self.batch_size * self.world_size
        video = rng.choice(self.videos, size=total, replace=total > len(self.videos))
        frames = self.store.video_offsets[video]
        if self.meta_frame == "random":
            frames = frames + np.floor(rng.random(total) * np.diff(self.store.video_offsets)[video]).astype(np.int64)
        shard = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        return PairBatch(
            frames=frames[shard, None].astype(np.int64),
            mix=simclr_mix(self.batch_size),
            augment_first=False,
            video=video[shard].astype(np.int64),
            positive_group=video[shard].astype(np.int64),
            weight=np.ones(self.batch_size, dtype=np.float32),
            label=np.full(self.batch_size, -1, dtype=np.int64),
        )


class MetaUSCL(Objective):
    """Group-InfoNCE weighted per pair by a meta-learned CMW-Net (§2.5–2.7).

    Every ``meta_every`` steps a bilevel meta step (`sonocl.methods.meta_step`) updates the CMW-Net with Adam against
    the unweighted InfoNCE on a meta batch after a virtual SGD step; the returned loss is then the InfoNCE of
    the same forward (reused, one forward of the real batch per step) weighted by the *updated* CMW-Net under
    ``no_grad``. Between meta steps only the weighted loss runs. The CMW-Net input is the detached backbone
    features [h₁, h₂]. ``inner_lr`` None uses the main optimizer's current LR per group (what the reference
    effectively does, quirk 16). The CMW-Net's Adam state is in ``state_dict()`` (``_extra_state``).
    Under torchrun (``context.gather``) the meta step is the one-process step on the global training and meta
    batches and moves the CMW-Net the same on every rank; the CMW-Net is broadcast from rank 0 when built.
    """

    def __init__(
        self,
        model: ContrastiveModel,
        temperature: float,
        cmw_hidden: int,
        cmw_lr: float,
        inner_lr: float | None,
        meta_every: int,
    ) -> None:
        super().__init__(temperature)
        parameter = next(model.parameters())
        self.cmw = CMWNet(model.projector.in_dim, cmw_hidden).to(device=parameter.device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            with torch.no_grad():  # every rank must start from the same CMW-Net (its updates are then identical)
                for p in self.cmw.parameters():
                    dist.broadcast(p, src=0)
        self.cmw_optimizer = torch.optim.Adam(self.cmw.parameters(), lr=cmw_lr)
        self.inner_lr = inner_lr
        self.meta_every = meta_every

    def forward(
        self, model: ContrastiveModel, view1: Tensor, view2: Tensor, batch: BatchTensors, context: StepContext
    ) -> tuple[Tensor, dict[str, float]]:
        h1, z1 = model(view1)
        h2, z2 = model(view2)
        parts: dict[str, float] = {}
        if context.step % self.meta_every == 0:
            if context.meta_views is None:
                raise ValueError("meta-uscl needs StepContext.meta_views (held-out meta batches)")
            meta_view1, meta_view2, meta_group = context.meta_views()
            result = meta_step.cmw_meta_gradient(
                model,
                self.cmw,
                self.info_nce,
                view1,
                view2,
                h1,
                h2,
                z1,
                z2,
                batch.positive_group,
                batch.weight,
                meta_view1,
                meta_view2,
                context.optimizer,
                self.inner_lr,
                meta_positive_group=meta_group,
                gather=context.gather,
            )
            meta_step.apply_meta_gradient(self.cmw, self.cmw_optimizer, result)
            parts["meta"] = float(result.meta_loss)
        with torch.no_grad():
            weight = meta_step.pair_weight(self.cmw, h1, h2, batch.weight)
        loss = self._contrastive(z1, z2, batch, weight, context)
        every = weight if context.gather is None else context.gather(weight)  # the global batch's weights
        parts.update(
            contrastive=float(loss.detach()),
            weight_mean=float(every.mean()),
            weight_std=float(every.std(correction=0)),
        )
        return loss, parts

    def get_extra_state(self) -> dict[str, Any]:
        return {"cmw_optimizer": self.cmw_optimizer.state_dict()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.cmw_optimizer.load_state_dict(state["cmw_optimizer"])


def preset() -> PretrainConfig:
    return PretrainConfig(
        method="meta-uscl",
        size=64,
        model=ModelConfig(projection_hidden=512, projection_dim=128),
        augment=AugmentConfig(
            crop_scale=(0.7, 1.0),
            crop_ratio=(0.8, 1.25),
            brightness=0.64,
            contrast=0.64,
            jitter_p=1.0,
            mean=0.18,
            std=0.24,
        ),
        optim=OptimConfig(name="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4),
        schedule=ScheduleConfig(
            warmup_fraction=10 / 300, warmup="exponential", decay="cosine", cosine_span="after_warmup"
        ),
        options=MetaUSCLOptions(),
    )


def sampler(
    cfg: PretrainConfig, store: VideoTable, videos: np.ndarray, batch_size: int, rank: int, world_size: int
) -> PairSampler:
    options = options_of(cfg, MetaUSCLOptions)
    return MetaUSCLSampler(
        store, videos, batch_size, cfg.seed, rank, world_size, items=options.items, max_dist=options.max_dist
    )


def meta_sampler(
    cfg: PretrainConfig, store: VideoTable, held_out: np.ndarray, batch_size: int, rank: int, world_size: int
) -> MetaSetSampler:
    """The meta set: held-out videos (``val_fraction`` > 0), ``meta_batch_size`` pairs per step over all ranks."""
    if len(held_out) == 0:
        raise ConfigError("meta-uscl draws its meta set from the held-out videos; set --val-fraction > 0")
    options = options_of(cfg, MetaUSCLOptions)
    per_rank = max(1, options.meta_batch_size // world_size)
    return MetaSetSampler(store, held_out, per_rank, cfg.seed + 2, rank, world_size, meta_frame=options.meta_frame)


def objective(cfg: PretrainConfig, model: ContrastiveModel, sampler: PairSampler) -> Objective:
    o = options_of(cfg, MetaUSCLOptions)
    if not cfg.model.freeze_bn and any(isinstance(m, nn.SyncBatchNorm) for m in model.modules()):
        raise ConfigError(
            "meta-uscl does not support --sync-bn: its virtual passes have no synchronised forward-mode batch-norm "
            "(per-rank batch-norm, the default, or model.freeze_bn work under torchrun)"
        )
    return MetaUSCL(model, o.temperature, o.cmw_hidden, o.cmw_lr, o.inner_lr, o.meta_every)


METHOD = Method(
    name="meta-uscl",
    summary="ordered frame triplets interpolated into pairs, weighted by a meta-learned CMW-Net",
    paper="Chen et al., Generating and Weighting Semantically Consistent Sample Pairs for Ultrasound Contrastive "
    "Learning, IEEE TMI 42(5), 2023",
    options=MetaUSCLOptions,
    preset=preset,
    sampler=sampler,
    objective=objective,
    meta_sampler=meta_sampler,
    learns_pair_weights=True,
)
