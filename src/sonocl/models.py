"""Backbones loaded from weights, heads, and encoder files.

A backbone is built as its record in `sonocl.backbones` says (a torchvision ResNet or any timm model), returning
the pooled feature h. Greyscale ultrasound can use a 1-channel stem (``channels=1``, a third of the stem's work).
Exported ResNet encoders always carry the 3-channel stem torchvision expects, with the 1-channel kernel copied into
each input channel and divided by 3, which gives identical features on a grey image copied to three channels; so a
ResNet's ``encoder.safetensors`` loads into a plain ``torchvision.models.resnet18()``. A timm encoder keeps the
channels it was trained with (its header records them, as timm's ``in_chans``).
"""

from __future__ import annotations

import json
import os
import pickle
import urllib.error
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torchvision
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

from sonocl.backbones import RESNETS, Backbone, name_problem
from sonocl.errors import UserError
from sonocl.files import atomic_write
from sonocl.options import load_yaml_text

ENCODER_FILE = "encoder.safetensors"
RECORDED_KEYS = ("arch", "channels", "size", "mean", "std", "method")
"""Metadata keys sonocl writes (JSON-encoded) into an encoder file's header (`save_encoder`)."""


class WeightsError(UserError, RuntimeError):
    """Weights that cannot be found or do not fit; the message names the file and the fix."""


def _imagenet_url(arch: str) -> str:
    if arch not in RESNETS:
        raise WeightsError(
            f"ImageNet weights are offered for the torchvision ResNets ({', '.join(RESNETS)}), not {arch}; start "
            "a timm backbone from random or from a weights file (--init PATH)"
        )
    return str(RESNETS[arch][2].url)


def imagenet_weights_path(arch: str) -> Path:
    """Where torchvision's weights API caches the ImageNet weights of ``arch``."""
    url = _imagenet_url(arch)
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def load_imagenet_state(arch: str) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights for ``arch``: from the torch hub cache, downloaded there when online."""
    path = imagenet_weights_path(arch)
    if not path.exists():
        url = _imagenet_url(arch)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, str(path), progress=False)
        except (urllib.error.URLError, OSError) as error:
            raise WeightsError(
                f"ImageNet weights for {arch} are not cached and cannot be downloaded ({error}); "
                f"place the file from {url} at {path} (or set TORCH_HOME)"
            ) from error
    return torch.load(path, map_location="cpu", weights_only=True)


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or of a ``torch.save`` file (loaded with ``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    _refuse_empty(path)
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as error:
            raise WeightsError(_unreadable_safetensors(path, error)) from None
    return safe_torch_load(path, WeightsError)


def _refuse_empty(path: Path) -> None:
    if path.stat().st_size == 0:
        raise WeightsError(f"{path}: empty file (0 bytes), not weights; copy or export it again")


def _unreadable_safetensors(path: Path, error: Exception) -> str:
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return f"{path}: not a readable safetensors file ({reason}): cut short or damaged; copy or export it again"


def safe_torch_load(path: Path, error_type: type[Exception]) -> Any:
    """``torch.load(path, weights_only=True)``; a file that is not a plain tensor checkpoint raises ``error_type``
    with one line naming it (a pickle that would run code is refused, never executed)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only load failed" not in str(error).lower():
            raise error_type(f"{path}: not a readable weights file (not a torch checkpoint)") from None
        raise error_type(
            f"{path}: holds Python objects that would run code when loaded, so sonocl refuses it. If you trust the file, "
            f"convert it once: torch.save(torch.load(PATH, weights_only=False)['state_dict'], NEW) (or the dict's "
            f"tensors), then use NEW"
        ) from None
    except Exception as error:  # torch raises several types for a file that is not a checkpoint at all
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise error_type(f"{path}: not a readable weights file ({first_line})") from None


def _fit_stem(
    state: Mapping[str, torch.Tensor], channels: int, key: str | None = "conv1.weight"
) -> dict[str, torch.Tensor]:
    """Adapt the stem's weight ``key`` to ``channels`` inputs: 3→1 sums the colour kernels, 1→3 spreads the grey one
    (the same features on a grey image copied to three channels)."""
    state = dict(state)
    weight = state.get(key) if key else None
    if key and weight is not None and weight.shape[1] != channels:
        if channels == 1:
            state[key] = weight.sum(dim=1, keepdim=True)
        else:
            state[key] = weight.repeat(1, channels, 1, 1) / channels
    return state


