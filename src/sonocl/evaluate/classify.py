"""Grouped k-fold classification of a frame store: linear probe, last-block and full fine-tuning, kNN.

One evaluation = for each init, for each seed, for each fold of a stratified split grouped by video (or by the
store's group id): train on the training videos, predict every sampled frame of the test videos. Frames are
sampled at ``fps`` (real timestamps), at most ``frames_per_video`` per video, loaded once and resized once to
the evaluation size (uint8 in memory). Training augmentation is the papers' fine-tuning transform
(RandomResizedCrop(size, 0.8–1, 0.8–1.25) + horizontal flip, `sonocl.augment`); test frames are only normalised.

Protocols (`PROTOCOLS`):

- ``linear``: frozen encoder in eval mode, features extracted once per fold, a new Linear head trained on them.
- ``last-block``: the USCL / Meta-USCL protocol ("fine-tune the last 3 layers", methods.md §1.8/§2.9): only
  ``layer4[-1]`` and a new Linear head are trainable. The frozen part runs without autograd but, as in the
  papers, in train mode so its BatchNorm running statistics still update (``freeze_bn=True`` keeps them fixed).
- ``full``: every parameter trainable.
- ``knn``: cosine-similarity-weighted vote of the ``knn_k`` nearest training frames on frozen features.

Model selection (`SELECTIONS`): ``last`` epoch (default); ``inner-val``: a grouped hold-out of the training
videos, the epoch with the best frame-level balanced accuracy on it (latest among ties) is reported;
``max-test``: the papers' way, the epoch with the best frame-level test accuracy of each fold — optimistic,
and labelled so in every output (methods.md §6, quirk 1). The test fold is predicted after every epoch only for
``max-test`` or ``test_every_epoch`` (the diagnostic curve); ``inner-val`` snapshots the model at its selected
epoch and predicts the test fold once.

On the CPU, `FineTuneModel.optimise_for_cpu` picks the memory layout per stage and computes the convs of trainable
stages on tiny maps as GEMMs (`GemmConv2d`): same parameters and results up to float rounding, about 1.5×
less CPU time per last-block epoch at 64 px (docs/evaluate.md, Cost).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sonocl.errors import ConfigError
from sonocl.evaluate import cache
from sonocl.evaluate.config import OPTIMISTIC, EvalConfig, levels
from sonocl.evaluate.data import EvalData, fold_splits, inner_validation
from sonocl.evaluate.engine import FoldCache, FoldTask, fold_tasks, run_fold_tasks
from sonocl.evaluate.finetune import FineTuneModel, FoldTrainer
from sonocl.evaluate.inits import InitReport
from sonocl.evaluate.metrics import (
    classification_metrics,
    pooled_metrics,
    summarize,
    video_level,
)
from sonocl.progress import progress_report
from sonocl.runtime import resolve_device

# ------------------------------------------------------------------------------------------------ evaluate


def _fold_metrics(data: EvalData, test_frames: np.ndarray, probabilities: np.ndarray, unit: str) -> dict[str, dict]:
    """The metrics of each level (`levels`): frames; videos and patients by the mean of their frames' probabilities."""
    labels = data.frame_labels[test_frames]
    owners = {"video": data.frame_video[test_frames], "patient": data.video_groups[data.frame_video[test_frames]]}
    metrics = {"frame": classification_metrics(labels, probabilities, data.class_names)}
    for level in levels(unit)[1:]:
        _, unit_labels, unit_probabilities = video_level(probabilities, labels, owners[level])
        metrics[level] = classification_metrics(unit_labels, unit_probabilities, data.class_names)
    return metrics


@dataclasses.dataclass
class FoldResult:
    """A finished fold run: its results.json ``runs`` entry, test frames and their probabilities."""

    task: FoldTask
    run: dict[str, Any]
    test_frames: np.ndarray
    probabilities: np.ndarray
    confusion: dict[str, np.ndarray]


def seed_splits(data: EvalData, config: EvalConfig) -> list[tuple[int, list[tuple[np.ndarray, np.ndarray]]]]:
    """The folds of each split seed (``seed``, ``seed + 1``, …, ``seeds`` of them), for `engine.fold_tasks`."""
    return [(config.seed + number, fold_splits(data, config, config.seed + number)) for number in range(config.seeds)]


