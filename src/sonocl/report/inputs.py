"""What `sonocl report` reads from its PATHs: the kind of each (`classify_path`), a run's ``metrics.csv``
(`read_metrics`) and its frame store (`open_store`); `ReportError` for a PATH the report cannot use."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sonocl.errors import UserError
from sonocl.files import read_json


class ReportError(UserError, ValueError):
    """A PATH the report cannot use; the message names it and says what was expected."""


def classify_path(path: Path) -> str:
    """``run``, ``evaluation`` or ``segmentation``; `ReportError` otherwise."""
    results = path / "results.json"
    if results.is_file():
        schema = str(read_json(results, ReportError).get("schema", ""))
        if schema.startswith("sonocl.evaluate"):
            return "evaluation"
        if schema.startswith("sonocl.segment"):
            return "segmentation"
        raise ReportError(f"{results}: unknown schema {schema!r} (expected sonocl.evaluate/… or sonocl.segment/…)")
    if (path / "metrics.csv").is_file() or (path / "config.yaml").is_file():
        return "run"
    raise ReportError(
        f"{path}: not a sonocl pretraining run (metrics.csv, config.yaml), evaluation or segmentation "
        "output (results.json)"
    )


def read_metrics(path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``metrics.csv`` as two column dicts of float arrays (empty cells → NaN): step rows and epoch rows."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))

    def columns(kind: str) -> dict[str, np.ndarray]:
        chosen = [r for r in rows if r.get("kind") == kind]
        names = [k for k in (rows[0].keys() if rows else []) if k != "kind"]
        return {name: np.array([_float(r.get(name)) for r in chosen], dtype=float) for name in names}

    return columns("step"), columns("epoch")


def _float(text: str | None) -> float:
    try:
        return float(text) if text not in (None, "") else math.nan
    except ValueError:
        return math.nan


def open_store(specs: Sequence[str], relative_to: Path, weights: Sequence[float] = ()) -> Any:
    """The run's stores (each as given, else relative to ``relative_to``), one or their union as the run read them;
    `ReportError` when one is unreachable."""
    from sonocl.data.store import StoreError
    from sonocl.data.union import open_stores

    if not specs:
        raise ReportError("no store path recorded")
    found = []
    for spec in specs:
        candidates = [Path(spec)] if Path(spec).is_absolute() else [Path(spec), relative_to / spec]
        reachable = next((candidate for candidate in candidates if candidate.is_dir()), None)
        if reachable is None:
            raise ReportError(f"the frame store {spec} is not reachable from here")
        found.append(reachable)
    try:
        return open_stores(found, weights)
    except StoreError as error:
        raise ReportError(str(error)) from error
