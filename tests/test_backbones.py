"""Backbones as records (`sonocl.backbones`): torchvision ResNets and any timm model, for every method, evaluation
protocol and encoder file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from conftest import tiny_pretrain, tiny_sets
from sonocl.backbones import Backbone, last_block, name_problem
from sonocl.cli import main
from sonocl.errors import ConfigError
from sonocl.evaluate.finetune import FineTuneModel
from sonocl.losses import GroupInfoNCE
from sonocl.methods import meta_step, method_names
from sonocl.models import CMWNet, ContrastiveModel, build_backbone, load_encoder, read_encoder_metadata

VIT, CONVNEXT = "timm:vit_tiny_patch16_224", "timm:convnext_atto"
VIT_ONLY = ("mae",)
"""Methods that need a ViT (MAE masks its patches): refused on the other backbones."""


def _names(model: nn.Module, modules: list[nn.Module]) -> list[str]:
    path = {id(module): name for name, module in model.named_modules()}
    return [path[id(module)] for module in modules]


@pytest.mark.parametrize(
    ("method", "arch"),
    [(m, a) for m in method_names() for a in ("resnet18", VIT, CONVNEXT) if a == VIT or m not in VIT_ONLY],
)
def test_every_method_trains_two_steps_on_every_backbone_and_exports_an_encoder(
    method: str, arch: str, phantom_store, tmp_path: Path
) -> None:
    extra = ["--set", "model.predictor_hidden=64"] if method == "byol" else []
    argv = ["pretrain", "--store", str(phantom_store.root), "--method", method, "--backbone", arch,
            "--out", str(tmp_path), *tiny_pretrain("--threads", "1", *tiny_sets(knn_frames=2), *extra), "--steps", "2"]  # fmt: skip
    assert main(argv) == 0
    rows = [line.split(",") for line in (tmp_path / "metrics.csv").read_text().splitlines()]
    loss = rows[0].index("loss")
    steps = [row for row in rows[1:] if row[0] == "step"]
    assert len(steps) == 2 and all(math.isfinite(float(row[loss])) for row in steps)
    metadata = read_encoder_metadata(tmp_path)
    assert metadata["arch"] == arch
    encoder = load_encoder(tmp_path).eval()
    images = torch.rand(2, metadata["channels"], 32, 32)  # 3 for AWCL's preset (grey as RGB), else 1
    with torch.no_grad():
        features = encoder(images)
    assert features.shape == (2, Backbone.named(arch).feature_dim)
    if arch.startswith("timm:"):  # the encoder file loads into plain timm, as trained (its channels, 32 px)
        size = {"img_size": 32} if arch == VIT else {}
        plain = timm.create_model(arch[5:], num_classes=0, in_chans=metadata["channels"], **size)
        from safetensors.torch import load_file

        plain.load_state_dict(load_file(str(tmp_path / "encoder.safetensors")))
        with torch.no_grad():
            torch.testing.assert_close(plain.eval()(images), features)


@pytest.mark.parametrize("arch", ["resnet18", CONVNEXT])
@pytest.mark.parametrize("method", VIT_ONLY)
def test_a_vit_only_method_refuses_another_backbone_in_one_line(
    method: str, arch: str, phantom_store, tmp_path: Path, capsys
) -> None:
    argv = ["pretrain", "--store", str(phantom_store.root), "--method", method, "--backbone", arch,
            "--out", str(tmp_path), *tiny_pretrain("--threads", "1", *tiny_sets(knn_frames=2)), "--steps", "2"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{arch} is not a ViT" in err[0] and "timm:vit_" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "metrics.csv").exists()


def test_a_backbone_record_states_features_patch_and_stem() -> None:
    vit = Backbone.named(VIT)
    assert (vit.feature_dim, vit.patch_size, vit.stem_weight) == (192, 16, "patch_embed.proj.weight")
    convnext = Backbone.named(CONVNEXT)
    assert (convnext.feature_dim, convnext.patch_size, convnext.stem_weight) == (320, None, "stem.0.weight")
    resnet = Backbone.named("resnet50")
    assert (resnet.feature_dim, resnet.is_resnet, resnet.stem_weight) == (2048, True, "conv1.weight")
    model = vit.build(1, 48)  # a ViT is made for the run's size: 3 × 3 patches and the class token
    assert model.pos_embed.shape == (1, 10, 192) and model(torch.rand(2, 1, 48, 48)).shape == (2, 192)


def test_a_resnet_stem_pools_in_channels_last_only_without_a_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    """Evaluation pools the stem in channels-last memory (faster on the CPU), training in torch's NCHW: the same
    values and the same gradients as torchvision's max-pool, with ties (the flat regions of a scan) included."""
    model = Backbone.named("resnet18").build(1)
    stem = torch.rand(4, 64, 32, 32).round(decimals=1)  # many equal values in each window
    torchvision_pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    layouts: list[bool] = []
    pool = F.max_pool2d

    def recording(images: torch.Tensor, *args, **kwargs):
        layouts.append(images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous())
        return pool(images, *args, **kwargs)

    monkeypatch.setattr(F, "max_pool2d", recording)
    with torch.no_grad():
        pooled = model.maxpool(stem)
    assert layouts == [True] and pooled.is_contiguous()
    assert torch.equal(pooled, pool(stem, 3, 2, 1))
    trained, reference = stem.clone().requires_grad_(), stem.clone().requires_grad_()
    weights = torch.randn(4, 64, 16, 16)
    (model.maxpool(trained) * weights).sum().backward()
    assert layouts == [True, False]
    monkeypatch.undo()
    (torchvision_pool(reference) * weights).sum().backward()
    assert torch.equal(trained.grad, reference.grad)


