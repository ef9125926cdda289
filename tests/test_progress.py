"""Progress reports: a tqdm bar on a terminal, whole lines with the same figures in a log, no carriage return in a
command's output written to a file."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tqdm import tqdm

from sonocl import progress as progress_module
from sonocl.progress import LineProgress, progress_report


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_gets_a_tqdm_bar_and_a_log_gets_lines() -> None:
    terminal, log = _Terminal(), io.StringIO()
    with progress_report(4, "epoch 1/2", "step", file=terminal) as bar:
        assert isinstance(bar, tqdm)
        bar.update(4)
    assert "\r" in terminal.getvalue()
    with progress_report(4, "epoch 1/2", "step", file=log) as bar:
        assert isinstance(bar, LineProgress)
        bar.update(4)
    assert log.getvalue() == log.getvalue().replace("\r", "") != ""


def test_lines_at_every_tenth_with_tqdms_figures_and_the_postfix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress_module, "LINE_MIN_SECONDS", 0.0)
    log = io.StringIO()
    with progress_report(50, "epoch 1/3", "step", file=log) as bar:
        for step in range(50):
            bar.set_postfix(loss=1.0 / (step + 1), lr="3e-4", refresh=False)
            bar.update(1)
        bar.set_postfix({"test_acc": "0.812"})
    lines = log.getvalue().splitlines()
    assert [line.split()[3] for line in lines[:10]] == [f"{5 * k}/50" for k in range(1, 11)]
    assert lines[0].startswith("epoch 1/3:  10% 5/50 [") and "step/s, loss=0.2, lr=3e-4]" in lines[0]
    assert lines[-1].startswith("epoch 1/3: 100% 50/50 [") and lines[-1].endswith(", test_acc=0.812]")
    assert len(lines) == 11  # ten tenths, then the final postfix on close


def test_fast_loops_log_only_the_end_and_slow_ones_log_every_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    fast = io.StringIO()
    with progress_report(1000, "fast", "it", file=fast) as bar:
        for _ in range(1000):
            bar.update(1)
    assert fast.getvalue().count("\n") == 1 and fast.getvalue().startswith("fast: 100% 1000/1000 [")
    monkeypatch.setattr(progress_module, "LINE_SECONDS", 0.0)
    open_ended = io.StringIO()
    with progress_report(None, "scan", "file", file=open_ended) as bar:
        bar.update(2)
        bar.update(3)
    lines = open_ended.getvalue().splitlines()
    assert [line.split()[:2] for line in lines] == [["scan:", "2"], ["scan:", "5"]] and "file/s]" in lines[-1]


def test_disabled_report_prints_only_messages_and_a_resumed_one_counts_from_initial() -> None:
    log = io.StringIO()
    with progress_report(10, "quiet", file=log, enabled=False) as bar:
        bar.update(10)
        bar.write("skipped a.mp4: unreadable", file=log)
    assert log.getvalue() == "skipped a.mp4: unreadable\n"
    resumed = io.StringIO()
    with progress_report(10, "epoch 2/2", "step", initial=7, file=resumed) as bar:
        bar.update(3)
    assert resumed.getvalue().startswith("epoch 2/2: 100% 10/10 [")
    empty = io.StringIO()
    with progress_report(0, "knn", "epoch", file=empty):
        pass
    assert empty.getvalue() == ""


def _sonocl_to_file(tmp_path: Path, *argv: str) -> str:
    log = tmp_path / "log.txt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(log, "w") as handle:
        subprocess.run(
            [sys.executable, "-m", "sonocl", *argv],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=env,
            check=True,
            timeout=300,
        )
    return log.read_text()


def test_embed_and_ingest_written_to_a_file_have_no_carriage_return(
    phantom_store, phantom_dataset: Path, tmp_path: Path
) -> None:
    embedded = _sonocl_to_file(
        tmp_path,
        "embed",
        "--store",
        str(phantom_store.root),
        "--init",
        "random",
        "--size",
        "32",
        "--out",
        str(tmp_path / "e.npz"),
        "--device",
        "cpu",
    )
    assert "\r" not in embedded
    frames = phantom_store.num_frames
    assert f"embed: 100% {frames}/{frames} [" in embedded and "frame/s]" in embedded
    ingested = _sonocl_to_file(
        tmp_path,
        "ingest",
        str(phantom_dataset / "videos"),
        "--out",
        str(tmp_path / "store"),
        "--size",
        "32",
        "--workers",
        "1",
    )
    assert "\r" not in ingested
    assert "ingest: 100% 9/9 [" in ingested and "9 added" in ingested
