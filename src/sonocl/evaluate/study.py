"""`sonocl study`: per-fold pretraining, so that no encoder ever sees the videos it is tested on.

For every (seed, fold) of the evaluation's grouped k-fold split, pretrain on that fold's training videos only (the
test videos are excluded from the store for the run, not even held out), then evaluate the fold's encoder on its
test videos. This is the protocol for methods that read labels (USCL semi-supervised, AWCL) and the strict one for
every method. The folds are the ones ``sonocl evaluate`` draws with the same settings, so a per-fold row and the
rows of a transductive evaluation line up fold by fold.

``OUT/pretrain/seed<S>_fold<F>/`` holds each fold's run; ``OUT/folds/seed<S>_fold<F>.npz`` each finished fold's
predictions. A rerun with the same command resumes: finished folds are read back, an interrupted pretraining run
continues from its last checkpoint. ``OUT/results.json``, ``results.md`` and ``predictions.csv`` have the schema of
``sonocl evaluate``; the row carries ``pretraining_overlap`` (0 test videos seen, checked on the recorded hashes).
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from sonocl.errors import ConfigError
from sonocl.outputs import STUDY, add_overwrite_argument, claim


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from sonocl.evaluate.cli import add_evaluation_arguments

    parser.add_argument("--store", required=True, help="frame store directory (from `sonocl ingest`)")
    parser.add_argument(
        "--pretrain",
        required=True,
        metavar="'PRETRAIN OPTIONS'",
        help="the `sonocl pretrain` options of every fold's run, quoted, without --store and --out, "
        "e.g. '--method uscl --steps 500 --size 64' or '--config uscl.yaml'",
    )
    parser.add_argument(
        "--also-store",
        action="append",
        default=[],
        metavar="STORE",
        help="pretrain every fold on this store too (repeatable; after --store, balanced as `sonocl pretrain --store "
        "A --store B` is; --store-weights in --pretrain weighs them): the fold's test videos are left out of every "
        "store, matched by content",
    )
    parser.add_argument("--name", help="the row's label (default: METHOD (per fold))")
    parser.add_argument(
        "--runs",
        type=Path,
        help="where the per-fold pretraining runs live (default: OUT/pretrain); "
        "studies of one method with other protocols can share them",
    )
    add_evaluation_arguments(parser)
    parser.add_argument("--out", required=True, type=Path, help="output directory (rerun the command to resume)")
    add_overwrite_argument(parser)


def pretrain_config(options: str, stores: list[str], run_dir: Path, exclude: list[str]) -> Any:
    """The fold's `PretrainConfig`: ``sonocl pretrain OPTIONS`` on ``stores``, never seeing ``exclude``."""
    from sonocl.train import cli as pretrain_cli
    from sonocl.train.config import merge

    parser = argparse.ArgumentParser(prog="sonocl study --pretrain", exit_on_error=False)
    pretrain_cli.add_arguments(parser)
    words = shlex.split(options)
    if any(word in ("--store", "--out", "--resume") for word in words):
        raise ConfigError("--pretrain: leave out --store, --out and --resume (the study sets them per fold)")
    try:
        args = parser.parse_args(
            [*words, *(word for store in stores for word in ("--store", store)), "--out", str(run_dir)]
        )
    except (argparse.ArgumentError, SystemExit) as error:
        raise ConfigError(f"--pretrain {options!r}: {error}") from None
    args.resume = (run_dir / "checkpoints" / "last.pt").exists()
    return merge(pretrain_cli.resolve_config(args), {"exclude": exclude}), args.resume


def run(args: argparse.Namespace) -> int:
    from sonocl.data.store import FrameStore
    from sonocl.evaluate.classify import init_entry, seed_splits
    from sonocl.evaluate.cli import (
        evaluation_config,
        prediction_header,
        prediction_rows,
        render_markdown,
        results_header,
        selection_text,
    )
    from sonocl.evaluate.data import load_eval_data
    from sonocl.evaluate.engine import fold_tasks, write_results

    started = time.perf_counter()
    store = FrameStore.open(args.store)
    config, grouping = evaluation_config(args, store)
    if config.protocol == "knn" and config.selection != "last":
        raise ConfigError("knn has no epochs to select: use --selection last")
    data_by_size: dict[int, Any] = {config.size: load_eval_data(store, config)}
    base = data_by_size[config.size]
    tasks = fold_tasks(seed_splits(base, config), 1)
    out = claim(args.out, STUDY, overwrite=args.overwrite)
    results_of_folds, checks, report, settings, label = [], [], None, None, args.name
    for task in tasks:
        result, fold_report, fold_settings, check = fold_run(args, store, config, base, data_by_size, task, out)
        results_of_folds.append(result)
        checks.append(check)
        report, settings = fold_report, fold_settings
        label = label or f"{fold_report.metadata.get('method', 'pretrained')} (per fold)"
    from sonocl.provenance import budget_note, find, pretrained_on, summarise

    assert report is not None and settings is not None, "every evaluation has at least one fold"
    data = data_by_size[settings["size"]]
    init_config = dataclasses.replace(config, size=settings["size"], mean=settings["mean"], std=settings["std"])
    entry = init_entry(label, report, init_config, data.class_names, results_of_folds)
    overlap = summarise([check for task, check in zip(tasks, checks) if task.seed == config.seed])  # each video once
    overlap.update(
        provenance="recorded per fold",
        budget=budget_note(find(str(fold_run_dir(args, out, tasks[0])))) + " per fold",
        pretrained_on=pretrained_on(find(str(fold_run_dir(args, out, tasks[0]))), "per fold") + " (per fold)",
        note=f"per-fold pretraining: {overlap['seen']} of {overlap['test_videos']} test videos seen in pretraining",
    )
    entry.update(
        input=settings, pretraining_overlap=overlap, pretraining={"protocol": "per fold", "options": args.pretrain}
    )
    results = results_header("study", store, data, config, grouping)
    results["inits"].append(entry)
    results["timing"] = {"total_seconds": round(time.perf_counter() - started, 2)}
    selection = selection_text(config.selection)
    predictions = [prediction_header(data.class_names), *prediction_rows(label, data, results_of_folds, selection)]
    write_results(out, results, render_markdown(results), "predictions.csv", predictions)
    print(
        f"sonocl study: {label}: {config.unit} acc {100 * entry['summary'][config.unit]['accuracy']['mean']:.1f} ± "
        f"{100 * entry['summary'][config.unit]['accuracy']['std']:.1f} % over {len(tasks)} fold runs; "
        f"wrote {out / 'results.json'} ({results['timing']['total_seconds']:.0f} s)",
        file=sys.stderr,
    )
    return 0


