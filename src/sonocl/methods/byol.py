"""BYOL (Grill et al., NeurIPS 2020): the online network's predictor regresses an EMA target's projection of the other
view; no negatives.

Preset: SGD 0.2 × B/256 standing in for LARS, wd 1.5e-6, 10-epoch warm-up, cosine, target momentum 0.996 → 1
(cosine; ``schedule.ema_start``/``ema_end``), projector 4096 (BN) → 256, predictor 4096 → 256, SimCLR's augmentation
with jitter 0.4 and the paper's two pipelines (its Table 6): Gaussian blur with p 1.0 on the first view and 0.1 on the
second, solarisation with p 0 and 0.2.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from sonocl.losses import byol_loss
from sonocl.methods.base import Method
from sonocl.methods.config import ModelConfig, OptimConfig, Options, PretrainConfig, ScheduleConfig
from sonocl.methods.moco import key_momentum
from sonocl.methods.objectives import BatchTensors, MomentumEncoder, Objective, StepContext
from sonocl.methods.simclr import SIMCLR_AUGMENT
from sonocl.methods.simclr import sampler as instance_sampler
from sonocl.models import ContrastiveModel
from sonocl.pairs import PairSampler


class BYOL(Objective):
    """Loss = byol_loss(q(z₁), z'₂) + byol_loss(q(z₂), z'₁) with the predictor q = ``model.predictor``."""

    def __init__(self, model: ContrastiveModel, momentum: float, temperature: float) -> None:
        super().__init__(temperature)
        if model.predictor is None:
            raise ValueError("byol needs a predictor head: build the ContrastiveModel with predictor_hidden > 0")
        self.momentum = momentum
        self.target = MomentumEncoder(model)

    def forward(
        self, model: ContrastiveModel, view1: Tensor, view2: Tensor, batch: BatchTensors, context: StepContext
    ) -> tuple[Tensor, dict[str, float]]:
        predictor = model.predictor
        assert predictor is not None, "byol needs a predictor head (checked when the objective is built)"
        _, z1 = model(view1)
        _, z2 = model(view2)
        self.target.train(model.training)
        with torch.no_grad():
            t1, t2 = self.target(view1), self.target(view2)
        loss = byol_loss(predictor(z1), t2) + byol_loss(predictor(z2), t1)
        return loss, {"byol": float(loss.detach())}

    def after_step(self, model: ContrastiveModel, momentum: float | None = None) -> None:
        self.target.update(model, self.momentum if momentum is None else momentum)


def preset() -> PretrainConfig:
    return PretrainConfig(
        method="byol",
        export="last",
        size=224,
        model=ModelConfig(
            projection_hidden=4096, projection_dim=256, projection_batch_norm=True, predictor_hidden=4096
        ),
        augment=dataclasses.replace(
            SIMCLR_AUGMENT,
            brightness=0.4,
            contrast=0.4,
            blur_p=1.0,
            view2_blur_p=0.1,
            solarize_p=0.0,
            view2_solarize_p=0.2,
        ),
        optim=OptimConfig(name="sgd", lr=0.2, lr_scaling="linear", momentum=0.9, weight_decay=1.5e-6),
        schedule=ScheduleConfig(
            warmup_fraction=10 / 1000, warmup="linear", decay="cosine", ema_start=0.996, ema_end=1.0
        ),
        options=Options(),
    )


def objective(cfg: PretrainConfig, model: ContrastiveModel, sampler: PairSampler) -> Objective:
    return BYOL(model, momentum=key_momentum(cfg), temperature=cfg.options.temperature)


METHOD = Method(
    name="byol",
    summary="an online predictor regresses an EMA target network's projection (no negatives)",
    paper="Grill et al., Bootstrap Your Own Latent, NeurIPS 2020",
    options=Options,
    preset=preset,
    sampler=instance_sampler,
    objective=objective,
)
