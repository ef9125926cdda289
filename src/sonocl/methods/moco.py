"""MoCo v2 (Chen, Fan, Girshick, He; arXiv 2003.04297, 2020): a momentum key encoder and a queue of past keys as
negatives.

Preset: SGD 0.03 × B/256, momentum 0.9, wd 1e-4, cosine, no warm-up, τ 0.2, key-encoder momentum 0.999 (the
paper's m; ``schedule.ema_start``, the one place it lives), MLP head feature → 512 → 128, SimCLR's augmentation
with crop (0.2–1), jitter 0.4 and blur. The loss is the paper's (facebookresearch/moco ``builder.py``): one query
view per pair, view 1's query against view 2's key and the queue (``loss: v2``); ``loss: symmetric`` makes both
views queries and averages the two directions (MoCo v3's form, sonocl's MoCo until 2026-12-03). The keys are
computed with Shuffle-BN (He et al. 2020 §3.3): under DDP the keys' images are shuffled across processes as the
reference does; in one process the shuffled batch is split into sub-batches, each with its own BatchNorm
statistics (``shuffle_bn_groups``), as single-GPU re-implementations emulate the reference's 8 GPUs.

Two departures, both for ultrasound videos: the queue holds 10 % of the training items by default (MoCo v2's 65,536
keys are 5 % of ImageNet; on a store of 18 k frames they would be every frame three times over, mostly stale), and
a queued key of the query's own video is never a negative (frames of one video are near-duplicates).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from sonocl.methods.base import Method
from sonocl.methods.config import ModelConfig, OptimConfig, Options, PretrainConfig, ScheduleConfig, option, options_of
from sonocl.methods.objectives import BatchTensors, MomentumEncoder, Objective, StepContext
from sonocl.methods.simclr import SIMCLR_AUGMENT
from sonocl.methods.simclr import sampler as instance_sampler
from sonocl.models import ContrastiveModel
from sonocl.pairs import PairSampler

LOSSES = ("v2", "symmetric")

SHUFFLE_BN_BATCH = 32
"""The BatchNorm batch of one key sub-batch when ``shuffle_bn_groups`` is automatic: the reference's per-GPU batch
(256 over 8 GPUs)."""


@dataclass
class MoCoOptions(Options):
    temperature: float = option(0.2, "softmax temperature τ of MoCo v2's InfoNCE")
    queue_size: int | None = option(None, "keys kept as negatives; none: 10 % of the training items, at most 65,536")
    loss: str = option(
        "v2",
        "v2: view 1 is the query, view 2's key its positive, one direction (MoCo v2); symmetric: both views are "
        "queries, the two directions averaged and both views' keys enqueued (MoCo v3's form)",
    )
    shuffle_bn_groups: int | None = option(
        None,
        "Shuffle-BN: sub-batches of shuffled keys each process encodes, each with its own BatchNorm statistics "
        f"(none: one per {SHUFFLE_BN_BATCH} keys, at least 2 in one process; 1: off in one process; under DDP the "
        "keys are always shuffled across processes)",
    )

    def check(self) -> list[str]:
        problems = super().check()
        if self.queue_size is not None and self.queue_size < 1:
            problems.append(f"queue_size must be ≥ 1, not {self.queue_size}")
        if self.loss not in LOSSES:
            problems.append(f"loss must be one of {', '.join(LOSSES)}, not {self.loss!r}")
        if self.shuffle_bn_groups is not None and self.shuffle_bn_groups < 1:
            problems.append(f"shuffle_bn_groups must be ≥ 1, not {self.shuffle_bn_groups}")
        return problems


MAX_QUEUE = 65536
"""MoCo v2's queue: the most keys the automatic size takes."""


