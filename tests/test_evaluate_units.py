"""`sonocl evaluate` on labels other than the video's class: merged classes, labels read from a CSV with stray
spaces, and labels that belong to a patient, scored per patient (``--unit patient``)."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from sonocl.cli import main
from sonocl.data.phantom import make_phantom, write_phantom_store
from sonocl.data.store import FrameStore
from sonocl.errors import ConfigError
from sonocl.evaluate.config import EvalConfig
from sonocl.evaluate.data import load_eval_data

TINY = dict(size=32, epochs=2, batch_size=16, folds=3, fps=0, frames_per_video=6, device="cpu")


def _config(**overrides) -> EvalConfig:
    return EvalConfig.from_recipe("meta-uscl", **{**TINY, **overrides})


def test_classes_merge_without_reingesting(phantom_store) -> None:
    data = load_eval_data(phantom_store, _config(classes=("covid", "other=pneumonia+regular")))
    assert data.class_names == ["covid", "other"] and len(data.video_ids) == 12
    labels = dict(zip(data.video_ids, data.video_labels.tolist()))
    for video in phantom_store.videos:
        assert labels[video.id] == (0 if video.label == "covid" else 1), video.id
    unnamed = load_eval_data(phantom_store, _config(classes=("regular", "covid+pneumonia")))
    assert unnamed.class_names == ["regular", "covid+pneumonia"]
    with pytest.raises(ConfigError, match=r"label 'covid' is in two classes"):
        load_eval_data(phantom_store, _config(classes=("covid", "covid+regular")))
    with pytest.raises(
        ConfigError, match=r"no videos labelled \['viral'\]; labels are \['covid', 'pneumonia', 'regular'\]"
    ):
        load_eval_data(phantom_store, _config(classes=("covid", "regular+viral")))


def _patient_store(root: Path, covid_of_patient: dict[str, str], b_lines: Callable[[int], str]) -> FrameStore:
    """Phantom videos (two or more per patient) with a per-patient ``covid`` label and ``b_lines(video index)``."""
    return write_phantom_store(
        root,
        make_phantom(16, 8, 32, seed=3),
        32,
        extra_labels=lambda index, video: {
            "covid": covid_of_patient.get(video.patient, "negative"),
            "b_lines": b_lines(index),
        },
    )


def test_a_patient_label_is_scored_per_patient_from_its_videos_frames(tmp_path: Path, capsys) -> None:
    patients = sorted({video.patient for video in make_phantom(16, 8, 32, seed=3)})
    covid = {patient: ("positive" if i % 2 else "negative") for i, patient in enumerate(patients)}
    store = _patient_store(tmp_path / "store", covid, lambda index: "yes")
    out = tmp_path / "eval"
    argv = ["evaluate", "--store", str(store.root), "--init", "random", "--label-column", "covid", "--unit", "patient",
            "--protocol", "knn", "--folds", "2", "--size", "32", "--fps", "0", "--frames-per-video", "4",
            "--device", "cpu", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    entry = results["inits"][0]
    assert results["config"]["unit"] == "patient" and entry["unit"] == "patient"
    assert set(entry["summary"]) == {"frame", "video", "patient"}
    assert sum(run["patient"]["n"] for run in entry["runs"]) == len(patients)  # each patient tested once
    assert all(run["patient"]["n"] == run["test_patients"] for run in entry["runs"])
    # The patient's prediction is the mean of its frames' probabilities: recomputed from predictions.csv.
    patient_of = {video.id: video.group for video in store.videos}
    rows = list(csv.DictReader(open(out / "predictions.csv", newline="")))
    classes = results["classes"]
    sums: dict[str, np.ndarray] = {}
    truth: dict[str, str] = {}
    for row in rows:
        patient = patient_of[row["video_id"]]
        sums[patient] = sums.get(patient, 0) + np.array([float(row[f"p_{name}"]) for name in classes])
        truth[patient] = row["label"]
    correct = sum(classes[int(np.argmax(sums[p]))] == truth[p] for p in sums)
    pooled = entry["pooled"]["patient"]
    assert pooled["n"] == len(patients) and pooled["accuracy"] == pytest.approx(correct / len(patients), abs=1e-9)
    table = (out / "results.md").read_text()
    assert "patient acc" in table and "Scored per patient" in table and "pooled patient acc" in table
    assert "patient acc" in capsys.readouterr().err


def test_the_patient_unit_refuses_what_it_cannot_score(tmp_path: Path) -> None:
    store = _patient_store(tmp_path / "store", {}, lambda index: ("yes", "no")[index % 2])
    assert len({video.group for video in store.videos}) < store.num_videos  # some patient has two videos
    with pytest.raises(ConfigError, match=r"one 'b_lines' class per patient, but videos \S+ and \S+ of one patient"):
        load_eval_data(store, _config(label_column="b_lines", unit="patient", group_by="group", folds=2))
    with pytest.raises(ConfigError, match="--unit patient .* use --group-by group"):
        _config(unit="patient", group_by="video")


def test_stray_spaces_of_a_label_csv_are_one_value(phantom_dataset: Path, tmp_path: Path) -> None:
    """COVID-BLUES writes some B-lines values as ``yes `` and ``no ``: the same classes as ``yes`` and ``no``."""
    rows = list(csv.DictReader(open(phantom_dataset / "labels.csv", newline="")))
    spelled = ["yes", "yes ", "no", "no "]
    with open(tmp_path / "labels.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*rows[0], "b_lines"])
        writer.writeheader()
        for index, row in enumerate(rows):
            writer.writerow({**row, "b_lines": spelled[index % 4]})
    store = tmp_path / "store"
    argv = ["ingest", str(phantom_dataset / "videos"), "--out", str(store), "--size", "32",
            "--labels", str(tmp_path / "labels.csv"), "--extra-columns", "b_lines", "--workers", "1"]  # fmt: skip
    assert main(argv) == 0
    values = FrameStore.open(store).label_column("b_lines")
    assert sorted(set(values)) == ["no", "yes"] and len(values) == len(rows)


def test_the_folds_do_not_depend_on_the_order_ingest_committed_the_videos_in(tmp_path: Path) -> None:
    """Ingest commits videos as its workers finish them: the same videos in another order give the same folds."""
    from sonocl.evaluate.data import fold_splits

    videos = make_phantom(12, 4, 32, seed=5)
    folds = []
    for name, order in (("forward", videos), ("backward", videos[::-1])):  # groups hashed with another salt each
        store = write_phantom_store(
            tmp_path / name, order, 32, group=lambda video, salt=name: f"{salt}-{video.patient}"
        )
        data = load_eval_data(store, _config(group_by="group"))
        folds.append([sorted(data.video_ids[v] for v in test) for _, test in fold_splits(data, _config(), seed=0)])
    assert folds[0] == folds[1]
