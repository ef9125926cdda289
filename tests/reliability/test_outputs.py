"""Nothing a user had is lost: every command that writes claims its --out first (`sonocl.outputs`).

A command writes only into a new or empty folder, or one it made itself; any other folder is refused in one line
naming it, before anything is written, and its files stay as they were. ``--overwrite`` writes into it anyway,
replacing only files of the same names. A read-only destination is one line naming it. Files: ``report`` and
``embed`` replace an existing file only when sonocl wrote it.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from reliability_support import good_video, line_naming, random_store, run_cli, smallest_pretrain

from sonocl import outputs

KNN = ["--protocol", "knn", "--folds", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_store(tmp_path_factory.mktemp("outputs") / "store", ["a", "b"] * 4)


@pytest.fixture(scope="module")
def run(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished one-epoch SimCLR run (its own folder)."""
    from sonocl.cli import main

    out = tmp_path_factory.mktemp("outputs-run") / "run"
    assert main(["pretrain", "--store", str(store), *map(str, smallest_pretrain(out))]) == 0
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four 40-pixel images with masks, for ``segment``."""
    root = tmp_path_factory.mktemp("outputs-images")
    rng = np.random.default_rng(0)
    for index in range(4):
        Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(root / f"{index}.png")
        mask = np.zeros((40, 40), dtype=np.uint8)
        mask[10:30, 10 + index : 30] = 255
        Image.fromarray(mask).save(root / f"{index}_mask.png")
    return root


def _commands(store: Path, run: Path, images: Path, sources: Path, out: Path) -> dict[str, list[str | Path]]:
    """Each command that writes a folder, writing it to ``out``."""
    study = "--method simclr --steps 1 --batch-size 4 --size 32"
    segment = "--init random --folds 2 --size 32 --epochs 1 --device cpu".split()
    return {
        "ingest": ["ingest", sources, "--out", out, "--size", "32", "--workers", "1"],
        "pretrain": ["pretrain", "--store", store, *smallest_pretrain(out)],
        "evaluate": ["evaluate", "--store", store, "--init", "random", *KNN, "--out", out],
        "study": ["study", "--store", store, "--pretrain", study, *KNN, "--out", out],
        "segment": ["segment", "--images", images, *segment, "--out", out],
        "export": ["export", run, "--out", out],
        "demo": ["demo", "--out", out, "--videos", "10", "--frames", "4", "--steps", "1"],
    }


COMMANDS = ("ingest", "pretrain", "evaluate", "study", "segment", "export", "demo")


@pytest.fixture
def sources(tmp_path: Path) -> Path:
    (tmp_path / "sources").mkdir()
    good_video(tmp_path / "sources" / "scan.mp4")
    return tmp_path / "sources"


@pytest.mark.parametrize("command", COMMANDS)
def test_a_folder_holding_a_users_files_is_refused_and_kept(
    command: str, store: Path, run: Path, images: Path, sources: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "project"
    (out / "data").mkdir(parents=True)
    (out / "data" / "scans.txt").write_text("x")
    (out / "frames.u8").write_bytes(b"mine")
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}

    outcome = run_cli(capsys, *_commands(store, run, images, sources, out)[command])

    assert outcome.code == 2, outcome.err
    line = line_naming(outcome.err, out)
    assert "not empty" in line and "--overwrite" in line or "not made by" in line, line
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == before


def test_overwrite_writes_into_the_folder_and_touches_nothing_else(sources: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "project"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    outcome = run_cli(capsys, "ingest", sources, "--out", out, "--size", "32", "--workers", "1", "--overwrite")
    assert outcome.code == 0, outcome.err
    assert (out / "notes.txt").read_text() == "mine" and (out / "store.json").is_file()
    # The folder is now a store: appending to it needs no flag.
    assert run_cli(capsys, "ingest", sources, "--out", out, "--size", "32", "--workers", "1").code == 0


def test_an_output_of_another_kind_is_refused(store: Path, run: Path, tmp_path: Path, capsys) -> None:
    outcome = run_cli(capsys, "evaluate", "--store", store, "--init", "random", *KNN, "--out", run)
    assert outcome.code == 2
    assert "holds a sonocl pretraining run" in line_naming(outcome.err, run)


def test_a_store_made_before_the_marker_is_recognised(sources: Path, tmp_path: Path, capsys) -> None:
    """Folders that an older sonocl wrote (no marker) are adopted when they hold only that command's files."""
    old = random_store(tmp_path / "old", ["a", "b"])  # written directly: no marker, as by an older sonocl
    assert outputs.marker_kind(old) is None
    outcome = run_cli(capsys, "ingest", sources, "--out", old, "--size", "32", "--workers", "1")
    assert outcome.code == 0, outcome.err
    assert outputs.marker_kind(old) == outputs.STORE.name


