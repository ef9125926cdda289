"""No leak by the back door: a run's provenance only grows over its life and is inherited through ``--init``.

A USCL run trained with labels stays label-trained when resumed with ``--label-rate 0`` and when another run starts
from its encoder; a run resumed on another store names both stores and every video it saw (`sonocl.provenance`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from reliability_support import random_store, run_cli

from conftest import tiny_pretrain, tiny_sets

PRETRAIN = tiny_pretrain("--threads", "1", "--device", "cpu", *tiny_sets(knn_frames=2))
KNN = ["--protocol", "knn", "--folds", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_store(tmp_path_factory.mktemp("lineage") / "store", ["a", "b"] * 5)


@pytest.fixture(scope="module")
def labelled(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """USCL with its semi-supervised term (the preset's label rate): refused by evaluate on this store."""
    from sonocl.cli import main

    out = tmp_path_factory.mktemp("lineage-run") / "uscl"
    assert main(["pretrain", "--store", str(store), "--method", "uscl", "--out", str(out), *PRETRAIN]) == 0
    assert json.loads((out / "provenance.json").read_text())["labels_used"]
    return out


def _provenance(run: Path) -> dict:
    return json.loads((run / "provenance.json").read_text())


def _refused(capsys, store: Path, run: Path, out: Path) -> None:
    outcome = run_cli(capsys, "evaluate", "--store", store, "--init", run, *KNN, "--out", out)
    assert outcome.code == 2 and "pretraining used the labels of" in outcome.err, outcome.err


def test_resuming_without_labels_keeps_the_labels_seen(store: Path, labelled: Path, tmp_path: Path, capsys) -> None:
    before = _provenance(labelled)
    outcome = run_cli(capsys, "pretrain", "--store", store, "--out", labelled, "--resume", "--label-rate", "0",
                      *PRETRAIN)  # fmt: skip
    assert outcome.code == 0, outcome.err
    after = _provenance(labelled)
    assert set(after["labels_used"]) >= set(before["labels_used"]) and after["label_columns"] == ["label"]
    _refused(capsys, store, labelled, tmp_path / "eval")


def test_a_run_started_from_a_labelled_encoder_inherits_its_labels(
    store: Path, labelled: Path, tmp_path: Path, capsys
) -> None:
    child = tmp_path / "child"
    outcome = run_cli(capsys, "pretrain", "--store", store, "--method", "simclr", "--init", labelled, "--out", child,
                      *PRETRAIN)  # fmt: skip
    assert outcome.code == 0, outcome.err
    provenance = _provenance(child)
    assert set(provenance["labels_used"]) == set(_provenance(labelled)["labels_used"])
    assert provenance["initialised_from"][0].startswith(str(labelled))
    _refused(capsys, store, child, tmp_path / "eval")
    # …and the exported bundle of the child carries it on.
    assert run_cli(capsys, "export", child, "--out", tmp_path / "bundle").code == 0
    _refused(capsys, store, tmp_path / "bundle", tmp_path / "eval-bundle")


def test_resuming_on_another_store_keeps_both(store: Path, tmp_path: Path, capsys) -> None:
    other = random_store(tmp_path / "other", ["a", "b"] * 5, seed=7)
    run = tmp_path / "run"
    simclr = ["--method", "simclr", *PRETRAIN]
    assert run_cli(capsys, "pretrain", "--store", store, "--out", run, *simclr).code == 0
    first = _provenance(run)
    outcome = run_cli(capsys, "pretrain", "--store", other, "--out", run, "--resume", *simclr, "--epochs", "2")
    assert outcome.code == 0, outcome.err
    both = _provenance(run)
    assert both["stores"] == [str(store.resolve()), str(other.resolve())]
    assert set(both["trained_on"]) > set(first["trained_on"])
