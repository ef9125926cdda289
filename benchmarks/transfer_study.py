"""The transfer study: do encoders pretrained on one lung-ultrasound corpus help on another? (``docs/results.md``)

The seeds' own protocol (USCL pretrains once on US-4 and tests on POCUS): every method of the POCUS study is
pretrained on one corpus at one budget and evaluated, frozen (kNN, linear probe), on the tasks of both corpora:

- POCUS (``../shared/data/pocus``, convex videos): COVID-19 / pneumonia / regular, folds grouped by patient;
- COVID-BLUES (``../shared/data/covid_blues``: 362 videos of 63 patients, one scanner): severity 0–3,
  B-lines yes/no, folds grouped by patient.

The order answers the study's question first: for each corpus, every method pretrained on it and scored on the
other corpus's tasks (it has seen none of their videos). Then the cheap rows: the same-dataset rows (pretrained on
the corpus they are tested on: transductive, their test videos seen without labels, as every table says), and
random init and the best row at 112 px (`RESOLUTION`). Then the long ones: the papers' last-block protocol (3 seeds)
on the other corpus's main task (``BOTH_TASKS``: POCUS 3-class, BLUES severity) for random init and the two best
transferred encoders, and multi-source: the ``--both`` methods pretrained per fold on both corpora (`sonocl study
--also-store`: the evaluated corpus without the fold's test videos) for the main tasks, and beside them per fold on
the evaluated corpus alone, the single source it is compared with. The best rows are chosen on the 64 px
linear-probe test folds, as said where they are used. Each step resumes
(a rerun skips what is done and continues an interrupted run at its last checkpoint or fold); the fold runs are
collected into ``docs/study/transfer.json`` and the tables written into ``docs/results.md`` between the study's
markers.

    python benchmarks/transfer_study.py [--root runs/transfer-study] [--only METHOD ...] [--corpora blues pocus]

Neither dataset nor anything derived from it is committed: the runs stay under ``--root``; the JSON holds metrics.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pocus_study as pocus  # noqa: E402  (the POCUS study's store, rows, budget and paired statistics)

REPO = pocus.REPO
BLUES = (REPO / ".." / "shared" / "data" / "covid_blues").resolve()
SIZE = pocus.SIZE
COMMON = ["--recipe", "meta-uscl", "--size", str(SIZE), "--folds", "5", "--group-by", "group"]
"""Every evaluation: the POCUS study's recipe and size, 5 folds grouped by patient."""
PROTOCOLS = ("knn", "linear")
"""The frozen protocols of every row."""
LAST_BLOCK_SEEDS = 3
"""The papers' protocol (`pocus_study.PROTOCOLS`) over this many fold splits, for random init and each main task's
two best rows."""
METHODS = ("uscl-ssl", "simclr", "ivpp", "meta-uscl", "moco", "byol")
"""The pretraining rows, with the POCUS study's options and budget (``pocus_study.ROWS``), USCL (the seeds' claim)
first."""
BOTH = ("uscl-ssl",)
"""The methods pretrained on both corpora (per fold, so that the evaluated corpus's test videos are never seen)."""
CORPORA = ("blues", "pocus")
"""Where an encoder is pretrained: BLUES first (its encoders answer the study's first question, BLUES → POCUS)."""
NAMES = {"blues": "COVID-BLUES", "pocus": "POCUS"}
PER_FOLD = ("fold", "both")
"""The rows pretrained per fold (`sonocl study`) without the evaluated corpus's test videos: on that corpus alone
(``fold``, the single source beside the transductive row), and on both corpora (``both``, multi-source)."""


@dataclass(frozen=True)
class Task:
    name: str
    corpus: str
    """The store it is evaluated on."""
    options: tuple[str, ...]
    """`sonocl evaluate` options that define the task (classes, label column, unit)."""

    @property
    def unit(self) -> str:
        return "patient" if "patient" in self.options else "video"

    @property
    def other_corpus(self) -> str:
        return next(corpus for corpus in CORPORA if corpus != self.corpus)


TASKS = (
    Task("POCUS 3-class", "pocus", ("--classes", pocus.CLASSES)),
    Task("BLUES severity 0–3", "blues", ("--classes", "0,1,2,3")),
    Task("BLUES severity 0 vs ≥ 1", "blues", ("--classes", "0,≥1=1+2+3")),
    Task("BLUES B-lines", "blues", ("--label-column", "b_lines", "--classes", "no,yes")),
    Task(
        "BLUES COVID-19 per patient",
        "blues",
        ("--label-column", "covid", "--classes", "negative,positive", "--unit", "patient"),
    ),
)


