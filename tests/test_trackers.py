"""Trackers (`sonocl.train.trackers`, ``--tracker``): a W&B run (offline, its ``.wandb`` file read back) and an MLflow
run (the file store under the run directory, read with `MlflowClient`) hold the loss of every step that
``metrics.csv`` holds, the configuration, what the run saw and the encoder; a resumed run continues both; a missing
package and a tracker that cannot start are one line before the first step; a tracker that fails mid-run loses
nothing else. No network: W&B's mode is left to sonocl's default (offline), and every file stays under tmp_path."""

from __future__ import annotations

import argparse
import csv
import json
import os
import struct
import sys
from pathlib import Path
from typing import Any

import pytest
from wandb.proto import wandb_internal_pb2

from conftest import tiny_pretrain, tiny_sets
from sonocl.cli import main
from sonocl.errors import ConfigError
from sonocl.train.cli import add_arguments, resolve_config
from sonocl.train.loop import pretrain
from sonocl.train.trackers import STATE_FILE, MlflowTracker


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The trackers as sonocl sets them up by default (no W&B mode, directory, project or key; no MLflow URI or
    experiment from the environment), W&B's own folders under tmp_path and its console lines off, MLflow's usage
    telemetry off (mlflow is imported inside the tests, after this)."""
    for name in ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_API_KEY", "MLFLOW_TRACKING_URI",
                 "MLFLOW_EXPERIMENT_NAME", "MLFLOW_ALLOW_FILE_STORE"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))
    yield
    os.environ.pop("MLFLOW_ALLOW_FILE_STORE", None)  # sonocl opts in to MLflow's file store for the process


def _argv(store: Path, out: Path, *extra: str, epochs: int = 1) -> list[str]:
    return ["--store", str(store), "--method", "uscl", "--out", str(out),
            *tiny_pretrain("--threads", "1", *tiny_sets(), epochs=epochs), *extra]  # fmt: skip


def _pretrain(store: Path, out: Path, *extra: str, epochs: int = 1) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(_argv(store, out, *extra, epochs=epochs))
    pretrain(resolve_config(args), out, resume=args.resume)


def _rows(out: Path, kind: str) -> list[dict[str, str]]:
    with open(out / "metrics.csv", newline="") as handle:
        return [row for row in csv.DictReader(handle) if row["kind"] == kind]


def _losses(out: Path) -> dict[int, str]:
    """metrics.csv's loss of each step, as written (9 significant digits)."""
    return {int(row["step"]): row["loss"] for row in _rows(out, "step")}


def _as_csv(values: dict[int, float]) -> dict[int, str]:
    return {step: f"{value:.9g}" for step, value in values.items()}


def _mlflow(out: Path) -> tuple[Any, str]:
    """An `MlflowClient` of the run's MLflow store and its run id (``trackers.json``)."""
    from mlflow.tracking import MlflowClient

    state = json.loads((out / STATE_FILE).read_text())["mlflow"]
    return MlflowClient(state["tracking_uri"]), state["run_id"]


# ------------------------------------------------------------------------------ W&B's offline files


def _wandb_records(path: Path) -> list[Any]:
    """The records of an offline run's ``run-ID.wandb``: W&B's LevelDB-style log (a 7-byte ``:W&B`` header, then
    32 KiB blocks of chunks, each ``crc32 (4) | length (2) | type (1) | data``; type 1 is a whole record, 2–4 its
    first, middle and last parts) of `Record` protobufs."""
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", path
    records, position, pending = [], 7, b""
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if kind == 0:
            position += left
            continue
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _wandb_run(path: Path) -> dict[str, Any]:
    """An offline run file's run id, configuration, history (step → {key: value}) and final summary."""
    run: dict[str, Any] = {"history": {}, "summary": {}}
    for record in _wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run["id"] = record.run.run_id
            run["config"] = {item.key: json.loads(item.value_json) for item in record.run.config.update}
        elif kind == "history":
            values = {
                "/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.history.item
            }
            run["history"][record.history.step.num] = values
        elif kind == "summary":
            for item in record.summary.update:
                run["summary"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return run


def _wandb_parts(out: Path) -> list[dict[str, Any]]:
    """The run's W&B parts (one offline run folder per start, a resumed part after the first), in order."""
    return [_wandb_run(path) for path in sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))]


