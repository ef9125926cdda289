"""MAE (He, Chen, Xie, Li, Dollár, Girshick; CVPR 2022): a ViT encodes a random quarter of an image's patches, and a
light decoder reconstructs the pixels of the other three quarters from them.

Reference: facebookresearch/mae, ``models_mae.py`` (masking, encoder, decoder, loss) and ``main_pretrain.py`` with
``PRETRAIN.md`` (the recipe). Preset: AdamW β (0.9, 0.95), weight decay 0.05, base LR 1.5e-4 × B/256, 40 warm-up
epochs of 800 then cosine to 0, mask ratio 0.75, the per-patch normalised pixel target (``--norm_pix_loss``, as
``PRETRAIN.md`` trains), random resized crop (0.2–1) and flip as the only augmentation; the last model is exported.

The encoder is the run's backbone itself, a timm ``VisionTransformer``: its patch embedding, position embedding,
class token, blocks and final norm, run on the visible patches only (`encode_visible`), so the exported encoder is
that ViT, loaded and evaluated as every sonocl encoder. The decoder (`MAEDecoder`) belongs to the objective, which
the checkpoint saves; the run's optimiser trains it with the backbone (`Objective.trained_parameters`).

Departures (``docs/methods.md`` §8), each for sonocl's budgets or its one encoder per backbone: a ViT-Tiny/16 preset
(the paper's ViT-L has 50 times its parameters); a decoder 128 wide, 2 deep with 4 heads (the paper's 512, 8, 16 is
sized for ViT-L: its 25 M parameters would be four times a ViT-Tiny's); the encoder keeps timm's initialisation and
learned position embedding (MAE fixes a 2-D sin-cos one), so that every method trains the same backbone; the crop
interpolates bilinearly (the reference's bicubic), as sonocl's on-device augmentation does for every method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from sonocl.augment import AugmentConfig
from sonocl.backbones import Backbone
from sonocl.data.store import VideoTable
from sonocl.errors import ConfigError
from sonocl.methods.base import Method
from sonocl.methods.config import (
    IMAGENET_GREY_MEAN,
    IMAGENET_GREY_STD,
    ModelConfig,
    OptimConfig,
    Options,
    PretrainConfig,
    ScheduleConfig,
    option,
    options_of,
)
from sonocl.methods.objectives import BatchTensors, Objective, StepContext
from sonocl.models import ContrastiveModel, Head
from sonocl.pairs import InstanceSampler, PairSampler

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer
# timm is imported where it is used: the registry imports every method, and timm takes 0.7 s to import, which
# every `sonocl pretrain` of another method would otherwise wait for.

PIXEL_TARGETS = ("normalised", "plain")
VALIDATION_MASKS = 0x3A5E
"""The seed of the held-out images' masks: every epoch's validation loss hides the same patches."""


@dataclass
class MAEOptions(Options):
    mask_ratio: float = option(0.75, "share of each image's patches hidden from the encoder (the paper's 0.75)")
    pixel_target: str = option(
        "normalised",
        "what the decoder predicts of a hidden patch: normalised (its pixels standardised by the patch's own mean and "
        "variance, MAE's norm_pix_loss) or plain (its pixels)",
    )
    decoder_dim: int = option(128, "width of MAE's decoder (the paper's 512, for a ViT-L)")
    decoder_depth: int = option(2, "transformer blocks of MAE's decoder (the paper's 8)")
    decoder_heads: int = option(4, "attention heads of MAE's decoder (the paper's 16)")

    def check(self) -> list[str]:
        problems = super().check()
        if not 0 < self.mask_ratio < 1:
            problems.append(f"mask_ratio must lie in (0, 1), not {self.mask_ratio}")
        if self.pixel_target not in PIXEL_TARGETS:
            problems.append(f"pixel_target must be one of {', '.join(PIXEL_TARGETS)}, not {self.pixel_target!r}")
        if self.decoder_depth < 1 or self.decoder_heads < 1:
            problems.append(
                f"decoder_depth and decoder_heads must be ≥ 1 (got {self.decoder_depth}, {self.decoder_heads})"
            )
        elif self.decoder_dim < 4 or self.decoder_dim % 4 or self.decoder_dim % self.decoder_heads:
            problems.append(
                f"decoder_dim must be a multiple of 4 (its 2-D sin-cos position embedding) and of decoder_heads "
                f"{self.decoder_heads}, not {self.decoder_dim}"
            )
        return problems


class SingleViewSampler(InstanceSampler):
    """One frame per item, augmented once (``augment_first`` of one frame): both of the loop's views of an item are
    that one image, of which MAE reads the first."""

    augment_first = True


# --------------------------------------------------------------------------------------- masking and loss


def patchify(images: Tensor, patch: tuple[int, int]) -> Tensor:
    """``(N, C, H, W)`` → ``(N, L, ph·pw·C)``: the patches in the patch embedding's row-major order, each flattened
    as (pixel row, pixel column, channel), MAE's layout; pixels past the last whole patch are left out, as the
    embedding's strided convolution leaves them."""
    n, channels, height, width = images.shape
    (ph, pw), rows, columns = patch, height // patch[0], width // patch[1]
    grid = images[:, :, : rows * ph, : columns * pw].reshape(n, channels, rows, ph, columns, pw)
    return grid.permute(0, 2, 4, 3, 5, 1).reshape(n, rows * columns, ph * pw * channels)


