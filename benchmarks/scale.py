"""Scale, measured: a store of 10,000 synthetic videos (about a million 64 px frames) against one of 100 (issue 26,
item 4). Not a test: it writes about 4 GB and takes minutes.

1. **Writing the store**: the frames of every video through `FrameStoreWriter` (no decoding: the store's own cost,
   each video committed and fsynced), by one process into the root part, and by two processes at once, each into
   its own shard of one store (`--shard`); videos/s and MB/s. Decoding costs what `benchmarks/ingest_speed.py`
   measures, per worker, whatever the store's size.
2. **Opening it**: `FrameStore.open` in a fresh process (the metadata of every video parsed): seconds and the
   process's peak resident memory, against the 100-video store.
3. **Training on it**: `sonocl pretrain --method uscl --label-rate 0` at 64 px, batch 32, ``--steps`` steps, on the
   10,000-video store and on the 100-video one, interleaved (A, B, A, B): the start-up (process start to the first
   step's end) and the median wall time of a step (data waiting included, from ``images_per_s``).

    python benchmarks/scale.py [--root runs/scale] [--videos 10000] [--frames 100] [--steps 40]

Writes ``ROOT/scale.json`` and prints a summary; the stores stay in ``ROOT`` (delete them after).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from sonocl.data.store_writer import FrameStoreWriter  # noqa: E402

SIZE = 64
CLASSES = ("covid", "pneumonia", "regular")


def video_frames(index: int, frames: int) -> np.ndarray:
    """A synthetic clip: a random frame of its own, shifted a pixel per frame (every video distinct, cheap to make)."""
    base = np.random.default_rng(index).integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
    return np.stack([np.roll(base, t, axis=1) for t in range(frames)])


def write_videos(store: Path, videos: range, frames: int, shard: str | None) -> None:
    with FrameStoreWriter(store, SIZE, shard=shard) as writer:
        for index in videos:
            clip = video_frames(index, frames)
            writer.add_video(
                iter(clip),
                id=f"v{index:05d}",
                source=f"v{index:05d}.mp4",
                label=CLASSES[index % 3],
                group=f"p{index // 4:05d}",
                fps=30.0,
                original_size=(SIZE, SIZE),
                crop_box=(0, 0, SIZE, SIZE),
                content_hash=hashlib.sha256(f"scale {index}".encode()).hexdigest(),
                timestamps=[t / 30 for t in range(frames)],
            )


def _write_shard(job: tuple[Path, range, int, str]) -> None:
    write_videos(*job)


def timed_write(store: Path, videos: int, frames: int, processes: int) -> dict[str, float]:
    shutil.rmtree(store, ignore_errors=True)
    started = time.perf_counter()
    if processes == 1:
        write_videos(store, range(videos), frames, None)
    else:
        step = -(-videos // processes)
        jobs = [(store, range(k * step, min(videos, (k + 1) * step)), frames, f"p{k}") for k in range(processes)]
        with multiprocessing.get_context("spawn").Pool(processes) as pool:
            pool.map(_write_shard, jobs)
    seconds = time.perf_counter() - started
    size = sum(path.stat().st_size for path in store.rglob("*") if path.is_file())
    return {"processes": processes, "seconds": seconds, "videos_per_s": videos / seconds,
            "mb_per_s": size / 1e6 / seconds, "bytes": size}  # fmt: skip


def open_cost(store: Path) -> dict[str, float]:
    """``FrameStore.open`` in a fresh process: its seconds and the process's peak resident memory (MB), beside the
    same process's peak before opening."""
    code = (
        "import resource, sys, time\n"
        "from sonocl.data.store import FrameStore\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "t = time.perf_counter(); s = FrameStore.open(sys.argv[1]); t = time.perf_counter() - t\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(t, before / 1024, after / 1024, s.num_videos, s.num_frames)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(store)], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO / "src")})  # fmt: skip
    seconds, before, after, videos, frames = out.stdout.split()
    return {"seconds": float(seconds), "peak_rss_mb_before": float(before), "peak_rss_mb_after": float(after),
            "videos": int(videos), "frames": int(frames)}  # fmt: skip


def pretrain(store: Path, run: Path, steps: int) -> dict[str, float]:
    shutil.rmtree(run, ignore_errors=True)
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "sonocl", "pretrain", "--store", str(store), "--out", str(run), "--method", "uscl",
         "--label-rate", "0", "--steps", str(steps), "--batch-size", "32", "--size", str(SIZE), "--no-progress",
         "--workers", "2"],
        check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )  # fmt: skip
    wall = time.perf_counter() - started
    rows = [row for row in csv.DictReader(open(run / "metrics.csv")) if row["kind"] == "step"]
    per_step = [2 * 32 / float(row["images_per_s"]) for row in rows[1:]]
    first = float(rows[0]["seconds"])
    return {"wall": wall, "first_step_done_s": first, "median_step_s": statistics.median(per_step),
            "median_optimiser_step_s": statistics.median(float(row["step_seconds"]) for row in rows[1:])}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REPO / "runs" / "scale")
    parser.add_argument("--videos", type=int, default=10_000)
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--small", type=int, default=100)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    root: Path = args.root
    root.mkdir(parents=True, exist_ok=True)
    results: dict[str, object] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.node()}, {os.cpu_count()} CPUs",
        "command": "python benchmarks/scale.py " + " ".join(sys.argv[1:]),
        "videos": args.videos, "frames_per_video": args.frames, "size": SIZE,
    }  # fmt: skip
    small, large = root / "small", root / "large"
    results["write_small"] = timed_write(small, args.small, args.frames, 1)
    results["write"] = [
        timed_write(large, args.videos, args.frames, 2),
        timed_write(large, args.videos, args.frames, 1),
    ]
    print("write:", json.dumps(results["write"]), flush=True)
    results["open"] = {"small": open_cost(small), "large": open_cost(large)}
    print("open:", json.dumps(results["open"]), flush=True)
    rounds = []
    for round_index in range(2):
        for name, store in (("large", large), ("small", small)):
            measured = pretrain(store, root / f"run-{name}", args.steps)
            rounds.append({"store": name, "round": round_index, **measured})
            print("pretrain:", json.dumps(rounds[-1]), flush=True)
    results["pretrain"] = rounds
    (root / "scale.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {root / 'scale.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
