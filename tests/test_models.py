"""Backbones, encoder export and loading (sonocl.models)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from safetensors.torch import load_file

from sonocl import load_encoder
from sonocl.models import (
    CMWNet,
    ContrastiveModel,
    WeightsError,
    build_backbone,
    encoder_metadata,
    imagenet_weights_path,
    init_backbone,
    locate_encoder,
    save_encoder,
)


def _features(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(images)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_backbone_returns_pooled_features(arch: str) -> None:
    backbone = build_backbone(arch, channels=1)
    features = _features(backbone, torch.rand(2, 1, 32, 32))
    assert features.shape == (2, 512 if arch == "resnet18" else 2048)


def test_exported_one_channel_encoder_loads_into_plain_torchvision(tmp_path) -> None:
    torch.manual_seed(0)
    backbone = build_backbone("resnet18", channels=1)
    path = tmp_path / "encoder.safetensors"
    save_encoder(backbone, path, {"arch": "resnet18", "channels": 1, "mean": 0.5, "std": 0.25})

    reference = torchvision.models.resnet18()
    result = reference.load_state_dict(load_file(str(path)), strict=False)
    assert result.missing_keys == ["fc.weight", "fc.bias"] and not result.unexpected_keys
    reference.fc = torch.nn.Identity()

    grey = torch.rand(3, 1, 48, 48)
    torch.testing.assert_close(
        _features(reference, grey.repeat(1, 3, 1, 1)), _features(backbone, grey), atol=1e-5, rtol=1e-4
    )
    assert encoder_metadata(path)["channels"] == 1


def test_load_encoder_from_run_directory_and_checkpoint(tmp_path) -> None:
    torch.manual_seed(1)
    model = ContrastiveModel(build_backbone("resnet18", 1), 512, 64, 32, num_classes=3)
    checkpoint = {"model": model.state_dict(), "encoder_metadata": {"arch": "resnet18", "channels": 1}}
    (tmp_path / "checkpoints").mkdir()
    torch.save(checkpoint, tmp_path / "checkpoints" / "best.pt")
    images = torch.rand(2, 1, 32, 32)
    expected = _features(model.backbone, images)

    from_checkpoint = load_encoder(str(tmp_path / "checkpoints" / "best.pt"))
    torch.testing.assert_close(_features(from_checkpoint, images), expected)
    from_run = load_encoder(str(tmp_path))  # no encoder.safetensors yet: falls back to checkpoints/best.pt
    torch.testing.assert_close(_features(from_run, images), expected)

    save_encoder(model.backbone, tmp_path / "encoder.safetensors", {"arch": "resnet18", "channels": 1})
    three_channel = load_encoder(str(tmp_path), channels=3)
    assert three_channel.conv1.in_channels == 3
    torch.testing.assert_close(_features(three_channel, images.repeat(1, 3, 1, 1)), expected, atol=1e-5, rtol=1e-4)


def test_imagenet_weights_come_from_the_torch_hub_cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(WeightsError, match="place the file"):
        init_backbone("imagenet", "resnet18", channels=1)

    torch.manual_seed(2)
    colour = torchvision.models.resnet18()
    path = imagenet_weights_path("resnet18")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(colour.state_dict(), path)
    grey_model = init_backbone("imagenet", "resnet18", channels=1)
    colour.fc = torch.nn.Identity()
    grey = torch.rand(2, 1, 32, 32)
    torch.testing.assert_close(
        _features(grey_model, grey), _features(colour, grey.repeat(1, 3, 1, 1)), atol=1e-5, rtol=1e-4
    )


def test_weights_that_do_not_fit_are_refused(tmp_path) -> None:
    partial = {k: v for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith("layer4")}
    with pytest.raises(WeightsError, match="missing"):
        build_backbone("resnet18", 3, partial)
    with pytest.raises(WeightsError, match="no such"):
        load_encoder(str(tmp_path / "absent.safetensors"))


def test_cmw_net_gives_one_weight_per_pair_in_unit_interval() -> None:
    weights = CMWNet(feature_dim=8)(torch.randn(5, 8), torch.randn(5, 8))
    assert weights.shape == (5,) and bool(((weights > 0) & (weights < 1)).all())


@pytest.mark.parametrize(("export", "chosen"), [("best", "best.pt"), ("last", "last.pt")])
def test_a_run_without_its_encoder_file_gives_the_checkpoint_its_export_setting_names(tmp_path, export, chosen) -> None:
    """One rule picks the exported checkpoint (`exported_checkpoint`): the loop's, `sonocl export`'s and here."""
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    for name in ("best.pt", "last.pt"):
        (checkpoints / name).write_bytes(b"")
    (tmp_path / "config.yaml").write_text(f"method: uscl\nexport: {export}\n")
    assert locate_encoder(tmp_path) == checkpoints / chosen
    (checkpoints / "best.pt").unlink()
    assert locate_encoder(tmp_path) == checkpoints / "last.pt"
    (tmp_path / "config.yaml").write_text("export: [\n")
    with pytest.raises(WeightsError, match=r"config\.yaml: cannot read the run's configuration"):
        locate_encoder(tmp_path)
