"""What a pretraining run saw, and the leak guard that evaluation and segmentation apply with it.

A run writes ``RUN/provenance.json`` (schema ``sonocl.provenance/1``) before its first step: the content hashes
of the videos it trained on, of those whose labels (class or anatomy) training read, and of its held-out
(validation / meta) videos, with the store and the budget. The exported bundle carries the same record.

`check_fold` compares one evaluation fold's test videos with it: a test video whose *labels* the encoder was
trained with is a leak (the evaluation refuses unless explicitly overridden, and then says so on every table);
a test video seen *without* labels (self-supervised pretraining on the same store) is transductive, allowed and
stamped. Videos are matched by content hash, so a video re-ingested into another store still matches.

The record only grows over a run's life: a resumed run keeps what it saw before (`combine`: every store, video and
label column of every part), and a run started from another's encoder (``--init``) saw what that one saw
(`inherit`: its lists joined in, the ancestor named in ``initialised_from``). What any ancestor saw, the descendant
saw, so a label-trained encoder cannot lose its labels by being resumed or fine-tuned with other options.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sonocl.data.store import VideoTable
from sonocl.errors import UserError
from sonocl.files import write_json

PROVENANCE_FILE = "provenance.json"
SCHEMA = "sonocl.provenance/2"
"""/2 added ``stores`` and ``initialised_from``; /1 records (one ``store``) are read as they are."""
BUNDLE_FILE = "sonocl_encoder.json"
"""An exported bundle's metadata file (``sonocl export``); its ``provenance`` key holds the run's record."""


class LabelLeakError(UserError):
    """An evaluation whose test videos carry labels the encoder was pretrained with."""


def record(
    store: VideoTable,
    trained: Iterable[int],
    labelled: Iterable[int],
    held_out: Iterable[int],
    *,
    method: str,
    label_columns: list[str],
    steps: int,
    batch_size: int,
    shares: Sequence[float] = (1.0,),
) -> dict[str, Any]:
    """The provenance record of a run over ``store`` (one store, or several read as one: video indices in, content
    hashes out), with each store's videos and ``shares`` of the pairs in ``per_store``."""
    trained, labelled, held_out = (np.asarray(list(v), dtype=np.int64) for v in (trained, labelled, held_out))

    def hashes(videos: np.ndarray) -> list[str]:
        return sorted({store.videos[int(v)].content_hash for v in videos})

    def of(videos: np.ndarray, source: int) -> np.ndarray:
        return videos[store.video_source[videos] == source] if len(videos) else videos

    roots = [str(root.resolve()) for root in store.roots]
    return {
        "schema": SCHEMA,
        "store": roots[0],
        "stores": roots,
        "method": method,
        "label_columns": label_columns,
        "budget": {"steps": steps, "batch_size": batch_size, "pairs": steps * batch_size},
        "trained_on": hashes(trained),
        "labels_used": hashes(labelled),
        "held_out": hashes(held_out),
        "initialised_from": [],
        "per_store": [
            {
                "store": root,
                "videos": int((store.video_source == source).sum()),
                "share_of_pairs": round(float(shares[source]), 6),
                "trained_on": hashes(of(trained, source)),
                "labels_used": hashes(of(labelled, source)),
                "held_out": hashes(of(held_out, source)),
            }
            for source, root in enumerate(roots)
        ],
    }


SEEN_LISTS = ("stores", "label_columns", "trained_on", "labels_used", "held_out", "initialised_from")
"""The lists that only grow: what a run, its earlier parts and its ancestors saw."""


def combine(earlier: dict[str, Any], later: dict[str, Any]) -> dict[str, Any]:
    """``later`` (this part of a run: its store, method and budget) with every list joined to ``earlier``'s."""
    merged = dict(later)
    for key in SEEN_LISTS:
        before = earlier.get(key) or ([earlier["store"]] if key == "stores" and "store" in earlier else [])
        merged[key] = _joined(before, later.get(key, []), keep_order=key in ("stores", "initialised_from"))
    return merged


def inherit(run: dict[str, Any], ancestor: dict[str, Any], init: str) -> dict[str, Any]:
    """``run``'s record when it started from the encoder ``init`` whose pretraining recorded ``ancestor``."""
    named = f"{init} ({_own_budget(ancestor) or 'pretrained'})"
    merged = combine(ancestor, run)
    merged["initialised_from"] = _joined([named], merged["initialised_from"], keep_order=True)
    return merged


def _joined(first: list[Any], second: list[Any], keep_order: bool) -> list[Any]:
    values = list(dict.fromkeys([*first, *second]))
    return values if keep_order else sorted(values)


