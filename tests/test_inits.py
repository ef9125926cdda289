"""Init resolution: foreign USCL / Meta-USCL checkpoints mapped by name, sonocl encoders, errors."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision

from sonocl.evaluate.inits import InitReport, default_label, load_init
from sonocl.models import WeightsError, build_backbone, save_encoder


@pytest.fixture(scope="module")
def source() -> torchvision.models.ResNet:
    """A torchvision resnet18 with non-default weights and BN statistics, in eval mode."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)
    return model.eval()


def _features(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(images).flatten(1)


def _uscl_layout(model: torchvision.models.ResNet) -> dict[str, torch.Tensor]:
    """The layout of the released USCL checkpoint: features = Sequential(resnet children[:-1]), heads l1/l2/fc."""
    features = torch.nn.Sequential(*list(model.children())[:-1])
    state = {f"features.{k}": v.clone() for k, v in features.state_dict().items()}
    state.update(
        {
            "l1.weight": torch.randn(512, 512),
            "l1.bias": torch.randn(512),
            "fc.weight": torch.randn(12, 512),
            "fc.bias": torch.randn(12),
        }
    )
    return state


def _meta_uscl_layout(model: torchvision.models.ResNet) -> dict:
    """Meta-USCL: same features.N backbone, MLP head l1/l2, linear classifier, DataParallel prefix, state_dict wrapper."""
    state = {k: v for k, v in _uscl_layout(model).items() if k.startswith("features.")}
    state.update(
        {
            "l1.weight": torch.randn(512, 512),
            "l2.weight": torch.randn(128, 512),
            "linear.weight": torch.randn(3, 128),
            "classifier.bias": torch.randn(3),
        }
    )
    # Shuffle the insertion order: a by-position mapping would load wrong tensors, a by-name one must not care.
    keys = list(state)
    order = torch.randperm(len(keys), generator=torch.Generator().manual_seed(1)).tolist()
    return {"state_dict": {f"module.{keys[i]}": state[keys[i]] for i in order}, "epoch": 300}


def test_uscl_layout_by_name_gives_identical_features(tmp_path, source):
    path = tmp_path / "uscl_best_model.pth"
    torch.save(_uscl_layout(source), path)
    model, report = load_init(str(path), "resnet18", channels=3)
    images = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(
        _features(model, images), _features(torch.nn.Sequential(*list(source.children())[:-1]), images)
    )
    assert report.kind == "foreign" and report.layout == "sequential-features"
    assert report.loaded == len([k for k in source.state_dict() if not k.startswith("fc.")])
    assert report.ignored == ["fc.bias", "fc.weight", "l1.bias", "l1.weight"]
    assert report.stripped_prefixes == []


def test_meta_uscl_layout_wrapped_prefixed_shuffled(tmp_path, source):
    path = tmp_path / "best_model.pth"
    torch.save(_meta_uscl_layout(source), path)
    model, report = load_init(str(path), "resnet18", channels=1)
    grey = torch.rand(2, 1, 64, 64)
    # a 1-channel stem sums the colour kernels: identical features on a grey image copied to 3 channels
    expected = _features(torch.nn.Sequential(*list(source.children())[:-1]), grey.expand(-1, 3, -1, -1))
    torch.testing.assert_close(_features(model, grey), expected, rtol=1e-4, atol=1e-5)
    assert report.stripped_prefixes == ["state_dict", "module."]
    assert set(report.ignored) == {"l1.weight", "l2.weight", "linear.weight", "classifier.bias"}
    json.dumps(report.to_dict())
    assert "ignored 4 head keys" in str(report)


def test_missing_backbone_key_is_an_error(tmp_path, source):
    state = _uscl_layout(source)
    del state["features.7.1.conv2.weight"]
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match="layer4.1.conv2.weight"):
        load_init(str(path))


def test_unknown_keys_are_an_error(tmp_path, source):
    state = _uscl_layout(source)
    state["features.9.weight"] = torch.zeros(3)
    path = tmp_path / "odd.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match="features.9.weight"):
        load_init(str(path))


def test_missing_num_batches_tracked_is_defaulted(tmp_path, source):
    state = {k: v for k, v in _uscl_layout(source).items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "old_torch.pth"
    torch.save(state, path)
    _, report = load_init(str(path), channels=3)
    assert report.defaulted and all(k.endswith("num_batches_tracked") for k in report.defaulted)


def test_torchvision_state_reports_fc_ignored(tmp_path, source):
    path = tmp_path / "tv.pth"
    torch.save(source.state_dict(), path)
    model, report = load_init(str(path), channels=3)
    assert report.layout == "torchvision" and report.ignored == ["fc.bias", "fc.weight"]
    images = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(
        _features(model, images), _features(torch.nn.Sequential(*list(source.children())[:-1]), images)
    )


def test_sonocl_encoder_and_labels(tmp_path):
    run = tmp_path / "run_uscl"
    run.mkdir()
    backbone = build_backbone("resnet18", 1)
    save_encoder(backbone, run / "encoder.safetensors", {"arch": "resnet18", "channels": 1, "method": "uscl"})
    for spec in (str(run), str(run / "encoder.safetensors")):
        model, report = load_init(spec, channels=1)
        assert report.kind == "sonocl" and report.metadata["method"] == "uscl"
        assert default_label(spec) == "run_uscl"
        images = torch.rand(2, 1, 32, 32)
        torch.testing.assert_close(_features(model, images), _features(backbone, images), rtol=1e-4, atol=1e-5)
    checkpoints = run / "checkpoints"
    checkpoints.mkdir()
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    torch.save(
        {"model": {**state, "projector.0.weight": torch.zeros(2, 2)}, "encoder_metadata": {"method": "simclr"}},
        checkpoints / "best.pt",
    )
    model, report = load_init(str(checkpoints / "best.pt"), channels=1)
    assert report.kind == "sonocl" and report.metadata == {"method": "simclr"}
    assert default_label(str(checkpoints / "best.pt")) == "run_uscl"
    images = torch.rand(2, 1, 32, 32)
    torch.testing.assert_close(_features(model, images), _features(backbone, images))
    assert default_label("random") == "random"


def test_random_and_bad_spec():
    model, report = load_init("random", channels=1)
    assert isinstance(report, InitReport) and report.loaded == 0 and model.conv1.in_channels == 1
    with pytest.raises(WeightsError, match="not 'random'"):
        load_init("/nonexistent/encoder.pt")


def test_imagenet_offline_error_names_file(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsError, match="place the file"):
        load_init("imagenet")
