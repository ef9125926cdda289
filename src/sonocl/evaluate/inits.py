"""Encoder initialisation for downstream evaluation: ``random``, ``imagenet``, sonocl encoders and foreign checkpoints.

`load_init(spec, arch, channels, size)` returns a backbone (`sonocl.backbones`: pooled features h) and an
`InitReport` that says what was loaded and what was not. ``spec`` is one of

- ``random``;
- ``imagenet``: torchvision's ImageNet weights (`sonocl.models.load_imagenet_state`; offline, a `WeightsError`
  naming the file and where to put it);
- a sonocl run directory, training checkpoint or ``encoder.safetensors`` (`sonocl.models.load_encoder`);
- a foreign checkpoint (``.pth``/``.pt``/``.safetensors``): the released USCL / Meta-USCL files, whose backbone is
  an ``nn.Sequential`` of torchvision ResNet children (``features.0`` = conv1, ``.1`` = bn1, ``.4``–``.7`` =
  layer1–4) next to head modules (``l1``, ``l2``, ``linear``, ``fc``, ``classifier``), optionally wrapped in
  ``{'state_dict': …}`` and/or prefixed ``module.`` (DataParallel); or any torchvision-keyed ResNet state; for a
  ``timm:`` backbone, a state under timm's own key names (its classifier's keys ignored).

Foreign keys are mapped **by name** (``features.7.1.conv2.weight`` → ``layer4.1.conv2.weight``). The Meta-USCL
evaluation code maps them by position (the i-th kept key to the i-th torchvision key), which silently loads
wrong tensors whenever the two orders differ; and its Mask R-CNN loader falls back to ImageNet weights when
nothing matches (methods.md §6, quirk 24). Here every backbone tensor must be found, else `WeightsError`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sonocl.backbones import Backbone
from sonocl.models import (
    ENCODER_FILE,
    WeightsError,
    build_backbone,
    encoder_metadata,
    imagenet_weights_path,
    load_encoder,
    load_imagenet_state,
    locate_encoder,
    read_encoder_metadata,
    read_state_dict,
)

SEQUENTIAL_CHILDREN = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}
"""``features.N`` of ``nn.Sequential(*list(resnet.children())[:-1])`` → torchvision name (2 relu, 3 maxpool and
8 avgpool hold no tensors)."""
TIMM_HEADS = ("head", "fc", "classifier", "head_dist")
"""Where timm models keep their classifier (absent from a backbone built with ``num_classes=0``)."""
HEAD_PREFIXES = ("l1", "l2", "linear", "fc", "classifier", "projector", "projection", "head", "predictor")
"""Top-level modules of pretraining heads: reported as ignored, never loaded."""
_FEATURES_KEY = re.compile(r"^features\.(\d+)\.(.+)$")


@dataclasses.dataclass
class InitReport:
    """What an initialisation loaded. ``kind`` is ``random``, ``imagenet``, ``sonocl`` or ``foreign``."""

    spec: str
    kind: str
    arch: str
    channels: int
    source: str | None = None
    """The weights file actually read (``None`` for random)."""
    layout: str | None = None
    """``torchvision``, ``timm``, or ``sequential-features`` (USCL / Meta-USCL) for foreign checkpoints."""
    loaded: int = 0
    """Number of backbone tensors (parameters and buffers) taken from the file."""
    ignored: list[str] = dataclasses.field(default_factory=list)
    """Keys of the file not loaded: pretraining heads (projection, classifier) and torchvision's ``fc``."""
    defaulted: list[str] = dataclasses.field(default_factory=list)
    """Backbone buffers absent from the file and left at their defaults (only BN ``num_batches_tracked``)."""
    stripped_prefixes: list[str] = dataclasses.field(default_factory=list)
    """Wrappers removed: ``state_dict`` (dict wrapper), ``module.`` (DataParallel)…"""
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Encoder metadata of sonocl files (method, size, mean, std…)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        lines = [f"init {self.spec!r}: {self.kind}, {self.arch}, {self.channels}-channel stem"]
        if self.source:
            layout = f" ({self.layout} layout)" if self.layout else ""
            lines.append(f"  source: {self.source}{layout}")
        if self.stripped_prefixes:
            lines.append(f"  unwrapped: {', '.join(self.stripped_prefixes)}")
        lines.append(f"  loaded {self.loaded} backbone tensors")
        if self.ignored:
            lines.append(f"  ignored {len(self.ignored)} head keys: {_abbreviate(self.ignored)}")
        if self.defaulted:
            lines.append(f"  left at default: {_abbreviate(self.defaulted)}")
        return "\n".join(lines)


