"""benchmarks/paired_results.py: two evaluation outputs paired by fold, and refused where a fold's test videos differ."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "paired_results.py"


def _results(path: Path, label: str, accuracies: list[float], tests: list[list[str]]) -> Path:
    runs = [
        {"seed": 0, "fold": fold, "test_video_ids": ids, "video": {"accuracy": acc}, "frame": {"accuracy": acc}}
        for fold, (acc, ids) in enumerate(zip(accuracies, tests, strict=True))
    ]
    path.mkdir()
    (path / "results.json").write_text(json.dumps({"inits": [{"label": label, "runs": runs}]}))
    return path / "results.json"


def _run(*args: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)


def test_the_difference_is_paired_by_fold(tmp_path):
    tests = [["a", "b"], ["c"], ["d", "e"]]
    first = _results(tmp_path / "a", "first", [0.5, 0.6, 0.7], tests)
    second = _results(tmp_path / "b", "today", [0.6, 0.8, 0.7], [list(reversed(ids)) for ids in tests])
    done = _run(first, second)
    assert done.returncode == 0, done.stderr
    # differences 0.1, 0.2, 0.0: mean 0.1, std 0.1, SE 0.1 / √3 = 0.0577
    assert "today − first: +10.0 ± 5.8 (inside the noise); lower on 0 of 3 folds" in done.stdout
    assert "first: video accuracy 60.0 ± 10.0 over 3 folds" in done.stdout


def test_folds_that_tested_other_videos_are_not_paired(tmp_path):
    first = _results(tmp_path / "a", "first", [0.5, 0.6], [["a"], ["b"]])
    second = _results(tmp_path / "b", "today", [0.6, 0.8], [["a"], ["c"]])
    done = _run(first, second)
    assert done.returncode != 0
    assert "(0, 1)" in done.stderr and "different videos" in done.stderr
