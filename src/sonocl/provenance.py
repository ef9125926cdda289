"""What a pretraining run saw, and the leak guard that evaluation and segmentation apply with it.

A run writes ``RUN/provenance.json`` (schema ``sonocl.provenance/1``) before its first step: the content hashes
of the videos it trained on, of those whose labels (class or anatomy) training read, and of its held-out
(validation / meta) videos, with the store and the budget. The exported bundle carries the same record.

`check_fold` compares one evaluation fold's test videos with it: a test video whose *labels* the encoder was
trained with is a leak (the evaluation refuses unless explicitly overridden, and then says so on every table);
a test video seen *without* labels (self-supervised pretraining on the same store) is transductive, allowed and
stamped. Videos are matched by content hash, so a video re-ingested into another store still matches.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sonocl.data.store import FrameStore, atomic_write_text
from sonocl.errors import UserError

PROVENANCE_FILE = "provenance.json"
SCHEMA = "sonocl.provenance/1"
BUNDLE_FILE = "sonocl_encoder.json"
"""An exported bundle's metadata file (``sonocl export``); its ``provenance`` key holds the run's record."""


class LabelLeakError(UserError):
    """An evaluation whose test videos carry labels the encoder was pretrained with."""


def record(
    store: FrameStore,
    trained: Iterable[int],
    labelled: Iterable[int],
    held_out: Iterable[int],
    *,
    method: str,
    label_columns: list[str],
    steps: int,
    batch_size: int,
) -> dict[str, Any]:
    """The provenance record of a run over ``store`` (video indices in, content hashes out)."""

    def hashes(videos: Iterable[int]) -> list[str]:
        return sorted({store.videos[int(v)].content_hash for v in videos})

    return {
        "schema": SCHEMA,
        "store": str(store.root.resolve()),
        "method": method,
        "label_columns": label_columns,
        "budget": {"steps": steps, "batch_size": batch_size, "pairs": steps * batch_size},
        "trained_on": hashes(trained),
        "labels_used": hashes(labelled),
        "held_out": hashes(held_out),
    }


def write(run_dir: Path, provenance: dict[str, Any]) -> None:
    atomic_write_text(run_dir / PROVENANCE_FILE, json.dumps(provenance, indent=1) + "\n")


def find(spec: str) -> dict[str, Any] | None:
    """The provenance of an ``--init`` (a run directory, a file inside one, or an exported bundle), else None."""
    if spec in ("random", "imagenet"):
        return None
    path = Path(spec)
    candidates = [path] if path.is_dir() else [path.parent, path.parent.parent]
    for directory in candidates:
        if (directory / PROVENANCE_FILE).is_file():
            return _read(directory / PROVENANCE_FILE)
        bundle = directory / BUNDLE_FILE
        if bundle.is_file():
            provenance = _read(bundle).get("provenance")
            if provenance:
                return provenance
    return None


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"{path}: cannot read the pretraining provenance ({error})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: the pretraining provenance is not a JSON object")
    return data


@dataclass
class FoldCheck:
    """What the encoder saw of one fold's test videos."""

    test_videos: int
    labels_seen: int
    """Test videos whose labels pretraining used: a leak."""
    seen: int
    """Test videos pretraining saw at all (trained on or held out for its validation / meta set)."""


def check_fold(provenance: dict[str, Any] | None, test_hashes: Iterable[str]) -> FoldCheck:
    test = set(test_hashes)
    if provenance is None:
        return FoldCheck(len(test), 0, 0)
    labelled = test & set(provenance.get("labels_used", []))
    seen = test & (set(provenance.get("trained_on", [])) | set(provenance.get("held_out", [])))
    return FoldCheck(len(test), len(labelled), len(seen))


def summarise(checks: list[FoldCheck]) -> dict[str, Any]:
    """The stamp of one init over its folds: counts summed over folds (each test video is in one fold per seed)."""
    total = sum(c.test_videos for c in checks)
    labels_seen, seen = sum(c.labels_seen for c in checks), sum(c.seen for c in checks)
    if labels_seen:
        note = f"LABEL LEAK: pretraining used the labels of {labels_seen} of {total} test videos"
    elif seen:
        note = f"transductive: {seen} of {total} test videos seen in pretraining (without labels)"
    else:
        note = ""
    return {"test_videos": total, "labels_seen": labels_seen, "seen": seen, "note": note}


def budget_note(provenance: dict[str, Any] | None) -> str:
    """A run's pretraining budget for tables, ``uscl: 500 steps × 32 = 16,000 pairs``; "" without provenance."""
    if provenance is None or "budget" not in provenance:
        return ""
    budget = provenance["budget"]
    return f"{provenance['method']}: {budget['steps']:,} steps × {budget['batch_size']} = {budget['pairs']:,} pairs"


def leak_message(init: str, labels_seen: int, total: int) -> str:
    return (
        f"--init {init}: pretraining used the labels of {labels_seen} of the {total} test videos of these folds, "
        f"so its scores would not be honest. Fixes: pretrain per fold on the training videos only "
        f"(`sonocl study`), or pretrain without labels (`--label-rate 0` for uscl, `--anatomy-ratio 0` for awcl); "
        f"or pass --allow-label-leak to run anyway, which marks every table"
    )