def _abbreviate(keys: list[str], limit: int = 6) -> str:
    return ", ".join(keys[:limit]) + (f" … (+{len(keys) - limit})" if len(keys) > limit else "")


def default_label(spec: str) -> str:
    """Label of an init in tables: ``random``, ``imagenet``, else the run directory's (or the file's) name."""
    if spec in ("random", "imagenet"):
        return spec
    path = Path(spec)
    if path.is_dir():
        return path.resolve().name
    if path.name == ENCODER_FILE:
        return path.resolve().parent.name
    if path.parent.name == "checkpoints":
        return path.resolve().parent.parent.name
    return path.stem


def load_init(
    spec: str, arch: str | None = None, channels: int = 1, size: int | None = None
) -> tuple[nn.Module, InitReport]:
    """The backbone described by ``spec`` (see the module docstring) and the report of what it loaded.

    ``arch`` is the ``--backbone`` the user gave, None when none: a sonocl encoder is then built as the backbone it
    records (one that contradicts a given ``arch`` is a `WeightsError` naming both), anything else as a resnet18.
    ``size``: the input side a ViT without a recorded one is made for (a sonocl encoder's is the one it records)."""
    if spec == "random":
        arch = arch or "resnet18"
        return build_backbone(arch, channels, size=size), InitReport(spec, "random", arch, channels)
    if spec == "imagenet":
        arch = arch or "resnet18"
        state = load_imagenet_state(arch)
        model, report = _load_foreign_state(state, spec, arch, channels, size)
        report.kind, report.source, report.layout = "imagenet", str(imagenet_weights_path(arch)), "torchvision"
        return model, report
    path = Path(spec)
    if not path.exists():
        raise WeightsError(f"--init {spec!r}: not 'random', 'imagenet', nor an existing run directory or weights file")
    if path.is_dir():
        return _load_sonocl(path, spec, arch, channels)
    raw = read_state_dict(path)
    if _is_sonocl_file(path, raw):
        return _load_sonocl(path, spec, arch, channels)
    model, report = _load_foreign_state(raw, spec, arch, channels, size)
    report.source = str(path)
    return model, report


def _is_sonocl_file(path: Path, raw: Mapping[str, Any]) -> bool:
    if path.suffix == ".safetensors":
        return {"arch", "channels"} <= encoder_metadata(path).keys()
    model = raw.get("model")
    return isinstance(model, Mapping) and any(str(k).startswith("backbone.") for k in model)


def _load_sonocl(path: Path, spec: str, arch: str | None, channels: int) -> tuple[nn.Module, InitReport]:
    """A sonocl run directory, checkpoint or encoder file, built as the backbone it records unless ``arch`` is given."""
    model = load_encoder(path, channels=channels, arch=arch)
    located = locate_encoder(path)
    metadata = read_encoder_metadata(located)
    arch = arch or str(metadata.get("arch", "resnet18"))
    loaded = len(model.state_dict())
    report = InitReport(
        spec,
        "sonocl",
        arch,
        channels,
        source=str(located),
        layout="torchvision" if Backbone.named(arch).is_resnet else "timm",
        loaded=loaded,
        metadata=_jsonable(metadata),
    )
    return model, report


def _jsonable(metadata: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metadata.items() if _is_json(v)}


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value)
    except TypeError:
        return False
    return True


