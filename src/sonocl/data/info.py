"""``sonocl info STORE|RUN [--json]``: what a frame store holds, or what a pretraining run saw.

A store: videos, frames and frame size; videos and frames per label and per value of every extra label
column; how many groups and how many videos per group; the last ingest and the files it skipped.
A run (a directory with ``provenance.json``): its method and budget, each store it read with its videos and
share of the pairs, and how many videos it trained on, held out and read the labels of.
``--json`` prints the same as one JSON object with stable keys (documented in ``docs/ingest.md``).
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path
from typing import Any

import numpy as np

from sonocl.data.store import META_FILE, FrameStore, StoreError, read_meta
from sonocl.files import read_json

UNLABELLED = "(unlabelled)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", type=Path, metavar="STORE|RUN", help="frame store or pretraining run directory")
    parser.add_argument("--json", action="store_true", help="print one JSON object for scripts")


def _counts(values: list[str | None], frames: list[int]) -> dict[str, dict[str, int]]:
    """Videos and frames per value, most videos first (unlabelled last)."""
    videos: collections.Counter[str] = collections.Counter()
    frame_counts: collections.Counter[str] = collections.Counter()
    for value, count in zip(values, frames):
        key = value if value not in (None, "") else UNLABELLED
        videos[key] += 1
        frame_counts[key] += count
    order = sorted(videos, key=lambda key: (key == UNLABELLED, -videos[key], key))
    return {key: {"videos": videos[key], "frames": frame_counts[key]} for key in order}


def summarise(store: FrameStore) -> dict[str, Any]:
    """The JSON summary of ``store``."""
    frames = [video.num_frames for video in store.videos]
    extra_columns = sorted({column for video in store.videos for column in video.extra_labels})
    group_sizes = np.bincount(store.group_codes()) if store.num_videos else np.zeros(1, dtype=np.int64)
    report = store.read_report() or {}
    return {
        "store": str(store.root.resolve()),
        "videos": store.num_videos,
        "frames": store.num_frames,
        "size": store.size,
        "codec": store.codec,
        "frames_per_video": {
            "min": int(min(frames, default=0)),
            "median": float(np.median(frames)) if frames else 0.0,
            "max": int(max(frames, default=0)),
        },
        "labels": _counts(store.label_column("label"), frames),
        "extra_labels": {column: _counts(store.label_column(column), frames) for column in extra_columns},
        "groups": {
            "count": int(np.count_nonzero(group_sizes)),
            "videos_per_group": {
                "min": int(group_sizes.min()),
                "median": float(np.median(group_sizes)),
                "max": int(group_sizes.max()),
            },
        },
        "last_ingest": {key: report[key] for key in ("finished", "sources", "options", "counts") if key in report},
        "skipped": report.get("skipped", []),
        "parts": _parts(store),
        "duplicates_left_out": store.duplicates,
    }


def _parts(store: FrameStore) -> list[dict[str, Any]]:
    """Each part of the store (the root part, then each shard): its name, whether sealed, its videos and frames."""
    sealed = {shard["name"]: bool(shard.get("sealed")) for shard in read_meta(store.root).get("shards", [])}
    found = []
    for index, directory in enumerate(store.part_dirs):
        mine = [video.num_frames for video, part in zip(store.videos, store.video_part) if part == index]
        name = "" if directory == store.root else directory.name
        found.append({"name": name or "(root)", "sealed": sealed.get(name, False), "videos": len(mine),
                      "frames": int(sum(mine))})  # fmt: skip
    return found


def _print_counts(title: str, counts: dict[str, dict[str, int]]) -> None:
    print(title)
    width = max((len(name) for name in counts), default=0)
    for name, count in counts.items():
        print(f"  {name:<{width}}  {count['videos']:>6} videos  {count['frames']:>9} frames")


def _print_text(summary: dict[str, Any]) -> None:
    per_video = summary["frames_per_video"]
    print(
        f"{summary['store']}: {summary['videos']} videos, {summary['frames']} frames of {summary['size']}×{summary['size']}"
        + (f", {summary['codec']}-compressed" if summary["codec"] != "raw" else "")
    )
    print(f"frames per video: min {per_video['min']}, median {per_video['median']:g}, max {per_video['max']}")
    _print_counts("labels:", summary["labels"])
    for column, counts in summary["extra_labels"].items():
        _print_counts(f"{column}:", counts)
    groups = summary["groups"]
    spread = groups["videos_per_group"]
    print(
        f"groups: {groups['count']} (videos per group: min {spread['min']}, median {spread['median']:g}, max {spread['max']})"
    )
    if len(summary["parts"]) > 1:
        shown = ", ".join(
            f"{part['name']}{' (sealed)' if part['sealed'] else ''} {part['videos']} videos"
            for part in summary["parts"]
        )
        print(f"parts: {shown}")
    if summary["duplicates_left_out"]:
        print(f"{summary['duplicates_left_out']} videos left out: an earlier part holds their content or id")
    last = summary["last_ingest"]
    if last:
        counts = last.get("counts", {})
        print(
            f"last ingest {last.get('finished', '?')}: {counts.get('added', 0)} added, "
            f"{counts.get('already_present', 0)} already in store, {counts.get('skipped', 0)} skipped"
        )
    if summary["skipped"]:
        print(f"skipped files ({len(summary['skipped'])}):")
        for entry in summary["skipped"]:
            print(f"  {entry['file']}: {entry['reason']}")


def summarise_run(run: Path) -> dict[str, Any]:
    """The JSON summary of a pretraining run's ``provenance.json`` (`sonocl.provenance` writes it)."""
    record = read_json(run / "provenance.json", StoreError, "a pretraining run's record of what it saw")
    counts = {key: len(record.get(key) or []) for key in ("trained_on", "held_out", "labels_used")}
    per_store = record.get("per_store") or [{"store": store} for store in record.get("stores") or [record.get("store")]]
    return {
        "run": str(run.resolve()),
        "method": record.get("method"),
        "budget": record.get("budget", {}),
        "videos": counts,
        "label_columns": record.get("label_columns", []),
        "stores": [
            {
                "store": entry.get("store"),
                "videos": entry.get("videos"),
                "share_of_pairs": entry.get("share_of_pairs"),
                **{key: len(entry[key]) for key in ("trained_on", "held_out", "labels_used") if key in entry},
            }
            for entry in per_store
        ],
        "initialised_from": record.get("initialised_from", []),
    }


