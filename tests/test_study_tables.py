"""The POCUS study's tables (benchmarks/pocus_study.py): paired differences, equal budgets, the best row."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "pocus_study.py"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("pocus_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["pocus_study"] = module  # its dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    del sys.modules["pocus_study"]


def _records(study, row: str, accuracies: list[float], protocol: str = "knn", **extra) -> list[dict]:
    pretrained = row != "random"
    steps = extra.pop("steps", study.STEPS)
    return [
        {
            "row": row,
            "init": "pretrained" if pretrained else "random",
            "protocol": protocol,
            "budget_pairs": steps * study.BATCH if pretrained else None,
            "pretraining": extra.get("pretraining", "transductive" if pretrained else "none"),
            "seed": 0,
            "fold": fold,
            "video_accuracy": accuracy,
            "frame_accuracy": accuracy,
            "video_balanced_accuracy": accuracy,
            "video_macro_f1": accuracy,
            "video_auc": None,
            "max_test_frame_accuracy": extra.get("max_test"),
            "test_frames": extra.get("test_frames", 100),
            "test_digest": extra.get("digest", f"fold{fold}"),
        }
        for fold, accuracy in enumerate(accuracies)
    ]


def test_paired_delta_is_the_mean_fold_difference_with_its_standard_error(study) -> None:
    random = _records(study, "random", [0.70, 0.80, 0.75, 0.60])
    mine = _records(study, "uscl-ssl", [0.90, 0.86, 0.95, 0.70])
    baseline = study._by_fold(random, "random")
    differences = [0.20, 0.06, 0.20, 0.10]  # mean +14.0, SE 3.6 points
    mean = sum(differences) / 4
    se = math.sqrt(sum((d - mean) ** 2 for d in differences) / 3) / 2
    assert study._paired_delta(mine, baseline) == f"{100 * mean:+.1f} ± {100 * se:.1f} (better)"
    noisy = _records(study, "simclr", [0.60, 0.90, 0.70, 0.70])  # differences −0.1, +0.1, −0.05, +0.1
    assert study._paired_delta(noisy, baseline).endswith("(inside the noise)")
    assert study._paired_delta(random, baseline) == "+0.0 ± 0.0 (inside the noise)"  # the same accuracy on every fold


def test_a_difference_is_marked_unless_both_rows_tested_the_same_videos_in_each_fold(study) -> None:
    random = _records(study, "random", [0.70, 0.80, 0.75, 0.60])
    other_ingest = _records(study, "uscl-ssl", [0.90, 0.86, 0.95, 0.70], digest="another store's fold")
    unknown = _records(study, "uscl-ssl", [0.90, 0.86, 0.95, 0.70], digest=None)
    baseline = study._by_fold(random, "random")
    for mine in (other_ingest, unknown):
        assert study._paired_delta(mine, baseline).endswith("(better) †")
    text = study.tables([*random, *unknown])
    assert "| uscl-ssl |" in text and "† Not known to be paired" in text
    assert "†" not in study.tables([*random, *_records(study, "uscl-ssl", [0.9, 0.86, 0.95, 0.7])])
    run = {"test_video_ids": ["b", "a"]}
    assert (
        study.test_digest(run)
        == study.test_digest({"test_video_ids": ["a", "b"]})
        != study.test_digest({"test_video_ids": ["a"]})
    )


def test_main_tables_hold_one_budget_and_the_curve_its_own_table(study) -> None:
    records = [
        *_records(study, "random", [0.70, 0.80, 0.75]),
        *_records(study, "uscl-ssl", [0.90, 0.85, 0.95]),
        *_records(study, "uscl-ssl @ 250 steps", [0.80, 0.82, 0.84], steps=250),
        *_records(study, "uscl-ssl @ 1,000 steps", [0.91, 0.86, 0.97], steps=1000),
    ]
    text = study.tables(records)
    main, curve = text.split("### budget curve")
    assert "uscl-ssl @" not in main  # rows of another budget never share a table with the 500-step rows
    assert "| uscl-ssl | transductive | 16,000 | 3 |" in main
    steps_column = [line.split(" | ")[0] for line in curve.splitlines() if line.startswith("| ") and "---" not in line]
    assert steps_column[1:] == ["| 0", "| 250", "| 500", "| 1000"]  # random init as step 0, then by budget


def test_the_papers_max_test_number_pools_the_frames_of_every_fold_run(study) -> None:
    """USCL's number sums the best-epoch confusion matrices: a fold with more frames weighs more."""
    small = _records(study, "uscl-ssl", [0.8], protocol="last-block", max_test=0.5, test_frames=100)
    large = _records(study, "uscl-ssl", [0.9], protocol="last-block", max_test=0.9, test_frames=300)
    assert study._pooled_max_test(small + large) == "80.0"  # (50 + 270) / 400, not the fold mean 70.0
    assert study._pooled_max_test(_records(study, "random", [0.7], protocol="last-block")) == "–"


