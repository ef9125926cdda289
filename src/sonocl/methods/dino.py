"""DINO (Caron et al., ICCV 2021): self-distillation with no labels. A student network learns to give, for every
view of a frame, the distribution over ``out_dim`` outputs that an EMA teacher gives, centred and sharpened, for
the other global views; multi-crop adds small local views that only the student sees.

Preset: the reference code's defaults (facebookresearch/dino ``main_dino.py``, the 100-epoch ViT-S/16 run of its
README): AdamW 5e-4 × B/256, weight decay 0.04, gradient norm clipped to 3, linear warm-up over 10 of 100 epochs then
cosine to 1e-6, teacher momentum 0.996 → 1 (cosine; ``schedule.ema_start``/``ema_end``), student temperature 0.1,
teacher temperature 0.04 without warm-up (the defaults; the paper's ViT recipe warms it from 0.04 to 0.07 over 30 of
300 epochs: ``--teacher-temperature 0.07 --teacher-warmup 0.1``), centre momentum 0.9; ``vision_transformer.py``'s
``DINOHead`` (a 3-layer MLP 2048 wide with GELU, an L2-normalised 256-d bottleneck, a weight-normalised last layer
whose row norms stay 1) with its last layer frozen for the first 1 % of the run (1 of 100 epochs); and
``DataAugmentationDINO`` on grey frames: two global views (crop area 0.4–1) and 8 local crops (0.05–0.4) at 96/224
of the run's side, flip, brightness and contrast 0.4 with p 0.8 (saturation, hue and grey conversion do nothing to a
grey frame), Gaussian blur with p 1.0, 0.1 and 0.5 (first view, second view, local crops) and solarisation with
p 0.2 on the second view.

Departures (``docs/methods.md`` §9): 4,096 outputs instead of 65,536 (solo-learn's CIFAR setting; at 65,536 the
last layer holds 16.8 M weights, 1.5 times a ResNet-18, kept by student, teacher and AdamW's two moments, and with
the ten views' softmaxes it more than doubles the head's time on a 2-core CPU at batch 32); a constant weight decay
(the reference raises it from 0.04 to 0.4 on a cosine; biases and norms are spared in both); no stochastic depth (the backbone is built by its record, whatever its family); the
exported encoder is the student's backbone, as for every sonocl method (the reference evaluates the teacher's;
the two differ by no more than the noise here: docs/methods.md §9).

``--views video`` is video-DINO: the two global views come from two different frames of one video, as USCL's and
IVPP's positives do, and the local crops half from each.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from sonocl.data.store import VideoTable
from sonocl.methods.base import Method
from sonocl.methods.config import (
    IMAGENET_GREY_MEAN,
    IMAGENET_GREY_STD,
    AugmentConfig,
    ModelConfig,
    OptimConfig,
    Options,
    PretrainConfig,
    ScheduleConfig,
    fraction_problem,
    option,
    options_of,
)
from sonocl.methods.moco import key_momentum
from sonocl.methods.objectives import BatchTensors, MomentumEncoder, Objective, StepContext
from sonocl.models import ContrastiveModel, Head
from sonocl.pairs import InstanceSampler, PairSampler, distinct

VIEWS = ("image", "video")
LAST_LAYER_NORMS = ("fixed", "learnt")


@dataclass
class DINOOptions(Options):
    views: str = option(
        "image",
        "image: both global views from one frame (DINO); video: from two different frames of one video (video-DINO)",
    )
    out_dim: int = option(4096, "outputs of DINO's head (the paper's 65,536; docs/methods.md says why 4,096)")
    last_layer_norm: str = option(
        "fixed",
        "fixed: the row norms of the head's weight-normalised last layer stay 1 (the reference's norm_last_layer "
        "true); learnt: they are trained (its false)",
    )
    student_temperature: float = option(0.1, "temperature of the student's softmax (the reference's 0.1)")
    teacher_temperature: float = option(0.04, "temperature of the teacher's softmax after its warm-up")
    warmup_teacher_temperature: float = option(0.04, "the teacher's temperature at the start of its warm-up")
    teacher_warmup: float = option(
        0.0, "share of the run over which the teacher's temperature rises linearly to teacher_temperature"
    )
    center_momentum: float = option(0.9, "momentum of the centre subtracted from the teacher's outputs")
    freeze_last_layer: float = option(
        0.01, "share of the run during which the head's last layer is not trained (the reference's first epoch of 100)"
    )

    def check(self) -> list[str]:
        problems = super().check()
        if self.views not in VIEWS:
            problems.append(f"views must be one of {', '.join(VIEWS)}, not {self.views!r}")
        if self.last_layer_norm not in LAST_LAYER_NORMS:
            problems.append(
                f"last_layer_norm must be one of {', '.join(LAST_LAYER_NORMS)}, not {self.last_layer_norm!r}"
            )
        if self.out_dim < 1:
            problems.append(f"out_dim must be ≥ 1, not {self.out_dim}")
        for name in ("student_temperature", "teacher_temperature", "warmup_teacher_temperature"):
            if not getattr(self, name) > 0:
                problems.append(f"{name} must be > 0, not {getattr(self, name)}")
        for name in ("teacher_warmup", "center_momentum", "freeze_last_layer"):
            problems += fraction_problem(name, getattr(self, name))
        return problems


class DINOHead(Head):
    """DINO's head (the reference's ``DINOHead``): Linear → GELU → Linear → GELU → Linear to a ``bottleneck_dim``
    vector (BatchNorm after the hidden layers with ``batch_norm``), L2-normalised, then a bias-free weight-normalised
    Linear to ``out_dim`` outputs whose row norms stay 1 with ``norm_last_layer`` (trained otherwise)."""

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int,
        bottleneck_dim: int,
        out_dim: int,
        batch_norm: bool = False,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__(in_dim, out_dim)
        layers: list[nn.Module] = []
        for width_in, width_out in ((in_dim, hidden_dim), (hidden_dim, hidden_dim)):
            layers.append(nn.Linear(width_in, width_out))
            if batch_norm:
                layers.append(nn.BatchNorm1d(width_out))
            layers.append(nn.GELU())
        layers.append(nn.Linear(hidden_dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for module in self.mlp:
            if isinstance(module, nn.Linear):  # the reference's initialisation: truncated normal, zero bias
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        norms = self.last_layer.parametrizations.weight.original0  # g of w = g · v / ‖v‖, one per output
        with torch.no_grad():
            norms.fill_(1.0)
        norms.requires_grad_(not norm_last_layer)

    def forward(self, h: Tensor, freeze_last_layer: bool = False) -> Tensor:
        """``(N, in_dim)`` → ``(N, out_dim)``; ``freeze_last_layer``: the last layer gets no gradient (its weights
        stay as they are while the rest trains, the reference's first epoch)."""
        bottleneck = F.normalize(self.mlp(h), dim=-1)
        weight = self.last_layer.weight
        return F.linear(bottleneck, weight.detach() if freeze_last_layer else weight)


class DINOLoss(nn.Module):
    """DINO's loss (the reference's ``DINOLoss``), in float32 at least.

    With the student's outputs s_v of views v = 1 … V (the two global views first, then the local crops) and the
    teacher's t_1, t_2 of the two global views: P_t,i = softmax((t_i − c) / τ_t) (centred, sharpened),
    log P_s,v = log_softmax(s_v / τ_s), and the loss is the mean over the 2(V − 1) pairs (i, v) with v ≠ i of the
    batch mean of −Σ_k P_t,i · log P_s,v. The centre c moves towards the mean teacher output of each batch
    (`update_center`, over every rank).
    """

    center: Tensor
    """``(1, out_dim)``: the running mean of the teacher's outputs (a buffer: saved with the objective's state)."""

    def __init__(self, out_dim: int, student_temperature: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temperature = student_temperature
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student: Tensor, teacher: Tensor, teacher_temperature: float) -> Tensor:
        """``student`` ``(V·B, K)`` view-major (rows v·B … (v+1)·B − 1: view v of every item), ``teacher``
        ``(2·B, K)`` of the two global views."""
        batch = teacher.shape[0] // 2
        views = student.shape[0] // batch
        dtype = torch.promote_types(torch.promote_types(student.dtype, teacher.dtype), torch.float32)
        log_student = F.log_softmax(student.to(dtype) / self.student_temperature, dim=-1).view(views, batch, -1)
        centred = teacher.detach().to(dtype) - self.center.to(dtype)
        targets = F.softmax(centred / teacher_temperature, dim=-1).view(2, batch, -1)
        cross = -torch.einsum("ibk,vbk->iv", targets, log_student) / batch  # (i, v): mean cross-entropy of a pair
        same_view = cross.diagonal().sum()  # (i, i): the teacher's and the student's view of the same crop
        return (cross.sum() - same_view) / (2 * (views - 1))

    @torch.no_grad()
    def update_center(self, teacher: Tensor, gather: Callable[[Tensor], Tensor] | None = None) -> None:
        """c ← m·c + (1 − m)·mean of ``teacher`` ``(2·B, K)`` over the global batch (``gather``: every rank's)."""
        total, count = teacher.detach().to(self.center.dtype).sum(dim=0, keepdim=True), teacher.shape[0]
        if gather is not None:
            every = gather(total)
            total, count = every.sum(dim=0, keepdim=True), count * every.shape[0]
        batch_center = total / count
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1.0 - self.center_momentum)


