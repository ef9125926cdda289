"""Shared fixtures: phantom data built once per test session, and the real POCUS data when present."""

from __future__ import annotations

from pathlib import Path

import pytest

from sonocl.data.phantom import build_phantom_store, write_phantom_dataset
from sonocl.data.store import FrameStore

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def phantom_store(tmp_path_factory: pytest.TempPathFactory) -> FrameStore:
    """12 phantom videos (4 per class, 6 patients) of 24 frames at 64 px, written straight into a frame store."""
    return build_phantom_store(
        tmp_path_factory.mktemp("phantom_store"), num_videos=12, frames_per_video=24, size=64, seed=0
    )


@pytest.fixture(scope="session")
def phantom_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder as a user brings it: ``videos/`` (mp4, some DICOM cine) and ``labels.csv``; 9 videos, 16 frames, 96 px."""
    return write_phantom_dataset(
        tmp_path_factory.mktemp("phantom_dataset"), num_videos=9, frames_per_video=16, size=96, seed=1
    )


@pytest.fixture(scope="session")
def pocus_dir() -> Path:
    """The real POCUS lung-ultrasound data (``../shared/data/pocus``); tests needing it skip where it is absent."""
    path = (REPO_ROOT / ".." / "shared" / "data" / "pocus").resolve()
    if not path.is_dir():
        pytest.skip(f"POCUS data not found at {path}")
    return path


def tiny_pretrain(*extra: str, epochs: int = 1, batch_size: int = 4, size: int = 32) -> list[str]:
    """``sonocl pretrain`` options of a run small enough for a test: fp32, no loader workers, no progress bar."""
    return ["--epochs", str(epochs), "--batch-size", str(batch_size), "--size", str(size), "--precision", "fp32",
            "--workers", "0", "--no-progress", *extra]  # fmt: skip


def tiny_sets(knn_frames: int = 4) -> list[str]:
    """``--set`` options of the tiny runs: one item per video, a 64-wide projector, few kNN monitor frames."""
    sets = ["options.items=videos", "model.projection_hidden=64", f"knn_frames_per_video={knn_frames}"]
    return [arg for value in sets for arg in ("--set", value)]


def method_config(method: str, **changes: object):
    """The preset of ``method`` with ``changes`` merged in (nested mappings, e.g. ``options={"queue_size": 16}``)."""
    from sonocl.train.config import merge, preset

    return merge(preset(method), {k: v for k, v in changes.items() if v is not None})


def make_sampler(method: str, store, videos, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, **options):
    """The registered method's training sampler, built as the loop builds it, with ``options`` set."""
    from sonocl.methods import get_method

    cfg = method_config(method, seed=seed, options=options or None)
    return get_method(method).sampler(cfg, store, videos, batch_size, rank, world_size)


def make_objective(method: str, model, ema_start: float | None = None, num_items: int = 100, **options):
    """The registered method's objective for ``model``, with ``options`` (and the target momentum) set, for a
    training set of ``num_items`` items (what MoCo's automatic queue size reads from the sampler)."""
    from types import SimpleNamespace

    from sonocl.methods import get_method

    schedule = {"ema_start": ema_start} if ema_start is not None else None
    cfg = method_config(method, options=options or None, schedule=schedule)
    return get_method(method).objective(cfg, model, SimpleNamespace(num_items=num_items))
