"""Benchmark 3: end-to-end USCL pretraining step rate versus the model-only step rate, same run, same model.

End to end = what ``sonocl pretrain`` does per step: the sampler's batch, frames gathered from the memory-mapped
store by DataLoader workers, on-device resize + augmentation + mixing, the objective (forward of both views,
group-InfoNCE + semi-supervised CE), backward, optimiser step, per-step logging. It runs the real loop
(`sonocl.train.loop.pretrain`) and reads the per-step wall times from ``metrics.csv``.
Model only = the same ContrastiveModel, objective and optimiser on random views already in memory.

The two are measured in alternating rounds (the machine is shared), and each figure is the median step time
over all rounds after a warm-up. Target (issue 3): end to end within 15 % of model only.

    python benchmarks/e2e_step_rate.py --store STORE [--size 64 --batch-size 32 --rounds 3 --steps 12]

Writes ``benchmarks/out/e2e_step_rate.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sonocl.runtime import keep_freed_memory


def _config(store: str, size: int, batch_size: int, epochs: int, workers: int, device: str, precision: str):
    from sonocl.train.config import preset

    cfg = preset("uscl")
    cfg.store, cfg.size, cfg.batch_size, cfg.epochs, cfg.workers = (store,), size, batch_size, epochs, workers
    cfg.precision, cfg.progress, cfg.device = precision, False, device
    cfg.options.items = "frames"  # many steps per epoch from a small store
    cfg.knn_frames_per_video = 1
    return cfg


def end_to_end_step_times(
    store: str, size: int, batch_size: int, workers: int, device: str, precision: str
) -> list[float]:
    """Wall time of every step of one epoch of the real loop (frames as items, so the epoch has many steps)."""
    from sonocl.train.loop import pretrain

    out = Path(tempfile.mkdtemp(prefix="sonocl_e2e_"))
    try:
        pretrain(_config(store, size, batch_size, 1, workers, device, precision), out)
        with open(out / "metrics.csv", newline="") as handle:
            rows = [r for r in csv.DictReader(handle) if r["kind"] == "step"]
        return [2 * batch_size / float(r["images_per_s"]) for r in rows]
    finally:
        shutil.rmtree(out, ignore_errors=True)


def model_only_step_times(size: int, batch_size: int, steps: int, device: str, precision: str) -> list[float]:
    """The same model, objective and optimiser as the loop's, on random views already on the device."""
    from sonocl.methods import get_method
    from sonocl.methods.objectives import BatchTensors, StepContext
    from sonocl.train.model import AUTOCAST_DTYPES, build_model

    cfg = _config("", size, batch_size, 1, 0, device, precision)
    target = torch.device(device)
    layout = torch.channels_last if target.type == "cuda" else torch.contiguous_format  # the loop's default
    method = get_method(cfg.method)
    model = build_model(cfg, method, num_classes=3).to(target, memory_format=layout)
    objective = method.objective(cfg, model, None).to(target)  # uscl reads nothing of the sampler
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    view1 = torch.randn(batch_size, 1, size, size, device=target).contiguous(memory_format=layout)
    view2 = torch.randn(batch_size, 1, size, size, device=target).contiguous(memory_format=layout)
    batch = BatchTensors(
        *(t.to(target) for t in (torch.arange(batch_size), torch.ones(batch_size), torch.randint(0, 3, (batch_size,))))
    )
    dtype = AUTOCAST_DTYPES.get(precision)
    scaler = torch.amp.GradScaler(target.type, enabled=precision == "fp16")
    model.train()
    times = []
    for step in range(steps):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(target.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss, _ = objective(model, view1, view2, batch, StepContext(step, optimizer, cfg.optim.lr))
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        float(loss.detach())  # waits for the device, as the loop's per-step logging does
        times.append(time.perf_counter() - start)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", help="frame store (default: a phantom store built in a temporary folder)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--steps",
        type=int,
        default=12,
        help="model-only steps per round (the first 2 are warm-up); "
        "the end-to-end round is one epoch of the store's training frames",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--device", default="cpu", help="cpu | cuda | cuda:N (benchmark 4: cuda --precision bf16 --size 224)"
    )
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out" / "e2e_step_rate.json")
    args = parser.parse_args()
    keep_freed_memory()  # as the sonocl command line does

    store = args.store
    scratch = None
    if store is None:
        from sonocl.data.phantom import build_phantom_store

        scratch = tempfile.mkdtemp(prefix="sonocl_phantom_")
        store = str(build_phantom_store(Path(scratch) / "store", num_videos=24, frames_per_video=20, size=128).root)
    warmup = 2
    e2e, model_only = [], []
    for round_index in range(args.rounds):
        model_only += model_only_step_times(args.size, args.batch_size, args.steps, args.device, args.precision)[
            warmup:
        ]
        e2e += end_to_end_step_times(store, args.size, args.batch_size, args.workers, args.device, args.precision)[
            warmup:
        ]
        print(
            f"round {round_index + 1}: model-only median {np.median(model_only):.3f} s/step, "
            f"end-to-end median {np.median(e2e):.3f} s/step",
            flush=True,
        )
    if scratch:
        shutil.rmtree(scratch, ignore_errors=True)
    e2e_rate = args.batch_size / float(np.median(e2e))
    model_rate = args.batch_size / float(np.median(model_only))
    result = {
        "benchmark": "e2e_step_rate",
        "method": "uscl",
        "size": args.size,
        "batch_size": args.batch_size,
        "device": args.device,
        "precision": args.precision,
        "gpu": torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else None,
        "threads": torch.get_num_threads(),
        "workers": args.workers,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "store": store if not scratch else "phantom (24 videos × 20 frames, 128 px)",
        "rounds": args.rounds,
        "model_only_steps": len(model_only),
        "end_to_end_steps": len(e2e),
        "end_to_end_s_per_step": float(np.median(e2e)),
        "model_only_s_per_step": float(np.median(model_only)),
        "end_to_end_pairs_per_s": e2e_rate,
        "model_only_pairs_per_s": model_rate,
        "end_to_end_images_per_s": 2 * e2e_rate,
        "ratio": e2e_rate / model_rate,
        "target": "ratio ≥ 0.85",
        "meets_target": e2e_rate / model_rate >= 0.85,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
