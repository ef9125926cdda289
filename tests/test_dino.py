"""DINO (`sonocl.methods.dino`): the loss against a float64 reference written out view by view, the centre, the
teacher's EMA and temperature schedules, the head, the multi-crop views, video-DINO's frame pairs, and two steps of
pretraining on the phantom through ``sonocl pretrain``."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from conftest import method_config, tiny_pretrain, tiny_sets
from sonocl.augment import BatchAugment, make_local_views, make_views
from sonocl.cli import main
from sonocl.errors import ConfigError
from sonocl.methods import get_method
from sonocl.methods.dino import DINOHead, DINOLoss
from sonocl.methods.objectives import BatchTensors, StepContext
from sonocl.models import ContrastiveModel, read_encoder_metadata
from sonocl.train.replay import local_crop_side
from sonocl.train.schedules import momentum_schedule

METHOD = get_method("dino")
IN, FEAT = 12, 6


def _softmax(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


def _reference_loss(
    student: torch.Tensor, teacher: torch.Tensor, center: list[float], tau_s: float, tau_t: float, views: int
) -> float:
    """DINO's loss with explicit loops: over the teacher's two global views i, the student's views v ≠ i and the
    batch's items b, the cross-entropy −Σ_k P_t(k) log P_s(k), averaged over items and then over the pairs."""
    batch = teacher.shape[0] // 2
    total, pairs = 0.0, 0
    for i in range(2):
        for v in range(views):
            if v == i:
                continue
            pair = 0.0
            for b in range(batch):
                t_row = teacher[i * batch + b].tolist()
                s_row = student[v * batch + b].tolist()
                p_t = _softmax([(t - c) / tau_t for t, c in zip(t_row, center)])
                p_s = _softmax([s / tau_s for s in s_row])
                pair += -sum(q * math.log(p) for q, p in zip(p_t, p_s))
            total += pair / batch
            pairs += 1
    return total / pairs


@pytest.mark.parametrize("local_crops", [0, 3])
def test_loss_centre_and_sharpening_match_a_float64_reference(local_crops: int) -> None:
    """Caron et al. 2021, Algorithm 1 and the reference's DINOLoss: the teacher's centred, sharpened softmax on the
    two global views against the student's softmax on every other view; then c ← m·c + (1 − m)·mean(teacher)."""
    g = torch.Generator().manual_seed(0)
    batch, out_dim, views = 3, 7, 2 + local_crops
    student = torch.randn(views * batch, out_dim, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2 * batch, out_dim, generator=g, dtype=torch.float64, requires_grad=True)
    loss = DINOLoss(out_dim, student_temperature=0.1, center_momentum=0.9).double()
    center = torch.randn(1, out_dim, generator=g, dtype=torch.float64)
    loss.center.copy_(center)

    value = loss(student, teacher, teacher_temperature=0.04)
    expected = _reference_loss(student.detach(), teacher.detach(), center[0].tolist(), 0.1, 0.04, views)
    assert value.dtype == torch.float64 and float(value.detach()) == pytest.approx(expected, rel=1e-12)

    value.backward()
    assert student.grad is not None and teacher.grad is None  # the teacher's outputs are a target, never trained

    loss.update_center(teacher.detach())
    torch.testing.assert_close(loss.center, 0.9 * center + 0.1 * teacher.detach().mean(dim=0, keepdim=True))
    gathered = loss.center.clone()  # over ranks: the mean of every rank's teacher outputs (here two ranks alike)
    loss.update_center(teacher.detach(), gather=lambda t: torch.cat([t, t]))
    torch.testing.assert_close(loss.center, 0.9 * gathered + 0.1 * teacher.detach().mean(dim=0, keepdim=True))


def _model(cfg, seed: int = 0) -> ContrastiveModel:
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(IN, FEAT), nn.BatchNorm1d(FEAT), nn.ReLU())
    assert METHOD.head is not None
    return ContrastiveModel(backbone, FEAT, projector=METHOD.head(cfg, FEAT))


def _config(**options):
    return method_config(
        "dino",
        steps=100,
        model={"projection_hidden": 10, "projection_dim": 5},
        options={"out_dim": 9, **options},
    )


def _objective(cfg, model):
    return METHOD.objective(cfg, model, SimpleNamespace(num_items=100))  # the budget: cfg.steps


def _step(objective, model, step: int, local: int = 2, batch: int = 4):
    g = torch.Generator().manual_seed(step)
    view1, view2 = torch.randn(batch, 1, 3, 4, generator=g), torch.randn(batch, 1, 3, 4, generator=g)
    local_views = torch.randn(local * batch, 1, 3, 4, generator=g) if local else None
    targets = BatchTensors(torch.arange(batch), torch.ones(batch), torch.full((batch,), -1))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    context = StepContext(step=step, optimizer=optimizer, lr=0.5, local_views=local_views)
    optimizer.zero_grad(set_to_none=True)
    loss, parts = objective(model, view1, view2, targets, context)
    loss.backward()
    optimizer.step()
    return loss, parts


