"""Disk full and other write failures, injected as ``OSError(ENOSPC)`` at the write, the flush or the rename.

What must hold each time: the command ends with one line naming the file whose write failed (exit 1),
the file that was there before is intact (byte for byte), no temporary file is left behind, a store
stays readable with every video committed before the failure, and a rerun once space is back completes.
"""

from __future__ import annotations

import builtins
import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
from reliability_support import (
    DISK_FULL,
    FillingFile,
    fill_on_open,
    good_video,
    ingest,
    line_naming,
    random_store,
    run_cli,
    smallest_pretrain,
    stored_ids,
)

import sonocl.data.ingest as ingest_module
import sonocl.data.ingest_workers as ingest_workers
import sonocl.data.store_writer as store_module
import sonocl.files as files_module
from sonocl.data.store import FRAMES_FILE, META_FILE, REPORT_FILE, VIDEOS_FILE, FrameStore
from sonocl.files import WriteFailedError, atomic_write_text


def _fail_replace_onto(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """``os.replace`` fails when its target is called ``name`` (the rename that would publish a new file)."""
    real = os.replace

    def replace(source: Any, target: Any) -> None:
        if Path(target).name == name:
            raise DISK_FULL
        real(source, target)

    monkeypatch.setattr(os, "replace", replace)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def videos(tmp_path: Path) -> Path:
    source = tmp_path / "videos"
    source.mkdir()
    for seed in range(5):
        good_video(source / f"v{seed}.mp4", seed=seed, frames=3 + seed)
    return source


def _assert_no_temporary_files(folder: Path) -> None:
    assert not [path.name for path in folder.rglob("*.tmp")]


@pytest.mark.parametrize("step", ["write", "rename"])
def test_atomic_write_keeps_the_previous_file(step: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "results.json"
    atomic_write_text(target, '{"good": true}\n')
    if step == "rename":
        _fail_replace_onto(monkeypatch, target.name)
    else:
        fill_on_open(monkeypatch, files_module, lambda path: path.name.endswith(".tmp"), room=4)
    with pytest.raises(
        WriteFailedError, match=f"{target}: writing failed \\(No space left on device\\); the file is unchanged"
    ):
        atomic_write_text(target, '{"good": false, "much": "longer"}\n')
    assert target.read_text() == '{"good": true}\n'
    _assert_no_temporary_files(tmp_path)


def test_new_store_header_write_fails(
    videos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _fail_replace_onto(monkeypatch, META_FILE)
    result = ingest(capsys, videos, "--out", tmp_path / "store", "--size", "32")
    assert result.code == 1
    assert "writing failed (No space left on device)" in line_naming(result.err, tmp_path / "store" / META_FILE)
    assert not (tmp_path / "store" / META_FILE).exists()
    _assert_no_temporary_files(tmp_path / "store")


def test_ingest_report_write_fails_and_the_previous_report_stays(
    videos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "store"
    assert ingest(capsys, videos / "v0.mp4", "--out", store, "--size", "32").code == 0
    report = _digest(store / REPORT_FILE)
    _fail_replace_onto(monkeypatch, REPORT_FILE)
    result = ingest(capsys, videos, "--out", store)
    assert result.code == 1
    assert "the file is unchanged" in line_naming(result.err, store / REPORT_FILE)
    assert _digest(store / REPORT_FILE) == report
    assert stored_ids(store) == [f"v{seed}" for seed in range(5)]
    _assert_no_temporary_files(store)


@pytest.mark.parametrize(("name", "room"), [(FRAMES_FILE, (7 + 6) * 32 * 32 + 100), (VIDEOS_FILE, 700)])
def test_store_append_fails_then_the_rerun_completes(
    name: str,
    room: int,
    videos: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The disk fills while frames or a video record are appended: the committed videos stay, byte for byte."""
    assert ingest(capsys, videos, "--out", tmp_path / "clean", "--size", "32").code == 0
    clean = FrameStore.open(tmp_path / "clean")
    store = tmp_path / "store"
    filled = fill_on_open(monkeypatch, store_module, lambda path: path.name == name, room=room)
    result = ingest(capsys, videos, "--out", store, "--size", "32")
    assert filled and result.code == 1
    line = line_naming(result.err, store / name)
    assert "failed (No space left on device)" in line and "committed before are intact" in line, line
    partial = FrameStore.open(store)
    assert 0 < partial.num_videos < 5 and (store / FRAMES_FILE).stat().st_size == partial.num_frames * 32 * 32
    assert (store / VIDEOS_FILE).read_bytes().endswith(b"\n")
    for index, video in enumerate(partial.videos):
        assert partial.video_frames(index).tobytes() == clean.video_frames(index).tobytes(), video.id
    monkeypatch.undo()
    assert ingest(capsys, videos, "--out", store).code == 0
    assert stored_ids(store) == [f"v{seed}" for seed in range(5)]


def test_worker_frame_file_write_fails_and_stops_the_ingest(
    videos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A full disk under the workers' frame files stops the run instead of skipping every source as broken."""
    fill_on_open(monkeypatch, ingest_workers, lambda path: path.parent.name == ingest_module.TEMP_DIR, room=0)
    result = ingest(capsys, videos, "--out", tmp_path / "store", "--size", "32")
    assert result.code == 1
    assert "No space left on device" in result.err and ingest_module.TEMP_DIR in result.err
    assert "skipped" not in result.err
    assert FrameStore.open(tmp_path / "store").num_videos == 0


@pytest.fixture()
def evaluated(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, Path]:
    store = random_store(tmp_path / "store", ["a", "b"] * 3)
    out = tmp_path / "eval"
    assert _evaluate(capsys, store, out).code == 0
    return store, out


def _evaluate(capsys: pytest.CaptureFixture[str], store: Path, out: Path) -> Any:
    return run_cli(
        capsys,
        "evaluate",
        "--store",
        store,
        "--init",
        "random",
        "--protocol",
        "knn",
        "--folds",
        "2",
        "--out",
        out,
        "--device",
        "cpu",
    )


def test_evaluate_results_write_fails_and_the_previous_results_stay(
    evaluated: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    store, out = evaluated
    before = _digest(out / "results.json")
    _fail_replace_onto(monkeypatch, "results.json")
    result = _evaluate(capsys, store, out)
    assert result.code == 1
    assert "the file is unchanged" in line_naming(result.err, out / "results.json")
    assert _digest(out / "results.json") == before
    _assert_no_temporary_files(out)


def test_evaluate_tables_write_fails_and_the_previous_tables_stay(
    evaluated: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    store, out = evaluated
    before = {name: _digest(out / name) for name in ("results.md", "predictions.csv")}
    real_open = builtins.open

    def open_filling(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        handle = real_open(file, mode, *args, **kwargs)
        name = Path(str(file)).name  # the table itself, or the temporary file that will replace it
        if "w" in mode and any(name == table or name.startswith(f".{table}.") for table in before):
            return FillingFile(handle, room=10)
        return handle

    monkeypatch.setattr(builtins, "open", open_filling)
    result = _evaluate(capsys, store, out)
    monkeypatch.undo()
    assert result.code == 1
    assert {name: _digest(out / name) for name in before} == before


def test_checkpoint_write_fails_with_one_line_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    store = random_store(tmp_path / "store", ["a", "b"] * 4)
    _fail_replace_onto(monkeypatch, "last.pt")
    result = run_cli(
        capsys,
        "pretrain",
        "--store",
        store,
        *smallest_pretrain(tmp_path / "run"),
    )
    assert result.code == 1
    assert "No space left on device" in line_naming(result.err, "last.pt")
    _assert_no_temporary_files(tmp_path / "run")
