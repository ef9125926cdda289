"""Per-method training objectives: what one optimisation step minimises, and the state it needs.

The training loop is the same for every method (``sonocl.train.loop``); an `Objective` turns the two views
of a batch into the loss of the step, keeps whatever state the method needs between steps (MoCo's queue and
key encoder, BYOL's target network, Meta-USCL's CMW-Net and its Adam state) in ``state_dict()``, and updates
momentum networks in `Objective.after_step`. ``docs/methods.md`` has the formulas and the defaults.

| method | loss |
|---|---|
| simclr, awcl, ivpp | `GroupInfoNCE` with the batch's positive groups and prior weights |
| uscl | the same + λ·`semi_supervised_ce` of the classifier on z (one forward per view, quirk 9) |
| meta-uscl | `GroupInfoNCE` weighted by the CMW-Net, after a bilevel meta step (`sonocl.train.meta`) |
| moco | MoCo v2: InfoNCE of q against its momentum key and a queue of past keys, symmetric |
| byol | BYOL: 2 − 2·cos(predictor(z_online), z_target), symmetric, EMA target |
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from sonocl.losses import GroupInfoNCE, byol_loss, semi_supervised_ce
from sonocl.models import CMWNet
from sonocl.train import meta

METHODS = ("simclr", "uscl", "meta-uscl", "awcl", "ivpp", "moco", "byol")


@dataclass
class BatchTensors:
    """The `sonocl.pairs.PairBatch` fields the losses need, as tensors on the training device."""

    positive_group: Tensor
    """``(B,)`` int64; equal ids are positives of each other."""
    weight: Tensor
    """``(B,)`` float32 prior pair weight (IVPP), ones otherwise."""
    label: Tensor
    """``(B,)`` int64 class for USCL's semi-supervised term, -1 when unlabelled."""


@dataclass
class StepContext:
    """What an objective may need about the step besides the batch."""

    step: int
    """Global optimisation step (Meta-USCL runs its meta step when ``step % meta_every == 0``)."""
    optimizer: torch.optim.Optimizer
    """The main optimizer (Meta-USCL's virtual step reads its LR, momentum, weight decay and momentum buffers)."""
    lr: float
    """The current scheduled LR of the main optimizer (for logging; the virtual step reads the groups' LR)."""
    meta_views: Callable[[], tuple[Tensor, Tensor]] | None = None
    """Next meta batch: two normalised views of held-out frames (Meta-USCL only)."""
    gather: Callable[[Tensor], Tensor] | None = None
    """All-gather with gradient across ranks (rank order); None in a single process."""


class Objective(nn.Module):
    """Base: the loss of one training step, plus the unweighted InfoNCE used for validation."""

    def __init__(self, temperature: float, base_temperature: float | None = None) -> None:
        super().__init__()
        self.info_nce = GroupInfoNCE(temperature, base_temperature)

    def forward(  # type: ignore[override]
        self, model: nn.Module, view1: Tensor, view2: Tensor, batch: BatchTensors, context: StepContext
    ) -> tuple[Tensor, dict[str, float]]:
        """The loss the loop back-propagates, and its named parts (floats, for logging)."""
        raise NotImplementedError

    def after_step(self, model: nn.Module, momentum: float | None = None) -> None:
        """Called after the optimizer step (momentum networks, queues). ``momentum`` overrides the EMA momentum
        for this step (the loop's schedule); None keeps the objective's own."""

    def validation_loss(self, model: nn.Module, view1: Tensor, view2: Tensor, batch: BatchTensors) -> Tensor:
        """Unweighted group-InfoNCE of the model's projections (call in eval mode, under ``no_grad``)."""
        _, z1 = model(view1)
        _, z2 = model(view2)
        return self.info_nce(z1, z2, positive_group=batch.positive_group)

    def _contrastive(
        self, z1: Tensor, z2: Tensor, batch: BatchTensors, weight: Tensor | None, context: StepContext
    ) -> Tensor:
        """`GroupInfoNCE` of the local anchors; with ``context.gather`` the negatives are every rank's views."""
        if context.gather is None:
            return self.info_nce(z1, z2, positive_group=batch.positive_group, weight=weight)
        gathered = (context.gather(z1), context.gather(z2), context.gather(batch.positive_group))
        weight_sum = None if weight is None else context.gather(weight.detach().float()).sum()
        return self.info_nce(z1, z2, positive_group=batch.positive_group, weight=weight, gathered=gathered,
                             offset=dist.get_rank() * z1.shape[0], weight_sum=weight_sum)


