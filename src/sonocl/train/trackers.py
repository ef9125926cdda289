"""Experiment trackers beside ``metrics.csv`` and TensorBoard: Weights & Biases and MLflow (``--tracker``).

Both are optional (``pip install 'sonocl[trackers]'``): `require_trackers` imports the packages a configuration names
before anything is built, so that a missing one is one `ConfigError` line. Rank 0 starts them (`start_trackers`) once
the run directory holds ``config.yaml`` and ``provenance.json``, and records in each the configuration (W&B config,
MLflow params), what the run saw (`provenance_summary`: W&B summary, MLflow tags; MLflow keeps both files as
artifacts), every scalar the run logs at its global optimiser step (`Tracker.log`) and, when the run is done, its
final figures and the encoder's path (`Tracker.finish`; MLflow copies the encoder into a local artifact store).

Unless told otherwise the run's data stays on the machine: W&B runs offline (files under ``RUN/wandb``, uploaded
later by ``wandb sync``) and MLflow writes the file store ``RUN/mlruns`` (MLflow's own usage telemetry aside:
docs/trackers.md). ``RUN/trackers.json`` keeps each tracker's run id, so that ``--resume`` continues the same W&B run
and MLflow run.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Protocol, cast
from urllib.parse import urlparse

from sonocl import provenance
from sonocl.errors import ConfigError, UserError
from sonocl.files import read_json, write_json
from sonocl.methods.config import PretrainConfig, TrackingConfig, flat

STATE_FILE = "trackers.json"
"""``RUN/trackers.json``: each tracker's run (W&B run id; MLflow run id and tracking URI), continued on resume."""
PACKAGES = {"wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow-skinny")}
"""Tracker → (the module it imports, the package that provides it)."""


class Tracker(Protocol):
    """One experiment tracker's run, as the run's logs (`sonocl.train.logs.RunLogs`) drive it."""

    name: str

    @property
    def state(self) -> dict[str, str]:
        """What ``trackers.json`` keeps to continue this tracker run on resume."""
        ...

    def log(self, scalars: dict[str, float], step: int) -> None:
        """The scalars (``train/loss``, ``val/knn_acc``, …) at the global optimiser step ``step``."""
        ...

    def finish(self, summary: dict[str, float], step: int, encoder: Path) -> None:
        """The finished run's final figures and its encoder; the tracker run ends as finished."""
        ...

    def abort(self) -> None:
        """End the tracker run as failed: the run stopped before it was done (an error, an interrupt)."""
        ...


def require_trackers(names: Sequence[str]) -> None:
    """Import each named tracker's package; a missing one is a `ConfigError` naming the install command."""
    for name in names:
        module, package = PACKAGES[name]
        try:
            importlib.import_module(module)
        except ImportError:
            raise ConfigError(f"--tracker {name} needs {package}: pip install 'sonocl[trackers]'") from None


def provenance_summary(record: dict[str, Any]) -> dict[str, Any]:
    """What a tracker shows of a run's provenance record (`sonocl.provenance`): how many videos it trained on, read
    the labels of and held out, its label columns, its stores and the encoders it started from."""
    return {
        "videos_trained_on": len(record["trained_on"]),
        "videos_labels_used": len(record["labels_used"]),
        "videos_held_out": len(record["held_out"]),
        "label_columns": ", ".join(record["label_columns"]),
        "stores": ", ".join(record["stores"]),
        "initialised_from": ", ".join(record["initialised_from"]),
    }


def start_trackers(cfg: PretrainConfig, out: Path, resume: bool, record: dict[str, Any]) -> list[Tracker]:
    """Rank 0: a run of each tracker in ``cfg.trackers`` for the run in ``out`` (the same runs as before on
    ``resume``, from ``trackers.json``), given the configuration and the provenance ``record``. A tracker that cannot
    start (a wrong URI, W&B online without a login) is one `UserError` line, before the first step."""
    if not cfg.trackers:
        return []
    path = out / STATE_FILE
    states = read_json(path, UserError, "delete it to start new tracker runs") if resume and path.is_file() else {}
    config, seen = cfg.to_dict(), provenance_summary(record)
    trackers: list[Tracker] = []
    for name in dict.fromkeys(cfg.trackers):
        try:
            tracker = TRACKER_CLASSES[name](cfg.tracking, out, states.get(name, {}), config, seen)
        except Exception as error:  # whatever the tracker raises: one line, not its traceback
            for started in trackers:
                started.abort()
            raise UserError(f"--tracker {name} could not start: {one_line(error)}") from error
        trackers.append(tracker)
        states[name] = tracker.state
    write_json(path, states)
    return trackers


def one_line(error: BaseException) -> str:
    """``error``'s message on one line (a tracker's errors often span several)."""
    return " ".join(str(error).split()) or type(error).__name__


