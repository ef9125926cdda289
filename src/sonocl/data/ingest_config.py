"""The settings of `sonocl ingest`: one `IngestConfig`, checked when it is built.

Every field is the command-line option of the same name (`sonocl.data.ingest.add_arguments`), every default lives
here once; a bad value raises `sonocl.errors.ConfigError` naming the option, before any file is read. The same
pattern as `sonocl pretrain`'s `PretrainConfig` and `sonocl segment`'s `SegmentConfig`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from pathlib import Path
from typing import Any

from sonocl.data.codecs import CODECS
from sonocl.data.decode import DEFAULT_MAX_PIXELS
from sonocl.data.preprocess import MIN_SOURCE_SIDE
from sonocl.errors import ConfigError
from sonocl.options import field_default

DEFAULT_SIZE = 256
DEFAULT_MAX_FRAMES = 20_000
"""``--max-frames`` default: 11 minutes at 30 frames/s, far longer than an ultrasound clip; 1.3 GB stored at 256²."""
CROPS = ("auto", "none")


def _all_cores() -> int:
    return len(os.sched_getaffinity(0))


@dataclasses.dataclass(frozen=True)
class IngestConfig:
    """Everything that defines an ingest; every field is the command-line option of the same name."""

    sources: tuple[Path, ...]
    """Video, DICOM or image files, or folders (searched recursively)."""
    out: Path
    """The frame store (created, or appended to)."""
    overwrite: bool = False
    """Write into an --out that sonocl did not make (`sonocl.outputs`)."""
    shard: str | None = None
    """Write into this shard of the store (`sonocl.data.store`), not its root part."""
    codec: str | None = None
    """How a new store keeps its frames (`sonocl.data.codecs`: raw, png, zlib); None: raw, or an existing store's."""
    size: int | None = None
    """Stored frames are size × size (None: an existing store's own, else `DEFAULT_SIZE`)."""
    stride: int = 1
    fps: float | None = None
    """Keep at most this many frames per second of real time."""
    max_frames: int = DEFAULT_MAX_FRAMES
    frame_rate: float | None = None
    """The rate of the sources that record none (frame folders, DICOM without Frame Time)."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    crop: str = "auto"
    no_frame_folders: bool = False
    labels: Path | None = None
    """A CSV naming each file and its labels (`sonocl.data.labels.LabelTable`)."""
    id_column: str | None = None
    label_column: str | None = None
    group_column: str | None = None
    extra_columns: tuple[str, ...] = ()
    """Further CSV label columns to store."""
    label_from_name: str | None = None
    """File-name prefix rules (`sonocl.data.labels.parse_name_rules`)."""
    label_from_folder: bool = False
    workers: int = dataclasses.field(default_factory=_all_cores)
    """Decoding processes (default: all cores)."""

    def __post_init__(self) -> None:
        for name in ("out", "labels"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        object.__setattr__(self, "sources", tuple(Path(path) for path in self.sources))
        if isinstance(self.extra_columns, str):
            columns = self.extra_columns.split(",")
            object.__setattr__(self, "extra_columns", tuple(c.strip() for c in columns if c.strip()))
        problem = self._problem()
        if problem is not None:
            raise ConfigError(problem)

    def _problem(self) -> str | None:
        """The first rule this configuration breaks, as the line the user reads (options before files)."""
        if self.size is not None and self.size < MIN_SOURCE_SIDE:
            return (
                f"--size must be at least {MIN_SOURCE_SIDE}, not {self.size}: frames under {MIN_SOURCE_SIDE} px are "
                "not an ultrasound image"
            )
        for name in ("size", "stride", "max_frames", "max_pixels", "workers"):
            value = getattr(self, name)
            if value is not None and value < 1:
                return f"{_option(name)} must be at least 1, not {value}"
        for name in ("fps", "frame_rate"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                return f"{_option(name)} must be positive and finite, not {value}"
        if self.codec is not None and self.codec not in CODECS:
            return f"--codec must be one of {', '.join(CODECS)}, not {self.codec!r}"
        if self.crop not in CROPS:
            return f"--crop must be one of {', '.join(CROPS)}, not {self.crop!r}"
        if not self.sources:
            return "give at least one SOURCE file or folder"
        missing = [str(path) for path in self.sources if not path.exists()]
        if missing:
            return f"no such file or folder: {', '.join(missing)}"
        if self.labels is None:
            needing = [name for name in ("id_column", "label_column", "group_column") if getattr(self, name)]
            needing += ["extra_columns"] if self.extra_columns else []
            if needing:
                return f"{_option(needing[0])} needs --labels CSV"
        elif not self.labels.is_file():
            return f"{self.labels}: labels CSV not found"
        if self.out.exists() and not self.out.is_dir():
            return f"{self.out}: --out must be a directory (a frame store)"
        return None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> IngestConfig:
        return cls(**{field.name: getattr(args, field.name) for field in dataclasses.fields(cls)})

    def report_options(self, size: int, codec: str) -> dict[str, Any]:
        """The frame options as ``ingest_report.json`` records them (``size`` and ``codec``: the store's)."""
        return {
            "size": size,
            "codec": codec,
            "stride": self.stride,
            "fps": self.fps,
            "max_frames": self.max_frames,
            "max_pixels": self.max_pixels,
            "frame_rate": self.frame_rate,
            "crop": self.crop,
        }


def _option(field: str) -> str:
    """The command-line flag of an `IngestConfig` field."""
    return "--" + field.replace("_", "-")


def default(field: str) -> Any:
    """The default of an `IngestConfig` field: the option's."""
    return field_default(IngestConfig, field)
