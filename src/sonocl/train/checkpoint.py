"""Checkpoints and the randomness they carry: one typed record (`Checkpoint`) of every stateful object, written
atomically, read with ``weights_only=True``; the run's seeds (`reproducible`) and RNG states.

So a checkpoint holds only tensors, dicts, lists, numbers, strings and None: RNG states are converted
(Python's tuple state to a list, NumPy's array to a tensor) and restored from that form.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import random
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sonocl.errors import UserError
from sonocl.files import atomic_write, write_failed
from sonocl.models import safe_torch_load

CHECKPOINT_FORMAT = 3
STATEFUL = ("model", "objective", "optimizer", "scaler")
"""The objects a checkpoint saves and restores by name (their ``state_dict``)."""


class CheckpointError(UserError):
    """A checkpoint that is missing, cannot be read safely or is not this sonocl's; the message names the file."""


@dataclass
class Checkpoint:
    """A training checkpoint (``RUN/checkpoints/{last,best}.pt``): what ``--resume`` restores and what
    ``sonocl export`` reads. On disk it is one flat dict (`to_state`): ``format``, the fields, and each `STATEFUL`
    object's state under its name."""

    config: dict[str, Any]
    """The run's resolved configuration (`PretrainConfig.to_dict`)."""
    states: dict[str, Any]
    """The ``state_dict`` of each `STATEFUL` object, by name."""
    epoch: int
    """Position: the epoch in progress (0-based) and the steps of it already done."""
    step_in_epoch: int
    best_val_loss: float | None
    elapsed_seconds: float
    """Wall time of the run so far, resumed parts included."""
    training_seconds: float
    """The part of it inside the optimiser steps."""
    global_step: int
    steps_per_epoch: int
    world_size: int
    metrics: dict[str, float]
    """The last epoch's monitors."""
    rng: dict[str, Any]
    """`rng_state` with the run's augmentation generator."""
    encoder_metadata: dict[str, Any]
    """What the exported encoder records (arch, channels, size, mean, std, method)."""

    def to_state(self) -> dict[str, Any]:
        """The dict ``torch.save`` writes."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "states"}
        return {"format": CHECKPOINT_FORMAT, **fields, **self.states}

    @classmethod
    def from_state(cls, state: Mapping[str, Any], path: Path) -> Checkpoint:
        """The record of a loaded checkpoint; another format, a missing or an unexpected key is a `CheckpointError`
        naming ``path`` and the keys."""
        if state.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(
                f"{path}: checkpoint format {state.get('format')} is not {CHECKPOINT_FORMAT}; it was written by "
                "another sonocl version"
            )
        names = {f.name for f in dataclasses.fields(cls)} - {"states"}
        expected = {"format", *names, *STATEFUL}
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise CheckpointError(
                f"{path}: checkpoint keys do not match this sonocl (missing: {missing or 'none'}; "
                f"unexpected: {unexpected or 'none'})"
            )
        return cls(states={name: state[name] for name in STATEFUL}, **{name: state[name] for name in names})

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> Checkpoint:
        """`load_checkpoint` and `from_state`."""
        return cls.from_state(load_checkpoint(path), Path(path))


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """``torch.save`` through `sonocl.files.atomic_write`: a kill or a full disk leaves the previous file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda handle: torch.save(state, handle))


def snapshot(state: Any, into: Any = None) -> Any:
    """A copy of the checkpoint ``state`` that training does not change, its tensors copied into those of ``into`` (an
    earlier snapshot) where shape, dtype and device match: a better epoch kept in memory overwrites the one it
    supersedes instead of allocating a second copy of every weight and optimiser moment beside it."""
    if isinstance(state, torch.Tensor):
        fits = isinstance(into, torch.Tensor) and into.shape == state.shape and into.dtype == state.dtype
        return into.copy_(state) if fits and into.device == state.device else state.detach().clone()
    if isinstance(state, dict):
        kept = into if isinstance(into, dict) else {}
        return {key: snapshot(value, kept.get(key)) for key, value in state.items()}
    if isinstance(state, list):
        earlier = into if isinstance(into, list) and len(into) == len(state) else [None] * len(state)
        return [snapshot(value, old) for value, old in zip(state, earlier)]
    return copy.deepcopy(state)


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


@contextlib.contextmanager
def reproducible(seed: int, deterministic: bool, threads: int | None) -> Iterator[None]:
    """Python's, NumPy's and torch's seeds; with ``deterministic``, deterministic algorithms and one thread unless
    ``threads`` says otherwise (both restored afterwards); on CUDA otherwise, cuDNN autotuning and TF32."""
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    previous_threads = torch.get_num_threads()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    threads = threads if threads is not None else (1 if deterministic else None)
    if threads is not None:
        torch.set_num_threads(threads)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous_deterministic)
        torch.set_num_threads(previous_threads)