class GroupContrastive(Objective):
    """SimCLR, AWCL, IVPP and USCL: group-InfoNCE with the batch's positive groups and prior weights.

    With ``semi_weight > 0`` and a classifier on the model (USCL), adds λ·(CE₁ + CE₂) over labelled items
    (§1.6), computed from the same z as the contrastive term (one forward per view, quirk 9).
    """

    def __init__(self, temperature: float = 0.5, base_temperature: float | None = None, semi_weight: float = 0.0) -> None:
        super().__init__(temperature, base_temperature)
        self.semi_weight = semi_weight

    def forward(  # type: ignore[override]
        self, model: nn.Module, view1: Tensor, view2: Tensor, batch: BatchTensors, context: StepContext
    ) -> tuple[Tensor, dict[str, float]]:
        _, z1 = model(view1)
        _, z2 = model(view2)
        contrastive = self._contrastive(z1, z2, batch, batch.weight, context)
        classifier = meta.unwrap_model(model).classifier
        if not self.semi_weight or classifier is None:
            return contrastive, {"contrastive": float(contrastive.detach())}
        semi = semi_supervised_ce(classifier(z1), classifier(z2), batch.label)
        loss = contrastive + self.semi_weight * semi
        return loss, {"contrastive": float(contrastive.detach()), "semi_supervised": float(semi.detach())}


class _MomentumEncoder(nn.Module):
    """A momentum copy of the online backbone + projector: ``x → z``, never trained by gradient."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.backbone = copy.deepcopy(model.backbone)
        self.projector = copy.deepcopy(model.projector)
        self.requires_grad_(False)

    def forward(self, images: Tensor) -> Tensor:
        return self.projector(self.backbone(images).flatten(1))

    @torch.no_grad()
    def update(self, model: nn.Module, momentum: float) -> None:
        """θ_k ← m·θ_k + (1 − m)·θ_q over the parameters (buffers follow the encoder's own forwards)."""
        online = [*model.backbone.parameters(), *model.projector.parameters()]
        for target, source in zip(self.parameters(), online):
            target.lerp_(source.detach(), 1.0 - momentum)


def queue_info_nce(q: Tensor, k: Tensor, queue: Tensor, temperature: float) -> Tensor:
    """MoCo's InfoNCE: for each query, its key is the positive and the queue's keys the negatives (He et al. 2020).

    ``q``, ``k`` ``(N, D)`` (normalised here, float32); ``queue`` ``(K, D)`` normalised keys. Mean over queries.
    """
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(k.float(), dim=1)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.float().T], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


