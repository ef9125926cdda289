"""No stale result under a new name: a kept fold run is read back only when the store's content, its labels and
groups, the encoder's bytes and the settings are those it was made with (`sonocl.evaluate.cache`); otherwise it is
computed again and one line says what changed. A study rerun with other pretraining options refuses the old runs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from reliability_support import line_naming, random_store, run_cli

from sonocl.models import build_backbone, save_encoder

KNN = ["--protocol", "knn", "--folds", "2", "--device", "cpu"]


def _accuracies(evaluation: Path) -> list[float]:
    results = json.loads((evaluation / "results.json").read_text())
    return [run["video"]["accuracy"] for entry in results["inits"] for run in entry["runs"]]


def _encoder(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    save_encoder(build_backbone("resnet18", 1), path, {"arch": "resnet18", "channels": 1, "size": 32,
                                                         "mean": 0.5, "std": 0.25, "method": "simclr"})  # fmt: skip
    return path


def test_a_relabelled_store_is_evaluated_again(tmp_path: Path, capsys) -> None:
    store, out = tmp_path / "store", tmp_path / "eval"
    random_store(store, ["a", "b"] * 4)
    assert run_cli(capsys, "evaluate", "--store", store, "--init", "random", *KNN, "--out", out).code == 0

    shutil.rmtree(store)  # the same path, other labels: what a user's relabel and re-ingest gives
    random_store(store, ["a"] * 4 + ["b"] * 4)
    outcome = run_cli(capsys, "evaluate", "--store", store, "--init", "random", *KNN, "--out", out)
    assert outcome.code == 0
    assert "other data" in line_naming(outcome.err, out / "folds" / "random" / "seed0_fold0.npz")
    fresh = tmp_path / "fresh"
    assert run_cli(capsys, "evaluate", "--store", store, "--init", "random", *KNN, "--out", fresh).code == 0
    assert _accuracies(out) == _accuracies(fresh)


def test_an_encoder_retrained_at_the_same_path_is_evaluated_again(tmp_path: Path, capsys) -> None:
    store, out = random_store(tmp_path / "store", ["a", "b"] * 4), tmp_path / "eval"
    weights = _encoder(tmp_path / "encoder.safetensors", seed=1)
    argv = ["evaluate", "--store", store, "--init", weights, "--name", "encoder", *KNN, "--out", out]
    assert run_cli(capsys, *argv).code == 0
    predictions = (out / "predictions.csv").read_text()

    _encoder(weights, seed=2)
    outcome = run_cli(capsys, *argv)
    assert outcome.code == 0
    assert "other weights" in line_naming(outcome.err, out / "folds" / "encoder" / "seed0_fold0.npz")
    assert (out / "predictions.csv").read_text() != predictions


def test_unchanged_inputs_are_read_back(tmp_path: Path, capsys) -> None:
    store, out = random_store(tmp_path / "store", ["a", "b"] * 4), tmp_path / "eval"
    argv = ["evaluate", "--store", store, "--init", "random", *KNN, "--out", out]
    assert run_cli(capsys, *argv).code == 0
    kept = (out / "folds" / "random" / "seed0_fold0.npz").stat().st_mtime_ns
    outcome = run_cli(capsys, *argv)
    assert outcome.code == 0 and "computing it again" not in outcome.err
    assert (out / "folds" / "random" / "seed0_fold0.npz").stat().st_mtime_ns == kept


def test_a_study_rerun_with_another_budget_refuses_the_old_runs(tmp_path: Path, capsys) -> None:
    store, out = random_store(tmp_path / "store", ["a", "b"] * 4), tmp_path / "study"
    pretrain = "--method simclr --batch-size 4 --size 32 --threads 1 --no-progress --device cpu --steps "
    assert run_cli(capsys, "study", "--store", store, "--pretrain", pretrain + "1", *KNN, "--out", out).code == 0
    results = (out / "results.json").read_bytes()
    outcome = run_cli(capsys, "study", "--store", store, "--pretrain", pretrain + "2", *KNN, "--out", out)
    assert outcome.code == 2
    line = line_naming(outcome.err, out / "pretrain" / "seed0_fold0")
    assert "steps 1 (now 2)" in line, line
    assert (out / "results.json").read_bytes() == results


def test_segment_evaluates_changed_masks_again(tmp_path: Path, capsys) -> None:
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for index in range(4):
        Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(images / f"{index}.png")
        mask = np.zeros((40, 40), dtype=np.uint8)
        mask[10:30, 10:30] = 255
        Image.fromarray(mask).save(images / f"{index}_mask.png")
    argv = ["segment", "--images", images, "--init", "random", "--folds", "2", "--size", "32", "--epochs", "1",
            "--batch-size", "2", "--overlays", "0", "--device", "cpu", "--out", tmp_path / "out"]  # fmt: skip
    assert run_cli(capsys, *argv).code == 0
    mask = np.zeros((40, 40), dtype=np.uint8)
    mask[5:15, 5:35] = 255
    Image.fromarray(mask).save(images / "0_mask.png")
    outcome = run_cli(capsys, *argv)
    assert outcome.code == 0
    assert "other data" in line_naming(outcome.err, tmp_path / "out" / "folds" / "init0_fold0.json")