@pytest.mark.parametrize(
    ("arch", "expected"),
    [
        ("resnet18", ["layer4.1"]),
        (VIT, ["blocks.11", "norm"]),
        (CONVNEXT, ["stages.3.blocks.1", "head.norm"]),
        ("timm:efficientnet_b0", ["blocks.6.0", "conv_head", "bn2"]),
        ("timm:mobilenetv3_small_050", ["blocks.5.0", "conv_head"]),
    ],
)
def test_the_last_block_of_each_family(arch: str, expected: list[str]) -> None:
    with torch.device("meta"):
        model = Backbone.named(arch).build(1, 64)
    assert sorted(_names(model, last_block(model))) == sorted(expected)


def test_unknown_backbones_are_one_line_with_a_suggestion(phantom_store, tmp_path: Path, capsys) -> None:
    assert "did you mean vit_tiny_patch16_224" in name_problem("timm:vit_tiny_patch16_22")
    assert "choose resnet18, resnet34, resnet50, or timm:NAME" in name_problem("vgg16")
    with pytest.raises(ConfigError, match="timm has no model"):
        Backbone.named("timm:no_such_net")
    argv = ["pretrain", "--store", str(phantom_store.root), "--method", "simclr", "--backbone", "timm:convnext_attto",
            "--out", str(tmp_path / "r")]  # fmt: skip
    assert main(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "convnext_atto" in err[0] and "Traceback" not in err[0]


@pytest.mark.parametrize(
    ("protocol", "trained"), [("linear", []), ("last-block", ["blocks.11", "norm"]), ("full", None)]
)
def test_fine_tuning_a_vit_trains_only_what_the_protocol_says(protocol: str, trained: list[str] | None) -> None:
    torch.manual_seed(0)
    vit = build_backbone(VIT, 1, size=32)
    model = FineTuneModel(vit, 3, protocol, freeze_bn=True)
    model.train()
    F.cross_entropy(model(torch.rand(4, 1, 32, 32)), torch.tensor([0, 1, 2, 0])).backward()
    learning = {name for name, p in vit.named_parameters() if p.grad is not None}
    if trained is None:
        assert learning == {name for name, _ in vit.named_parameters()}
    else:  # by owner: "blocks.11.attn.qkv.weight" → blocks.11, "norm.bias" → norm
        owners = {".".join(name.split(".")[: 2 if name.startswith("blocks.") else 1]) for name in learning}
        assert owners == set(trained)
    assert model.head.weight.grad is not None
    if protocol == "last-block":  # the frozen rest stays in eval mode (no dropout, as the frozen stages of a ResNet)
        assert vit.blocks[-1].training and not vit.blocks[0].training and not vit.patch_embed.training


def test_a_timm_encoder_file_loads_with_three_channels_giving_the_grey_features(tmp_path: Path) -> None:
    from sonocl.models import save_encoder

    torch.manual_seed(0)
    grey = build_backbone(CONVNEXT, 1, size=32).eval()
    path = tmp_path / "encoder.safetensors"
    save_encoder(
        grey, path, {"arch": CONVNEXT, "channels": 1, "size": 32, "mean": 0.5, "std": 0.25, "method": "simclr"}
    )
    colour = load_encoder(path, channels=3).eval()
    images = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(colour(images.expand(-1, 3, -1, -1)), grey(images), rtol=1e-4, atol=1e-5)


def test_meta_uscl_hypergradient_on_a_vit_matches_the_unrolled_one_in_float64() -> None:
    """The meta step's forward-mode JVP through attention (its math form) against the create-graph unrolled
    hypergradient, on a one-block ViT in float64."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=8, patch_size=4, in_chans=1, num_classes=0, embed_dim=8, depth=1, num_heads=2)
    model = ContrastiveModel(vit, 8, projection_hidden=6, projection_dim=4).double().train()
    cmw = CMWNet(8, hidden_dim=5).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9, weight_decay=1e-2)
    loss = GroupInfoNCE(0.5)
    g = torch.Generator().manual_seed(1)
    v1, v2, m1, m2 = (torch.randn(6, 1, 8, 8, generator=g, dtype=torch.float64) for _ in range(4))
    group, prior = torch.tensor([0, 1, 1, 2, 3, 3]), torch.rand(6, generator=g, dtype=torch.float64) + 0.5

    theta = {name: p.detach().clone().requires_grad_() for name, p in model.named_parameters()}
    with sdpa_kernel(SDPBackend.MATH):  # the fused kernels have no double backward either
        (h1, z1), (h2, z2) = functional_call(model, theta, (v1,)), functional_call(model, theta, (v2,))
        weighted = loss(z1, z2, positive_group=group, weight=cmw(h1.detach(), h2.detach()) * prior)
        grads = torch.autograd.grad(weighted, list(theta.values()), create_graph=True)
        virtual = {n: t.detach() - 0.3 * (grad + 1e-2 * t.detach()) for (n, t), grad in zip(theta.items(), grads)}
        meta_loss = loss(functional_call(model, virtual, (m1,))[1], functional_call(model, virtual, (m2,))[1])
        expected = torch.autograd.grad(meta_loss, list(cmw.parameters()))

    (h1, z1), (h2, z2) = model(v1), model(v2)
    result = meta_step.cmw_meta_gradient(
        model, cmw, loss, v1, v2, h1, h2, z1, z2, group, prior, m1, m2, optimizer, None, meta_positive_group=None
    )
    torch.testing.assert_close(result.meta_loss, meta_loss.detach(), rtol=1e-8, atol=1e-10)
    assert any(grad.abs().max() > 0 for grad in expected)
    for got, want in zip(result.cmw_grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10 * max(1.0, float(want.abs().max())))


@pytest.mark.parametrize(
    ("arch", "layer", "grid"),
    [("resnet18", "layer4", (2, 2)), (VIT, "blocks.11.norm1", (4, 4)), (CONVNEXT, "norm_pre", (2, 2))],
)
def test_gradcam_on_every_family_explains_with_a_map_of_its_grid(arch: str, layer: str, grid: tuple) -> None:
    from sonocl.backbones import cam_target
    from sonocl.report.gradcam import BackboneClassifier, GradCAM

    torch.manual_seed(0)
    backbone = build_backbone(arch, 1, size=64).eval()
    target = cam_target(backbone, 1, 64)
    assert (target.name, target.grid) == (layer, grid) and not backbone.training
    model = BackboneClassifier(backbone, nn.Linear(Backbone.named(arch).feature_dim, 3)).eval()
    maps, scores = GradCAM(model, target.layer, target.to_map)(torch.randn(2, 1, 64, 64))
    assert maps.shape == (2, 64, 64) and scores.shape == (2, 3)
    assert torch.isfinite(maps).all() and float(maps.min()) >= 0 and float(maps.max()) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("arch", "channels", "strides"),
    [
        ("resnet18", [64, 64, 128, 256, 512], [2, 4, 8, 16, 32]),
        (VIT, [192] * 4, [4, 8, 16, 32]),  # four blocks as a simple pyramid
        (CONVNEXT, [40, 80, 160, 320], [4, 8, 16, 32]),
    ],
)
def test_every_family_gives_a_unet_its_feature_maps(arch: str, channels: list[int], strides: list[int]) -> None:
    from sonocl.backbones import feature_channels, feature_maps
    from sonocl.evaluate.unet import UNet

    torch.manual_seed(0)
    backbone = build_backbone(arch, 1, size=64).train()
    assert feature_channels(backbone) == channels and backbone.training
    maps = feature_maps(backbone, torch.rand(2, 1, 64, 64))
    assert [64 // grid.shape[-1] for grid in maps] == strides
    model = UNet(backbone)
    logits = model(torch.rand(2, 1, 64, 64))
    assert logits.shape == (2, 1, 64, 64)
    logits.mean().backward()  # the decoder's gradient reaches the backbone's first layer
    assert next(backbone.parameters()).grad is not None


def test_model_arguments_in_the_name_reach_timm_and_travel_with_the_encoder(tmp_path: Path) -> None:
    from sonocl.models import save_encoder

    arch = "timm:vit_tiny_patch16_224(patch_size=8, drop_path_rate=0.0)"
    spec = Backbone.named(arch)
    assert (spec.timm_name, spec.timm_args, spec.patch_size) == (
        "vit_tiny_patch16_224",
        {"patch_size": 8, "drop_path_rate": 0.0},
        8,
    )
    model = spec.build(1, 32).eval()
    assert model.patch_embed.grid_size == (4, 4)
    save_encoder(model, tmp_path / "e.safetensors", {"arch": arch, "channels": 1, "size": 32, "mean": 0.5, "std": 0.25})
    images = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(load_encoder(tmp_path / "e.safetensors").eval()(images), model(images))
    assert "is not key=value" in name_problem("timm:vit_tiny_patch16_224(patch_size)")
    assert "unexpected keyword argument 'patch_sise'" in name_problem("timm:vit_tiny_patch16_224(patch_sise=8)")


@pytest.mark.parametrize("arch", [VIT, CONVNEXT])
def test_segment_trains_a_unet_on_a_timm_backbone(arch: str, tmp_path: Path) -> None:
    from test_segment import _synthetic_dataset, tiny_segment

    images, masks, _ = _synthetic_dataset(tmp_path, count=8)
    out = tmp_path / "segment"
    argv = tiny_segment(images, masks, "--init", "random", "--backbone", arch, "--overlays", "0", "--out", str(out))
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    [init] = results["inits"]
    assert init["init_report"]["arch"] == arch and 0.0 <= init["summary"]["dice"]["mean"] <= 1.0
