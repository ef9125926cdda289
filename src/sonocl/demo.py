"""`sonocl demo`: the whole pipeline on built-in synthetic data, offline, in a few minutes on a laptop CPU.

It runs exactly the commands a user would run on their own data, in order — make the phantom (mp4 and DICOM
cine files plus a labels CSV), `ingest`, `info`, `pretrain` (USCL, briefly), `evaluate` against random
init with video-grouped 5-fold cross validation, `report` — and prints the headline numbers and where the
report is.
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path

from sonocl.cli import main as sonocl_main


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("sonocl-demo"), help="working folder (default: %(default)s)")
    parser.add_argument("--videos", type=int, default=30, help="phantom videos to make (default: %(default)s)")
    parser.add_argument("--frames", type=int, default=32, help="frames per phantom video (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=4, help="USCL pretraining epochs (default: %(default)s)")
    parser.add_argument("--eval-epochs", type=int, default=6, help="fine-tuning epochs per fold (default: %(default)s)")
    parser.add_argument("--size", type=int, default=64, help="image size for pretraining and evaluation (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)


def _step(title: str, argv: list[str], allowed: tuple[int, ...] = (0,)) -> None:
    print(f"\n== {title}\n$ sonocl {shlex.join(argv)}", flush=True)
    started = time.perf_counter()
    code = sonocl_main(argv)
    if code not in allowed:
        raise SystemExit(f"sonocl demo: `sonocl {shlex.join(argv)}` failed with exit status {code}")
    print(f"({time.perf_counter() - started:.1f} s)", flush=True)


def _headline(evaluation: Path) -> list[str]:
    """One line per init: video-level accuracy, balanced accuracy and macro-F1, mean ± std over folds."""
    results = json.loads((evaluation / "results.json").read_text(encoding="utf-8"))
    lines = []
    for entry in results["inits"]:
        video = entry["summary"]["video"]
        parts = [f"{name} {100 * video[key]['mean']:.1f} ± {100 * video[key]['std']:.1f} %"
                 for key, name in (("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy"), ("macro_f1", "macro-F1"))]
        lines.append(f"  {entry['label']:<8} " + ", ".join(parts))
    return lines


def run(args: argparse.Namespace) -> int:
    from sonocl.data.phantom import write_phantom_dataset

    started = time.perf_counter()
    out: Path = args.out
    data, store, pretrained, evaluation = out / "data", out / "store", out / "pretrain-uscl", out / "evaluation"
    report = out / "report.html"

    print(f"== Making {args.videos} synthetic lung-ultrasound videos (mp4 and DICOM cine) in {data}", flush=True)
    write_phantom_dataset(data, num_videos=args.videos, frames_per_video=args.frames, size=128, seed=args.seed)
    _step("Ingest", ["ingest", str(data / "videos"), "--out", str(store), "--size", str(args.size),
                     "--labels", str(data / "labels.csv"), "--extra-columns", "anatomy,b_lines,consolidation"])
    _step("Store summary", ["info", str(store)])
    common = ["--size", str(args.size), "--seed", str(args.seed)]
    _step("Pretrain USCL", ["pretrain", "--store", str(store), "--method", "uscl", "--out", str(pretrained),
                            "--epochs", str(args.epochs), "--batch-size", "8", "--no-progress", *common])
    _step("Evaluate: video-grouped 5-fold cross validation, last-block fine-tuning",
          ["evaluate", "--store", str(store), "--init", "random", str(pretrained), "--name", "random", "uscl",
           "--protocol", "last-block", "--folds", "5", "--epochs", str(args.eval_epochs), "--batch-size", "32",
           "--fps", "0", "--frames-per-video", "16",
           "--out", str(evaluation), *common])
    _step("Report", ["report", str(pretrained), str(evaluation), "--out", str(report)])

    print(f"\nsonocl demo finished in {time.perf_counter() - started:.0f} s.")
    print("Video-level test scores, mean ± std over 5 video-grouped folds (last epoch: nothing selected on the test fold):")
    print("\n".join(_headline(evaluation)))
    print(f"Report: {report.resolve()}")
    return 0