def run_fold(
    data: EvalData,
    backbone: nn.Module,
    label: str,
    config: EvalConfig,
    task: FoldTask,
    bar_position: int = 0,
) -> FoldResult:
    """Train and predict one fold; seeded by (split seed, fold) only, so any process gives the same run."""
    device = resolve_device(config.device)
    started = time.perf_counter()
    torch.manual_seed(1_000_003 * task.seed + task.fold)
    generator = torch.Generator().manual_seed(2_000_003 * task.seed + task.fold)
    train_videos, val_videos = task.train, None
    if config.selection == "inner-val":
        train_videos, val_videos = inner_validation(data, train_videos, config, task.seed * 1009 + task.fold)
    model = FineTuneModel(copy.deepcopy(backbone), len(data.class_names), config.protocol, config.freeze_bn).to(device)
    model = model.optimise_for_cpu(config.size) if device.type == "cpu" else model.to(memory_format=torch.channels_last)
    trainer = FoldTrainer(data, config, device, generator)
    train, test = data.frames_of(train_videos), data.frames_of(task.test)
    val = data.frames_of(val_videos) if val_videos is not None else None
    description = f"{label} seed {task.seed} fold {task.fold + 1}/{task.folds}"
    epochs = 0 if config.protocol == "knn" else config.epochs
    with progress_report(epochs, description, "epoch", leave=False, position=bar_position) as progress:
        if config.protocol == "knn":
            outcome = trainer.knn(model, train, test)
        else:
            outcome = trainer.fit(model, train, test, val, progress)
    metrics = _fold_metrics(data, test, outcome.test_probabilities, config.unit)
    run = {
        "seed": task.seed,
        "fold": task.fold,
        "train_videos": int(len(train_videos)),
        "val_videos": int(len(val_videos)) if val_videos is not None else 0,
        "test_videos": int(len(task.test)),
        "test_patients": int(len(np.unique(data.video_groups[task.test]))),
        "train_frames": int(len(train)),
        "test_frames": int(len(test)),
        "test_video_ids": [data.video_ids[v] for v in task.test],
        "selected_epoch": outcome.selected_epoch,
        "test_accuracy_by_epoch": outcome.test_accuracy,
        "val_balanced_accuracy_by_epoch": outcome.val_balanced_accuracy,
        **metrics,
        "seconds": round(time.perf_counter() - started, 2),
    }
    confusion = {level: np.asarray(result["confusion"]) for level, result in metrics.items()}
    return FoldResult(task, run, test, outcome.test_probabilities, confusion)


def fold_key(config: EvalConfig, data: EvalData, report: InitReport) -> dict[str, str]:
    """What a kept fold run depends on (`sonocl.evaluate.cache`): the evaluation settings, the frames evaluated with
    their labels and groups, and the encoder's bytes; a run made with any other is computed again.

    Not the number of seeds: a (seed, fold) run does not depend on how many others there are, so a rerun with
    ``--seeds 3`` reads back the seed-0 runs of an earlier ``--seeds 1``."""
    settings = {name: value for name, value in dataclasses.asdict(config).items() if name != "seeds"}
    return cache.fold_key(settings, data.digest, cache.init_digest(report))


def fold_cache(path: Callable[[FoldTask], Path], key: Callable[[FoldTask], dict[str, str]]) -> FoldCache[FoldResult]:
    """Fold runs kept at ``path(task)`` as ``.npz`` files: the key, the run's results.json entry (NaN kept, floats
    given back exactly), the test frames and their probabilities."""
    return FoldCache(path, key, _read_fold_result, _write_fold_result)


def _write_fold_result(path: Path, key: str, result: FoldResult) -> None:
    from sonocl.files import atomic_write, json_text

    # Any: mypy would match savez's **arrays against its allow_pickle: bool as well
    arrays: dict[str, Any] = {
        "key": key,
        "run": json_text(result.run, nan=True),
        "test_frames": result.test_frames,
        "probabilities": result.probabilities,
    }
    atomic_write(path, lambda handle: np.savez(handle, **arrays))


def _read_fold_result(path: Path, task: FoldTask) -> tuple[str, FoldResult]:
    import json

    with np.load(path) as saved:
        run = json.loads(str(saved["run"]))
        confusion = {level: np.asarray(run[level]["confusion"]) for level in levels("patient") if level in run}
        return str(saved["key"]), FoldResult(task, run, saved["test_frames"], saved["probabilities"], confusion)


