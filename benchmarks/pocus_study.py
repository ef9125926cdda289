"""The POCUS study: do these methods, run through sonocl, give a better ultrasound encoder? (``docs/results.md``)

Runs every row of the study with sonocl's own commands, each step resumable (a rerun skips what is done and
continues an interrupted pretraining run or evaluation at its last checkpoint or fold), then collects every fold
run into ``docs/study/pocus.json`` and writes the tables into ``docs/results.md`` between the study's markers,
and writes `sonocl report` of the best row to ``ROOT/report.html``.

    python benchmarks/pocus_study.py [--root runs/pocus-study] [--only ROW ...] [--tables-only]

Rows: random init; SimCLR, MoCo v2, BYOL, IVPP, USCL self-supervised and Meta-USCL pretrained once on every video
(transductive: stamped); USCL self-supervised, USCL semi-supervised and AWCL (fine findings / coarse diagnosis)
pretrained per fold (`sonocl study`). Every pretraining row of the main tables has the same budget in pairs
(``STEPS`` × ``BATCH``). Two ablations of the budget: USCL self-supervised at other step counts (the budget curve,
its own table), and USCL self-supervised with Meta-USCL's optimiser (SGD 0.1, exponential warm-up), which separates
what Meta-USCL's preset does from what its pair weighting does. Other backbones (the "backbones" table): random init,
DINO, video-DINO, MAE and USCL on a ViT-Tiny/8, random init and USCL on a ConvNeXt-Atto, DINO on the ResNet-18, each
paired against random init of its own backbone, and USCL on the ViT at 2,000 steps (its budget curve).
Protocols: kNN and linear probe for every row; last-block fine-tuning (the papers') over 3 seeds
(``--last-block-seeds``) for the rows in ``LAST_BLOCK``. Data: the convex videos of ``../shared/data/pocus``,
3 classes, folds grouped by patient.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATA = (REPO / ".." / "shared" / "data" / "pocus").resolve()
HC18 = (REPO / ".." / "shared" / "data" / "hc18").resolve()
SEGMENT = [
    *("--folds", "5", "--group-regex", r"^(\d+)", "--pixel-size", str(HC18 / "pixel_size_and_HC.csv")),
    *("--size", "128", "--epochs", "15", "--jobs", "2"),
]
"""HC18's protocol of docs/results.md (random init: Dice 0.960, HC error 3.03 mm)."""
CLASSES = "covid,pneumonia,regular"
STEPS, BATCH, SIZE = 500, 32, 64
FINDINGS = ("B-lines", "A-lines", "Consolidations", "Effusion", "Pleural line irregularities")
LABELS = {
    "COVID-19": "covid",
    "Bacterial pneumonia": "pneumonia",
    "regular": "regular",
    "Regular": "regular",
    "Viral pneumonia": "viral",
}
EVALUATION = ["--recipe", "meta-uscl", "--size", str(SIZE), "--folds", "5", "--classes", CLASSES]
PROTOCOLS = {
    "knn": ["--protocol", "knn"],
    "linear": ["--protocol", "linear"],
    "last-block": ["--protocol", "last-block", "--test-every-epoch", "--jobs", "2"],
}
LAST_BLOCK = ("random", "simclr", "uscl-ssl", "meta-uscl", "ivpp")
"""The last-block rows: the issue's four and the best other row by kNN (IVPP)."""
LAST_BLOCK_SEEDS = 3
ORDERINGS = (
    ("uscl-ssl", "simclr", "USCL ≥ SimCLR (USCL paper)"),
    ("uscl-ssl", "ivpp", "USCL's mixed frames against plain temporal-window pairs"),
    ("meta-uscl", "uscl-ssl", "Meta-USCL ≥ USCL (Meta-USCL paper)"),
    ("awcl-fine (per fold)", "awcl-coarse (per fold)", "AWCL fine ≥ coarse (AWCL paper)"),
    ("uscl-ssl (per fold)", "uscl-ssl", "per-fold USCL against the transductive run"),
    ("uscl-semi (per fold)", "uscl-ssl (per fold)", "USCL's semi-supervised term, both pretrained per fold"),
    ("uscl-ssl (meta-uscl's optimiser)", "uscl-ssl", "USCL with Meta-USCL's optimiser against its own"),
    ("meta-uscl", "uscl-ssl (meta-uscl's optimiser)", "Meta-USCL against USCL with the same optimiser"),
)
"""(row, against, claim): the comparisons the papers make, and the study's own checks, paired by seed and fold."""
CURVE_STEPS = (250, 1000, 2000)
"""The budget curve: USCL self-supervised at these step counts besides ``STEPS``."""
META_OPTIMISER = [
    *("--set", "optim.name=sgd", "--set", "optim.lr=0.1", "--set", "optim.momentum=0.9"),
    *("--set", "schedule.warmup=exponential", "--set", "schedule.cosine_span=after_warmup"),
]
"""Meta-USCL's preset optimiser and schedule (`sonocl pretrain --method meta-uscl --print-config`)."""