def _step_losses(run: dict[str, Any]) -> dict[int, float]:
    return {step: values["train/loss"] for step, values in run["history"].items() if "train/loss" in values}


# -------------------------------------------------------------------------------------------- tests


def test_wandb_offline_run_holds_every_step_loss_of_metrics_csv_the_config_and_the_encoder(
    phantom_store, tmp_path: Path, offline: None
) -> None:
    out = tmp_path / "run"
    _pretrain(phantom_store.root, out, "--tracker", "wandb")
    (run,) = _wandb_parts(out)  # offline by default: its files under the run directory
    assert json.loads((out / STATE_FILE).read_text()) == {"wandb": {"run_id": run["id"]}}
    assert _as_csv(_step_losses(run)) == _losses(out) and len(_losses(out)) == 2
    (epoch,) = _rows(out, "epoch")
    assert f"{run['history'][2]['val/val_loss']:.9g}" == epoch["val_loss"]
    assert run["config"]["method"] == "uscl" and run["config"]["batch_size"] == 4
    assert run["config"]["optim"]["lr"] == pytest.approx(3e-4)
    summary = run["summary"]
    assert summary["encoder"] == str((out / "encoder.safetensors").resolve()) and summary["steps"] == 2
    trained_on = json.loads((out / "provenance.json").read_text())["trained_on"]
    assert summary["provenance"]["videos_trained_on"] == len(trained_on) == 10


def test_mlflow_file_store_run_holds_every_step_loss_of_metrics_csv_params_and_the_encoder(
    phantom_store, tmp_path: Path, offline: None
) -> None:
    out = tmp_path / "run"
    _pretrain(phantom_store.root, out, "--tracker", "mlflow")
    assert json.loads((out / STATE_FILE).read_text())["mlflow"]["tracking_uri"] == (out / "mlruns").resolve().as_uri()
    client, run_id = _mlflow(out)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    history = client.get_metric_history(run_id, "train/loss")
    assert _as_csv({metric.step: metric.value for metric in history}) == _losses(out) and len(history) == 2
    assert run.data.params["method"] == "uscl" and run.data.params["optim.lr"] == "0.0003"
    assert run.data.tags["sonocl.encoder"] == str((out / "encoder.safetensors").resolve())
    assert run.data.tags["sonocl.provenance.videos_trained_on"] == "10"
    assert {"best_val_loss", "seconds", "training_seconds", "val/knn_acc"} <= set(run.data.metrics)
    artifacts = {artifact.path for artifact in client.list_artifacts(run_id)}
    assert artifacts == {"config.yaml", "provenance.json", "encoder.safetensors"}
    assert client.get_experiment(run.info.experiment_id).name == "sonocl"


def test_a_resumed_run_continues_the_same_wandb_and_mlflow_runs(phantom_store, tmp_path: Path, offline: None) -> None:
    out = tmp_path / "run"
    _pretrain(phantom_store.root, out, "--tracker", "wandb", "--tracker", "mlflow")
    state = json.loads((out / STATE_FILE).read_text())
    _pretrain(phantom_store.root, out, "--resume", epochs=2)  # the saved configuration keeps its trackers
    assert json.loads((out / STATE_FILE).read_text()) == state
    losses = _losses(out)
    assert sorted(losses) == [1, 2, 3, 4]

    first, second = _wandb_parts(out)  # `wandb sync` uploads both parts, in order, to the one run
    assert first["id"] == second["id"] == state["wandb"]["run_id"]
    assert sorted(_step_losses(first)) == [1, 2] and sorted(_step_losses(second)) == [3, 4]
    assert _as_csv({**_step_losses(first), **_step_losses(second)}) == losses

    client, run_id = _mlflow(out)
    run = client.get_run(run_id)
    assert [r.info.run_id for r in client.search_runs([run.info.experiment_id])] == [run.info.run_id]
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert _as_csv({metric.step: metric.value for metric in history}) == losses and len(history) == 4
    assert run.info.status == "FINISHED" and run.data.params["epochs"] == "1"  # params are the first part's