class MoCo(Objective):
    """MoCo v2 (Chen et al. 2020): momentum key encoder, a queue of keys as negatives, τ 0.2, symmetric loss.

    Both views are queries of the online model and keys of the key encoder; the loss is the mean of the two
    directions, and both views' keys are enqueued after the optimizer step (in `after_step`, as the loss's
    backward still needs the queue). The queue is a ring buffer of any size (no multiple-of-batch condition).
    In DDP the keys of every rank are enqueued (all ranks keep the same queue). Shuffle-BN is not emulated in
    a single process (the keys' batch statistics come from one batch of keys, as in the single-GPU MoCo).
    """

    def __init__(self, model: nn.Module, temperature: float = 0.2, queue_size: int = 65536, momentum: float = 0.99,
                 base_temperature: float | None = None) -> None:
        super().__init__(temperature, base_temperature)
        if queue_size < 1:
            raise ValueError(f"queue_size must be ≥ 1, not {queue_size}")
        self.temperature = temperature
        self.momentum = momentum
        self.key_encoder = _MomentumEncoder(meta.unwrap_model(model))
        device = next(model.parameters()).device
        dim = meta.unwrap_model(model).projector[-1].out_features
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim, device=device), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long, device=device))
        self._pending: Tensor | None = None

    def forward(  # type: ignore[override]
        self, model: nn.Module, view1: Tensor, view2: Tensor, batch: BatchTensors, context: StepContext
    ) -> tuple[Tensor, dict[str, float]]:
        _, q1 = model(view1)
        _, q2 = model(view2)
        self.key_encoder.train(model.training)
        with torch.no_grad():
            k1 = F.normalize(self.key_encoder(view1).float(), dim=1)
            k2 = F.normalize(self.key_encoder(view2).float(), dim=1)
        loss = 0.5 * (queue_info_nce(q1, k2, self.queue, self.temperature)
                      + queue_info_nce(q2, k1, self.queue, self.temperature))
        keys = torch.cat([k1, k2])
        self._pending = keys if context.gather is None else context.gather(keys)
        return loss, {"moco": float(loss.detach())}

    @torch.no_grad()
    def after_step(self, model: nn.Module, momentum: float | None = None) -> None:
        self.key_encoder.update(meta.unwrap_model(model), self.momentum if momentum is None else momentum)
        if self._pending is not None:
            self._enqueue(self._pending)
            self._pending = None

    def _enqueue(self, keys: Tensor) -> None:
        size = self.queue.shape[0]
        keys = keys[-size:]
        rows = (self.queue_ptr + torch.arange(keys.shape[0], device=keys.device)) % size
        self.queue[rows] = keys.to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + keys.shape[0]) % size)


class BYOL(Objective):
    """BYOL (Grill et al. 2020): the online predictor regresses the EMA target's projection of the other view.

    Loss = byol_loss(q(z₁), z'₂) + byol_loss(q(z₂), z'₁) with the predictor q = ``model.predictor``.
    """

    def __init__(self, model: nn.Module, momentum: float = 0.996, temperature: float = 0.5) -> None:
        super().__init__(temperature)
        if meta.unwrap_model(model).predictor is None:
            raise ValueError("byol needs a predictor head: build the ContrastiveModel with predictor_hidden > 0")
        self.momentum = momentum
        self.target = _MomentumEncoder(meta.unwrap_model(model))

    def forward(  # type: ignore[override]
        self, model: nn.Module, view1: Tensor, view2: Tensor, batch: BatchTensors, context: StepContext
    ) -> tuple[Tensor, dict[str, float]]:
        predictor = meta.unwrap_model(model).predictor
        _, z1 = model(view1)
        _, z2 = model(view2)
        self.target.train(model.training)
        with torch.no_grad():
            t1, t2 = self.target(view1), self.target(view2)
        loss = byol_loss(predictor(z1), t2) + byol_loss(predictor(z2), t1)
        return loss, {"byol": float(loss.detach())}

    def after_step(self, model: nn.Module, momentum: float | None = None) -> None:
        self.target.update(meta.unwrap_model(model), self.momentum if momentum is None else momentum)