def test_a_finished_run_without_checkpoints_is_neither_replaced_nor_resumed(
    store: Path, tmp_path: Path, capsys
) -> None:
    from sonocl.cli import main

    out = tmp_path / "run"
    assert main(["pretrain", "--store", str(store), *map(str, smallest_pretrain(out))]) == 0
    for checkpoint in (out / "checkpoints").iterdir():
        checkpoint.unlink()
    before = {name: (out / name).read_bytes() for name in ("encoder.safetensors", "metrics.csv", "config.yaml")}
    for extra in ([], ["--resume"]):
        outcome = run_cli(capsys, "pretrain", "--store", store, *smallest_pretrain(out), *extra)
        assert outcome.code == 2
        assert "finished run" in line_naming(outcome.err, out)
    assert {name: (out / name).read_bytes() for name in before} == before


@pytest.mark.parametrize("command", ["report", "embed"])
def test_a_file_sonocl_did_not_write_is_not_replaced(
    command: str, store: Path, run: Path, tmp_path: Path, capsys
) -> None:
    target = tmp_path / ("page.html" if command == "report" else "table.npz")
    target.write_bytes(b"my own file")
    argv: list[str | Path] = (
        ["report", run, "--out", target]
        if command == "report"
        else ["embed", "--store", store, "--init", "random", "--size", "32", "--device", "cpu", "--out", target]
    )
    outcome = run_cli(capsys, *argv)
    assert outcome.code == 2
    assert "not written by sonocl" in line_naming(outcome.err, target)
    assert target.read_bytes() == b"my own file"
    if command == "embed":  # what sonocl wrote, a rerun replaces
        assert run_cli(capsys, *argv, "--overwrite").code == 0
        assert run_cli(capsys, *argv).code == 0


def test_the_demo_removes_only_what_an_earlier_demo_made(tmp_path: Path, capsys) -> None:
    """A rerun replaces the earlier demo's outputs, unless one of them holds anything else: then nothing goes."""
    out = outputs.claim(tmp_path / "demo", outputs.DEMO)
    evaluation = outputs.claim(out / "evaluation-knn", outputs.EVALUATION)
    (evaluation / "results.json").write_text("{}")
    store = outputs.claim(out / "store", outputs.STORE)
    (store / "my-notes.txt").write_text("mine")
    outcome = run_cli(capsys, "demo", "--out", out, "--videos", "10", "--frames", "4")
    assert outcome.code == 2
    assert "not made by an earlier `sonocl demo`" in line_naming(outcome.err, store)
    assert (store / "my-notes.txt").read_text() == "mine" and (evaluation / "results.json").exists()


@pytest.mark.parametrize("command", ["ingest", "pretrain", "evaluate", "export"])
def test_a_read_only_destination_is_one_line(
    command: str,
    store: Path,
    run: Path,
    images: Path,
    sources: Path,
    tmp_path: Path,
    capsys,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The file system refuses every new folder under ``locked/`` (as a read-only mount does, also for root)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real_mkdir = os.mkdir

    def read_only(path: str | os.PathLike[str], *args: object, **kwargs: object) -> None:
        if str(path).startswith(str(locked)):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        real_mkdir(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "mkdir", read_only)
    out = locked / "out"
    outcome = run_cli(capsys, *_commands(store, run, images, sources, out)[command])
    assert outcome.code == 1, outcome.err
    assert "Read-only file system" in line_naming(outcome.err, out)
