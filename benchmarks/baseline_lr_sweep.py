"""SimCLR and BYOL without LARS at batch 32: which optimiser and learning rate work? (``docs/methods.md`` §5)

The papers train with LARS at batch 4,096; sonocl runs them with SGD or Adam at batch 32–256. This sweep pretrains
each setting on the demo's phantom (30 videos, 3 classes) for the demo's budget (240 steps of batch 32 at 32 px,
without labels) and scores the encoder with sonocl's kNN protocol (5 video-grouped folds, video accuracy), beside
the collapse metric of the run's last monitor. Settings, for each method:

- ``linear``: the preset, SGD ``lr × B/256`` (SimCLR 0.3 → 0.0375, BYOL 0.2 → 0.025 at B = 32);
- ``sqrt``: SGD ``lr × √(B/256)`` with SimCLR's square-root rule 0.075·√B (appendix B.1: 1.2 × √(B/256) → 0.42),
  and BYOL's base 0.2 → 0.071;
- ``adam-3e-4`` (USCL's optimiser) and ``adam-1e-3`` (the demo's), no scaling.

Weight decay stays at each preset's. Every run is resumable: results merge into ``benchmarks/out/lr_sweep.json``
and a rerun skips the settings already there::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/baseline_lr_sweep.py [--seeds 0 1] [--work /tmp/lr-sweep]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
OUTPUT = REPO / "benchmarks" / "out" / "lr_sweep.json"
STEPS, BATCH, SIZE = 240, 32, 32
SETTINGS: dict[str, dict[str, list[str]]] = {
    "simclr": {
        "linear": [],
        "sqrt": ["--lr", "1.2", "--set", "optim.lr_scaling=sqrt"],
        "adam-3e-4": ["--set", "optim.name=adam", "--lr", "3e-4", "--set", "optim.lr_scaling=none"],
        "adam-1e-3": ["--set", "optim.name=adam", "--lr", "1e-3", "--set", "optim.lr_scaling=none"],
    },
    "byol": {
        "linear": [],
        "sqrt": ["--set", "optim.lr_scaling=sqrt"],
        "adam-3e-4": ["--set", "optim.name=adam", "--lr", "3e-4", "--set", "optim.lr_scaling=none"],
        "adam-1e-3": ["--set", "optim.name=adam", "--lr", "1e-3", "--set", "optim.lr_scaling=none"],
    },
}


def sonocl(*args: str, log: Path) -> None:
    with open(log, "a", encoding="utf-8") as handle:
        handle.write(f"\n$ sonocl {' '.join(args)}\n")
        handle.flush()
        subprocess.run([sys.executable, "-m", "sonocl", *args], stdout=handle, stderr=subprocess.STDOUT, check=True)


def phantom_store(work: Path, seed: int) -> Path:
    """The demo's phantom (30 videos of 32 frames) ingested at 64 px, once per seed."""
    from sonocl.data.phantom import write_phantom_dataset

    data, store = work / f"phantom-{seed}", work / f"store-{seed}"
    if not (store / "done").exists():
        write_phantom_dataset(data, num_videos=30, frames_per_video=32, size=128, seed=seed)
        labels = ["--labels", str(data / "labels.csv")]
        sonocl("ingest", str(data / "videos"), "--out", str(store), "--size", "64", *labels, log=work / "ingest.log")
        (store / "done").write_text("")
    return store


def run_setting(method: str, setting: str, seed: int, store: Path, work: Path) -> dict[str, Any]:
    """Pretrain one setting and score it: kNN video accuracy over 5 folds, the last monitor's kNN and collapse."""
    run, evaluation, log = (work / f"{kind}-{method}-{setting}-{seed}" for kind in ("run", "eval", "log"))
    started = time.perf_counter()
    budget = ["--steps", str(STEPS), "--batch-size", str(BATCH), "--size", str(SIZE), "--items", "frames"]
    options = ["--seed", str(seed), "--threads", "1", "--no-progress", *SETTINGS[method][setting]]
    resume = ["--resume"] if (run / "checkpoints" / "last.pt").exists() else []
    sonocl("pretrain", "--store", str(store), "--method", method, "--out", str(run), *budget, *options, *resume,
           log=log)  # fmt: skip
    pretrain_seconds = time.perf_counter() - started
    folds = ["--folds", "5", "--fps", "0", "--seed", str(seed), "--device", "cpu"]
    sonocl("evaluate", "--store", str(store), "--init", str(run), "--name", method, "--protocol", "knn", *folds,
           "--out", str(evaluation), log=log)  # fmt: skip
    results = json.loads((evaluation / "results.json").read_text())
    accuracies = [r["video"]["accuracy"] for r in results["inits"][0]["runs"]]
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    steps = [row for row in rows if row["kind"] == "step"]
    epochs = [row for row in rows if row["kind"] == "epoch"]
    return {
        "method": method,
        "setting": setting,
        "seed": seed,
        "lr": max(float(row["lr"]) for row in steps),  # the peak learning rate the run used
        "optimizer": _optimizer(run),
        "knn_video_accuracy": statistics.mean(accuracies),
        "knn_video_accuracy_folds": accuracies,
        "monitor_knn": float(epochs[-1]["knn_acc"]) if epochs and epochs[-1]["knn_acc"] else None,
        "embedding_std": float(epochs[-1]["embedding_std"]) if epochs and epochs[-1]["embedding_std"] else None,
        "final_loss": float(steps[-1]["loss"]),
        "pretrain_seconds": round(pretrain_seconds, 1),
        "load": os.getloadavg()[0],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _optimizer(run: Path) -> str:
    import yaml

    return yaml.safe_load((run / "config.yaml").read_text())["optim"]["name"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--work", type=Path, default=Path("/tmp/lr-sweep"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    done = json.loads(OUTPUT.read_text())["runs"] if OUTPUT.exists() else []
    for seed in args.seeds:
        store = phantom_store(args.work, seed)
        for method, settings in SETTINGS.items():
            for setting in settings:
                if any((r["method"], r["setting"], r["seed"]) == (method, setting, seed) for r in done):
                    continue
                done.append(run_setting(method, setting, seed, store, args.work))
                OUTPUT.parent.mkdir(parents=True, exist_ok=True)
                tmp = OUTPUT.with_suffix(".tmp")
                tmp.write_text(json.dumps({"command": "benchmarks/baseline_lr_sweep.py", "runs": done}, indent=1))
                tmp.replace(OUTPUT)
                print(json.dumps(done[-1]))
    print(table(done))
    return 0


def table(runs: list[dict[str, Any]]) -> str:
    """Markdown: one row per method × setting, kNN video accuracy mean over seeds with each seed's value."""
    lines = ["| method | setting | peak LR | kNN video acc (mean; per seed) | embedding std | final loss |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for method, settings in SETTINGS.items():
        for setting in settings:
            mine = [r for r in runs if (r["method"], r["setting"]) == (method, setting)]
            if not mine:
                continue
            accs = [100 * r["knn_video_accuracy"] for r in mine]
            per_seed = ", ".join(f"{a:.1f}" for a in accs)
            std = statistics.mean(r["embedding_std"] or 0 for r in mine)
            loss = statistics.mean(r["final_loss"] for r in mine)
            lines.append(f"| {method} | {setting} | {mine[0]['lr']:.3g} | {statistics.mean(accs):.1f} ({per_seed}) | "
                         f"{std:.3f} | {loss:.3f} |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
