"""Meta-USCL's bilevel meta step (sonocl.methods.meta_step) against a slow hand-unrolled create-graph version."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import make_objective
from sonocl.losses import GroupInfoNCE
from sonocl.methods import meta_step
from sonocl.methods.objectives import BatchTensors, StepContext
from sonocl.models import CMWNet, ContrastiveModel, build_backbone

B, IN, FEAT = 6, 12, 6


def _tiny_model() -> ContrastiveModel:
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(IN, FEAT), nn.BatchNorm1d(FEAT), nn.ReLU())
    return ContrastiveModel(backbone, FEAT, projection_hidden=5, projection_dim=4).double()


def _tiny_forward(theta: dict[str, torch.Tensor], x: torch.Tensor, running=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The tiny model written out by hand (batch-norm with batch statistics, as in training mode, or with the
    ``running`` (mean, var) statistics, as in eval mode)."""
    h = F.linear(x.flatten(1), theta["backbone.1.weight"], theta["backbone.1.bias"])
    mean, var = running if running is not None else (None, None)
    weight, bias = theta["backbone.2.weight"], theta["backbone.2.bias"]
    h = F.relu(F.batch_norm(h, mean, var, weight, bias, training=running is None))
    z = F.relu(F.linear(h, theta["projector.0.weight"], theta["projector.0.bias"]))
    return h, F.linear(z, theta["projector.2.weight"], theta["projector.2.bias"])


def _data(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    make = lambda: torch.randn(B, 1, 3, 4, generator=g, dtype=torch.float64)  # noqa: E731
    return {
        "v1": make(),
        "v2": make(),
        "m1": make(),
        "m2": make(),
        "group": torch.tensor([0, 1, 1, 2, 3, 3]),
        "meta_group": None,
        "prior": torch.rand(B, generator=g, dtype=torch.float64) + 0.5,
    }


def _optimizer(model: nn.Module, **sgd: float) -> torch.optim.SGD:
    return torch.optim.SGD(
        [{"params": model.backbone.parameters(), "lr": 0.3}, {"params": model.projector.parameters(), "lr": 0.1}], **sgd
    )


def _prime_momentum(model: nn.Module, optimizer: torch.optim.Optimizer, data: dict[str, torch.Tensor]) -> None:
    """One real SGD step so the optimizer has momentum buffers (then restore nothing: θ moved, as in training)."""
    _, z1 = model(data["m1"])
    _, z2 = model(data["m2"])
    GroupInfoNCE(0.5)(z1, z2).backward()
    optimizer.step()
    optimizer.zero_grad()


def _reference_cmw_grad(model, optimizer, cmw, loss, data, inner_lr, running=None):
    """∂L_meta/∂α by explicit parameter copies, autograd.grad(create_graph=True) and a hand-written SGD step."""
    theta = {name: p.detach().clone().requires_grad_() for name, p in model.named_parameters()}
    h1, z1 = _tiny_forward(theta, data["v1"], running)
    h2, z2 = _tiny_forward(theta, data["v2"], running)
    weight = cmw(h1.detach(), h2.detach()) * data["prior"]
    weighted = loss(z1, z2, positive_group=data["group"], weight=weight)
    grads = torch.autograd.grad(weighted, list(theta.values()), create_graph=True)
    param_of = dict(model.named_parameters())
    virtual = {}
    for (name, t), g in zip(theta.items(), grads):
        group = next(gr for gr in optimizer.param_groups if any(p is param_of[name] for p in gr["params"]))
        lr = group["lr"] if inner_lr is None else inner_lr
        mu, damp, wd, nesterov = group["momentum"], group["dampening"], group["weight_decay"], group["nesterov"]
        d = g + wd * t.detach()
        buf = optimizer.state.get(param_of[name], {}).get("momentum_buffer")
        if mu:
            buf = d if buf is None else mu * buf + (1 - damp) * d
            d = d + mu * buf if nesterov else buf
        virtual[name] = t.detach() - lr * d
    _, mz1 = _tiny_forward(virtual, data["m1"], running)
    _, mz2 = _tiny_forward(virtual, data["m2"], running)
    meta_loss = loss(mz1, mz2, positive_group=data["meta_group"])
    return torch.autograd.grad(meta_loss, list(cmw.parameters())), meta_loss


def _meta_grad(model, optimizer, cmw, loss, data, inner_lr):
    h1, z1 = model(data["v1"])
    h2, z2 = model(data["v2"])
    return meta_step.cmw_meta_gradient(
        model,
        cmw,
        loss,
        data["v1"],
        data["v2"],
        h1,
        h2,
        z1,
        z2,
        data["group"],
        data["prior"],
        data["m1"],
        data["m2"],
        optimizer,
        inner_lr,
        meta_positive_group=data["meta_group"],
    )


@pytest.mark.parametrize(
    ("sgd", "primed", "inner_lr"),
    [
        ({"momentum": 0.9, "weight_decay": 1e-2}, False, None),
        ({"momentum": 0.9, "weight_decay": 1e-2}, True, None),
        ({"momentum": 0.9, "weight_decay": 1e-2, "nesterov": True}, True, None),
        ({"momentum": 0.8, "dampening": 0.3, "weight_decay": 0.0}, True, 0.05),
        ({"momentum": 0.0, "weight_decay": 1e-3}, False, 0.2),
    ],
)
@pytest.mark.parametrize("meta_repeats", [False, True])
def test_cmw_gradient_matches_hand_unrolled(sgd, primed, inner_lr, meta_repeats) -> None:
    torch.manual_seed(0)
    model, data = _tiny_model(), _data()
    if meta_repeats:  # a meta batch larger than the held-out set: pairs of one video are positives of each other
        data["meta_group"] = torch.tensor([4, 4, 7, 9, 9, 9])
    cmw = CMWNet(FEAT, hidden_dim=10).double()
    optimizer = _optimizer(model, **sgd)
    if primed:
        _prime_momentum(model, optimizer, data)
    loss = GroupInfoNCE(0.5)
    expected, expected_meta = _reference_cmw_grad(model, optimizer, cmw, loss, data, inner_lr)
    result = _meta_grad(model, optimizer, cmw, loss, data, inner_lr)
    rtol, atol = 1e-8, 1e-10  # float64 end to end
    assert torch.allclose(result.meta_loss, expected_meta.detach(), rtol=rtol, atol=atol)
    assert any(g.abs().max() > 0 for g in expected)
    for got, want in zip(result.cmw_grads, expected):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol * max(1.0, float(want.abs().max())))


