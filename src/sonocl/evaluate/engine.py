"""The fold-run engine of `sonocl evaluate` and `sonocl segment`: each fold run is
read back from its cache when one made with the same settings exists, else run here or in worker processes
(`sonocl.workers.map_unordered`), and saved as it finishes, so that a killed evaluation resumes at its first
unfinished fold. What a fold run is, how it is keyed and stored, stays with the caller (`evaluate.classify`,
`evaluate.segment`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from sonocl.workers import map_unordered

Task = TypeVar("Task")
Result = TypeVar("Result")


def run_fold_tasks(
    tasks: Sequence[Task],
    *,
    load: Callable[[Task], Result | None],
    run_here: Callable[[Task], Result],
    worker: Callable[[Task, dict[str, Any]], Result],
    shared: dict[str, Any],
    jobs: int,
    save: Callable[[Result], None],
    on_result: Callable[[Result], None],
    announce: Callable[[int, int], None] | None = None,
) -> int:
    """``on_result`` for every task's result: first the ones ``load`` reads back, in task order, then each run as it
    finishes (``save`` d first). With ``jobs > 1`` and more than one run to do, runs go to ``jobs`` worker processes
    (``worker(task, state)``, a module-level function; ``state`` is ``shared`` and the worker's progress-bar slot).
    ``announce(read_back, total)`` is called before the runs start. Returns how many results were read back."""
    todo = []
    for task in tasks:
        done = load(task)
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
        save(result)
        on_result(result)
    return read_back
