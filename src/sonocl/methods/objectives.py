"""Training objectives: what one optimisation step minimises, and the state it needs.

The training loop is the same for every method (``sonocl.train.loop``); an `Objective` turns the two views
of a batch into the loss of the step, keeps whatever state the method needs between steps (MoCo's queue and
key encoder, BYOL's target network, Meta-USCL's CMW-Net and its Adam state, MAE's decoder) in ``state_dict()``,
names the parameters of its own that the run's optimiser trains with the model (`Objective.trained_parameters`:
MAE's decoder), and updates momentum networks in `Objective.after_step`. This module holds the parts several methods
share: the base class, `GroupContrastive` (SimCLR, USCL, AWCL, IVPP) and `MomentumEncoder` (MoCo, BYOL). MoCo's,
BYOL's and Meta-USCL's own objectives live in their modules under ``sonocl/methods/``; ``docs/methods.md`` has the
formulas.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from sonocl.losses import GroupInfoNCE, semi_supervised_ce
from sonocl.models import ContrastiveModel


@dataclass
class BatchTensors:
    """The `sonocl.pairs.PairBatch` fields the losses need, as tensors on the training device."""

    positive_group: Tensor
    """``(B,)`` int64; equal ids are positives of each other."""
    weight: Tensor
    """``(B,)`` float32 prior pair weight (IVPP), ones otherwise."""
    label: Tensor
    """``(B,)`` int64 class for USCL's semi-supervised term, -1 when unlabelled."""
    video: Tensor | None = None
    """``(B,)`` int64 video of each item (MoCo keeps a key's video so that same-video keys are never negatives)."""


@dataclass
class StepContext:
    """What an objective may need about the step besides the batch."""

    step: int
    """Global optimisation step (Meta-USCL runs its meta step when ``step % meta_every == 0``)."""
    optimizer: torch.optim.Optimizer
    """The main optimizer (Meta-USCL's virtual step reads its LR, momentum, weight decay and momentum buffers)."""
    lr: float
    """The current scheduled LR of the main optimizer (for logging; the virtual step reads the groups' LR)."""
    meta_views: Callable[[], tuple[Tensor, Tensor, Tensor]] | None = None
    """Next meta batch: two normalised views of held-out frames and their positive groups (Meta-USCL only)."""
    gather: Callable[[Tensor], Tensor] | None = None
    """All-gather with gradient across ranks (rank order); None in a single process."""
    local_views: Tensor | None = None
    """The batch's normalised local crops, ``(L·B, C, s, s)`` crop-major (`sonocl.augment.make_local_views`; DINO's
    multi-crop); None when the augmentation makes none (``augment.local_crops`` 0)."""


class Objective(nn.Module):
    """Base: the loss of one training step, plus the unweighted InfoNCE used for validation."""

    def __init__(self, temperature: float, base_temperature: float | None = None) -> None:
        super().__init__()
        self.info_nce = GroupInfoNCE(temperature, base_temperature)

    def forward(
        self, model: ContrastiveModel, view1: Tensor, view2: Tensor, batch: BatchTensors, context: StepContext
    ) -> tuple[Tensor, dict[str, float]]:
        """The loss the loop back-propagates, and its named parts (floats, for logging)."""
        raise NotImplementedError

    def trained_parameters(self) -> list[nn.Parameter]:
        """The objective's own parameters that the run's optimiser trains with the model's (MAE's decoder); none by
        default: momentum encoders follow the model by EMA, and Meta-USCL's CMW-Net has an optimiser of its own."""
        return []

    def after_step(self, model: ContrastiveModel, momentum: float | None = None) -> None:
        """Called after the optimizer step (momentum networks, queues). ``momentum`` overrides the EMA momentum
        for this step (the loop's schedule); None keeps the objective's own."""

    def validation_loss(self, model: ContrastiveModel, view1: Tensor, view2: Tensor, batch: BatchTensors) -> Tensor:
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
        return self.info_nce(
            z1,
            z2,
            positive_group=batch.positive_group,
            weight=weight,
            gathered=gathered,
            offset=dist.get_rank() * z1.shape[0],
            weight_sum=weight_sum,
        )


class GroupContrastive(Objective):
    """SimCLR, AWCL, IVPP and USCL: group-InfoNCE with the batch's positive groups and prior weights.

    With ``semi_weight > 0`` and a classifier on the model (USCL), adds λ·(CE₁ + CE₂) over labelled items
    (§1.6), computed from the same z as the contrastive term (one forward per view, quirk 9).
    """

    def __init__(
        self, temperature: float = 0.5, base_temperature: float | None = None, semi_weight: float = 0.0
    ) -> None:
        super().__init__(temperature, base_temperature)
        self.semi_weight = semi_weight

    def forward(
        self, model: ContrastiveModel, view1: Tensor, view2: Tensor, batch: BatchTensors, context: StepContext
    ) -> tuple[Tensor, dict[str, float]]:
        _, z1 = model(view1)
        _, z2 = model(view2)
        contrastive = self._contrastive(z1, z2, batch, batch.weight, context)
        classifier = model.classifier
        if not self.semi_weight or classifier is None:
            return contrastive, {"contrastive": float(contrastive.detach())}
        semi = semi_supervised_ce(classifier(z1), classifier(z2), batch.label, context.gather)
        loss = contrastive + self.semi_weight * semi
        return loss, {"contrastive": float(contrastive.detach()), "semi_supervised": float(semi.detach())}


class MomentumEncoder(nn.Module):
    """A momentum copy of the online backbone + projector: ``x → z``, never trained by gradient."""

    def __init__(self, model: ContrastiveModel) -> None:
        super().__init__()
        self.backbone = copy.deepcopy(model.backbone)
        self.projector = copy.deepcopy(model.projector)
        self.requires_grad_(False)

    def forward(self, images: Tensor) -> Tensor:
        return self.projector(self.backbone(images).flatten(1))

    @torch.no_grad()
    def update(self, model: ContrastiveModel, momentum: float) -> None:
        """θ_k ← m·θ_k + (1 − m)·θ_q over the parameters (buffers follow the encoder's own forwards)."""
        online = [*model.backbone.parameters(), *model.projector.parameters()]
        for target, source in zip(self.parameters(), online):
            target.lerp_(source.detach(), 1.0 - momentum)