def write(run_dir: Path, provenance: dict[str, Any]) -> None:
    write_json(run_dir / PROVENANCE_FILE, provenance)


def read(run_dir: Path) -> dict[str, Any] | None:
    """``RUN/provenance.json``, None when the run has none yet."""
    path = run_dir / PROVENANCE_FILE
    return _read(path) if path.is_file() else None


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
    """``path`` (a run's ``provenance.json``, or a bundle's metadata holding one under ``provenance``) as a dict, its
    record's shape checked: ``trained_on``, ``labels_used`` and ``held_out`` are lists of strings (the leak guard
    compares them as sets, and a string would be a set of characters that passes it unnoticed), so are the other
    lists, and the budget is numbers. Anything else is one `UserError` line naming the file and the key."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # ValueError: not JSON, or not UTF-8 text
        reason = "not UTF-8 text" if isinstance(error, UnicodeDecodeError) else " ".join(str(error).split())
        raise UserError(f"{path}: cannot read the pretraining provenance ({reason})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: the pretraining provenance is not a JSON object")
    record = data.get("provenance") if path.name == BUNDLE_FILE else data
    if record is None:
        return data
    where = "its provenance " if record is not data else ""
    problems: list[str] = []
    if not isinstance(record, dict):
        problems.append(f"{where}is not a JSON object")
    else:
        lists = ("trained_on", "labels_used", "held_out")
        problems += [f"no {key} list" for key in lists if key not in record]
        for key in (*lists, "stores", "label_columns", "initialised_from"):
            value = record.get(key, [])
            if not (isinstance(value, list) and all(isinstance(item, str) for item in value)):
                problems.append(f"{key} is {type(value).__name__} {str(value)[:24]!r}, not a list of strings")
        budget = record.get("budget", {})
        numbers = isinstance(budget, dict) and all(
            isinstance(budget.get(key), (int, float)) and not isinstance(budget.get(key), bool)
            for key in ("steps", "batch_size", "pairs")
        )
        if "budget" in record and not (numbers and isinstance(record.get("method"), str)):
            problems.append("budget is not steps, batch_size and pairs as numbers beside a method name")
    if problems:
        raise UserError(
            f"{path}: the pretraining provenance is damaged ({'; '.join(problems)}): it must be a JSON object whose "
            "trained_on, labels_used and held_out are lists of video hashes, as `sonocl pretrain` writes it; restore "
            "it from a copy (an exported bundle keeps one under 'provenance')"
        )
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
    """The stamp of one init over the folds of one seed: counts summed over its folds, so each test video counts once
    (the caller passes one seed's folds: every seed's folds hold the same videos)."""
    total = sum(c.test_videos for c in checks)
    labels_seen, seen = sum(c.labels_seen for c in checks), sum(c.seen for c in checks)
    if labels_seen:
        note = f"LABEL LEAK: pretraining used the labels of {labels_seen} of {total} test videos"
    elif seen:
        note = f"transductive: {seen} of {total} test videos seen in pretraining (without labels)"
    else:
        note = ""
    return {"test_videos": total, "labels_seen": labels_seen, "seen": seen, "note": note}


def pretrained_on(provenance: dict[str, Any] | None, spec: str) -> str:
    """Where an init was pretrained, for every table: its stores' directory names (``pocus, covid_blues``), ``none``
    for random init, ``ImageNet``, or that a foreign checkpoint records nothing."""
    if spec == "random":
        return "none"
    if spec == "imagenet":
        return "ImageNet"
    if provenance is None:
        return "not recorded (a checkpoint made outside sonocl)"
    stores = provenance.get("stores") or [provenance.get("store", "?")]
    return ", ".join(Path(str(store)).name for store in stores)


def where_pretrained(overlap: dict[str, Any]) -> str:
    """A table's cell for an init's ``pretraining_overlap``: ``covid_blues; 0 of 121 test videos seen``."""
    where = overlap.get("pretrained_on", "–")
    if where in ("none", "ImageNet") or "test_videos" not in overlap:
        return where
    return f"{where}; {overlap['seen']} of {overlap['test_videos']} test videos seen"


def budget_note(provenance: dict[str, Any] | None) -> str:
    """A run's pretraining budget for tables, ``uscl: 500 steps × 32 = 16,000 pairs``, and the encoder it started
    from when it had one; "" without provenance."""
    note = _own_budget(provenance)
    ancestors = (provenance or {}).get("initialised_from") or []
    if note and ancestors:
        earlier = f" and {len(ancestors) - 1} earlier" if len(ancestors) > 1 else ""
        note += f", initialised from {ancestors[0]}{earlier}"
    return note


def _own_budget(provenance: dict[str, Any] | None) -> str:
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