def visible_count(patches: int, mask_ratio: float) -> int:
    """Patches an image keeps visible: ⌊L·(1 − ratio)⌋, as MAE's ``int()``, rounded to 9 decimals first so that float
    error (16 · (1 − 0.75) = 4.0, but 10 · (1 − 0.9) = 0.99…) never drops one."""
    return math.floor(round(patches * (1 - mask_ratio), 9))


def random_masking(noise: Tensor, visible: int) -> tuple[Tensor, Tensor]:
    """MAE's per-sample masking from ``noise`` ``(N, L)``: the ``visible`` patches of lowest noise stay visible.
    Returns their indices ``(N, visible)`` (in ascending noise) and the mask ``(N, L)``, 1 on hidden patches."""
    kept = noise.argsort(dim=1)[:, :visible]
    mask = torch.ones_like(noise).scatter_(1, kept, 0.0)
    return kept, mask


def encode_visible(vit: VisionTransformer, images: Tensor, kept: Tensor) -> Tensor:
    """The ViT's tokens ``(N, P + K, D)`` of its ``P`` prefix tokens (class, registers) and the ``K`` patches ``kept``:
    timm's own patch embedding and position embedding (`VisionTransformer._pos_embed`), then only these tokens through
    its pre-norm, blocks and final norm. Hidden patches never reach a block."""
    tokens = vit._pos_embed(vit.patch_embed(images))
    prefix = vit.num_prefix_tokens
    patches = tokens[:, prefix:].gather(1, kept[..., None].expand(-1, -1, tokens.shape[-1]))
    return vit.norm(vit.blocks(vit.norm_pre(torch.cat([tokens[:, :prefix], patches], dim=1))))