RUN_ENVIRONMENT = frozenset(
    {"device", "workers", "threads", "progress", "checkpoint_every_steps", "checkpoint_every_seconds", "model.compile",
     "trackers"}
)  # fmt: skip
"""Pretraining settings that change where and how a run is computed or logged, not what it learns (and every key of
the ``tracking`` section)."""


def check_same_pretraining(run_dir: Path, cfg: Any) -> None:
    """A fold run already in ``run_dir`` must have been made with the options asked for now: a study rerun with
    another budget or method into the same --out would otherwise report the old runs under the new options."""
    from sonocl.methods.config import flat
    from sonocl.train.config import load_yaml

    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        return
    saved, wanted = flat(load_yaml(saved_path)), flat(cfg.to_dict())
    differ = [
        key
        for key in sorted((saved.keys() | wanted.keys()) - RUN_ENVIRONMENT)
        if saved.get(key) != wanted.get(key) and not key.startswith("tracking.")
    ]
    if differ:
        shown = ", ".join(f"{key} {saved.get(key)!r} (now {wanted.get(key)!r})" for key in differ[:3])
        more = f" and {len(differ) - 3} more" if len(differ) > 3 else ""
        raise ConfigError(
            f"{run_dir}: this fold's run was pretrained with {shown}{more}; choose a new --out (or --runs) for "
            "these --pretrain options, or move that run away"
        )


def fold_run_dir(args: argparse.Namespace, out: Path, task: Any) -> Path:
    """The pretraining run of one (seed, fold): ``--runs`` (default ``OUT/pretrain``) / ``seedS_foldK``."""
    return (args.runs or out / "pretrain") / f"seed{task.seed}_fold{task.fold}"


def fold_run(
    args: argparse.Namespace, store: Any, config: Any, base: Any, data_by_size: dict[int, Any], task: Any, out: Path
) -> tuple[Any, Any, dict[str, Any], Any]:
    """One (seed, fold): pretrain without its test videos (or resume), check the provenance, evaluate; cached."""
    from sonocl.evaluate.classify import fold_cache, fold_key, run_fold
    from sonocl.evaluate.cli import input_settings
    from sonocl.evaluate.data import load_eval_data
    from sonocl.evaluate.inits import load_init
    from sonocl.provenance import check_fold, find
    from sonocl.train.loop import pretrain

    name = f"seed{task.seed}_fold{task.fold}"
    run_dir, cached = fold_run_dir(args, out, task), out / "folds" / f"{name}.npz"
    test_hashes = [base.video_hashes[v] for v in task.test]
    cfg, resume = pretrain_config(args.pretrain, [str(store.root), *args.also_store], run_dir, test_hashes)
    check_same_pretraining(run_dir, cfg)
    if not (cached.exists() and (run_dir / "encoder.safetensors").exists()):
        print(
            f"sonocl study: {name}: pretraining {cfg.method} without the fold's {len(test_hashes)} test videos",
            file=sys.stderr,
        )
        pretrain(cfg, run_dir, resume=resume)
    check = check_fold(find(str(run_dir)), test_hashes)
    if check.seen:
        raise AssertionError(f"{run_dir}: the per-fold run saw {check.seen} of its test videos")
    backbone, report = load_init(str(run_dir), args.backbone, config.channels, config.size)
    settings = input_settings(config, report, "encoder")
    if settings["size"] not in data_by_size:
        data_by_size[settings["size"]] = load_eval_data(store, dataclasses.replace(config, size=settings["size"]))
    data = data_by_size[settings["size"]]
    init_config = dataclasses.replace(config, size=settings["size"], mean=settings["mean"], std=settings["std"])
    key = fold_key(init_config, data, report)
    kept = fold_cache(lambda _: cached, lambda _: key)
    result = kept.load(task)
    if result is None:
        result = run_fold(data, backbone, name, init_config, task)
        kept.save(result)
    return result, report, settings, check