class DINO(Objective):
    """Loss = `DINOLoss` of the student (``model``: its backbone and `DINOHead`) on every view against the teacher
    (an EMA copy of both, `MomentumEncoder`) on the two global views.

    As the reference (``MultiCropWrapper``): the global views go through the student's backbone as one batch of 2B,
    the local crops (``context.local_views``) as another, and the teacher sees the global views as one batch. The
    teacher's temperature warms up linearly over the first ``teacher_warmup`` of the run's ``total_steps``; the
    head's last layer gets no gradient during the first ``freeze_last_layer`` of them (both shares counted as the
    loop's warm-up is, by the progress step / total_steps); the teacher follows the student after every step with
    the loop's momentum (cosine from ``schedule.ema_start`` to ``ema_end``).
    """

    def __init__(
        self,
        model: ContrastiveModel,
        temperature: float,
        student_temperature: float,
        center_momentum: float,
        teacher_temperatures: tuple[float, float],
        teacher_warmup: float,
        freeze_last_layer: float,
        total_steps: int,
        momentum: float,
    ) -> None:
        super().__init__(temperature)
        if not isinstance(model.projector, DINOHead):
            raise ValueError("dino needs its DINOHead on the model: build it with the method's head (Method.head)")
        self.loss = DINOLoss(model.projector.out_dim, student_temperature, center_momentum).to(
            next(model.parameters()).device
        )
        self.teacher = MomentumEncoder(model)
        self.teacher_temperatures = teacher_temperatures
        """(at the start of the warm-up, after it)."""
        self.teacher_warmup = teacher_warmup
        self.freeze_last_layer = freeze_last_layer
        self.total_steps = total_steps
        self.momentum = momentum

    def teacher_temperature(self, step: int) -> float:
        """τ_t at global ``step``: linear in the run's progress from the first of ``teacher_temperatures`` to the
        second over the warm-up share, then the second."""
        start, end = self.teacher_temperatures
        progress = step / self.total_steps
        if progress >= self.teacher_warmup:
            return end
        return start + (end - start) * progress / self.teacher_warmup

    def forward(
        self, model: ContrastiveModel, view1: Tensor, view2: Tensor, batch: BatchTensors, context: StepContext
    ) -> tuple[Tensor, dict[str, float]]:
        head = model.projector
        assert isinstance(head, DINOHead), "dino needs its DINOHead (checked when the objective is built)"
        global_views = torch.cat([view1, view2])
        features = [model.backbone(global_views).flatten(1)]
        if context.local_views is not None:
            features.append(model.backbone(context.local_views).flatten(1))
        frozen = context.step / self.total_steps < self.freeze_last_layer
        student = head(torch.cat(features), freeze_last_layer=frozen)
        self.teacher.train(model.training)
        with torch.no_grad():
            teacher = self.teacher(global_views)
        loss = self.loss(student, teacher, self.teacher_temperature(context.step))
        self.loss.update_center(teacher, context.gather)
        return loss, {"dino": float(loss.detach())}

    def after_step(self, model: ContrastiveModel, momentum: float | None = None) -> None:
        self.teacher.update(model, self.momentum if momentum is None else momentum)


