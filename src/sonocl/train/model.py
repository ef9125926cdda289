"""A pretraining run's model and optimiser: the backbone with its heads on the device, the optimiser at the
batch-scaled learning rate, the precision, and the encoder exported at the end."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from sonocl.backbones import Backbone
from sonocl.errors import ConfigError
from sonocl.methods.base import Method
from sonocl.methods.config import PretrainConfig
from sonocl.models import ContrastiveModel, init_backbone
from sonocl.train import distributed as ddp
from sonocl.train.checkpoint import load_checkpoint
from sonocl.train.data import RunData


def build_run_model(cfg: PretrainConfig, method: Method, data: RunData, context: ddp.DistributedContext,
                    device: torch.device, memory_format: torch.memory_format) -> ContrastiveModel:  # fmt: skip
    """The `ContrastiveModel` on the device (a classifier over the sampler's classes when the method has one)."""
    num_classes = len(data.sampler.class_names) if cfg.model.classifier else 0
    model = build_model(cfg, method, num_classes)
    if cfg.model.sync_bn and context.enabled:
        if device.type != "cuda":
            raise ConfigError(
                "--sync-bn needs CUDA (torch's SyncBatchNorm has no CPU kernel); use model.freeze_bn on CPU"
            )
        model = cast(ContrastiveModel, nn.SyncBatchNorm.convert_sync_batchnorm(model))  # converted in place
    # torch's overloads of Module.to take memory_format only alone; Module.to parses it with a device as well
    model = model.to(device, memory_format=memory_format)  # type: ignore[call-overload]
    if cfg.model.compile:
        model.backbone.compile()
    return model


AUTOCAST_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}
"""The autocast dtype of each mixed precision (fp32 runs without autocast)."""


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return precision


def encoder_metadata(cfg: PretrainConfig) -> dict[str, Any]:
    return {
        "arch": cfg.model.backbone,
        "channels": cfg.model.channels,
        "size": cfg.size,
        "mean": cfg.augment.mean,
        "std": cfg.augment.std,
        "method": cfg.method,
    }


def build_model(cfg: PretrainConfig, method: Method, num_classes: int) -> ContrastiveModel:
    """The backbone with its heads: the method's own head when it builds one (`Method.head`, DINO's), else the
    `ProjectionHead` of ``cfg.model``."""
    backbone = init_backbone(cfg.model.init, cfg.model.backbone, cfg.model.channels, cfg.size)
    feature_dim = Backbone.named(cfg.model.backbone).feature_dim
    head = method.head
    return ContrastiveModel(
        backbone,
        feature_dim,
        projection_hidden=cfg.model.projection_hidden,
        projection_dim=cfg.model.projection_dim,
        num_classes=num_classes,
        projection_batch_norm=cfg.model.projection_batch_norm,
        predictor_hidden=cfg.model.predictor_hidden,
        projector=head(cfg, feature_dim) if head is not None else None,
    )


def set_train_mode(model: nn.Module, freeze_bn: bool) -> None:
    model.train()
    if freeze_bn:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def make_optimizer(cfg: PretrainConfig, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay)
    if o.name == "adamw":  # no decay on biases and norms, as DINO's get_params_groups and MAE's add_weight_decay
        decayed = [p for p in params if p.ndim > 1]
        spared = [p for p in params if p.ndim <= 1]
        groups = [{"params": decayed, "weight_decay": o.weight_decay}, {"params": spared, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=lr, betas=o.betas)
    if o.name == "lars":
        from sonocl.train.lars import LARS, param_groups

        return LARS(
            param_groups(params, o.weight_decay), lr=lr, momentum=o.momentum, trust_coefficient=o.trust_coefficient
        )
    return torch.optim.Adam(params, lr=lr, betas=o.betas, weight_decay=o.weight_decay)


def export_encoder(cfg: PretrainConfig, out: Path) -> None:
    """``OUT/encoder.safetensors`` from the checkpoint ``cfg.export`` picks (`sonocl.models.exported_checkpoint`),
    with the encoder's metadata."""
    from sonocl.models import ENCODER_FILE, build_backbone, checkpoint_backbone_state, exported_checkpoint, save_encoder

    source = exported_checkpoint(out, cfg.export) or out / "checkpoints" / "last.pt"
    state = checkpoint_backbone_state(load_checkpoint(source))
    backbone = build_backbone(cfg.model.backbone, cfg.model.channels, state, cfg.size)
    save_encoder(backbone, out / ENCODER_FILE, {**encoder_metadata(cfg), "checkpoint": source.name})


def base_lr(cfg: PretrainConfig) -> float:
    """``optim.lr`` scaled to the global batch: × B/256 (``linear``), × √(B/256) (``sqrt``), or as given."""
    scale = {"none": 1.0, "linear": cfg.batch_size / 256, "sqrt": math.sqrt(cfg.batch_size / 256)}
    return cfg.optim.lr * scale[cfg.optim.lr_scaling]