def build_backbone(
    arch: str = "resnet18",
    channels: int = 1,
    state: Mapping[str, torch.Tensor] | None = None,
    size: int | None = None,
) -> nn.Module:
    """The backbone ``arch`` (`sonocl.backbones`) with a ``channels``-input stem, made for ``size`` px inputs where
    that matters (a ViT), optionally loaded from ``state``.

    ``state`` uses the family's own key names (torchvision's ``conv1.weight``, ``layer4.1.bn2.bias``…; timm's);
    the stem is fitted to ``channels`` (`_fit_stem`), a ResNet's ``fc.*`` keys are ignored, and every other key
    must be present.
    """
    spec = Backbone.named(arch)
    model = spec.build(channels, size)
    if state is not None:
        backbone_state = _fit_stem(state, channels, spec.stem_weight)
        if spec.is_resnet:
            backbone_state = {k: v for k, v in backbone_state.items() if not k.startswith("fc.")}
        misfit = _misfit(arch, _shapes(model), backbone_state)
        if misfit:
            raise WeightsError(f"{misfit}; {_fit_hint(backbone_state, channels)}")
        model.load_state_dict(backbone_state)
    return model


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def _misfit(arch: str, shapes: Mapping[str, tuple[int, ...]], state: Mapping[str, torch.Tensor]) -> str:
    """Why ``state`` does not load into a backbone of these tensor ``shapes`` (one line), "" when it does: the first
    tensor of another shape, else the tensors missing, else those it has no place for."""
    for key, shape in shapes.items():
        if key in state and tuple(state[key].shape) != shape:
            return f"tensor {key} is {tuple(state[key].shape)} in the file but {shape} in a {arch}"
    missing = [key for key in shapes if key not in state]
    if missing:
        return f"{_count(missing)} of a {arch} missing from the file ({_some(missing)})"
    unexpected = [key for key in state if key not in shapes]
    if unexpected:
        return f"the file holds {_count(unexpected)} a {arch} has no place for ({_some(unexpected)})"
    return ""


def _count(keys: list[str]) -> str:
    return f"{len(keys)} tensor{'s' if len(keys) != 1 else ''}"


def _some(keys: list[str], limit: int = 3) -> str:
    return ", ".join(keys[:limit]) + (f" … (+{len(keys) - limit})" if len(keys) > limit else "")


def _fit_hint(state: Mapping[str, torch.Tensor], channels: int) -> str:
    """Which backbone ``state`` is, as the fix: ``pass --backbone resnet50``; else a question."""
    for arch in RESNETS:
        with torch.device("meta"):  # shapes only: no memory, no initialisation work
            shapes = _shapes(build_backbone(arch, channels))
        needed = {
            key: shape for key, shape in shapes.items() if not key.endswith("num_batches_tracked") or key in state
        }
        if not _misfit(arch, needed, state):
            return f"the file holds a {arch}: pass --backbone {arch}"
    return "is --backbone right?"


def init_backbone(init: str, arch: str | None = None, channels: int = 1, size: int | None = None) -> nn.Module:
    """``random``, ``imagenet`` or the path of a sonocl run, checkpoint or encoder file; ``arch`` as `init_arch`;
    ``size`` the input side a random or ImageNet ViT is made for (an encoder's is the one it records)."""
    if init == "random":
        return build_backbone(arch or "resnet18", channels, size=size)
    if init == "imagenet":
        return build_backbone(arch or "resnet18", channels, load_imagenet_state(arch or "resnet18"), size)
    return load_encoder(init, channels=channels, arch=arch)


def init_arch(init: str, arch: str | None = None) -> str:
    """The backbone that starting from ``init`` builds: a sonocl encoder's recorded one, else ``arch``, else resnet18.

    ``arch`` is what the user asked for (None: nothing); one that contradicts the encoder's record is a
    `WeightsError` naming the file, its backbone and the option (as `load_encoder`)."""
    if init in ("random", "imagenet"):
        return arch or "resnet18"
    located = locate_encoder(Path(init))
    return _encoder_arch(located, read_encoder_metadata(located), arch)


