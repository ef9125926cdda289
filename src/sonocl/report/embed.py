"""`sonocl embed`: per-frame embeddings (the backbone's pooled features h) of a frame store, for your own analysis.

One row per selected frame: ``video_id``, ``video_index`` (position in the store), ``frame_index`` (position in
the video), ``frame`` (global index in the store), ``timestamp`` (seconds), ``group``, ``label`` (primary,
empty when unlabelled), one column per extra label of the store (``anatomy``, findings…), and the embedding.

- ``.parquet``: those columns plus ``embedding``, a fixed-size list of float32; the file's metadata holds the
  init, architecture, input size and normalisation. ``np.stack(pandas.read_parquet(f).embedding)`` gives
  the ``(N, F)`` matrix.
- ``.npz``: one array per column (strings as unicode arrays) and ``embeddings`` ``(N, F)`` float32, plus
  ``metadata`` (a JSON string).

Frames are resized to ``--size`` (default: the encoder's training size) and normalised with the encoder's
mean and std when its file records them (sonocl encoders do), else ImageNet's grey statistics for
``imagenet`` and 0.5 / 0.25 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sonocl.errors import ConfigError, UserError
from sonocl.options import MIN_IMAGE_SIDE, finite, integer, non_negative, positive
from sonocl.outputs import add_overwrite_argument, claim_file

DEFAULT_SIZE = 224
DEFAULT_MEAN, DEFAULT_STD = 0.5, 0.25
IMAGENET_GREY_MEAN, IMAGENET_GREY_STD = 0.449, 0.226
FORMATS = (".parquet", ".npz")


@dataclass
class Encoder:
    """A backbone ready to embed frames: ``(N, channels, size, size)`` normalised input → ``(N, F)`` features."""

    backbone: Any
    arch: str
    channels: int
    size: int
    mean: float
    std: float
    description: str


def _scalar(value: Any) -> float | None:
    if value is None:
        return None
    values = value if isinstance(value, (list, tuple)) else [value]
    return float(np.mean([float(v) for v in values]))


def _first(*values: float | None) -> float:
    return next(float(v) for v in values if v is not None)


def peek_metadata(spec: str) -> dict[str, Any]:
    """Encoder metadata (arch, channels, size, mean, std, method) of a sonocl run, checkpoint or encoder file; {}
    for ``random``, ``imagenet`` and foreign or unreadable files (``load_init`` reports those properly)."""
    from sonocl.models import WeightsError, read_encoder_metadata

    if spec in ("random", "imagenet"):
        return {}
    try:
        return read_encoder_metadata(spec)
    except (WeightsError, OSError, ValueError):
        return {}


def load_encoder_for_features(
    spec: str,
    arch: str | None = None,
    channels: int | None = None,
    size: int | None = None,
    mean: float | None = None,
    std: float | None = None,
) -> Encoder:
    """Resolve ``spec`` like ``sonocl evaluate --init`` does; unset options come from the encoder's metadata."""
    from sonocl.evaluate.inits import load_init

    metadata = peek_metadata(spec)
    arch = arch or metadata.get("arch") or "resnet18"
    channels = channels or int(metadata.get("channels") or 1)
    size = int(size or metadata.get("size") or DEFAULT_SIZE)
    backbone, report = load_init(spec, arch, channels, size)
    metadata = {**report.metadata, **metadata}
    default_mean, default_std = (
        (IMAGENET_GREY_MEAN, IMAGENET_GREY_STD) if spec == "imagenet" else (DEFAULT_MEAN, DEFAULT_STD)
    )
    return Encoder(
        backbone=backbone.eval(),
        arch=arch,
        channels=channels,
        size=size,
        mean=_first(mean, _scalar(metadata.get("mean")), default_mean),
        std=_first(std, _scalar(metadata.get("std")), default_std),
        description=str(report),
    )


