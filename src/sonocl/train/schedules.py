"""Per-step schedules, precomputed as arrays (one value per optimiser step, as DINO does).

The papers step their schedulers once per epoch; here every formula is evaluated at the fractional epoch
``e = step / steps_per_epoch``, which equals the papers' value at every epoch boundary and moves smoothly
in between (``docs/methods.md`` §1.7, §2.8).
"""

from __future__ import annotations

import math

import numpy as np

from sonocl.train.config import ScheduleConfig


def lr_schedule(base_lr: float, epochs: int, steps_per_epoch: int, config: ScheduleConfig) -> np.ndarray:
    """Learning rate of every step, shape ``(epochs · steps_per_epoch,)``, float64.

    Warm-up over ``W = warmup_epochs`` (at fractional epoch e < W):

    - ``linear``: ``lr · (step + 1) / warmup_steps`` (never 0 at the first step);
    - ``constant``: ``lr`` (USCL: CosineAnnealingLR is stepped only from epoch 10 on, quirk 11);
    - ``exponential``: ``lr · (0.1 + 0.9·exp(−5·(1 − e/W)²))`` (Meta-USCL's LambdaLR).

    Then ``cosine``: ``min_lr + (lr − min_lr)·½(1 + cos(π·(e − W)/T))`` with ``T = epochs − W``
    (``cosine_span="after_warmup"``) or ``T = epochs`` (``"total"``, USCL's T_max = 300 started at epoch 10), or
    ``none``: ``lr``.
    """
    if steps_per_epoch < 1 or epochs < 1:
        raise ValueError(f"need at least one step (epochs {epochs}, steps per epoch {steps_per_epoch})")
    total = epochs * steps_per_epoch
    step = np.arange(total, dtype=np.float64)
    epoch = step / steps_per_epoch
    warmup = float(config.warmup_epochs)
    warm = epoch < warmup
    lr = np.full(total, float(base_lr))
    if warmup > 0:
        if config.warmup == "linear":
            warmup_steps = warmup * steps_per_epoch
            lr[warm] = base_lr * (step[warm] + 1) / warmup_steps
        elif config.warmup == "exponential":
            lr[warm] = base_lr * (0.1 + 0.9 * np.exp(-5.0 * (1.0 - epoch[warm] / warmup) ** 2))
        elif config.warmup != "constant":
            raise ValueError(f"unknown warm-up {config.warmup!r}")
    if config.decay == "cosine":
        span = epochs if config.cosine_span == "total" else max(epochs - warmup, 1e-12)
        progress = (epoch[~warm] - warmup) / span
        lr[~warm] = config.min_lr + (base_lr - config.min_lr) * 0.5 * (1.0 + np.cos(math.pi * progress))
    elif config.decay != "none":
        raise ValueError(f"unknown decay {config.decay!r}")
    return lr


def momentum_schedule(start: float, end: float | None, total_steps: int) -> np.ndarray:
    """Target-network momentum of every step: constant ``start``, or cosine from ``start`` to ``end`` (BYOL)."""
    if end is None or end == start:
        return np.full(total_steps, float(start))
    step = np.arange(total_steps, dtype=np.float64)
    return end - (end - start) * 0.5 * (1.0 + np.cos(math.pi * step / max(total_steps - 1, 1)))
