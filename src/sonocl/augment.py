"""Batched on-device augmentation, mixing and normalisation of greyscale ultrasound frames.

The reference code augments one PIL image at a time in DataLoader workers. Here a whole batch is augmented
at once on the device of its tensors, each sample with its own random parameters drawn from one
``torch.Generator``: a single ``grid_sample`` does every random resized crop and flip, the intensity
transforms are element-wise. The pipeline follows torchvision's (``docs/methods.md`` §1.4, §2.4, §3.3):
Resize(size) → RandomResizedCrop(size, scale, ratio) → HorizontalFlip → ColorJitter(brightness, contrast)
→ [Gaussian blur] → [solarisation] → [speckle] → Normalize, with saturation and hue left out (no effect on grey
images). Blur and solarisation may take other probabilities for the second view (BYOL's two pipelines).

Multi-crop (DINO): with ``local_crops`` > 0 a third pipeline cuts that many small crops of each item
(`make_local_views`), smaller in area and side than the two views, with their own blur and no solarisation (DINO's
``local_transfo``). With the default ``local_crops`` 0 nothing of it runs and the two views are drawn as before.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sonocl.errors import ConfigError

_CROP_ATTEMPTS = 10  # as torchvision's RandomResizedCrop.get_params
VIEW2_FIELDS = ("view2_blur_p", "view2_solarize_p")
LOCAL_SHARE = 96 / 224
"""A local crop's side as a share of the views' side when ``local_size`` is not set: DINO's 96 px beside 224."""


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation parameters: the ``augment`` section of a pretraining configuration (the presets live with the
    methods, ``sonocl/methods/``). The output size and the stem's channels are the model's, given to `BatchAugment`."""

    crop_scale: tuple[float, float] = (0.8, 1.0)
    crop_ratio: tuple[float, float] = (0.8, 1.25)
    flip_p: float = 0.5
    brightness: float = 0.8
    contrast: float = 0.8
    jitter_p: float = 1.0
    gamma: float = 0.0
    """AWCL's extra gamma and brightness, each U(1−g, 1+g), applied first to the samples marked ``extra``."""
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    """Solarisation: grey values ≥ 0.5 inverted (x → 1 − x), torchvision's ``solarize`` at its threshold 128/255."""
    view2_blur_p: float | None = None
    view2_solarize_p: float | None = None
    """The second view's blur and solarisation probabilities where they differ from the first's (BYOL's two
    pipelines); None: the same. Only where each view is augmented on its own (not with ``augment_first``)."""
    speckle_p: float = 0.0
    speckle_std: float = 0.1
    """Multiplicative speckle: x · (1 + std · n), n ~ N(0, 1) per pixel."""
    local_crops: int = 0
    """Multi-crop: small crops of each item besides its two views (DINO's ``local_crops_number``); 0: none. Only an
    objective that reads them (DINO's) uses them."""
    local_crop_scale: tuple[float, float] = (0.05, 0.4)
    """The local crops' area, as a share of the frame (DINO's ``local_crops_scale``)."""
    local_size: int | None = None
    """The local crops' side in pixels (None: `LOCAL_SHARE` of the views' side; a run raises it to the smallest side
    its backbone takes, `sonocl.train.replay.local_crop_side`)."""
    local_blur_p: float = 0.5
    """The local crops' blur probability (their flip and jitter are the views'; they are never solarised)."""
    mean: float = 0.5
    std: float = 0.25

    def __post_init__(self) -> None:
        checks = {
            "crop_scale": 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1,
            "crop_ratio": 0 < self.crop_ratio[0] <= self.crop_ratio[1],
            "blur_sigma": 0 < self.blur_sigma[0] <= self.blur_sigma[1],
            "local_crop_scale": 0 < self.local_crop_scale[0] <= self.local_crop_scale[1] <= 1,
            "local_crops": self.local_crops >= 0,
            "local_size": self.local_size is None or self.local_size >= 1,
            **{
                name: 0 <= getattr(self, name) <= 1
                for name in ("flip_p", "jitter_p", "blur_p", "solarize_p", "speckle_p", "local_blur_p")
            },
            **{name: getattr(self, name) is None or 0 <= getattr(self, name) <= 1 for name in VIEW2_FIELDS},
            **{name: getattr(self, name) >= 0 for name in ("brightness", "contrast", "speckle_std")},
            "gamma": 0 <= self.gamma < 1,
            "std": self.std > 0,
        }
        rules = {
            "crop_scale": "0 < low ≤ high ≤ 1",
            "local_crop_scale": "0 < low ≤ high ≤ 1",
            "local_crops": "≥ 0",
            "local_size": "≥ 1 pixel, or none",
            "crop_ratio": "0 < low ≤ high",
            "blur_sigma": "0 < low ≤ high",
            "gamma": "0 ≤ gamma < 1",
            "std": "> 0",
            "brightness": "≥ 0",
            "contrast": "≥ 0",
            "speckle_std": "≥ 0",
        }
        failed = [
            f"{name}={getattr(self, name)} (need {rules.get(name, 'a probability in [0, 1]')})"
            for name, ok in checks.items()
            if not ok
        ]
        if failed:
            raise ConfigError("invalid " + ", ".join(failed))

    def local_pipeline(self) -> AugmentConfig:
        """The local crops' augmentation: these parameters with the local crop scale and blur, no solarisation and one
        pipeline for every crop (DINO's ``local_transfo``)."""
        return dataclasses.replace(
            self,
            crop_scale=self.local_crop_scale,
            blur_p=self.local_blur_p,
            solarize_p=0.0,
            view2_blur_p=None,
            view2_solarize_p=None,
            local_crops=0,
        )