@pytest.mark.parametrize("tracker, package", [("wandb", "wandb"), ("mlflow", "mlflow-skinny")])
def test_a_missing_tracker_package_is_one_line_before_anything_is_written(
    tracker: str, package: str, phantom_store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setitem(sys.modules, tracker, None)  # `import wandb` raises ImportError, as without the package
    out = tmp_path / "run"
    assert main(["pretrain", *_argv(phantom_store.root, out, "--tracker", tracker)]) == 2
    assert capsys.readouterr().err == (
        f"sonocl pretrain: --tracker {tracker} needs {package}: pip install 'sonocl[trackers]'\n"
    )
    assert not out.exists()


def test_a_tracker_that_cannot_start_is_one_line_before_the_first_step(
    phantom_store, tmp_path: Path, offline: None, capsys
) -> None:
    out = tmp_path / "run"
    argv = _argv(phantom_store.root, out, "--tracker", "mlflow", "--mlflow-tracking-uri", "nosuch://tracker")
    assert main(["pretrain", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sonocl pretrain: --tracker mlflow could not start: ") and err.count("\n") == 1, err
    assert "nosuch" in err and not (out / "metrics.csv").exists() and not (out / "checkpoints").exists()


def test_a_tracker_that_fails_mid_run_loses_neither_the_run_nor_metrics_csv(
    phantom_store, tmp_path: Path, offline: None, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    log = MlflowTracker.log

    def disk_full(self: MlflowTracker, scalars: dict[str, float], step: int) -> None:
        if step == 2:
            raise OSError(28, "No space left on device")
        log(self, scalars, step)

    monkeypatch.setattr(MlflowTracker, "log", disk_full)
    out = tmp_path / "run"
    _pretrain(phantom_store.root, out, "--tracker", "mlflow")
    assert sorted(_losses(out)) == [1, 2] and len(_rows(out, "epoch")) == 1
    assert (out / "checkpoints" / "last.pt").exists() and (out / "encoder.safetensors").exists()
    said = [line for line in capsys.readouterr().err.splitlines() if "--tracker" in line]
    assert said == [
        "sonocl pretrain: --tracker mlflow failed ([Errno 28] No space left on device); it records nothing more of "
        "this run, while metrics.csv, TensorBoard and the checkpoints go on"
    ]
    client, run_id = _mlflow(out)
    assert client.get_run(run_id).info.status == "FAILED"
    assert [metric.step for metric in client.get_metric_history(run_id, "train/loss")] == [1]


def test_tracker_flags_config_keys_and_their_checks(phantom_store, tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)

    def config(*extra: str):
        return resolve_config(parser.parse_args(_argv(phantom_store.root, tmp_path / "run", *extra)))

    cfg = config("--tracker", "wandb", "--tracker", "mlflow", "--wandb-mode", "online", "--wandb-entity", "lab",
                 "--mlflow-tracking-uri", "http://127.0.0.1:5000", "--mlflow-experiment", "lung")  # fmt: skip
    assert cfg.trackers == ("wandb", "mlflow")
    assert (cfg.tracking.wandb_mode, cfg.tracking.wandb_entity, cfg.tracking.wandb_project) == ("online", "lab", None)
    assert (cfg.tracking.mlflow_tracking_uri, cfg.tracking.mlflow_experiment) == ("http://127.0.0.1:5000", "lung")
    assert config().trackers == ()
    yaml_file = tmp_path / "trackers.yaml"
    yaml_file.write_text("trackers: [mlflow]\ntracking:\n  mlflow_experiment: lung\n")
    from_yaml = config("--config", str(yaml_file))
    assert from_yaml.trackers == ("mlflow",) and from_yaml.tracking.mlflow_experiment == "lung"
    assert config("--set", "trackers=wandb").trackers == ("wandb",)
    with pytest.raises(ConfigError, match=r"trackers 'tensorboard' is not one of wandb, mlflow"):
        config("--set", "trackers=[tensorboard]")
    with pytest.raises(ConfigError, match=r"wandb_mode 'cloud' is not one of offline, online"):
        config("--set", "tracking.wandb_mode=cloud")
