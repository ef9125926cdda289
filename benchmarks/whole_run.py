"""Issue 26, item 5: a whole `sonocl pretrain` run against steps × the model-only step time, measured in one run.

A whole run is what a user waits for: the command from its start (Python's imports included) to its exit, USCL
(its preset: semi-supervised, best checkpoint by held-out loss) on a store, ``--steps`` optimiser steps. The
model-only step is `e2e_step_rate.model_only_step_times`: the same model, objective and optimiser on random views
already in memory, no loader, no augmentation, no monitors. Rounds alternate (model only, whole run, model only,
...) so that the machine's drift hits both; each round's ratio is ``steps × model-only median / whole-run wall``
with the model-only median of the measurements either side of the run. Target: ≥ 0.85.

Where the rest goes, from the run's own ``metrics.csv``: start-up (process wall − the run's ``seconds``), building
the run (the first step's clock − its step), the optimiser steps themselves (``step_seconds``: above steps ×
model only when loader workers take the cores from the step), and between steps (waiting for the loader, the
views: resize, augmentation, mixing; the epoch ends: held-out loss, monitors, checkpoints). ``--profile`` runs the
last round's whole run under cProfile and prints the main process's largest parts.

    .venv/bin/python benchmarks/whole_run.py --store runs/pocus-study/store [--steps 300 --rounds 2 --profile]
        [-- EXTRA PRETRAIN OPTIONS]

Writes ``benchmarks/out/whole_run.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from sonocl.runtime import keep_freed_memory

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e_step_rate import model_only_step_times  # noqa: E402

PROFILED = (
    "train_one_epoch",
    "end_of_epoch",
    "train_step",
    "step_views",
    "__next__",
    "validation_loss",
    "monitors",
    "save_checkpoints",
    "export_encoder",
    "setup",
    "_log_step",
)
"""The loop's parts whose cumulative time ``--profile`` prints (`sonocl.train.loop` and what it calls)."""


def model_only(size: int, batch_size: int, steps: int) -> float:
    """Median model-only step time (the first two steps are warm-up)."""
    return statistics.median(model_only_step_times(size, batch_size, steps, "cpu", "fp32")[2:])


def whole_run(store: str, steps: int, size: int, batch_size: int, extra: list[str], profile: Path | None) -> dict:
    """One `sonocl pretrain` from a fresh process, and the parts of its wall time read from its ``metrics.csv``."""
    out = Path(tempfile.mkdtemp(prefix="sonocl_whole_run_")) / "run"
    command = [sys.executable]
    if profile is not None:
        command += ["-m", "cProfile", "-o", str(profile)]
    command += ["-m", "sonocl", "pretrain", "--method", "uscl", "--store", store, "--out", str(out), "--steps",
                str(steps), "--size", str(size), "--batch-size", str(batch_size), "--no-progress", *extra]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    try:
        rows = list(csv.DictReader(open(out / "metrics.csv", newline="")))
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
    step_rows = [r for r in rows if r["kind"] == "step"]
    run_seconds = float(rows[-1]["seconds"])
    in_steps = sum(float(r["step_seconds"]) for r in step_rows)
    first_clock = float(step_rows[0]["seconds"]) - float(step_rows[0]["step_seconds"])
    return {
        "steps": len(step_rows),
        "wall_seconds": wall,
        "start_up_seconds": wall - run_seconds,
        "building_seconds": first_clock,
        "in_steps_seconds": in_steps,
        "between_steps_seconds": run_seconds - first_clock - in_steps,
        "median_step_seconds": statistics.median(float(r["step_seconds"]) for r in step_rows),
        "epochs": len({r["epoch"] for r in step_rows}),
    }


def print_profile(path: Path) -> dict[str, float]:
    """Cumulative seconds of the loop's parts (`PROFILED`) in the profiled run's main process."""
    stats = pstats.Stats(str(path))
    parts: dict[str, float] = {}
    for (filename, _, name), (_, _, _, cumulative, _) in stats.stats.items():  # type: ignore[attr-defined]
        if name in PROFILED and "sonocl" in filename:
            key = f"{Path(filename).stem}.{name}"
            parts[key] = max(parts.get(key, 0.0), cumulative)
    for key, seconds in sorted(parts.items(), key=lambda item: -item[1]):
        print(f"  {key:40s} {seconds:8.1f} s", flush=True)
    return parts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model-steps", type=int, default=22, help="model-only steps per measurement (2 warm-up)")
    parser.add_argument("--profile", action="store_true", help="the last round's run under cProfile")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out" / "whole_run.json")
    parser.add_argument("extra", nargs="*", help="more `sonocl pretrain` options (after --)")
    args = parser.parse_args()
    keep_freed_memory()  # as the sonocl command line does: the model-only step at its fastest

    before = model_only(args.size, args.batch_size, args.model_steps)
    rounds: list[dict[str, Any]] = []
    profile_path = Path(tempfile.mkdtemp(prefix="sonocl_profile_")) / "run.prof"
    for index in range(args.rounds):
        profiled = args.profile and index == args.rounds - 1
        run = whole_run(args.store, args.steps, args.size, args.batch_size, args.extra,
                        profile_path if profiled else None)  # fmt: skip
        after = model_only(args.size, args.batch_size, args.model_steps)
        step = (before + after) / 2
        run |= {
            "model_only_seconds": step,
            "profiled": profiled,
            "ratio": run["steps"] * step / run["wall_seconds"],
            "step_inflation": run["in_steps_seconds"] / (run["steps"] * step),
        }
        rounds.append(run)
        before = after
        print(
            f"round {index + 1}{' (profiled)' if profiled else ''}: {run['steps']} steps in "
            f"{run['wall_seconds']:.1f} s (start-up {run['start_up_seconds']:.1f}, building "
            f"{run['building_seconds']:.1f}, steps {run['in_steps_seconds']:.1f}, between steps "
            f"{run['between_steps_seconds']:.1f}); model only {step:.3f} s/step, run's median step "
            f"{run['median_step_seconds']:.3f}; ratio {run['ratio']:.3f}",
            flush=True,
        )
    profile = print_profile(profile_path) if args.profile else {}
    unprofiled = [r["ratio"] for r in rounds if not r["profiled"]]
    result = {
        "benchmark": "whole_run",
        "command": " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "rounds": rounds,
        "profile_seconds": profile,
        "median_ratio": statistics.median(unprofiled) if unprofiled else None,
        "target": "ratio ≥ 0.85",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"median ratio {result['median_ratio']}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