def _print_run(summary: dict[str, Any]) -> None:
    budget, videos = summary["budget"], summary["videos"]
    pairs = f"{budget['steps']} steps × {budget['batch_size']} = {budget['pairs']:,} pairs" if budget else "no budget"
    print(f"{summary['run']}: {summary['method']}, {pairs}")
    print(f"videos: {videos['trained_on']} trained on, {videos['held_out']} held out, labels of {videos['labels_used']} "
          f"read" + (f" ({', '.join(summary['label_columns'])})" if summary["label_columns"] else ""))  # fmt: skip
    print("stores:")
    for entry in summary["stores"]:
        share = (
            f", {100 * entry['share_of_pairs']:.1f} % of the pairs" if entry.get("share_of_pairs") is not None else ""
        )
        seen = f" ({entry['trained_on']} trained on, {entry['held_out']} held out)" if "trained_on" in entry else ""
        count = f": {entry['videos']} videos" if entry.get("videos") is not None else ""
        print(f"  {entry['store']}{count}{share}{seen}")
    for ancestor in summary["initialised_from"]:
        print(f"initialised from {ancestor}")


def run(args: argparse.Namespace) -> int:
    if (args.store / "provenance.json").is_file() and not (args.store / META_FILE).is_file():
        summary = summarise_run(args.store)
        if args.json:
            print(json.dumps(summary, indent=2))
        else:
            _print_run(summary)
        return 0
    store = FrameStore.open(args.store)  # a StoreError is a UserError: one line, exit 2 (`sonocl.cli`)
    summary = summarise(store)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_text(summary)
    return 0
