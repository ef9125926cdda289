"""What a kept fold run depends on, by content: the settings, the data evaluated and the encoder's bytes.

A finished fold run kept on disk (``evaluate``'s and ``study``'s ``OUT/folds``, ``segment``'s) is read back only
when its key equals the one of the run asked for now. The key has three parts, each a digest:

- ``settings``: the options that change a fold's result (not where, nor in how many processes, it ran);
- ``data``: the frames or images evaluated with their labels and groups, so a relabelled, re-ingested or other
  store (or image folder) under the same path changes it;
- ``init``: the sha256 of the encoder file that was loaded, so a run retrained at the same path changes it
  (random init: its kind, the seed being a setting).

A kept run whose key differs is recomputed, and one line names the file and the parts that changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from sonocl.evaluate.inits import InitReport

KEY_PARTS = ("settings", "data", "init")

_file_digests: dict[tuple[str, int, int], str] = {}


def digest(value: Any) -> str:
    """A short digest of a JSON-able value (keys sorted; other objects by their text)."""
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def array_digest(*arrays: Any) -> str:
    """A short digest of arrays' shapes, types and bytes, in order."""
    hasher = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        hasher.update(f"{array.dtype.str}{array.shape}".encode())
        hasher.update(array.data.cast("B"))
    return hasher.hexdigest()[:16]


def file_digest(path: str | os.PathLike[str]) -> str:
    """The sha256 of a file's bytes (remembered per path, size and modification time within a process)."""
    stat = os.stat(path)
    known = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if known not in _file_digests:
        hasher = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                hasher.update(chunk)
        _file_digests[known] = hasher.hexdigest()
    return _file_digests[known]


def init_digest(report: InitReport) -> str:
    """The identity of the weights an init loaded: the file's sha256, or the init's kind when it read no file."""
    return file_digest(report.source) if report.source else report.kind


def fold_key(settings: Any, data: str, init: str) -> dict[str, str]:
    """The key of one fold run: the digests of its settings, its data (a digest already) and its init."""
    return {"settings": digest(settings), "data": data, "init": init}


def encode(key: dict[str, str]) -> str:
    return json.dumps(key, sort_keys=True)


def matches(saved: str, key: dict[str, str], path: Path) -> bool:
    """Whether a kept run's saved key equals ``key``; if not, one line names ``path`` and what changed."""
    try:
        found = json.loads(saved)
    except ValueError:
        found = None
    if found == key:
        return True
    if isinstance(found, dict):
        changed = [part for part in KEY_PARTS if found.get(part) != key[part]]
        what = " and ".join(
            {"settings": "other settings", "data": "other data (store, labels or groups)", "init": "other weights"}[
                part
            ]
            for part in changed
        )
    else:
        what = "an older sonocl"
    print(f"{path}: made with {what}; computing it again", file=sys.stderr)
    return False
