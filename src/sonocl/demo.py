"""`sonocl demo`: the whole pipeline on built-in synthetic data, offline, in a few minutes on a laptop CPU.

It runs exactly the commands a user would run on their own data, in order — make the phantom (mp4 and DICOM
cine files plus a labels CSV), `ingest`, `info`, `pretrain`, `evaluate` against random init with 5-fold
cross validation grouped by patient, `report` — and ends with what pretraining bought, what each number means
and how to do the same on one's own data.

The headline is kNN on frozen features: it measures the representation alone and needs no training per fold, so
it shows within a CPU minute what pretraining changed; last-block fine-tuning is reported beside it. The method is
SimCLR because it reads no labels (USCL's preset trains a classifier on the class labels, which the evaluation's
leak guard refuses on the same videos) and beat self-supervised USCL in the one comparison made (seed 0). The
budget, 240 steps of batch 32 at 32 px with Adam at 1e-3, puts the pretrained encoder ahead on every seed 0–4;
the smaller ones tried did not: the preset's SGD for 24 steps at 64 px (behind on all five seeds), 96 steps at
32 px (behind on seed 0), 72 Adam steps at 64 px (behind on two seeds). `benchmarks/demo_seeds.py` checks the seeds; figures and wall times in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import time
from pathlib import Path

from sonocl import outputs
from sonocl.cli import main as sonocl_main
from sonocl.options import MIN_IMAGE_SIDE, integer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("sonocl-demo"),
        help="working folder: new, empty or an earlier demo's, whose outputs are replaced (default: %(default)s)",
    )
    parser.add_argument(
        "--videos",
        type=integer(10, "the phantom gives a patient 2 videos, and 5 folds grouped by patient need 5 patients"),
        default=30,
        help="phantom videos to make (default: %(default)s)",
    )
    parser.add_argument("--frames", type=integer(1), default=32, help="frames per phantom video (default: %(default)s)")
    parser.add_argument(
        "--steps", type=integer(1), default=240, help="SimCLR pretraining steps of batch 32 (default: %(default)s)"
    )
    parser.add_argument(
        "--eval-epochs",
        type=integer(1),
        default=6,
        help="last-block fine-tuning epochs per fold (default: %(default)s)",
    )
    parser.add_argument(
        "--size",
        type=integer(MIN_IMAGE_SIDE, f"frames under {MIN_IMAGE_SIDE} px are not an ultrasound image"),
        default=32,
        help="image size for pretraining and evaluation (default: %(default)s)",
    )
    parser.add_argument(
        "--seed", type=integer(0), default=0, help="phantom videos, folds, initialisations (default: %(default)s)"
    )


def _step(title: str, argv: list[str], allowed: tuple[int, ...] = (0,)) -> None:
    print(f"\n== {title}\n$ sonocl {shlex.join(argv)}", flush=True)
    started = time.perf_counter()
    code = sonocl_main(argv)
    if code not in allowed:
        raise SystemExit(f"sonocl demo: `sonocl {shlex.join(argv)}` failed with exit status {code}")
    print(f"({time.perf_counter() - started:.1f} s)", flush=True)


PROTOCOLS = (
    ("knn", "kNN on frozen features (headline)"),
    ("last-block", "last-block fine-tuning"),
)
"""The demo's two evaluations, in the order they run and print."""


def video_accuracy(evaluation: Path) -> dict[str, dict[str, float]]:
    """Video-level accuracy (mean, std, n over folds) of each init of ``evaluation/results.json``, by label."""
    results = json.loads((evaluation / "results.json").read_text(encoding="utf-8"))
    return {entry["label"]: entry["summary"]["video"]["accuracy"] for entry in results["inits"]}


def _headline(evaluations: dict[str, Path], eval_epochs: int) -> list[str]:
    """One row per protocol: random, pretrained (mean ± std over folds, %) and their difference in points."""
    lines = [f"  {'':<42}{'random init':>16}{'SimCLR':>16}{'difference':>12}"]
    for protocol, title in PROTOCOLS:
        scores = video_accuracy(evaluations[protocol])
        if protocol == "last-block":
            title = f"{title}, {eval_epochs} epoch{'s' if eval_epochs != 1 else ''}"
        cells = [
            f"{100 * scores[label]['mean']:.1f} ± {100 * scores[label]['std']:.1f} %" for label in ("random", "simclr")
        ]
        gain = 100 * (scores["simclr"]["mean"] - scores["random"]["mean"])
        lines.append(f"  {title:<42}{cells[0]:>16}{cells[1]:>16}{gain:>+11.1f}")
    return lines