ISSUE_22 = "issue 22"
"""The presets of issue 22 (2026-12-03): MoCo v2 with Shuffle-BN and its one-query loss, BYOL's two pipelines, IVPP's
reference configuration, AWCL's gamma per sample."""


RESNET = "resnet18"
VIT = "timm:vit_tiny_patch16_224(patch_size=8)"
CONVNEXT = "timm:convnext_atto"
BACKBONES = {RESNET: "ResNet-18", VIT: "ViT-Tiny/8", CONVNEXT: "ConvNeXt-Atto"}
"""The study's backbones and their short names in row names and tables (issue 25: a ViT-Tiny with patch 8, which
gives an 8 × 8 token grid at 64 px, and the smallest ConvNeXt; 5.5 M and 3.4 M parameters against ResNet-18's 11 M)."""


def budget(steps: int = STEPS) -> list[str]:
    return ["--steps", str(steps), "--batch-size", str(BATCH), "--size", str(SIZE)]


BUDGET = budget()


@dataclass
class Row:
    name: str
    pretrain: list[str] | None
    """`sonocl pretrain` options (None: random init)."""
    per_fold: bool = False
    protocols: tuple[str, ...] = ("knn", "linear")
    note: str = ""
    evaluate: list[str] = field(default_factory=list)
    """Extra `sonocl evaluate` options of this row."""
    steps: int = STEPS
    """Pretraining steps (``pretrain`` holds them too); rows off ``STEPS`` go to the budget-curve table only."""
    backbone: str = "resnet18"
    """The encoder's backbone (`--backbone` of pretrain, and of evaluate for random init); rows off ResNet-18 go to
    the backbones table, paired against random init of their own backbone (``baseline``)."""
    preset: str = ""
    """Which version of the method's preset the row trains ("" for the first): records of an earlier version are
    kept as a retired row (``retired_name``), shown beside the new ones in the before/after table."""

    @property
    def baseline(self) -> str:
        """The random-init row this row's differences are paired against: the one of its backbone."""
        return "random" if self.backbone == RESNET else f"random ({BACKBONES[self.backbone]})"

    @property
    def slug(self) -> str:
        """The row's directory name: ``uscl-semi (per fold)`` → ``uscl-semi-per-fold``; ``moco`` of preset
        ``issue 22`` → ``moco-issue-22`` (a new preset never resumes or reuses an older preset's runs)."""
        return re.sub(r"[^a-z0-9]+", "-", f"{self.name} {self.preset}".lower()).strip("-")


def retired_name(name: str, preset: str) -> str:
    """The row name that records of an earlier preset of row ``name`` keep in the study's JSON and tables."""
    return f"{name} ({preset or 'first'} preset)"


ROWS = [
    Row("random", None, note="no pretraining"),
    Row("uscl-ssl", ["--method", "uscl", "--label-rate", "0", *BUDGET], note="USCL without its supervised term"),
    Row("meta-uscl", ["--method", "meta-uscl", *BUDGET]),
    Row("simclr", ["--method", "simclr", *BUDGET]),
    Row(
        "moco",
        ["--method", "moco", "--queue-size", "1024", *BUDGET],
        note="queue 1,024 keys (≈ 6 % of the frames); Shuffle-BN, one query view per pair",
        preset=ISSUE_22,
    ),
    Row("byol", ["--method", "byol", *BUDGET], note="the paper's two augmentation pipelines", preset=ISSUE_22),
    Row("ivpp", ["--method", "ivpp", *BUDGET], note="the reference's ncus_simclr", preset=ISSUE_22),
    Row(
        "ivpp (vicreg)",
        ["--method", "ivpp", "--objective", "vicreg", *BUDGET],
        note="the reference's default, ncus_vicreg",
        preset=ISSUE_22,
    ),
    Row("uscl-ssl (per fold)", ["--method", "uscl", "--label-rate", "0", *BUDGET], per_fold=True),
    Row(
        "uscl-semi (label leak)",
        ["--method", "uscl", *BUDGET],
        evaluate=["--allow-label-leak"],
        note="λ 0.2 on every video's label, test folds included: the leak the guard refuses (issue 10's table)",
    ),
    Row(
        "uscl-semi (per fold)",
        ["--method", "uscl", *BUDGET],
        per_fold=True,
        note="λ 0.2, every training video labelled",
    ),
    Row(
        "awcl-fine (per fold)",
        ["--method", "awcl", "--channels", "1", "--anatomy-column", "findings", *BUDGET],
        per_fold=True,
        note="fine anatomy = the video's findings pattern",
        preset=ISSUE_22,
    ),
    Row(
        "awcl-coarse (per fold)",
        ["--method", "awcl", "--channels", "1", "--anatomy-level", "coarse", "--coarse-column", "label", *BUDGET],
        per_fold=True,
        note="coarse anatomy = diagnosis",
        preset=ISSUE_22,
    ),
]
ROWS += [
    Row(
        "uscl-ssl (meta-uscl's optimiser)",
        ["--method", "uscl", "--label-rate", "0", *META_OPTIMISER, *BUDGET],
        note="USCL self-supervised with SGD 0.1, momentum 0.9, exponential warm-up: Meta-USCL's preset optimiser",
    ),
    *(
        Row(
            f"uscl-ssl @ {steps:,} steps",
            ["--method", "uscl", "--label-rate", "0", *budget(steps)],
            steps=steps,
            note="budget curve",
        )
        for steps in CURVE_STEPS
    ),
]
ROWS.append(Row("dino (ResNet-18)", ["--method", "dino", *BUDGET], note="DINO's preset on the ResNet-18"))
VIT_CURVE_STEPS = (2000,)
"""The ViT's budget curve: USCL self-supervised on the ViT-Tiny/8 at these step counts besides ``STEPS``."""
for backbone in (VIT, CONVNEXT):
    short = BACKBONES[backbone]
    ROWS.append(
        Row(f"random ({short})", None, backbone=backbone, note="no pretraining", evaluate=["--backbone", backbone])
    )
    methods = (
        [("dino", []), ("video-dino", ["--views", "video"]), ("mae", []), ("uscl-ssl", ["--label-rate", "0"])]
        if backbone == VIT
        else [("uscl-ssl", ["--label-rate", "0"])]
    )
    for name, options in methods:
        method = "dino" if name == "video-dino" else name.removesuffix("-ssl")
        ROWS.append(
            Row(
                f"{name} ({short})",
                ["--method", method, *options, "--backbone", backbone, *BUDGET],
                backbone=backbone,
                note=f"{short}, the method's preset",
            )
        )