def _unwrap(raw: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Tensors of a checkpoint without its ``{'state_dict': …}`` wrapper and ``module.`` prefixes."""
    stripped: list[str] = []
    state: Mapping[str, Any] = raw
    while "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
        stripped.append("state_dict")
    tensors = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    while tensors and all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
        stripped.append("module.")
    if not tensors:
        raise WeightsError("no tensors found in the checkpoint (expected a state dict, possibly under 'state_dict')")
    return tensors, stripped


def map_foreign_keys(
    state: Mapping[str, torch.Tensor], timm_keys: Collection[str] | None = None
) -> tuple[dict[str, torch.Tensor], list[str], list[str], str]:
    """Map a checkpoint's keys onto torchvision ResNet names, by name; with ``timm_keys`` (the state keys of a timm
    backbone) keep them as they are, a classifier's keys ignored.

    Returns ``(backbone state, ignored head keys, unrecognised keys, layout)``.
    """
    if timm_keys is not None:
        kept = {key: tensor for key, tensor in state.items() if key in timm_keys}
        heads = [key for key in state if key not in timm_keys and key.split(".", 1)[0] in TIMM_HEADS]
        return kept, heads, [key for key in state if key not in kept and key not in heads], "timm"
    layout = "sequential-features" if any(_FEATURES_KEY.match(k) for k in state) else "torchvision"
    backbone: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    unknown: list[str] = []
    for key, tensor in state.items():
        top = key.split(".", 1)[0]
        if layout == "sequential-features":
            match = _FEATURES_KEY.match(key)
            if match and match.group(1) in SEQUENTIAL_CHILDREN:
                backbone[f"{SEQUENTIAL_CHILDREN[match.group(1)]}.{match.group(2)}"] = tensor
            elif top in HEAD_PREFIXES:
                ignored.append(key)
            else:
                unknown.append(key)
        elif top in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4"):
            backbone[key] = tensor
        elif top in HEAD_PREFIXES:
            ignored.append(key)
        else:
            unknown.append(key)
    return backbone, ignored, unknown, layout


def _load_foreign_state(
    raw: Mapping[str, Any], spec: str, arch: str | None, channels: int, size: int | None
) -> tuple[nn.Module, InitReport]:
    arch = arch or "resnet18"
    try:
        tensors, stripped = _unwrap(raw)
    except WeightsError as error:
        raise WeightsError(f"--init {spec}: {error}") from None
    expected = build_backbone(arch, channels, size=size).state_dict()
    is_timm = not Backbone.named(arch).is_resnet
    backbone_state, ignored, unknown, layout = map_foreign_keys(tensors, expected.keys() if is_timm else None)
    if unknown:
        wanted = f"the keys of a {arch}" if is_timm else "torchvision names or USCL/Meta-USCL 'features.N.*'"
        raise WeightsError(
            f"--init {spec}: {len(unknown)} keys are neither {'timm' if is_timm else 'ResNet'} backbone nor a known "
            f"head ({_abbreviate(unknown)}); expected {wanted}"
        )
    defaulted = [k for k in expected if k not in backbone_state and k.endswith("num_batches_tracked")]
    for key in defaulted:
        backbone_state[key] = expected[key].clone()
    try:  # the first tensor of another shape (e.g. resnet50 weights into a resnet18) with both shapes, else the
        # tensors missing or left over, and the backbone the file holds when it is one
        model = build_backbone(arch, channels, backbone_state, size)
    except WeightsError as error:
        found = f"{len(backbone_state) - len(defaulted)} backbone tensors in {layout} layout"
        raise WeightsError(f"--init {spec}: {error} (found {found})") from None
    report = InitReport(
        spec,
        "foreign",
        arch,
        channels,
        layout=layout,
        loaded=len(backbone_state) - len(defaulted),
        ignored=sorted(ignored),
        defaulted=defaulted,
        stripped_prefixes=stripped,
    )
    return model, report