def test_teacher_is_an_ema_of_the_student_on_the_cosine_schedule_to_one() -> None:
    cfg = _config()
    assert (cfg.schedule.ema_start, cfg.schedule.ema_end) == (0.996, 1.0)
    momenta = momentum_schedule(cfg.schedule.ema_start, cfg.schedule.ema_end, 100)  # the loop's, per step
    assert momenta[0] == pytest.approx(0.996) and momenta[-1] == pytest.approx(1.0) and np.all(np.diff(momenta) >= 0)
    assert momenta[50] == pytest.approx(1.0 - 0.004 * 0.5 * (1 + math.cos(math.pi * 50 / 99)))

    model = _model(cfg)
    objective = _objective(cfg, model)
    student = [*model.backbone.parameters(), *model.projector.parameters()]
    teacher = list(objective.teacher.parameters())
    assert len(teacher) == len(student) and not any(p.requires_grad for p in teacher)
    assert all(torch.equal(t, s) for t, s in zip(teacher, student))  # the teacher starts as the student
    before = [t.detach().clone() for t in teacher]
    _step(objective, model, step=5)
    momentum = float(momenta[5])
    objective.after_step(model, momentum)
    for old, new, online in zip(before, objective.teacher.parameters(), student):
        torch.testing.assert_close(new, momentum * old + (1 - momentum) * online.detach())
    assert not all(torch.equal(t, s) for t, s in zip(objective.teacher.parameters(), student))


def test_teacher_temperature_warms_up_and_the_last_layer_is_frozen_first() -> None:
    cfg = _config(warmup_teacher_temperature=0.04, teacher_temperature=0.07, teacher_warmup=0.3, freeze_last_layer=0.05)
    model = _model(cfg)
    objective = _objective(cfg, model)
    temperatures = [objective.teacher_temperature(step) for step in (0, 15, 30, 99)]
    assert temperatures == pytest.approx([0.04, 0.055, 0.07, 0.07])
    assert _objective(_config(), model).teacher_temperature(0) == 0.04  # the reference's default: no warm-up

    last = model.projector.last_layer.parametrizations.weight.original1
    first = model.projector.mlp[0].weight
    frozen_last, frozen_first = last.detach().clone(), first.detach().clone()
    _step(objective, model, step=4)  # within the first 5 % of the run's 100 steps: the last layer gets no gradient
    assert last.grad is None and torch.equal(last, frozen_last) and not torch.equal(first, frozen_first)
    _step(objective, model, step=5)
    assert last.grad is not None and not torch.equal(last, frozen_last)


def test_head_is_dinos_three_layer_mlp_with_a_weight_normalised_last_layer() -> None:
    cfg = method_config("dino", model={"projection_hidden": 16, "projection_dim": 6}, options={"out_dim": 11})
    assert METHOD.head is not None
    head = METHOD.head(cfg, 8)
    assert isinstance(head, DINOHead) and (head.in_dim, head.out_dim) == (8, 11)
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(8, 16), (16, 16), (16, 6)]
    assert sum(isinstance(m, nn.GELU) for m in head.mlp) == 2 and head.last_layer.bias is None
    norms, direction = head.last_layer.parametrizations.weight.original0, head.last_layer.parametrizations.weight
    assert norms.shape == (11, 1) and not norms.requires_grad  # norm_last_layer: the row norms stay 1
    assert direction.original1.shape == (11, 6) and direction.original1.requires_grad
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(11))
    logits = head(torch.randn(5, 8))
    assert logits.shape == (5, 11) and bool((logits.abs() <= 1 + 1e-6).all())  # unit bottleneck · unit rows

    learnt = METHOD.head(
        dataclasses.replace(cfg, options=dataclasses.replace(cfg.options, last_layer_norm="learnt")), 8
    )
    assert learnt.last_layer.parametrizations.weight.original0.requires_grad
    with pytest.raises(ValueError, match="dino needs its DINOHead"):
        _objective(_config(), ContrastiveModel(nn.Flatten(), 12))


def _frames(batch: int, side: int = 48) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 1, side, side), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)


