"""The decoding side of `sonocl ingest`: a `DecodeTask` per source, decoded by a worker process into a frame file
(`decode_to_file`), and the pool that runs them (`run_tasks`), which survives a decoder crash and names its file."""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import multiprocessing
from collections.abc import Callable, Iterator
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from sonocl.data.decode import DecodeError, Frame, open_media
from sonocl.data.labels import hashed_group
from sonocl.data.preprocess import FramePreparer, select_frames
from sonocl.data.sources import Source

TASKS_IN_FLIGHT_PER_WORKER = 4


@dataclasses.dataclass(frozen=True)
class DecodeTask:
    """What a worker needs to decode one source into a frame file."""

    source: Source
    video_id: str
    content_hash: str
    temp_path: Path
    size: int
    auto_crop: bool
    stride: int
    max_fps: float | None
    max_frames: int | None
    salt: str
    decoder_threads: int
    max_pixels: int | None = None
    frame_rate: float | None = None
    """``--frame-rate``: the rate of a source that records none (its frame i is then at i / rate seconds)."""


@dataclasses.dataclass(frozen=True)
class Decoded:
    """A source decoded into ``temp_path``: everything of its `VideoRecord` that comes from the pixels."""

    num_frames: int
    fps: float | None
    original_size: tuple[int, int]
    crop_box: tuple[int, int, int, int]
    timestamps: list[float]
    patient_group: str | None
    """Salted hash of the DICOM patient ID, if any."""
    notes: tuple[str, ...] = ()
    """How the file was decoded where a user should know it: kept its first frames only, decoded reduced."""


@dataclasses.dataclass(frozen=True)
class Failed:
    reason: str
    fatal: bool = False
    """Writing the frame file failed (the store's disk is full or read-only): the ingest stops, the source is not at fault."""


class _FrameFileError(Exception):
    """Writing a worker's frame file failed: told apart from the many errors of decoding a bad source."""

    def __init__(self, error: OSError) -> None:
        super().__init__(error.strerror or str(error))
        self.error = error


class _FrameFile:
    """A worker's frame file, unbuffered: a failed write surfaces at the write that failed, and nothing is left in a
    buffer for a later flush to fail on."""

    def __init__(self, path: Path) -> None:
        try:
            self._file = open(path, "wb", buffering=0)
        except OSError as error:
            raise _FrameFileError(error) from error

    def write(self, frame: Any) -> None:
        """Write a C-contiguous uint8 frame whole (a raw write may take only part of it when the disk fills)."""
        view = memoryview(frame).cast("B")
        try:
            while view:
                view = view[self._file.write(view) :]
        except OSError as error:
            raise _FrameFileError(error) from error

    def __enter__(self) -> _FrameFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()


def decode_to_file(task: DecodeTask) -> Decoded | Failed:
    """Worker: decode, crop and resize one source into ``task.temp_path`` (removed again on failure).

    Any exception is turned into a `Failed` for this file: one unreadable file must never stop an
    ingest, and decoder libraries raise many exception types on malformed input.
    """
    preparer = FramePreparer(task.size, task.auto_crop)
    count = 0
    truncated: list[str] = []

    def on_limit() -> None:
        truncated.append(
            f"kept the first {task.max_frames} frames (--max-frames {task.max_frames}); the rest is not decoded"
        )

    try:
        with (
            open_media(task.source.path, task.source.frame_files, task.decoder_threads, task.max_pixels) as media,
            _FrameFile(task.temp_path) as out,
        ):
            frames = media.frames()
            assumed = task.frame_rate if media.fps is None and task.frame_rate else None
            if assumed:
                frames = _at_rate(frames, assumed)
            selected = select_frames(frames, task.stride, task.max_fps, task.max_frames, on_limit)
            for frame in preparer.prepare(selected):
                out.write(frame)
                count += 1
            fps, patient_id, notes = assumed or media.fps, media.patient_id, (*media.notes, *truncated)
    except DecodeError as error:
        return _failed(task, error.reason)
    except _FrameFileError as error:
        return _failed(task, f"writing its frames to {task.temp_path} failed ({error})", fatal=True)
    except Exception as error:  # noqa: BLE001 - see the docstring: per-file boundary
        return _failed(task, f"unexpected {type(error).__name__} while decoding ({error})")
    if count == 0 or preparer.original_size is None or preparer.crop_box is None:
        return _failed(task, "no frames")
    return Decoded(
        num_frames=count,
        fps=fps,
        original_size=preparer.original_size,
        crop_box=preparer.crop_box.as_tuple(),
        timestamps=preparer.timestamps,
        patient_group=hashed_group(task.salt, patient_id) if patient_id else None,
        notes=notes,
    )


def _at_rate(frames: Iterator[Frame], rate: float) -> Iterator[Frame]:
    """The frames of a source that records no rate, timed at ``rate``: frame i at i / rate seconds."""
    for index, frame in enumerate(frames):
        frame.time = index / rate
        yield frame


def _failed(task: DecodeTask, reason: str, fatal: bool = False) -> Failed:
    task.temp_path.unlink(missing_ok=True)
    return Failed(reason, fatal)


def run_tasks(
    tasks: Iterator[DecodeTask],
    workers: int,
    on_result: Callable[[DecodeTask, Decoded | Failed], None],
    worker_function: Callable[[DecodeTask], Decoded | Failed] = decode_to_file,
) -> None:
    """Decode ``tasks`` in ``workers`` processes, calling ``on_result`` in the main process as each finishes.

    At most `TASKS_IN_FLIGHT_PER_WORKER` tasks per worker are in flight: enough that workers keep
    decoding while the main process waits for a commit's fsync, few enough to bound the temporary
    frame files waiting to be committed. A worker that dies (a decoder crash on a malformed file) breaks the pool: the tasks
    that were in flight are then rerun one at a time in a fresh pool, so that the file that crashes
    it again is the culprit, and is reported as such, while the others go in.
    """
    if workers <= 1:
        for task in tasks:
            on_result(task, worker_function(task))
        return
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])

    def new_pool() -> concurrent.futures.ProcessPoolExecutor:
        return concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context)

    pool = new_pool()
    in_flight: dict[concurrent.futures.Future[Decoded | Failed], tuple[DecodeTask, bool]] = {}
    suspects: collections.deque[DecodeTask] = collections.deque()
    exhausted = False
    try:
        while True:
            alone = bool(suspects) or any(solo for _, solo in in_flight.values())
            while len(in_flight) < (1 if alone else TASKS_IN_FLIGHT_PER_WORKER * workers):
                if suspects:
                    task, solo = suspects.popleft(), True
                else:
                    next_task = None if exhausted else next(tasks, None)
                    if next_task is None:
                        exhausted = True
                        break
                    task, solo = next_task, False
                in_flight[pool.submit(worker_function, task)] = (task, solo)
                if solo:
                    break
            if not in_flight:
                return
            done, _ = concurrent.futures.wait(in_flight, return_when=concurrent.futures.FIRST_COMPLETED)
            broken = False
            for future in done:
                task, solo = in_flight.pop(future)
                try:
                    outcome = future.result()
                except BrokenProcessPool:
                    broken = True
                    if solo:
                        on_result(task, Failed("the decoder process crashed on this file"))
                    else:
                        suspects.append(task)
                    continue
                on_result(task, outcome)
            if broken:
                suspects.extend(task for task, _ in in_flight.values())
                in_flight.clear()
                pool.shutdown(wait=True, cancel_futures=True)
                pool = new_pool()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
