"""Shared by the reliability suite: the CLI run in-process, its messages checked, small odd media written.

Every check of a user error asks the same three things: the exit status, that stderr holds no
traceback, and that exactly one line names the offending file (so a user can grep for it) and says
what is wrong. `run_cli` and `line_naming` do that; the writers make the inputs.
"""

from __future__ import annotations

import builtins
import dataclasses
import errno
import hashlib
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest

from sonocl.cli import main
from sonocl.data.sources import shown
from sonocl.data.store import FrameStore
from sonocl.data.store_writer import FrameStoreWriter
from test_decode import scan_frames, write_video


@dataclasses.dataclass(frozen=True)
class Outcome:
    code: int
    out: str
    err: str


def run_cli(capsys: pytest.CaptureFixture[str], *args: str | Path) -> Outcome:
    """``sonocl ARGS`` in this process; an exception escaping it (a bug) fails the test with its traceback."""
    capsys.readouterr()
    code = main([str(arg) for arg in args])
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return Outcome(code, out, err)


def ingest(capsys: pytest.CaptureFixture[str], *args: str | Path, workers: int = 1) -> Outcome:
    return run_cli(capsys, "ingest", *args, "--workers", str(workers))


INIT_COMMANDS = ("pretrain", "evaluate", "embed")
"""The commands that load an encoder given with ``--init``."""


def smallest_pretrain(run: Path, epochs: int = 1) -> list[str | Path]:
    """``sonocl pretrain`` options of the smallest SimCLR run on the CPU, writing ``run`` (add ``--store``)."""
    return ["--method", "simclr", "--out", run, "--epochs", str(epochs), "--size", "32", "--batch-size", "4",
            "--threads", "1", "--no-progress", "--device", "cpu"]  # fmt: skip


def with_init(command: str, store: Path, init: Path, out: Path) -> list[str | Path]:
    """Arguments of a smallest run of ``sonocl COMMAND --init INIT`` on ``store``, writing under ``out`` (CPU)."""
    tail: dict[str, list[str | Path]] = {
        "pretrain": smallest_pretrain(out / "run"),
        "evaluate": ["--protocol", "knn", "--folds", "2", "--out", out / "eval"],
        "embed": ["--out", out / "embed.npz"],
    }
    return [command, "--store", store, "--init", init, *tail[command], "--device", "cpu"]


def line_naming(text: str, path: Path | str) -> str:
    """The one line of ``text`` that names ``path`` (as messages show it), failing if none or several do."""
    name = shown(Path(path))
    lines = [line for line in text.splitlines() if name in line]
    assert len(lines) == 1, f"{len(lines)} lines name {name}:\n{text}"
    return lines[0]


def good_video(path: Path, seed: int = 0, frames: int = 4) -> Path:
    """A small valid mp4: the file that must still go in beside a bad one."""
    return write_video(path, scan_frames(frames, 32, 32, seed=seed))


def stored_ids(store_dir: Path) -> list[str]:
    return sorted(video.id for video in FrameStore.open(store_dir).videos)


def write_audio_only(path: Path) -> None:
    """An mp4 holding one AAC audio stream and no video stream."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), dtype=np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)


def write_empty_video_stream(path: Path) -> None:
    """An AVI file with a video stream and no frame in it."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mjpeg", rate=10)
        stream.width = stream.height = 16
        stream.pix_fmt = "yuvj420p"
        container.start_encoding()


def write_mixed_sizes(path: Path) -> None:
    """An MPEG program stream whose frames change size mid-way (two streams' bytes back to back)."""
    first = write_video(path.with_name("first.mpeg"), scan_frames(6, 32, 32, seed=1))
    second = write_video(path.with_name("second.mpeg"), scan_frames(6, 48, 64, seed=2))
    path.write_bytes(first.read_bytes() + second.read_bytes())
    first.unlink()
    second.unlink()


def write_png_header(path: Path, width: int, height: int) -> None:
    """A PNG whose header announces ``width×height`` pixels, with almost no pixel data behind it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def random_store(root: Path, labels: Sequence[str | None], frames: int = 4, size: int = 32, seed: int = 0) -> Path:
    """A store of noise videos with the given labels (one group each), written directly: no decoding."""
    rng = np.random.default_rng(seed)
    with FrameStoreWriter(root, size) as writer:
        for index, label in enumerate(labels):
            pixels = rng.integers(0, 256, (frames, size, size), dtype=np.uint8)
            writer.add_video(
                pixels,
                id=f"v{index}",
                source=f"v{index}.mp4",
                label=label,
                group=f"g{index}",
                fps=10.0,
                timestamps=[step / 10 for step in range(frames)],
                original_size=(size, size),
                crop_box=(0, 0, size, size),
                content_hash=hashlib.sha256(pixels.tobytes()).hexdigest(),
            )
    return root


DISK_FULL = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class FillingFile:
    """A file handle that writes ``room`` bytes, then half of the next write, then fails as a full disk does."""

    def __init__(self, handle: Any, room: int) -> None:
        self._handle, self._room = handle, room

    def write(self, data: Any) -> int:
        data = bytes(data)
        if len(data) > self._room:
            self._handle.write(data[: max(self._room, len(data) // 2)])
            self._handle.flush()
            self._room = 0
            raise DISK_FULL
        self._room -= len(data)
        return self._handle.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)

    def __enter__(self) -> FillingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.close()


def start_ingest(*args: str | Path) -> subprocess.Popen[bytes]:
    """``sonocl ingest ARGS --workers 1`` in a process group of its own (so that a kill takes its decoders too)."""
    command = [sys.executable, "-m", "sonocl", "ingest", *map(str, args), "--workers", "1"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment, start_new_session=True
    )


def kill_after_commits(process: subprocess.Popen[bytes], videos_file: Path, commits: int) -> None:
    """SIGKILL ``process`` (and its group) once ``videos_file`` holds ``commits`` committed lines; it must still run."""
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:
        if videos_file.exists() and videos_file.read_bytes().count(b"\n") >= commits:
            break
        time.sleep(0.001)
    assert process.poll() is None, "the ingest finished before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def fill_on_open(monkeypatch: pytest.MonkeyPatch, module: Any, wanted: Callable[[Path], bool], room: int) -> list[Path]:
    """Files opened for writing by ``module`` whose path is ``wanted`` fill up after ``room`` bytes; returns them."""
    filled: list[Path] = []

    def fake_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        handle = builtins.open(file, mode, *args, **kwargs)
        if any(flag in mode for flag in "wa") and wanted(Path(file)):
            filled.append(Path(file))
            return FillingFile(handle, room)
        return handle

    monkeypatch.setattr(module, "open", fake_open, raising=False)
    return filled
