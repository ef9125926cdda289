"""Grad-CAM on a hand-built toy model, and the linear head the report explains."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from sonocl.report.gradcam import GradCAM


def _toy_model() -> nn.Sequential:
    """Input channel c → feature channel c (1×1 identity + ReLU) → global mean → class c's score. So class 0 is driven
    only by what is bright in input channel 0, class 1 only by input channel 1."""
    layer = nn.Conv2d(2, 2, kernel_size=1, bias=False)
    head = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(2)[:, :, None, None])
        head.weight.copy_(torch.eye(2))
    return nn.Sequential(layer, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)


def _two_blobs() -> torch.Tensor:
    image = torch.zeros(1, 2, 16, 16)
    image[0, 0, 2:6, 2:6] = 1.0  # class 0's evidence: top left
    image[0, 1, 10:14, 9:15] = 0.8  # class 1's evidence: bottom right
    return image


def test_gradcam_highlights_the_region_that_drives_each_class() -> None:
    model = _toy_model().eval()
    image = _two_blobs()
    cam = GradCAM(model, model[0])
    for target, (rows, columns) in ((0, (slice(2, 6), slice(2, 6))), (1, (slice(10, 14), slice(9, 15)))):
        maps, scores = cam(image, torch.tensor([target]))
        heat = maps[0]
        assert heat.shape == (16, 16) and 0.0 <= float(heat.min()) and float(heat.max()) == pytest.approx(1.0)
        inside = torch.zeros(16, 16, dtype=torch.bool)
        inside[rows, columns] = True
        assert float(heat[inside].mean()) > 0.9
        assert float(heat[~inside].max()) < 0.3, "the other class's blob must not light up"
        peak = np.unravel_index(int(heat.argmax()), heat.shape)
        assert inside[peak]
    assert scores.shape == (1, 2)


def test_gradcam_defaults_to_the_predicted_class_and_leaves_the_model_alone() -> None:
    model = _toy_model().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    image = _two_blobs()
    maps, scores = GradCAM(model, model[0])(image)
    assert int(scores.argmax()) == 1  # class 1's evidence is larger (24 px × 0.8 > 16 px × 1)
    assert float(maps[0, 10:14, 9:15].mean()) > 0.9 and float(maps[0, 2:6, 2:6].max()) < 0.3
    assert model.training and not model[0]._forward_hooks
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_gradcam_on_a_resnet_layer4_batch() -> None:
    from sonocl.models import build_backbone
    from sonocl.report.gradcam import BackboneClassifier

    torch.manual_seed(0)
    model = BackboneClassifier(build_backbone("resnet18", 1), nn.Linear(512, 3)).eval()
    maps, scores = GradCAM(model, model[0].layer4)(torch.randn(2, 1, 64, 64))
    assert maps.shape == (2, 64, 64) and scores.shape == (2, 3)
    assert torch.isfinite(maps).all() and float(maps.min()) >= 0 and float(maps.max()) <= 1


def test_gradcam_rejects_a_layer_outside_the_model() -> None:
    with pytest.raises(ValueError, match="submodule"):
        GradCAM(_toy_model(), nn.Conv2d(1, 1, 1))


@pytest.mark.parametrize("classes", [2, 3])
def test_linear_head_reproduces_the_logistic_regression(classes: int) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from sonocl.report.analysis import linear_head

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(classes), 20)
    features = rng.normal(size=(len(labels), 6)) * 3 + labels[:, None] + 5
    scaler = StandardScaler().fit(features)
    classifier = LogisticRegression(max_iter=1000).fit(scaler.transform(features), labels)
    head = linear_head(classifier, scaler, classes)
    with torch.no_grad():
        probabilities = torch.softmax(head(torch.from_numpy(features).float()), dim=1).numpy()
    np.testing.assert_allclose(probabilities, classifier.predict_proba(scaler.transform(features)), atol=1e-4)
