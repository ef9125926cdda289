"""Checkpoints: a dict of every stateful object, written atomically, read with ``weights_only=True``.

So a checkpoint holds only tensors, dicts, lists, numbers, strings and None: RNG states are converted
(Python's tuple state to a list, NumPy's array to a tensor) and restored from that form.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sonocl.data.store import atomic_write, write_failed
from sonocl.errors import UserError
from sonocl.models import safe_torch_load


class CheckpointError(UserError):
    """A checkpoint that is missing or cannot be read safely; the message names the file."""


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """``torch.save`` through `sonocl.data.store.atomic_write`: a kill or a full disk leaves the previous file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda handle: torch.save(state, handle))


def remove_stale_temporaries(directory: Path) -> None:
    """Delete ``.NAME.PID.tmp`` files that writers killed mid-write left behind (a resumed run starts clean)."""
    for stale in directory.glob(".*.tmp"):
        stale.unlink(missing_ok=True)


def link_checkpoint(source: Path, target: Path) -> None:
    """Make ``target`` the same file as ``source`` (a hard link, atomically replacing ``target``; a copy where links
    are not supported). ``source`` is later replaced, never rewritten in place, so ``target`` keeps this state."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:  # no hard links here: a copy, written as every checkpoint is
        atomic_write(target, lambda handle: _copy_into(source, handle))
        return
    try:
        os.replace(tmp, target)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise write_failed(target, error) from error


def _copy_into(source: Path, handle: Any) -> None:
    with open(source, "rb") as original:
        shutil.copyfileobj(original, handle, 1 << 20)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint to resume from; run without --resume to start this run")
    return safe_torch_load(path, CheckpointError)


def rng_state(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Python, NumPy, torch CPU (and every CUDA device's) RNG states, plus the given named generators."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(mt), gauss],
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    return state


def set_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator] | None = None) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, generator in (generators or {}).items():
        if name in state.get("generators", {}):
            generator.set_state(state["generators"][name])
