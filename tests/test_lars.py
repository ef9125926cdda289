"""LARS: the update written out in float64 (You et al. 2017; SimCLR's exclusion of biases and norms)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from conftest import method_config, tiny_pretrain, tiny_sets
from sonocl.cli import main
from sonocl.train.lars import LARS, param_groups
from sonocl.train.model import make_optimizer


def _expected(w: np.ndarray, g: np.ndarray, v: np.ndarray, lr: float, mu: float, wd: float, eta: float):
    d = g + wd * w
    q = eta * np.sqrt((w**2).sum()) / np.sqrt((d**2).sum())
    v = mu * v + q * d
    return w - lr * v, v


def test_a_step_is_the_papers_update_and_biases_are_left_plain() -> None:
    rng = np.random.default_rng(0)
    w0, b0 = rng.normal(size=(3, 4)), rng.normal(size=3)
    weight, bias = nn.Parameter(torch.tensor(w0)), nn.Parameter(torch.tensor(b0))
    lr, mu, wd, eta = 0.5, 0.9, 1e-3, 0.02
    optimizer = LARS(param_groups([weight, bias], wd), lr=lr, momentum=mu, trust_coefficient=eta)
    w, v, b, vb = w0.copy(), np.zeros_like(w0), b0.copy(), np.zeros_like(b0)
    for _ in range(2):  # the second step reads the momentum buffer
        g, gb = rng.normal(size=w.shape), rng.normal(size=b.shape)
        weight.grad, bias.grad = torch.tensor(g), torch.tensor(gb)
        optimizer.step()
        w, v = _expected(w, g, v, lr, mu, wd, eta)
        vb = mu * vb + gb  # no decay, no trust ratio
        b = b - lr * vb
        np.testing.assert_allclose(weight.detach().numpy(), w, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(bias.detach().numpy(), b, rtol=1e-12, atol=1e-14)


def test_a_zero_weight_takes_the_plain_update() -> None:
    weight = nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))
    optimizer = LARS([weight], lr=0.1, momentum=0.0, weight_decay=0.0)
    weight.grad = torch.ones(2, 2, dtype=torch.float64)
    optimizer.step()
    assert torch.equal(weight.detach(), torch.full((2, 2), -0.1, dtype=torch.float64))  # trust ratio 1, not 0 or NaN


def test_the_run_builds_lars_with_two_groups_and_trains(phantom_store, tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    cfg = method_config("simclr", optim={"name": "lars", "weight_decay": 1e-6})
    optimizer = make_optimizer(cfg, list(model.parameters()), 0.3)
    decayed, plain = optimizer.param_groups
    assert isinstance(optimizer, LARS) and len(decayed["params"]) == 1 and len(plain["params"]) == 3
    assert (decayed["weight_decay"], plain["weight_decay"], plain["lars_adaptation"]) == (1e-6, 0.0, False)
    out = tmp_path / "run"
    argv = ["pretrain", "--store", str(phantom_store.root), "--method", "simclr", "--out", str(out),
            *tiny_pretrain("--threads", "1", *tiny_sets(knn_frames=2)), "--set", "optim.name=lars"]  # fmt: skip
    assert main(argv) == 0
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert "lars" in (out / "config.yaml").read_text() and state["optimizer"]["state"]  # momentum buffers kept


def test_adamw_spares_biases_and_norms() -> None:
    """AdamW (DINO's and MAE's optimiser) decays weights only, as their get_params_groups / add_weight_decay do: after
    a step with zero gradients, a weight has shrunk by lr × decay and a bias or norm weight has not moved."""
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.LayerNorm(4))
    cfg = method_config("dino", optim={"name": "adamw", "weight_decay": 0.5})
    optimizer = make_optimizer(cfg, list(model.parameters()), 0.1)
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for old, new in zip(before, model.parameters()):
        expected = old * (1 - 0.1 * 0.5) if old.ndim > 1 else old
        torch.testing.assert_close(new.detach(), expected)
