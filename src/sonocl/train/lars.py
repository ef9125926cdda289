"""LARS (You et al., "Large Batch Training of Convolutional Networks", 2017), as large-batch SimCLR and BYOL use it.

For each parameter p with gradient g, in a group that adapts (``lars_adaptation``)::

    d = g + wd · p
    q = η · ‖p‖ / ‖d‖        (1 where ‖p‖ or ‖d‖ is 0)
    v ← μ · v + q · d
    p ← p − lr · v

A group that does not adapt (biases and normalisation weights: `param_groups`) takes ``v ← μ · v + g`` without decay,
as SimCLR's LARS excludes them from both (Chen et al. 2020, appendix B.1) and as the PyTorch LARS of
facebookresearch/barlowtwins (``main.py``, class ``LARS``) writes the update; η is its ``trust_coefficient``
(0.001 in both).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio (module docstring)."""

    def __init__(
        self,
        params: Iterable[nn.Parameter] | Iterable[dict],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
            lars_adaptation=True,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # torch's signature, untyped there too
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if group["lars_adaptation"]:
                    d = d.add(p, alpha=group["weight_decay"])
                    param_norm, update_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    one = torch.ones_like(param_norm)
                    trust = torch.where(
                        (param_norm > 0) & (update_norm > 0),
                        group["trust_coefficient"] * param_norm / update_norm,
                        one,
                    )
                    d = d.mul(trust)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buffer = state["momentum_buffer"]
                buffer.mul_(group["momentum"]).add_(d)
                p.add_(buffer, alpha=-group["lr"])
        return loss


def param_groups(params: Iterable[nn.Parameter], weight_decay: float) -> list[dict]:
    """LARS's two groups: weights (decayed and adapted) and the one-dimensional parameters, biases and normalisation
    weights, that are neither."""
    params = list(params)
    return [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "lars_adaptation": False},
    ]
