"""MAE (`sonocl.methods.mae`): the loss against a float64 reference written out by hand, the masking, an encoder that
sees only the visible patches, the refusal of a non-ViT backbone, and a pretraining run that exports a ViT encoder
and resumes with its decoder."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import method_config, tiny_pretrain, tiny_sets
from sonocl.cli import main
from sonocl.errors import ConfigError
from sonocl.methods import get_method
from sonocl.methods.mae import (
    MAE,
    encode_visible,
    random_masking,
    reconstruction_loss,
    visible_count,
    vit_structure,
)
from sonocl.models import ContrastiveModel, build_backbone, load_encoder

VIT8 = "timm:vit_tiny_patch16_224(patch_size=8)"
"""A ViT-Tiny with 8 px patches: a 4 × 4 grid at 32 px, 4 of its 16 patches visible at the paper's ratio."""
SHALLOW = "timm:vit_tiny_patch16_224(patch_size=8, depth=2)"
"""The same with 2 of its 12 blocks, for the tests in float64."""


def _mae(pixel_target: str = "normalised", channels: int = 3) -> tuple[ContrastiveModel, MAE]:
    """A 32 px two-block ViT-Tiny/8 of ``channels`` channels and MAE's objective for it (a 2-block decoder 32 wide),
    in float64."""
    cfg = method_config(
        "mae",
        size=32,
        model={"backbone": SHALLOW, "channels": channels},
        options={"pixel_target": pixel_target, "decoder_dim": 32, "decoder_heads": 2},
    )
    torch.manual_seed(0)
    model = ContrastiveModel(build_backbone(SHALLOW, channels, size=32), 192, projection_hidden=8, projection_dim=4)
    objective = get_method("mae").objective(cfg, model, None)
    assert isinstance(objective, MAE)
    return model.double(), objective.double()


@pytest.mark.parametrize("pixel_target", ["normalised", "plain"])
def test_the_loss_is_the_papers_written_out_by_hand_in_float64(pixel_target: str) -> None:
    """Hidden = every patch but the 4 of lowest noise; target = the patch's pixels in (row, column, channel) order,
    standardised by their own mean and unbiased variance (+1e-6) for the normalised target; loss = the squared error
    per pixel, averaged over a patch, then over the hidden patches of the batch."""
    model, objective = _mae(pixel_target)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, 32, 32, generator=g, dtype=torch.float64)
    noise = torch.rand(3, 16, generator=g, dtype=torch.float64)
    prediction, mask = objective.predict(model, images, noise)
    loss = objective.reconstruction(model, images, noise)
    assert prediction.shape == (3, 16, 8 * 8 * 3) and prediction.dtype == torch.float64

    predicted, pixel = prediction.tolist(), images.tolist()
    total, hidden_patches = 0.0, 0
    for n in range(3):
        ranked = sorted(range(16), key=lambda patch: float(noise[n, patch]))
        hidden = set(ranked[4:])
        assert {p for p in range(16) if mask[n, p] == 1} == hidden and int(mask[n].sum()) == 12
        for patch in sorted(hidden):
            row, column = divmod(patch, 4)
            pixels = [pixel[n][c][8 * row + i][8 * column + j] for i in range(8) for j in range(8) for c in range(3)]
            if pixel_target == "normalised":
                mean = sum(pixels) / len(pixels)
                var = sum((x - mean) ** 2 for x in pixels) / (len(pixels) - 1)
                pixels = [(x - mean) / math.sqrt(var + 1e-6) for x in pixels]
            total += sum((predicted[n][patch][k] - x) ** 2 for k, x in enumerate(pixels)) / len(pixels)
            hidden_patches += 1
    assert loss.dtype == torch.float64
    assert float(loss.detach()) == pytest.approx(total / hidden_patches, rel=1e-12, abs=0)