def test_non_sgd_optimizer_is_refused() -> None:
    model, data = _tiny_model(), _data()
    optimizer = torch.optim.Adam(model.parameters())
    with pytest.raises(TypeError, match="--optim sgd"):
        _meta_grad(model, optimizer, CMWNet(FEAT).double(), GroupInfoNCE(0.5), data, None)


def _batch(data: dict[str, torch.Tensor]) -> BatchTensors:
    return BatchTensors(positive_group=data["group"], weight=data["prior"].float(), label=torch.full((B,), -1))


def _context(step: int, optimizer, data, calls: list[int] | None = None) -> StepContext:
    def meta_views():
        if calls is not None:
            calls.append(step)
        return data["m1"], data["m2"], torch.arange(B)

    return StepContext(step=step, optimizer=optimizer, lr=optimizer.param_groups[0]["lr"], meta_views=meta_views)


def _objective(model: nn.Module, **options) -> nn.Module:
    objective = make_objective("meta-uscl", model, cmw_lr=1e-2, **options)
    return objective.double()


def test_meta_step_changes_no_model_state_and_real_loss_uses_updated_cmw() -> None:
    torch.manual_seed(1)
    model, data = _tiny_model(), _data(1)
    optimizer = _optimizer(model, momentum=0.9, weight_decay=1e-3)
    _prime_momentum(model, optimizer, data)
    objective = _objective(model)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers_before = {n: b.clone() for n, b in model.named_buffers()}
    momentum = {id(p): optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()}
    cmw_before = copy.deepcopy(objective.cmw)

    loss, parts = objective(model, data["v1"], data["v2"], _batch(data), _context(0, optimizer, data))

    # Parameters, momentum buffers untouched; BN statistics moved by exactly one real forward per view.
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n])
    for p in model.parameters():
        assert torch.equal(optimizer.state[p]["momentum_buffer"], momentum[id(p)])
    reference = copy.deepcopy(model)
    reference.load_state_dict({**params, **buffers_before})
    h1, z1 = reference(data["v1"])
    h2, z2 = reference(data["v2"])
    for (n, b), (_, want) in zip(model.named_buffers(), reference.named_buffers()):
        assert torch.equal(b, want), n
    # The CMW-Net moved; the loss is the InfoNCE weighted by the updated CMW-Net.
    assert any(not torch.equal(a, b) for a, b in zip(objective.cmw.parameters(), cmw_before.parameters()))
    with torch.no_grad():
        weight = objective.cmw(h1, h2) * data["prior"]
    expected = GroupInfoNCE(0.5)(z1, z2, positive_group=data["group"], weight=weight)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)  # float32 prior weights in BatchTensors
    assert set(parts) >= {"meta", "contrastive", "weight_mean"}
    # The reused forward gives the same parameter gradients as a fresh forward.
    grads = torch.autograd.grad(loss, list(model.parameters()))
    expected_grads = torch.autograd.grad(expected, list(reference.parameters()))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_cmw_update_is_adam_on_the_hypergradient() -> None:
    torch.manual_seed(2)
    model, data = _tiny_model(), _data(2)
    optimizer = _optimizer(model, momentum=0.9, weight_decay=1e-3)
    objective = _objective(model)
    shadow = copy.deepcopy(objective.cmw)
    grads, _ = _reference_cmw_grad(model, optimizer, shadow, GroupInfoNCE(0.5), data, None)
    adam = torch.optim.Adam(shadow.parameters(), lr=1e-2)
    for p, g in zip(shadow.parameters(), grads):
        p.grad = g
    adam.step()
    objective(model, data["v1"], data["v2"], _batch(data), _context(0, optimizer, data))
    for got, want in zip(objective.cmw.parameters(), shadow.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)