ROWS += [
    Row(
        f"uscl-ssl (ViT-Tiny/8) @ {steps:,} steps",
        ["--method", "uscl", "--label-rate", "0", "--backbone", VIT, *budget(steps)],
        backbone=VIT,
        steps=steps,
        note="the ViT's budget curve",
    )
    for steps in VIT_CURVE_STEPS
]
for row in ROWS:
    if row.name in LAST_BLOCK:
        row.protocols = (*row.protocols, "last-block")


def sonocl(*args: str, log: Path) -> None:
    """Run one sonocl command, its output appended to ``log``; a failure stops the study with the log's tail."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"$ sonocl {' '.join(args)}", flush=True)
    with open(log, "a", encoding="utf-8") as handle:
        handle.write(f"\n$ sonocl {' '.join(args)}\n")
        handle.flush()
        code = subprocess.call(
            [sys.executable, "-m", "sonocl", *args], stdout=handle, stderr=subprocess.STDOUT, cwd=REPO
        )
    if code:
        tail = log.read_text(encoding="utf-8").splitlines()[-15:]
        raise SystemExit(f"sonocl {args[0]} failed ({code}); {log}:\n" + "\n".join(tail))


def labels_csv(path: Path) -> None:
    """One row per convex video of dataset_metadata.csv: label, patient group (source + patient id), findings."""
    rows = list(csv.DictReader(open(DATA / "dataset_metadata.csv", encoding="utf-8", errors="replace")))
    seen: set[str] = set()
    out = []
    for r in rows:
        if r["Probe"].strip().lower() != "convex" or r["Type"].strip() != "video" or r["Filename"] in seen:
            continue
        seen.add(r["Filename"])
        patient = r["Patient ID / Name"].strip()
        findings = [name for name in FINDINGS if r[name].strip() == "1"]
        known = all(r[name].strip() in ("0", "1") for name in FINDINGS)
        out.append(
            {
                "file": r["Filename"],
                "label": LABELS.get(r["Label"].strip(), r["Label"].strip()),
                "patient": f"{r['Current location'].strip()}/{patient}" if patient else r["Filename"],
                "findings": ("+".join(findings) or "none") if known else "",
            }
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["file", "label", "patient", "findings"])
        writer.writeheader()
        writer.writerows(out)


def ingest(root: Path) -> Path:
    """The study's store, ``root/store``: the convex videos at 128 px with label, patient group and findings
    (incremental: a rerun adds only what is missing)."""
    store = root / "store"
    if not (root / "store.done").exists():
        labels_csv(root / "labels.csv")
        sonocl(
            "ingest", str(DATA / "pocus_videos" / "convex"), "--out", str(store), "--size", "128",
            "--labels", str(root / "labels.csv"), "--id-column", "file", "--label-column", "label",
            "--group-column", "patient", "--extra-columns", "findings", log=root / "logs" / "ingest.log",
        )  # fmt: skip
        (root / "store.done").write_text("")
    return store


def _seeds_done(out: Path) -> int:
    """How many fold splits (seeds) the evaluation in ``out`` has finished: 0 when it has not."""
    if not (out / "results.md").exists():
        return 0
    runs = json.loads((out / "results.json").read_text(encoding="utf-8"))["inits"][0]["runs"]
    return len({run["seed"] for run in runs})


def run_row(row: Row, root: Path, store: Path, protocols: tuple[str, ...], seeds: int = LAST_BLOCK_SEEDS) -> None:
    """Pretrain (once, or per fold inside `sonocl study`) and evaluate the row with those of ``protocols`` it has;
    last-block over ``seeds`` fold splits (a rerun with more reads the finished ones back and adds the rest)."""
    slug = row.slug
    log = root / "logs" / f"{slug}.log"
    if row.pretrain is not None and not row.per_fold:
        run = root / "pretrain" / slug
        if not (run / "finished").exists():
            resume = ["--resume"] if (run / "checkpoints" / "last.pt").exists() else []
            sonocl(
                "pretrain", "--store", str(store), "--out", str(run), "--no-progress", *row.pretrain, *resume, log=log
            )
            (run / "finished").write_text("")  # the wall time is metrics.csv's, resumed parts included
    for protocol in (p for p in row.protocols if p in protocols):
        out = root / "eval" / protocol / slug
        wanted = seeds if protocol == "last-block" else 1
        if _seeds_done(out) >= wanted:
            continue
        common = ["--store", str(store), *EVALUATION, *PROTOCOLS[protocol], "--seeds", str(wanted)]
        common += [*row.evaluate, "--out", str(out)]
        if row.per_fold:
            sonocl(
                "study",
                "--pretrain",
                " ".join(row.pretrain),
                "--runs",
                str(root / "pretrain" / slug),
                "--name",
                row.name,
                *common,
                log=log,
            )
        else:
            init = "random" if row.pretrain is None else str(root / "pretrain" / slug)
            sonocl("evaluate", "--init", init, "--name", row.name, *common, log=log)


# ------------------------------------------------------------------------------------------------- tables


def collect(root: Path) -> list[dict]:
    """One record per row × protocol × seed × fold from every results.json under ``root``."""
    records = []
    for row in ROWS:
        slug = row.slug
        seconds, runs = _pretrain_seconds(root, row)
        for protocol in row.protocols:
            path = root / "eval" / protocol / slug / "results.json"
            if not path.exists():
                continue
            results = json.loads(path.read_text())
            for entry in results["inits"]:
                budget = _budget(row)
                for run in entry["runs"]:
                    by_epoch = run.get("test_accuracy_by_epoch") or []
                    records.append(
                        {
                            "row": row.name,
                            "preset": row.preset,
                            "backbone": row.backbone,
                            "init": "random" if row.pretrain is None else "pretrained",
                            "method": None if row.pretrain is None else row.pretrain[1],
                            "protocol": protocol,
                            "budget_pairs": budget,
                            "pretraining": _pretraining(row, entry),
                            "selection": results["config"]["selection"],
                            "seed": run["seed"],
                            "fold": run["fold"],
                            "video_accuracy": run["video"]["accuracy"],
                            "frame_accuracy": run["frame"]["accuracy"],
                            "video_balanced_accuracy": run["video"]["balanced_accuracy"],
                            "video_macro_f1": run["video"]["macro_f1"],
                            "video_auc": run["video"].get("macro_auc"),
                            "max_test_frame_accuracy": max(by_epoch) if by_epoch else None,
                            "test_frames": run["test_frames"],
                            "test_digest": test_digest(run),
                            "input": entry.get("input"),
                            "seconds": run["seconds"],
                            "pretrain_seconds": seconds,
                            "pretrain_runs": runs,
                        }
                    )
    return records


def merge(measured: list[dict], stored: list[dict]) -> list[dict]:
    """The study's records: those measured under ``--root``, and those of ``docs/study/pocus.json`` that it does not
    hold (rows run on another machine or in an earlier session: the runs are not committed, the records are). Records
    of an earlier preset of a row keep a retired name (``retired_name``) and never mix with the new preset's."""
    presets = {row.name: row.preset for row in ROWS}
    measured_rows = {(r["row"], r["protocol"]) for r in measured}
    kept = []
    for record in stored:
        record = dict(record)
        name, preset = record["row"], record.get("preset", "")
        if name in presets and preset != presets[name]:
            record.update(row=retired_name(name, preset), retired_from=name)
        if (record["row"], record["protocol"]) not in measured_rows:
            kept.append(record)
    return kept + measured