class WandbTracker:
    """A W&B run (``wandb.init``, not the global ``wandb.run``), offline unless ``tracking.wandb_mode`` or
    ``WANDB_MODE`` says otherwise; its files go under ``RUN/wandb`` (or ``WANDB_DIR`` when set)."""

    name = "wandb"

    def __init__(self, settings: TrackingConfig, out: Path, state: dict[str, str], config: dict[str, Any],
                 seen: dict[str, Any]) -> None:  # fmt: skip
        import wandb

        run_id = state.get("run_id")
        mode = settings.wandb_mode or (None if os.environ.get("WANDB_MODE") else "offline")
        self.run = wandb.init(
            project=settings.wandb_project or (None if os.environ.get("WANDB_PROJECT") else "sonocl"),
            entity=settings.wandb_entity,
            mode=cast(Literal["online", "offline"] | None, mode),
            dir=None if os.environ.get("WANDB_DIR") else out,
            id=run_id,
            resume="allow" if run_id else None,
            name=out.resolve().name,
            config=config,
            allow_val_change=True,  # a resumed run may change a setting (--epochs, --tracker)
            reinit="create_new",
        )
        self.run.summary.update({"provenance": seen})

    @property
    def state(self) -> dict[str, str]:
        return {"run_id": self.run.id}

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def finish(self, summary: dict[str, float], step: int, encoder: Path) -> None:
        self.run.summary.update({**summary, "steps": step, "encoder": str(encoder.resolve())})
        self.run.finish()

    def abort(self) -> None:
        self.run.finish(exit_code=1)


class MlflowTracker:
    """An MLflow run through `MlflowClient` (no global active run), in the file store ``RUN/mlruns`` unless
    ``tracking.mlflow_tracking_uri`` or ``MLFLOW_TRACKING_URI`` names another."""

    name = "mlflow"

    def __init__(self, settings: TrackingConfig, out: Path, state: dict[str, str], config: dict[str, Any],
                 seen: dict[str, Any]) -> None:  # fmt: skip
        from mlflow.entities import Param, RunTag
        from mlflow.tracking import MlflowClient
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        self.tracking_uri = (
            settings.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or (out / "mlruns").resolve().as_uri()
        )
        if _local(self.tracking_uri):  # MLflow 3 refuses its file store (in maintenance) without this opt-out
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        continued = self._continued(state)
        if continued is None:
            name = settings.mlflow_experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "sonocl"
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment is not None else self.client.create_experiment(name)
            self.run_id: str = self.client.create_run(experiment_id, run_name=out.resolve().name).info.run_id
            # Params cannot change once logged, so they are the first part's; config.yaml (below) is the latest.
            params = [Param(key, str(value)[:MAX_PARAM_VAL_LENGTH]) for key, value in flat(config).items()]
            for first in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
                self.client.log_batch(self.run_id, params=params[first : first + MAX_PARAMS_TAGS_PER_BATCH])
        else:
            self.run_id = continued
        self.client.log_batch(
            self.run_id, tags=[RunTag(f"sonocl.provenance.{key}", str(value)) for key, value in seen.items()]
        )
        for path in (out / "config.yaml", out / provenance.PROVENANCE_FILE):  # a resumed part's replace the first's
            self.client.log_artifact(self.run_id, str(path))

    def _continued(self, state: dict[str, str]) -> str | None:
        """The run id in ``state``, reopened, when it is in this tracking store; else None (a line says why)."""
        from mlflow.exceptions import MlflowException

        run_id = state.get("run_id")
        if run_id is None:
            return None
        if state.get("tracking_uri") == self.tracking_uri:
            try:
                self.client.update_run(run_id, status="RUNNING")
                return run_id
            except MlflowException:
                pass
        print(
            f"sonocl pretrain: MLflow run {run_id} ({state.get('tracking_uri')}) is not in {self.tracking_uri}; "
            "the resumed run logs to a new MLflow run",
            file=sys.stderr,
        )
        return None

    @property
    def state(self) -> dict[str, str]:
        return {"run_id": self.run_id, "tracking_uri": self.tracking_uri}

    def log(self, scalars: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, float(v), now, step) for key, v in scalars.items()])

    def finish(self, summary: dict[str, float], step: int, encoder: Path) -> None:
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id,
            metrics=[Metric(key, float(value), now, step) for key, value in summary.items()],
            tags=[RunTag("sonocl.encoder", str(encoder.resolve()))],
        )
        if _local(self.client.get_run(self.run_id).info.artifact_uri):  # a copy on this machine, not an upload
            self.client.log_artifact(self.run_id, str(encoder))
        self.client.set_terminated(self.run_id, "FINISHED")

    def abort(self) -> None:
        self.client.set_terminated(self.run_id, "FAILED")


TRACKER_CLASSES: dict[str, type[WandbTracker] | type[MlflowTracker]] = {"wandb": WandbTracker, "mlflow": MlflowTracker}


def _local(uri: str | None) -> bool:
    """Whether ``uri`` is a folder on this machine (a ``file:`` URI or a plain path)."""
    return urlparse(uri or "").scheme in ("", "file")