def test_meta_every_runs_the_meta_step_every_k_steps() -> None:
    torch.manual_seed(3)
    model, data = _tiny_model(), _data(3)
    optimizer = _optimizer(model, momentum=0.9)
    objective = _objective(model, meta_every=3)
    calls: list[int] = []
    for step in range(5):
        before = [p.clone() for p in objective.cmw.parameters()]
        loss, parts = objective(model, data["v1"], data["v2"], _batch(data), _context(step, optimizer, data, calls))
        moved = any(not torch.equal(a, b) for a, b in zip(before, objective.cmw.parameters()))
        assert moved == (step % 3 == 0) and ("meta" in parts) == (step % 3 == 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert calls == [0, 3]


def test_meta_uscl_refuses_missing_meta_views_and_wrapped_models() -> None:
    """Under torchrun the loop passes the plain module and StepContext.gather (tests/test_meta_ddp.py); a wrapper
    would hide the parameters the meta step swaps in."""
    model, data = _tiny_model(), _data()
    optimizer = _optimizer(model, momentum=0.9)
    objective = _objective(model)
    with pytest.raises(ValueError, match="meta_views"):
        objective(model, data["v1"], data["v2"], _batch(data), StepContext(step=0, optimizer=optimizer, lr=0.1))
    with pytest.raises(NotImplementedError, match="plain module"):
        _meta_grad(nn.DataParallel(model), optimizer, CMWNet(FEAT).double(), GroupInfoNCE(0.5), data, None)


def test_frozen_batch_norm_virtual_passes_use_running_statistics() -> None:
    """With model.freeze_bn the real forward normalises with running statistics; so do the virtual passes (before,
    they used batch statistics: the virtual network was not the real one)."""
    torch.manual_seed(5)
    model, data = _tiny_model(), _data(5)
    bn = model.backbone[2]
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    bn.eval()
    running = (bn.running_mean.clone(), bn.running_var.clone())
    cmw = CMWNet(FEAT, hidden_dim=10).double()
    optimizer = _optimizer(model, momentum=0.9, weight_decay=1e-2)
    _prime_momentum(model, optimizer, data)
    loss = GroupInfoNCE(0.5)
    expected, expected_meta = _reference_cmw_grad(model, optimizer, cmw, loss, data, None, running)
    batch_statistics, _ = _reference_cmw_grad(model, optimizer, cmw, loss, data, None)
    result = _meta_grad(model, optimizer, cmw, loss, data, None)
    torch.testing.assert_close(result.meta_loss, expected_meta.detach(), rtol=1e-8, atol=1e-10)
    for got, want, other in zip(result.cmw_grads, expected, batch_statistics):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10 * max(1.0, float(want.abs().max())))
        assert not torch.allclose(want, other, rtol=1e-3)  # the two normalisations do differ here
    assert torch.equal(bn.running_mean, running[0]) and torch.equal(bn.running_var, running[1])


