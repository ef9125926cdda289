"""Batched augmentation: identity parameters, random-parameter statistics, determinism, mixing arithmetic."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import RandomResizedCrop

import sonocl.augment as augment_module
from sonocl.augment import AugmentConfig, BatchAugment, make_views, resize_to

IDENTITY = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, brightness=0.0, contrast=0.0)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(n: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, size, size, generator=_gen(seed))


def test_identity_parameters_reproduce_the_input():
    images = _images()
    out = BatchAugment(AugmentConfig(**IDENTITY), 32)(images, _gen())
    torch.testing.assert_close(out, images, atol=1e-5, rtol=0)


def test_flip_probability_one_mirrors_exactly():
    images = _images()
    out = BatchAugment(AugmentConfig(**{**IDENTITY, "flip_p": 1.0}), 32)(images, _gen())
    torch.testing.assert_close(out, images.flip(-1), atol=1e-5, rtol=0)


def test_flip_rate_matches_p():
    ramp = torch.linspace(0, 1, 16).expand(400, 1, 16, 16).contiguous()
    out = BatchAugment(AugmentConfig(**{**IDENTITY, "flip_p": 0.3}), 16)(ramp, _gen(1))
    flipped = out[:, 0, 0, 0] > out[:, 0, 0, -1]
    assert abs(flipped.float().mean().item() - 0.3) < 0.07


def test_crop_boxes_respect_scale_and_ratio():
    size, config = 224, AugmentConfig(crop_scale=(0.3, 0.9), crop_ratio=(0.75, 1.5))
    top, left, height, width = BatchAugment(config, size).crop_boxes(4000, _gen(2), torch.device("cpu")).unbind(1)
    area = height * width / 224**2
    ratio = width / height
    assert area.min() >= 0.3 - 0.01 and area.max() <= 0.9 + 0.01
    assert ratio.min() >= 0.75 - 0.01 and ratio.max() <= 1.5 + 0.01
    # Same distribution as torchvision's rejection sampler (which also rejects wide crops of large area).
    torch.manual_seed(0)
    reference = torch.tensor(
        [RandomResizedCrop.get_params(torch.empty(1, 224, 224), [0.3, 0.9], [0.75, 1.5]) for _ in range(4000)]
    )
    reference_area = reference[:, 2] * reference[:, 3] / 224**2
    reference_ratio = reference[:, 3] / reference[:, 2]
    assert abs(area.mean().item() - reference_area.float().mean().item()) < 0.015
    assert abs(ratio.log().mean().item() - reference_ratio.float().log().mean().item()) < 0.03
    assert (top >= 0).all() and (left >= 0).all() and (top + height <= 224).all() and (left + width <= 224).all()
    assert top.float().std() > 5 and left.float().std() > 5  # positions vary


def test_crop_content_comes_from_the_box():
    """A crop samples only inside its box: an image bright only outside a central square never brightens a
    crop that lies inside it."""
    image = torch.ones(1, 1, 64, 64)
    image[..., 8:56, 8:56] = 0.0
    size, config = (
        64,
        AugmentConfig(crop_scale=(0.05, 0.1), crop_ratio=(1.0, 1.0), flip_p=0.0, brightness=0.0, contrast=0.0),
    )
    augment = BatchAugment(config, size)
    images = image.expand(200, 1, 64, 64)
    boxes = augment.crop_boxes(200, _gen(3), torch.device("cpu"))
    out = augment(images, _gen(3))
    inside = (
        (boxes[:, 0] >= 9) & (boxes[:, 1] >= 9) & (boxes[:, 0] + boxes[:, 2] <= 55) & (boxes[:, 1] + boxes[:, 3] <= 55)
    )
    assert inside.sum() > 20
    assert out[inside].max() == 0.0 and out[~inside].amax(dim=(1, 2, 3)).gt(0).any()


def test_seeded_generator_is_deterministic_and_samples_differ():
    size, config = 24, AugmentConfig(blur_p=0.5, speckle_p=0.5)
    same = _images(1, 32).expand(8, 1, 32, 32)
    first = BatchAugment(config, size)(same, _gen(7))
    torch.testing.assert_close(first, BatchAugment(config, size)(same, _gen(7)), atol=0, rtol=0)
    assert not torch.equal(first, BatchAugment(config, size)(same, _gen(8)))
    flat = first.flatten(1)
    distances = torch.cdist(flat, flat) + torch.eye(8) * 1e9
    assert distances.min() > 1e-3  # every sample got its own parameters
    assert first.shape == (8, 1, 24, 24) and first.min() >= 0 and first.max() <= 1


def test_brightness_scales_within_range_and_contrast_keeps_the_mean():
    images = 0.2 + 0.3 * _images(300, 8)
    out = BatchAugment(AugmentConfig(**{**IDENTITY, "brightness": 0.5}), 8)(images, _gen(4))
    factor = (out / images).flatten(1)
    assert torch.allclose(factor.min(1).values, factor.max(1).values, atol=1e-4)  # one factor per image
    assert factor.min() >= 0.5 - 1e-4 and factor.max() <= 1.5 + 1e-4 and factor.std() > 0.2
    out = BatchAugment(AugmentConfig(**{**IDENTITY, "contrast": 0.5}), 8)(images, _gen(5))
    torch.testing.assert_close(out.mean(dim=(1, 2, 3)), images.mean(dim=(1, 2, 3)), atol=1e-5, rtol=0)
    spread = out.std(dim=(1, 2, 3)) / images.std(dim=(1, 2, 3))
    assert spread.min() >= 0.5 - 1e-3 and spread.max() <= 1.5 + 1e-3


def test_gamma_only_on_marked_samples():
    images = _images(6, 16)
    extra = torch.tensor([True, False] * 3)
    out = BatchAugment(AugmentConfig(**IDENTITY, gamma=0.25), 16).extra_gamma(images, _gen(6), extra)
    torch.testing.assert_close(out[~extra], images[~extra], atol=1e-5, rtol=0)
    assert (out[extra] - images[extra]).abs().amax(dim=(1, 2, 3)).min() > 1e-3


def test_the_extra_gamma_is_drawn_per_frame_so_both_views_share_it():
    """AWCL's reference applies gamma and brightness to a labelled frame, then makes its two views from it."""
    frames = (255 * _images(8, 16)).to(torch.uint8).view(8, 1, 16, 16)
    extra = torch.tensor([True, False] * 4)
    augment = BatchAugment(AugmentConfig(**IDENTITY, gamma=0.25, mean=0.0, std=1.0), 16)
    mix = torch.ones(8, 2, 1)  # both views from the item's one frame (instance items)
    view1, view2 = make_views(frames, mix, False, augment, _gen(7), extra)
    torch.testing.assert_close(view1, view2)
    unit = frames.float() / 255
    torch.testing.assert_close(view1[~extra], unit[~extra], atol=1e-5, rtol=0)
    assert (view1[extra] - unit[extra]).abs().amax(dim=(1, 2, 3)).min() > 1e-3


