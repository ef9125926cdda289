"""`sonocl demo --seed K` for K = 0…4: does the pretrained encoder lead random init on every seed, and how long does
the whole demo take?

Each seed is one ``python -m sonocl demo --seed K`` in a subprocess (wall time end to end, imports included, the
one-time install excluded), its scores read from the demo's ``evaluation-knn`` (the headline) and
``evaluation-last-block`` results. The check passes when, on every seed, the SimCLR encoder's mean video accuracy
under kNN is above random init's; the spread over seeds is printed beside the per-seed figures. The machine's
load average is recorded with each run, since a shared CPU stretches every wall time.

Merges its runs into ``benchmarks/out/demo_seeds.json`` (one run per seed, the latest kept) so that the seeds can be
run in separate calls, and exits 1 when a seed recorded there fails the check::

    .venv/bin/python benchmarks/demo_seeds.py [--seeds 0 1 2 3 4] [--work /tmp/demo-seeds]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sonocl.demo import PROTOCOLS, video_accuracy

REPO = Path(__file__).resolve().parents[1]
OUTPUT = REPO / "benchmarks" / "out" / "demo_seeds.json"


def run_seed(seed: int, work: Path) -> dict[str, Any]:
    """One demo run: wall seconds, load averages before and after, and each protocol's video accuracies."""
    out = work / f"seed-{seed}"
    log = work / f"seed-{seed}.log"
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    with open(log, "w", encoding="utf-8") as handle:
        subprocess.run(
            [sys.executable, "-m", "sonocl", "demo", "--seed", str(seed), "--out", str(out)],
            stdout=handle,
            stderr=subprocess.STDOUT,
            check=True,
        )
    wall = time.perf_counter() - started
    scores = {protocol: video_accuracy(out / f"evaluation-{protocol}") for protocol, _ in PROTOCOLS}
    return {
        "seed": seed,
        "wall_seconds": round(wall, 1),
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "log": str(log),
        "video_accuracy": scores,
        "leads": scores["knn"]["simclr"]["mean"] > scores["knn"]["random"]["mean"],
    }


def _table(runs: list[dict[str, Any]]) -> list[str]:
    protocols = [protocol for protocol, _ in PROTOCOLS]
    lines = [
        f"{'seed':>4}  {'wall s':>6}  {'load':>9}  " + "  ".join(f"{p + ' random → simclr':>30}" for p in protocols)
    ]
    for run in runs:
        cells = []
        for protocol in protocols:
            random, simclr = (run["video_accuracy"][protocol][label] for label in ("random", "simclr"))
            cells.append(
                f"{100 * random['mean']:5.1f}±{100 * random['std']:4.1f} → {100 * simclr['mean']:5.1f}±{100 * simclr['std']:4.1f}"
            )
        lines.append(
            f"{run['seed']:>4}  {run['wall_seconds']:>6.0f}  {run['load_before']:>4.1f}–{run['load_after']:<4.1f}  "
            + "  ".join(f"{cell:>30}" for cell in cells)
        )
    for protocol in protocols:
        gains = [
            100 * (r["video_accuracy"][protocol]["simclr"]["mean"] - r["video_accuracy"][protocol]["random"]["mean"])
            for r in runs
        ]
        spread = f" (sd {statistics.stdev(gains):.1f})" if len(gains) > 1 else ""
        lines.append(
            f"{protocol}: gain over seeds {min(gains):+.1f} … {max(gains):+.1f} points, mean {statistics.mean(gains):+.1f}"
            + spread
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--work", type=Path, default=Path("/tmp/demo-seeds"), help="where the demo runs write")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    recorded = json.loads(OUTPUT.read_text()) if OUTPUT.exists() else {"runs": []}
    runs = {run["seed"]: run for run in recorded["runs"]}
    for seed in args.seeds:
        runs[seed] = run_seed(seed, args.work)
        print(f"seed {seed}: {runs[seed]['wall_seconds']:.0f} s, leads: {runs[seed]['leads']}", flush=True)
        OUTPUT.parent.mkdir(parents=True, exist_ok=True)
        OUTPUT.write_text(json.dumps({"runs": [runs[k] for k in sorted(runs)]}, indent=1) + "\n")
    ordered = [runs[k] for k in sorted(runs)]
    print("\n".join(_table(ordered)))
    failed = [run["seed"] for run in ordered if not run["leads"]]
    print("every recorded seed leads" if not failed else f"FAILED: random init leads or ties on seeds {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
