"""Per-method objectives (sonocl.methods.objectives) against hand-written references, and exact state round trips."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import make_objective
from sonocl.losses import GroupInfoNCE, semi_supervised_ce
from sonocl.methods.objectives import BatchTensors, StepContext
from sonocl.models import ContrastiveModel

B, IN, FEAT, DIM = 6, 12, 6, 4


def _model(num_classes: int = 0, predictor_hidden: int = 0, seed: int = 0) -> ContrastiveModel:
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(IN, FEAT), nn.BatchNorm1d(FEAT), nn.ReLU())
    return ContrastiveModel(
        backbone,
        FEAT,
        projection_hidden=5,
        projection_dim=DIM,
        num_classes=num_classes,
        predictor_hidden=predictor_hidden,
    )


def _views(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 1, 3, 4, generator=g), torch.randn(B, 1, 3, 4, generator=g)


def _batch() -> BatchTensors:
    return BatchTensors(
        positive_group=torch.tensor([0, 1, 1, 2, 3, 3]),
        weight=torch.tensor([1.0, 0.5, 0.75, 1.0, 0.25, 0.6]),
        label=torch.tensor([-1, 2, 0, -1, 1, 1]),
    )


def _context(optimizer: torch.optim.Optimizer, step: int = 0, seed: int = 100) -> StepContext:
    return StepContext(
        step=step,
        optimizer=optimizer,
        lr=optimizer.param_groups[0]["lr"],
        meta_views=lambda: (*_views(seed + step), torch.arange(B)),
    )


def _normalise(v: list[float]) -> list[float]:
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


@pytest.mark.parametrize("method", ["simclr", "awcl", "ivpp"])
def test_group_methods_are_weighted_group_infonce(method: str) -> None:
    model, (v1, v2), batch = _model(), _views(0), _batch()
    reference = copy.deepcopy(model)
    objective = make_objective(method, model, temperature=0.3)
    loss, parts = objective(model, v1, v2, batch, _context(torch.optim.SGD(model.parameters(), lr=0.1)))
    _, z1 = reference(v1)
    _, z2 = reference(v2)
    base_temperature = 0.07 if method == "awcl" else None  # AWCL's preset keeps the reference's τ_b
    expected = GroupInfoNCE(0.3, base_temperature)(z1, z2, positive_group=batch.positive_group, weight=batch.weight)
    torch.testing.assert_close(loss, expected)
    assert parts == {"contrastive": pytest.approx(float(expected.detach()))}


def test_uscl_adds_the_semi_supervised_term_with_one_forward_per_view() -> None:
    model, (v1, v2), batch = _model(num_classes=3), _views(1), _batch()
    reference = copy.deepcopy(model)
    calls = []
    model.backbone.register_forward_hook(lambda *_: calls.append(1))
    objective = make_objective("uscl", model, semi_weight=0.2)
    loss, parts = objective(model, v1, v2, batch, _context(torch.optim.SGD(model.parameters(), lr=0.1)))
    assert len(calls) == 2
    _, z1 = reference(v1)
    _, z2 = reference(v2)
    contrastive = GroupInfoNCE(0.5)(z1, z2, positive_group=batch.positive_group, weight=batch.weight)
    semi = semi_supervised_ce(reference.classifier(z1), reference.classifier(z2), batch.label)
    torch.testing.assert_close(loss, contrastive + 0.2 * semi)
    assert parts["semi_supervised"] == pytest.approx(semi.item()) and semi.item() > 0
    unlabelled = BatchTensors(batch.positive_group, batch.weight, torch.full((B,), -1))
    loss, parts = objective(model, v1, v2, unlabelled, _context(torch.optim.SGD(model.parameters(), lr=0.1)))
    assert torch.isfinite(loss) and parts["semi_supervised"] == 0.0


def _plain_moco_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, tau: float) -> float:
    total = 0.0
    for qi, ki in zip(q.tolist(), k.tolist()):
        qi, ki = _normalise(qi), _normalise(ki)
        logits = [_dot(qi, ki) / tau] + [_dot(qi, kj) / tau for kj in queue.tolist()]
        total += -logits[0] + math.log(sum(math.exp(x) for x in logits))
    return total / len(q)


def test_moco_queue_infonce_key_encoder_and_queue_update() -> None:
    """The symmetric form without Shuffle-BN (sonocl's MoCo before 2026-12-03; v2's own is in tests/test_moco.py)."""
    model, (v1, v2) = _model(), _views(2)
    online = copy.deepcopy(model)
    objective = make_objective("moco", model, queue_size=16, ema_start=0.9, loss="symmetric", shuffle_bn_groups=1)
    key = copy.deepcopy(objective.key_encoder)
    queue = objective.queue.clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    loss, _ = objective(model, v1, v2, _batch(), _context(optimizer))
    _, q1 = online(v1)
    _, q2 = online(v2)
    with torch.no_grad():
        k1, k2 = key(v1), key(v2)
    expected = 0.5 * (_plain_moco_loss(q1, k2, queue, 0.2) + _plain_moco_loss(q2, k1, queue, 0.2))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    optimizer.step()
    objective.after_step(model)
    keys = torch.nn.functional.normalize(torch.cat([k1, k2]), dim=1)
    torch.testing.assert_close(objective.queue[: 2 * B], keys)
    torch.testing.assert_close(objective.queue[2 * B :], queue[2 * B :])
    assert int(objective.queue_ptr) == 2 * B
    for target, before, source in zip(
        objective.key_encoder.parameters(),
        key.parameters(),
        [*model.backbone.parameters(), *model.projector.parameters()],
    ):
        torch.testing.assert_close(target, 0.9 * before + 0.1 * source)
    # Ring buffer: the next 12 keys wrap around the 16-key queue.
    objective(model, v1, v2, _batch(), _context(optimizer))
    objective.after_step(model)
    assert int(objective.queue_ptr) == (4 * B) % 16


def test_byol_symmetric_regression_and_ema_target() -> None:
    model, (v1, v2) = _model(predictor_hidden=7), _views(3)
    online = copy.deepcopy(model)
    objective = make_objective("byol", model, ema_start=0.8)
    target = copy.deepcopy(objective.target)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    loss, _ = objective(model, v1, v2, _batch(), _context(optimizer))
    _, z1 = online(v1)
    _, z2 = online(v2)
    p1, p2 = online.predictor(z1), online.predictor(z2)
    with torch.no_grad():
        t1, t2 = target(v1), target(v2)
    expected = 0.0
    for p, t in ((p1, t2), (p2, t1)):
        expected += sum(2 - 2 * _dot(_normalise(a), _normalise(b)) for a, b in zip(p.tolist(), t.tolist())) / B
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert all(p.grad is None for p in objective.target.parameters())
    optimizer.step()
    objective.after_step(model, momentum=0.5)
    for new, before, source in zip(
        objective.target.parameters(),
        target.parameters(),
        [*model.backbone.parameters(), *model.projector.parameters()],
    ):
        torch.testing.assert_close(new, 0.5 * before + 0.5 * source)


def test_validation_loss_is_unweighted_group_infonce() -> None:
    model, (v1, v2), batch = _model(), _views(4), _batch()
    objective = make_objective("ivpp", model, temperature=0.5)
    model.eval()
    with torch.no_grad():
        got = objective.validation_loss(model, v1, v2, batch)
        _, z1 = model(v1)
        _, z2 = model(v2)
    torch.testing.assert_close(got, GroupInfoNCE(0.5)(z1, z2, positive_group=batch.positive_group))


def test_make_objective_errors() -> None:
    with pytest.raises(ValueError, match="unknown method"):
        make_objective("swav", _model())
    with pytest.raises(ValueError, match="predictor"):
        make_objective("byol", _model())


STATE_OPTIONS = {"moco": {"queue_size": 10}, "meta-uscl": {"cmw_lr": 1e-2}}
METHOD_MODELS = {
    "simclr": {},
    "uscl": {"num_classes": 3},
    "awcl": {},
    "ivpp": {},
    "moco": {},
    "byol": {"predictor_hidden": 7},
    "meta-uscl": {},
}


def _step(model, objective, optimizer, step: int) -> float:
    v1, v2 = _views(10 + step)
    loss, _ = objective(model, v1, v2, _batch(), _context(optimizer, step))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    objective.after_step(model)
    return loss.item()


def _roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("method", sorted(METHOD_MODELS))
def test_state_dict_round_trip_reproduces_the_next_steps(method: str) -> None:
    model = _model(**METHOD_MODELS[method])
    objective = make_objective(method, model, **STATE_OPTIONS.get(method, {}))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    for step in range(2):
        _step(model, objective, optimizer, step)
    saved = _roundtrip(
        {"model": model.state_dict(), "objective": objective.state_dict(), "optimizer": optimizer.state_dict()}
    )
    continued = [_step(model, objective, optimizer, step) for step in (2, 3)]

    fresh_model = _model(**METHOD_MODELS[method], seed=99)
    fresh_model.load_state_dict(saved["model"])
    torch.manual_seed(12345)  # a different random queue / CMW-Net init, overwritten by the state
    fresh = make_objective(method, fresh_model, **STATE_OPTIONS.get(method, {}))
    fresh.load_state_dict(saved["objective"])
    fresh_optimizer = torch.optim.SGD(fresh_model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    fresh_optimizer.load_state_dict(saved["optimizer"])
    resumed = [_step(fresh_model, fresh, fresh_optimizer, step) for step in (2, 3)]
    assert resumed == continued
    for a, b in zip(model.state_dict().values(), fresh_model.state_dict().values()):
        assert torch.equal(a, b)
    state, fresh_state = objective.state_dict(), fresh.state_dict()
    assert state.keys() == fresh_state.keys()
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, fresh_state[key]), key
    if method == "meta-uscl":
        adam = fresh_state["_extra_state"]["cmw_optimizer"]["state"]
        assert adam and all(int(s["step"]) == 4 for s in adam.values())


def test_moco_never_uses_a_key_of_the_query_s_own_video_as_a_negative() -> None:
    from sonocl.methods.moco import queue_info_nce

    model = _model()
    objective = make_objective("moco", model, queue_size=2 * B, ema_start=0.9, loss="symmetric", shuffle_bn_groups=1)
    videos = torch.tensor([0, 0, 1, 1, 2, 2])
    batch = BatchTensors(torch.arange(B), torch.ones(B), torch.full((B,), -1), videos)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    v1, v2 = _views(3)
    objective(model, v1, v2, batch, _context(optimizer))
    objective.after_step(model)  # the batch's keys, with their videos, are now the whole queue
    assert objective.queue_video.tolist() == [*videos.tolist(), *videos.tolist()]
    loss, _ = objective(model, v1, v2, batch, _context(optimizer))
    q1, q2 = (F.normalize(model(v)[1].float(), dim=1) for v in (v1, v2))
    with torch.no_grad():
        k1, k2 = (F.normalize(objective.key_encoder(v).float(), dim=1) for v in (v1, v2))
    same = videos[:, None] == objective.queue_video[None, :]
    expected = 0.5 * (
        queue_info_nce(q1, k2, objective.queue, 0.2, same) + queue_info_nce(q2, k1, objective.queue, 0.2, same)
    )
    torch.testing.assert_close(loss, expected)
    unmasked = 0.5 * (queue_info_nce(q1, k2, objective.queue, 0.2) + queue_info_nce(q2, k1, objective.queue, 0.2))
    assert unmasked.item() > loss.item()  # the near-duplicate keys of a query's own video were in its denominator
