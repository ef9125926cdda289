"""A run's logs: ``metrics.csv`` (one row per step and per epoch, truncated on resume) and TensorBoard."""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path
from typing import IO, Any

from sonocl.files import atomic_write_text

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