def reconstruction_loss(prediction: Tensor, target: Tensor, mask: Tensor, normalise: bool) -> Tensor:
    """MAE's loss: the mean squared error per patch between ``prediction`` and ``target`` ``(N, L, ph·pw·C)``, averaged
    over the hidden patches (``mask`` 1) only. ``normalise``: each target patch standardised by its own mean and
    (unbiased) variance, + 1e-6 inside the root (``norm_pix_loss``). Computed in at least the target's precision."""
    if normalise:
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    error = prediction.to(torch.promote_types(prediction.dtype, target.dtype)) - target
    per_patch = error.pow(2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


# ------------------------------------------------------------------------------------------------ model


class MAEDecoder(nn.Module):
    """MAE's decoder: the encoder's tokens embedded to ``dim``, a shared learned mask token in every hidden patch's
    place, a fixed 2-D sin-cos position embedding on the patches (none on the prefix tokens, MAE's zero row), ``depth``
    pre-norm transformer blocks (timm's, MLP ratio 4, qkv bias), a norm and a linear map to each patch's pixels.
    Initialised as ``models_mae.py``: Xavier-uniform linear layers with zero biases, the mask token N(0, 0.02²)."""

    position: Tensor
    """``(1, L, dim)`` the fixed position embedding of the patches (a function of the grid: not saved)."""

    def __init__(self, encoder_dim: int, grid: tuple[int, int], patch: tuple[int, int], channels: int, dim: int,
                 depth: int, heads: int) -> None:  # fmt: skip
        from timm.layers import LayerNorm, build_sincos2d_pos_embed
        from timm.models.vision_transformer import Block

        super().__init__()
        self.patch = patch
        self.num_patches = grid[0] * grid[1]
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("position", build_sincos2d_pos_embed(list(grid), dim)[None], persistent=False)
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(depth)))
        self.norm = LayerNorm(dim)  # timm's, ε 1e-6 as the reference's (and the blocks' own norms)
        self.predict = nn.Linear(dim, patch[0] * patch[1] * channels)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, tokens: Tensor, kept: Tensor, prefix: int) -> Tensor:
        """The encoder's ``tokens`` ``(N, prefix + K, D)`` of the patches ``kept`` ``(N, K)`` → the predicted pixels of
        every patch ``(N, L, ph·pw·C)``, in the patch embedding's order."""
        x = self.embed(tokens)
        n, width = x.shape[0], x.shape[-1]
        hidden = self.mask_token.to(x.dtype).expand(n, self.num_patches, width)
        patches = hidden.scatter(1, kept[..., None].expand(-1, -1, width), x[:, prefix:]) + self.position
        x = self.norm(self.blocks(torch.cat([x[:, :prefix], patches.to(x.dtype)], dim=1)))
        return self.predict(x[:, prefix:])