def test_the_best_row_ignores_leaks_and_other_budgets(study) -> None:
    records = [
        *_records(study, "random", [0.99, 0.99]),
        *_records(study, "uscl-semi (label leak)", [0.97, 0.97], pretraining="LABEL LEAK: …"),
        *_records(study, "uscl-ssl @ 2,000 steps", [0.96, 0.96], steps=2000),
        *_records(study, "uscl-ssl", [0.85, 0.87]),
        *_records(study, "simclr", [0.80, 0.95], protocol="linear"),  # only kNN picks the row
        *_records(study, "simclr", [0.70, 0.72]),
    ]
    assert study.best_row(records).name == "uscl-ssl"


def test_orderings_pair_the_two_rows_by_fold_and_skip_unmeasured_ones(study) -> None:
    records = [
        *_records(study, "simclr", [0.70, 0.80, 0.75]),
        *_records(study, "uscl-ssl", [0.90, 0.86, 0.95]),  # differences +0.20, +0.06, +0.20
    ]
    lines = study._orderings_table(records)
    rows = [line for line in lines if line.startswith("| USCL")]
    assert rows == ["| USCL ≥ SimCLR (USCL paper) | uscl-ssl − simclr | +15.3 ± 4.7 (better) |"]
    assert not any("Meta-USCL ≥ USCL" in line for line in lines)  # meta-uscl not measured: no row


def test_transfer_table_pairs_the_encoder_with_random_init_by_fold(study, tmp_path: Path) -> None:
    def init(name: str, hc_errors: list[float], dice: list[float]) -> dict:
        folds = [
            {"fold": k, "metrics": {"dice": {"mean": d}, "hd95_mm": {"mean": 2.0}, "hc_abs_error_mm": {"mean": e}}}
            for k, (e, d) in enumerate(zip(hc_errors, dice))
        ]
        pooled = {"dice": {"median": 0.97}, "hd95_mm": {"median": 1.5}, "hc_abs_error_mm": {"median": 1.6}}
        return {"name": name, "folds": folds, "pooled": pooled}

    results = {"inits": [init("random", [3.0, 4.0], [0.95, 0.96]), init("uscl (POCUS)", [2.0, 3.5], [0.96, 0.96])]}
    (tmp_path / "transfer").mkdir()
    (tmp_path / "transfer" / "results.json").write_text(json.dumps(results))
    rows = [
        line for line in study._transfer_table(tmp_path, []) if line.startswith("| random") or line.startswith("| uscl")
    ]
    assert rows[0] == "| random | 0.955 ± 0.007 (0.970) | 2.00 ± 0.00 (1.50) | 3.50 ± 0.71 (1.60) | – | – |"
    # differences by fold: Dice +0.01, 0.00 (mean +0.005, SE 0.005); HC −1.0, −0.5 (mean −0.75, SE 0.25)
    assert rows[1].endswith("| +0.005 ± 0.005 | -0.75 ± 0.25 |")
    assert study._transfer_table(tmp_path / "nowhere", []) == []
    stored = ["### transfer: HC18 segmentation", "| random | … |"]
    assert study._transfer_table(tmp_path / "nowhere", stored) == stored  # no run here: the stored table stays
