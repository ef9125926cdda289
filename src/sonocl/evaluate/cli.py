"""`sonocl evaluate`: grouped k-fold classification of a frame store for one or more encoder inits.

Writes ``OUT/results.json`` (schema in docs/evaluate.md), ``OUT/results.md`` (the comparison table and pooled
confusion matrices) and ``OUT/predictions.csv`` (one row per test frame of every fold and seed).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sonocl._version import __version__
from sonocl.errors import ConfigError
from sonocl.evaluate.config import levels
from sonocl.evaluate.engine import markdown_table, write_results
from sonocl.evaluate.metrics import metric_columns, percent
from sonocl.files import write_json
from sonocl.outputs import EVALUATION, add_overwrite_argument, claim
from sonocl.provenance import where_pretrained


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", required=True, help="frame store directory (from `sonocl ingest`)")
    parser.add_argument(
        "--init",
        required=True,
        nargs="+",
        action="extend",
        metavar="INIT",
        help="random | imagenet | a sonocl run directory, checkpoint or encoder.safetensors | a "
        "USCL/Meta-USCL/torchvision checkpoint; several give one comparison table",
    )
    parser.add_argument(
        "--name",
        nargs="+",
        action="extend",
        metavar="NAME",
        help="table label of each --init (default: random, imagenet, or the run directory's name)",
    )
    add_evaluation_arguments(parser)
    parser.add_argument(
        "--input",
        choices=("encoder", "recipe"),
        default="encoder",
        help="encoder (default): each sonocl encoder gets the size and normalisation it was trained "
        "with; random, ImageNet and foreign inits get the recipe's. recipe: every init the recipe's",
    )
    parser.add_argument(
        "--allow-label-leak",
        action="store_true",
        help="evaluate an encoder pretrained with the labels of test videos anyway; every table then "
        "says LABEL LEAK (default: refuse)",
    )
    parser.add_argument("--out", required=True, help="output directory")
    add_overwrite_argument(parser)


def add_evaluation_arguments(parser: argparse.ArgumentParser) -> None:
    """The protocol, recipe, folds, sampling and training options (shared by ``sonocl evaluate`` and ``sonocl
    study``)."""
    _protocol_arguments(parser)
    _sampling_arguments(parser)
    _training_arguments(parser)


def _protocol_arguments(parser: argparse.ArgumentParser) -> None:
    """The protocol, the recipe, the folds and their seeds."""
    from sonocl.evaluate.config import GROUP_BY, PROTOCOLS, RECIPES

    parser.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="last-block",
        help="linear: frozen encoder + new head; last-block: the last block + head (the papers'; a ResNet's "
        "layer4[-1]); full; "
        "knn: k nearest frames on frozen features (default: %(default)s)",
    )
    parser.add_argument(
        "--recipe",
        choices=tuple(RECIPES),
        default="meta-uscl",
        help="uscl: Adam 0.01, wd 1e-4, 100 epochs, batch 32, 224 px, norm 0.5/0.25; meta-uscl: 30 "
        "epochs, batch 128, 64 px, norm 0.18/0.24 (default: %(default)s); options below override",
    )
    parser.add_argument("--folds", type=int, default=5, help="number of folds (default: %(default)s)")
    parser.add_argument(
        "--seeds", type=int, default=1, help="repeats with seeds seed, seed+1, …: other folds, other heads"
    )
    parser.add_argument("--seed", type=int, default=0, help="first seed (default: %(default)s)")
    parser.add_argument(
        "--group-by",
        choices=("auto", *GROUP_BY),
        default="auto",
        help="auto (default): by patient/source group when the store has real groups (DICOM PatientID, "
        "a CSV group column), else by video; video; group",
    )


def _sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """The classes and the unit scored, the frames sampled."""
    from sonocl.evaluate.config import UNITS

    parser.add_argument(
        "--classes",
        type=lambda text: tuple(c.strip() for c in text.split(",") if c.strip()),
        help="comma-separated classes to keep, in this order (videos with other labels are dropped); A+B merges "
        "labels A and B into one class, NAME=A+B names it (e.g. 'none=0,any=1+2+3'); a label that itself holds "
        "+ or = is read as that label",
    )
    parser.add_argument(
        "--unit",
        choices=UNITS,
        default="video",
        help="what a prediction is scored for: video (default: the mean of its frames' probabilities) or patient "
        "(the store's group: the mean over all frames of its videos), for a label that belongs to the patient; "
        "every video of a patient must carry the same label",
    )
    parser.add_argument("--label-column", default="label", help="label column of the store (default: %(default)s)")
    parser.add_argument(
        "--fps", type=float, default=3.0, help="frame sampling rate from the timestamps; 0 = all (default: 3)"
    )
    parser.add_argument(
        "--frames-per-video", type=int, default=30, help="at most this many frames per video; 0 = all (default: 30)"
    )


def _training_arguments(parser: argparse.ArgumentParser) -> None:
    """Model selection, the protocols' own options, the recipe's overrides, the model and where runs are computed."""
    from sonocl.backbones import NAMES_HELP
    from sonocl.evaluate.config import SELECTIONS

    parser.add_argument(
        "--selection",
        choices=SELECTIONS,
        default="last",
        help="reported epoch: last (default); inner-val: best balanced accuracy on a grouped validation "
        "split of the training videos; max-test: best test accuracy (the papers', optimistic)",
    )
    parser.add_argument(
        "--inner-val-fraction", type=float, default=0.2, help="share of training videos held out by inner-val"
    )
    parser.add_argument(
        "--test-every-epoch",
        action="store_true",
        help="predict the test fold after every epoch for the diagnostic accuracy curve (implied by "
        "max-test; otherwise the test fold is predicted once per fold run)",
    )
    parser.add_argument(
        "--freeze-bn",
        action="store_true",
        help="last-block: keep the frozen layers' BatchNorm statistics fixed (the papers update them)",
    )
    parser.add_argument("--knn-k", type=int, default=20, help="neighbours of the knn protocol (default: %(default)s)")
    parser.add_argument(
        "--linear-augment", action="store_true", help="linear: augment training frames (features per epoch)"
    )
    tuning = parser.add_argument_group("recipe overrides")
    tuning.add_argument("--epochs", type=int)
    tuning.add_argument("--batch-size", type=int)
    tuning.add_argument("--lr", type=float)
    tuning.add_argument("--weight-decay", type=float)
    tuning.add_argument("--size", type=int, help="input size in pixels")
    tuning.add_argument("--mean", type=float, help="normalisation mean (grey, [0, 1] scale)")
    tuning.add_argument("--std", type=float, help="normalisation std")
    parser.add_argument(
        "--channels", type=int, choices=(1, 3), default=1, help="stem input channels (default: %(default)s)"
    )
    parser.add_argument("--backbone", help=f"{NAMES_HELP} (default: a sonocl encoder's own, else resnet18)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: %(default)s)")
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="fold runs trained side by side in worker processes, sharing torch's threads; on a CPU, "
        "one per core is fastest for the small 64 px models (default: %(default)s)",
    )


def run(args: argparse.Namespace) -> int:
    return _run(args)  # bad input raises a sonocl.errors.UserError, printed by sonocl.cli as one line


def _run(args: argparse.Namespace) -> int:
    from sonocl.data.store import FrameStore
    from sonocl.evaluate.classify import FoldResult, evaluate_inits
    from sonocl.evaluate.data import load_eval_data
    from sonocl.evaluate.inits import default_label, load_init

    started = time.perf_counter()
    store = FrameStore.open(args.store)
    config, grouping = evaluation_config(args, store)
    labels = list(args.name) if args.name else [default_label(spec) for spec in args.init]
    if len(labels) != len(args.init):
        raise ConfigError(f"{len(labels)} --name for {len(args.init)} --init")
    if len(set(labels)) != len(labels):
        raise ConfigError(f"init labels must be unique, got {labels}; give --name")
    import torch

    torch.manual_seed(config.seed)  # the random init's weights
    inits = []
    for label, spec in zip(labels, args.init):  # resolve every init before any training: a bad path fails in seconds
        backbone, report = load_init(
            spec, args.backbone, config.channels, config.size
        )  # a sonocl encoder: its own backbone
        print(report, file=sys.stderr)
        inits.append((label, spec, backbone, report, input_settings(config, report, args.input)))

    datasets: dict[int, Any] = {}

    def data_at(size: int) -> Any:
        if size not in datasets:
            load_started = time.perf_counter()
            datasets[size] = load_eval_data(store, dataclasses.replace(config, size=size))
            data = datasets[size]
            counts = {name: int((data.video_labels == c).sum()) for c, name in enumerate(data.class_names)}
            print(
                f"{store.root}: {len(data.video_ids)} videos {counts}, {len(data.frame_video)} frames at {size} px "
                f"({time.perf_counter() - load_started:.1f} s)",
                file=sys.stderr,
            )
        return datasets[size]

    first = data_at(inits[0][4]["size"])
    warn_small_classes(first, config.group_by == "group")
    stamps = {label: leak_stamp(spec, first, config, args.allow_label_leak) for label, spec, *_ in inits}
    out = claim(args.out, EVALUATION, overwrite=args.overwrite)
    results = results_header("evaluate", store, first, config, grouping)
    results["timing"] = {"jobs": args.jobs}
    predictions = [prediction_header(first.class_names)]
    selection = selection_text(config.selection)
    for label, _, backbone, report, settings in inits:  # the tables are written once, atomically, at the end
        data = data_at(settings["size"])

        def write_init(
            entry: dict[str, Any], folds: list[FoldResult], data: Any = data, settings: dict[str, Any] = settings
        ) -> None:
            predictions.extend(prediction_rows(entry["label"], data, folds, selection))
            entry["input"] = settings
            entry["pretraining_overlap"] = stamps[entry["label"]]
            results["inits"].append(entry)
            results["timing"]["total_seconds"] = round(time.perf_counter() - started, 2)
            write_json(out / "results.json", results)  # after each init: a long run keeps what it has done
            print(_summary_line(entry), file=sys.stderr)

        init_config = dataclasses.replace(config, size=settings["size"], mean=settings["mean"], std=settings["std"])
        evaluate_inits(
            data, [(label, backbone, report)], init_config, jobs=args.jobs, on_init=write_init, cache=out / "folds"
        )
    write_results(out, results, render_markdown(results), "predictions.csv", predictions)
    print(
        f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'predictions.csv'} "
        f"({results['timing']['total_seconds']:.0f} s)",
        file=sys.stderr,
    )
    return 0


def results_header(command: str, store: Any, data: Any, config: Any, grouping: str) -> dict[str, Any]:
    """The fields of ``results.json`` (schema ``sonocl.evaluate/1``) that describe the data and the settings."""
    counts = {name: int((data.video_labels == c).sum()) for c, name in enumerate(data.class_names)}
    called = sys.argv[1:2] == [command]
    return {
        "schema": "sonocl.evaluate/1",
        "sonocl_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": f"sonocl {command} " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if called else None,
        "store": str(store.root.resolve()),
        "classes": data.class_names,
        "num_videos": len(data.video_ids),
        "num_frames": int(len(data.frame_video)),
        "videos_per_class": counts,
        "grouping": grouping,
        "config": _config_dict(config),
        "optimistic": config.selection == "max-test",
        "inits": [],
    }


def evaluation_config(args: argparse.Namespace, store: Any) -> tuple[Any, str]:
    """The `EvalConfig` of the command line (recipe, then the flags given) and how its folds are grouped, in words."""
    from sonocl.evaluate.config import EvalConfig
    from sonocl.evaluate.data import has_patient_groups

    group_by = args.group_by if args.group_by != "auto" else ("group" if has_patient_groups(store) else "video")
    config = EvalConfig.from_recipe(
        args.recipe,
        protocol=args.protocol,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        size=args.size,
        mean=args.mean,
        std=args.std,
        channels=args.channels,
        backbone=args.backbone,
        folds=args.folds,
        seeds=args.seeds,
        seed=args.seed,
        group_by=group_by,
        fps=args.fps,
        frames_per_video=args.frames_per_video,
        selection=args.selection,
        test_every_epoch=args.test_every_epoch,
        freeze_bn=args.freeze_bn,
        knn_k=args.knn_k,
        linear_augment=args.linear_augment,
        inner_val_fraction=args.inner_val_fraction,
        classes=args.classes,
        unit=args.unit,
        label_column=args.label_column,
        device=args.device,
    )
    grouping = (
        "by patient/source group (the store's group ids)"
        if group_by == "group"
        else "by video" + (" (the store has no patient groups)" if args.group_by == "auto" else "")
    )
    print(f"folds: {config.folds}, stratified, {grouping}", file=sys.stderr)
    return config, grouping


def input_settings(config: Any, report: Any, mode: str) -> dict[str, Any]:
    """Size and normalisation for one init: a sonocl encoder's own (``mode="encoder"``), else the recipe's."""
    metadata = report.metadata if report.kind == "sonocl" else {}
    own = mode == "encoder" and all(isinstance(metadata.get(k), (int, float)) for k in ("size", "mean", "std"))
    if own:
        return {
            "size": int(metadata["size"]),
            "mean": float(metadata["mean"]),
            "std": float(metadata["std"]),
            "source": "encoder (as it was pretrained)",
        }
    return {
        "size": config.size,
        "mean": config.mean,
        "std": config.std,
        "source": f"recipe {config.recipe}" + (" (asked for with --input recipe)" if mode == "recipe" else ""),
    }


def leak_stamp(spec: str, data: Any, config: Any, allow_leak: bool) -> dict[str, Any]:
    """The init's overlap with every fold's test videos (`sonocl.provenance`); refuses a label leak unless allowed."""
    from sonocl.evaluate.data import fold_splits
    from sonocl.provenance import LabelLeakError, budget_note, check_fold, find, leak_message, pretrained_on, summarise

    provenance = find(spec)
    # one seed's folds: each test video once (every seed's folds hold the same videos, so they would count it again)
    checks = [
        check_fold(provenance, [data.video_hashes[v] for v in test])
        for _, test in fold_splits(data, config, config.seed)
    ]
    stamp = summarise(checks)
    stamp["provenance"] = "recorded" if provenance is not None else "none (random, ImageNet or a foreign checkpoint)"
    stamp["budget"] = budget_note(provenance)
    stamp["pretrained_on"] = pretrained_on(provenance, spec)
    if stamp["labels_seen"] and not allow_leak:
        raise LabelLeakError(leak_message(spec, stamp["labels_seen"], stamp["test_videos"]))
    if stamp["note"]:
        print(f"{spec}: {stamp['note']}", file=sys.stderr)
    return stamp


def prediction_header(class_names: list[str]) -> list[str]:
    """The columns of ``predictions.csv`` (evaluate and study write the same file)."""
    return ["init", "video_id", "frame_index", "fold", "seed", "label", *[f"p_{name}" for name in class_names],
            "predicted", "selection"]  # fmt: skip


def prediction_rows(label: str, data: Any, folds: list[Any], selection: str) -> list[list[Any]]:
    """One row per test frame of each fold run of one init: the truth, every class probability, the prediction."""
    return [
        [
            label,
            data.video_ids[data.frame_video[frame]],
            int(data.frame_index[frame]),
            result.task.fold,
            result.task.seed,
            data.class_names[data.frame_labels[frame]],
            *[f"{p:.6f}" for p in probabilities],
            data.class_names[int(probabilities.argmax())],
            selection,
        ]
        for result in folds
        for frame, probabilities in zip(result.test_frames, result.probabilities)
    ]


def warn_small_classes(data: Any, by_group: bool) -> None:
    """One line per class with fewer than 2 videos (or groups): it can never be both trained on and tested."""
    for code, name in enumerate(data.class_names):
        members = data.video_labels == code
        count = len(set(data.video_groups[members].tolist())) if by_group else int(members.sum())
        if count < 2:
            unit = "group" if by_group else "video"
            print(
                f"sonocl evaluate: warning: class {name!r} has {count} {unit}{'s' if count != 1 else ''}, so no fold "
                f"can both train on it and test it; its scores say little (drop it with --classes)",
                file=sys.stderr,
            )


def _config_dict(config: Any) -> dict[str, Any]:
    import dataclasses

    values = dataclasses.asdict(config)
    values["classes"] = list(config.classes) if config.classes else None
    return values


def selection_text(selection: str) -> str:
    from sonocl.evaluate.config import OPTIMISTIC

    return f"{selection}: {OPTIMISTIC}" if selection == "max-test" else selection


def _summary_line(entry: dict[str, Any]) -> str:
    unit = entry.get("unit", "video")
    video, frame = entry["summary"][unit], entry["summary"]["frame"]
    note = f"  [{entry['selection_note']}]" if entry["optimistic"] else ""
    overlap = entry.get("pretraining_overlap", {}).get("note")
    note += f"  [{overlap}]" if overlap else ""
    return (
        f"{entry['label']}: {unit} acc {percent(video['accuracy'])} %, frame acc {percent(frame['accuracy'])} %, "
        f"pooled frame acc {100 * entry['pooled']['frame']['accuracy']:.1f} % ({entry['seconds']:.0f} s){note}"
    )


def confusion_markdown(label: str, level: str, pooled: dict[str, Any], classes: list[str]) -> list[str]:
    """The pooled confusion matrix of one init at one level, with each class's recall and precision."""
    rows = [
        [name, *(str(v) for v in row), f"{100 * pooled['per_class'][name]['recall']:.1f}"]
        for name, row in zip(classes, pooled["confusion"])
    ]
    precision = " | ".join(f"{100 * pooled['per_class'][n]['precision']:.1f}" for n in classes)
    return [
        f"**{label}**, {level} level ({pooled['n']} {level}s, accuracy {100 * pooled['accuracy']:.1f} %):",
        "",
        *markdown_table(["true \\ predicted", *classes, "recall"], rows),
        f"| precision | {precision} | |",
    ]


