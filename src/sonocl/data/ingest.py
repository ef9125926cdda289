"""``sonocl ingest SOURCE... --out STORE``: decode videos, DICOM and images into a frame store.

The main process finds the media files, hashes them (a known hash is already in the store and is
skipped), and hands the rest to worker processes. A worker decodes one file, crops and resizes its
frames and streams them into a temporary file inside the store directory; the main process appends
that file to the store and commits the video, in order of completion. Every commit is durable on
its own, so a killed ingest loses at most the videos in flight, and running it again finishes the
job. A file that cannot be read is reported (stderr and ``STORE/ingest_report.json``) and the run
goes on. Exit status: 0 all ingested, 3 some files skipped, 2 usage error.

Privacy: only frame timing and pixels are taken from DICOM headers, and the patient ID only as a
salted hash for the group id; no header value is written to the store, a log or the report.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import datetime
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path, PurePosixPath
from typing import Any

from sonocl.data.decode import (
    DEFAULT_MAX_PIXELS,
    DICOM_SUFFIXES,
    IMAGE_SUFFIXES,
    VIDEO_SUFFIXES,
    DecodeError,
    Frame,
    is_frame_folder,
    media_kind,
    natural_key,
    open_media,
)
from sonocl.data.labels import (
    LabelError,
    LabelTable,
    NameRule,
    hashed_group,
    label_from_folder,
    label_from_name,
    parse_name_rules,
)
from sonocl.data.mask_names import in_mask_folder, is_mask_name
from sonocl.data.preprocess import FramePreparer, select_frames
from sonocl.data.store import META_FILE, REPORT_FILE, FrameStoreWriter, StoreError
from sonocl.errors import ConfigError
from sonocl.files import WriteFailedError, write_json
from sonocl.options import positive
from sonocl.outputs import STORE, add_overwrite_argument, claim
from sonocl.progress import Progress, progress_report

TEMP_DIR = ".ingest-tmp"
"""Workers' frame files, inside the store so that appending them never crosses a file system."""
DEFAULT_SIZE = 256
DEFAULT_MAX_FRAMES = 20_000
"""``--max-frames`` default: 11 minutes at 30 frames/s, far longer than an ultrasound clip; 1.3 GB stored at 256²."""
TASKS_IN_FLIGHT_PER_WORKER = 4
EXIT_OK, EXIT_SKIPPED, EXIT_INTERRUPTED = 0, 3, 130
_HASH_CHUNK = 1 << 20
MISSING_IDS_SHOWN = 5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "sources",
        nargs="+",
        type=Path,
        metavar="SOURCE",
        help="video, DICOM or image files, or folders (searched recursively)",
    )
    parser.add_argument(
        "--out", required=True, type=Path, metavar="STORE", help="frame store directory (created, or appended to)"
    )
    add_overwrite_argument(parser)
    frames = parser.add_argument_group("frames")
    frames.add_argument(
        "--size",
        type=int,
        default=None,
        metavar="S",
        help=f"stored frames are SIZE×SIZE uint8 greyscale (default {DEFAULT_SIZE}; an existing store keeps its own)",
    )
    frames.add_argument(
        "--stride", type=int, default=1, metavar="N", help="keep every Nth decoded frame (default 1: all)"
    )
    frames.add_argument(
        "--fps", type=float, default=None, metavar="F", help="keep at most F frames per second of real time"
    )
    frames.add_argument(
        "--max-frames",
        type=int,
        default=DEFAULT_MAX_FRAMES,
        metavar="N",
        help=f"keep at most N frames per video: a longer one keeps its first N, with a note naming it, and the rest is "
        f"not decoded (default {DEFAULT_MAX_FRAMES}: 11 minutes at 30 frames/s, far beyond an ultrasound clip, "
        "and a bound on the decoding time a small file can cost)",
    )
    frames.add_argument(
        "--frame-rate",
        type=positive,
        metavar="F",
        help="frames per second of the sources that record no rate (frame folders, DICOM without Frame Time): their "
        "frame i is at i / F seconds. Without it such videos store no rate, and temporal methods (ivpp) refuse them",
    )
    frames.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        metavar="P",
        help=f"refuse frames of more than P pixels (width × height), from the file's header, before decoding: the "
        "file is skipped and listed in the report, except a JPEG still, decoded at 1/2, 1/4 or 1/8 scale to fit, "
        f"with a note (default {DEFAULT_MAX_PIXELS}: 6 times a 4K frame, under 1 GB for one frame in one worker; "
        "Pillow refuses stills over 179 million pixels whatever P is)",
    )
    frames.add_argument(
        "--crop", choices=("auto", "none"), default="auto", help="auto: keep only the ultrasound region (default)"
    )
    frames.add_argument(
        "--no-frame-folders",
        action="store_true",
        help="treat every image as a one-frame video, never a folder of numbered images as one clip",
    )
    labels = parser.add_argument_group("labels and groups (see docs/ingest.md)")
    labels.add_argument(
        "--labels", type=Path, metavar="CSV", help="CSV with a column naming each file and a label column"
    )
    labels.add_argument(
        "--id-column", help="CSV column holding file names, stems or relative paths (default: detected)"
    )
    labels.add_argument(
        "--label-column", help="CSV label column (default: label, class, diagnosis, category or target)"
    )
    labels.add_argument(
        "--group-column", help="CSV patient/group column, stored hashed (default: a patient or subject column)"
    )
    labels.add_argument(
        "--extra-columns", default="", metavar="A,B", help="further CSV label columns to store, e.g. anatomy,findings"
    )
    labels.add_argument(
        "--label-from-name", metavar="RULES", help="file-name prefix rules, e.g. 'cov=covid,pneu=pneumonia,reg=regular'"
    )
    labels.add_argument(
        "--label-from-folder", action="store_true", help="label = first sub-folder under the source folder (class/…)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=len(os.sched_getaffinity(0)),
        metavar="N",
        help="decoding processes (default: all cores)",
    )