def local_side(size: int, config: AugmentConfig) -> int:
    """The side of the local crops beside views of side ``size``: ``config.local_size``, else `LOCAL_SHARE` of it."""
    return config.local_size or max(1, round(size * LOCAL_SHARE))


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """n draws of U(low, high) from ``generator`` (on its own device), moved to ``device``."""
    source = generator.device if generator is not None else device
    return (low + (high - low) * torch.rand(n, generator=generator, device=source)).to(device)


def _bernoulli(n: int, p: float | Tensor, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """n draws of Bernoulli(p); ``p`` a number or one probability per draw (on ``device``)."""
    return _uniform(n, 0.0, 1.0, generator, device) < p


def _possible(p: float | Tensor) -> bool:
    return bool((p > 0).any()) if isinstance(p, Tensor) else p > 0


def resize_to(frames_u8: Tensor, size: int) -> Tensor:
    """``(N, S, S)`` uint8 → ``(N, 1, size, size)`` float in [0, 1] (bilinear, antialiased when shrinking)."""
    if frames_u8.dim() != 3 or frames_u8.dtype != torch.uint8:
        raise ValueError(f"resize_to expects (N, S, S) uint8 frames, got {tuple(frames_u8.shape)} {frames_u8.dtype}")
    return _unit_float(frames_u8.unsqueeze(1), size, always=True)


def _needs_resize(height: int, width: int, size: int, always: bool) -> bool:
    """The crop samples the frame bilinearly in normalised coordinates, which is the reference's
    Resize(size) → RandomResizedCrop(size) in one interpolation; a 2-tap bilinear sample only aliases once
    the frame is at least twice the output, so only then is it first shrunk (cheaply: the output is small)."""
    return (height, width) != (size, size) and (always or max(height, width) >= 2 * size)


def _unit_float(frames_u8: Tensor, size: int, always: bool = False) -> Tensor:
    """``(N, 1, H, W)`` uint8 → float in [0, 1], resized to ``size`` as `_shrink` would (the 1/255 folded in)."""
    height, width = frames_u8.shape[-2:]
    if _needs_resize(height, width, size, always):
        return _resize(frames_u8, size, scale=1.0 / 255.0).clamp_(0.0, 1.0)
    return frames_u8.float().div_(255.0)


def _shrink(images: Tensor, size: int) -> Tensor:
    """Antialiased bilinear resize of float ``(N, 1, H, W)`` to ``size``, only when shrinking ≥ 2× (`_needs_resize`)."""
    height, width = images.shape[-2:]
    if not _needs_resize(height, width, size, always=False):
        return images
    return _resize(images, size).clamp_(0.0, 1.0)


@functools.lru_cache(maxsize=32)
def _resize_weights(length: int, size: int, device: torch.device) -> Tensor:
    """``(size, length)``: the weights with which ``F.interpolate(mode="bilinear", antialias=True)`` makes each of
    ``size`` output pixels from an axis of ``length`` pixels (its response to each unit impulse)."""
    impulses = torch.eye(length, device=device).view(length, 1, 1, length)
    response = F.interpolate(impulses, size=(1, size), mode="bilinear", align_corners=False, antialias=True)
    return response.view(length, size).T.contiguous()


def _resize(images: Tensor, size: int, scale: float = 1.0) -> Tensor:
    """``(N, 1, H, W)`` → ``(N, 1, size, size)`` times ``scale`` (float32 from integers): the same result as
    ``F.interpolate(mode="bilinear", antialias=True)`` (to float rounding), computed as two matrix products with
    its separable weights, which on the CPU is 1.5–2× faster than its kernel on greyscale batches."""
    n, _, height, width = images.shape
    values = images.reshape(n, height, width)
    values = values if values.is_floating_point() else values.float()
    rows = _resize_weights(height, size, images.device).to(values.dtype)
    columns = _resize_weights(width, size, images.device).T.to(values.dtype) * scale
    return (rows @ (values @ columns)).unsqueeze(1)


class BatchAugment(nn.Module):
    """Random resized crop, flip, brightness/contrast jitter, optional blur and speckle, for a whole batch.

    ``forward`` takes ``(N, 1, H, W)`` floats in [0, 1] (any H, W: the crop box is in normalised coordinates of
    the whole frame, which implies the reference's Resize to ``size`` before the crop) and returns ``(N, 1, size, size)`` floats in [0, 1], not normalised; ``normalize``
    does that. Random parameters are drawn per sample from ``generator`` (on the generator's device, then
    moved to the images' device; pass a generator on the images' device to keep noise generation there).
    """

    def __init__(
        self,
        config: AugmentConfig,
        size: int,
        channels: int = 1,
        local_size: int | None = None,
        frame_size: int | None = None,
    ) -> None:
        super().__init__()
        if size < 1 or channels not in (1, 3):
            raise ConfigError(f"BatchAugment needs size ≥ 1 and 1 or 3 channels, not {size} and {channels}")
        self.config = config
        self.size = size
        self.channels = channels
        """3: the normalised grey image is copied to three channels (ImageNet-style stems)."""
        self.frame_size = frame_size or size
        """The side a frame at least twice as large is shrunk to before the crop: ``size``; the local crops' pipeline
        shrinks to the views' side instead, as its small boxes would lose their detail at its own."""
        self.local = (
            BatchAugment(config.local_pipeline(), local_size or local_side(size, config), channels, frame_size=size)
            if config.local_crops
            else None
        )
        """The local crops' pipeline (`make_local_views`) at side ``local_size`` (None: `local_side`); None without
        local crops."""

    def forward(self, images: Tensor, generator: torch.Generator | None = None, second: Tensor | None = None) -> Tensor:
        """Augment ``images`` ``(N, 1, H, W)``, each sample with its own draws. ``second`` ``(N,)`` bool marks the
        second views, which take the ``view2_*`` probabilities. AWCL's extra gamma is `extra_gamma`, applied by
        `make_views` to the frames before their views are made."""
        if images.dim() != 4 or images.shape[1] != 1 or not images.is_floating_point():
            raise ValueError(
                f"BatchAugment expects (N, 1, H, W) float images, got {tuple(images.shape)} {images.dtype}"
            )
        cfg = self.config
        images = _shrink(images, self.frame_size)
        n, device = images.shape[0], images.device
        images = self.crop_flip(images, generator)
        if cfg.jitter_p > 0 and (cfg.brightness > 0 or cfg.contrast > 0):
            images = self._jitter(images, generator)
        blur_p, solarize_p = (self._per_view(name, second, device) for name in ("blur_p", "solarize_p"))
        if _possible(blur_p):
            images = torch.where(
                _bernoulli(n, blur_p, generator, device)[:, None, None, None], self._blur(images, generator), images
            )
        if _possible(solarize_p):
            solarized = torch.where(images >= 0.5, 1.0 - images, images)
            images = torch.where(_bernoulli(n, solarize_p, generator, device)[:, None, None, None], solarized, images)
        if cfg.speckle_p > 0:
            images = self._speckle(images, generator)
        return images

    def crop_boxes(self, n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
        """``(n, 4)`` crop boxes (top, left, height, width) in pixels of the ``size`` image, torchvision semantics:
        up to 10 attempts at area ~ U(scale) and log-ratio ~ U(log ratio), else the centred fallback."""
        cfg, size = self.config, self.size
        area = size * size * _uniform(n * _CROP_ATTEMPTS, *cfg.crop_scale, generator, device).view(n, _CROP_ATTEMPTS)
        low, high = cfg.crop_ratio
        log_ratio = _uniform(n * _CROP_ATTEMPTS, math.log(low), math.log(high), generator, device).view(
            n, _CROP_ATTEMPTS
        )
        ratio = torch.exp(log_ratio)
        width = torch.round(torch.sqrt(area * ratio))
        height = torch.round(torch.sqrt(area / ratio))
        fits = (width > 0) & (width <= size) & (height > 0) & (height <= size)
        first = fits.float().argmax(dim=1, keepdim=True)
        width, height = width.gather(1, first).squeeze(1), height.gather(1, first).squeeze(1)
        fallback_w, fallback_h = float(size), float(size)
        if cfg.crop_ratio[0] > 1:
            fallback_h = float(round(size / cfg.crop_ratio[0]))
        elif cfg.crop_ratio[1] < 1:
            fallback_w = float(round(size * cfg.crop_ratio[1]))
        found = fits.any(dim=1)
        width = torch.where(found, width, torch.full_like(width, fallback_w))
        height = torch.where(found, height, torch.full_like(height, fallback_h))
        top = torch.floor(_uniform(n, 0.0, 1.0, generator, device) * (size - height + 1)).clamp_(max=size - height)
        left = torch.floor(_uniform(n, 0.0, 1.0, generator, device) * (size - width + 1)).clamp_(max=size - width)
        return torch.stack([top, left, height, width], dim=1)

    def crop_flip(self, images: Tensor, generator: torch.Generator | None) -> Tensor:
        """Random resized crop (`crop_boxes`) and horizontal flip (``flip_p``) of ``(N, C, H, W)`` to
        ``(N, C, size, size)``, bilinear: one ``grid_sample`` for all crops, the output pixel centres mapped into
        each sample's crop box. Every channel of a sample gets the same geometry (segmentation stacks its mask as a
        channel: `sonocl.evaluate.unet.JointAugment`).

        The box is in pixels of the ``size`` image, i.e. in normalised coordinates of the whole frame, so the
        input may have any resolution. The grid is axis-aligned, so it is built from two broadcast vectors
        (``affine_grid`` costs more than the sampling on the CPU).
        """
        n, size, device = images.shape[0], self.size, images.device
        top, left, height, width = self.crop_boxes(n, generator, device).unbind(1)
        flip = _bernoulli(n, self.config.flip_p, generator, device)
        centres = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) * (2.0 / size) - 1.0
        x = (torch.where(flip, -width, width) / size)[:, None] * centres + ((2 * left + width) / size - 1)[:, None]
        y = (height / size)[:, None] * centres + ((2 * top + height) / size - 1)[:, None]
        grid = torch.stack([x[:, None, :].expand(n, size, size), y[:, :, None].expand(n, size, size)], dim=-1)
        return F.grid_sample(images, grid.to(images.dtype), mode="bilinear", padding_mode="border", align_corners=False)

    def _jitter(self, images: Tensor, generator: torch.Generator | None) -> Tensor:
        """torchvision ColorJitter(brightness, contrast) on grey: both in a random order per sample, each
        ``clamp(a·x + b·mean(x))`` (brightness a = f, b = 0; contrast a = f, b = 1 − f around the image's mean)."""
        cfg, n, device = self.config, images.shape[0], images.device
        applied = _bernoulli(n, cfg.jitter_p, generator, device)
        f_b = _uniform(n, max(0.0, 1 - cfg.brightness), 1 + cfg.brightness, generator, device)
        f_c = _uniform(n, max(0.0, 1 - cfg.contrast), 1 + cfg.contrast, generator, device)
        contrast_first = _bernoulli(n, 0.5, generator, device)
        one, zero = torch.ones_like(f_b), torch.zeros_like(f_b)
        f_b, f_c = torch.where(applied, f_b, one), torch.where(applied, f_c, one)
        steps = (
            (torch.where(contrast_first, f_c, f_b), torch.where(contrast_first, 1 - f_c, zero)),
            (torch.where(contrast_first, f_b, f_c), torch.where(contrast_first, zero, 1 - f_c)),
        )
        for (
            scale,
            shift,
        ) in steps:  # in place: ``images`` is the crop's fresh output (a broadcast addcmul is 2-3× slower)
            mean = images.mean(dim=(1, 2, 3))
            images.mul_(scale[:, None, None, None]).add_((shift * mean)[:, None, None, None]).clamp_(0.0, 1.0)
        return images

    def _per_view(self, name: str, second: Tensor | None, device: torch.device) -> float | Tensor:
        """The probability ``name`` of each sample: the second views' own where ``view2_<name>`` is set."""
        first, other = getattr(self.config, name), getattr(self.config, f"view2_{name}")
        if second is None or other is None or other == first:
            return first
        return torch.where(second.to(device=device, dtype=torch.bool), other, first)

    def extra_gamma(self, images: Tensor, generator: torch.Generator | None, extra: Tensor | None) -> Tensor:
        """AWCL's extra gamma and brightness, each U(1−g, 1+g) per sample, on the samples ``extra`` marks (all when
        None); the identity when ``gamma`` is 0."""
        if self.config.gamma <= 0:
            return images
        g, n, device = self.config.gamma, images.shape[0], images.device
        gamma = _uniform(n, 1 - g, 1 + g, generator, device)
        gain = _uniform(n, 1 - g, 1 + g, generator, device)
        if extra is not None:
            extra = extra.to(device=device, dtype=torch.bool)
            gamma, gain = torch.where(extra, gamma, 1.0), torch.where(extra, gain, 1.0)
        return (images.clamp(min=0.0).pow(gamma[:, None, None, None]) * gain[:, None, None, None]).clamp_(0.0, 1.0)

    def _blur(self, images: Tensor, generator: torch.Generator | None) -> Tensor:
        """Separable Gaussian blur, σ ~ U(blur_sigma) per sample, one grouped convolution per axis."""
        n, size, device = images.shape[0], self.size, images.device
        sigma = _uniform(n, *self.config.blur_sigma, generator, device)
        radius = min(math.ceil(3 * self.config.blur_sigma[1]), (size - 1) // 2)
        offsets = torch.arange(-radius, radius + 1, device=device, dtype=images.dtype)
        kernel = torch.exp(-0.5 * (offsets[None, :] / sigma[:, None]) ** 2)
        kernel = (kernel / kernel.sum(dim=1, keepdim=True)).to(images.dtype)
        grouped = images.reshape(1, n, size, size)
        grouped = F.conv2d(F.pad(grouped, (radius, radius, 0, 0), mode="reflect"), kernel[:, None, None, :], groups=n)
        grouped = F.conv2d(F.pad(grouped, (0, 0, radius, radius), mode="reflect"), kernel[:, None, :, None], groups=n)
        return grouped.reshape(n, 1, size, size)

    def _speckle(self, images: Tensor, generator: torch.Generator | None) -> Tensor:
        cfg, n, device = self.config, images.shape[0], images.device
        applied = _bernoulli(n, cfg.speckle_p, generator, device)
        source = generator.device if generator is not None else device
        noise = torch.randn(images.shape, generator=generator, device=source, dtype=images.dtype).to(device)
        factor = 1 + cfg.speckle_std * noise * applied[:, None, None, None]
        return (images * factor).clamp_(0.0, 1.0)

    def normalize(self, images: Tensor) -> Tensor:
        """``(N, 1, s, s)`` in [0, 1] → ``(N, channels, s, s)`` standardised with the method's mean and std."""
        normalised = (images - self.config.mean) / self.config.std
        return normalised.expand(-1, 3, -1, -1).contiguous() if self.channels == 3 else normalised


def _batch_frames(frames_u8: Tensor, mix: Tensor | np.ndarray, size: int) -> tuple[Tensor, Tensor]:
    """A gathered batch's frames ``(B, k, S, S)`` uint8 as ``(B·k, 1, H, W)`` floats in [0, 1] (shrunk to ``size``
    when at least twice it: resizing is linear, so mixing before or after it is the same) and its ``mix``
    ``(B, 2, k)`` as a float tensor on their device; a wrong shape or type is a ValueError."""
    if frames_u8.dim() != 4 or frames_u8.dtype != torch.uint8:
        raise ValueError(f"frames_u8 must be (B, k, S, S) uint8, got {tuple(frames_u8.shape)} {frames_u8.dtype}")
    b, k, height, width = frames_u8.shape
    mix = torch.as_tensor(mix, dtype=torch.float32, device=frames_u8.device)
    if mix.shape != (b, 2, k):
        raise ValueError(f"mix must be (B, 2, k) = ({b}, 2, {k}) for these frames, got {tuple(mix.shape)}")
    return _unit_float(frames_u8.reshape(b * k, 1, height, width), size), mix


def make_views(
    frames_u8: Tensor,
    mix: Tensor | np.ndarray,
    augment_first: bool,
    augment: BatchAugment,
    generator: torch.Generator | None = None,
    extra: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The two normalised views ``(B, C, size, size)`` of a `PairBatch` whose frames were gathered.

    ``frames_u8`` ``(B, k, S, S)`` uint8 on the device; ``mix`` ``(B, 2, k)`` (tensor or array). Frames at
    least twice ``size`` are shrunk to ``size`` first (resizing is linear, so mixing before or after it is the
    same). With
    ``augment_first`` each of the B·k frames is augmented once and then mixed, so a frame shared by both
    views (USCL's f2) enters both with the same crop and jitter; otherwise the raw frames are mixed and each
    of the 2B mixed images is augmented independently. ``extra`` ``(B,)`` marks the items whose frames get the extra
    gamma (`BatchAugment.extra_gamma`), drawn once per frame before anything else, as AWCL's reference transforms a
    labelled frame before it makes the two views: both views of an item share it.
    """
    frames, mix = _batch_frames(frames_u8, mix, augment.size)
    b, _, k = mix.shape
    size, (height, width) = augment.size, frames.shape[-2:]
    per_frame = None if extra is None else extra.to(frames.device).repeat_interleave(k)
    frames = augment.extra_gamma(frames, generator, per_frame)
    if augment_first:
        frames = augment(frames, generator).view(b, k, size, size)
        views = torch.einsum("bvk,bkhw->bvhw", mix, frames)
    else:
        mixed = torch.einsum("bvk,bkhw->bvhw", mix, frames.view(b, k, height, width))
        second = torch.tensor([False, True], device=frames.device).repeat(b)  # (b, 2) flattened: view 2 of each item
        views = augment(mixed.reshape(2 * b, 1, height, width), generator, second).view(b, 2, size, size)
    return augment.normalize(views[:, 0:1]), augment.normalize(views[:, 1:2])


def make_local_views(
    frames_u8: Tensor, mix: Tensor | np.ndarray, augment: BatchAugment, generator: torch.Generator | None = None
) -> Tensor | None:
    """The normalised local crops of a `PairBatch` whose frames were gathered (multi-crop: L =
    ``augment.config.local_crops`` > 0), ``(L·B, C, s, s)`` at the local side s, crop-major (rows i·B … (i+1)·B − 1
    are every item's i-th crop); None without local crops.

    Crop i of an item is cut from the raw image of its view i mod 2 (its frames mixed as ``mix`` says, before any
    augmentation): DINO's one frame for every crop, video-DINO's two frames half the crops each. Drawn after
    `make_views` from the same generator, the two views stay the draws they are without local crops.
    """
    local = augment.local
    if local is None:
        return None
    frames, mix = _batch_frames(frames_u8, mix, augment.size)
    b, _, k = mix.shape
    height, width = frames.shape[-2:]
    sources = torch.einsum("bvk,bkhw->vbhw", mix, frames.view(b, k, height, width))  # the views' raw images
    count = augment.config.local_crops
    crops = sources[torch.arange(count, device=sources.device) % 2].reshape(count * b, 1, height, width)
    return local.normalize(local(crops, generator))
