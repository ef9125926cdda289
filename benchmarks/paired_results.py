"""Two evaluation outputs made by separate commands, paired by fold: each row's mean ± std and B − A ± SE.

`sonocl evaluate --init A B` pairs its encoders itself; runs made apart (a `sonocl study` per arm, an arm trained
with other code) are paired here, and only where every fold of the two tested the same videos (a fold whose test
videos differ stops the script: its difference would not be paired).

    python benchmarks/paired_results.py A/results.json B/results.json [--unit video|frame]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pocus_study import _mean_std, _paired_delta, test_digest  # noqa: E402


def fold_runs(path: Path) -> tuple[str, dict[tuple[int, int], dict]]:
    """The one encoder of an evaluation's results.json: its label and its fold runs by (seed, fold)."""
    inits = json.loads(path.read_text(encoding="utf-8"))["inits"]
    if len(inits) != 1:
        raise SystemExit(f"{path}: {len(inits)} encoders; pair two outputs of one encoder each")
    return inits[0]["label"], {(run["seed"], run["fold"]): run for run in inits[0]["runs"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first", type=Path, help="results.json of A")
    parser.add_argument("second", type=Path, help="results.json of B")
    parser.add_argument("--unit", choices=("video", "frame"), default="video")
    args = parser.parse_args()
    (label_a, runs_a), (label_b, runs_b) = fold_runs(args.first), fold_runs(args.second)
    folds = sorted(runs_a.keys() & runs_b.keys())
    if len(folds) < 2:
        raise SystemExit(f"{len(folds)} folds in common: nothing to pair")
    differ = [fold for fold in folds if test_digest(runs_a[fold]) != test_digest(runs_b[fold])]
    if differ:
        raise SystemExit(f"seed/fold {differ}: the two tested different videos; not paired")
    a = [runs_a[fold][args.unit]["accuracy"] for fold in folds]
    b = [runs_b[fold][args.unit]["accuracy"] for fold in folds]
    for label, values in ((label_a, a), (label_b, b)):
        mean, std = _mean_std(values)
        print(f"{label}: {args.unit} accuracy {100 * mean:.1f} ± {100 * std:.1f} over {len(values)} folds")
    first = {fold: (x, test_digest(runs_a[fold])) for fold, x in zip(folds, a, strict=True)}
    second = [{"seed": seed, "fold": fold, "video_accuracy": y, "test_digest": test_digest(runs_b[(seed, fold)])}
              for (seed, fold), y in zip(folds, b, strict=True)]  # fmt: skip
    lower = sum(y < x for x, y in zip(a, b, strict=True))
    print(
        f"{label_b} − {label_a}: {_paired_delta(second, first)}; lower on {lower} of {len(folds)} folds;"
        " every fold's test videos identical"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