class MetaUSCL(Objective):
    """Meta-USCL (Chen et al., TMI 2023): group-InfoNCE weighted per pair by a meta-learned CMW-Net (§2.5–2.7).

    Every ``meta_every`` steps a bilevel meta step (`sonocl.train.meta`) updates the CMW-Net with Adam against
    the unweighted InfoNCE on a meta batch after a virtual SGD step; the returned loss is then the InfoNCE of
    the same forward (reused, one forward of the real batch per step) weighted by the *updated* CMW-Net under
    ``no_grad``. Between meta steps only the weighted loss runs. The CMW-Net input is the detached backbone
    features [h₁, h₂]. ``inner_lr`` None uses the main optimizer's current LR per group (what the reference
    effectively does, quirk 16). The CMW-Net's Adam state is in ``state_dict()`` (``_extra_state``).
    Single-process only for now (a clear error under DDP).
    """

    def __init__(self, model: nn.Module, temperature: float = 0.5, base_temperature: float | None = None,
                 feature_dim: int | None = None, cmw_hidden: int = 10, cmw_lr: float = 6e-5,
                 inner_lr: float | None = None, meta_every: int = 1) -> None:
        super().__init__(temperature, base_temperature)
        if meta_every < 1:
            raise ValueError(f"meta_every must be ≥ 1, not {meta_every}")
        plain = meta.unwrap_model(model)
        if feature_dim is None:
            feature_dim = plain.projector[0].in_features
        parameter = next(plain.parameters())
        self.cmw = CMWNet(feature_dim, cmw_hidden).to(device=parameter.device)
        self.cmw_optimizer = torch.optim.Adam(self.cmw.parameters(), lr=cmw_lr)
        self.inner_lr = inner_lr
        self.meta_every = meta_every

    def forward(  # type: ignore[override]
        self, model: nn.Module, view1: Tensor, view2: Tensor, batch: BatchTensors, context: StepContext
    ) -> tuple[Tensor, dict[str, float]]:
        if context.gather is not None:
            raise NotImplementedError("meta-uscl is single-process for now; run it without torchrun")
        h1, z1 = model(view1)
        h2, z2 = model(view2)
        parts: dict[str, float] = {}
        if context.step % self.meta_every == 0:
            if context.meta_views is None:
                raise ValueError("meta-uscl needs StepContext.meta_views (held-out meta batches)")
            meta_view1, meta_view2 = context.meta_views()
            result = meta.cmw_meta_gradient(
                model, self.cmw, self.info_nce, view1, view2, h1, h2, z1, z2, batch.positive_group, batch.weight,
                meta_view1, meta_view2, context.optimizer, self.inner_lr,
            )
            meta.apply_meta_gradient(self.cmw, self.cmw_optimizer, result)
            parts["meta"] = float(result.meta_loss)
        with torch.no_grad():
            weight = meta.pair_weight(self.cmw, h1, h2, batch.weight)
        loss = self.info_nce(z1, z2, positive_group=batch.positive_group, weight=weight)
        parts.update(contrastive=float(loss.detach()), weight_mean=float(weight.mean()), weight_std=float(weight.std(correction=0)))
        return loss, parts

    def get_extra_state(self) -> dict[str, Any]:
        return {"cmw_optimizer": self.cmw_optimizer.state_dict()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.cmw_optimizer.load_state_dict(state["cmw_optimizer"])


def make_objective(
    method: str,
    model: nn.Module,
    *,
    temperature: float | None = None,
    base_temperature: float | None = None,
    semi_weight: float = 0.2,
    queue_size: int = 65536,
    moco_momentum: float = 0.99,
    byol_momentum: float = 0.996,
    cmw_hidden: int = 10,
    cmw_lr: float = 6e-5,
    inner_lr: float | None = None,
    meta_every: int = 1,
    feature_dim: int | None = None,
) -> Objective:
    """The objective of ``method`` for ``model`` (a `sonocl.models.ContrastiveModel`, possibly compiled).

    ``temperature`` None: 0.2 for moco, 0.5 otherwise. ``semi_weight`` (USCL's λ) applies to uscl only.
    State is created on the model's device; move the objective with the model otherwise.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    tau = (0.2 if method == "moco" else 0.5) if temperature is None else temperature
    if method in ("simclr", "awcl", "ivpp"):
        return GroupContrastive(tau, base_temperature)
    if method == "uscl":
        return GroupContrastive(tau, base_temperature, semi_weight=semi_weight)
    if method == "meta-uscl":
        return MetaUSCL(model, tau, base_temperature, feature_dim=feature_dim, cmw_hidden=cmw_hidden, cmw_lr=cmw_lr,
                        inner_lr=inner_lr, meta_every=meta_every)
    if method == "moco":
        return MoCo(model, tau, queue_size=queue_size, momentum=moco_momentum, base_temperature=base_temperature)
    return BYOL(model, momentum=byol_momentum, temperature=tau)