@pytest.mark.parametrize(("patches", "ratio", "visible"), [(196, 0.75, 49), (16, 0.75, 4), (10, 0.9, 1), (64, 0.6, 25)])
def test_masking_keeps_exactly_the_visible_share_and_the_loss_ignores_visible_patches(
    patches: int, ratio: float, visible: int
) -> None:
    assert visible_count(patches, ratio) == visible  # ⌊L·(1 − ratio)⌋, 10 · (1 − 0.9) = 0.99… included
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(5, patches, generator=g, dtype=torch.float64)
    kept, mask = random_masking(noise, visible)
    assert kept.shape == (5, visible) and all(len(set(row.tolist())) == visible for row in kept)
    assert torch.equal(mask.sum(dim=1), torch.full((5,), float(patches - visible), dtype=torch.float64))
    assert torch.all(mask.gather(1, kept) == 0)

    prediction = torch.randn(5, patches, 12, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randn(5, patches, 12, generator=g, dtype=torch.float64)
    loss = reconstruction_loss(prediction, target, mask, normalise=True)
    (grad,) = torch.autograd.grad(loss, prediction)
    seen = ~mask.bool()
    assert torch.all(grad[seen] == 0) and torch.all(grad[~seen].abs().sum(dim=-1) > 0)
    changed = torch.where(seen[..., None], target + 100.0, target)  # the visible patches' pixels count for nothing
    assert torch.equal(reconstruction_loss(prediction, changed, mask, normalise=True), loss)


def test_the_encoder_sees_only_visible_tokens_and_the_decoder_puts_them_back_in_place() -> None:
    model, objective = _mae(channels=1)
    vit, decoder = model.backbone, objective.decoder
    g = torch.Generator().manual_seed(2)
    images = torch.randn(2, 1, 32, 32, generator=g, dtype=torch.float64)
    noise = torch.rand(2, 16, generator=g, dtype=torch.float64)
    kept, mask = random_masking(noise, objective.visible)

    seen: dict[str, torch.Tensor] = {}
    hooks = [
        vit.blocks[0].register_forward_pre_hook(lambda module, args: seen.__setitem__("encoder", args[0])),
        decoder.blocks[0].register_forward_pre_hook(lambda module, args: seen.__setitem__("decoder", args[0])),
    ]
    try:
        latent = encode_visible(vit, images, kept)
        objective.predict(model, images, noise)
    finally:
        for hook in hooks:
            hook.remove()
    assert seen["encoder"].shape == (2, 1 + 4, 192)  # the class token and the 4 visible patches, nothing else

    hidden_patch = int(mask[0].nonzero()[0])  # a hidden patch of image 0: its pixels cannot change the encoding
    row, column = divmod(hidden_patch, 4)
    changed = images.clone()
    changed[0, :, 8 * row : 8 * row + 8, 8 * column : 8 * column + 8] += 5.0
    torch.testing.assert_close(encode_visible(vit, changed, kept), latent, rtol=0, atol=0)
    visible_patch = int(kept[0, 0])
    row, column = divmod(visible_patch, 4)
    changed[0, :, 8 * row : 8 * row + 8, 8 * column : 8 * column + 8] += 5.0
    assert not torch.allclose(encode_visible(vit, changed, kept)[0], latent[0])

    embedded = decoder.embed(latent)  # the decoder's input: each visible token at its patch, a mask token elsewhere
    expected = decoder.mask_token.expand(2, 16, -1).clone()
    for n in range(2):
        for k, patch in enumerate(kept[n].tolist()):
            expected[n, patch] = embedded[n, 1 + k]
    torch.testing.assert_close(seen["decoder"][:, 1:], expected + decoder.position)
    torch.testing.assert_close(seen["decoder"][:, 0], embedded[:, 0])  # the class token, without a position

    everything = torch.arange(16).expand(2, -1)  # nothing hidden: timm's own forward, token for token
    torch.testing.assert_close(encode_visible(vit, images, everything), vit.forward_features(images))


def test_a_backbone_that_is_not_a_vit_is_refused_in_one_line(phantom_store, tmp_path: Path, capsys) -> None:
    for backbone in ("resnet18", "timm:convnext_atto", "timm:swin_tiny_patch4_window7_224"):
        with pytest.raises(ConfigError) as refused:
            vit_structure(backbone, 1, 224)
        message = str(refused.value)
        assert "\n" not in message and backbone in message and "--backbone timm:vit_tiny_patch16_224" in message
    cfg = method_config("mae", size=32, options={"mask_ratio": 0.9})  # 16 px patches at 32 px: 0 of 4 visible
    with pytest.raises(ConfigError, match=r"mask_ratio 0.9 leaves 0 of the 4 patches of a 32 px image visible"):
        get_method("mae").objective(cfg, None, None)

    argv = ["pretrain", "--store", str(phantom_store.root), "--method", "mae", "--backbone", "resnet18",
            "--out", str(tmp_path / "run"), *tiny_pretrain("--threads", "1", *tiny_sets(knn_frames=2))]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "resnet18 is not a ViT" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_two_steps_export_the_vit_and_a_resumed_run_trains_on_with_the_saved_decoder(
    phantom_store, tmp_path: Path
) -> None:
    from sonocl.train.checkpoint import load_checkpoint

    argv = ["pretrain", "--store", str(phantom_store.root), "--method", "mae", "--backbone", VIT8,
            "--out", str(tmp_path), *tiny_pretrain("--threads", "1", *tiny_sets(knn_frames=2))]  # fmt: skip
    assert main([*argv, "--steps", "2"]) == 0
    rows = [line.split(",") for line in (tmp_path / "metrics.csv").read_text().splitlines()]
    part = rows[0].index("part_reconstruction")
    steps = [row for row in rows[1:] if row[0] == "step"]
    assert len(steps) == 2 and all(math.isfinite(float(row[part])) for row in steps)

    encoder = load_encoder(tmp_path).eval()  # the run's ViT itself, as every sonocl encoder loads
    with torch.no_grad():
        assert encoder(torch.rand(2, 1, 32, 32)).shape == (2, 192)
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    backbone = {k[len("backbone.") :]: v for k, v in state["model"].items() if k.startswith("backbone.")}
    assert all(torch.equal(encoder.state_dict()[k], v) for k, v in backbone.items())
    decoder = {k: v for k, v in state["objective"].items() if k.startswith("decoder.")}
    assert "decoder.mask_token" in decoder and "decoder.blocks.1.attn.qkv.weight" in decoder

    def optimiser_steps(state: dict) -> tuple[set[int], int]:
        """The step counts of the parameters the optimiser holds state for, and how many those are."""
        held = state["optimizer"]["state"]
        return {int(entry["step"]) for entry in held.values()}, len(held)

    # the optimiser trains the backbone and the decoder, and nothing else: MAE's model has no projector
    assert not any(k.startswith("projector.") for k in state["model"])
    parameters = sum(len(group["params"]) for group in state["optimizer"]["param_groups"])
    assert parameters == len(list(encoder.parameters())) + len(decoder)
    assert optimiser_steps(state) == ({2}, len(list(encoder.parameters())) + len(decoder))

    assert main([*argv, "--steps", "3", "--resume"]) == 0
    resumed = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert optimiser_steps(resumed) == ({3}, len(list(encoder.parameters())) + len(decoder))  # restored, then one more
    assert not torch.equal(resumed["objective"]["decoder.mask_token"], decoder["decoder.mask_token"])