def _table_row(entry: dict[str, Any], columns: Sequence[tuple[str, str, str]], scored: Sequence[str]) -> list[str]:
    """An init's row of results.md's table: its label and stamps, each metric's mean ± std, each pooled accuracy."""
    cells = [percent(entry["summary"][level][key]) for _, level, key in columns]
    pooled = [f"{100 * entry['pooled'][level]['accuracy']:.1f}" for level in scored]
    overlap = entry.get("pretraining_overlap", {}).get("note", "")
    label = entry["label"] + (" (optimistic)" if entry["optimistic"] else "") + (f" [{overlap}]" if overlap else "")
    budget = entry.get("pretraining_overlap", {}).get("budget") or "–"
    where = where_pretrained(entry.get("pretraining_overlap") or {})
    return [label, where, budget, *cells, *pooled]


def render_markdown(results: dict[str, Any]) -> str:
    """results.md: settings, the init × metric table (mean ± std in %), pooled confusion matrices, init reports."""
    from sonocl.evaluate.config import OPTIMISTIC

    config = results["config"]
    runs = config["folds"] * config["seeds"]
    unit = config.get("unit", "video")
    columns, scored = metric_columns(unit), levels(unit)
    lines = [
        f"# sonocl evaluate: {Path(results['store']).name}",
        "",
        f"Protocol `{config['protocol']}`, recipe `{config['recipe']}` ({config['epochs']} epochs, batch "
        f"{config['batch_size']}, Adam lr {config['lr']}, wd {config['weight_decay']}, cosine, {config['size']} px, "
        f"norm {config['mean']}/{config['std']}, {config['channels']}-channel {config['backbone']}), selection "
        f"`{config['selection']}`; {config['folds']} folds × {config['seeds']} seed(s), stratified, grouped "
        f"{results.get('grouping', 'by ' + config['group_by'])}; {results['num_videos']} videos, {results['num_frames']} frames "
        f"(≤ {config['frames_per_video'] or '∞'} per video, {str(config['fps']) + ' fps' if config['fps'] else 'every frame'}); classes "
        f"{', '.join(results['classes'])}."
        + (
            " Scored per patient: a patient's prediction is the mean of its videos' frame probabilities."
            if unit == "patient"
            else ""
        ),
        "",
    ]
    if results["optimistic"]:
        lines += [
            f"**All numbers below are {OPTIMISTIC}**: each fold reports its best epoch by test accuracy, "
            "as the USCL / Meta-USCL papers do. Use `--selection last` or `inner-val` for unbiased numbers.",
            "",
        ]
    header = [
        "init",
        "pretrained on",
        "pretraining budget",
        *[name for name, _, _ in columns],
        *[f"pooled {level} acc" for level in scored],
    ]
    lines += [
        f"Mean ± std over {runs} fold runs, in %. Pooled = accuracy of the confusion matrix summed over folds "
        'and seeds (the papers\' "Total acc").',
        "",
        *markdown_table(header, [_table_row(entry, columns, scored) for entry in results["inits"]]),
    ]
    lines += ["", "## Pooled confusion matrices (rows: true class, columns: predicted)", ""]
    for entry in results["inits"]:
        for level in scored:
            lines += confusion_markdown(entry["label"], level, entry["pooled"][level], results["classes"])
            lines.append("")
    lines += ["## Inits", ""]
    for entry in results["inits"]:
        settings = entry.get("input")
        if settings:
            lines.append(
                f"- **{entry['label']}** input: {settings['size']} px, norm {settings['mean']:g}/"
                f"{settings['std']:g} ({settings['source']})"
            )
        report = entry["init_report"]
        ignored = f"; ignored {len(report['ignored'])} head keys" if report["ignored"] else ""
        source = f" from `{report['source']}`" if report["source"] else ""
        lines.append(
            f"- **{entry['label']}**: {report['kind']}{source}, {report['loaded']} backbone tensors loaded"
            f"{ignored}; {entry['seconds']:.0f} s"
        )
    lines.append("")
    return "\n".join(lines)