def _at_least_float32(tensor: Tensor) -> Tensor:
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def queue_info_nce(
    q: Tensor, k: Tensor, queue: Tensor, temperature: float, not_negative: Tensor | None = None
) -> Tensor:
    """MoCo's InfoNCE: for each query, its key is the positive and the queue's keys the negatives (He et al. 2020).

    ``q``, ``k`` ``(N, D)`` (normalised here, in float32 or float64); ``queue`` ``(K, D)`` normalised keys;
    ``not_negative`` ``(N, K)`` bool marks queue keys left out of a query's denominator (its own video's). Mean over
    queries.
    """
    q = F.normalize(_at_least_float32(q), dim=1)
    k = F.normalize(_at_least_float32(k), dim=1).to(q.dtype)
    negatives = q @ queue.to(q.dtype).T
    if not_negative is not None:
        negatives = negatives.masked_fill(not_negative, float("-inf"))
    logits = torch.cat([(q * k).sum(1, keepdim=True), negatives], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


def shuffle_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator of a step's Shuffle-BN permutations: a function of (run seed, global step) alone, so every
    rank draws the same permutation without a collective, a resumed run draws what the uninterrupted one drew, and
    no other draw of the step (augmentation, torch's global RNG) is moved."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 104_729 + 24_301) % (2**63 - 1))


def shuffle_groups(option: int | None, batch: int, distributed: bool) -> int:
    """The sub-batches one process encodes its ``batch`` keys in: ``option``, or one per `SHUFFLE_BN_BATCH` keys (at
    least 2 in one process, where the shuffle alone changes nothing); never more than ``batch // 2`` (a BatchNorm
    batch of one sample has no variance), at least 1."""
    groups = option if option is not None else max(1 if distributed else 2, batch // SHUFFLE_BN_BATCH)
    return max(1, min(groups, batch // 2))


class MoCo(Objective):
    """MoCo v2: view 1 is the query of the online model, view 2's key (momentum encoder, Shuffle-BN) its positive,
    the queue's keys its negatives; ``loss="symmetric"`` adds the other direction (both views queries and keys).

    The keys are enqueued after the optimizer step (in `after_step`, as the loss's backward still needs the queue):
    the batch's keys once (v2), both views' keys (symmetric). In DDP the keys of every rank are enqueued (all ranks
    keep the same queue).

    Shuffle-BN (He et al. 2020 §3.3): a key must not be normalised with the statistics of its query's batch, or the
    model lowers the loss through them. One process: the keys' images are permuted, split into
    ``shuffle_bn_groups`` sub-batches encoded one by one (each its own BatchNorm statistics), and the keys put back
    in the batch's order. DDP (``context.gather``): every rank's images are gathered, permuted with one permutation
    all ranks draw alike (`shuffle_generator`), each rank encodes its shard of the permuted batch (in
    ``shuffle_bn_groups`` sub-batches), and the keys are gathered and un-permuted (the reference's
    ``_batch_shuffle_ddp``).
    """

    queue: Tensor
    """``(queue_size, dim)`` normalised keys (a buffer: saved with the objective's state)."""
    queue_video: Tensor
    """The video of each queued key (-1: a random initial key, never of a video); a key of the query's own video is
    never its negative."""
    queue_ptr: Tensor
    """Where the next keys go, as a 0-dimensional long tensor."""

    def __init__(
        self,
        model: ContrastiveModel,
        temperature: float,
        queue_size: int,
        momentum: float,
        loss: str = "v2",
        shuffle_bn_groups: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(temperature)
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, not {loss!r}")
        self.temperature = temperature
        self.momentum = momentum
        self.loss = loss
        self.shuffle_bn_groups = shuffle_bn_groups
        """Sub-batches per process (None: automatic, `shuffle_groups`)."""
        self.seed = seed
        self.key_encoder = MomentumEncoder(model)
        device = next(model.parameters()).device
        dim = model.projector.out_dim
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim, device=device), dim=1))
        self.register_buffer("queue_video", torch.full((queue_size,), -1, dtype=torch.long, device=device))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long, device=device))
        self._pending: tuple[Tensor, Tensor] | None = None

    def forward(
        self, model: ContrastiveModel, view1: Tensor, view2: Tensor, batch: BatchTensors, context: StepContext
    ) -> tuple[Tensor, dict[str, float]]:
        self.key_encoder.train(model.training)
        generator = shuffle_generator(self.seed, context.step)
        _, q1 = model(view1)
        k2 = self.keys(view2, generator, context.gather)
        video = batch.video if batch.video is not None else torch.full((len(q1),), -1, device=q1.device)
        same_video = (video[:, None] == self.queue_video[None, :]) & (video[:, None] >= 0)
        if self.loss == "v2":
            loss = queue_info_nce(q1, k2, self.queue, self.temperature, same_video)
            keys, videos = k2, video
        else:
            _, q2 = model(view2)
            k1 = self.keys(view1, generator, context.gather)
            loss = 0.5 * (
                queue_info_nce(q1, k2, self.queue, self.temperature, same_video)
                + queue_info_nce(q2, k1, self.queue, self.temperature, same_video)
            )
            keys, videos = torch.cat([k1, k2]), torch.cat([video, video])
        self._pending = (keys, videos) if context.gather is None else (context.gather(keys), context.gather(videos))
        return loss, {"moco": float(loss.detach())}

    @torch.no_grad()
    def keys(
        self, images: Tensor, generator: torch.Generator, gather: Callable[[Tensor], Tensor] | None = None
    ) -> Tensor:
        """The normalised keys ``(N, D)`` of ``images`` ``(N, …)``, in their order, encoded with Shuffle-BN (the
        permutation drawn from ``generator``; ``gather``: DDP's all-gather, None in one process)."""
        local = images.shape[0]
        groups = shuffle_groups(self.shuffle_bn_groups, local, gather is not None)
        if gather is None and groups == 1:
            return self._encode(images, 1)
        everyone = images if gather is None else gather(images)
        order = torch.randperm(everyone.shape[0], generator=generator).to(images.device)
        rank = 0 if gather is None else dist.get_rank()
        shard = order[rank * local : (rank + 1) * local]
        keys = self._encode(everyone[shard], groups)  # keys[j]: the key of item order[rank·N + j]
        every_key = keys if gather is None else gather(keys)
        return every_key[order.argsort()[rank * local : (rank + 1) * local]]

    def _encode(self, images: Tensor, groups: int) -> Tensor:
        parts = [self.key_encoder(part) for part in images.tensor_split(groups)]
        return F.normalize(_at_least_float32(torch.cat(parts)), dim=1)

    @torch.no_grad()
    def after_step(self, model: ContrastiveModel, momentum: float | None = None) -> None:
        self.key_encoder.update(model, self.momentum if momentum is None else momentum)
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


def objective(cfg: PretrainConfig, model: ContrastiveModel, sampler: PairSampler) -> Objective:
    options = options_of(cfg, MoCoOptions)
    queue = options.queue_size or min(MAX_QUEUE, max(2 * cfg.batch_size, sampler.num_items // 10))
    return MoCo(
        model,
        options.temperature,
        queue,
        momentum=key_momentum(cfg),
        loss=options.loss,
        shuffle_bn_groups=options.shuffle_bn_groups,
        seed=cfg.seed,
    )


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
