"""Backbones as records: how each is built, its feature size, and which of its parts the protocols use.

Two families, named as ``--backbone`` takes them:

- **torchvision ResNets** (``resnet18``, ``resnet34``, ``resnet50``): ``fc`` replaced by ``nn.Identity`` (the model
  returns the pooled feature h) and a 1- or 3-channel stem. Weight names are torchvision's, so every encoder file
  sonocl has written loads as it did. Last block: ``layer4[-1]``.
- **any timm model**, as ``timm:<name>`` (``timm:vit_tiny_patch16_224``, ``timm:convnext_atto``,
  ``timm:efficientnet_b0``), with model arguments if wanted (``timm:vit_tiny_patch16_224(patch_size=8)``): built with ``num_classes=0`` (the model returns its pooled, pre-logits feature),
  ``in_chans`` the run's channels and, for a model with a patch embedding (ViTs, Swin), ``img_size`` the run's
  size: a ViT's position embedding is made for the size it is trained at, and its encoder is evaluated at it by
  default; where timm offers it (``dynamic_img_size``: ViT, DeiT, EVA), other sizes work too (the position
  embedding interpolated), as for a CNN. Last
  block: the last group of timm's own fine layer grouping (``group_matcher``, the grouping its layer-wise LR decay
  uses) that holds an indexed block (``blocks.11``, ``stages.3.blocks.1``), with every group after it (the final
  norm, a head norm, a last 1×1 conv): what the papers' last-block protocol trains of a ResNet, in that family.

Nothing here downloads weights: timm models are built untrained; `sonocl.models.load_imagenet_state` is the ResNets'
ImageNet initialisation.
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import inspect
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from sonocl.errors import ConfigError

TIMM_PREFIX = "timm:"
RESNETS: dict[str, tuple[Any, int, Any]] = {
    "resnet18": (torchvision.models.resnet18, 512, torchvision.models.ResNet18_Weights.IMAGENET1K_V1),
    "resnet34": (torchvision.models.resnet34, 512, torchvision.models.ResNet34_Weights.IMAGENET1K_V1),
    "resnet50": (torchvision.models.resnet50, 2048, torchvision.models.ResNet50_Weights.IMAGENET1K_V2),
}
"""torchvision constructor, feature size and ImageNet weights of each ResNet."""
NAMES_HELP = f"{', '.join(RESNETS)}, or {TIMM_PREFIX}NAME for any timm model (e.g. {TIMM_PREFIX}vit_tiny_patch16_224)"


@dataclass(frozen=True)
class Backbone:
    """One backbone by name (see the module docstring): ``resnet18`` … or ``timm:<model>``."""

    name: str

    @classmethod
    def named(cls, name: str) -> Backbone:
        """The backbone called ``name``; an unknown name is a `ConfigError` listing what is accepted."""
        problem = name_problem(name)
        if problem:
            raise ConfigError(problem)
        return cls(name)

    @property
    def timm_name(self) -> str | None:
        """The timm model name of a ``timm:`` backbone (without its arguments), None for a torchvision ResNet."""
        return _timm_parts(self.name)[0] if self.name.startswith(TIMM_PREFIX) else None

    @property
    def timm_args(self) -> dict[str, Any]:
        """The model arguments a ``timm:NAME(key=value, …)`` backbone gives `timm.create_model`, e.g. a ViT's
        ``patch_size=8``."""
        return _timm_parts(self.name)[1] if self.name.startswith(TIMM_PREFIX) else {}

    @property
    def is_resnet(self) -> bool:
        return self.name in RESNETS

    def build(self, channels: int = 1, size: int | None = None) -> nn.Module:
        """The untrained backbone: ``(N, channels, H, W)`` images → ``(N, feature_dim)`` pooled features; ``size``
        is the input side a patch-embedding model is made for (None: timm's default)."""
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, not {channels}")
        if self.timm_name is None:
            model: nn.Module = RESNETS[self.name][0](weights=None)
            if channels != 3:
                model.conv1 = nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
            model.fc = nn.Identity()
            model.maxpool = StemMaxPool(kernel_size=3, stride=2, padding=1)
            return model
        return _timm_model(self.name, channels, size)

    @property
    def feature_dim(self) -> int:
        """The size of the pooled feature h."""
        if self.timm_name is None:
            return int(RESNETS[self.name][1])
        return _timm_shape(self.name).feature_dim

    @property
    def patch_size(self) -> int | None:
        """The patch side of a patch-embedding model (a ViT), None for any other."""
        return None if self.timm_name is None else _timm_shape(self.name).patch_size

    @property
    def takes_any_size(self) -> bool:
        """Whether inputs of any size work (a CNN; a ViT built with ``dynamic_img_size``), not only the built one."""
        return self.timm_name is None or self.patch_size is None or _timm_shape(self.name).dynamic_size

    @property
    def stem_weight(self) -> str | None:
        """The state key of the first convolution's weight (the one whose input channels are the image's):
        ``conv1.weight`` of a ResNet, timm's ``first_conv`` of its model (None where timm names none)."""
        return "conv1.weight" if self.timm_name is None else _timm_shape(self.name).stem_weight


class StemMaxPool(nn.MaxPool2d):
    """A ResNet stem's max-pool as torchvision's, computed in channels-last memory on the CPU where no gradient flows
    through it (held-out loss, monitors, evaluation features): the same values, since a maximum does not depend on the
    layout, and faster than torch's NCHW kernel, the conversions included (on a 2-core Xeon, 46 × 64 × 32 × 32: 9.6 →
    2.9 ms, a whole ResNet-18 forward at 64 px 61 → 49 ms; 1.6× for the pool at batch 128: `benchmarks/stem_pool.py`).
    With a gradient the channels-last backward costs what its forward saves, so training keeps torch's kernel; so do
    CUDA, channels-last inputs, and traced, compiled or exported graphs."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        gradient = torch.is_grad_enabled() and images.requires_grad
        if gradient or images.device.type != "cpu" or not images.is_contiguous() or _in_graph():
            return super().forward(images)
        return super().forward(images.contiguous(memory_format=torch.channels_last)).contiguous()


def _in_graph() -> bool:
    """Whether torch is tracing, compiling or exporting the module rather than running it."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()


def name_problem(name: str) -> str:
    """Why ``name`` is no backbone (one line), "" when it is one."""
    if name in RESNETS:
        return ""
    if name.startswith(TIMM_PREFIX):
        import timm

        try:
            model, arguments = _timm_parts(name)
        except ValueError as error:
            return f"backbone {name!r}: {error}"
        if not timm.is_model(model):
            close = difflib.get_close_matches(model, timm.list_models(), n=3)
            hint = f" (did you mean {' or '.join(close)}?)" if close else " (`timm.list_models()` lists them)"
            return f"backbone {name!r}: timm has no model {model!r}{hint}"
        try:
            _timm_shape(name)
        except (TypeError, ValueError, AssertionError) as error:  # an argument the model does not take or accept
            return f"backbone {name!r}: timm cannot build {model} with {arguments} ({error})"
        return ""
    return f"unknown backbone {name!r}; choose {NAMES_HELP}"


_TIMM_NAME = re.compile(r"^timm:([\w.\-]+)(?:\((.*)\))?$")


def _timm_parts(name: str) -> tuple[str, dict[str, Any]]:
    """``timm:NAME(key=value, …)`` → (NAME, {key: value}); values read as Python literals (8, 0.1, True), else
    kept as text. A name that does not read so is a ValueError."""
    match = _TIMM_NAME.match(name)
    if match is None:
        raise ValueError("write it timm:NAME or timm:NAME(key=value, ...)")
    model, listed = match.group(1), match.group(2)
    arguments: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in (listed or "").split(","))):
        key, equals, text = item.partition("=")
        if not equals or not key.strip().isidentifier():
            raise ValueError(f"{item!r} is not key=value")
        try:
            arguments[key.strip()] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            arguments[key.strip()] = text.strip()
    return model, arguments