def test_multicrop_gives_two_global_views_and_smaller_local_crops_of_their_own() -> None:
    augment_config = method_config("dino").augment
    augment = BatchAugment(augment_config, 32, local_size=14)
    frames, mix = _frames(5), torch.ones(5, 2, 1)
    generator = torch.Generator().manual_seed(3)
    view1, view2 = make_views(frames, mix, False, augment, generator)
    local = make_local_views(frames, mix, augment, generator)
    assert view1.shape == view2.shape == (5, 1, 32, 32) and local is not None and local.shape == (8 * 5, 1, 14, 14)
    crops = local.view(8, 5, 14, 14)
    assert not torch.equal(crops[0], crops[1])  # each crop its own draw
    # Local crops cover 5-40 % of the frame, the global views 40-100 %; the local ones are never solarised.
    assert augment.local is not None
    assert (augment.local.config.solarize_p, augment.local.config.view2_solarize_p) == (0.0, None)
    assert (augment.local.config.blur_p, augment.config.blur_p, augment.config.view2_blur_p) == (0.5, 1.0, 0.1)
    for pipeline, (low, high) in ((augment.local, (0.05, 0.4)), (augment, (0.4, 1.0))):
        top, left, height, width = pipeline.crop_boxes(2000, torch.Generator().manual_seed(4), frames.device).unbind(1)
        area = height * width / pipeline.size**2
        assert low * 0.7 < float(area.min()) and float(area.max()) < high * 1.3 and float(area.mean()) < high

    # The global views are the draws they are without local crops: other methods' views do not change.
    plain = BatchAugment(dataclasses.replace(augment_config, local_crops=0), 32)
    assert plain.local is None and make_local_views(frames, mix, plain, generator) is None
    again = make_views(frames, mix, False, plain, torch.Generator().manual_seed(3))
    assert torch.equal(again[0], view1) and torch.equal(again[1], view2)


def test_local_crop_side_is_96_224_of_the_size_raised_to_what_the_backbone_takes() -> None:
    def side(backbone: str, size: int = 32, local_size: int | None = None) -> int:
        cfg = method_config("dino", size=size, model={"backbone": backbone}, augment={"local_size": local_size})
        return local_crop_side(cfg)

    assert side("resnet18", 224) == 96 and side("resnet18", 64) == 27 and side("resnet18") == 14
    assert side("timm:vit_tiny_patch16_224(patch_size=8)", 64) == 32  # 27 → the next multiple of its patch
    with pytest.raises(ConfigError, match="augment.local_size 20: .* does not take 20 px"):
        side("timm:vit_tiny_patch16_224(patch_size=8)", 64, local_size=20)


def test_video_dino_global_views_are_two_frames_of_one_video(phantom_store) -> None:
    videos = np.arange(phantom_store.num_videos)
    for items in ("frames", "videos"):
        cfg = method_config("dino", options={"views": "video", "items": items})
        batch = METHOD.sampler(cfg, phantom_store, videos, 8, 0, 1).batches(0)[0]
        assert batch.frames.shape == (8, 2) and np.array_equal(batch.mix, np.broadcast_to(np.eye(2), (8, 2, 2)))
        first, second = phantom_store.frame_video[batch.frames].T
        assert np.array_equal(first, batch.video) and np.array_equal(second, batch.video)
        assert np.all(batch.frames[:, 0] != batch.frames[:, 1]) and np.array_equal(batch.positive_group, batch.video)
    image = METHOD.sampler(method_config("dino"), phantom_store, videos, 8, 0, 1).batches(0)[0]
    assert image.frames.shape == (8, 1)

    # The local crops come half from each frame: crop i from the frame of view i mod 2.
    still = dataclasses.replace(
        method_config("dino").augment, flip_p=0.0, jitter_p=0.0, blur_p=0.0, local_blur_p=0.0, mean=0.0, std=1.0
    )
    frames = torch.stack([torch.zeros(2, 16, 16), torch.full((2, 16, 16), 255.0)], dim=1).to(torch.uint8)
    local = make_local_views(frames, torch.eye(2).expand(2, 2, 2), BatchAugment(still, 16, local_size=8))
    assert local is not None
    means = local.view(8, 2, -1).mean(dim=2)
    torch.testing.assert_close(means[0::2], torch.zeros(4, 2))
    torch.testing.assert_close(means[1::2], torch.ones(4, 2))


@pytest.mark.parametrize("views", ["image", "video"])
def test_two_steps_of_pretraining_on_the_phantom(views: str, phantom_store, tmp_path: Path) -> None:
    argv = ["pretrain", "--store", str(phantom_store.root), "--method", "dino", "--views", views,
            "--out", str(tmp_path), *tiny_pretrain("--threads", "1", *tiny_sets(knn_frames=2)), "--steps", "2"]  # fmt: skip
    assert main(argv) == 0
    rows = [line.split(",") for line in (tmp_path / "metrics.csv").read_text().splitlines()]
    loss, part = rows[0].index("loss"), rows[0].index("part_dino")
    steps = [row for row in rows[1:] if row[0] == "step"]
    assert len(steps) == 2 and all(math.isfinite(float(row[loss])) and row[loss] == row[part] for row in steps)
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["objective"]
    assert state["loss.center"].shape == (1, 4096) and bool(state["loss.center"].abs().sum() > 0)
    assert any(key.startswith("teacher.projector.last_layer.") for key in state)
    assert read_encoder_metadata(tmp_path)["method"] == "dino"
