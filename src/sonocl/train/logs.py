"""A run's logs (rank 0): ``metrics.csv`` (one row per step and per epoch, truncated on resume), TensorBoard and the
``--tracker`` runs (`sonocl.train.trackers`), behind one object, `RunLogs`."""

from __future__ import annotations

import contextlib
import csv
import io
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from sonocl.files import atomic_write_text
from sonocl.methods.config import PretrainConfig
from sonocl.models import ENCODER_FILE
from sonocl.train.trackers import Tracker, one_line, start_trackers

STEP_COLUMNS = ("lr", "momentum", "loss")
EPOCH_COLUMNS = ("val_loss", "knn_acc", "embedding_std")


class MetricsLog:
    """``metrics.csv`` (rank 0): one row per step and one per epoch; resumed runs drop rows past the checkpoint."""

    def __init__(self, path: Path, resume_step: int | None, resume_epoch: int | None) -> None:
        self.path = path
        self.fields: list[str] | None = None
        self.rows: list[dict[str, str]] = []
        if resume_step is not None and path.exists():
            with open(path, newline="", encoding="utf-8") as handle:
                reader = csv.DictReader(handle)
                self.fields = list(reader.fieldnames or []) or None
                for row in reader:
                    keep = (
                        int(row["step"]) <= resume_step
                        if row["kind"] == "step"
                        else int(row["epoch"]) <= (resume_epoch or 0)
                    )
                    if keep:
                        self.rows.append(row)
            self._rewrite()
        elif path.exists():
            path.unlink()
        self._handle: IO[str] | None = None

    def _rewrite(self) -> None:
        if self.fields is None:
            return
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=self.fields)
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.path, text.getvalue())

    def write(self, row: dict[str, Any]) -> None:
        if self.fields is None:
            parts = [k for k in row if k.startswith("part_")]
            self.fields = ["kind", "epoch", "step", *STEP_COLUMNS, *parts, "images_per_s", "step_seconds", *EPOCH_COLUMNS,
                           "seconds"]  # fmt: skip
            self._rewrite()
            if not self.path.exists():
                with open(self.path, "w", newline="", encoding="utf-8") as handle:
                    csv.DictWriter(handle, fieldnames=self.fields).writeheader()
        if self._handle is None:
            self._handle = open(self.path, "a", newline="", encoding="utf-8")
        formatted = {k: (f"{v:.9g}" if isinstance(v, float) else v) for k, v in row.items() if k in self.fields}
        csv.DictWriter(self._handle, fieldnames=self.fields).writerow(formatted)
        self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


class NullWriter:
    def add_scalar(self, *args: Any, **kwargs: Any) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def tensorboard(path: Path, purge_step: int | None) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency; a broken install should not stop training
        print("sonocl pretrain: tensorboard is not importable; logging to metrics.csv only", file=sys.stderr)
        return NullWriter()
    return SummaryWriter(str(path), purge_step=purge_step)


class RunLogs:
    """Where a run's scalars go: its rows to ``metrics.csv``, and its scalars (``train/loss``, ``train/lr``,
    ``train/images_per_s``, ``train/<part>``; ``val/<metric>`` at monitored epochs) to TensorBoard and each tracker at
    the global step. A tracker call that raises (a full disk, a lost server) drops that tracker with one line; the
    run, ``metrics.csv``, TensorBoard and the checkpoints go on."""

    def __init__(self, metrics: MetricsLog, writer: Any, trackers: list[Tracker], encoder: Path) -> None:
        self.metrics = metrics
        self.writer = writer
        self.trackers = trackers
        self.encoder = encoder

    @classmethod
    def open(cls, cfg: PretrainConfig, out: Path, resume_at: tuple[int, int] | None, record: dict[str, Any]) -> RunLogs:
        """The logs of the run in ``out``: continued from ``resume_at`` (global step, epoch) on resume, the trackers
        given the configuration and the provenance ``record``."""
        step, epoch = resume_at if resume_at is not None else (None, None)
        trackers = start_trackers(cfg, out, resume_at is not None, record)
        return cls(MetricsLog(out / "metrics.csv", step, epoch), tensorboard(out / "tb", step), trackers,
                   out / ENCODER_FILE)  # fmt: skip

    def step(self, row: dict[str, Any]) -> None:
        """A step's row (`sonocl.train.loop`'s columns); its loss, learning rate, images/s and loss parts as
        ``train/…`` scalars."""
        self.metrics.write(row)
        parts = {f"train/{key.removeprefix('part_')}": value for key, value in row.items() if key.startswith("part_")}
        scalars = {f"train/{key}": row[key] for key in ("loss", "lr", "images_per_s")}
        self._scalars({**scalars, **parts}, row["step"])

    def epoch(self, row: dict[str, Any]) -> None:
        """A monitored epoch's row; its held-out loss and monitors as ``val/…`` scalars."""
        self.metrics.write(row)
        self._scalars({f"val/{key}": row[key] for key in EPOCH_COLUMNS if key in row}, row["step"])
        self.writer.flush()

    def finish(self, steps: int, seconds: float, training_seconds: float, best_val_loss: float | None) -> None:
        """The finished run to each tracker, whose runs then end as finished: its wall time and the part of it in
        optimiser steps, its best held-out loss and the exported encoder, at its last step."""
        summary = {"seconds": seconds, "training_seconds": training_seconds}
        if best_val_loss is not None:
            summary["best_val_loss"] = best_val_loss
        self._each(lambda tracker: tracker.finish(summary, steps, self.encoder))
        self.trackers = []

    def close(self) -> None:
        """Close ``metrics.csv`` and TensorBoard; a tracker run not finished (the run stopped early) ends as failed."""
        self.writer.close()
        self.metrics.close()
        self._each(lambda tracker: tracker.abort())
        self.trackers = []

    def _scalars(self, scalars: dict[str, float], step: int) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        self._each(lambda tracker: tracker.log(scalars, step))

    def _each(self, call: Callable[[Tracker], None]) -> None:
        for tracker in list(self.trackers):
            try:
                call(tracker)
            except Exception as error:  # any tracker failure: the run must not be lost to it
                self.trackers.remove(tracker)
                print(
                    f"sonocl pretrain: --tracker {tracker.name} failed ({one_line(error)}); it records nothing more "
                    "of this run, while metrics.csv, TensorBoard and the checkpoints go on",
                    file=sys.stderr,
                )
                with contextlib.suppress(Exception):
                    tracker.abort()