def test_the_second_view_takes_its_own_blur_and_solarisation_probabilities():
    """BYOL's two pipelines: here view 1 always blurred and never solarised, view 2 the opposite."""
    frames = (255 * _images(6, 16)).to(torch.uint8)
    config = AugmentConfig(**IDENTITY, blur_p=1.0, view2_blur_p=0.0, view2_solarize_p=1.0, mean=0.0, std=1.0)
    view1, view2 = make_views(frames.view(6, 1, 16, 16), torch.ones(6, 2, 1), False, BatchAugment(config, 16), _gen())
    unit = frames.float().view(6, 1, 16, 16) / 255
    assert (view1.std(dim=(1, 2, 3)) < 0.8 * unit.std(dim=(1, 2, 3))).all()  # blurred
    torch.testing.assert_close(view2, torch.where(unit >= 0.5, 1 - unit, unit), atol=1e-5, rtol=0)
    # Without view-2 settings both views draw from one pipeline, as before.
    same = BatchAugment(AugmentConfig(**IDENTITY, solarize_p=1.0, mean=0.0, std=1.0), 16)
    view1, view2 = make_views(frames.view(6, 1, 16, 16), torch.ones(6, 2, 1), False, same, _gen())
    torch.testing.assert_close(view1, view2)


def test_blur_smooths_and_speckle_adds_noise():
    images = _images(4, 32)
    blurred = BatchAugment(AugmentConfig(**IDENTITY, blur_p=1.0, blur_sigma=(1.0, 2.0)), 32)(images, _gen())
    assert (blurred.std(dim=(1, 2, 3)) < 0.6 * images.std(dim=(1, 2, 3))).all()
    torch.testing.assert_close(blurred.mean(), images.mean(), atol=0.01, rtol=0)
    flat = torch.full((4, 1, 32, 32), 0.5)
    speckled = BatchAugment(AugmentConfig(**IDENTITY, speckle_p=1.0, speckle_std=0.1), 32)(flat, _gen())
    assert abs(speckled.std().item() - 0.05) < 0.005


