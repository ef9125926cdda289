"""A U-Net-style decoder on any backbone's feature maps, its loss, and joint image + mask augmentation.

The encoder is the backbone of ``sonocl.backbones`` used through its feature maps (`sonocl.backbones.feature_maps`),
fine to coarse: a ResNet's stem (conv1-bn1-relu, stride 2), layer1 (4, after the max-pool), layer2 (8), layer3
(16), layer4 (32); a timm CNN's stages; a ViT's four blocks as a simple pyramid (strides 4–32). Each decoder block
upsamples the coarser map to the size of the next skip, concatenates it, and applies two conv-BN-ReLU; a last block
brings the finest map's resolution to the input's, and a 1×1 conv gives one logit per pixel (as
segmentation_models_pytorch's U-Net, decoder widths 256-128-64-32-16: the first ones for the skips, the last for the
input's resolution). A ResNet's U-Net is the one sonocl has always built (same modules and weight names).

K classes: one logit per pixel for a binary task (sigmoid; Dice + BCE), K + 1 (background and the classes:
softmax; cross-entropy + the soft Dice of each class) for K ≥ 2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sonocl.augment import AugmentConfig, BatchAugment
from sonocl.backbones import feature_channels, feature_maps

DECODER_CHANNELS = (256, 128, 64, 32, 16)


class ConvBlock(nn.Sequential):
    """2 × (3×3 conv → BatchNorm → ReLU)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    """Backbone encoder + U-Net decoder: (N, C, H, W) → logits (N, 1, H, W) for one class, (N, K + 1, H, W) for K ≥ 2
    classes, for any H, W the backbone takes (a ResNet: ≥ 32; a ViT: the size it was made for)."""

    def __init__(
        self, backbone: nn.Module, decoder_channels: tuple[int, ...] = DECODER_CHANNELS, classes: int = 1
    ) -> None:
        super().__init__()
        self.encoder = backbone
        *skips, deepest = feature_channels(backbone)
        if len(decoder_channels) < len(skips) + 1:
            raise ValueError(f"decoder_channels needs {len(skips) + 1} widths, got {decoder_channels}")
        widths = (*decoder_channels[: len(skips)], decoder_channels[-1])
        blocks = []
        in_channels = deepest
        for skip, out_channels in zip((*reversed(skips), 0), widths):
            blocks.append(ConvBlock(in_channels + skip, out_channels))
            in_channels = out_channels
        self.decoder = nn.ModuleList(blocks)
        self.head = nn.Conv2d(in_channels, 1 if classes == 1 else classes + 1, kernel_size=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        *skips, x = feature_maps(self.encoder, images)
        for block, skip in zip(self.decoder, (*reversed(skips), None)):
            size = images.shape[-2:] if skip is None else skip.shape[-2:]
            x = F.interpolate(x, size=size, mode="nearest")
            if skip is not None:
                x = torch.cat([x, skip], dim=1)
            x = block(x)
        return self.head(x)


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """BCE-with-logits + (1 − soft Dice), Dice per image with ``smooth`` (so empty masks give finite, small loss).

    logits, target: (N, 1, H, W); target in {0, 1}.
    """
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ in shape")
    logits = logits.float()
    target = target.float()
    bce = F.binary_cross_entropy_with_logits(logits, target)
    probabilities = torch.sigmoid(logits).flatten(1)
    target = target.flatten(1)
    intersection = (probabilities * target).sum(dim=1)
    soft_dice = (2 * intersection + smooth) / (probabilities.sum(dim=1) + target.sum(dim=1) + smooth)
    return bce + (1 - soft_dice).mean()


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """The U-Net's loss against class indices (N, 1, H, W): `dice_bce_loss` for one logit per pixel; for K + 1
    logits, cross-entropy + (1 − the soft Dice of each foreground class, per image, with ``smooth``), averaged."""
    if logits.shape[1] == 1:
        return dice_bce_loss(logits, labels.float())
    logits, labels = logits.float(), labels[:, 0].long()
    cross_entropy = F.cross_entropy(logits, labels)
    probabilities = torch.softmax(logits, dim=1)[:, 1:].flatten(2)  # (N, K, HW)
    target = F.one_hot(labels, logits.shape[1])[..., 1:].permute(0, 3, 1, 2).flatten(2).float()
    intersection = (probabilities * target).sum(dim=2)
    soft_dice = (2 * intersection + smooth) / (probabilities.sum(dim=2) + target.sum(dim=2) + smooth)
    return cross_entropy + (1 - soft_dice).mean()


class JointAugment:
    """Random resized crop and horizontal flip on image and mask together, brightness/contrast jitter on the image.

    The crop + flip is `sonocl.augment.BatchAugment.crop_flip` (torchvision's RandomResizedCrop semantics, the same
    sampler as pretraining), applied once to the image and its mask stacked as channels of one tensor, so both see
    exactly the same geometry: the image is resampled bilinearly, the mask too and then thresholded at 0.5; a mask of
    K ≥ 2 classes is resampled as its K + 1 class planes, each pixel taking the class of the largest weight.
    """

    def __init__(
        self,
        size: int,
        scale: tuple[float, float] = (0.5, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_p: float = 0.5,
        brightness: float = 0.1,
        contrast: float = 0.2,
    ) -> None:
        self.size = size
        self.geometry = BatchAugment(AugmentConfig(crop_scale=scale, crop_ratio=ratio, flip_p=flip_p), size)
        self.brightness = brightness
        self.contrast = contrast

    def __call__(
        self, images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator, classes: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """images (N, C, S, S) float in [0, 1], masks (N, 1, S, S) class indices (binary: {0, 1}), any dtype → the
        same shapes, augmented; ``classes`` K (the largest index a mask may hold).

        Random numbers come from ``generator`` (a CPU generator gives the same augmentation on every device).
        """
        if images.shape[-2:] != (self.size, self.size) or masks.shape[-2:] != images.shape[-2:]:
            raise ValueError(
                f"expected images and masks of {self.size}×{self.size}, got {tuple(images.shape)} and {tuple(masks.shape)}"
            )
        n, channels, device = images.shape[0], images.shape[1], images.device
        if classes == 1:
            planes = masks.to(images.dtype)
        else:
            planes = F.one_hot(masks[:, 0].long(), classes + 1).permute(0, 3, 1, 2).to(images.dtype)
        both = self.geometry.crop_flip(torch.cat([images, planes], dim=1), generator)
        images, planes = both[:, :channels], both[:, channels:]
        masks = (planes > 0.5 if classes == 1 else planes.argmax(dim=1, keepdim=True)).to(masks.dtype)
        gain = 1 + (self._uniform(n, generator, device) * 2 - 1) * self.contrast
        offset = (self._uniform(n, generator, device) * 2 - 1) * self.brightness
        images = (images * gain.view(n, 1, 1, 1) + offset.view(n, 1, 1, 1)).clamp(0, 1)
        return images, masks

    @staticmethod
    def _uniform(n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        return torch.rand(n, generator=generator, device=generator.device).to(device)
