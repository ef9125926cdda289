"""What choosing the best checkpoint at every epoch costs: the held-out loss after each epoch (and a checkpoint held
in memory when it improves) against a run that exports its last checkpoint, same preset otherwise.

USCL's preset exports ``best``: since 2026-12-03 its held-out loss is computed after every epoch, as the reference
code does, instead of only at the monitored epochs. ``--set export=last`` is the same run without that selection.
The two are run in alternating rounds (the machine is shared); each figure is a run's own wall time from its
``metrics.csv`` (the last row's ``seconds``), and the ratio is best / last per round.

    python benchmarks/best_selection_cost.py --store STORE [--method uscl --size 64 --batch-size 32 --steps 120
        --rounds 2]

Writes ``benchmarks/out/best_selection_cost.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from sonocl.cli import main as sonocl

OUT = Path(__file__).resolve().parent / "out" / "best_selection_cost.json"


def run_seconds(store: str, args: argparse.Namespace, export: str, out: Path) -> float:
    """One pretraining run's wall time, from its metrics.csv."""
    argv = ["pretrain", "--store", store, "--method", args.method, "--out", str(out), "--steps", str(args.steps),
            "--batch-size", str(args.batch_size), "--size", str(args.size), "--no-progress", "--set", f"export={export}"]  # fmt: skip
    if sonocl(argv) != 0:
        raise SystemExit(f"sonocl {' '.join(argv)} failed")
    with open(out / "metrics.csv", newline="") as handle:
        return float(list(csv.DictReader(handle))[-1]["seconds"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--method", default="uscl")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    seconds: dict[str, list[float]] = {"best": [], "last": []}
    with tempfile.TemporaryDirectory() as scratch:
        for round_ in range(args.rounds):
            order = ("best", "last") if round_ % 2 == 0 else ("last", "best")
            for export in order:
                out = Path(scratch) / f"{export}-{round_}"
                seconds[export].append(run_seconds(args.store, args, export, out))
                shutil.rmtree(out)
                print(f"round {round_}: export {export}: {seconds[export][-1]:.1f} s", file=sys.stderr)
    ratios = [best / last for best, last in zip(seconds["best"], seconds["last"])]
    result = {
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "machine": platform.node(),
        "command": "python benchmarks/best_selection_cost.py " + " ".join(sys.argv[1:]),
        "settings": vars(args),
        "seconds": seconds,
        "ratio_best_over_last": ratios,
        "median_ratio": statistics.median(ratios),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