BOTH_TASKS = ("POCUS 3-class", "BLUES severity 0–3")
RESOLUTION = 112
"""The resolution step: random init and each task's best row again at this size (is resolution the lever?)."""


REFERENCE_POINTS = {
    "BLUES COVID-19 per patient": "The paper's reference points (Wiedemann et al., IEEE JBHI 29(9), 2025, as the "
    "dataset's README gives them): image models trained on other lung ultrasound data detect COVID-19 here with about "
    "65 % accuracy, trained on this data up to 79 %; the experts' annotations reach at most 65 %. Its protocol is not "
    "this one (its splits, its models), so these are landmarks, not paired comparisons.",
}
"""Published figures shown under a task's tables."""


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-").replace("--", "-")


# ------------------------------------------------------------------------------------------------- stores


def blues_labels(path: Path) -> None:
    """One row per video of severity.csv: severity 0–3, A-lines and B-lines as the CSV writes them (stray spaces
    included: the evaluation reads ``yes `` as ``yes``), the patient, and the patient's PCR result."""
    covid = {}
    with open(BLUES / "clinical_variables.csv", newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            covid[row["patient_id"].strip()] = {"1": "positive", "0": "negative"}.get(row["cov_test"].strip(), "")
    out = []
    with open(BLUES / "severity.csv", newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            patient = row["video_file"].split("_")[1]
            severity = row["Severity Score"].strip()
            out.append(
                {
                    "file": row["video_file"],
                    "severity": str(int(float(severity))) if severity else "",
                    "a_lines": row["A-lines"],
                    "b_lines": row["B-lines"],
                    "patient": patient,
                    "covid": covid.get(patient, ""),
                }
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(out[0]))
        writer.writeheader()
        writer.writerows(out)


def ingest_blues(root: Path) -> Path:
    """BLUES at 128 px (as the POCUS store): the label is the severity; B-lines, A-lines and COVID-19 extra columns."""
    store = root / "blues-store"
    if not (root / "blues-store.done").exists():
        blues_labels(root / "blues-labels.csv")
        pocus.sonocl(
            "ingest", str(BLUES / "lus_videos"), "--out", str(store), "--size", "128",
            "--labels", str(root / "blues-labels.csv"), "--id-column", "file", "--label-column", "severity",
            "--group-column", "patient", "--extra-columns", "a_lines,b_lines,covid", log=root / "logs" / "ingest.log",
        )  # fmt: skip
        (root / "blues-store.done").write_text("")
    return store


# ------------------------------------------------------------------------------------------------- runs


def pretrain_args(method: str) -> list[str]:
    return next(row.pretrain for row in pocus.ROWS if row.name == method)


def sized(corpus: str, size: int) -> str:
    """The name of ``corpus``'s runs at ``size`` px: ``blues``, or ``blues@112`` off the study's size."""
    return corpus if size == SIZE else f"{corpus}@{size}"


def pretrain(root: Path, stores: dict[str, Path], method: str, corpus: str, size: int = SIZE) -> Path:
    """The encoder of ``method`` pretrained on ``corpus`` at the POCUS study's budget, at ``size`` px (resumed if
    interrupted)."""
    run = root / "pretrain" / sized(corpus, size) / method
    if not (run / "finished").exists():
        resume = ["--resume"] if (run / "checkpoints" / "last.pt").exists() else []
        pocus.sonocl(
            "pretrain", "--store", str(stores[corpus]), "--out", str(run), "--no-progress", "--checkpoint-every-steps", "100",
            *pretrain_args(method), "--size", str(size), *resume, log=root / "logs" / f"pretrain-{sized(corpus, size)}-{method}.log",
        )  # fmt: skip
        (run / "finished").write_text("")
    return run


def evaluate(
    root: Path, stores: dict[str, Path], task: Task, protocol: str, method: str, corpus: str, size: int = SIZE
) -> None:
    """``method`` pretrained on ``corpus`` (``none``: random init) on ``task`` with ``protocol`` at ``size`` px;
    skipped when done."""
    out = root / "eval" / slug(task.name) / protocol / f"{sized(corpus, size)}-{method}"
    if (out / "results.md").exists():
        return
    init = "random" if corpus == "none" else str(root / "pretrain" / sized(corpus, size) / method)
    pocus.sonocl(
        "evaluate", "--init", init, "--name", method, "--store", str(stores[task.corpus]), *COMMON, *task.options,
        "--size", str(size), *pocus.PROTOCOLS[protocol], "--seeds", str(LAST_BLOCK_SEEDS if protocol == "last-block" else 1),
        "--out", str(out),
        log=root / "logs" / f"eval-{slug(task.name)}.log",
    )  # fmt: skip


def best_rows(root: Path, task: Task, count: int = 1, other_corpus: bool = False) -> list[tuple[str, str]]:
    """The (method, corpus) of the task's ``count`` best single-corpus rows at the study's size (``other_corpus``:
    of those pretrained on the other corpus only), by mean linear-probe accuracy. They are chosen on test folds, so
    their numbers at `RESOLUTION` or with last-block answer "does it help the best rows", not "which row is best"."""
    scores: dict[tuple[str, str], list[float]] = {}
    for r in collect(root):
        if r["task"] == task.name and r["protocol"] == "linear" and r["pretrained_on"] in CORPORA and r["size"] == SIZE:
            if not (other_corpus and r["pretrained_on"] == task.corpus):
                scores.setdefault((r["method"], r["pretrained_on"]), []).append(r["accuracy"])
    return sorted(scores, key=lambda key: -sum(scores[key]) / len(scores[key]))[:count]


def evaluate_per_fold(root: Path, stores: dict[str, Path], task: Task, protocol: str, method: str, source: str) -> None:
    """``method`` pretrained per fold (`sonocl study`): on the evaluated corpus without the fold's test videos, and
    with ``source`` ``both`` on the other corpus whole as well (``--also-store``); ``fold``: the evaluated corpus
    alone, the single-source row that multi-source is compared with. The fold runs are shared by a task's protocols."""
    out = root / "eval" / slug(task.name) / protocol / f"{source}-{method}"
    if (out / "results.md").exists():
        return
    also = ["--also-store", str(stores[task.other_corpus])] if source == "both" else []
    pocus.sonocl(
        "study", "--store", str(stores[task.corpus]), *also,
        "--pretrain", " ".join(pretrain_args(method)), "--runs", str(root / "pretrain" / f"{source}-{slug(task.name)}" / method),
        "--name", method, *COMMON, *task.options, "--protocol", protocol, "--seeds", "1", "--out", str(out),
        log=root / "logs" / f"{source}-{slug(task.name)}-{method}.log",
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------- tables


def collect(root: Path) -> list[dict]:
    """One record per task × protocol × encoder × fold from every results.json under ``root/eval``."""
    records = []
    for task in TASKS:
        for protocol in (*PROTOCOLS, "last-block"):
            for path in sorted((root / "eval" / slug(task.name) / protocol).glob("*/results.json")):
                runs_name, method = path.parent.name.split("-", 1)
                corpus, _, size = runs_name.partition("@")
                results = json.loads(path.read_text(encoding="utf-8"))
                entry = results["inits"][0]
                overlap = entry.get("pretraining_overlap") or {}
                runs = root / "pretrain" / (f"{corpus}-{slug(task.name)}" if corpus in PER_FOLD else runs_name) / method
                seconds = _pretrain_seconds(runs)
                for run in entry["runs"]:
                    video = run[task.unit]
                    records.append(
                        {
                            "task": task.name,
                            "protocol": protocol,
                            "method": "random" if corpus == "none" else method,
                            "pretrained_on": corpus,
                            "size": int(size or SIZE),
                            "seen": overlap.get("seen", 0),
                            "test_videos": overlap.get("test_videos", results["num_videos"]),
                            "unit": task.unit,
                            "seed": run["seed"],
                            "fold": run["fold"],
                            "test_digest": pocus.test_digest(run),
                            "accuracy": video["accuracy"],
                            "balanced_accuracy": video["balanced_accuracy"],
                            "macro_f1": video["macro_f1"],
                            "auc": video.get("macro_auc"),
                            "seconds": run["seconds"],
                            "pretrain_seconds": seconds,
                        }
                    )
    return records


def _pretrain_seconds(run: Path) -> float | None:
    """The run's pretraining wall time; summed over the fold runs of a per-fold (`PER_FOLD`) row."""
    metrics = sorted(run.glob("metrics.csv")) or sorted(run.glob("seed*_fold*/metrics.csv"))
    return sum(pocus._last_seconds(path) for path in metrics) if metrics else None


def _cell(values: list[float]) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "–"
    mean, std = pocus._mean_std(values)
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def _pretraining(record: dict, corpus: str) -> str:
    if record["pretrained_on"] == "none":
        return "none"
    seen = f"{record['seen']} of {record['test_videos']} test videos seen"
    if record["pretrained_on"] == "both":
        return f"both corpora, per fold: {seen}"
    if record["pretrained_on"] == "fold":
        return f"{NAMES[corpus]} (same dataset), per fold: {seen}"
    where = NAMES[record["pretrained_on"]]
    kind = "same dataset" if record["pretrained_on"] == corpus else "other dataset"
    return f"{where} ({kind}): {seen}"


def tables(records: list[dict]) -> str:
    """One table per task and protocol: each encoder against random init, paired by fold."""
    lines = []
    for task in TASKS:
        for protocol in (*PROTOCOLS, "last-block"):
            chosen = [r for r in records if r["task"] == task.name and r["protocol"] == protocol]
            if not chosen:
                continue
            unit = task.unit
            lines += [
                f"### {task.name}, {protocol}",
                "",
                f"| method | pretrained on | folds | {unit} acc | {unit} bal. acc | {unit} macro-F1 | {unit} AUC | "
                f"Δ {unit} acc vs random (paired, ± SE) | pretrain wall |",
                "|---|---|---|---|---|---|---|---|---|",
            ]
            encoders = sorted(
                {(r["method"], r["pretrained_on"], r["size"]) for r in chosen},
                key=lambda e: (e[2], ("none", *CORPORA, *PER_FOLD).index(e[1]), _order(e[0])),
            )
            for method, corpus, size in encoders:
                mine = [r for r in chosen if (r["method"], r["pretrained_on"], r["size"]) == (method, corpus, size)]
                baseline = _by_fold(chosen, "random", "none", size)
                seconds = mine[0]["pretrain_seconds"]
                cells = [
                    method if size == SIZE else f"{method} @ {size} px",
                    _pretraining(mine[0], task.corpus),
                    str(len(mine)),
                    *(_cell([r[key] for r in mine]) for key in ("accuracy", "balanced_accuracy", "macro_f1", "auc")),
                    "–" if corpus == "none" else _paired_delta(mine, baseline),
                    "–" if seconds is None else f"{seconds / 60:.1f} min",
                ]
                lines.append("| " + " | ".join(cells) + " |")
            lines += [*_multi_source(chosen, task), ""]
        if task.name in REFERENCE_POINTS and any(r["task"] == task.name for r in records):
            lines += [REFERENCE_POINTS[task.name], ""]
    return "\n".join(lines)


def _multi_source(chosen: list[dict], task: Task) -> list[str]:
    """Each multi-source row against the same method's single sources at the study's size, paired by fold: the
    other corpus (pretrained once) and the evaluated corpus per fold (the issue's target: ≥ the better of them)."""
    other = task.other_corpus
    lines = []
    for method in sorted({r["method"] for r in chosen if r["pretrained_on"] == "both" and r["size"] == SIZE}):
        both = [r for r in chosen if (r["method"], r["pretrained_on"], r["size"]) == (method, "both", SIZE)]
        comparisons = []
        for source, label in ((other, f"pretrained on {NAMES[other]}"), ("fold", f"on {NAMES[task.corpus]} per fold")):
            single = _by_fold(chosen, method, source, SIZE)
            if single:
                comparisons.append(f"{label} {_paired_delta(both, single)}")
        if comparisons:
            lines.append(f"Multi-source {method} against one source, paired by fold: {'; '.join(comparisons)}.")
    return lines


def _by_fold(
    chosen: list[dict], method: str, pretrained_on: str, size: int
) -> dict[tuple[int, int], tuple[float, str | None]]:
    """One row's (accuracy, test digest) by (seed, fold): what `_paired_delta` pairs against."""
    return {
        (r["seed"], r["fold"]): (r["accuracy"], r["test_digest"])
        for r in chosen
        if (r["method"], r["pretrained_on"], r["size"]) == (method, pretrained_on, size)
    }


def _paired_delta(mine: list[dict], random: dict[tuple[int, int], tuple[float, str | None]]) -> str:
    """`pocus_study._paired_delta` of this study's records (their accuracy is the task's unit's) against random init
    at the same size."""
    return pocus._paired_delta([{**r, "video_accuracy": r["accuracy"]} for r in mine], random)


def _order(method: str) -> int:
    return METHODS.index(method) if method in METHODS else -1


def merge(measured: list[dict], stored: list[dict]) -> list[dict]:
    """The study's records: those measured under ``--root``, and those of ``docs/study/transfer.json`` of rows it does
    not hold (rows run in an earlier session: the runs are not kept, the records are)."""
    row = ("task", "protocol", "method", "pretrained_on", "size")
    measured_rows = {tuple(r[key] for key in row) for r in measured}
    return [r for r in stored if tuple(r.get(key, SIZE) for key in row) not in measured_rows] + measured


def write_outputs(root: Path) -> None:
    study = REPO / "docs" / "study" / "transfer.json"
    stored = json.loads(study.read_text(encoding="utf-8")).get("records", []) if study.exists() else []
    records = merge(collect(root), stored)
    meta = pocus.study_meta("transfer_study.py")
    study.parent.mkdir(parents=True, exist_ok=True)
    study.write_text(json.dumps({**meta, "records": records}, indent=1) + "\n", encoding="utf-8")
    body = f"Updated {meta['updated']}; {len(records)} fold runs in `docs/study/transfer.json`.\n\n{tables(records)}"
    results = pocus.write_section("transfer-study", "transfer_study.py", body)
    print(f"wrote {study} ({len(records)} records) and the tables in {results}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=REPO / "runs" / "transfer-study")
    parser.add_argument("--only", nargs="+", choices=METHODS, help="methods to pretrain (default: all)")
    parser.add_argument("--corpora", nargs="+", choices=CORPORA, default=list(CORPORA), help="pretraining corpora")
    parser.add_argument(
        "--both",
        nargs="*",
        choices=METHODS,
        default=list(BOTH),
        help="methods also pretrained per fold, on both corpora and on the evaluated one, for the tasks in BOTH_TASKS "
        "(default: %(default)s)",
    )
    parser.add_argument("--tables-only", action="store_true", help="only collect the results and write the tables")
    args = parser.parse_args()
    root: Path = args.root
    if not args.tables_only:
        stores = {"pocus": pocus.ingest(REPO / "runs" / "pocus-study"), "blues": ingest_blues(root)}
        for task in TASKS:
            for protocol in PROTOCOLS:
                evaluate(root, stores, task, protocol, "random", "none")
        write_outputs(root)
        # The transfer first: every encoder on the other corpus's tasks; then the cheap rows (the same-dataset rows
        # beside them, transductive, and the resolution step); the long ones last (the papers' last-block protocol
        # for random init and the two best encoders on the other corpus's main task, and the per-fold multi-source
        # pretraining), so that a session's end leaves the most rows done.
        for corpus in args.corpora:
            for method in args.only or METHODS:
                pretrain(root, stores, method, corpus)
                for task in (t for t in TASKS if t.corpus != corpus):
                    for protocol in PROTOCOLS:
                        evaluate(root, stores, task, protocol, method, corpus)
                write_outputs(root)
        for corpus in args.corpora:
            for method in args.only or METHODS:
                pretrain(root, stores, method, corpus)
                for task in (t for t in TASKS if t.corpus == corpus):
                    for protocol in PROTOCOLS:
                        evaluate(root, stores, task, protocol, method, corpus)
                write_outputs(root)
        for task in (t for t in TASKS if t.name in BOTH_TASKS):  # the resolution step: random init and the best row
            for method, corpus in [("random", "none"), *best_rows(root, task, 1)]:
                if corpus != "none":
                    pretrain(root, stores, method, corpus, RESOLUTION)
                for protocol in PROTOCOLS:
                    evaluate(root, stores, task, protocol, method, corpus, RESOLUTION)
            write_outputs(root)
        for corpus in args.corpora:
            for task in (t for t in TASKS if t.name in BOTH_TASKS and t.corpus != corpus):
                for method, pretrained_on in [("random", "none"), *best_rows(root, task, 2, other_corpus=True)]:
                    evaluate(root, stores, task, "last-block", method, pretrained_on)
                write_outputs(root)
        for method in args.both:  # per fold: 5 pretraining runs per task and source, so the main tasks only
            for source in reversed(PER_FOLD):
                for task in (t for t in TASKS if t.name in BOTH_TASKS):
                    for protocol in PROTOCOLS:
                        evaluate_per_fold(root, stores, task, protocol, method, source)
                    write_outputs(root)
    write_outputs(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