def _budget(row: Row) -> int | None:
    return None if row.pretrain is None else row.steps * BATCH


def _pretraining(row: Row, entry: dict) -> str:
    if row.pretrain is None:
        return "none"
    return entry.get("pretraining_overlap", {}).get("note") or ("per fold" if row.per_fold else "transductive")


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1))


def tables(records: list[dict]) -> str:
    """The markdown of the study: one table per protocol, paired differences against random init."""
    lines = []
    for protocol in PROTOCOLS:
        chosen = [
            r
            for r in records
            if r["protocol"] == protocol
            and r["budget_pairs"] in (None, STEPS * BATCH)
            and r.get("backbone", RESNET) == RESNET
        ]
        if not chosen:
            continue
        retired = {r["retired_from"]: r["row"] for r in chosen if r.get("retired_from")}
        names = [name for row in ROWS for name in (retired.get(row.name), row.name) if name]
        names = [name for name in names if any(r["row"] == name for r in chosen)]
        baseline = _by_fold(chosen, "random")
        lines += [
            f"### {protocol}",
            "",
            "| row | pretraining | budget (pairs) | runs | video acc | frame acc | video bal. acc | video macro-F1 | "
            "video AUC | Δ video acc vs random (paired, ± SE) | pretrain wall |"
            + (" max-test frame acc, pooled (the papers' number: optimistic) |" if protocol == "last-block" else ""),
            "|" + "---|" * (11 + (protocol == "last-block")),
        ]
        for name in names:
            mine = [r for r in chosen if r["row"] == name]
            cells = []
            for key in ("video_accuracy", "frame_accuracy", "video_balanced_accuracy", "video_macro_f1", "video_auc"):
                values = [r[key] for r in mine if r[key] is not None]
                mean, std = _mean_std(values) if values else (math.nan, math.nan)
                cells.append(f"{100 * mean:.1f} ± {100 * std:.1f}" if values else "–")
            delta = _paired_delta(mine, baseline) if name != "random" else "–"
            wall = _wall(mine)
            cell = [
                name,
                mine[0]["pretraining"],
                f"{mine[0]['budget_pairs']:,}" if mine[0]["budget_pairs"] else "–",
                str(len(mine)),
                *cells,
                delta,
                wall,
            ]
            if protocol == "last-block":
                cell.append(_pooled_max_test(mine))
            lines.append("| " + " | ".join(cell) + " |")
        lines.append("")
    text = "\n".join(
        lines
        + _backbones_table(records)
        + _before_after_table(records)
        + _orderings_table(records)
        + _curve_table(records)
        + _curve_table(records, VIT)
    )
    if UNPAIRED in text:
        text += (
            f"\n{UNPAIRED} Not known to be paired: the two rows' fold runs are not shown to have tested the same videos "
            "(records made before each fold's test videos were kept, or two ingests of the store, which gave different "
            "folds until the folds were ordered by content). Read such a difference as two unpaired means.\n"
        )
    return text