def init_entry(
    label: str, report: InitReport, config: EvalConfig, class_names: list[str], folds: Sequence[FoldResult]
) -> dict[str, Any]:
    """The results.json entry of one init from its fold runs (in seed, fold order); ``seconds`` sums the runs'."""
    optimistic = config.selection == "max-test"
    scored = levels(config.unit)
    confusions = {level: [result.confusion[level] for result in folds] for level in scored}
    runs = [result.run for result in folds]
    return {
        "label": label,
        "init": report.spec,
        "init_report": report.to_dict(),
        "protocol": config.protocol,
        "recipe": config.recipe,
        "selection": config.selection,
        "selection_note": OPTIMISTIC if optimistic else "",
        "optimistic": optimistic,
        "runs": runs,
        "unit": config.unit,
        "summary": {level: summarize([run[level] for run in runs]) for level in scored},
        "pooled": {level: pooled_metrics(confusions[level], class_names) for level in scored},
        "seconds": round(sum(run["seconds"] for run in runs), 2),
    }


InitSpec = tuple[str, nn.Module, InitReport]
"""(label, backbone, load report) of one init."""


def evaluate_inits(
    data: EvalData,
    inits: Sequence[InitSpec],
    config: EvalConfig,
    jobs: int = 1,
    on_init: Callable[[dict[str, Any], list[FoldResult]], None] | None = None,
    cache: Path | None = None,
) -> list[dict[str, Any]]:
    """Every fold run of every init; returns their results.json entries, in the order of ``inits``.

    ``jobs > 1`` runs fold runs in that many worker processes, each with an equal share of torch's threads (on
    a small CPU, single-threaded runs side by side use the cores better than one run on all of them). A run's
    result does not depend on the process that ran it, up to float rounding from a different thread count.
    ``on_init(entry, fold_results)`` is called for each init, in order, once all its runs are done. With ``cache``
    every finished fold run is kept in ``cache/<label>/seed<S>_fold<F>.npz`` and read back by a rerun with the same
    settings, so an interrupted evaluation resumes at its first unfinished fold.
    """
    if jobs < 1:
        raise ConfigError(f"jobs must be ≥ 1, got {jobs}")
    all_tasks = fold_tasks(seed_splits(data, config), len(inits))
    results: list[list[FoldResult]] = [[] for _ in inits]
    entries: list[dict[str, Any]] = []
    keys = [fold_key(config, data, report) for _, _, report in inits]

    kept = None if cache is None else _kept_runs(cache, [label for label, _, _ in inits], keys)

    def keep(result: FoldResult) -> None:
        results[result.task.init].append(result)
        finish_ready_inits()

    def finish_ready_inits() -> None:
        per_init = len(all_tasks) // len(inits)
        while len(entries) < len(inits) and len(results[len(entries)]) == per_init:
            index = len(entries)
            folds = sorted(results[index], key=lambda result: (result.task.seed, result.task.fold))
            label, _, report = inits[index]
            entries.append(init_entry(label, report, config, data.class_names, folds))
            if on_init is not None:
                on_init(entries[-1], folds)

    def run_here(task: FoldTask) -> FoldResult:
        label, backbone, _ = inits[task.init]
        return run_fold(data, backbone, label, config, task)

    shared = {"data": data, "models": [(label, backbone) for label, backbone, _ in inits], "config": config}
    run_fold_tasks(all_tasks, cache=kept, run_here=run_here, worker=_fold_in_worker, shared=shared, jobs=jobs,
                   on_result=keep)  # fmt: skip
    return entries


def _kept_runs(folder: Path, labels: Sequence[str], keys: Sequence[dict[str, str]]) -> FoldCache[FoldResult]:
    """Each init's fold runs kept in ``folder/<label>/seed<S>_fold<F>.npz``, with its key."""
    return fold_cache(
        lambda task: folder / labels[task.init] / f"seed{task.seed}_fold{task.fold}.npz", lambda task: keys[task.init]
    )


def _fold_in_worker(task: FoldTask, state: dict[str, Any]) -> FoldResult:
    label, backbone = state["models"][task.init]
    return run_fold(state["data"], backbone, label, state["config"], task, state["bar_position"])


def evaluate_init(
    data: EvalData,
    backbone: nn.Module,
    report: InitReport,
    label: str,
    config: EvalConfig,
    on_predictions: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """All folds × seeds of one init, in this process; ``on_predictions`` receives each run's per-frame rows."""

    def emit(_: dict[str, Any], folds: list[FoldResult]) -> None:
        for result in folds:
            on_predictions(
                {
                    "init": label,
                    "seed": result.task.seed,
                    "fold": result.task.fold,  # type: ignore[misc]
                    "frames": result.test_frames,
                    "probabilities": result.probabilities,
                }
            )

    return evaluate_inits(data, [(label, backbone, report)], config, on_init=emit if on_predictions else None)[0]
