"""Numerics: a NaN or Inf in the batch or the loss stops pretraining with a clear message; half precision stays finite.

The injections go in below the training loop (the augmentation module's output, the loss module's value)
or through the command line alone (a learning rate that makes training diverge), so they keep working
whatever the loop's structure. Each loss of `sonocl.losses` is then run in fp16 and bf16 on
near-duplicate embeddings, the case where a softmax over equal similarities or a vanishing norm breaks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from reliability_support import random_store, run_cli, smallest_pretrain

from sonocl.augment import BatchAugment
from sonocl.losses import GroupInfoNCE, byol_loss, semi_supervised_ce


def _pretrain(capsys: pytest.CaptureFixture[str], store: Path, run: Path, *extra: str) -> Any:
    return run_cli(
        capsys,
        "pretrain",
        "--store",
        store,
        *smallest_pretrain(run, epochs=2),
        *extra,
    )


def _poison_views(monkeypatch: pytest.MonkeyPatch, value: float) -> None:
    original = BatchAugment.forward

    def forward(self: BatchAugment, *args: Any, **kwargs: Any) -> torch.Tensor:
        images = original(self, *args, **kwargs).clone()
        images[0, 0, 0, 0] = value
        return images

    monkeypatch.setattr(BatchAugment, "forward", forward)


def _poison_loss(monkeypatch: pytest.MonkeyPatch, value: float) -> None:
    original = GroupInfoNCE.forward
    monkeypatch.setattr(GroupInfoNCE, "forward", lambda self, *args, **kwargs: original(self, *args, **kwargs) * value)


@pytest.mark.parametrize(
    ("inject", "value"),
    [
        (_poison_views, float("inf")),
        (_poison_views, float("nan")),
        (_poison_loss, float("nan")),
        (_poison_loss, float("inf")),
    ],
    ids=["inf-in-batch", "nan-in-batch", "nan-loss", "inf-loss"],
)
def test_non_finite_batch_or_loss_stops_training_with_a_message(
    inject: Any, value: float, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    store = random_store(tmp_path / "store", ["a", "b"] * 4)
    inject(monkeypatch, value)
    result = _pretrain(capsys, store, tmp_path / "run")
    assert result.code == 1
    (line,) = [line for line in result.err.splitlines() if "non-finite loss" in line]
    assert line.startswith("sonocl pretrain: non-finite loss") and "at step 1" in line and "--lr" in line, line


def test_diverging_training_stops_and_leaves_a_finite_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Only the command line: a learning rate of 1e30 blows the weights up within a few steps."""
    store = random_store(tmp_path / "store", ["a", "b"] * 4)
    result = _pretrain(capsys, store, tmp_path / "run", "--lr", "1e30", "--checkpoint-every-steps", "1")
    assert result.code == 1
    assert "non-finite loss" in result.err and "holds the last good state" in result.err
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert all(torch.isfinite(tensor).all() for tensor in checkpoint["model"].values() if tensor.is_floating_point())


def test_divergence_before_any_checkpoint_does_not_point_to_a_missing_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = random_store(tmp_path / "store", ["a", "b"] * 4)
    result = _pretrain(capsys, store, tmp_path / "run", "--lr", "1e30")
    assert result.code == 1 and "non-finite loss" in result.err
    if "holds the last good state" in result.err:
        assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()


def _near_duplicates(n: int, dim: int, scale: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Two views of ``n`` embeddings that all point almost the same way (a collapsing encoder), at ``scale``."""
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(1, dim, generator=generator)
    z1 = scale * (base + 1e-3 * torch.randn(n, dim, generator=generator))
    z2 = scale * (base + 1e-3 * torch.randn(n, dim, generator=generator))
    return z1.to(dtype).requires_grad_(), z2.to(dtype).requires_grad_()


LOSSES = {
    "simclr": lambda z1, z2: GroupInfoNCE(0.5)(z1, z2),
    "supcon-groups": lambda z1, z2: GroupInfoNCE(0.1, base_temperature=0.07)(
        z1, z2, positive_group=torch.arange(len(z1)) // 2
    ),
    "weighted": lambda z1, z2: GroupInfoNCE(0.5)(z1, z2, weight=torch.linspace(0.0, 1.0, len(z1))),
    "low-temperature": lambda z1, z2: GroupInfoNCE(0.01)(z1, z2),
    "semi-supervised-ce": lambda z1, z2: semi_supervised_ce(z1, z2, torch.tensor([0, -1, 3, 2, -1, 1, 0, 3])),
    "byol": lambda z1, z2: byol_loss(z1, z2),
}


@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e3], ids=["tiny", "unit", "large"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", list(LOSSES))
def test_losses_stay_finite_in_half_precision_on_near_duplicates(name: str, dtype: torch.dtype, scale: float) -> None:
    z1, z2 = _near_duplicates(8, 16, scale, dtype)
    with torch.autocast("cpu", dtype=dtype):
        loss = LOSSES[name](z1, z2)
    loss.backward()
    assert torch.isfinite(loss), (name, loss)
    assert z1.grad is not None and torch.isfinite(z1.grad).all()
    assert z2.grad is None or torch.isfinite(z2.grad).all()  # BYOL's target z2 is detached
