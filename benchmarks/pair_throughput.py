"""Benchmark 1: pair-generation throughput (pairs/s, no model) of sonocl versus the reference-style pipeline.

Both make USCL pairs (3 frames of a video, augment, mix with λ ~ Beta(0.5, 0.5), normalise) from the same
frames, in the same run, interleaved round by round so that load from other jobs hits both alike.

* sonocl (what ``sonocl.train.loop`` does on the CPU): a ``USCLSampler`` epoch's batches; a DataLoader with
  one worker process gathers each batch's uint8 frames from the memory-mapped store; the main process runs
  ``make_views`` (crop, flip, jitter, mix, normalise, batched) with torch's threads (``--threads``, default
  one per core, as the training loop). Timed: fetching the
  gathered batch + ``make_views``. The sampler's index maths is timed separately (``sampler_pairs_per_s``).
* naive (``benchmarks/naive_pipeline.py``): the same frames as JPEG files in one folder per video, PIL
  decoding and per-sample torchvision transforms and mixing in ``__getitem__``, DataLoader with 2 workers.
  Timed: fetching collated batches.

Per round each side gets a fresh loader (the other side's workers shut down); its rate is taken from its
first batch's arrival on, so worker start-up is excluded and prefetching can bias a round by at most the
prefetch depth (kept small against the batches timed).

Each side has the machine's cores (sonocl: 1 gather worker + the main process's torch threads; naive: a
DataLoader with 2 workers, as the issue specifies for this 2-core machine).

    .venv/bin/python benchmarks/pair_throughput.py [--store runs/pocus-store] [--rounds 3]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from naive_pipeline import dump_jpeg_folders, naive_loader  # noqa: E402
from sonocl.augment import AugmentConfig, BatchAugment, make_views  # noqa: E402
from sonocl.data.store import FrameStore  # noqa: E402
from sonocl.methods import get_method  # noqa: E402
from sonocl.runtime import keep_freed_memory  # noqa: E402
from sonocl.train.config import merge, preset  # noqa: E402
from sonocl.train.replay import training_sampler  # noqa: E402

BATCH = 32
OUT = Path(__file__).resolve().parent / "out" / "pair_throughput.json"


class _GatheredBatches(torch.utils.data.Dataset):
    """Batch i of the list, its frames gathered from the memory map (as the training loop's loader)."""

    def __init__(self, store: FrameStore, batches: list) -> None:
        self.store, self.batches = store, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
        batch = self.batches[index]
        return torch.from_numpy(self.store.gather(batch.frames)), torch.from_numpy(batch.mix), batch.augment_first


def _open_store(path: str | None, scratch: Path) -> tuple[FrameStore, str]:
    if path and Path(path).joinpath("store.json").exists():
        return FrameStore.open(path), f"POCUS store {path}"
    from sonocl.data.phantom import build_phantom_store

    store = build_phantom_store(scratch / "phantom", num_videos=64, frames_per_video=16, size=256, seed=0)
    return store, "phantom store (64 videos × 16 frames, 256 px; no POCUS store found)"


CPU = torch.device("cpu")


def _rate(iterator, batches: int, work=None, device: torch.device = CPU) -> float:
    start = time.perf_counter()
    for _ in range(batches):
        item = next(iterator)
        if work is not None:
            work(item)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return batches * BATCH / (time.perf_counter() - start)


def run(store_path: str | None, rounds: int, sizes: list[int], threads: int, device: torch.device) -> dict:
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        store, source = _open_store(store_path, scratch)
        videos = np.array([v for v in range(store.num_videos) if store.videos[v].num_frames >= 3])
        jpeg_root = dump_jpeg_folders(store, videos, scratch / "jpeg")
        sampler = training_sampler(get_method("uscl"), merge(preset("uscl"), {"seed": 0}), store, videos, BATCH)
        start = time.perf_counter()
        batches = [b for epoch in range(max(1, 4000 // len(sampler))) for b in sampler.batches(epoch)]
        sampler_rate = len(batches) * BATCH / (time.perf_counter() - start)
        results = []
        for size in sizes:
            augment = BatchAugment(AugmentConfig(mean=0.5, std=0.25), size)
            generator = torch.Generator(device=device).manual_seed(0)

            def views(item, augment=augment, generator=generator):
                frames, mix, augment_first = item
                make_views(frames.to(device, non_blocking=True), mix.to(device), augment_first, augment, generator)

            def ours():
                return iter(
                    torch.utils.data.DataLoader(
                        _GatheredBatches(store, batches),
                        batch_size=None,
                        num_workers=1,
                        prefetch_factor=4,
                        pin_memory=device.type == "cuda",
                    )
                )

            sonocl_rates, naive_rates = [], []
            for _ in range(rounds):
                # A fresh loader per round and side, shut down before the other side runs, so that no worker
                # of one pipeline prefetches while the other is timed; timing starts after its first batch.
                loader = ours()
                _rate(loader, 1, views, device)
                sonocl_rates.append(_rate(loader, 24 if size <= 64 else 12, views, device))
                del loader
                loader = iter(naive_loader(jpeg_root, size, BATCH, workers=2))
                _rate(loader, 1)
                naive_rates.append(_rate(loader, 12 if size <= 64 else 6))
                del loader
            s, n = statistics.median(sonocl_rates), statistics.median(naive_rates)
            results.append(
                {
                    "size": size,
                    "sonocl_pairs_per_s": round(s, 1),
                    "naive_pairs_per_s": round(n, 1),
                    "ratio": round(s / n, 2),
                    "sonocl_rounds": [round(r, 1) for r in sonocl_rates],
                    "naive_rounds": [round(r, 1) for r in naive_rates],
                }
            )
            print(f"{size:4d} px  sonocl {s:8.1f} pairs/s  naive {n:7.1f} pairs/s  ratio {s / n:5.2f}×", flush=True)
    return {
        "benchmark": "pair_throughput",
        "date": datetime.date.today().isoformat(),
        "machine": f"{os.cpu_count()}-core CPU",
        "torch_threads": threads,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "platform": platform.platform(),
        "torch": torch.__version__,
        "data": f"{source}; {len(videos)} videos, {store.size} px frames",
        "batch_size": BATCH,
        "method": "uscl",
        "sampler_pairs_per_s": round(sampler_rate),
        "results": results,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="runs/pocus-store")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 224])
    parser.add_argument("--device", default="cpu", help="device of the sonocl side's augmentation (benchmark 4: cuda)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of the sonocl side")
    args = parser.parse_args()
    keep_freed_memory()  # as the sonocl command line does
    report = run(args.store, args.rounds, args.sizes, args.threads, torch.device(args.device))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
