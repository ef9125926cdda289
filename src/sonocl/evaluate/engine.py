"""The evaluation engine of `sonocl evaluate`, `sonocl study` and `sonocl segment`: fold tasks, fold runs read back
from their cache or run here or in worker processes, and the files every evaluation writes.

- `fold_tasks`: every (init, seed, fold) run of the given splits, init-major.
- `FoldCache`: finished fold runs kept on disk, one file a run, each with the key of what it was made from
  (`sonocl.evaluate.cache`); a kept run is read back only when its key is the one asked for now.
- `run_fold_tasks`: each task's result, read back from the cache or run here or in worker processes
  (`sonocl.workers.map_unordered`) and kept as it finishes, so that a killed evaluation resumes at its first
  unfinished fold.
- `write_results` and `markdown_table`: results.json, results.md and the CSV of per-item rows.

What a fold run computes, how it is keyed and stored, and how its results are summarised stay with the caller
(`evaluate.classify`, `evaluate.segment_folds`).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import sys
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

from sonocl.evaluate import cache
from sonocl.files import atomic_write_text, write_json
from sonocl.workers import map_unordered


@dataclasses.dataclass(frozen=True)
class FoldTask:
    """One fold run: which init (its index), the split seed, the fold of ``folds`` and its training and test items
    (video indices for classification, image indices for segmentation)."""

    init: int
    seed: int
    fold: int
    folds: int
    train: np.ndarray
    test: np.ndarray


Splits = Sequence[tuple[np.ndarray, np.ndarray]]
"""The (training, test) items of each fold of one split."""


def fold_tasks(splits_by_seed: Sequence[tuple[int, Splits]], num_inits: int) -> list[FoldTask]:
    """Every (init, seed, fold) run of ``splits_by_seed`` ((split seed, its folds) for each seed), init-major: every
    init gets the same folds."""
    return [
        FoldTask(init, seed, fold, len(splits), train, test)
        for init in range(num_inits)
        for seed, splits in splits_by_seed
        for fold, (train, test) in enumerate(splits)
    ]


class FoldRun(Protocol):
    """A finished fold run, which names its task (`classify.FoldResult`, `segment_folds.FoldResult`)."""

    @property
    def task(self) -> FoldTask: ...


Result = TypeVar("Result", bound=FoldRun)

DAMAGE = (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError, zipfile.BadZipFile)
"""What reading a damaged kept run (cut short, overwritten) raises: it is computed again."""


@dataclasses.dataclass(frozen=True)
class FoldCache(Generic[Result]):
    """Finished fold runs kept on disk, one file a run at ``path(task)``, each saved with ``key(task)``."""

    path: Callable[[FoldTask], Path]
    key: Callable[[FoldTask], dict[str, str]]
    """What the run of a task depends on (`sonocl.evaluate.cache.fold_key`)."""
    read: Callable[[Path, FoldTask], tuple[str, Result]]
    """The saved key (as `cache.encode` wrote it) and the run kept in a file; raises one of `DAMAGE` if damaged."""
    write: Callable[[Path, str, Result], None]
    """Write a run with its encoded key, atomically (a kill leaves the file absent or complete)."""

    def load(self, task: FoldTask) -> Result | None:
        """The kept run of ``task`` if it was made with its key, else None (and a line saying what changed, or that
        the file is damaged: a kept run is a cache, computed again)."""
        path = self.path(task)
        if not path.is_file():
            return None
        try:
            saved, result = self.read(path, task)
        except DAMAGE as error:
            reason = "not UTF-8 text" if isinstance(error, UnicodeDecodeError) else str(error).strip()
            reason = (reason.splitlines() or [type(error).__name__])[0]
            print(f"{path}: a damaged kept fold run ({reason}); computing it again", file=sys.stderr)
            return None
        return result if cache.matches(saved, self.key(task), path) else None

    def save(self, result: Result) -> None:
        """Keep a finished run at the path of its task, with its key."""
        path = self.path(result.task)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.write(path, cache.encode(self.key(result.task)), result)


def run_fold_tasks(
    tasks: Sequence[FoldTask],
    *,
    cache: FoldCache[Result] | None,
    run_here: Callable[[FoldTask], Result],
    worker: Callable[[FoldTask, dict[str, Any]], Result],
    shared: dict[str, Any],
    jobs: int,
    on_result: Callable[[Result], None],
    announce: Callable[[int, int], None] | None = None,
) -> int:
    """``on_result`` for every task's result: first the ones ``cache`` reads back, in task order, then each run as it
    finishes (kept in ``cache`` first). With ``jobs > 1`` and more than one run to do, runs go to ``jobs`` worker
    processes (``worker(task, state)``, a module-level function; ``state`` is ``shared`` and the worker's
    progress-bar slot). ``announce(read_back, total)`` is called before the runs start. Returns how many results
    were read back."""
    todo = []
    for task in tasks:
        done = cache.load(task) if cache is not None else None
        if done is None:
            todo.append(task)
        else:
            on_result(done)
    read_back = len(tasks) - len(todo)
    if announce is not None:
        announce(read_back, len(tasks))
    results: Iterator[Result]
    if jobs == 1 or len(todo) <= 1:
        results = (run_here(task) for task in todo)
    else:
        results = map_unordered(worker, todo, jobs, shared)
    for result in results:
        if cache is not None:
            cache.save(result)
        on_result(result)
    return read_back


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """The lines of a Markdown table: the header, its rule and a line a row."""
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def write_results(out: Path, results: dict[str, Any], markdown: str, table: str, rows: Iterable[Sequence[Any]]) -> None:
    """The files of an evaluation in ``out``, each written atomically (a killed run leaves the previous file or none):
    ``results.json``, ``results.md`` (``markdown``) and the CSV ``table`` of ``rows`` (the header first), in UTF-8, a
    byte of a name that was not UTF-8 escaped (`sonocl.files.atomic_write_text`)."""
    write_json(out / "results.json", results)
    atomic_write_text(out / "results.md", markdown)
    text = io.StringIO()
    csv.writer(text).writerows(rows)
    atomic_write_text(out / table, text.getvalue())
