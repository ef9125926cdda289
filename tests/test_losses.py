"""The losses against plain-Python references written from the formulas in docs/methods.md."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sonocl.losses import GroupInfoNCE, byol_loss, semi_supervised_ce


def _views(n: int = 6, d: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def ntxent_reference(z1, z2, tau=0.5):
    """USCL §1.6 NT-Xent written out: 2N anchors, positive a±N, denominator every view but a."""
    z = list(z1) + list(z2)
    n = len(z1)
    terms = []
    for a in range(2 * n):
        p = (a + n) % (2 * n)
        denominator = sum(math.exp(_cos(z[a], z[b]) / tau) for b in range(2 * n) if b != a)
        terms.append(-math.log(math.exp(_cos(z[a], z[p]) / tau) / denominator))
    return terms


def supcon_reference(z1, z2, groups, tau=0.5, base_tau=0.07):
    """AWCL §3.5 SupCon written out, with loops over anchors and positives."""
    z = list(z1) + list(z2)
    g = list(groups) + list(groups)
    terms = []
    for a in range(len(z)):
        denominator = sum(math.exp(_cos(z[a], z[b]) / tau) for b in range(len(z)) if b != a)
        positives = [p for p in range(len(z)) if p != a and g[p] == g[a]]
        total = sum(math.log(math.exp(_cos(z[a], z[p]) / tau) / denominator) for p in positives)
        terms.append(-(tau / base_tau) * total / len(positives))
    return terms


def test_unique_groups_equal_ntxent_reference():
    z1, z2 = _views()
    expected = sum(ntxent_reference(z1, z2)) / (2 * len(z1))
    loss = GroupInfoNCE(0.5)
    assert float(loss(z1, z2)) == pytest.approx(expected, rel=1e-5)
    assert float(loss(z1, z2, positive_group=torch.arange(len(z1)))) == pytest.approx(expected, rel=1e-5)


def test_groups_equal_supcon_reference_with_base_temperature():
    z1, z2 = _views(n=8)
    groups = torch.tensor([0, 1, 0, 2, 1, 0, 7, 8])
    expected = sum(supcon_reference(z1, z2, groups.tolist())) / 16
    assert float(GroupInfoNCE(0.5, base_temperature=0.07)(z1, z2, groups)) == pytest.approx(expected, rel=1e-5)


def test_weighted_loss_is_normalised_weighted_sum_of_anchor_terms():
    z1, z2 = _views(n=5)
    w = torch.tensor([0.1, 0.9, 0.5, 0.0, 2.0], dtype=torch.float64)
    terms = ntxent_reference(z1, z2)
    doubled = w.tolist() * 2
    expected = sum(wa * la for wa, la in zip(doubled, terms)) / sum(doubled)
    loss = GroupInfoNCE(0.5)
    assert float(loss(z1, z2, weight=w)) == pytest.approx(expected, rel=1e-5)
    assert float(loss(z1, z2, weight=3 * w)) == pytest.approx(expected, rel=1e-5)  # scale-free
    assert float(loss(z1, z2, weight=torch.ones(5))) == pytest.approx(float(loss(z1, z2)), rel=1e-6)


def test_weights_carry_gradient_for_the_meta_step():
    z1, z2 = _views()
    w = torch.rand(6, dtype=torch.float64, requires_grad=True)
    GroupInfoNCE()(z1, z2, weight=w).backward()
    assert w.grad is not None and torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0


def test_gathered_world_one_equals_local():
    z1, z2 = _views()
    groups = torch.tensor([0, 0, 1, 2, 3, 3])
    w = torch.rand(6, dtype=torch.float64)
    loss = GroupInfoNCE(0.5)
    for group, weight in [(None, None), (groups, None), (groups, w)]:
        local = loss(z1, z2, group, weight)
        gathered = loss(
            z1,
            z2,
            group,
            weight,
            gathered=(z1, z2, group),
            offset=0,
            weight_sum=None if weight is None else weight.sum(),
        )
        assert float(gathered) == pytest.approx(float(local), rel=1e-6)


def test_gathered_ranks_average_to_global_batch_loss():
    """Two simulated ranks over halves of a batch: the mean of their values is the one-process loss."""
    z1, z2 = _views(n=8)
    groups = torch.tensor([0, 1, 1, 2, 3, 4, 4, 0])
    w = torch.rand(8, dtype=torch.float64) + 0.1
    loss = GroupInfoNCE(0.5)
    for weight in (None, w):
        whole = loss(z1, z2, groups, weight)
        shares = [
            loss(
                z1[r * 4 : r * 4 + 4],
                z2[r * 4 : r * 4 + 4],
                groups[r * 4 : r * 4 + 4],
                None if weight is None else weight[r * 4 : r * 4 + 4],
                gathered=(z1, z2, groups),
                offset=r * 4,
                weight_sum=None if weight is None else weight.sum(),
            )
            for r in range(2)
        ]
        assert float(sum(shares) / 2) == pytest.approx(float(whole), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_give_finite_loss_and_gradients(dtype):
    z1 = (torch.randn(8, 16) * 1e-4).to(dtype).requires_grad_()
    z2 = (torch.randn(8, 16) * 1e-4).to(dtype).requires_grad_()
    value = GroupInfoNCE(0.5)(z1, z2, torch.tensor([0, 0, 1, 1, 2, 3, 4, 5]))
    value.backward()
    assert value.dtype == torch.float32 and torch.isfinite(value)
    assert torch.isfinite(z1.grad.float()).all() and torch.isfinite(z2.grad.float()).all()


def test_argument_errors_name_the_problem():
    z1, z2 = _views()
    loss = GroupInfoNCE()
    with pytest.raises(ValueError, match="z1 and z2"):
        loss(z1, z2[:3])
    with pytest.raises(ValueError, match="positive_group"):
        loss(z1, z2, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="offset"):
        loss(z1, z2, gathered=(z1, z2, None))
    with pytest.raises(ValueError, match="temperature"):
        GroupInfoNCE(0.0)


def test_semi_supervised_ce_matches_masked_cross_entropy():
    g = torch.Generator().manual_seed(1)
    l1, l2 = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    labels = torch.tensor([2, -1, 0, -1, 3, 1])
    keep = labels >= 0
    expected = F.cross_entropy(l1[keep], labels[keep]) + F.cross_entropy(l2[keep], labels[keep])
    assert float(semi_supervised_ce(l1, l2, labels)) == pytest.approx(float(expected), rel=1e-6)


def test_semi_supervised_ce_without_labels_is_zero_with_finite_gradients():
    l1 = torch.randn(4, 3, requires_grad=True)
    l2 = torch.randn(4, 3, requires_grad=True)
    value = semi_supervised_ce(l1, l2, torch.full((4,), -1))
    assert float(value.detach()) == 0.0 and value.requires_grad
    value.backward()
    assert torch.equal(l1.grad, torch.zeros_like(l1)) and torch.equal(l2.grad, torch.zeros_like(l2))


def test_byol_loss_reference_and_stop_gradient():
    p = torch.randn(5, 8, requires_grad=True)
    z = torch.randn(5, 8, requires_grad=True)
    expected = sum(2 - 2 * _cos(p[i].detach().double(), z[i].detach().double()) for i in range(5)) / 5
    value = byol_loss(p, z)
    assert float(value.detach()) == pytest.approx(expected, rel=1e-5)
    value.backward()
    assert z.grad is None and p.grad is not None
    assert float(byol_loss(p, p * 3).detach()) == pytest.approx(0.0, abs=1e-6)


def test_semi_supervised_ce_under_ddp_averages_to_the_one_process_term():
    """Two ranks holding 1 and 3 of 4 labelled items: each rank's term × its gradient weight 1/2 (DDP's average)
    sums to the one-process mean over the 4 labelled items, value and gradient, in float64."""
    g = torch.Generator().manual_seed(3)
    l1, l2 = (torch.randn(8, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    labels = torch.tensor([0, -1, -1, -1, 2, 1, -1, 0])
    one = semi_supervised_ce(l1, l2, labels)
    (expected,) = torch.autograd.grad(one, l1)
    shards = [slice(0, 4), slice(4, 8)]
    ranks = [semi_supervised_ce(l1[rows], l2[rows], labels[rows], gather=lambda _: labels) for rows in shards]
    averaged = sum(ranks) / len(ranks)
    (got,) = torch.autograd.grad(averaged, l1)
    assert averaged.item() == pytest.approx(one.item(), rel=1e-12)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-15)
    assert ranks[0].item() != pytest.approx(ranks[1].item())  # the ranks' own terms differ; only their mean is fixed
