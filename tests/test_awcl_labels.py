"""AWCL's anatomy labels per frame (frames ingested as one-frame videos, labels from a CSV), as
``docs/methods.md`` §3 shows: the example's commands run here as written, at a tiny size."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import make_sampler
from sonocl.cli import main
from sonocl.data.store import FrameStore

SCANS, FRAMES = 4, 3
ANATOMY = ("liver", "kidney", "spleen")  # frame f of every scan shows ANATOMY[f]: the label changes along a sweep


def _frames_folder(root: Path) -> Path:
    """Four sweeps exported as stills (scan0_f0.png …) and a CSV of one anatomy label per frame."""
    frames = root / "frames"
    frames.mkdir()
    rows = []
    rng = np.random.default_rng(0)
    for scan in range(SCANS):
        for f in range(FRAMES):
            name = f"scan{scan}_f{f}.png"
            Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).save(frames / name)
            rows.append({"file": name, "scan": f"scan{scan}", "anatomy": ANATOMY[f]})
    with open(root / "labels.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["file", "scan", "anatomy"])
        writer.writeheader()
        writer.writerows(rows)
    return frames


def test_per_frame_anatomy_labels_from_one_frame_videos(tmp_path: Path) -> None:
    frames = _frames_folder(tmp_path)
    store_path = tmp_path / "store"
    ingest = [
        "ingest", str(frames), "--out", str(store_path), "--size", "32", "--no-frame-folders",
        "--labels", str(tmp_path / "labels.csv"), "--id-column", "file", "--group-column", "scan",
        "--extra-columns", "anatomy",
    ]  # fmt: skip
    assert main(ingest) == 0
    store = FrameStore.open(store_path)
    assert store.num_videos == SCANS * FRAMES and store.num_frames == SCANS * FRAMES
    assert len({video.group for video in store.videos}) == SCANS  # a scan's frames stay in one fold

    sampler = make_sampler("awcl", store, np.arange(store.num_videos), batch_size=12, seed=0)
    batch = sampler.batches(0)[0]
    anatomy = np.array([store.videos[v].extra_labels["anatomy"] for v in batch.video])
    assert sampler.class_names == sorted(ANATOMY)
    assert np.array_equal(np.array(sampler.class_names)[batch.label], anatomy)
    groups = {(store.videos[v].group, a): g for v, a, g in zip(batch.video, anatomy, batch.positive_group)}
    for (scan, a), group in groups.items():  # positives: one anatomy across scans, never one scan across anatomies
        assert all(g == group for (s, b), g in groups.items() if b == a)
        assert all(g != group for (s, b), g in groups.items() if s == scan and b != a)

    run = tmp_path / "awcl"
    pretrain = [
        "pretrain", "--store", str(store_path), "--out", str(run), "--method", "awcl", "--anatomy-column", "anatomy",
        "--steps", "2", "--batch-size", "4", "--size", "32", "--precision", "fp32", "--workers", "0", "--threads", "1",
        "--no-progress", "--set", "model.projection_hidden=32",
    ]  # fmt: skip
    assert main(pretrain) == 0
    provenance = json.loads((run / "provenance.json").read_text())
    assert provenance["label_columns"] == ["anatomy"]
    assert set(provenance["labels_used"]) == set(provenance["trained_on"])  # every training frame kept its label
