"""Kill and resume: ``sonocl ingest`` and ``sonocl pretrain`` killed with SIGKILL at random moments, then run again.

Each trial starts a fresh ingest in a subprocess and kills it: two trials early (while it starts up and
creates the store), the others a random few milliseconds after a random number of videos went in, so
that the kill lands while frames are appended, a record is written or a worker decodes. After every
kill the store must open, each video in it must hold exactly the frames of an uninterrupted ingest, and
a rerun must complete with every video exactly once. The moments are drawn from a fixed seed, so a
failure can be replayed. A pretraining run killed after a checkpoint and resumed with ``--resume`` must end
with exactly the weights of an uninterrupted run (CPU, ``--deterministic``).
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from reliability_support import good_video, ingest, random_store, smallest_pretrain
from safetensors.torch import load_file

from sonocl.data.ingest import TEMP_DIR
from sonocl.data.store import FRAMES_FILE, META_FILE, VIDEOS_FILE, FrameStore
from sonocl.train.checkpoint import load_checkpoint

VIDEOS = 20
SIZE = 32
EARLY_TRIALS = 2
COMMIT_TRIALS = 6
LEFT_AFTER_COMMITS = 8
"""A commit trial kills with at least this many videos still to ingest: with 2 workers the last videos commit about
2 ms apart and the process exits about 20 ms after its last commit, so fewer left could all be done before the kill."""


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("kill") / "videos"
    folder.mkdir()
    for index in range(VIDEOS):
        good_video(folder / f"clip{index:02d}.mp4", seed=index, frames=10 + index % 5)
    return folder


@pytest.fixture(scope="module")
def reference(source: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Frames of every video after an uninterrupted ingest, by id."""
    store_dir = tmp_path_factory.mktemp("reference") / "store"
    from sonocl.cli import main

    assert main(["ingest", str(source), "--out", str(store_dir), "--size", str(SIZE), "--workers", "1"]) == 0
    store = FrameStore.open(store_dir)
    return {video.id: store.video_frames(index).tobytes() for index, video in enumerate(store.videos)}


def _start(source: Path, store: Path, workers: int) -> subprocess.Popen[bytes]:
    command = [
        sys.executable,
        "-m",
        "sonocl",
        "ingest",
        str(source),
        "--out",
        str(store),
        "--size",
        str(SIZE),
        "--workers",
        str(workers),
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment, start_new_session=True
    )


def _committed(store: Path) -> int:
    try:
        return (store / VIDEOS_FILE).read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _kill(process: subprocess.Popen[bytes]) -> bool:
    """SIGKILL the ingest (its decoder processes too, as a crash of the machine would); whether it was still running."""
    if process.poll() is not None:
        return False
    os.killpg(
        process.pid, signal.SIGKILL
    )  # the group this test started (start_new_session); its leader is not reaped yet
    process.wait()
    return process.returncode == -signal.SIGKILL


def _check_store_after_kill(store: Path, reference: dict[str, bytes]) -> int:
    """The killed store opens and every committed video is whole; returns how many were committed."""
    if not (store / META_FILE).exists():
        return 0
    partial = FrameStore.open(store)
    ids = [video.id for video in partial.videos]
    assert len(ids) == len(set(ids))
    for index, video in enumerate(partial.videos):
        assert partial.video_frames(index).tobytes() == reference[video.id], video.id
    return partial.num_videos


def _trials() -> list[tuple[str, float, int, int]]:
    """``(kind, seconds to wait, videos committed first, workers)`` per trial, from a fixed seed."""
    rng = np.random.default_rng(2024)
    early = [("early", float(rng.uniform(0.0, 0.6)), 0, 1 + trial % 2) for trial in range(EARLY_TRIALS)]
    commit = [
        ("commit", float(rng.uniform(0.0, 0.01)), int(rng.integers(1, VIDEOS - LEFT_AFTER_COMMITS + 1)), 1 + trial % 2)
        for trial in range(COMMIT_TRIALS)
    ]
    return early + commit