def _explanation(args: argparse.Namespace, evaluations: dict[str, Path], pretrain_seconds: float) -> list[str]:
    """What the numbers are, where they come from, and the way to the real thing."""
    results = json.loads((evaluations["knn"] / "results.json").read_text(encoding="utf-8"))
    config = results["config"]
    grouping = "patient" if config["group_by"] == "group" else "video"
    overlap = next(
        (e.get("pretraining_overlap", {}).get("note") for e in results["inits"] if e["label"] == "simclr"), ""
    )
    return [
        "What the numbers are:",
        "  - video-level test accuracy (a video's class = the mean of its frames' predictions; chance ≈ 33 %),",
        f"    mean ± std over {config['folds']} folds that each hold out whole {grouping}s; seed {args.seed} draws the phantom",
        "    videos, the folds and the initialisations (other seeds: --seed K).",
        f"  - kNN: the encoder stays frozen; each test frame takes the classes of its {config['knn_k']} most similar",
        "    training frames (cosine similarity of the 512-d features), weighted by that similarity. Nothing is",
        "    trained on the labels, so it measures the representation itself.",
        "  - last-block: layer4[1] and a linear head are trained on the training folds' labels for",
        f"    {args.eval_epochs} epoch(s): the representation plus what that training learns from either start.",
        f"  - random init: the same ResNet-18, untrained. SimCLR: {args.steps} steps of batch 32 at {args.size} px",
        f"    ({32 * args.steps:,} pairs, {pretrain_seconds:.0f} s here) on all {args.videos} videos without their labels.",
        *([f"    The evaluation says: {overlap}."] if overlap else []),
        "  A demonstration on synthetic data at a toy budget, not evidence about real ultrasound.",
        "On your own data (docs/ingest.md, docs/evaluate.md, docs/api.md for Python):",
        "  sonocl ingest VIDEOS_DIR --out store --labels labels.csv",
        "  sonocl pretrain --store store --method uscl --out runs/uscl --epochs 300 --label-rate 0",
        "  sonocl evaluate --store store --init random runs/uscl --protocol knn --folds 5 --out eval-knn",
        "  sonocl evaluate --store store --init random runs/uscl --protocol last-block --folds 5 --out eval --jobs 2",
        "  sonocl export runs/uscl --out uscl-encoder --eval eval      # weights, metadata and a model card",
    ]


def _remove_earlier_demo(folders: list[tuple[Path, outputs.Kind]], report: Path) -> None:
    """A rerun starts afresh (`pretrain` refuses a used --out; a stale store or evaluation would mislead), removing
    only what an earlier demo made: each folder marked as its kind and holding nothing else, and its report. Anything
    else there stops the demo before it removes a thing."""
    from sonocl.report.html import is_report

    present = [folder for folder, _ in folders if folder.exists()]
    foreign = [folder for folder, kind in folders if folder.exists() and not outputs.removable(folder, kind)]
    if report.exists() and not is_report(report):
        foreign.append(report)
    if foreign:
        raise outputs.OutputError(
            f"{foreign[0]}: not made by an earlier `sonocl demo` (or it holds other files), and the demo would "
            "replace it; move it away or choose another --out"
        )
    for folder in present:
        shutil.rmtree(folder)
    report.unlink(missing_ok=True)


def run(args: argparse.Namespace) -> int:
    from sonocl.data.phantom import write_phantom_dataset

    started = time.perf_counter()
    out = outputs.claim(args.out, outputs.DEMO)
    data, store, pretrained = out / "data", out / "store", out / "pretrain-simclr"
    evaluations = {protocol: out / f"evaluation-{protocol}" for protocol, _ in PROTOCOLS}
    report = out / "report.html"
    _remove_earlier_demo(
        [(data, outputs.PHANTOM), (store, outputs.STORE), (pretrained, outputs.RUN)]
        + [(evaluation, outputs.EVALUATION) for evaluation in evaluations.values()],
        report,
    )

    print(f"== Making {args.videos} synthetic lung-ultrasound videos (mp4 and DICOM cine) in {data}", flush=True)
    outputs.claim(data, outputs.PHANTOM)
    write_phantom_dataset(data, num_videos=args.videos, frames_per_video=args.frames, size=128, seed=args.seed)
    _step("Ingest", ["ingest", str(data / "videos"), "--out", str(store), "--size", "64",
                     "--labels", str(data / "labels.csv"), "--extra-columns", "anatomy,b_lines,consolidation"])  # fmt: skip
    _step("Store summary", ["info", str(store)])
    common = ["--size", str(args.size), "--seed", str(args.seed)]
    pretrain_started = time.perf_counter()
    _step("Pretrain SimCLR (no labels)", [
        "pretrain", "--store", str(store), "--method", "simclr", "--out", str(pretrained), "--steps", str(args.steps),
        "--batch-size", "32", "--items", "frames", "--set", "optim.name=adam", "--lr", "1e-3",
        "--set", "optim.lr_scaling=none", "--no-progress", *common,
    ])  # fmt: skip
    pretrain_seconds = time.perf_counter() - pretrain_started
    folds = ["--folds", "5", "--fps", "0", "--batch-size", "32", *common]
    inits = ["--init", "random", str(pretrained), "--name", "random", "simclr"]
    _step("Evaluate (headline): kNN on frozen features, 5 folds grouped by patient", [
        "evaluate", "--store", str(store), *inits, "--protocol", "knn", "--frames-per-video", "16", *folds,
        "--out", str(evaluations["knn"]),
    ])  # fmt: skip
    _step(f"Evaluate (beside): last-block fine-tuning, {args.eval_epochs} epochs per fold", [
        "evaluate", "--store", str(store), *inits, "--protocol", "last-block", "--epochs", str(args.eval_epochs),
        "--frames-per-video", "8", *folds, "--out", str(evaluations["last-block"]),
    ])  # fmt: skip
    _step("Report", ["report", str(pretrained), *map(str, evaluations.values()), "--out", str(report)])

    print(f"\nsonocl demo finished in {time.perf_counter() - started:.0f} s.")
    print(f"What pretraining bought on the phantom ({args.videos} synthetic videos, 3 classes, seed {args.seed}):")
    print("\n".join(_headline(evaluations, args.eval_epochs)))
    print("\n".join(_explanation(args, evaluations, pretrain_seconds)))
    print(
        f"Written: phantom {data}, store {store}, encoder {pretrained / 'encoder.safetensors'}, "
        f"evaluations {', '.join(map(str, evaluations.values()))}"
    )
    print(f"Report: {report.resolve()}")
    return 0
