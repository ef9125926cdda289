"""Meta-USCL's bilevel meta step (Chen et al., IEEE TMI 2023; §2.7 of docs/methods.md), written with ``torch.func``.

One meta step learns the CMW-Net parameters α so that a *virtual* SGD step of the model on the CMW-weighted
training loss lowers the *unweighted* contrastive loss on a held-out meta batch:

    w = CMW_α(h1, h2)                                            pair weights of the training batch
    g(α) = ∇_θ L_w(θ; α)                                         weighted group-InfoNCE
    θ'(α) = θ − η·(μ·m + c·(g(α) + wd·θ))                       torch SGD's update (m: momentum buffer)
    α ← Adam(∂/∂α L_meta(θ'(α)))                                 unweighted InfoNCE on the meta views

θ is a constant here (only α is learned), so the hypergradient is the directional derivative of the
training loss along the meta gradient, differentiated with respect to the weights:

    ∂L_meta/∂α = ∂/∂α [ t · ∇_θ L_w(θ; α) ],   t = −η·c·∇_θ' L_meta(θ')
               = ∂/∂α [ ∇_z L_w(z; w(α)) · ż ],  ż = (∂z/∂θ)·t   (a forward-mode JVP of the network)

Every term is exact (the test compares with the create-graph unrolled version to 1e-8 in float64), but the
second-order work is one forward-mode pass over the training batch (``torch.func.jvp``) instead of a
``create_graph`` backward plus a backward through that graph, and the only graph that depends on α is the
small one from the weights through the loss. Parameters are swapped in with ``torch.func.functional_call``;
the virtual passes get ``None`` for every buffer, so batch-norm normalises with batch statistics (as in
training mode) and the real model's running statistics are never touched by them.

Choices made explicit (the reference leaves them implicit, see quirks 16–18 and 20):
- the CMW-Net input is the *detached* backbone features of the real forward: the weights are a function of
  the pair, not a path through which θ's gradient could lower the loss by re-weighting pairs;
- the inner LR is ``inner_lr`` when given, else each parameter group's current LR of the main optimizer
  (what the reference effectively uses, since its ``--lr_meta`` is overwritten); momentum, dampening,
  Nesterov and weight decay come from the main optimizer's groups, the momentum buffers from its state;
- meta views come from the caller (a fresh meta batch each meta step), no exception is swallowed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp

LossFn = Callable[..., Tensor]
"""``loss(z1, z2, positive_group=None, weight=None) -> scalar`` (a `sonocl.losses.GroupInfoNCE`)."""


@dataclass
class MetaGradient:
    """What one meta step computed: the CMW-Net gradient (same order as ``cmw.parameters()``) and the meta loss."""

    cmw_grads: list[Tensor]
    meta_loss: Tensor


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under ``torch.compile`` (parameters are shared, names lose the ``_orig_mod.`` prefix)."""
    return getattr(model, "_orig_mod", model)


def _check_single_process(model: nn.Module) -> None:
    if isinstance(model, nn.parallel.DistributedDataParallel) or isinstance(model, nn.DataParallel):
        raise NotImplementedError(
            "meta-uscl is single-process for now: the bilevel step needs the unwrapped model; "
            "run it without torchrun / DataParallel"
        )


def virtual_sgd_coefficients(
    optimizer: torch.optim.Optimizer, params: dict[str, nn.Parameter], inner_lr: float | None
) -> dict[str, tuple[float, Tensor]]:
    """Per parameter: ``(η·c, offset)`` with ``θ' = θ − offset − η·c·g`` for torch SGD's update rule.

    ``offset`` collects what does not depend on the gradient g (weight decay and the momentum buffer), so θ'
    is affine in g. Matches ``torch.optim.SGD``: coupled weight decay d = g + wd·θ, dampening, Nesterov, and a
    fresh buffer equal to d when the optimizer has none yet.
    """
    if not isinstance(optimizer, torch.optim.SGD):
        raise TypeError(
            f"meta-uscl's virtual step follows torch.optim.SGD (the reference's MetaSGD); the main optimizer is "
            f"{type(optimizer).__name__}: use --optim sgd"
        )
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    out: dict[str, tuple[float, Tensor]] = {}
    for name, p in params.items():
        group = group_of.get(id(p))
        if group is None:
            raise ValueError(f"parameter {name} is trainable but not in the main optimizer")
        if group.get("maximize", False):
            raise ValueError("meta-uscl's virtual step does not support SGD(maximize=True)")
        lr = float(group["lr"] if inner_lr is None else inner_lr)
        mu, damp, wd, nesterov = group["momentum"], group["dampening"], group["weight_decay"], group["nesterov"]
        theta = p.detach()
        decay = wd * theta if wd else torch.zeros_like(theta)
        buf = optimizer.state.get(p, {}).get("momentum_buffer") if mu else None
        # d = g + wd·θ. No momentum: step = d. First momentum step: buf = d. Later: buf = μ·m + (1−τ_d)·d.
        # Nesterov: step = d + μ·buf. So step = c·d + rest.
        if not mu:
            c, rest = 1.0, torch.zeros_like(theta)
        elif buf is None:
            c, rest = (1.0 + mu if nesterov else 1.0), torch.zeros_like(theta)
        else:
            scale = 1.0 - damp
            c = (1.0 + mu * scale) if nesterov else scale
            rest = (mu * mu if nesterov else mu) * buf.detach()
        out[name] = (lr * c, lr * (rest + c * decay))
    return out