def _timm_model(name: str, channels: int, size: int | None) -> nn.Module:
    import timm

    model, arguments = _timm_parts(name)
    shape = _timm_shape(name)
    options: dict[str, Any] = {**arguments, "pretrained": False, "num_classes": 0, "in_chans": channels}
    if size is not None and shape.patch_size is not None:
        options["img_size"] = size
    if shape.dynamic_size:
        options["dynamic_img_size"] = True
    return timm.create_model(model, **options)


@dataclass(frozen=True)
class _TimmShape:
    feature_dim: int
    patch_size: int | None
    stem_weight: str | None
    dynamic_size: bool
    """Whether the model takes ``dynamic_img_size`` (inputs of any size, the position embedding interpolated)."""


@cache
def _timm_shape(name: str) -> _TimmShape:
    """What sonocl needs of a timm model's structure, read from the model built on the meta device (no memory, no
    initialisation work)."""
    import timm

    model_name, arguments = _timm_parts(name)
    with torch.device("meta"):
        model = timm.create_model(model_name, **arguments, pretrained=False, num_classes=0, in_chans=1)
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    first_conv = getattr(model, "pretrained_cfg", {}).get("first_conv")
    features = model.num_features
    assert isinstance(features, int), f"timm's {name} states no feature size"
    return _TimmShape(
        features,
        int(patch[0]) if isinstance(patch, tuple) else patch,
        f"{first_conv}.weight" if isinstance(first_conv, str) else None,
        "dynamic_img_size" in inspect.signature(type(model).__init__).parameters,
    )