def test_resize_and_normalize():
    frames = torch.randint(0, 256, (3, 48, 48), dtype=torch.uint8)
    resized = resize_to(frames, 16)
    assert resized.shape == (3, 1, 16, 16) and resized.min() >= 0 and resized.max() <= 1
    torch.testing.assert_close(resize_to(frames, 48)[:, 0], frames.float() / 255)
    augment = BatchAugment(AugmentConfig(mean=0.449, std=0.226), 16, channels=3)
    normalised = augment.normalize(resized)
    assert normalised.shape == (3, 3, 16, 16)
    torch.testing.assert_close(normalised[:, 2], (resized[:, 0] - 0.449) / 0.226)


@pytest.mark.parametrize("height, width, size", [(64, 64, 16), (256, 256, 64), (40, 72, 16), (24, 24, 56)])
def test_resize_matches_torch_antialiased_bilinear(height, width, size):
    """The two-matrix-product resize gives F.interpolate's antialiased bilinear result, shrinking or enlarging."""
    frames = torch.randint(0, 256, (5, 1, height, width), dtype=torch.uint8)
    expected = F.interpolate(
        frames.float() / 255, size=(size, size), mode="bilinear", align_corners=False, antialias=True
    ).clamp(0, 1)
    torch.testing.assert_close(augment_module._unit_float(frames, size, always=True), expected, atol=1e-6, rtol=0)
    in_double = augment_module._resize(frames.double(), size)
    assert in_double.dtype == torch.float64
    torch.testing.assert_close(in_double / 255, expected.double(), atol=1e-6, rtol=0)


def test_make_views_mixing_arithmetic_with_identity_augmentation():
    frames = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    lam = torch.tensor([0.3, 0.8])
    mix = torch.stack([torch.stack([lam, 1 - lam, 0 * lam], 1), torch.stack([0 * lam, 1 - lam, lam], 1)], 1)
    augment = BatchAugment(AugmentConfig(**IDENTITY), 16)
    f = frames.float() / 255
    for augment_first in (True, False):
        view1, view2 = make_views(frames, mix, augment_first, augment, _gen())
        expected1 = lam[:, None, None] * f[:, 0] + (1 - lam[:, None, None]) * f[:, 1]
        expected2 = lam[:, None, None] * f[:, 2] + (1 - lam[:, None, None]) * f[:, 1]
        torch.testing.assert_close(view1[:, 0], (expected1 - 0.5) / 0.25, atol=1e-4, rtol=0)
        torch.testing.assert_close(view2[:, 0], (expected2 - 0.5) / 0.25, atol=1e-4, rtol=0)


def test_uscl_shares_the_augmented_anchor_frame():
    """λ = 0: both views are f2 alone; augment-first uses the one augmented f2 for both, mix-first two draws."""
    frames = torch.randint(0, 256, (4, 3, 20, 20), dtype=torch.uint8)
    mix = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]]).expand(4, 2, 3)
    augment = BatchAugment(AugmentConfig(), 16)
    view1, view2 = make_views(frames, mix, True, augment, _gen(9))
    torch.testing.assert_close(view1, view2, atol=0, rtol=0)
    view1, view2 = make_views(frames, mix, False, augment, _gen(9))
    assert (view1 - view2).abs().amax(dim=(1, 2, 3)).min() > 1e-2


def test_make_views_shapes_and_argument_errors():
    frames = torch.randint(0, 256, (5, 1, 32, 32), dtype=torch.uint8)
    augment = BatchAugment(AugmentConfig(), 64, channels=3)
    view1, view2 = make_views(frames, torch.ones(5, 2, 1), False, augment, _gen())
    assert view1.shape == view2.shape == (5, 3, 64, 64) and view1.dtype == torch.float32
    with pytest.raises(ValueError, match="mix"):
        make_views(frames, torch.ones(5, 2, 3), False, augment)
    with pytest.raises(ValueError, match="uint8"):
        make_views(frames.float(), torch.ones(5, 2, 1), False, augment)
    with pytest.raises(ValueError, match="crop_scale"):
        AugmentConfig(crop_scale=(0.9, 0.5))
