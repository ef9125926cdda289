"""Ingest speed on the POCUS videos: `sonocl ingest` wall time against decoding alone on one core.

Both are measured in the same run, because the absolute figures depend on the machine and on how
busy it is: the ratio ``ingest / decode-only-one-core`` says how much the crop, resize, parallel
workers and store commits cost or save relative to the unavoidable decoding.

* decode only: every frame of every video decoded by PyAV (no conversion, no threading) in a
  process pinned to one core; wall and CPU seconds;
* worker CPU: the same files through the ingest worker (decode, crop, resize, write), one process,
  one decoder thread; CPU seconds, which a busy machine inflates far less than wall time;
* ingest: ``python -m sonocl ingest DATA --out TMP --size 256`` with the default workers (all cores),
  every frame kept, ``--crop auto``; wall seconds.

Writes ``benchmarks/out/ingest_speed.json``::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ingest_speed.py [--data ../shared/data/pocus/pocus_videos]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "pocus" / "pocus_videos"
DECODE_ONLY = """
import os, pathlib, resource, sys, time, av
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
files = sorted(p for p in pathlib.Path(sys.argv[1]).rglob("*") if p.is_file() and not p.name.startswith("."))
start, frames = time.perf_counter(), 0
for path in files:
    with av.open(str(path)) as container:
        frames += sum(1 for _ in container.decode(video=0))
usage = resource.getrusage(resource.RUSAGE_SELF)
print(time.perf_counter() - start, usage.ru_utime + usage.ru_stime, frames, len(files))
"""
WORKER_CPU = """
import pathlib, resource, sys, tempfile
from sonocl.data.ingest_workers import DecodeTask, Decoded, decode_to_file
from sonocl.data.sources import Source
files = sorted(p for p in pathlib.Path(sys.argv[1]).rglob("*") if p.is_file() and not p.name.startswith("."))
before = resource.getrusage(resource.RUSAGE_SELF)
frames = 0
with tempfile.TemporaryDirectory() as scratch:
    for index, path in enumerate(files):
        temp = pathlib.Path(scratch) / f"{index}.u8"
        task = DecodeTask(source=Source(path, pathlib.PurePosixPath(path.name)), video_id=path.stem, content_hash="",
                          temp_path=temp, size=int(sys.argv[2]), auto_crop=True, stride=1, max_fps=None, max_frames=None,
                          salt="", decoder_threads=1)
        outcome = decode_to_file(task)
        frames += outcome.num_frames if isinstance(outcome, Decoded) else 0
        temp.unlink(missing_ok=True)
after = resource.getrusage(resource.RUSAGE_SELF)
print(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, frames)
"""


def decode_only(data: Path) -> dict[str, float]:
    output = subprocess.run(
        [sys.executable, "-c", DECODE_ONLY, str(data)], check=True, capture_output=True, text=True
    ).stdout
    seconds, cpu, frames, files = output.split()
    return {
        "seconds": round(float(seconds), 2),
        "cpu_seconds": round(float(cpu), 2),
        "frames": int(frames),
        "files": int(files),
    }


def worker_cpu(data: Path, size: int) -> dict[str, float]:
    output = subprocess.run(
        [sys.executable, "-c", WORKER_CPU, str(data), str(size)], check=True, capture_output=True, text=True
    ).stdout
    cpu, frames = output.split()
    return {"cpu_seconds": round(float(cpu), 2), "frames": int(frames)}


def ingest(data: Path, size: int, workers: int | None) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="sonocl-ingest-bench-") as scratch:
        store = Path(scratch) / "store"
        command = [sys.executable, "-m", "sonocl", "ingest", str(data), "--out", str(store), "--size", str(size)]
        if workers is not None:
            command += ["--workers", str(workers)]
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        seconds = time.perf_counter() - start
        info = json.loads(
            subprocess.run(
                [sys.executable, "-m", "sonocl", "info", str(store), "--json"],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
        )
    return {
        "seconds": round(seconds, 2),
        "videos": info["videos"],
        "frames": info["frames"],
        "command": " ".join(command[1:]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=None, help="default: sonocl's default (all cores)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "ingest_speed.json")
    args = parser.parse_args()
    if not args.data.is_dir():
        print(f"{args.data}: POCUS videos not found; pass --data", file=sys.stderr)
        return 2
    load_before = os.getloadavg()
    decode = decode_only(args.data)
    worker = worker_cpu(args.data, args.size)
    full = ingest(args.data, args.size, args.workers)
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.node()} {platform.machine()}, {len(os.sched_getaffinity(0))} usable cores",
        "load_average_before": [round(value, 2) for value in load_before],
        "load_average_after": [round(value, 2) for value in os.getloadavg()],
        "decode_only_one_core": decode,
        "worker_one_process": worker,
        "ingest": full,
        "ratio_ingest_to_decode_only": round(float(full["seconds"]) / decode["seconds"], 2),  # type: ignore[arg-type]
        "ratio_worker_cpu_to_decode_cpu": round(worker["cpu_seconds"] / decode["cpu_seconds"], 2),
        "target_seconds": 30,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
