"""sonocl: contrastive pretraining of ultrasound image encoders from ultrasound videos."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sonocl._version import __version__

if TYPE_CHECKING:
    import torch


def load_encoder(path: str, **kwargs: Any) -> torch.nn.Module:
    """Return the torchvision ResNet of a sonocl run directory, checkpoint or ``encoder.safetensors``."""
    from sonocl.models import load_encoder as _load_encoder

    return _load_encoder(path, **kwargs)


__all__ = ["__version__", "load_encoder"]