def _trial_id(trial: tuple[str, float, int, int]) -> str:
    kind, wait, after, workers = trial
    moment = f"after-{after}-videos+{wait * 1000:.0f}ms" if kind == "commit" else f"at-{wait * 1000:.0f}ms"
    return f"{moment}-{workers}-workers"


@pytest.mark.parametrize(("kind", "wait", "after", "workers"), _trials(), ids=[_trial_id(trial) for trial in _trials()])
def test_sigkill_at_a_random_moment_then_rerun_completes(
    kind: str,
    wait: float,
    after: int,
    workers: int,
    source: Path,
    reference: dict[str, bytes],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    store = tmp_path / "store"
    process = _start(source, store, workers)
    deadline = time.monotonic() + 120
    while kind == "commit" and _committed(store) < after and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    time.sleep(wait)
    killed = _kill(process)
    assert killed, "the ingest finished before it could be killed; give it more videos"
    committed = _check_store_after_kill(store, reference)
    if kind == "commit":
        assert committed >= after

    result = ingest(capsys, source, "--out", store, "--size", str(SIZE), workers=workers)
    assert result.code == 0, result.err
    assert f"{VIDEOS - committed} added, {committed} already in store" in result.out
    store_now = FrameStore.open(store)
    assert sorted(video.id for video in store_now.videos) == sorted(reference)
    for index, video in enumerate(store_now.videos):
        assert store_now.video_frames(index).tobytes() == reference[video.id], video.id
    assert (store / FRAMES_FILE).stat().st_size == store_now.num_frames * SIZE * SIZE
    assert not (store / TEMP_DIR).exists()


# ---- pretraining: killed, resumed with --resume, ends where an uninterrupted run ends ---------------------------


@pytest.fixture(scope="module")
def pretrain_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_store(tmp_path_factory.mktemp("pretrain") / "store", ["a", "b"] * 4)


def _encoder_tensors(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "encoder.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(pretrain_store: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    completed = subprocess.run(_pretrain_command(pretrain_store, run), capture_output=True, env=_single_thread())
    assert completed.returncode == 0, completed.stderr.decode()
    return _encoder_tensors(run)


def _single_thread() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _pretrain_command(store: Path, run: Path, *extra: str) -> list[str]:
    options = [*smallest_pretrain(run, epochs=2), "--deterministic", "--checkpoint-every-steps", "3", *extra]
    return [sys.executable, "-m", "sonocl", "pretrain", "--store", str(store), *map(str, options)]


def _kill_and_resume(store: Path, run: Path, moment: str, wait: float) -> Path:
    """Pretrain into ``run``, SIGKILL it (``moment``: "random", ``wait`` s after its first checkpoint, or "mid-checkpoint",
    while a checkpoint file is being written), check what it left, then resume it to the end."""
    process = subprocess.Popen(
        _pretrain_command(store, run),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=_single_thread(),
        start_new_session=True,
    )
    checkpoints = run / "checkpoints"
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:
        if (checkpoints / "last.pt").exists() and (moment == "random" or any(checkpoints.glob(".*.tmp"))):
            break
        time.sleep(0.001)
    time.sleep(wait)
    assert _kill(process), "pretraining finished before it could be killed"
    assert load_checkpoint(checkpoints / "last.pt")["global_step"] >= 3, (
        "the checkpoint left by the kill must be readable"
    )
    resumed = subprocess.run(
        [sys.executable, "-m", "sonocl", "pretrain", "--out", str(run), "--resume", "--no-progress"],
        capture_output=True,
        env=_single_thread(),
    )
    assert resumed.returncode == 0, resumed.stderr.decode()
    return run


@pytest.fixture(scope="module")
def killed_at_random(pretrain_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    wait = float(np.random.default_rng(2024).uniform(0.0, 1.5))
    return _kill_and_resume(pretrain_store, tmp_path_factory.mktemp("random") / "run", "random", wait)


@pytest.fixture(scope="module")
def killed_mid_checkpoint(pretrain_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _kill_and_resume(pretrain_store, tmp_path_factory.mktemp("mid-checkpoint") / "run", "mid-checkpoint", 0.0)


@pytest.mark.parametrize("trial", ["killed_at_random", "killed_mid_checkpoint"])
def test_resumed_pretraining_ends_with_the_uninterrupted_weights(
    trial: str, request: pytest.FixtureRequest, uninterrupted: dict[str, torch.Tensor]
) -> None:
    resumed = _encoder_tensors(request.getfixturevalue(trial))
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[name], uninterrupted[name]) for name in uninterrupted)


def test_resumed_run_leaves_no_temporary_checkpoint(killed_mid_checkpoint: Path) -> None:
    assert not [path.name for path in killed_mid_checkpoint.rglob("*.tmp")]


def test_resuming_a_finished_run_trains_nothing(pretrain_store: Path, tmp_path: Path) -> None:
    """``--resume`` on a complete run whose last epoch is short (``--steps`` not a multiple of an epoch) exits 0."""
    run = tmp_path / "run"
    command = [*_pretrain_command(pretrain_store, run), "--steps", "7"]
    assert subprocess.run(command, capture_output=True, env=_single_thread()).returncode == 0
    steps = [row for row in csv.DictReader(open(run / "metrics.csv")) if row["kind"] == "step"]
    per_epoch = sum(row["epoch"] == "1" for row in steps)
    assert len(steps) == 7 and 7 % per_epoch, f"{per_epoch} steps an epoch: the last epoch is not short"
    before = _encoder_tensors(run)
    resumed = subprocess.run([*command, "--resume"], capture_output=True, env=_single_thread())
    assert resumed.returncode == 0, resumed.stderr.decode()
    assert "nothing left to train" in resumed.stderr.decode()
    after = _encoder_tensors(run)
    assert all(torch.equal(before[name], after[name]) for name in before)


# ---- evaluate: killed between folds, resumed at the first unfinished one --------------------------------------------


def _evaluate_command(store: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "sonocl",
        "evaluate",
        "--store",
        str(store),
        "--init",
        "random",
        "--protocol",
        "last-block",
        "--folds",
        "3",
        "--epochs",
        "2",
        "--size",
        "32",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]


@pytest.mark.parametrize("finished", [1, 2])
def test_evaluation_killed_between_folds_resumes_at_the_first_unfinished_fold(finished: int, tmp_path: Path) -> None:
    """SIGKILL once ``finished`` fold runs are kept; the rerun reads them back, runs the rest, and its tables equal
    an uninterrupted evaluation's."""
    import json

    store = random_store(tmp_path / "store", ["a", "b", "c"] * 4, frames=4)
    straight = tmp_path / "straight"
    subprocess.run(_evaluate_command(store, straight), env=_single_thread(), check=True, capture_output=True)
    killed = tmp_path / "killed"
    process = subprocess.Popen(
        _evaluate_command(store, killed),
        env=_single_thread(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    folds = killed / "folds" / "random"
    deadline = time.monotonic() + 240
    while (
        len(list(folds.glob("seed*_fold*.npz"))) < finished and process.poll() is None and time.monotonic() < deadline
    ):
        time.sleep(0.01)
    if process.poll() is not None:
        pytest.skip("the evaluation finished before it could be killed")
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    kept = {path.name: path.stat().st_mtime_ns for path in folds.glob("seed*_fold*.npz")}
    assert len(kept) >= finished and not list(killed.rglob("*.tmp*"))
    subprocess.run(_evaluate_command(store, killed), env=_single_thread(), check=True, capture_output=True)
    assert {name: (folds / name).stat().st_mtime_ns for name in kept} == kept  # read back, not recomputed
    a, b = (json.loads((run / "results.json").read_text())["inits"][0] for run in (straight, killed))
    assert [r["video"]["accuracy"] for r in a["runs"]] == pytest.approx([r["video"]["accuracy"] for r in b["runs"]])
    assert (straight / "predictions.csv").read_text() == (killed / "predictions.csv").read_text()