class VideoFramePairs(PairSampler):
    """video-DINO's global views: two different frames of one video, unmixed (view 1 the first, view 2 the second).

    With ``items="frames"`` (the default, as DINO's) the first is the item's frame and the second uniform among the
    other frames of its video; with ``items="videos"`` the two are distinct and uniform in the video, with no limit
    on their distance (USCL's frames). A video of one frame gives it twice. ``positive_group`` = video, so the
    held-out InfoNCE never takes a frame of an item's own video for a negative.
    """

    k = 2
    default_items = "frames"

    def _draw(self, rng, video, frame, position):
        length = self._length[video]
        offset = self.store.video_offsets[video]
        if frame is None:
            first, second = distinct(rng, length, 2).T
        else:
            first = frame - offset
            second = np.floor(rng.random(len(video)) * np.maximum(length - 1, 1)).astype(np.int64)
            second += second >= first
        single = length == 1
        first, second = np.where(single, 0, first), np.where(single, 0, second)
        frames = offset[:, None] + np.stack([first, second], axis=1)
        mix = np.broadcast_to(np.eye(2), (len(video), 2, 2))
        return self._batch(frames, mix, video, video)


DINO_AUGMENT = AugmentConfig(
    crop_scale=(0.4, 1.0),
    crop_ratio=(3 / 4, 4 / 3),
    flip_p=0.5,
    brightness=0.4,
    contrast=0.4,
    jitter_p=0.8,
    blur_p=1.0,
    view2_blur_p=0.1,
    blur_sigma=(0.1, 2.0),
    solarize_p=0.0,
    view2_solarize_p=0.2,
    local_crops=8,
    local_crop_scale=(0.05, 0.4),
    local_blur_p=0.5,
    mean=IMAGENET_GREY_MEAN,
    std=IMAGENET_GREY_STD,
)
"""``DataAugmentationDINO`` on grey frames (``main_dino.py``): global crops 0.4–1, local crops 0.05–0.4 (8, at 96/224
of the side), flip, jitter 0.4 with p 0.8, blur p 1.0 / 0.1 / 0.5, solarisation p 0.2 on the second view."""


