"""Grad-CAM (Selvaraju et al., ICCV 2017) with forward and tensor hooks on one layer (`sonocl.backbones.cam_target`:
a ResNet's ``layer4``, a ViT's last block's first norm, a timm CNN's last feature map).

For a class c with score y_c and the layer's activations A (``(N, K, h, w)``):
α_k = mean over (h, w) of ∂y_c/∂A_k, CAM = ReLU(Σ_k α_k A_k), upsampled bilinearly to the input size and
scaled to [0, 1] per image (an all-zero map stays zero).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class GradCAM:
    """``GradCAM(model, layer)(images, classes=None) -> (cams (N, H, W) in [0, 1], scores (N, C))``.

    ``model`` maps images ``(N, C, H, W)`` to class scores ``(N, classes)``; ``layer`` is one of its modules
    (for a torchvision ResNet, ``model.layer4`` or the backbone's), and ``to_map`` lays its output (and that
    output's gradient) out as ``(N, K, h, w)`` where it is not a map already (a ViT's tokens). ``classes`` None
    explains the predicted class. The model's mode and parameters are left as they were; hooks are removed after
    each call.
    """

    def __init__(self, model: nn.Module, layer: nn.Module, to_map: Callable[[Tensor], Tensor] | None = None) -> None:
        if not any(module is layer for module in model.modules()):
            raise ValueError("the Grad-CAM layer must be a submodule of the model")
        self.model = model
        self.layer = layer
        self.to_map = to_map

    def __call__(self, images: Tensor, classes: Tensor | None = None) -> tuple[Tensor, Tensor]:
        captured: dict[str, Tensor] = {}

        def keep(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            captured["activations"] = output
            output.register_hook(lambda grad: captured.__setitem__("gradients", grad))

        handle = self.layer.register_forward_hook(keep)
        try:
            with torch.enable_grad():
                images = images.detach().requires_grad_(True)  # gradients flow even through a frozen model
                scores = self.model(images)
                if scores.dim() != 2:
                    raise ValueError(f"the model must return (N, classes) scores, got {tuple(scores.shape)}")
                if classes is None:
                    classes = scores.argmax(dim=1)
                classes = torch.as_tensor(classes, device=scores.device).long().reshape(-1)
                chosen = scores.gather(1, classes[:, None]).sum()
                self.model.zero_grad(set_to_none=True)
                chosen.backward()
        finally:
            handle.remove()
        if "activations" not in captured or "gradients" not in captured:
            raise RuntimeError("the Grad-CAM layer did not take part in the forward pass")
        activations, gradients = captured["activations"].detach(), captured["gradients"].detach()
        if self.to_map is not None:
            activations, gradients = self.to_map(activations), self.to_map(gradients)
        alpha = gradients.mean(dim=(2, 3), keepdim=True)
        cam = F.relu((alpha * activations).sum(dim=1, keepdim=True))
        cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        peak = cam.flatten(1).max(dim=1).values.clamp(min=1e-12)[:, None, None]
        return (cam / peak).clamp(0, 1), scores.detach()


class BackboneClassifier(nn.Sequential):
    """A pooled-feature backbone (``fc = Identity``) followed by a linear head: the model Grad-CAM explains."""

    def __init__(self, backbone: nn.Module, head: nn.Linear) -> None:
        super().__init__(backbone, head)
