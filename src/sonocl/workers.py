"""Fold runs side by side in spawned worker processes (``sonocl evaluate --jobs``, ``sonocl segment --jobs``).

On a small CPU, single-threaded runs side by side use the cores better than one run on all of them. Workers are
spawned (forking is unsafe once OpenMP threads exist), each gets an equal share of torch's threads, its own row for
a progress bar, and a copy of the read-only ``shared`` data once (not per task); a worker dies with its parent, so a
killed command leaves no orphan computing. A run's result does not depend on the process that ran it, up to float
rounding from a different thread count.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import ctypes.util
import multiprocessing
import signal
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from tqdm import tqdm

from sonocl.runtime import keep_freed_memory

_STATE: dict[str, Any] = {}
"""In a worker: the ``shared`` mapping and ``bar_position``, the worker's progress-bar row."""
_PR_SET_PDEATHSIG = 1


def map_unordered(
    function: Callable[[Any, dict[str, Any]], Any], tasks: Iterable[Any], jobs: int, shared: dict[str, Any]
) -> Iterator[Any]:
    """``function(task, state)`` for every task in ``jobs`` worker processes, yielded as each finishes.

    ``state`` is ``shared`` plus ``bar_position``. ``function`` must be importable (a module-level function). If the
    caller stops early or a run fails, runs not started are dropped and running ones finish.
    """
    threads = max(1, torch.get_num_threads() // jobs)
    context = multiprocessing.get_context("spawn")
    slots = context.Queue()
    for slot in range(jobs):
        slots.put(slot)
    with concurrent.futures.ProcessPoolExecutor(
        jobs, mp_context=context, initializer=_start_worker, initargs=(shared, threads, slots, context.RLock())
    ) as pool:
        pending = [pool.submit(_call, function, task) for task in tasks]
        try:
            for future in concurrent.futures.as_completed(pending):
                yield future.result()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def _start_worker(shared: dict[str, Any], threads: int, slots: Any, lock: Any) -> None:
    die_with_parent()
    keep_freed_memory()
    torch.set_num_threads(threads)
    tqdm.set_lock(lock)
    _STATE.update(shared, bar_position=slots.get())


def _call(function: Callable[[Any, dict[str, Any]], Any], task: Any) -> Any:
    return function(task, _STATE)


def die_with_parent() -> bool:
    """Ask Linux to end this process when its parent dies (``PR_SET_PDEATHSIG``); False where that is unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False