def preset() -> PretrainConfig:
    return PretrainConfig(
        method="dino",
        export="last",
        size=224,
        epochs=100,
        model=ModelConfig(projection_hidden=2048, projection_dim=256),
        augment=DINO_AUGMENT,
        optim=OptimConfig(name="adamw", lr=5e-4, lr_scaling="linear", weight_decay=0.04, clip_grad=3.0),
        schedule=ScheduleConfig(
            warmup_fraction=10 / 100, warmup="linear", decay="cosine", min_lr=1e-6, ema_start=0.996, ema_end=1.0
        ),
        options=DINOOptions(),
    )


def head(cfg: PretrainConfig, feature_dim: int) -> DINOHead:
    """DINO's head on ``feature_dim`` features: ``model.projection_hidden`` wide, a ``model.projection_dim``
    bottleneck (BatchNorm with ``model.projection_batch_norm``, the reference's use_bn_in_head), ``out_dim`` outputs."""
    options = options_of(cfg, DINOOptions)
    return DINOHead(
        feature_dim,
        cfg.model.projection_hidden,
        cfg.model.projection_dim,
        options.out_dim,
        batch_norm=cfg.model.projection_batch_norm,
        norm_last_layer=options.last_layer_norm == "fixed",
    )


def sampler(
    cfg: PretrainConfig, store: VideoTable, videos: np.ndarray, batch_size: int, rank: int, world_size: int
) -> PairSampler:
    options = options_of(cfg, DINOOptions)
    kind = VideoFramePairs if options.views == "video" else InstanceSampler
    return kind(store, videos, batch_size, cfg.seed, rank, world_size, items=options.items)


def objective(cfg: PretrainConfig, model: ContrastiveModel, sampler: PairSampler) -> Objective:
    options = options_of(cfg, DINOOptions)
    return DINO(
        model,
        temperature=options.temperature,
        student_temperature=options.student_temperature,
        center_momentum=options.center_momentum,
        teacher_temperatures=(options.warmup_teacher_temperature, options.teacher_temperature),
        teacher_warmup=options.teacher_warmup,
        freeze_last_layer=options.freeze_last_layer,
        total_steps=cfg.steps or cfg.epochs * len(sampler),  # the run's budget in steps, as the loop counts it
        momentum=key_momentum(cfg),
    )


METHOD = Method(
    name="dino",
    summary="a student matches an EMA teacher's centred, sharpened outputs on other views, multi-crop "
    "(--views video: the global views from two frames of one video)",
    paper="Caron et al., Emerging Properties in Self-Supervised Vision Transformers, ICCV 2021",
    options=DINOOptions,
    preset=preset,
    sampler=sampler,
    objective=objective,
    head=head,
)