def _conv_model() -> ContrastiveModel:
    backbone = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )
    return ContrastiveModel(backbone, 4, projection_hidden=6, projection_dim=5)


def test_meta_step_under_bf16_autocast_runs_in_float32() -> None:
    """Issue 10: the bf16 hypergradient is far off the fp32 one (benchmarks/meta_bf16.py), so under autocast the
    meta step runs in float32 on its own float32 forward; it then equals the meta step without autocast."""
    torch.manual_seed(6)
    model = _conv_model().train()
    cmw = CMWNet(4, hidden_dim=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    views = [torch.randn(8, 1, 8, 8) for _ in range(4)]
    group, prior = torch.tensor([0, 1, 2, 2, 3, 4, 5, 6]), torch.rand(8) + 0.5

    def step(autocast: bool) -> meta_step.MetaGradient:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            h1, z1 = model(views[0])
            h2, z2 = model(views[1])
            assert (z1.dtype == torch.bfloat16) == autocast
            return meta_step.cmw_meta_gradient(
                model, cmw, GroupInfoNCE(0.5), views[0], views[1], h1, h2, z1, z2, group, prior, views[2],
                views[3], optimizer, meta_positive_group=torch.arange(8),
            )  # fmt: skip

    fp32, bf16 = step(False), step(True)
    assert fp32.meta_loss.dtype == bf16.meta_loss.dtype == torch.float32
    torch.testing.assert_close(bf16.meta_loss, fp32.meta_loss, rtol=1e-6, atol=1e-7)
    for got, want in zip(bf16.cmw_grads, fp32.cmw_grads):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * max(1.0, float(want.abs().max())))


def test_meta_step_on_a_small_resnet_keeps_batchnorm_statistics() -> None:
    torch.manual_seed(4)
    model = ContrastiveModel(build_backbone("resnet18", 1), 512, projection_hidden=16, projection_dim=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    objective = make_objective("meta-uscl", model)
    views = [torch.randn(4, 1, 16, 16) for _ in range(4)]
    reference = copy.deepcopy(model)
    reference(views[0]), reference(views[1])
    batch = BatchTensors(torch.arange(4), torch.ones(4), torch.full((4,), -1))
    context = StepContext(0, optimizer, 0.1, meta_views=lambda: (views[2], views[3], torch.arange(4)))
    loss, parts = objective(model, views[0], views[1], batch, context)
    assert torch.isfinite(loss) and parts["meta"] > 0
    for (name, got), (_, want) in zip(model.named_buffers(), reference.named_buffers()):
        assert torch.equal(got, want), name


def test_lean_batch_norm_jvp_equals_torch_forward_mode() -> None:
    """The meta step's batch-norm forward-mode rule gives torch's own JVP (4-D activations, affine and not)."""
    from torch.func import jvp

    from sonocl.methods.meta_step import _BatchStatisticsNormJvp

    torch.manual_seed(0)
    x, x_t = torch.randn(6, 3, 5, 4, dtype=torch.float64), torch.randn(6, 3, 5, 4, dtype=torch.float64)
    weight, weight_t, bias, bias_t = (torch.randn(3, dtype=torch.float64) for _ in range(4))

    def normalise(x, weight, bias):
        return F.batch_norm(x, None, None, weight, bias, training=True)

    expected = jvp(normalise, (x, weight, bias), (x_t, weight_t, bias_t))
    with _BatchStatisticsNormJvp():
        lean = jvp(normalise, (x, weight, bias), (x_t, weight_t, bias_t))
    for got, want in zip(lean, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    with _BatchStatisticsNormJvp():
        _, lean_no_affine = jvp(lambda x: F.batch_norm(x, None, None, training=True), (x,), (x_t,))
    _, want_no_affine = jvp(lambda x: F.batch_norm(x, None, None, training=True), (x,), (x_t,))
    torch.testing.assert_close(lean_no_affine, want_no_affine, rtol=1e-10, atol=1e-12)