def _method_key(name: str) -> str:
    """A row's name without its backbone: ``dino (ViT-Tiny/8)`` → ``dino``, the key that pairs it with the
    ResNet-18 row of the same method (``dino (ResNet-18)``, ``uscl-ssl``)."""
    for short in BACKBONES.values():
        if name.endswith(f" ({short})"):
            return name.removesuffix(f" ({short})")
    return name


def _backbones_table(records: list[dict]) -> list[str]:
    """The rows of every backbone at the main budget: kNN and linear probe, each paired against random init of its
    own backbone, and the linear probe against the ResNet-18 row of the same method (the cost of the backbone)."""
    rows = [row for row in ROWS if row.steps == STEPS and not row.per_fold and "--allow-label-leak" not in row.evaluate]
    by_key: dict[str, dict[str, Row]] = {}
    for row in rows:
        by_key.setdefault(_method_key(row.name), {})[row.backbone] = row
    keys = [key for key, found in by_key.items() if any(row.backbone != RESNET for row in found.values())]
    if not any(r.get("backbone", RESNET) != RESNET for r in records):
        return []
    lines = [
        "### backbones (transductive, the main budget; each Δ paired by fold)",
        "",
        "| backbone | row | kNN video acc | Δ kNN vs random of its backbone | linear video acc "
        "| Δ linear vs random of its backbone | Δ linear vs the ResNet-18 row of the same method | pretrain wall |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for backbone, short in BACKBONES.items():
        for key in keys:
            row = by_key[key].get(backbone)
            if row is None or not any(r["row"] == row.name for r in records):
                continue
            cells = [short, row.name]
            for protocol in ("knn", "linear"):
                chosen = [r for r in records if r["protocol"] == protocol]
                mine = [r for r in chosen if r["row"] == row.name]
                if not mine:
                    cells += ["–", "–"]
                    continue
                mean, std = _mean_std([r["video_accuracy"] for r in mine])
                own = "–" if row.pretrain is None else _paired_delta(mine, _by_fold(chosen, row.baseline))
                cells += [f"{100 * mean:.1f} ± {100 * std:.1f}", own]
            resnet = by_key[key].get(RESNET)
            linear = [r for r in records if r["protocol"] == "linear"]
            mine = [r for r in linear if r["row"] == row.name]
            cells.append(
                _paired_delta(mine, _by_fold(linear, resnet.name)) if resnet and resnet is not row and mine else "–"
            )
            lines.append("| " + " | ".join([*cells, _wall([r for r in records if r["row"] == row.name])]) + " |")
    return [*lines, ""]


def _pooled_max_test(records: list[dict]) -> str:
    """The papers' POCUS number: each fold run's best test epoch, its frames pooled over the runs (USCL's summed
    confusion matrices), in %; "–" without per-epoch test accuracies."""
    chosen = [r for r in records if r["max_test_frame_accuracy"] is not None]
    if not chosen:
        return "–"
    correct = sum(r["max_test_frame_accuracy"] * r["test_frames"] for r in chosen)
    return f"{100 * correct / sum(r['test_frames'] for r in chosen):.1f}"


def _before_after_table(records: list[dict]) -> list[str]:
    """Each row whose preset changed: its earlier preset's records against the new ones, paired by (seed, fold)."""
    retired = {r["retired_from"]: r["row"] for r in records if r.get("retired_from")}
    protocols = [p for p in PROTOCOLS if any(r["protocol"] == p for r in records)]
    lines = []
    for row in ROWS:
        if row.name not in retired:
            continue
        for protocol in protocols:
            chosen = [r for r in records if r["protocol"] == protocol]
            before = [r for r in chosen if r["row"] == retired[row.name]]
            after = [r for r in chosen if r["row"] == row.name]
            if not before or not after:
                continue
            cells = []
            for mine in (before, after):
                mean, std = _mean_std([r["video_accuracy"] for r in mine])
                cells.append(f"{100 * mean:.1f} ± {100 * std:.1f} ({len(mine)})")
            delta = _paired_delta(after, _by_fold(chosen, retired[row.name]))
            lines.append(
                f"| {row.name} | {protocol} | {cells[0]} | {cells[1]} | {delta} | {_wall(before)} | {_wall(after)} |"
            )
    if not lines:
        return []
    return [
        "### before and after the presets changed, paired by fold",
        "",
        "| row | protocol | video acc before (runs) | video acc after (runs) | after − before (paired, ± SE) "
        "| pretrain wall before | after |",
        "|---|---|---|---|---|---|---|",
        *lines,
        "",
    ]


def _orderings_table(records: list[dict]) -> list[str]:
    """Each of ``ORDERINGS`` whose two rows are measured: row − against, paired by (seed, fold), per protocol; an
    ordering with a row whose preset changed is shown again with the earlier preset's records."""
    protocols = [p for p in PROTOCOLS if any(r["protocol"] == p for r in records)]
    retired = {r["retired_from"]: r["row"] for r in records if r.get("retired_from")}
    orderings = []
    for row, against, claim in ORDERINGS:
        orderings.append((row, against, claim))
        if row in retired or against in retired:
            orderings.append((retired.get(row, row), retired.get(against, against), f"{claim}, earlier presets"))
    lines = []
    for row, against, claim in orderings:
        cells = []
        for protocol in protocols:
            chosen = [r for r in records if r["protocol"] == protocol]
            baseline = _by_fold(chosen, against)
            mine = [r for r in chosen if r["row"] == row]
            cells.append(_paired_delta(mine, baseline) if mine and baseline else "–")
        if any(cell != "–" for cell in cells):
            lines.append(f"| {claim} | {row} − {against} | " + " | ".join(cells) + " |")
    if not lines:
        return []
    head = "| claim | difference | " + " | ".join(f"Δ {p} video acc (paired, ± SE)" for p in protocols) + " |"
    return [
        "### the papers' orderings and the ablations, paired by fold",
        "",
        head,
        "|" + "---|" * (2 + len(protocols)),
        *lines,
        "",
    ]


def _by_fold(records: list[dict], row: str) -> dict[tuple[int, int], tuple[float, str | None]]:
    """The row's video accuracy and test-video digest by (seed, fold): the baseline that `_paired_delta` pairs with."""
    return {(r["seed"], r["fold"]): (r["video_accuracy"], r.get("test_digest")) for r in records if r["row"] == row}


UNPAIRED = "†"
"""Marks a difference whose two rows' folds are not known to hold the same test videos (`test_digest`)."""


def _paired_delta(mine: list[dict], baseline: dict[tuple[int, int], tuple[float, str | None]]) -> str:
    """Mean video-accuracy difference against a baseline row, paired by (seed, fold), ± its standard error; marked
    `UNPAIRED` unless every pair's two fold runs tested the same videos (records made before the digest was kept
    cannot show it, and two ingests of one store gave different folds before the folds were ordered by content)."""
    matched = [(r, baseline[(r["seed"], r["fold"])]) for r in mine if (r["seed"], r["fold"]) in baseline]
    if len(matched) < 2:
        return "–"
    mean, std = _mean_std([r["video_accuracy"] - accuracy for r, (accuracy, _) in matched])
    se = std / math.sqrt(len(matched))
    verdict = "inside the noise" if abs(mean) <= 2 * se else ("better" if mean > 0 else "worse")
    same = all(r.get("test_digest") is not None and r.get("test_digest") == digest for r, (_, digest) in matched)
    return f"{100 * mean:+.1f} ± {100 * se:.1f} ({verdict}){'' if same else ' ' + UNPAIRED}"


def test_digest(run: dict) -> str:
    """A fold run's test videos as a short digest of their sorted ids (names are stable across ingests)."""
    return hashlib.sha256("\n".join(sorted(run["test_video_ids"])).encode()).hexdigest()[:12]


def _curve_table(records: list[dict], backbone: str = RESNET) -> list[str]:
    """USCL self-supervised on ``backbone`` over its budgets (kNN and linear probe), random init as step 0."""
    main = "uscl-ssl" if backbone == RESNET else f"uscl-ssl ({BACKBONES[backbone]})"
    random = "random" if backbone == RESNET else f"random ({BACKBONES[backbone]})"
    curve = [row for row in ROWS if row.name in (random, main) or row.name.startswith(f"{main} @")]
    curve.sort(key=lambda row: 0 if row.pretrain is None else row.steps)
    measured = [row for row in curve if any(r["row"] == row.name for r in records)]
    if len(measured) < 3:
        return []
    lines = [
        f"### budget curve (USCL self-supervised on the {BACKBONES[backbone]}, transductive)",
        "",
        "| steps | pairs | kNN video acc | Δ kNN vs random (paired, ± SE) | linear video acc "
        "| Δ linear vs random (paired, ± SE) | pretrain wall |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in measured:
        cells = [str(0 if row.pretrain is None else row.steps), f"{0 if row.pretrain is None else row.steps * BATCH:,}"]
        for protocol in ("knn", "linear"):
            chosen = [r for r in records if r["protocol"] == protocol]
            baseline = _by_fold(chosen, random)
            mine = [r for r in chosen if r["row"] == row.name]
            if not mine:
                cells += ["–", "–"]
                continue
            mean, std = _mean_std([r["video_accuracy"] for r in mine])
            cells += [
                f"{100 * mean:.1f} ± {100 * std:.1f}",
                "–" if row.pretrain is None else _paired_delta(mine, baseline),
            ]
        lines.append("| " + " | ".join([*cells, _wall([r for r in records if r["row"] == row.name])]) + " |")
    return [*lines, ""]


def _pretrain_seconds(root: Path, row: Row) -> tuple[float | None, int]:
    """The row's pretraining wall time in seconds, summed over its runs (one, or one per fold), and the run count."""
    if row.pretrain is None:
        return None, 0
    pattern = "seed*_fold*/metrics.csv" if row.per_fold else "metrics.csv"
    runs = sorted((root / "pretrain" / row.slug).glob(pattern))
    return (sum(_last_seconds(p) for p in runs) if runs else None), len(runs)


def _wall(records: list[dict]) -> str:
    """The pretraining wall time the row's records carry: "7.0 min", or "25 min (5 runs)" for a per-fold row."""
    seconds = next((r["pretrain_seconds"] for r in records if r.get("pretrain_seconds")), None)
    if seconds is None:
        return "–"
    runs = next(r["pretrain_runs"] for r in records if r.get("pretrain_seconds"))
    return f"{seconds / 60:.0f} min ({runs} runs)" if runs > 1 else f"{seconds / 60:.1f} min"


def _last_seconds(metrics: Path) -> float:
    rows = list(csv.DictReader(open(metrics, newline="")))
    return float(rows[-1]["seconds"]) if rows else 0.0


def best_row(records: list[dict]) -> Row | None:
    """The pretraining row of the main tables with the highest mean kNN video accuracy, label-leak rows excluded.

    It only picks which run the HTML report shows; no number of the tables is selected this way."""
    scores: dict[str, list[float]] = {}
    for r in records:
        leaks = "LEAK" in r["pretraining"]
        if r["protocol"] == "knn" and r["init"] == "pretrained" and r["budget_pairs"] == STEPS * BATCH and not leaks:
            scores.setdefault(r["row"], []).append(r["video_accuracy"])
    scores = {name: values for name, values in scores.items() if name in {row.name for row in ROWS}}
    if not scores:
        return None
    name = max(scores, key=lambda n: sum(scores[n]) / len(scores[n]))
    return next(row for row in ROWS if row.name == name)


def write_report(root: Path, row: Row) -> Path:
    """`sonocl report` of the row's pretraining run (fold 0's for a per-fold row) and its linear-probe evaluation.

    The page shows real POCUS frames, so it stays in ``root`` (not committed: no data from ../shared is)."""
    run = root / "pretrain" / row.slug
    runs = sorted(run.glob("seed*_fold*")) if row.per_fold else [run]
    out = root / "report.html"
    title = f"POCUS study, best row: {row.name} ({row.steps} steps × {BATCH} pairs, {SIZE} px)"
    sonocl("report", str(runs[0]), str(root / "eval" / "linear" / row.slug), "--out", str(out), "--title", title,
           log=root / "logs" / "report.log")  # fmt: skip
    return out


def transfer(root: Path, row: Row) -> None:
    """HC18 segmentation from random init and from the row's POCUS encoder (fold 0's for a per-fold row: HC18
    shares no image with POCUS), the same grouped folds; resumes by fold."""
    run = root / "pretrain" / row.slug
    encoder = sorted(run.glob("seed*_fold*"))[0] if row.per_fold else run
    sonocl(
        "segment", "--images", str(HC18 / "images"), "--masks", str(HC18 / "masks"),
        "--init", "random", str(encoder), "--name", "random", f"{row.name} (POCUS)", *SEGMENT,
        "--out", str(root / "transfer"), log=root / "logs" / "transfer.log",
    )  # fmt: skip


def _transfer_table(root: Path, stored: list[str]) -> list[str]:
    """The HC18 transfer: each init's fold means (± std over folds; median over all images), and each encoder against
    random init, paired by fold; without a transfer run under ``root``, the table ``docs/study/pocus.json`` keeps."""
    path = root / "transfer" / "results.json"
    if not path.exists():
        return stored
    inits = json.loads(path.read_text())["inits"]
    metrics = {"dice": ("Dice", 3), "hd95_mm": ("HD95 (mm)", 2), "hc_abs_error_mm": ("HC abs. error (mm)", 2)}
    lines = [
        "### transfer: HC18 segmentation (128 px, 15 epochs, 5 grouped folds)",
        "",
        "| init | " + " | ".join(f"{label} (median)" for label, _ in metrics.values()) + " | "
        "Δ Dice vs random (paired, ± SE) | Δ HC error vs random (paired, ± SE) |",
        "|---|---|---|---|---|---|",
    ]
    fold_means = {e["name"]: {key: [f["metrics"][key]["mean"] for f in e["folds"]] for key in metrics} for e in inits}
    for entry in inits:
        mine = fold_means[entry["name"]]
        cells = []
        for key, (_, digits) in metrics.items():
            mean, std = _mean_std(mine[key])
            cells.append(f"{mean:.{digits}f} ± {std:.{digits}f} ({entry['pooled'][key]['median']:.{digits}f})")
        for key in ("dice", "hc_abs_error_mm"):
            if entry["name"] == "random" or "random" not in fold_means:
                cells.append("–")
                continue
            differences = [a - b for a, b in zip(mine[key], fold_means["random"][key])]
            mean, std = _mean_std(differences)
            digits = metrics[key][1]
            cells.append(f"{mean:+.{digits}f} ± {std / math.sqrt(len(differences)):.{digits}f}")
        lines.append(f"| {entry['name']} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def study_meta(script: str) -> dict[str, Any]:
    """What a study's JSON says of how and where it was made, and the budget of its pretrained rows."""
    return {
        "schema": "sonocl.study/1",
        "command": f"python benchmarks/{script}",
        "machine": platform.node(),
        "cpus": os.cpu_count(),
        "updated": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "budget": {"steps": STEPS, "batch_size": BATCH, "pairs": STEPS * BATCH, "size": SIZE},
    }


def write_section(name: str, script: str, body: str) -> Path:
    """``body`` between the study's markers in docs/results.md (appended the first time); returns the file."""
    results = REPO / "docs" / "results.md"
    text = results.read_text(encoding="utf-8")
    begin, end = f"<!-- {name}:begin (written by benchmarks/{script}) -->", f"<!-- {name}:end -->"
    section = f"{begin}\n\n{body}\n{end}"
    if begin in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    results.write_text(text, encoding="utf-8")
    return results


def write_outputs(root: Path) -> None:
    study = REPO / "docs" / "study" / "pocus.json"
    stored = json.loads(study.read_text(encoding="utf-8")) if study.exists() else {}
    records = merge(collect(root), stored.get("records", []))
    transfer_lines = _transfer_table(root, stored.get("transfer_table", []))
    study.parent.mkdir(parents=True, exist_ok=True)
    meta = study_meta("pocus_study.py")
    study.write_text(json.dumps({**meta, "records": records, "transfer_table": transfer_lines}, indent=1) + "\n")
    body = f"Updated {meta['updated']}; {len(records)} fold runs in `docs/study/pocus.json`.\n\n{tables(records)}\n"
    results = write_section("pocus-study", "pocus_study.py", body + "\n".join(transfer_lines))
    print(f"wrote {study} ({len(records)} records) and the tables in {results}")


def _chosen(names: list[str] | None) -> list[Row]:
    """The rows named (in the order given), or every row."""
    if not names:
        return ROWS
    by_name = {row.name: row for row in ROWS}
    unknown = [name for name in names if name not in by_name]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; the rows are {list(by_name)}")
    return [by_name[name] for name in names]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=REPO / "runs" / "pocus-study")
    parser.add_argument("--only", nargs="+", help="rows to run, in this order (default: all)")
    parser.add_argument("--tables-only", action="store_true", help="only collect the results and write the tables")
    parser.add_argument(
        "--last-block-seeds",
        type=int,
        default=LAST_BLOCK_SEEDS,
        help="fold splits of the last-block rows (default: %(default)s; a rerun with more adds the missing ones)",
    )
    parser.add_argument(
        "--transfer", action="store_true", help="also the HC18 transfer of the best row (about 35–50 min on 2 cores)"
    )
    args = parser.parse_args()
    root: Path = args.root
    store = root / "store"
    if not args.tables_only:
        ingest(root)
        # The cheap protocols for every row first, then the last-block fine-tuning of LAST_BLOCK.
        for phase in (("knn", "linear"), ("last-block",)):
            for row in _chosen(args.only):
                run_row(row, root, store, phase, args.last_block_seeds)
                write_outputs(root)
    write_outputs(root)
    best = best_row(collect(root))
    if best is not None and not args.tables_only:
        print(f"wrote {write_report(root, best)} (the best row: {best.name})")
        if args.transfer:
            transfer(root, best)
            write_outputs(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