def last_block(model: nn.Module) -> list[nn.Module]:
    """The modules the last-block protocol trains (with a new head), the rest of ``model`` frozen: a torchvision
    ResNet's ``layer4[-1]``; of a timm model, the last indexed block of its fine layer grouping and what follows it
    (module docstring). A model without either is a `ConfigError` naming the protocols that still apply."""
    if isinstance(model, torchvision.models.ResNet):
        return [model.layer4[-1]]
    matcher = getattr(model, "group_matcher", None)
    if matcher is None:
        raise ConfigError(
            f"{type(model).__name__} has no layer grouping (timm's group_matcher), so its last block is not "
            "known; use the linear, knn or full protocol"
        )
    from timm.models import group_parameters

    groups = list(group_parameters(model, matcher(coarse=False)).values())
    indexed = [i for i, names in enumerate(groups) if any(_block_path(name) for name in names)]
    start = indexed[-1] if indexed else len(groups) - 1
    paths = dict.fromkeys(_block_path(name) or name.rsplit(".", 1)[0] for names in groups[start:] for name in names)
    outermost = [path for path in paths if not any(path.startswith(other + ".") for other in paths)]
    return [model.get_submodule(path) for path in outermost]


_INDEXED = re.compile(r"^(.*\.\d+)(?:\.|$)")


def _block_path(parameter: str) -> str:
    """The module path of ``parameter`` up to its last numeric component (``blocks.11.attn.qkv.weight`` →
    ``blocks.11``, ``blocks.6.0.conv_pw.weight`` → ``blocks.6.0``), "" without one (``norm.weight``)."""
    match = _INDEXED.match(parameter.rsplit(".", 1)[0] + ".")
    return match.group(1) if match else ""


@dataclass(frozen=True)
class CamTarget:
    """Where Grad-CAM looks in a backbone: ``layer``'s output as a feature map ``(N, K, h, w)`` of ``grid`` cells."""

    layer: nn.Module
    name: str
    """The layer's path in the model (``layer4``, ``blocks.11.norm1``), as the report names it."""
    grid: tuple[int, int]
    prefix_tokens: int = 0
    """Tokens before the patches (a ViT's class token): ``layer``'s output is tokens ``(N, T, K)``, not a map."""
    tokens: bool = False

    def to_map(self, output: torch.Tensor) -> torch.Tensor:
        """``layer``'s output (or its gradient) as ``(N, K, h, w)``: a ViT's patch tokens laid out on their grid."""
        if not self.tokens:
            return output
        patches = output[:, self.prefix_tokens :]
        return patches.transpose(1, 2).reshape(len(output), -1, *self.grid)


def cam_target(model: nn.Module, channels: int, size: int) -> CamTarget:
    """The Grad-CAM layer of ``model`` at ``size`` px: a torchvision ResNet's ``layer4``; a ViT's last block's
    first norm (its patch tokens reach the pooled class token only through that block's attention; after it, the
    patch tokens no longer touch the output, so their gradient is zero); any other timm model's last top-level
    module whose output is a feature map. A model without one is a `ConfigError`."""
    if isinstance(model, torchvision.models.ResNet):
        return CamTarget(model.layer4, "layer4", _map_sides(model, {"layer4": model.layer4}, channels, size)["layer4"])
    blocks, embed = getattr(model, "blocks", None), getattr(model, "patch_embed", None)
    if isinstance(blocks, nn.Sequential) and embed is not None and hasattr(blocks[-1], "norm1"):
        rows, columns = (int(side) for side in embed.grid_size)
        prefix = int(getattr(model, "num_prefix_tokens", 1))
        name = f"blocks.{len(blocks) - 1}.norm1"
        return CamTarget(model.get_submodule(name), name, (rows, columns), prefix, tokens=True)
    maps = _map_sides(model, dict(model.named_children()), channels, size)
    if not maps:
        raise ConfigError(f"{type(model).__name__} has no feature-map layer sonocl can take Grad-CAM on")
    name = list(maps)[-1]
    return CamTarget(model.get_submodule(name), name, maps[name])