def select_frames(store: Any, fps: float = 0.0, every: int = 1, max_per_video: int = 0) -> np.ndarray:
    """Global frame indices: per video, frames nearest to ``fps`` from the timestamps (0: all), then every
    ``every``-th of those, then at most ``max_per_video`` (0: no limit)."""
    from sonocl.evaluate.data import sample_frames

    if every < 1:
        raise ValueError(f"--every must be ≥ 1, not {every}")
    chosen = []
    for v, video in enumerate(store.videos):
        positions = sample_frames(np.asarray(video.timestamps), fps, 0)[::every]
        if max_per_video:
            positions = positions[
                np.unique(np.linspace(0, len(positions) - 1, min(max_per_video, len(positions))).round().astype(int))
            ]
        chosen.append(int(store.video_offsets[v]) + positions)
    return np.concatenate(chosen).astype(np.int64) if chosen else np.zeros(0, dtype=np.int64)


def frame_features(
    encoder: Encoder,
    store: Any,
    frames: np.ndarray,
    device: Any = "cpu",
    batch_size: int = 128,
    progress: bool = False,
) -> np.ndarray:
    """``(N, F)`` float32 features h of the store's ``frames`` (resized, normalised, encoder in eval mode)."""
    import torch

    from sonocl.augment import resize_to
    from sonocl.progress import progress_report

    device = torch.device(device)
    backbone = encoder.backbone.to(device).eval()
    out = []
    with torch.no_grad(), progress_report(len(frames), "embed", "frame", enabled=progress) as bar:
        for start in range(0, len(frames), batch_size):
            chunk = frames[start : start + batch_size]
            images = (
                resize_to(torch.from_numpy(store.gather(chunk)).to(device), encoder.size) - encoder.mean
            ) / encoder.std
            if encoder.channels == 3:
                images = images.expand(-1, 3, -1, -1)
            out.append(backbone(images).flatten(1).float().cpu().numpy())
            bar.update(len(chunk))
    if not out:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(out).astype(np.float32, copy=False)


def frame_table(store: Any, frames: np.ndarray) -> dict[str, np.ndarray]:
    """The per-frame columns (everything but the embedding) of ``frames``, as arrays."""
    videos = store.frame_video[frames]
    records = store.videos
    extra_columns = sorted({key for record in records for key in record.extra_labels})
    table: dict[str, np.ndarray] = {
        "video_id": np.array([records[v].id for v in videos], dtype=str),
        "video_index": videos.astype(np.int64),
        "frame_index": store.frame_in_video[frames].astype(np.int64),
        "frame": frames.astype(np.int64),
        "timestamp": store.frame_time[frames].astype(np.float64),
        "group": np.array([records[v].group for v in videos], dtype=str),
        "label": np.array([records[v].label or "" for v in videos], dtype=str),
    }
    for column in extra_columns:
        name = column if column not in table else f"extra_{column}"
        table[name] = np.array([records[v].extra_labels.get(column, "") for v in videos], dtype=str)
    return table


