"""Concurrency: one writer per store (a lock the kernel releases when its holder dies), many identical readers.

`directory_lock` is the store's lock and the one to use for any directory that one process at a time may
write (a run directory): a second holder is refused at once with a message naming the directory, and a
holder killed with SIGKILL leaves nothing that blocks the next one.
"""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from reliability_support import good_video, ingest, stored_ids

from sonocl.data.store import DirectoryLockedError, FrameStore, StoreLockedError, directory_lock
from sonocl.data.store_writer import FrameStoreWriter


def test_directory_lock_refuses_a_second_holder_and_is_released(tmp_path: Path) -> None:
    with directory_lock(tmp_path / "run", "run directory"):
        with pytest.raises(
            DirectoryLockedError, match=f"{tmp_path / 'run'}: another sonocl process is writing to this run directory"
        ):
            with directory_lock(tmp_path / "run", "run directory"):
                pass
    with pytest.raises(RuntimeError, match="inside"):
        with directory_lock(tmp_path / "run", "run directory"):
            raise RuntimeError("inside")
    with directory_lock(tmp_path / "run", "run directory"):
        pass


def _hold_lock_in_child(store: Path) -> subprocess.Popen[bytes]:
    """A process that opens a store writer, says so on stdout, and waits to be killed."""
    code = (
        "import sys, time\n"
        "from sonocl.data.store_writer import FrameStoreWriter\n"
        "writer = FrameStoreWriter(sys.argv[1], 32)\n"
        "print('locked', flush=True)\n"
        "time.sleep(600)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code, str(store)], stdout=subprocess.PIPE)
    assert child.stdout is not None and child.stdout.readline() == b"locked\n"
    return child


def test_a_writer_killed_with_sigkill_does_not_block_the_next(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "store"
    child = _hold_lock_in_child(store)
    try:
        with pytest.raises(StoreLockedError):
            FrameStoreWriter(store, 32)
        video = good_video(tmp_path / "scan.mp4")
        refused = ingest(capsys, video, "--out", store)
        assert refused.code == 2 and "another sonocl process is writing to this store" in refused.err
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert ingest(capsys, video, "--out", store).code == 0
    assert stored_ids(store) == ["scan"]


def test_second_ingest_while_one_runs_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "src"
    source.mkdir()
    for seed in range(24):
        good_video(source / f"clip{seed:02d}.mp4", seed=seed, frames=12)
    store = tmp_path / "store"
    command = [
        sys.executable,
        "-m",
        "sonocl",
        "ingest",
        str(source),
        "--out",
        str(store),
        "--size",
        "32",
        "--workers",
        "1",
    ]
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (store / "videos.jsonl").exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    second = ingest(capsys, source, "--out", store)
    finished_first = first.wait(timeout=120)
    assert finished_first == 0
    if second.code == 0:
        pytest.fail("the first ingest ended before the second started; make it longer")
    assert second.code == 2 and f"{store}: another sonocl process is writing to this store" in second.err
    assert stored_ids(store) == [f"clip{seed:02d}" for seed in range(24)]


class StoreFrames(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Frame i of a store with its index: what a training DataLoader's workers read."""

    def __init__(self, store: FrameStore) -> None:
        self.store = store

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, index: int) -> tuple[int, np.ndarray]:
        return index, self.store.frame(index)


@pytest.mark.parametrize(("context", "workers"), [("fork", 2), ("spawn", 1)])
def test_dataloader_workers_see_the_frames_the_main_process_sees(
    context: str, workers: int, phantom_store: FrameStore
) -> None:
    """Forked workers share the parent's state, spawned ones (as torchrun's ranks) open the store afresh."""
    expected = hashlib.sha256(np.ascontiguousarray(phantom_store.frames).tobytes()).digest()
    loader = torch.utils.data.DataLoader(
        StoreFrames(phantom_store),
        batch_size=37,
        num_workers=workers,
        multiprocessing_context=context,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )
    seen = np.zeros((len(phantom_store), phantom_store.size, phantom_store.size), dtype=np.uint8)
    count = 0
    for indices, frames in loader:
        seen[indices.numpy()] = frames.numpy()
        count += len(indices)
    assert count == len(phantom_store)
    assert hashlib.sha256(seen.tobytes()).digest() == expected
