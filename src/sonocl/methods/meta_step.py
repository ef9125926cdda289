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
the virtual passes normalise as the real forward does and touch no running statistics: batch-norm in training
mode gets ``None`` buffers (batch statistics), batch-norm in eval mode (``model.freeze_bn``) keeps its running
statistics (read only). Before, every virtual pass used batch statistics, so with ``freeze_bn`` the virtual
network was not the real one.

DDP (torchrun, ``gather`` given; no wrapper, the loop averages gradients itself): rank r holds shard r of the
training batch and of the meta batch, and the step is the one-process step on the global batches. The detached
features, groups and prior weights of every rank are gathered (the pair weights of all pairs normalise the loss);
g is the real step's convention, each rank's share of the gathered loss back-propagated through
``gather_with_grad`` and averaged over ranks, so every rank has the same g and the same θ'; the meta loss is the
InfoNCE over the gathered meta batch and v its gradient averaged likewise; ż_r is the JVP of the local views only;
the hypergradient Σ_r ∂/∂α [∇_{z_r} L_w(z_all; w_all(α)) · ż_r] is one term per rank (the loss over the gathered
z, as leaves), summed by an all-reduce, so Adam moves the CMW-Net the same on every rank (it starts the same:
``MetaUSCL`` broadcasts it from rank 0). Batch-norm in training mode then uses per-rank batch statistics, as the
real forward does; ``--sync-bn`` in training mode is refused (no synchronised forward-mode batch-norm here).