def write_embeddings(
    path: Path, table: Mapping[str, np.ndarray], embeddings: np.ndarray, metadata: Mapping[str, Any]
) -> None:
    """Parquet or ``.npz`` by the extension, written atomically (`sonocl.files.atomic_write`)."""
    from sonocl.files import atomic_write

    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise ConfigError(f"{path}: the output must end in .parquet or .npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".npz":
        # Any: mypy would match savez's **arrays against its allow_pickle: bool as well
        arrays: dict[str, Any] = {**table, "embeddings": embeddings, "metadata": np.array(json.dumps(dict(metadata)))}
        atomic_write(path, lambda handle: np.savez(handle, **arrays))
    else:
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError as error:
            raise ConfigError(
                f"{path}: writing Parquet needs pyarrow (pip install pyarrow), or use a .npz file"
            ) from error
        dim = embeddings.shape[1] if embeddings.ndim == 2 else 0
        columns = {name: pa.array(values) for name, values in table.items()}
        columns["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1), pa.float32()), dim)
        schema_metadata = {"sonocl": json.dumps(dict(metadata))}
        frame = pa.table(columns).replace_schema_metadata(schema_metadata)
        atomic_write(path, lambda handle: pq.write_table(frame, handle))


def is_embedding_file(path: Path) -> bool:
    """Whether ``path`` is a table `write_embeddings` wrote (its metadata names sonocl), which a rerun may replace."""
    try:
        if path.suffix.lower() == ".npz":
            with np.load(path) as saved:
                return {"metadata", "embeddings"} <= set(saved.files)
        import pyarrow.parquet as pq

        return b"sonocl" in (pq.read_schema(path).metadata or {})
    except Exception:  # any unreadable file is not one of ours
        return False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", required=True, help="frame store directory (sonocl ingest)")
    parser.add_argument(
        "--init",
        required=True,
        help="random | imagenet | a sonocl run directory, checkpoint or encoder.safetensors | a "
        "USCL/Meta-USCL/torchvision checkpoint",
    )
    parser.add_argument("--out", required=True, type=Path, help="output file: .parquet or .npz")
    add_overwrite_argument(parser, file=True)
    parser.add_argument(
        "--batch-size", type=integer(1), default=128, help="frames per forward pass (default: %(default)s)"
    )
    parser.add_argument(
        "--size",
        type=integer(MIN_IMAGE_SIDE, f"frames under {MIN_IMAGE_SIDE} px are not an ultrasound image"),
        help="input size in pixels (default: the encoder's, else 224)",
    )
    parser.add_argument(
        "--fps",
        type=non_negative,
        default=0.0,
        help="sample frames at this rate from the timestamps; 0 = every frame (default)",
    )
    parser.add_argument("--every", type=integer(1), default=1, help="then keep every N-th frame (default: %(default)s)")
    parser.add_argument(
        "--max-frames-per-video", type=integer(0), default=0, help="at most this many, evenly spaced; 0 = all"
    )
    parser.add_argument("--backbone", help="architecture (default: the encoder's, else resnet18)")
    parser.add_argument(
        "--channels", type=int, choices=(1, 3), help="stem input channels (default: the encoder's, else 1)"
    )
    parser.add_argument("--mean", type=finite, help="normalisation mean (default: the encoder's)")
    parser.add_argument("--std", type=positive, help="normalisation std (default: the encoder's)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: %(default)s)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def _device(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run(args: argparse.Namespace) -> int:
    """``sonocl embed``; bad input raises a `UserError` (a store or weights that do not open, a bad option), printed
    by `sonocl.cli` as one line with exit code 2."""
    from sonocl.data.store import FrameStore

    if args.out.suffix.lower() not in FORMATS:
        raise ConfigError(f"{args.out}: the output must end in .parquet or .npz")
    claim_file(args.out, is_embedding_file, overwrite=args.overwrite)
    try:
        store = FrameStore.open(args.store)
        encoder = load_encoder_for_features(args.init, args.backbone, args.channels, args.size, args.mean, args.std)
        frames = select_frames(store, args.fps, args.every, args.max_frames_per_video)
    except (ValueError, OSError) as error:
        if isinstance(error, UserError):
            raise
        raise ConfigError(str(error)) from error
    print(encoder.description, file=sys.stderr)
    print(
        f"{store.root}: {len(frames)} of {store.num_frames} frames from {store.num_videos} videos at {encoder.size} px, "
        f"normalised {encoder.mean:.3f} / {encoder.std:.3f}",
        file=sys.stderr,
    )
    embeddings = frame_features(encoder, store, frames, _device(args.device), args.batch_size, args.progress)
    metadata = {
        "init": args.init,
        "store": str(Path(args.store).resolve()),
        "arch": encoder.arch,
        "channels": encoder.channels,
        "size": encoder.size,
        "mean": encoder.mean,
        "std": encoder.std,
        "features": "backbone pooled h",
        "fps": args.fps,
        "every": args.every,
    }
    write_embeddings(args.out, frame_table(store, frames), embeddings, metadata)  # atomic; a failed write: one line
    print(
        f"wrote {args.out}: {embeddings.shape[0]} frames × {embeddings.shape[1] if embeddings.ndim == 2 else 0} "
        f"features",
        file=sys.stderr,
    )
    return 0