@dataclasses.dataclass(frozen=True)
class Source:
    """One video to be: a media file, or a folder of numbered frame images."""

    path: Path
    relative: PurePosixPath
    """Path relative to the source root: the folder argument, or the parent of a file argument."""
    frame_files: tuple[Path, ...] | None = None

    @property
    def default_id(self) -> str:
        return str(self.relative) if self.frame_files is not None else str(self.relative.with_suffix(""))

    def size_on_disk(self) -> int:
        files = self.frame_files if self.frame_files is not None else (self.path,)
        return sum(file.stat().st_size for file in files)


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


def content_hash(source: Source) -> str:
    """sha256 of the file bytes; for a frame folder, of each frame's name and bytes in frame order."""
    digest = hashlib.sha256()
    files = source.frame_files if source.frame_files is not None else (source.path,)
    for file in files:
        if source.frame_files is not None:
            digest.update(file.name.encode("utf-8") + b"\0")
        with open(file, "rb") as handle:
            while chunk := handle.read(_HASH_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


@dataclasses.dataclass
class Discovery:
    """What `discover` found under the source arguments."""

    sources: list[Source]
    rejected: list[tuple[Path, str]]
    """Named files that are not media, with the reason."""
    masks_left_out: int
    """Mask files (`sonocl.data.mask_names`): segmentation ground truth, not images to learn from."""
    links_not_followed: list[tuple[Path, Path]]
    """Links to folders already searched (a link loop, or a second way into one folder) and their targets."""
    empty_arguments: list[Path]
    """Folder arguments under which no media file was found."""


def discover(arguments: Sequence[Path], exclude: Path, frame_folders: bool) -> Discovery:
    """Sources under the arguments, each once, and what was left out.

    Hidden files and folders and the store itself (``exclude``) are not searched; files that are
    not media inside a folder are ignored silently (READMEs, CSVs), named ones are reported. Links
    to folders are followed (data is often linked in from elsewhere), each real folder searched
    once per argument, so that a link loop ends. Masks are left out and counted.
    """
    found = Discovery([], [], 0, [], [])
    sources: dict[Path, Source] = {}
    for argument in arguments:
        argument = argument.resolve()
        if argument.is_file():
            if media_kind(argument) is None:
                found.rejected.append((argument, "not a video, DICOM or image file (by its extension and content)"))
            elif is_mask_name(argument):
                found.masks_left_out += 1
            else:
                sources.setdefault(argument, Source(argument, PurePosixPath(argument.name)))
            continue
        before = len(sources)
        searched = {_folder_key(argument)}
        for folder, subfolders, files in os.walk(argument, followlinks=True):
            folder_path = Path(folder)
            subfolders[:] = [
                name
                for name in sorted(subfolders)
                if not name.startswith(".")
                and (folder_path / name).resolve() != exclude
                and _first_visit(folder_path / name, searched, found.links_not_followed)
            ]
            media = [
                folder_path / name
                for name in sorted(files)
                if not name.startswith(".") and media_kind(folder_path / name)
            ]
            in_masks = in_mask_folder(folder_path.relative_to(argument).parts)
            images = [path for path in media if not (in_masks or is_mask_name(path))]
            found.masks_left_out += len(media) - len(images)
            media = images
            if frame_folders and not subfolders and is_frame_folder(media):
                root = argument.parent if folder_path == argument else argument
                relative = PurePosixPath(folder_path.relative_to(root).as_posix())
                frames = tuple(sorted(media, key=lambda path: natural_key(path.name)))
                sources.setdefault(folder_path, Source(folder_path, relative, frames))
                continue
            for path in media:
                sources.setdefault(path, Source(path, PurePosixPath(path.relative_to(argument).as_posix())))
        if len(sources) == before:
            found.empty_arguments.append(argument)
    found.sources = list(sources.values())
    return found


def _folder_key(path: Path) -> tuple[int, int]:
    status = path.stat()
    return status.st_dev, status.st_ino


def _first_visit(folder: Path, searched: set[tuple[int, int]], not_followed: list[tuple[Path, Path]]) -> bool:
    """Whether to search ``folder``: not if its real folder was searched already (recorded when it is a link)."""
    try:
        key = _folder_key(folder)
    except OSError:
        return False
    if key in searched:
        if folder.is_symlink():
            not_followed.append((folder, folder.resolve()))
        return False
    searched.add(key)
    return True


@dataclasses.dataclass
class Labeller:
    """Labels, extra labels and group of a video, from the rules given on the command line."""

    salt: str
    table: LabelTable | None
    name_rules: list[NameRule]
    from_folder: bool

    def fields(self, source: Source, video_id: str, patient_group: str | None) -> dict[str, Any]:
        row = self.table.lookup(source.relative) if self.table is not None else None
        label = row.label if row is not None else None
        if label is None and self.from_folder:
            label = label_from_folder(source.relative)
        if label is None and self.name_rules:
            label = label_from_name(source.relative.name, self.name_rules)
        if row is not None and row.group is not None:
            group = hashed_group(self.salt, row.group)
        else:
            group = patient_group or video_id
        return {"label": label, "group": group, "extra_labels": dict(row.extra) if row is not None else {}}


def shown(path: Path) -> str:
    """A path for a one-line message: as it is, or quoted with escapes where its name holds a line break or tab."""
    text = str(path)
    return text if text.isprintable() else ascii(text)


def _unreadable(path: Path, error: OSError) -> str:
    if path.is_symlink() and not path.exists():
        return f"a link to {os.readlink(path)}, which does not exist"
    return f"cannot read the file ({error.strerror})"


@dataclasses.dataclass
class RunSummary:
    added: int = 0
    already_present: int = 0
    skipped: list[dict[str, str]] = dataclasses.field(default_factory=list)


class Ingest:
    """One ``sonocl ingest`` run on an open, locked store."""

    def __init__(
        self,
        args: argparse.Namespace,
        writer: FrameStoreWriter,
        labeller: Labeller,
        progress: Progress,
        decoder_threads: int,
    ) -> None:
        self.args = args
        self.decoder_threads = decoder_threads
        self.writer = writer
        self.labeller = labeller
        self.progress = progress
        self.summary = RunSummary()
        self.temp_dir = writer.root / TEMP_DIR
        self._sources_by_id = {video.id: video.source for video in writer.videos}

    def skip(self, path: Path, reason: str) -> None:
        self.summary.skipped.append({"file": str(path), "reason": reason})
        self.progress.update()
        self.progress.write(f"sonocl ingest: skipped {shown(path)}: {reason}", file=sys.stderr)

    def plan(self, sources: Sequence[Source]) -> list[DecodeTask]:
        """Tasks for the sources not yet in the store, largest first so that the workers finish together.

        Sources are hashed in path order first, so that ids are given out deterministically.
        """
        tasks: list[tuple[int, DecodeTask]] = []
        planned_hashes: set[str] = set()
        for source in sources:
            try:
                digest = content_hash(source)
                size = source.size_on_disk()
            except OSError as error:
                self.skip(source.path, _unreadable(source.path, error))
                continue
            if self.writer.has_hash(digest) or digest in planned_hashes:
                self.summary.already_present += 1
                self.progress.update()
                continue
            video_id = self._video_id(source)
            if video_id is None:
                self.skip(
                    source.path,
                    f"a different file with id {source.default_id!r} is already in the store (the file changed since it was "
                    "ingested, or another source root has the same relative path); ingest it into a new store",
                )
                continue
            planned_hashes.add(digest)
            task = DecodeTask(
                source=source,
                video_id=video_id,
                content_hash=digest,
                temp_path=self.temp_dir / f"{uuid.uuid4().hex}.u8",
                size=self.writer.size,
                auto_crop=self.args.crop == "auto",
                stride=self.args.stride,
                max_fps=self.args.fps,
                max_frames=self.args.max_frames,
                salt=self.writer.meta["salt"],
                decoder_threads=self.decoder_threads,
                max_pixels=self.args.max_pixels,
                frame_rate=self.args.frame_rate,
            )
            tasks.append((size, task))
        tasks.sort(key=lambda sized: sized[0], reverse=True)
        return [task for _, task in tasks]

    def _video_id(self, source: Source) -> str | None:
        """The id of a new source: its relative path without extension, with the extension where that id is
        taken by another file (``scan.mp4`` beside ``scan.avi``); ``None`` if even that is taken."""
        for candidate in dict.fromkeys((source.default_id, str(source.relative))):
            owner = self._sources_by_id.get(candidate)
            if owner is None:
                self._sources_by_id[candidate] = str(source.relative)
                return candidate
            if owner == str(source.relative):
                return None
        return None

    def commit(self, task: DecodeTask, outcome: Decoded | Failed) -> None:
        try:
            if isinstance(outcome, Failed):
                if outcome.fatal:
                    raise WriteFailedError(
                        f"{shown(task.source.path)}: {outcome.reason}; the {len(self.writer.videos)} videos committed before "
                        "are intact. Free disk space and run again to add the rest"
                    )
                self.skip(task.source.path, outcome.reason)
                return
            self.writer.add_video_from_file(
                task.temp_path,
                id=task.video_id,
                source=str(task.source.relative),
                fps=outcome.fps,
                original_size=outcome.original_size,
                crop_box=outcome.crop_box,
                content_hash=task.content_hash,
                timestamps=outcome.timestamps,
                **self.labeller.fields(task.source, task.video_id, outcome.patient_group),
            )
        except StoreError as error:
            self.skip(task.source.path, str(error))
            return
        finally:
            task.temp_path.unlink(missing_ok=True)
        for note in outcome.notes:
            self.progress.write(f"sonocl ingest: note: {shown(task.source.path)}: {note}", file=sys.stderr)
        self.summary.added += 1
        self.progress.update()


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


def _write_report(
    root: Path,
    args: argparse.Namespace,
    summary: RunSummary,
    found: Discovery,
    this_run: set[str],
    writer: FrameStoreWriter,
) -> None:
    """``ingest_report.json``: this run's counts and skipped files, plus earlier runs' skipped files that
    this run did not look at and that still exist (they are presumably still failing)."""
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    skipped = [
        {**entry, "last_tried": now} for entry in sorted(summary.skipped, key=lambda entry: natural_key(entry["file"]))
    ]
    previous_path = root / REPORT_FILE
    if previous_path.exists():
        try:
            previous = json.loads(previous_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            previous = {}
        for entry in previous.get("skipped", []):
            if entry.get("file") not in this_run and Path(entry.get("file", "")).exists():
                skipped.append(entry)
    report = {
        "finished": now,
        "sources": [str(path.resolve()) for path in args.sources],
        "options": {
            "size": writer.size,
            "stride": args.stride,
            "fps": args.fps,
            "max_frames": args.max_frames,
            "max_pixels": args.max_pixels,
            "frame_rate": args.frame_rate,
            "crop": args.crop,
        },
        "counts": {"added": summary.added, "already_present": summary.already_present, "skipped": len(summary.skipped)},
        "left_out": {
            "masks": found.masks_left_out,
            "links_not_followed": [
                {"link": str(link), "target": str(target)} for link, target in found.links_not_followed
            ],
        },
        "store": {"videos": len(writer.videos), "frames": writer.num_frames},
        "skipped": skipped,
    }
    write_json(previous_path, report)


def _joined(paths: Sequence[Path]) -> str:
    return ", ".join(shown(path) for path in paths)


def _nothing_found(found: Discovery) -> str:
    """Why a folder argument gave nothing to ingest: what was looked for, and what was left out."""
    suffixes = " ".join(sorted(VIDEO_SUFFIXES | DICOM_SUFFIXES | IMAGE_SUFFIXES))
    left_out = [f"{found.masks_left_out} mask files"] if found.masks_left_out else []
    left_out += [
        f"the link {shown(link)}, which leads to a folder searched already" for link, _ in found.links_not_followed
    ]
    note = f"; left out: {', '.join(left_out)}" if left_out else ""
    return (
        f"{_joined(found.empty_arguments)}: no video, DICOM or image file found (looked for {suffixes} and DICOM files without "
        f"an extension, in every sub-folder and linked folder, hidden ones excepted{note}); check the path"
    )


def _check_options(args: argparse.Namespace) -> str | None:
    from sonocl.data.preprocess import MIN_SOURCE_SIDE  # the floor of a source's frames is the floor of --size

    if args.size is not None and args.size < MIN_SOURCE_SIDE:
        return (
            f"--size must be at least {MIN_SOURCE_SIDE}, not {args.size}: frames under {MIN_SOURCE_SIDE} px are not "
            "an ultrasound image"
        )
    for name in ("size", "stride", "max_frames", "max_pixels", "workers"):
        value = getattr(args, name)
        if value is not None and value < 1:
            return f"--{name.replace('_', '-')} must be at least 1, not {value}"
    if args.fps is not None and not (math.isfinite(args.fps) and args.fps > 0):
        return f"--fps must be positive and finite, not {args.fps}"
    missing = [str(path) for path in args.sources if not path.exists()]
    if missing:
        return f"no such file or folder: {', '.join(missing)}"
    if args.labels is not None and not args.labels.is_file():
        return f"{args.labels}: labels CSV not found"
    if args.out.exists() and not args.out.is_dir():
        return f"{args.out}: --out must be a directory (a frame store)"
    return None


def run(args: argparse.Namespace) -> int:
    """``sonocl ingest``; bad input raises a `UserError` (LabelError, StoreError, ConfigError …), printed by
    `sonocl.cli` as one line with exit code 2."""
    problem = _check_options(args)
    if problem is not None:
        raise ConfigError(problem)
    name_rules = parse_name_rules(args.label_from_name) if args.label_from_name else []
    store_root = args.out.resolve()
    found = discover(args.sources, exclude=store_root, frame_folders=not args.no_frame_folders)
    sources, rejected = found.sources, found.rejected
    if found.empty_arguments:
        raise ConfigError(_nothing_found(found))
    table = _load_table(args, sources)
    size = args.size if args.size is not None or (store_root / META_FILE).exists() else DEFAULT_SIZE
    claim(store_root, STORE, overwrite=args.overwrite)
    writer = FrameStoreWriter(store_root, size)
    if table is not None:
        _note_ids_not_found(table, sources)
    with writer:
        temp_dir = store_root / TEMP_DIR
        shutil.rmtree(temp_dir, ignore_errors=True)
        try:
            temp_dir.mkdir()
        except OSError as error:
            raise WriteFailedError(
                f"{temp_dir}: cannot create the folder for decoded frames ({error.strerror})"
            ) from error
        labeller = Labeller(writer.meta["salt"], table, name_rules, args.label_from_folder)
        with progress_report(len(sources) + len(rejected), "ingest", "video") as progress:
            workers = min(args.workers, max(1, len(sources)))
            ingest = Ingest(
                args, writer, labeller, progress, decoder_threads=max(1, len(os.sched_getaffinity(0)) // workers)
            )
            for link, target in found.links_not_followed:
                note = f"sonocl ingest: not following {shown(link)}: it leads to {shown(target)}, which is searched already"
                progress.write(note, file=sys.stderr)
            for path, reason in rejected:
                ingest.skip(path, reason)
            try:
                tasks = ingest.plan(sources)
                run_tasks(iter(tasks), min(workers, max(1, len(tasks))), ingest.commit)
            except KeyboardInterrupt:
                print(
                    f"sonocl ingest: interrupted; {ingest.summary.added} videos were committed, run again to finish",
                    file=sys.stderr,
                )
                return EXIT_INTERRUPTED
            finally:
                shutil.rmtree(temp_dir, ignore_errors=True)
        looked_at = {str(source.path) for source in sources} | {str(path) for path, _ in rejected}
        _write_report(store_root, args, ingest.summary, found, looked_at, writer)
        summary = ingest.summary
        masks = f", {found.masks_left_out} mask files left out" if found.masks_left_out else ""
        print(
            f"{store_root}: {summary.added} added, {summary.already_present} already in store, {len(summary.skipped)} skipped"
            f"{masks}; the store holds {len(writer.videos)} videos, {writer.num_frames} frames"
        )
        if not writer.videos:
            print(
                f"sonocl ingest: no file under {_joined(args.sources)} could be read; the store is empty",
                file=sys.stderr,
            )
    if summary.skipped:
        print(
            f"sonocl ingest: {len(summary.skipped)} files skipped, listed in {store_root / REPORT_FILE}",
            file=sys.stderr,
        )
        return EXIT_SKIPPED
    return EXIT_OK


def _note_ids_not_found(table: LabelTable, sources: Sequence[Source]) -> None:
    """Say which CSV rows name no file being ingested: a typo or a missing file would otherwise pass unseen."""
    missing = table.ids_not_in([source.relative for source in sources])
    if missing:
        examples = ", ".join(repr(value) for value in missing[:MISSING_IDS_SHOWN]) + (
            ", …" if len(missing) > MISSING_IDS_SHOWN else ""
        )
        print(
            f"sonocl ingest: note: {shown(table.path)}: {len(missing)} ids name no file being ingested ({examples}); "
            "their rows are not used",
            file=sys.stderr,
        )


def _load_table(args: argparse.Namespace, sources: Sequence[Source]) -> LabelTable | None:
    if args.labels is None:
        for option in ("id_column", "label_column", "group_column"):
            if getattr(args, option):
                raise LabelError(f"--{option.replace('_', '-')} needs --labels CSV")
        if args.extra_columns:
            raise LabelError("--extra-columns needs --labels CSV")
        return None
    extra = [column.strip() for column in args.extra_columns.split(",") if column.strip()]
    return LabelTable.load(
        args.labels,
        [source.relative for source in sources],
        id_column=args.id_column,
        label_column=args.label_column,
        group_column=args.group_column,
        extra_columns=extra,
    )