def _map_sides(model: nn.Module, layers: dict[str, nn.Module], channels: int, size: int) -> dict[str, tuple[int, int]]:
    """``(h, w)`` of each of ``layers`` whose output is a feature map ``(N, K, h, w)`` for a ``size`` px input, in
    the order they run (one forward pass in eval mode, without gradients; the model's mode is left as it was)."""
    sides: dict[str, tuple[int, int]] = {}

    def record(name: str, output: object) -> None:
        if isinstance(output, torch.Tensor) and output.dim() == 4:
            sides[name] = (int(output.shape[-2]), int(output.shape[-1]))

    handles = [
        layer.register_forward_hook(lambda _module, _inputs, output, name=name: record(name, output))
        for name, layer in layers.items()
    ]
    try:
        with _evaluating(model):
            model(torch.zeros(1, channels, size, size))
    finally:
        for handle in handles:
            handle.remove()
    return sides


@contextlib.contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode without gradients within the block, its mode restored after it."""
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()
            yield
    finally:
        model.train(was_training)


def feature_maps(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Feature maps ``(N, K_i, h_i, w_i)`` of ``model`` from fine to coarse, for a segmentation decoder: a ResNet's
    stem and four stages (strides 2, 4, 8, 16, 32); a timm CNN's stages (timm's ``forward_intermediates``); a ViT's
    four evenly spaced blocks on its patch grid, resampled to 1/4, 1/2, 1 and 2 patches (strides 4, 8, 16, 32 for
    16 px patches): a simple feature pyramid without parameters (bilinear up, max-pool down), the decoder's
    convolutions learn on it. A model without intermediates is a `ConfigError`."""
    if isinstance(model, torchvision.models.ResNet):
        stem = model.relu(model.bn1(model.conv1(images)))
        maps = [stem, model.layer1(model.maxpool(stem))]
        for stage in (model.layer2, model.layer3, model.layer4):
            maps.append(stage(maps[-1]))
        return maps
    intermediates = getattr(model, "forward_intermediates", None)
    if intermediates is None:
        raise ConfigError(f"{type(model).__name__} gives no intermediate feature maps (timm's forward_intermediates)")
    blocks = getattr(model, "blocks", None)
    if getattr(model, "patch_embed", None) is None or not isinstance(blocks, nn.Sequential):
        return list(intermediates(images, output_fmt="NCHW", intermediates_only=True))
    picks = sorted({max(0, len(blocks) * quarter // 4 - 1) for quarter in (1, 2, 3, 4)})
    grids = intermediates(images, indices=picks, output_fmt="NCHW", intermediates_only=True)
    return [_rescaled(grid, 2.0 ** (2 - i)) for i, grid in enumerate(grids)]


def _rescaled(grid: torch.Tensor, factor: float) -> torch.Tensor:
    if factor > 1:
        return F.interpolate(grid, scale_factor=factor, mode="bilinear", align_corners=False)
    return F.max_pool2d(grid, 2, ceil_mode=True) if factor < 1 else grid


def feature_channels(model: nn.Module) -> list[int]:
    """The channels of `feature_maps`, from one forward pass of a blank image at a size the model takes."""
    config: dict[str, Any] = getattr(model, "pretrained_cfg", {"first_conv": "conv1"})  # a torchvision ResNet: conv1
    stem = model.get_submodule(str(config.get("first_conv")))
    assert isinstance(stem, nn.Conv2d), f"{type(model).__name__}'s first_conv is no convolution"
    embed = getattr(model, "patch_embed", None)
    side = tuple(embed.img_size) if embed is not None and getattr(embed, "img_size", None) else (64, 64)
    with _evaluating(model):
        maps = feature_maps(model, torch.zeros(1, stem.in_channels, *side))
    return [int(grid.shape[1]) for grid in maps]
