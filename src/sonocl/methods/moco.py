"""MoCo v2 (Chen, Fan, Girshick, He; arXiv 2003.04297, 2020): a momentum key encoder and a queue of past keys as
negatives.

Preset: SGD 0.03 × B/256, momentum 0.9, wd 1e-4, cosine, no warm-up, τ 0.2, key-encoder momentum 0.999 (the
paper's m; ``schedule.ema_start``, the one place it lives), MLP head feature → 512 → 128, SimCLR's augmentation
with crop (0.2–1), jitter 0.4 and blur.

Two departures, both for ultrasound videos: the queue holds 10 % of the training items by default (MoCo v2's 65,536
keys are 5 % of ImageNet; on a store of 18 k frames they would be every frame three times over, mostly stale), and
a queued key of the query's own video is never a negative (frames of one video are near-duplicates).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sonocl.methods.base import Method, Options, option
from sonocl.methods.simclr import SIMCLR_AUGMENT
from sonocl.methods.simclr import sampler as instance_sampler
from sonocl.pairs import PairSampler
from sonocl.train import meta
from sonocl.train.config import ModelConfig, OptimConfig, PretrainConfig, ScheduleConfig
from sonocl.train.objectives import BatchTensors, MomentumEncoder, Objective, StepContext


@dataclass
class MoCoOptions(Options):
    temperature: float = option(0.2, "softmax temperature τ of MoCo v2's InfoNCE")
    queue_size: int | None = option(None, "keys kept as negatives; none: 10 % of the training items, at most 65,536")

    def check(self) -> list[str]:
        problems = super().check()
        if self.queue_size is not None and self.queue_size < 1:
            problems.append(f"queue_size must be ≥ 1, not {self.queue_size}")
        return problems


MAX_QUEUE = 65536
"""MoCo v2's queue: the most keys the automatic size takes."""


def queue_info_nce(
    q: Tensor, k: Tensor, queue: Tensor, temperature: float, not_negative: Tensor | None = None
) -> Tensor:
    """MoCo's InfoNCE: for each query, its key is the positive and the queue's keys the negatives (He et al. 2020).

    ``q``, ``k`` ``(N, D)`` (normalised here, float32); ``queue`` ``(K, D)`` normalised keys; ``not_negative``
    ``(N, K)`` bool marks queue keys left out of a query's denominator (its own video's). Mean over queries.
    """
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(k.float(), dim=1)
    negatives = q @ queue.float().T
    if not_negative is not None:
        negatives = negatives.masked_fill(not_negative, float("-inf"))
    logits = torch.cat([(q * k).sum(1, keepdim=True), negatives], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


class MoCo(Objective):
    """MoCo v2: both views are queries of the online model and keys of the key encoder, symmetric loss.

    Both views' keys are enqueued after the optimizer step (in `after_step`, as the loss's backward still needs
    the queue). In DDP the keys of every rank are enqueued (all ranks keep the same queue). Shuffle-BN is not
    emulated in a single process (the keys' batch statistics come from one batch of keys, as in single-GPU MoCo).
    """

    def __init__(self, model: nn.Module, temperature: float, queue_size: int, momentum: float) -> None:
        super().__init__(temperature)
        self.temperature = temperature
        self.momentum = momentum
        self.key_encoder = MomentumEncoder(meta.unwrap_model(model))
        device = next(model.parameters()).device
        dim = meta.unwrap_model(model).projector[-1].out_features
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim, device=device), dim=1))
        self.register_buffer("queue_video", torch.full((queue_size,), -1, dtype=torch.long, device=device))
        """The video of each queued key (-1: a random initial key, never of a video)."""
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long, device=device))
        self._pending: tuple[Tensor, Tensor] | None = None

    def forward(  # type: ignore[override]
        self, model: nn.Module, view1: Tensor, view2: Tensor, batch: BatchTensors, context: StepContext
    ) -> tuple[Tensor, dict[str, float]]:
        _, q1 = model(view1)
        _, q2 = model(view2)
        self.key_encoder.train(model.training)
        with torch.no_grad():
            k1 = F.normalize(self.key_encoder(view1).float(), dim=1)
            k2 = F.normalize(self.key_encoder(view2).float(), dim=1)
        video = batch.video if batch.video is not None else torch.full((len(q1),), -1, device=q1.device)
        same_video = (video[:, None] == self.queue_video[None, :]) & (video[:, None] >= 0)
        loss = 0.5 * (
            queue_info_nce(q1, k2, self.queue, self.temperature, same_video)
            + queue_info_nce(q2, k1, self.queue, self.temperature, same_video)
        )
        keys, videos = torch.cat([k1, k2]), torch.cat([video, video])
        self._pending = (keys, videos) if context.gather is None else (context.gather(keys), context.gather(videos))
        return loss, {"moco": float(loss.detach())}

    @torch.no_grad()
    def after_step(self, model: nn.Module, momentum: float | None = None) -> None:
        self.key_encoder.update(meta.unwrap_model(model), self.momentum if momentum is None else momentum)
        if self._pending is not None:
            self._enqueue(*self._pending)
            self._pending = None

    def _enqueue(self, keys: Tensor, videos: Tensor) -> None:
        size = self.queue.shape[0]
        keys, videos = keys[-size:], videos[-size:]
        rows = (self.queue_ptr + torch.arange(keys.shape[0], device=keys.device)) % size
        self.queue[rows] = keys.to(self.queue.dtype)
        self.queue_video[rows] = videos.to(self.queue_video.dtype)
        self.queue_ptr.copy_((self.queue_ptr + keys.shape[0]) % size)


def preset() -> PretrainConfig:
    return PretrainConfig(
        method="moco",
        export="last",
        size=224,
        model=ModelConfig(projection_hidden=512, projection_dim=128),
        augment=dataclasses.replace(SIMCLR_AUGMENT, crop_scale=(0.2, 1.0), brightness=0.4, contrast=0.4),
        optim=OptimConfig(name="sgd", lr=0.03, lr_scaling="linear", momentum=0.9, weight_decay=1e-4),
        schedule=ScheduleConfig(decay="cosine", ema_start=0.999),
        options=MoCoOptions(),
    )


def objective(cfg: PretrainConfig, model: nn.Module, sampler: PairSampler) -> Objective:
    queue = cfg.options.queue_size or min(MAX_QUEUE, max(2 * cfg.batch_size, sampler.num_items // 10))
    return MoCo(model, cfg.options.temperature, queue, momentum=key_momentum(cfg))


def key_momentum(cfg: PretrainConfig) -> float:
    """The key encoder's momentum at step 0 (``schedule.ema_start``; the loop passes the scheduled value per step)."""
    if cfg.schedule.ema_start is None:
        raise ValueError(f"{cfg.method} needs schedule.ema_start, the momentum of its target network")
    return cfg.schedule.ema_start


METHOD = Method(
    name="moco",
    summary="momentum key encoder and a queue of past keys as negatives (MoCo v2)",
    paper="Chen et al., Improved Baselines with Momentum Contrastive Learning, arXiv 2003.04297, 2020",
    options=MoCoOptions,
    preset=preset,
    sampler=instance_sampler,
    objective=objective,
)
