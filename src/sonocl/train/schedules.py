"""Per-step schedules, precomputed as arrays (one value per optimiser step, as DINO does).

The papers step their schedulers once per epoch; here every formula is evaluated at the run's progress
``p = step / total_steps``, which equals the papers' value at every epoch boundary of a run as long as theirs and
moves smoothly in between (``docs/methods.md`` §1.7, §2.8). Stating the warm-up as a share of the run keeps the
papers' shape at any budget: equal budgets in steps give every method its own schedule, scaled.
"""

from __future__ import annotations

import math

import numpy as np

from sonocl.methods.config import ScheduleConfig


def lr_schedule(base_lr: float, total_steps: int, config: ScheduleConfig) -> np.ndarray:
    """Learning rate of every step, shape ``(total_steps,)``, float64, as a function of the run's progress.

    With ``p = step / total_steps`` and the warm-up share ``W = warmup_fraction`` (the papers' warm-up epochs over
    their epochs, so a run of any budget keeps the paper's shape), during warm-up (p < W):

    - ``linear``: ``lr · min(1, (step + 1) / (W · total_steps))`` (never 0 at the first step, never above ``lr``
      when the warm-up is not a whole number of steps);
    - ``constant``: ``lr`` (USCL: CosineAnnealingLR is stepped only from epoch 10 on, quirk 11);
    - ``exponential``: ``lr · (0.1 + 0.9·exp(−5·(1 − p/W)²))`` (Meta-USCL's LambdaLR).

    Then ``cosine``: ``min_lr + (lr − min_lr)·½(1 + cos(π·(p − W)/T))`` with ``T = 1 − W``
    (``cosine_span="after_warmup"``) or ``T = 1`` (``"total"``, USCL's T_max = 300 started at epoch 10), or
    ``none``: ``lr``. At the papers' epoch boundaries this is the papers' per-epoch value.
    """
    if total_steps < 1:
        raise ValueError(f"need at least one step, not {total_steps}")
    step = np.arange(total_steps, dtype=np.float64)
    progress = step / total_steps
    warmup = float(config.warmup_fraction)
    warm = progress < warmup
    lr = np.full(total_steps, float(base_lr))
    if warmup > 0:
        if config.warmup == "linear":
            lr[warm] = base_lr * np.minimum(1.0, (step[warm] + 1) / (warmup * total_steps))
        elif config.warmup == "exponential":
            lr[warm] = base_lr * (0.1 + 0.9 * np.exp(-5.0 * (1.0 - progress[warm] / warmup) ** 2))
    if config.decay == "cosine":
        span = 1.0 if config.cosine_span == "total" else max(1.0 - warmup, 1e-12)
        after = (progress[~warm] - warmup) / span
        lr[~warm] = config.min_lr + (base_lr - config.min_lr) * 0.5 * (1.0 + np.cos(math.pi * after))
    return lr


def momentum_schedule(start: float, end: float | None, total_steps: int) -> np.ndarray:
    """Target-network momentum of every step: constant ``start``, or cosine from ``start`` to ``end`` (BYOL)."""
    if end is None or end == start:
        return np.full(total_steps, float(start))
    step = np.arange(total_steps, dtype=np.float64)
    return end - (end - start) * 0.5 * (1.0 + np.cos(math.pi * step / max(total_steps - 1, 1)))
