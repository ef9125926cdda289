"""sonocl: contrastive pretraining of ultrasound image encoders from ultrasound videos."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sonocl._version import __version__

if TYPE_CHECKING:
    import torch


def load_encoder(path: str, **kwargs: Any) -> torch.nn.Module:
    """Return the backbone (a torchvision ResNet or a timm model, as trained) of a sonocl run directory, checkpoint,
    ``encoder.safetensors`` or export bundle."""
    from sonocl.models import load_encoder as _load_encoder

    return _load_encoder(path, **kwargs)


__all__ = ["__version__", "load_encoder"]