Under autocast (``--precision bf16`` / ``fp16``) the step runs in float32: autocast off, its own float32 forward
of the training views (the real forward's ``h, z`` are in the autocast dtype), meta views cast to float32. The
bf16 hypergradient is not usable: against float32 on a ResNet-18 at 32 px, batch 16, its cosine similarity is
0.25–0.51 and its relative L2 error 0.92–1.23 (three seeds, ``benchmarks/meta_bf16.py``). The fp32 path is
unchanged (no extra pass).

Cost (benchmarks/meta_step_cost.py): the real forward, g's backward, the meta forward and backward, the JVP and
the real backward are all needed; what is trimmed is the number of passes over tensors, which on a shared
CPU is what a step costs (each pass is a synchronised parallel region): batch-norm's forward-mode derivative
uses a lean formula (`_BatchNormBatchStats`, 5 passes instead of torch's ~20) and the virtual step is 2–3
fused passes per parameter. Measured and not taken: the literal create-graph double backward (slower, its
batch-norm double backward is heavier than the JVP) and one backward for g and the real step (the real
step's weights come from the CMW-Net *after* the update that needs g, so the two cannot share a pass).

Where sonocl departs from the reference (``train.py::train_step`` of Meta-USCL) or makes explicit what it leaves
implicit (quirks 16–18 and 20):
- the CMW-Net input is the *detached* backbone features, in the virtual step as in the real one. The reference
  computes the real step's weights under ``no_grad`` (detached in effect) but feeds the meta model's features to
  the CMW-Net undetached in the virtual step, so there its g also holds θ's path through the pair weights. sonocl
  detaches both, so that the weights are a function of the pair and never a path through which θ's gradient could
  lower the loss by re-weighting pairs; the effect of this departure on results has not been measured;
- the inner LR is ``inner_lr`` when given, else each parameter group's current LR of the main optimizer
  (what the reference effectively uses, since its ``--lr_meta`` is overwritten); momentum, dampening,
  Nesterov and weight decay come from the main optimizer's groups, the momentum buffers from its state;
- meta views come from the caller (a fresh meta batch each meta step), no exception is swallowed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

LossFn = Callable[..., Tensor]
"""``loss(z1, z2, positive_group=None, weight=None) -> scalar`` (a `sonocl.losses.GroupInfoNCE`)."""


@dataclass
class MetaGradient:
    """What one meta step computed: the CMW-Net gradient (same order as ``cmw.parameters()``) and the meta loss
    (under DDP, both of the global batches and the same on every rank)."""

    cmw_grads: list[Tensor]
    meta_loss: Tensor


def _check_plain_module(model: nn.Module) -> None:
    """The meta step swaps parameters into the plain module; DDP runs pass ``gather`` instead of a wrapper."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        raise NotImplementedError(
            "meta-uscl's bilevel step needs the plain module, not a DistributedDataParallel / DataParallel wrapper: "
            "under torchrun the training loop averages gradients itself and passes the gather (StepContext.gather)"
        )
    if any(isinstance(m, nn.SyncBatchNorm) and m.training for m in model.modules()):
        raise NotImplementedError(
            "meta-uscl with --sync-bn: the virtual passes normalise with per-rank batch statistics and have no "
            "synchronised forward-mode batch-norm; use per-rank batch-norm or model.freeze_bn"
        )


@dataclass(frozen=True)
class VirtualStep:
    """torch SGD's update of one parameter written affine in its gradient g: ``θ' = θ − lr·(c·(g + wd·θ) + r·m)``.

    Scalars rather than precomputed tensors so that the virtual step is two or three fused passes per
    parameter (each pass is a synchronised parallel region on a shared CPU, so their number matters).
    """

    lr: float
    c: float
    """Gradient coefficient: 1, 1 + μ (Nesterov, first step), 1 − τ_d (later steps), 1 + μ(1 − τ_d) (Nesterov)."""
    weight_decay: float
    buffer_coefficient: float
    """r: μ (μ² with Nesterov) once the optimizer has a momentum buffer m, else 0."""
    buffer: Tensor | None

    @property
    def gradient_scale(self) -> float:
        """∂θ'/∂g = −lr·c (the tangent of the hypergradient is this times ∂L_meta/∂θ')."""
        return -self.lr * self.c

    def apply(self, theta: Tensor, grad: Tensor | None) -> Tensor:
        """θ' for the detached parameter ``theta`` and its gradient ``grad`` (None: unused, g = 0)."""
        if grad is None:
            d = theta * self.weight_decay
        elif self.weight_decay:
            d = grad.add(theta, alpha=self.weight_decay)
        else:
            d = grad
        value = theta.add(d, alpha=self.gradient_scale)
        if self.buffer is not None and self.buffer_coefficient:
            value.add_(self.buffer, alpha=-self.lr * self.buffer_coefficient)
        return value


def virtual_sgd_steps(
    optimizer: torch.optim.Optimizer, params: Mapping[str, Tensor], inner_lr: float | None
) -> dict[str, VirtualStep]:
    """Per parameter, the `VirtualStep` that ``torch.optim.SGD`` would take from its current state.

    Matches ``torch.optim.SGD``: coupled weight decay d = g + wd·θ, dampening, Nesterov, and a fresh buffer
    equal to d when the optimizer has none yet.
    """
    if not isinstance(optimizer, torch.optim.SGD):
        raise TypeError(
            f"meta-uscl's virtual step follows torch.optim.SGD (the reference's MetaSGD); the main optimizer is "
            f"{type(optimizer).__name__}: use --optim sgd"
        )
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    out: dict[str, VirtualStep] = {}
    for name, p in params.items():
        group = group_of.get(id(p))
        if group is None:
            raise ValueError(f"parameter {name} is trainable but not in the main optimizer")
        if group.get("maximize", False):
            raise ValueError("meta-uscl's virtual step does not support SGD(maximize=True)")
        lr = float(group["lr"] if inner_lr is None else inner_lr)
        mu, damp, wd, nesterov = group["momentum"], group["dampening"], group["weight_decay"], group["nesterov"]
        buf = optimizer.state.get(p, {}).get("momentum_buffer") if mu else None
        # No momentum: step = d. First momentum step: buf = d. Later: buf = μ·m + (1−τ_d)·d.
        # Nesterov: step = d + μ·buf. So step = c·d + r·m.
        if not mu:
            c, r = 1.0, 0.0
        elif buf is None:
            c, r = (1.0 + mu if nesterov else 1.0), 0.0
        else:
            scale = 1.0 - damp
            c = (1.0 + mu * scale) if nesterov else scale
            r = mu * mu if nesterov else mu
        out[name] = VirtualStep(lr, c, float(wd), r, None if buf is None else buf.detach())
    return out


class _BatchNormBatchStats(torch.autograd.Function):
    """Batch-norm with batch statistics (training mode, no running buffers) and a lean forward-mode derivative.

    torch's generic forward-AD formula for batch-norm takes ~20 passes over the activation; this one takes
    five, from x̂ and 1/σ kept by the forward: with s = γ/σ, x̂_t = (x_t − mean(x_t) − x̂·mean(x̂·x_t))/σ, so
    y_t = s·x_t + (γ_t − s·mean(x̂·x_t))·x̂ + (β_t − s·mean(x_t)). Only the JVP of the virtual pass uses it
    (no backward: its primals are detached).
    """

    @staticmethod
    def forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
        var, mean = torch.var_mean(x, dim=_channel_reduction_dims(x), correction=0, keepdim=True)
        invstd = (var + eps).rsqrt_()
        x_hat = (x - mean).mul_(invstd)
        y = x_hat if weight is None else x_hat * weight.view(invstd.shape)
        return (y if bias is None else y + bias.view(invstd.shape)), x_hat, invstd

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, x_hat, invstd = output
        ctx.mark_non_differentiable(x_hat, invstd)
        ctx.save_for_forward(x_hat, invstd, inputs[1])

    @staticmethod
    def jvp(
        ctx, x_t: Tensor | None, weight_t: Tensor | None, bias_t: Tensor | None, _eps_t: None
    ) -> tuple[Tensor, None, None]:
        x_hat, invstd, weight = ctx.saved_tensors
        shape, dims = invstd.shape, _channel_reduction_dims(x_hat)
        scale = invstd if weight is None else invstd * weight.view(shape)
        coefficient = torch.zeros_like(invstd) if weight_t is None else weight_t.view(shape).clone()
        shift = torch.zeros_like(invstd) if bias_t is None else bias_t.view(shape).clone()
        if x_t is not None:
            coefficient -= scale * (x_hat * x_t).mean(dims, keepdim=True)
            shift -= scale * x_t.mean(dims, keepdim=True)
        y_t = torch.addcmul(shift, x_hat, coefficient)
        return (y_t if x_t is None else y_t.addcmul_(x_t, scale)), None, None


def _channel_reduction_dims(x: Tensor) -> list[int]:
    """Every dimension but the channels (dim 1): batch-norm's statistics are per channel."""
    return [0, *range(2, x.dim())]


class _BatchStatisticsNormJvp(TorchFunctionMode):
    """Within the block, ``F.batch_norm`` without running buffers (the virtual passes) uses `_BatchNormBatchStats`.

    The JVP's cost on a shared CPU is dominated by the number of passes over activations (each a synchronised
    parallel region), and batch-norm's generic forward-mode formula is most of them. Any other call, or
    batch-norm with running statistics, runs unchanged.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm:
            return _batch_norm(func, *args, **kwargs)
        return func(*args, **kwargs)


def _batch_norm(
    default: Callable[..., Tensor],
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """``F.batch_norm``'s signature: batch statistics without buffers go to `_BatchNormBatchStats`."""
    if running_mean is None and running_var is None:
        return _BatchNormBatchStats.apply(input, weight, bias, eps)[0]
    return default(input, running_mean, running_var, weight, bias, training, momentum, eps)


def _virtual_buffers(model: nn.Module) -> dict[str, None]:
    """The buffers the virtual passes replace by None: those of modules in training mode.

    Batch-norm in training mode then normalises with batch statistics, as the real forward does, and updates
    nothing; batch-norm in eval mode (``model.freeze_bn``) keeps its running statistics and normalises with
    them, as the real forward does then (read only: eval mode never updates them).
    """
    return {
        f"{prefix}.{name}" if prefix else name: None
        for prefix, module in model.named_modules()
        if module.training
        for name, _ in module.named_buffers(recurse=False)
    }


def _network_z(model: nn.Module, params: dict[str, Tensor], views: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """The projections z of each view with ``params`` swapped in, normalised as the real forward (nothing updated)."""
    buffers = _virtual_buffers(model)
    return tuple(_virtual_forward(model, params, buffers, view)[1] for view in views)


def _virtual_forward(
    model: nn.Module, params: dict[str, Tensor], buffers: dict[str, None], view: Tensor
) -> tuple[Tensor, Tensor]:
    """The model's ``(h, z)`` of ``view`` with ``params`` and the ``buffers`` of `_virtual_buffers` swapped in."""
    # functional_call's annotation allows only tensors as values; a None buffer is swapped in as None all the same
    return functional_call(model, (params, buffers), (view,))  # type: ignore[arg-type]


@dataclass(frozen=True)
class _Shards:
    """DDP: where this rank's shard sits in the gathered batches, and the collectives of the meta step."""

    gather: Callable[[Tensor], Tensor]
    """`sonocl.train.distributed.gather_with_grad` (the loop's ``StepContext.gather``)."""
    rank: int
    world_size: int

    def rows(self, local: int) -> slice:
        return slice(self.rank * local, (self.rank + 1) * local)

    @torch.no_grad()
    def all_reduce(self, tensors: list[Tensor], mean: bool) -> list[Tensor]:
        """The sum (or mean) over ranks of each detached tensor, with one flat all-reduce; identical on every rank."""
        flat = torch.cat([t.detach().reshape(-1).to(tensors[0].dtype) for t in tensors])
        dist.all_reduce(flat)
        if mean:
            flat /= self.world_size
        out, offset = [], 0
        for t in tensors:  # narrow, not split: the views are modified in place later (the tangents)
            out.append(flat.narrow(0, offset, t.numel()).view(t.shape).to(t.dtype))
            offset += t.numel()
        return out


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
    meta_positive_group: Tensor | None = None,
    gather: Callable[[Tensor], Tensor] | None = None,
) -> MetaGradient:
    """∂L_meta(θ'(α))/∂α for the CMW-Net, given the real forward ``(h, z)`` of ``model`` on ``view1, view2``.

    ``z1, z2`` must carry the autograd graph of that forward (the real step reuses it; it is retained here).
    ``meta_positive_group`` marks meta pairs of one video as positives of each other (a meta batch larger than the
    held-out set repeats videos). Changes nothing: not the model's parameters or buffers, not the optimizer, not the
    CMW-Net.

    ``gather`` (DDP: the loop's ``StepContext.gather``, every rank calling with its shard of the training and meta
    batches, equal shards): the step of one process on the gathered global batches, the same CMW-Net gradient on
    every rank, and ``meta_loss`` the meta loss of the global meta batch. Under autocast the step runs in float32
    with its own float32 forward of the training views (the given ``h, z`` are not used; see the module docstring).
    """
    _check_plain_module(model)
    params: dict[str, Tensor] = {name: p for name, p in model.named_parameters() if p.requires_grad}
    shards = None if gather is None else _Shards(gather, dist.get_rank(), dist.get_world_size())
    device_type = view1.device.type
    if not torch.is_autocast_enabled(device_type):
        return _meta_gradient(
            model, params, cmw, loss, (view1, view2), (h1, h2), (z1, z2), positive_group, prior_weight,
            (meta_view1, meta_view2), optimizer, inner_lr, meta_positive_group, shards,
        )  # fmt: skip
    with torch.autocast(device_type, enabled=False):
        views = (view1.float(), view2.float())
        buffers = _virtual_buffers(model)
        (h1, z1), (h2, z2) = (_virtual_forward(model, params, buffers, view) for view in views)
        return _meta_gradient(
            model, params, cmw, loss, views, (h1, h2), (z1, z2), positive_group, prior_weight,
            (meta_view1.float(), meta_view2.float()), optimizer, inner_lr, meta_positive_group, shards,
        )  # fmt: skip


def _meta_gradient(
    model: nn.Module,
    params: Mapping[str, Tensor],
    cmw: nn.Module,
    loss: LossFn,
    views: tuple[Tensor, Tensor],
    h: tuple[Tensor, Tensor],
    z: tuple[Tensor, Tensor],
    positive_group: Tensor | None,
    prior_weight: Tensor | None,
    meta_views: tuple[Tensor, Tensor],
    optimizer: torch.optim.Optimizer,
    inner_lr: float | None,
    meta_positive_group: Tensor | None,
    shards: _Shards | None,
) -> MetaGradient:
    """`cmw_meta_gradient` in the dtype it is given (steps as in the module docstring)."""
    pairs = _TrainingPairs.of(h, z, positive_group, prior_weight, shards)

    # Step 2: the gradient of the weighted training loss at θ (values only; the α-dependence comes later).
    grads = _weighted_gradient(loss, cmw, pairs, params, shards)

    # Step 3: the virtual SGD step θ' = θ − lr·(c·(g + wd·θ) + r·m), the same on every rank.
    steps = virtual_sgd_steps(optimizer, params, inner_lr)
    with torch.no_grad():
        virtual = {
            name: steps[name].apply(p.detach(), g).requires_grad_() for (name, p), g in zip(params.items(), grads)
        }

    # Step 4: the unweighted meta loss at θ' and its gradient v = ∂L_meta/∂θ'.
    meta_grads, meta_loss = _meta_loss_gradient(model, loss, virtual, meta_views, meta_positive_group, shards)

    # Hypergradient: tangent t = −lr·c·v; ż = (∂z/∂θ)·t by forward mode; then ∂/∂α [∇_z L_w · ż].
    tangents = {
        name: torch.zeros_like(p) if v is None else v.mul_(steps[name].gradient_scale)
        for (name, p), v in zip(params.items(), meta_grads)
    }
    cmw_grads = _cmw_hypergradient(model, cmw, loss, params, tangents, views, pairs, shards)
    return MetaGradient(cmw_grads=cmw_grads, meta_loss=meta_loss.detach())


@dataclass(frozen=True)
class _TrainingPairs:
    """The real forward's pairs: this rank's ``z`` and groups, and what every rank's pairs weigh the loss with."""

    z: tuple[Tensor, Tensor]
    positive_group: Tensor | None
    all_features: tuple[Tensor, Tensor]
    """Detached backbone features of every pair of the global batch (the CMW-Net's input)."""
    all_group: Tensor | None
    all_prior: Tensor | None
    z_all: tuple[Tensor, Tensor]
    """The projections of every pair of the global batch (DDP: gathered; one process: ``z``)."""
    rows: slice = field(default_factory=lambda: slice(None))
    """Where this rank's pairs sit in the global batch."""

    @classmethod
    def of(
        cls,
        h: tuple[Tensor, Tensor],
        z: tuple[Tensor, Tensor],
        positive_group: Tensor | None,
        prior_weight: Tensor | None,
        shards: _Shards | None,
    ) -> _TrainingPairs:
        features = (h[0].detach(), h[1].detach())
        if shards is None:
            return cls(z, positive_group, features, positive_group, prior_weight, z)
        # the pair weights of every rank's pairs: the loss is normalised over them and weighs them all
        return cls(
            z, positive_group, (shards.gather(features[0]), shards.gather(features[1])),
            None if positive_group is None else shards.gather(positive_group),
            None if prior_weight is None else shards.gather(prior_weight.detach()),
            (shards.gather(z[0]), shards.gather(z[1])), shards.rows(z[0].shape[0]),
        )  # fmt: skip


def _weighted_gradient(
    loss: LossFn, cmw: nn.Module, pairs: _TrainingPairs, params: Mapping[str, Tensor], shards: _Shards | None
) -> Sequence[Tensor | None]:
    """g = ∇_θ L_w at θ with the current CMW-Net weights; under DDP the mean over ranks (the real step's rule)."""
    with torch.no_grad():
        weight = _pair_weight(cmw, pairs.all_features, pairs.all_prior)
    if shards is None:
        weighted = loss(*pairs.z, positive_group=pairs.positive_group, weight=weight)
    else:  # this rank's share, as the real step's loss: the mean over ranks of the gradients is the global one
        weighted = loss(
            *pairs.z, positive_group=pairs.positive_group, weight=weight[pairs.rows],
            gathered=(*pairs.z_all, pairs.all_group), offset=pairs.rows.start, weight_sum=weight.sum(),
        )  # fmt: skip
    grads = torch.autograd.grad(weighted, list(params.values()), retain_graph=True, allow_unused=True)
    if shards is None:
        return list(grads)
    return shards.all_reduce([torch.zeros_like(p) if g is None else g for p, g in zip(params.values(), grads)], True)


def _meta_loss_gradient(
    model: nn.Module,
    loss: LossFn,
    virtual: dict[str, Tensor],
    meta_views: tuple[Tensor, Tensor],
    meta_positive_group: Tensor | None,
    shards: _Shards | None,
) -> tuple[Sequence[Tensor | None], Tensor]:
    """v = ∂L_meta/∂θ' and L_meta: the unweighted InfoNCE of the (global) meta batch at the virtual parameters."""
    meta_z = _network_z(model, virtual, meta_views)
    if shards is None:
        meta_loss = loss(*meta_z, positive_group=meta_positive_group)
        return list(torch.autograd.grad(meta_loss, list(virtual.values()), allow_unused=True)), meta_loss
    meta_group_all = None if meta_positive_group is None else shards.gather(meta_positive_group)
    meta_loss = loss(
        *meta_z, positive_group=meta_positive_group,
        gathered=(shards.gather(meta_z[0]), shards.gather(meta_z[1]), meta_group_all),
        offset=shards.rank * meta_z[0].shape[0],
    )  # fmt: skip
    local_grads = torch.autograd.grad(meta_loss, list(virtual.values()), allow_unused=True)
    *meta_grads, meta_loss = shards.all_reduce(
        [*(torch.zeros_like(p) if v is None else v for p, v in zip(virtual.values(), local_grads)), meta_loss],
        mean=True,
    )
    return meta_grads, meta_loss


def _cmw_hypergradient(
    model: nn.Module,
    cmw: nn.Module,
    loss: LossFn,
    params: Mapping[str, Tensor],
    tangents: dict[str, Tensor],
    views: tuple[Tensor, Tensor],
    pairs: _TrainingPairs,
    shards: _Shards | None,
) -> list[Tensor]:
    """∂/∂α [∇_z L_w(α) · ż] with ż = (∂z/∂θ)·t by forward mode; under DDP the sum of every rank's term."""
    primals = {name: p.detach() for name, p in params.items()}
    # Attention (a ViT) in its math form: the fused CPU and CUDA kernels have no forward-mode derivative.
    with _BatchStatisticsNormJvp(), sdpa_kernel(SDPBackend.MATH):
        z_dot = jvp(lambda ps: _network_z(model, ps, views), (primals,), (tangents,))[1]
    alpha_weight = _pair_weight(cmw, pairs.all_features, pairs.all_prior)
    if shards is None:
        z_leaf = (pairs.z[0].detach().requires_grad_(), pairs.z[1].detach().requires_grad_())
        weighted_alpha = loss(*z_leaf, positive_group=pairs.positive_group, weight=alpha_weight)
        dz: Sequence[Tensor] = torch.autograd.grad(weighted_alpha, z_leaf, create_graph=True)
    else:  # this rank's term Σ ∇_{z_r} L_w(z_all; w_all(α)) · ż_r of the global directional derivative
        z_leaf = (pairs.z_all[0].detach().requires_grad_(), pairs.z_all[1].detach().requires_grad_())
        weighted_alpha = loss(*z_leaf, positive_group=pairs.all_group, weight=alpha_weight)
        dz = [d[pairs.rows] for d in torch.autograd.grad(weighted_alpha, z_leaf, create_graph=True)]
    directional = sum((a * b.to(a.dtype)).sum() for a, b in zip(dz, z_dot))
    cmw_params = list(cmw.parameters())
    grads = torch.autograd.grad(directional, cmw_params, allow_unused=True)
    cmw_grads = [torch.zeros_like(p) if g is None else g for p, g in zip(cmw_params, grads)]
    return cmw_grads if shards is None else shards.all_reduce(cmw_grads, mean=False)


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