def _encoder_arch(path: Path, metadata: Mapping[str, Any], arch: str | None) -> str:
    recorded = metadata.get("arch")
    if recorded is not None and (not isinstance(recorded, str) or name_problem(recorded)):
        raise WeightsError(
            f"{path}: records the backbone {recorded!r}, which sonocl does not know; the file is damaged or from "
            "another program (or another timm version): export it again"
        )
    if arch and recorded and arch != recorded:
        raise WeightsError(
            f"{path}: is a {recorded} encoder (the backbone it records), so --backbone {arch} does not fit it; "
            f"leave --backbone out to use the encoder's own, or pass --backbone {recorded}"
        )
    return arch or recorded or "resnet18"


class ProjectionHead(nn.Sequential):
    """Linear → ReLU → Linear, the SimCLR/USCL/Meta-USCL projection g (optionally with BatchNorm, as MoCo v2/BYOL)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, batch_norm: bool = False) -> None:
        layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim)]
        if batch_norm:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers += [nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim)]
        super().__init__(*layers)
        self.in_dim = in_dim
        self.out_dim = out_dim


class Head(nn.Module):
    """A method's own head on the pooled feature h, ``(N, in_dim) → (N, out_dim)``, built by the method
    (`sonocl.methods.base.Method.head`) in place of the `ProjectionHead` (DINO's: `sonocl.methods.dino.DINOHead`)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.out_dim = out_dim


class CMWNet(nn.Module):
    """Meta-USCL's Contrastive Meta-Weight Network: [h_left, h_right] → Linear → ReLU → Linear → sigmoid.

    One weight in (0, 1) per positive pair (Chen et al., IEEE TMI 2023, §2.5 of docs/methods.md).
    """

    def __init__(self, feature_dim: int, hidden_dim: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(2 * feature_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, 1)
        )

    def forward(self, h_left: torch.Tensor, h_right: torch.Tensor) -> torch.Tensor:
        """(N, F), (N, F) → (N,) pair weights."""
        return torch.sigmoid(self.net(torch.cat([h_left, h_right], dim=1))).flatten()


class ContrastiveModel(nn.Module):
    """Backbone f → pooled feature h → projection g → z; optional classifier on z (USCL) and predictor (BYOL)."""

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        projection_hidden: int = 512,
        projection_dim: int = 128,
        num_classes: int = 0,
        projection_batch_norm: bool = False,
        predictor_hidden: int = 0,
        projector: Head | None = None,
    ) -> None:
        """``projector``: the method's own head on h in place of the `ProjectionHead` of ``projection_hidden``,
        ``projection_dim`` and ``projection_batch_norm`` (DINO's)."""
        super().__init__()
        self.backbone = backbone
        self.projector: ProjectionHead | Head = (
            projector
            if projector is not None
            else ProjectionHead(feature_dim, projection_hidden, projection_dim, projection_batch_norm)
        )
        self.classifier = nn.Linear(projection_dim, num_classes) if num_classes else None
        self.predictor = (
            ProjectionHead(projection_dim, predictor_hidden, projection_dim, batch_norm=True)
            if predictor_hidden
            else None
        )

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, C, H, W) → (h (N, F), z (N, D)); z is not normalised (the losses do that in fp32)."""
        h = self.backbone(images).flatten(1)
        return h, self.projector(h)


def export_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's weights under its family's key names: a ResNet's with a 3-channel stem, ready for any
    torchvision ResNet; a timm model's as they are (its ``in_chans``)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not k.startswith("fc.")}
    return _fit_stem(state, 3) if isinstance(model, torchvision.models.ResNet) else state


def save_encoder(backbone: nn.Module, path: str | os.PathLike[str], metadata: Mapping[str, Any]) -> None:
    """Write ``encoder.safetensors`` through `sonocl.files.atomic_write` (a failed write is a `WriteFailedError`
    naming it, the previous file intact); ``metadata`` (arch, channels, mean, std, size, method…) goes in its header."""
    data = safetensors_bytes(export_state(backbone), metadata={k: json.dumps(v) for k, v in metadata.items()})
    atomic_write(Path(path), lambda handle: handle.write(data))


def encoder_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The header metadata of a ``.safetensors`` file, sonocl's keys decoded from JSON (other keys, as other programs
    write them, kept where they are not JSON); a file or a sonocl key that cannot be read is a `WeightsError`."""
    path = Path(path)
    _refuse_empty(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise WeightsError(_unreadable_safetensors(path, error)) from None
    metadata: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            metadata[key] = json.loads(value)
        except json.JSONDecodeError:
            if key in RECORDED_KEYS:
                raise WeightsError(
                    f"{path}: its sonocl metadata is damaged ({key} = {value[:40]!r} is not JSON); export the "
                    "encoder again"
                ) from None
            metadata[key] = value
    return metadata


def exported_checkpoint(run: Path, export: str) -> Path | None:
    """The checkpoint a run's encoder is taken from, the one rule the loop, ``sonocl export`` and `locate_encoder`
    follow: ``best.pt`` when ``export`` is ``best`` and the run wrote one, else ``last.pt``; None without either."""
    checkpoints = run / "checkpoints"
    names = ("best.pt", "last.pt") if export == "best" else ("last.pt",)
    return next((checkpoints / name for name in names if (checkpoints / name).is_file()), None)


def run_export_setting(run: Path) -> str:
    """The run's ``export`` setting (``best`` or ``last``) from its ``config.yaml``; ``best``, the default, without
    one. A file that cannot be read is a `WeightsError` naming it."""
    path = run / "config.yaml"
    if not path.is_file():
        return "best"
    try:
        config = load_yaml_text(path.read_text(encoding="utf-8"), str(path))
    except (OSError, UnicodeDecodeError, UserError) as error:
        raise WeightsError(f"{path}: cannot read the run's configuration ({error})") from None
    export = config.get("export", "best") if isinstance(config, dict) else None
    if export not in ("best", "last"):
        raise WeightsError(f"{path}: export {export!r} is not best or last")
    return export


def locate_encoder(path: Path) -> Path:
    """The weights file of a sonocl encoder: ``path`` itself, or a run directory's encoder file, else the checkpoint
    its encoder is exported from (`exported_checkpoint`)."""
    if path.is_dir():
        if (path / ENCODER_FILE).exists():
            return path / ENCODER_FILE
        checkpoint = exported_checkpoint(path, run_export_setting(path))
        if checkpoint is None:
            raise WeightsError(
                f"{path}: no {ENCODER_FILE} or checkpoints/{{best,last}}.pt; is this a sonocl run directory?"
            )
        return checkpoint
    if not path.exists():
        raise WeightsError(f"{path}: no such file or directory")
    return path


def read_encoder_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata (arch, channels, size, mean, std, method) of a sonocl run directory, checkpoint or encoder file,
    located as `load_encoder` locates it; {} for a file without any."""
    located = locate_encoder(Path(path))
    if located.suffix == ".safetensors":
        return encoder_metadata(located)
    checkpoint = read_state_dict(located)
    return dict(checkpoint.get("encoder_metadata", {})) if isinstance(checkpoint, Mapping) else {}


def checkpoint_backbone_state(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Backbone weights (torchvision names) of a sonocl training checkpoint (``{"model": ContrastiveModel state, …}``)."""
    model_state = checkpoint.get("model", checkpoint)
    prefix = "backbone."
    return {k[len(prefix) :]: v for k, v in model_state.items() if k.startswith(prefix)}


def load_encoder(path: str | os.PathLike[str], channels: int | None = None, arch: str | None = None) -> nn.Module:
    """The backbone (pooled features h) of a sonocl run directory, training checkpoint or ``encoder.safetensors``.

    ``channels`` defaults to what the encoder was trained with (a timm encoder keeps them); ``arch`` to what the
    file records (else resnet18): an ``arch`` that contradicts the record is a `WeightsError` naming the file, its
    backbone and ``--backbone``. A patch-embedding model is built for the size the encoder records.
    """
    located = locate_encoder(Path(path))
    if located.suffix == ".safetensors":
        metadata = encoder_metadata(located)
        state = read_state_dict(located)
    else:
        checkpoint = read_state_dict(located)
        metadata = dict(checkpoint.get("encoder_metadata", {})) if isinstance(checkpoint, dict) else {}
        state = checkpoint_backbone_state(checkpoint)
        if not state:
            raise WeightsError(
                f"{located}: no 'backbone.*' weights; for checkpoints of other code use `sonocl evaluate --init`"
            )
    arch = _encoder_arch(located, metadata, arch)
    stem = Backbone.named(arch).stem_weight
    recorded = metadata.get("channels", state[stem].shape[1] if stem in state else 1)
    if recorded not in (1, 3):
        raise WeightsError(f"{located}: records {recorded!r} input channels (1 or 3 expected); export it again")
    size = metadata.get("size")
    try:
        return build_backbone(arch, channels or int(recorded), state, int(size) if isinstance(size, int) else None)
    except WeightsError as error:
        raise WeightsError(f"{located}: {error}") from None