class MAE(Objective):
    """Loss = `reconstruction_loss` of the decoder's pixels on the hidden patches of one view (the first; the second
    is the same image, `SingleViewSampler`), with a fresh mask per image and step from torch's RNG, which the loop
    seeds per step."""

    def __init__(self, decoder: MAEDecoder, mask_ratio: float, pixel_target: str, temperature: float) -> None:
        super().__init__(temperature)
        self.decoder = decoder
        self.mask_ratio = mask_ratio
        self.pixel_target = pixel_target
        self.visible = visible_count(decoder.num_patches, mask_ratio)

    def trained_parameters(self) -> list[nn.Parameter]:
        return list(self.decoder.parameters())

    def predict(self, model: ContrastiveModel, images: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        """The decoder's pixels of every patch ``(N, L, ph·pw·C)`` and the mask ``(N, L)`` (1: hidden) that
        ``noise`` ``(N, L)`` draws (`random_masking`)."""
        from timm.models.vision_transformer import VisionTransformer

        vit = model.backbone
        assert isinstance(vit, VisionTransformer), "mae's objective is built for a timm VisionTransformer only"
        kept, mask = random_masking(noise, self.visible)
        self.decoder.train(model.training)
        return self.decoder(encode_visible(vit, images, kept), kept, vit.num_prefix_tokens), mask

    def reconstruction(self, model: ContrastiveModel, images: Tensor, noise: Tensor) -> Tensor:
        """The loss of ``images`` under the mask ``noise`` draws."""
        prediction, mask = self.predict(model, images, noise)
        return reconstruction_loss(
            prediction, patchify(images, self.decoder.patch), mask, self.pixel_target == "normalised"
        )

    def forward(
        self, model: ContrastiveModel, view1: Tensor, view2: Tensor, batch: BatchTensors, context: StepContext
    ) -> tuple[Tensor, dict[str, float]]:
        loss = self.reconstruction(model, view1, torch.rand(len(view1), self.decoder.num_patches, device=view1.device))
        return loss, {"reconstruction": float(loss.detach())}

    def validation_loss(self, model: ContrastiveModel, view1: Tensor, view2: Tensor, batch: BatchTensors) -> Tensor:
        """The reconstruction loss of held-out images, under masks of a fixed seed (`VALIDATION_MASKS`)."""
        generator = torch.Generator(device=view1.device).manual_seed(VALIDATION_MASKS)
        noise = torch.rand(len(view1), self.decoder.num_patches, generator=generator, device=view1.device)
        return self.reconstruction(model, view1, noise)


class NoProjection(Head):
    """MAE's model has no projector: its loss reads only the encoder and the decoder, and the collapse monitor reads the
    pooled features themselves (a random projector would hold untrained weights in every checkpoint)."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim, dim)

    def forward(self, h: Tensor) -> Tensor:
        return h


def vit_structure(backbone: str, channels: int, size: int) -> VisionTransformer:
    """The backbone ``backbone`` built on the meta device (its structure, no weights) when it is a timm
    ``VisionTransformer``; any other backbone is a `ConfigError` of one line naming it."""
    from timm.models.vision_transformer import VisionTransformer

    with torch.device("meta"):
        model = Backbone.named(backbone).build(channels, size)
    if not isinstance(model, VisionTransformer):
        raise ConfigError(
            f"mae hides patches from a ViT's encoder, and the backbone {backbone} is not a ViT (a timm "
            "VisionTransformer); use --backbone timm:vit_tiny_patch16_224 or another timm:vit_* model"
        )
    return model


# ----------------------------------------------------------------------------------------------- method

MAE_AUGMENT = AugmentConfig(
    crop_scale=(0.2, 1.0),
    crop_ratio=(0.75, 4 / 3),
    flip_p=0.5,
    brightness=0.0,
    contrast=0.0,
    jitter_p=0.0,
    mean=IMAGENET_GREY_MEAN,
    std=IMAGENET_GREY_STD,
)
"""``main_pretrain.py``'s augmentation: random resized crop (0.2–1) and flip, ImageNet's statistics (grey)."""


def preset() -> PretrainConfig:
    return PretrainConfig(
        method="mae",
        export="last",
        size=224,
        model=ModelConfig(backbone="timm:vit_tiny_patch16_224"),
        augment=MAE_AUGMENT,
        optim=OptimConfig(name="adamw", lr=1.5e-4, lr_scaling="linear", weight_decay=0.05, betas=(0.9, 0.95)),
        schedule=ScheduleConfig(warmup_fraction=40 / 800, warmup="linear", decay="cosine"),
        options=MAEOptions(),
    )


def sampler(
    cfg: PretrainConfig, store: VideoTable, videos: np.ndarray, batch_size: int, rank: int, world_size: int
) -> PairSampler:
    return SingleViewSampler(store, videos, batch_size, cfg.seed, rank, world_size, items=cfg.options.items)


def objective(cfg: PretrainConfig, model: ContrastiveModel, sampler: PairSampler) -> Objective:
    """MAE's objective for the run's ViT (a `ConfigError` for any other backbone, before anything trains)."""
    options = options_of(cfg, MAEOptions)
    vit = vit_structure(cfg.model.backbone, cfg.model.channels, cfg.size)
    grid = (int(vit.patch_embed.grid_size[0]), int(vit.patch_embed.grid_size[1]))
    patch = (int(vit.patch_embed.patch_size[0]), int(vit.patch_embed.patch_size[1]))
    patches = grid[0] * grid[1]
    visible = visible_count(patches, options.mask_ratio)
    if not 0 < visible < patches:
        raise ConfigError(
            f"mask_ratio {options.mask_ratio} leaves {visible} of the {patches} patches of a {cfg.size} px image "
            f"visible ({grid[0]}×{grid[1]} patches of {patch[0]} px); MAE needs one visible and one hidden at least: "
            "change --mask-ratio, --size or the patch size"
        )
    decoder = MAEDecoder(vit.embed_dim, grid, patch, cfg.model.channels, options.decoder_dim, options.decoder_depth,
                         options.decoder_heads)  # fmt: skip
    return MAE(decoder, options.mask_ratio, options.pixel_target, options.temperature)


METHOD = Method(
    name="mae",
    summary="a ViT encodes a random quarter of the patches; a light decoder reconstructs the rest (ViTs only)",
    paper="He et al., Masked Autoencoders Are Scalable Vision Learners, CVPR 2022",
    options=MAEOptions,
    preset=preset,
    sampler=sampler,
    objective=objective,
    head=lambda cfg, feature_dim: NoProjection(feature_dim),
)
