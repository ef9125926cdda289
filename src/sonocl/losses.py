"""Contrastive and auxiliary losses of the pretraining methods.

One `GroupInfoNCE` serves SimCLR, SupCon/AWCL, USCL, Meta-USCL and IVPP (``docs/methods.md`` §1.6, §2.6,
§3.5, §4): positives are defined by index (solo-learn style), every anchor may carry a weight. `VICRegLoss` and
`BarlowTwinsLoss` are IVPP's other two objectives (§4).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _at_least_float32(tensor: Tensor) -> Tensor:
    """Half-precision projections are normalised in float32 (an fp16 eps underflows, lightly #1259); float64 stays."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


class GroupInfoNCE(nn.Module):
    """Weighted InfoNCE over 2N views with index-defined positives (SimCLR NT-Xent, SupCon/AWCL, USCL, Meta-USCL, IVPP).

    For anchor a (each of the 2N local views) with candidates C (all views, or all views of all ranks) and
    positives P(a) = its other view plus every view whose group equals a's (a itself excluded)::

        ℓ_a = −(τ/τ_b) · 1/|P(a)| · Σ_{p∈P(a)} log( exp(s_ap/τ) / Σ_{c∈C, c≠a} exp(s_ac/τ) )

    with s the cosine similarity. Unique groups (or ``positive_group=None``) give SimCLR's NT-Xent (Chen et
    al. 2020; USCL's loss, §1.6); groups give SupCon (Khosla et al. 2020) as AWCL uses it (§3.5) with the
    mask built per sample (quirk 25). The loss is Σ_a w̃_a ℓ_a with w̃ = [w; w] / Σ[w; w] (Meta-USCL §2.6,
    IVPP §4), or the mean over anchors without weights. ``base_temperature`` τ_b scales the loss by τ/τ_b
    (AWCL's reference uses τ_b = 0.07, quirk 26); None means no scaling.
    """

    def __init__(self, temperature: float = 0.5, base_temperature: float | None = None) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, not {temperature}")
        if base_temperature is not None and base_temperature <= 0:
            raise ValueError(f"base_temperature must be > 0, not {base_temperature}")
        self.temperature = temperature
        self.base_temperature = base_temperature

    def forward(
        self,
        z1: Tensor,
        z2: Tensor,
        positive_group: Tensor | None = None,
        weight: Tensor | None = None,
        gathered: tuple[Tensor, Tensor, Tensor | None] | None = None,
        offset: int | None = None,
        weight_sum: Tensor | float | None = None,
    ) -> Tensor:
        """The scalar loss of the local anchors.

        Args:
            z1, z2: ``(N, D)`` projections of the two views (any float dtype; normalised here in float32,
                as fp16 norms underflow, lightly #1259).
            positive_group: ``(N,)`` integer ids; equal ids are positives. None: only the own other view.
            weight: ``(N,)`` non-negative pair weights (each used for both anchors of its pair). None: mean.
            gathered: DDP: ``(z1_all (M, D), z2_all (M, D), group_all (M,) or None)``, every rank's
                projections (all-gathered with gradient) in rank order; the candidates are then all 2M views.
                ``group_all`` must be given exactly when ``positive_group`` is.
            offset: with ``gathered``, the row of ``z1_all`` that holds ``z1[0]`` (rank × N for equal shards).
            weight_sum: with ``gathered`` and ``weight``, Σ of the pair weights over all ranks (an all-reduce
                of ``weight.sum()``); without it each rank normalises by its own sum (exact for one rank).

        With ``gathered`` the value is this rank's share scaled so that the mean over ranks (what DDP's
        gradient averaging optimises) equals the single-process loss of the global batch.
        """
        n = _check_views(z1, z2, positive_group, weight)
        anchors = F.normalize(_at_least_float32(torch.cat([z1, z2])), dim=1)
        if gathered is None:
            candidates, candidate_group, total, offset = anchors, positive_group, n, 0
        else:
            candidates, candidate_group, total, offset = _gathered_candidates(
                gathered, z1.shape, offset, positive_group
            )

        local = torch.arange(n, device=anchors.device) + offset
        own = torch.cat([local, local + total])
        other_view = torch.cat([local + total, local])
        logits = anchors @ candidates.T / self.temperature
        is_self = torch.zeros_like(logits, dtype=torch.bool)
        is_self[torch.arange(2 * n, device=logits.device), own] = True
        log_prob = logits - torch.logsumexp(logits.masked_fill(is_self, float("-inf")), dim=1, keepdim=True)
        if positive_group is None:
            per_anchor = -log_prob.gather(1, other_view[:, None]).squeeze(1)
        else:
            assert candidate_group is not None  # given with positive_group (checked above)
            groups = torch.cat([positive_group, positive_group]).to(anchors.device)
            all_groups = torch.cat([candidate_group, candidate_group]).to(anchors.device)
            positive = (groups[:, None] == all_groups[None, :]) & ~is_self
            per_anchor = -torch.where(positive, log_prob, 0.0).sum(1) / positive.sum(1)
        if self.base_temperature is not None:
            per_anchor = per_anchor * (self.temperature / self.base_temperature)
        if weight is None:
            return per_anchor.mean()
        weight = weight.to(device=anchors.device, dtype=anchors.dtype)
        if gathered is None or weight_sum is None:
            denominator, ranks = weight.sum(), 1.0
        else:
            denominator, ranks = torch.as_tensor(weight_sum, dtype=anchors.dtype, device=anchors.device), total / n
        return (torch.cat([weight, weight]) * per_anchor).sum() / (2 * denominator) * ranks


def _check_views(z1: Tensor, z2: Tensor, positive_group: Tensor | None, weight: Tensor | None) -> int:
    """N, after checking that the two views are ``(N, D)`` and the groups and weights ``(N,)``."""
    if z1.dim() != 2 or z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must both be (N, D), got {tuple(z1.shape)} and {tuple(z2.shape)}")
    n = z1.shape[0]
    if positive_group is not None and (positive_group.shape != (n,) or positive_group.is_floating_point()):
        raise ValueError(
            f"positive_group must be an (N,) = ({n},) integer tensor, got {tuple(positive_group.shape)} {positive_group.dtype}"
        )
    if weight is not None and weight.shape != (n,):
        raise ValueError(f"weight must be (N,) = ({n},), got {tuple(weight.shape)}")
    return n


def _gathered_candidates(
    gathered: tuple[Tensor, Tensor, Tensor | None], local: torch.Size, offset: int | None, positive_group: Tensor | None
) -> tuple[Tensor, Tensor | None, int, int]:
    """DDP: the normalised candidates ``(2M, D)`` of every rank's views, their groups, M and the offset of the
    ``local`` ``(N, D)`` rows (`GroupInfoNCE.forward`'s ``gathered`` and ``offset``, checked)."""
    (n, dim), (z1_all, z2_all, candidate_group) = local, gathered
    total = z1_all.shape[0]
    if z1_all.shape != (total, dim) or z2_all.shape != z1_all.shape:
        raise ValueError(f"gathered z1/z2 must be (M, {dim}), got {tuple(z1_all.shape)} and {tuple(z2_all.shape)}")
    if offset is None or not 0 <= offset <= total - n:
        raise ValueError(f"offset must place the {n} local rows inside the {total} gathered ones, got {offset}")
    if (candidate_group is None) != (positive_group is None):
        raise ValueError("give the gathered groups exactly when positive_group is given")
    if candidate_group is not None and candidate_group.shape != (total,):
        raise ValueError(f"gathered groups must be (M,) = ({total},), got {tuple(candidate_group.shape)}")
    return F.normalize(_at_least_float32(torch.cat([z1_all, z2_all])), dim=1), candidate_group, total, offset


def semi_supervised_ce(
    logits1: Tensor, logits2: Tensor, labels: Tensor, gather: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """USCL's supervised term CE(f(z̃₁)[lab], y) + CE(f(z̃₂)[lab], y), each a mean over the labelled items (§1.6).

    ``logits*`` ``(N, C)``; ``labels`` ``(N,)`` with -1 for unlabelled items. A batch without any labelled
    item gives exactly 0 with the graph intact (the reference returns NaN, quirk 8), without a host sync.

    Under DDP (``gather``: the all-gather of every rank's equal shard) the mean is over the labelled items of the
    global batch: this rank's sum × ranks / the global count, so that the average over ranks that DDP's gradients and
    the logged loss take is the one-process term whatever the shares of labelled items the ranks hold.
    """
    if logits1.dim() != 2 or logits1.shape != logits2.shape:
        raise ValueError(f"logits must both be (N, C), got {tuple(logits1.shape)} and {tuple(logits2.shape)}")
    if labels.shape != (logits1.shape[0],) or labels.is_floating_point():
        raise ValueError(
            f"labels must be an (N,) = ({logits1.shape[0]},) integer tensor, got {tuple(labels.shape)} {labels.dtype}"
        )
    total = F.cross_entropy(logits1.float(), labels, ignore_index=-1, reduction="sum")
    total = total + F.cross_entropy(logits2.float(), labels, ignore_index=-1, reduction="sum")
    if gather is None:
        return total / (labels >= 0).sum().clamp(min=1)
    everyone = gather(labels)
    return total * (everyone.numel() // labels.numel()) / (everyone >= 0).sum().clamp(min=1)


def byol_loss(p: Tensor, z: Tensor) -> Tensor:
    """BYOL's regression loss 2 − 2·cos(p, z), mean over the batch (Grill et al. 2020).

    ``p`` ``(N, D)`` online predictions; ``z`` ``(N, D)`` target projections, detached here (the target
    network never receives this gradient). Computed in float32.
    """
    if p.dim() != 2 or p.shape != z.shape:
        raise ValueError(f"p and z must both be (N, D), got {tuple(p.shape)} and {tuple(z.shape)}")
    cosine = F.cosine_similarity(p.float(), z.detach().float(), dim=1)
    return (2 - 2 * cosine).mean()


def _off_diagonal(matrix: Tensor) -> Tensor:
    """The off-diagonal entries of a square matrix, flattened."""
    return matrix[~torch.eye(matrix.shape[0], dtype=torch.bool, device=matrix.device)]


def _check_pair(z1: Tensor, z2: Tensor, weight: Tensor | None) -> None:
    if z1.dim() != 2 or z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must both be (N, D), got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if z1.shape[0] < 2:
        raise ValueError(f"the batch statistics need N ≥ 2 pairs, got {z1.shape[0]}")
    if weight is not None and weight.shape != (z1.shape[0],):
        raise ValueError(f"weight must be (N,) = ({z1.shape[0]},), got {tuple(weight.shape)}")


class VICRegLoss(nn.Module):
    """VICReg (Bardes, Ponce, LeCun; ICLR 2022, §4.1) as IVPP's reference computes it (``docs/methods.md`` §4).

    With the paper's terms on a batch of n pairs of d-dimensional projections: S(x) = √(Var(x) + ε) (unbiased
    variance), v(Z) = 1/d Σ_j max(0, γ − S(z_j)), C(Z) the covariance matrix with 1/(n−1), c(Z) = 1/d Σ_{i≠j} C(Z)²_ij
    and s(Z, Z') = 1/n Σ_i ‖z_i − z'_i‖², the loss is::

        λ · s(Z, Z')/d  +  μ · ½[v(Z) + v(Z')]  +  ν · [c(Z) + c(Z')]

    i.e. the normalisations of VICReg's released code, which the reference follows and for which λ = μ = 25, ν = 1
    were chosen: the invariance is a mean over the n·d entries (the paper's s divided by d) and the two variance terms
    are averaged (the paper sums them). With ``weight`` w (IVPP's pair weights) the invariance is the reference's
    1/(n·d) Σ_i w_i ‖z_i − z'_i‖² (not divided by Σw); variance and covariance are unweighted, as there.
    Computed in float32 at least, outside autocast.
    """

    def __init__(
        self,
        invariance_weight: float = 25.0,
        variance_weight: float = 25.0,
        covariance_weight: float = 1.0,
        gamma: float = 1.0,
        eps: float = 1e-4,
    ) -> None:
        super().__init__()
        if min(invariance_weight, variance_weight, covariance_weight) < 0 or gamma <= 0 or eps < 0:
            raise ValueError("VICReg's weights must be ≥ 0, γ > 0 and ε ≥ 0")
        self.invariance_weight = invariance_weight
        self.variance_weight = variance_weight
        self.covariance_weight = covariance_weight
        self.gamma = gamma
        self.eps = eps

    def terms(self, z1: Tensor, z2: Tensor, weight: Tensor | None = None) -> dict[str, Tensor]:
        """The three terms before λ, μ, ν: ``invariance`` (s/d), ``variance`` (½[v(Z) + v(Z')]) and
        ``covariance`` (c(Z) + c(Z')), of ``z1``, ``z2`` ``(N, D)`` and the optional pair weights ``(N,)``."""
        _check_pair(z1, z2, weight)
        with torch.autocast(z1.device.type, enabled=False):
            z1, z2 = _at_least_float32(z1), _at_least_float32(z2)
            squared = (z1 - z2).square()
            if weight is not None:
                squared = squared * weight.to(device=z1.device, dtype=z1.dtype)[:, None]
            invariance = squared.mean()
            n, d = z1.shape
            variance = z1.new_zeros(())
            covariance = z1.new_zeros(())
            for z in (z1, z2):
                centred = z - z.mean(dim=0)
                std = torch.sqrt(centred.var(dim=0) + self.eps)
                variance = variance + F.relu(self.gamma - std).mean() / 2
                cov = centred.T @ centred / (n - 1)
                covariance = covariance + _off_diagonal(cov).square().sum() / d
        return {"invariance": invariance, "variance": variance, "covariance": covariance}

    def total(self, parts: dict[str, Tensor]) -> Tensor:
        """λ·invariance + μ·variance + ν·covariance of `terms`."""
        return (
            self.invariance_weight * parts["invariance"]
            + self.variance_weight * parts["variance"]
            + self.covariance_weight * parts["covariance"]
        )

    def forward(self, z1: Tensor, z2: Tensor, weight: Tensor | None = None) -> Tensor:
        return self.total(self.terms(z1, z2, weight))


class BarlowTwinsLoss(nn.Module):
    """Barlow Twins (Zbontar, Jing, Misra, LeCun, Deny; ICML 2021, eq. 1–2) for IVPP (``docs/methods.md`` §4).

    Each projection dimension is standardised over the batch (mean 0, biased variance 1: the paper's batch-centred
    cosine of eq. 2, its code's affine-free BatchNorm, ε = 1e-5 inside the root), C = z̃₁ᵀ z̃₂ / n is the
    cross-correlation matrix, and the loss is Σ_i (1 − C_ii)² + λ Σ_{i≠j} C_ij². With ``weight`` w the mean,
    variance and C are all w-weighted averages over the batch (a weighted correlation, which w = 1 reduces to the
    paper's); IVPP's reference weights only the mean and variance (``docs/methods.md`` §4 says why not here).
    Computed in float32 at least, outside autocast.
    """

    def __init__(self, redundancy_weight: float = 0.005, eps: float = 1e-5) -> None:
        super().__init__()
        if redundancy_weight < 0 or eps < 0:
            raise ValueError(f"Barlow Twins needs λ ≥ 0 and ε ≥ 0, not {redundancy_weight} and {eps}")
        self.redundancy_weight = redundancy_weight
        self.eps = eps

    def terms(self, z1: Tensor, z2: Tensor, weight: Tensor | None = None) -> dict[str, Tensor]:
        """``invariance`` Σ_i (1 − C_ii)² and ``redundancy`` Σ_{i≠j} C_ij² of ``z1``, ``z2`` ``(N, D)``."""
        _check_pair(z1, z2, weight)
        with torch.autocast(z1.device.type, enabled=False):
            z1, z2 = _at_least_float32(z1), _at_least_float32(z2)
            if weight is None:
                share = torch.full((z1.shape[0],), 1.0 / z1.shape[0], dtype=z1.dtype, device=z1.device)
            else:
                weight = weight.to(device=z1.device, dtype=z1.dtype)
                share = weight / weight.sum()

            def standardised(z: Tensor) -> Tensor:
                centred = z - share @ z
                return centred / torch.sqrt(share @ centred.square() + self.eps)

            c = standardised(z1).T @ (share[:, None] * standardised(z2))
        return {"invariance": (1 - torch.diagonal(c)).square().sum(), "redundancy": _off_diagonal(c).square().sum()}

    def total(self, parts: dict[str, Tensor]) -> Tensor:
        """invariance + λ·redundancy of `terms`."""
        return parts["invariance"] + self.redundancy_weight * parts["redundancy"]

    def forward(self, z1: Tensor, z2: Tensor, weight: Tensor | None = None) -> Tensor:
        return self.total(self.terms(z1, z2, weight))
