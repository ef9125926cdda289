"""Whole-run efficiency of finished `sonocl pretrain` runs (issue 13, target 1), read from their ``metrics.csv``.

A run's efficiency is the share of its wall time spent in optimiser steps: the sum of ``step_seconds`` (forward,
backward and update of each step, timed inside the run, device-synchronised) over the run's ``seconds`` (its wall
time, resumed parts included). Both come from the same run, so load from other jobs stretches them alike. The rest
is the data path's waits, the monitors (validation loss, kNN, collapse metric) and checkpoints; the first step of
an epoch against the others shows whether the loader stalls at epoch boundaries. Target: ≥ 85 %.

    .venv/bin/python benchmarks/run_efficiency.py RUN [RUN ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path
from typing import Any


def efficiency(run: Path) -> dict[str, Any]:
    """Steps, wall time, time in optimiser steps and its share, and the epoch-boundary step against the others."""
    rows = list(csv.DictReader(open(run / "metrics.csv", newline="")))
    steps = [row for row in rows if row["kind"] == "step"]
    if not steps or not steps[0].get("step_seconds"):
        raise SystemExit(f"{run}: metrics.csv has no step_seconds (a run older than the efficiency column)")
    wall = float(rows[-1]["seconds"])
    training = sum(float(row["step_seconds"]) for row in steps)
    epochs = {row["epoch"] for row in steps}
    first = [float(next(r for r in steps if r["epoch"] == e)["step_seconds"]) for e in epochs]
    gaps = [float(b["seconds"]) - float(a["seconds"]) for a, b in zip(steps, steps[1:])]
    return {
        "run": str(run),
        "steps": len(steps),
        "epochs": len(epochs),
        "wall_seconds": round(wall, 1),
        "training_seconds": round(training, 1),
        "efficiency": training / wall,
        "median_step_seconds": statistics.median(float(r["step_seconds"]) for r in steps),
        "median_first_step_of_epoch_seconds": statistics.median(first),
        "median_seconds_between_steps": statistics.median(gaps) if gaps else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    results = [efficiency(run) for run in args.runs]
    print("| run | steps | wall | in optimiser steps | efficiency | median step | first step of an epoch |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['run']} | {r['steps']} | {r['wall_seconds']:.0f} s | {r['training_seconds']:.0f} s | "
              f"{100 * r['efficiency']:.1f} % | {r['median_step_seconds']:.2f} s | "
              f"{r['median_first_step_of_epoch_seconds']:.2f} s |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