def _network_z(model: nn.Module, params: dict[str, Tensor], views: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """The projections z of each view with ``params`` swapped in and no buffers (batch statistics, nothing updated)."""
    no_buffers = {name: None for name, _ in model.named_buffers()}
    return tuple(functional_call(model, (params, no_buffers), (view,))[1] for view in views)


def cmw_meta_gradient(
    model: nn.Module,
    cmw: nn.Module,
    loss: LossFn,
    view1: Tensor,
    view2: Tensor,
    h1: Tensor,
    h2: Tensor,
    z1: Tensor,
    z2: Tensor,
    positive_group: Tensor | None,
    prior_weight: Tensor | None,
    meta_view1: Tensor,
    meta_view2: Tensor,
    optimizer: torch.optim.Optimizer,
    inner_lr: float | None = None,
) -> MetaGradient:
    """∂L_meta(θ'(α))/∂α for the CMW-Net, given the real forward ``(h, z)`` of ``model`` on ``view1, view2``.

    ``z1, z2`` must carry the autograd graph of that forward (the real step reuses it; it is retained here).
    Changes nothing: not the model's parameters or buffers, not the optimizer, not the CMW-Net.
    """
    _check_single_process(model)
    model = unwrap_model(model)
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    features = (h1.detach(), h2.detach())

    # Step 2: the gradient of the weighted training loss at θ (values only; the α-dependence comes later).
    with torch.no_grad():
        weight = _pair_weight(cmw, features, prior_weight)
    weighted = loss(z1, z2, positive_group=positive_group, weight=weight)
    grads = torch.autograd.grad(weighted, list(params.values()), retain_graph=True, allow_unused=True)

    # Step 3: the virtual SGD step θ' = θ − offset − η·c·g.
    coefficients = virtual_sgd_coefficients(optimizer, params, inner_lr)
    virtual = {}
    for (name, p), g in zip(params.items(), grads):
        step_size, offset = coefficients[name]
        value = p.detach() - offset
        if g is not None:
            value = value - step_size * g
        virtual[name] = value.requires_grad_()

    # Step 4: the unweighted meta loss at θ' and its gradient v = ∂L_meta/∂θ'.
    meta_z1, meta_z2 = _network_z(model, virtual, (meta_view1, meta_view2))
    meta_loss = loss(meta_z1, meta_z2)
    meta_grads = torch.autograd.grad(meta_loss, list(virtual.values()), allow_unused=True)

    # Hypergradient: tangent t = −η·c·v; ż = (∂z/∂θ)·t by forward mode; then ∂/∂α [∇_z L_w · ż].
    primals = {name: p.detach() for name, p in params.items()}
    tangents = {
        name: (torch.zeros_like(p) if v is None else -coefficients[name][0] * v.detach())
        for (name, p), v in zip(params.items(), meta_grads)
    }
    _, z_dot = jvp(lambda ps: _network_z(model, ps, (view1, view2)), (primals,), (tangents,))
    z_leaf = (z1.detach().requires_grad_(), z2.detach().requires_grad_())
    weighted_alpha = loss(*z_leaf, positive_group=positive_group, weight=_pair_weight(cmw, features, prior_weight))
    dz = torch.autograd.grad(weighted_alpha, z_leaf, create_graph=True)
    directional = sum((a * b.to(a.dtype)).sum() for a, b in zip(dz, z_dot))
    cmw_params = list(cmw.parameters())
    cmw_grads = torch.autograd.grad(directional, cmw_params, allow_unused=True)
    cmw_grads = [torch.zeros_like(p) if g is None else g for p, g in zip(cmw_params, cmw_grads)]
    return MetaGradient(cmw_grads=cmw_grads, meta_loss=meta_loss.detach())


def _pair_weight(cmw: nn.Module, features: tuple[Tensor, Tensor], prior_weight: Tensor | None) -> Tensor:
    """CMW-Net weight of each pair (times the sampler's prior weight when there is one), ``(B,)`` float32."""
    weight = cmw(features[0].to(_dtype_of(cmw)), features[1].to(_dtype_of(cmw)))
    return weight if prior_weight is None else weight * prior_weight.to(weight.dtype)


def _dtype_of(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def pair_weight(cmw: nn.Module, h1: Tensor, h2: Tensor, prior_weight: Tensor | None = None) -> Tensor:
    """Public form of the CMW-Net pair weight on detached features (the real step calls it under ``no_grad``)."""
    return _pair_weight(cmw, (h1.detach(), h2.detach()), prior_weight)


def apply_meta_gradient(cmw: nn.Module, cmw_optimizer: torch.optim.Optimizer, result: MetaGradient) -> None:
    """Step 5: one optimizer (Adam) step of the CMW-Net with the hypergradient."""
    for p, g in zip(cmw.parameters(), result.cmw_grads):
        p.grad = g.detach()
    cmw_optimizer.step()
    cmw_optimizer.zero_grad(set_to_none=True)
