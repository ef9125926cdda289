"""The transfer study's tables (benchmarks/transfer_study.py): records read from evaluation outputs, where each
encoder was pretrained on every row, the patient unit, pairs against random init at the same size."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def study():
    sys.path.insert(0, str(SCRIPTS))  # it imports pocus_study beside it
    spec = importlib.util.spec_from_file_location("transfer_study", SCRIPTS / "transfer_study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["transfer_study"] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules["transfer_study"]
    sys.path.remove(str(SCRIPTS))


def _results(root: Path, task: str, protocol: str, name: str, accuracies: list[float], unit: str, seen: int) -> None:
    runs = [
        {
            "seed": 0,
            "fold": fold,
            "seconds": 1.0,
            "test_video_ids": [f"v{fold}a", f"v{fold}b"],
            unit: {"accuracy": a, "balanced_accuracy": a, "macro_f1": a, "macro_auc": 0.5},
        }
        for fold, a in enumerate(accuracies)
    ]
    overlap = {"seen": seen, "test_videos": 10, "labels_seen": 0}
    out = root / "eval" / task / protocol / name
    out.mkdir(parents=True)
    (out / "results.json").write_text(
        json.dumps({"num_videos": 10, "inits": [{"runs": runs, "pretraining_overlap": overlap}]})
    )


def test_rows_say_where_they_were_pretrained_and_pair_with_random_init_at_their_size(study, tmp_path: Path) -> None:
    pocus = study.slug("POCUS 3-class")
    _results(tmp_path, pocus, "knn", "none-random", [0.70, 0.80, 0.75], "video", 0)
    _results(tmp_path, pocus, "knn", "blues-uscl-ssl", [0.80, 0.85, 0.80], "video", 0)  # +0.10, +0.05, +0.05
    _results(tmp_path, pocus, "knn", "pocus-uscl-ssl", [0.90, 0.90, 0.90], "video", 10)
    _results(tmp_path, pocus, "knn", "none@112-random", [0.50, 0.50, 0.50], "video", 0)
    _results(tmp_path, pocus, "knn", "blues@112-uscl-ssl", [0.60, 0.60, 0.60], "video", 0)
    covid = study.slug("BLUES COVID-19 per patient")
    _results(tmp_path, covid, "linear", "none-random", [0.6, 0.7], "patient", 0)
    records = study.collect(tmp_path)
    assert {r["size"] for r in records} == {64, 112} and {r["unit"] for r in records} == {"video", "patient"}
    text = study.tables(records)
    rows = {
        line.split(" | ")[0] + " | " + line.split(" | ")[1]: line for line in text.splitlines() if line.startswith("| ")
    }
    other = rows["| uscl-ssl | COVID-BLUES (other dataset): 0 of 10 test videos seen"]
    assert "+6.7 ± 1.7 (better)" in other and "†" not in other  # paired with random init at 64 px
    assert "| uscl-ssl | POCUS (same dataset): 10 of 10 test videos seen" in rows
    assert "+10.0 ± 0.0 (better)" in rows["| uscl-ssl @ 112 px | COVID-BLUES (other dataset): 0 of 10 test videos seen"]
    assert "| patient acc | patient bal. acc |" in text and "The paper's reference points" in text
    assert study.best_rows(tmp_path, study.TASKS[0], 2) == []  # no linear rows of POCUS: nothing to pick


def test_multi_source_rows_are_compared_with_each_single_source_by_fold(study, tmp_path: Path) -> None:
    pocus = study.slug("POCUS 3-class")
    _results(tmp_path, pocus, "linear", "none-random", [0.70, 0.70, 0.70], "video", 0)
    _results(tmp_path, pocus, "linear", "blues-uscl-ssl", [0.80, 0.70, 0.75], "video", 0)
    _results(tmp_path, pocus, "linear", "fold-uscl-ssl", [0.90, 0.85, 0.80], "video", 0)
    _results(tmp_path, pocus, "linear", "both-uscl-ssl", [0.85, 0.80, 0.75], "video", 0)
    text = study.tables(study.collect(tmp_path))
    rows = [line.split(" | ")[1] for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert rows == [
        "none",
        "COVID-BLUES (other dataset): 0 of 10 test videos seen",
        "POCUS (same dataset), per fold: 0 of 10 test videos seen",
        "both corpora, per fold: 0 of 10 test videos seen",
    ]
    # both − BLUES: +0.05, +0.10, +0.00; both − POCUS per fold: −0.05 on every fold
    line = next(line for line in text.splitlines() if line.startswith("Multi-source"))
    assert "pretrained on COVID-BLUES +5.0 ± 2.9 (inside the noise)" in line
    assert "on POCUS per fold -5.0 ± 0.0 (worse)" in line


def test_records_of_rows_run_in_an_earlier_session_are_kept(study) -> None:
    old = {"task": "POCUS 3-class", "protocol": "knn", "method": "simclr", "pretrained_on": "blues", "size": 64}
    again = {**old, "method": "uscl-ssl"}
    stored = [{**old, "fold": 0, "accuracy": 0.7}, {**again, "fold": 0, "accuracy": 0.1}]
    measured = [{**again, "fold": 0, "accuracy": 0.8}]
    assert study.merge(measured, stored) == [stored[0], measured[0]]  # a row measured again replaces its old records
