"""IVPP as its reference code trains it (issue 22; ``docs/methods.md`` §4): the preset is ``ncus_simclr``'s, and
``--objective vicreg`` / ``barlow_twins`` are ``ncus_vicreg`` / ``ncus_barlow_twins``, their losses checked in float64
against the papers' equations written out here from the papers, not from sonocl's code."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from conftest import make_objective, make_sampler, method_config, tiny_pretrain, tiny_sets
from sonocl.cli import main
from sonocl.losses import BarlowTwinsLoss, VICRegLoss
from sonocl.methods import get_method
from sonocl.methods.objectives import BatchTensors, GroupContrastive, StepContext
from sonocl.models import ContrastiveModel
from sonocl.train import distributed as ddp

N, D = 7, 5


def _pair(seed: int, n: int = N, d: int = D) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.3, 2.0, d, dtype=torch.float64)
    z2 = z1 + 0.7 * torch.randn(n, d, generator=g, dtype=torch.float64)
    weight = 0.1 + torch.rand(n, generator=g, dtype=torch.float64)
    return z1, z2, weight


def _rows(z: torch.Tensor) -> list[list[float]]:
    return z.tolist()


# ---------------------------------------------------------------------------------------------- VICReg


def _vicreg_paper(a: list[list[float]], b: list[list[float]], w: list[float] | None, gamma=1.0, eps=1e-4):
    """Bardes et al. 2022, §4.1, in plain Python on n rows of d values: v(Z) = 1/d Σ_j max(0, γ − S(z^j, ε)) with
    S(x, ε) = √(Var(x) + ε); C(Z) = 1/(n−1) Σ_i (z_i − z̄)(z_i − z̄)ᵀ; c(Z) = 1/d Σ_{i≠j} C(Z)_ij²;
    s(Z, Z') = 1/n Σ_i ‖z_i − z'_i‖² (with IVPP's pair weights: 1/n Σ_i w_i ‖z_i − z'_i‖²)."""
    n, d = len(a), len(a[0])

    def column(z, j):
        return [row[j] for row in z]

    def variance(x):
        mean = sum(x) / len(x)
        return sum((v - mean) ** 2 for v in x) / (len(x) - 1)

    def v(z):
        return sum(max(0.0, gamma - math.sqrt(variance(column(z, j)) + eps)) for j in range(d)) / d

    def c(z):
        means = [sum(column(z, j)) / n for j in range(d)]
        cov = [
            [sum((z[k][i] - means[i]) * (z[k][j] - means[j]) for k in range(n)) / (n - 1) for j in range(d)]
            for i in range(d)
        ]
        return sum(cov[i][j] ** 2 for i in range(d) for j in range(d) if i != j) / d

    weights = w if w is not None else [1.0] * n
    s = sum(weights[i] * sum((a[i][j] - b[i][j]) ** 2 for j in range(d)) for i in range(n)) / n
    return s, v(a), v(b), c(a), c(b)


@pytest.mark.parametrize("weighted", [False, True])
def test_vicreg_loss_is_the_papers_terms_with_the_released_codes_normalisation(weighted: bool) -> None:
    """The paper's loss is λ·s + μ·[v(Z) + v(Z')] + ν·[c(Z) + c(Z')]; VICReg's released code, and IVPP's reference
    (``src/losses/losses.py`` VICRegLoss), for which λ = μ = 25, ν = 1 were set, take s as a mean over the n·d entries
    (s/d) and the mean of the two variance terms. The pair weights multiply the invariance term only."""
    z1, z2, weight = _pair(0)
    w = weight if weighted else None
    s, v1, v2, c1, c2 = _vicreg_paper(_rows(z1), _rows(z2), None if w is None else w.tolist())
    loss = VICRegLoss(invariance_weight=25.0, variance_weight=25.0, covariance_weight=1.0)
    parts = loss.terms(z1, z2, w)
    assert parts["invariance"].dtype == torch.float64
    assert float(parts["invariance"]) == pytest.approx(s / D, rel=1e-12)
    assert float(parts["variance"]) == pytest.approx((v1 + v2) / 2, rel=1e-12)
    assert float(parts["covariance"]) == pytest.approx(c1 + c2, rel=1e-12)
    assert v1 > 0 and v2 > 0  # some columns below γ: the hinge is exercised
    expected = 25.0 * s / D + 25.0 * (v1 + v2) / 2 + 1.0 * (c1 + c2)
    assert float(loss(z1, z2, w)) == pytest.approx(expected, rel=1e-12)
    other = VICRegLoss(invariance_weight=2.0, variance_weight=3.0, covariance_weight=0.5)
    assert float(other(z1, z2, w)) == pytest.approx(2.0 * s / D + 3.0 * (v1 + v2) / 2 + 0.5 * (c1 + c2), rel=1e-12)


def test_vicreg_uniform_weights_are_no_weights_and_the_loss_runs_in_float32_under_half() -> None:
    z1, z2, _ = _pair(1)
    loss = VICRegLoss()
    torch.testing.assert_close(loss(z1, z2, torch.ones(N, dtype=torch.float64)), loss(z1, z2))
    half = loss(z1.bfloat16(), z2.bfloat16())
    assert half.dtype == torch.float32
    assert float(half) == pytest.approx(float(loss(z1.bfloat16().double(), z2.bfloat16().double())), rel=1e-5)
    with pytest.raises(ValueError, match="N ≥ 2"):
        loss(z1[:1], z2[:1])


# ----------------------------------------------------------------------------------------- Barlow Twins


def _barlow_paper(a, b, w, lam):
    """Zbontar et al. 2021, eq. 1–2, in plain Python: outputs centred along the batch, C_ij = Σ_b a_bi b_bj /
    (√(Σ_b a_bi²) √(Σ_b b_bj²)), L = Σ_i (1 − C_ii)² + λ Σ_i Σ_{j≠i} C_ij². With pair weights w every sum over the
    batch is w-weighted (the mean too): the weighted correlation, which w = 1 reduces to eq. 2."""
    n, d = len(a), len(a[0])
    weights = w if w is not None else [1.0] * n
    total = sum(weights)

    def centred(z):
        means = [sum(weights[k] * z[k][j] for k in range(n)) / total for j in range(d)]
        return [[z[k][j] - means[j] for j in range(d)] for k in range(n)]

    a, b = centred(a), centred(b)
    norm_a = [math.sqrt(sum(weights[k] * a[k][i] ** 2 for k in range(n))) for i in range(d)]
    norm_b = [math.sqrt(sum(weights[k] * b[k][j] ** 2 for k in range(n))) for j in range(d)]
    c = [
        [sum(weights[k] * a[k][i] * b[k][j] for k in range(n)) / (norm_a[i] * norm_b[j]) for j in range(d)]
        for i in range(d)
    ]
    invariance = sum((1 - c[i][i]) ** 2 for i in range(d))
    redundancy = sum(c[i][j] ** 2 for i in range(d) for j in range(d) if i != j)
    return invariance, redundancy, invariance + lam * redundancy


@pytest.mark.parametrize("weighted", [False, True])
def test_barlow_twins_loss_is_the_papers_equations(weighted: bool) -> None:
    z1, z2, weight = _pair(2)
    w = weight if weighted else None
    invariance, redundancy, expected = _barlow_paper(_rows(z1), _rows(z2), None if w is None else w.tolist(), 0.005)
    exact = BarlowTwinsLoss(redundancy_weight=0.005, eps=0.0)
    parts = exact.terms(z1, z2, w)
    assert float(parts["invariance"]) == pytest.approx(invariance, rel=1e-12)
    assert float(parts["redundancy"]) == pytest.approx(redundancy, rel=1e-12)
    assert float(exact(z1, z2, w)) == pytest.approx(expected, rel=1e-12)
    # The default ε = 1e-5 (inside the root, as BatchNorm's) moves it by about ε/Var (Var ≥ 0.09 here).
    assert float(BarlowTwinsLoss(0.005)(z1, z2, w)) == pytest.approx(expected, rel=1e-3)
    if weighted:  # only the weights' ratios matter
        assert float(exact(z1, z2, 3 * w)) == pytest.approx(expected, rel=1e-12)


def test_barlow_twins_of_identical_views_has_no_invariance_term() -> None:
    z1, _, weight = _pair(3)
    for w in (None, weight):
        assert float(BarlowTwinsLoss(eps=0.0).terms(z1, z1, w)["invariance"]) == pytest.approx(0.0, abs=1e-20)


# ------------------------------------------------------------------------------------------- objectives

B, IN, FEAT, DIM = 6, 12, 8, 5


def _model(seed: int = 0, dtype=torch.float32) -> ContrastiveModel:
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(IN, FEAT), nn.ReLU())
    return ContrastiveModel(backbone, FEAT, projection_hidden=7, projection_dim=DIM).to(dtype)


def _views(seed: int, n: int = B, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 3, 4, generator=g).to(dtype), torch.randn(n, 1, 3, 4, generator=g).to(dtype)


def _batch(n: int = B, dtype=torch.float32) -> BatchTensors:
    weight = torch.linspace(0.2, 1.0, n).to(dtype)
    return BatchTensors(positive_group=torch.arange(n), weight=weight, label=torch.full((n,), -1))


def _context(model: nn.Module, gather=None) -> StepContext:
    return StepContext(step=0, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), lr=0.1, gather=gather)


@pytest.mark.parametrize(
    ("name", "options", "loss"),
    [
        ("vicreg", {}, VICRegLoss(25.0, 25.0, 1.0)),
        ("vicreg", {"vicreg_lambda": 3.0, "vicreg_mu": 4.0, "vicreg_nu": 0.5}, VICRegLoss(3.0, 4.0, 0.5)),
        ("barlow_twins", {}, BarlowTwinsLoss(0.005)),
        ("barlow_twins", {"barlow_lambda": 0.1}, BarlowTwinsLoss(0.1)),
    ],
)
def test_ivpp_objective_option_picks_the_loss_with_its_weights(name: str, options: dict, loss) -> None:
    model, (v1, v2), batch = _model(), _views(0), _batch()
    objective = make_objective("ivpp", model, objective=name, **options)
    assert objective.name == name
    got, parts = objective(model, v1, v2, batch, _context(model))
    _, z1 = model(v1)
    _, z2 = model(v2)
    torch.testing.assert_close(got, loss(z1, z2, batch.weight))
    assert set(parts) == set(loss.terms(z1, z2).keys())
    assert objective.info_nce.temperature == 0.1  # the validation loss's τ is the preset's
    assert isinstance(make_objective("ivpp", model), GroupContrastive)


# --------------------------------------------------------------------------------------------------- DDP

WORLD = 2


def _ddp_step(name: str, rows: slice, gather) -> tuple[float, list[torch.Tensor]]:
    model = _model(seed=5, dtype=torch.float64)
    objective = make_objective("ivpp", model, objective=name)
    v1, v2 = _views(6, n=8, dtype=torch.float64)
    batch = _batch(8, dtype=torch.float64)
    part = BatchTensors(positive_group=batch.positive_group[rows], weight=batch.weight[rows], label=batch.label[rows])
    loss, _ = objective(model, v1[rows], v2[rows], part, _context(model, gather))
    loss.backward()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    if gather is not None:  # DDP's gradient averaging
        for grad in grads:
            dist.all_reduce(grad)
            grad /= WORLD
    return float(loss.detach()), grads


def _worker(rank: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD)
    try:
        rows = slice(rank * 4, (rank + 1) * 4)
        results = {name: _ddp_step(name, rows, ddp.gather_with_grad) for name in ("vicreg", "barlow_twins")}
        torch.save(results, Path(tmp) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_process_step_equals_one_process_on_the_global_batch(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        for name in ("vicreg", "barlow_twins"):
            expected_loss, expected_grads = _ddp_step(name, slice(None), None)
            loss, grads = results[name]
            assert loss == pytest.approx(expected_loss, rel=1e-12)
            for got, want in zip(grads, expected_grads):
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------------- preset


def test_preset_is_the_references_ncus_simclr() -> None:
    """github.com/bvanberl/IVPP ``config.yml``: ``pretrain.hparams.ncus_simclr`` (tau 0.1, max_time_delta 1.5,
    sample_weights true), ``augment.ncus`` and ``pretrain.proj_nodes`` [768, 768] (BatchNorm, ``src/models/projectors.py``),
    ``warmup_epochs`` 2 of ``epochs`` 500; LARS 0.2 × B/256 is replaced by SimCLR's Adam 1e-3 (§5)."""
    cfg = get_method("ivpp").preset()
    options = cfg.options
    assert options.temperature == 0.1 and options.objective == "simclr"
    assert options.seconds() == 1.5 and options.weights() == "distance"
    a = cfg.augment
    assert (a.crop_scale, a.crop_ratio, a.flip_p) == ((0.4, 1.0), (0.4, 0.6), 0.5)
    assert (a.brightness, a.contrast, a.jitter_p) == (0.25, 0.25, 0.5)
    assert (a.blur_p, a.blur_sigma) == (0.25, (0.1, 2.0))
    m = cfg.model
    assert (m.projection_hidden, m.projection_dim, m.projection_batch_norm) == (768, 768, True)
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.lr_scaling, cfg.optim.weight_decay) == ("adam", 1e-3, "none", 1e-6)
    assert cfg.schedule.warmup_fraction == pytest.approx(2 / 500)
    assert cfg.schedule.min_lr == pytest.approx(1e-3 * cfg.optim.lr)  # the reference's cosine ends at 0.001 × peak


@pytest.mark.parametrize(
    ("objective", "seconds", "weights"),
    [("simclr", 1.5, "distance"), ("vicreg", 0.5, "distance"), ("barlow_twins", 3.0, "uniform")],
)
def test_delta_t_and_pair_weights_follow_the_objective_unless_set(objective, seconds, weights, phantom_store) -> None:
    videos = np.arange(phantom_store.num_videos)
    sampler = make_sampler("ivpp", phantom_store, videos, 4, seed=0, objective=objective, items="frames")
    assert sampler.delta_t == seconds and sampler.pair_weights == weights
    batch = sampler.batches(0)[0]
    assert np.all(batch.weight == 1.0) == (weights == "uniform")
    set_here = make_sampler(
        "ivpp", phantom_store, videos, 4, seed=0, objective=objective, delta_t=0.25, pair_weights="uniform"
    )
    assert set_here.delta_t == 0.25 and np.all(set_here.batches(0)[0].weight == 1.0)


def test_bad_options_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="objective must be one of simclr, vicreg, barlow_twins"):
        method_config("ivpp", options={"objective": "byol"})
    with pytest.raises(ValueError, match="pair_weights"):
        method_config("ivpp", options={"pair_weights": "inverse"})
    with pytest.raises(ValueError, match="vicreg_mu"):
        method_config("ivpp", options={"vicreg_mu": -1.0})
    with pytest.raises(ValueError, match="delta_t"):
        method_config("ivpp", options={"delta_t": 0.0})


@pytest.mark.parametrize("objective", ["simclr", "vicreg", "barlow_twins"])
def test_pretrain_ivpp_runs_two_steps_with_each_objective(objective: str, phantom_store, tmp_path: Path) -> None:
    run = tmp_path / objective
    argv = ["pretrain", "--store", str(phantom_store.root), "--method", "ivpp", "--objective", objective,
            "--out", str(run), *tiny_pretrain(*tiny_sets()), "--steps", "2"]  # fmt: skip
    assert main(argv) == 0
    rows = (run / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    steps = [dict(zip(header, row.split(","))) for row in rows[1:] if row.startswith("step")]
    assert len(steps) == 2 and all(math.isfinite(float(row["loss"])) for row in steps)
    parts = {"simclr": {"contrastive"}, "vicreg": {"invariance", "variance", "covariance"}}
    expected = {f"part_{p}" for p in parts.get(objective, {"invariance", "redundancy"})}
    assert expected <= {key for key, value in steps[0].items() if value}
    assert (run / "encoder.safetensors").is_file()
