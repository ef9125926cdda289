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
import dataclasses
import datetime
import json
import os
import shutil
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sonocl.data.codecs import CODECS
from sonocl.data.decode import DICOM_SUFFIXES, IMAGE_SUFFIXES, VIDEO_SUFFIXES, natural_key
from sonocl.data.ingest_config import CROPS, DEFAULT_MAX_FRAMES, DEFAULT_SIZE, IngestConfig, default
from sonocl.data.ingest_workers import Decoded, DecodeTask, Failed, run_tasks
from sonocl.data.labels import (
    LabelTable,
    NameRule,
    hashed_group,
    label_from_folder,
    label_from_name,
    parse_name_rules,
)
from sonocl.data.sources import Discovery, Source, content_hash, discover, shown
from sonocl.data.store import META_FILE, REPORT_FILE, StoreError
from sonocl.data.store_writer import FrameStoreWriter
from sonocl.errors import ConfigError
from sonocl.files import WriteFailedError, write_json
from sonocl.options import positive
from sonocl.outputs import STORE, add_overwrite_argument, claim
from sonocl.progress import Progress, progress_report

TEMP_DIR = ".ingest-tmp"
"""Workers' frame files, inside the store so that appending them never crosses a file system."""
EXIT_OK, EXIT_SKIPPED, EXIT_INTERRUPTED = 0, 3, 130
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
    parser.add_argument(
        "--shard",
        metavar="NAME",
        help="write into shard NAME of the store (created if new, continued if not), so that several processes or "
        "hosts ingest one corpus into one store at once, each into its own shard (docs/ingest.md, Shards)",
    )
    parser.add_argument(
        "--codec",
        choices=CODECS,
        help="how a new store keeps its frames: raw (the default), or each frame compressed losslessly, png (2.3× "
        "smaller on ultrasound) or zlib (1.7×, decoded 2.5× faster); an existing store keeps its own",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=default("workers"),
        metavar="N",
        help="decoding processes (default: all cores)",
    )
    _frame_arguments(parser.add_argument_group("frames"))
    _label_arguments(parser.add_argument_group("labels and groups (see docs/ingest.md)"))


def _frame_arguments(frames: argparse._ArgumentGroup) -> None:
    """Which frames of a source are stored, and how."""
    frames.add_argument(
        "--size",
        type=int,
        default=None,
        metavar="S",
        help=f"stored frames are SIZE×SIZE uint8 greyscale (default {DEFAULT_SIZE}; an existing store keeps its own)",
    )
    frames.add_argument(
        "--stride",
        type=int,
        default=default("stride"),
        metavar="N",
        help="keep every Nth decoded frame (default 1: all)",
    )
    frames.add_argument(
        "--fps", type=float, default=None, metavar="F", help="keep at most F frames per second of real time"
    )
    frames.add_argument(
        "--max-frames",
        type=int,
        default=default("max_frames"),
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
        default=default("max_pixels"),
        metavar="P",
        help=f"refuse frames of more than P pixels (width × height), from the file's header, before decoding: the "
        "file is skipped and listed in the report, except a JPEG still, decoded at 1/2, 1/4 or 1/8 scale to fit, "
        f"with a note (default {default('max_pixels')}: 6 times a 4K frame, under 1 GB for one frame in one worker; "
        "Pillow refuses stills over 179 million pixels whatever P is)",
    )
    frames.add_argument(
        "--crop", choices=CROPS, default=default("crop"), help="auto: keep only the ultrasound region (default)"
    )
    frames.add_argument(
        "--no-frame-folders",
        action="store_true",
        help="treat every image as a one-frame video, never a folder of numbered images as one clip",
    )


def _label_arguments(labels: argparse._ArgumentGroup) -> None:
    """Where labels and groups come from."""
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
        config: IngestConfig,
        writer: FrameStoreWriter,
        labeller: Labeller,
        progress: Progress,
        decoder_threads: int,
    ) -> None:
        self.config = config
        self.decoder_threads = decoder_threads
        self.writer = writer
        self.labeller = labeller
        self.progress = progress
        self.summary = RunSummary()
        self.temp_dir = writer.directory / TEMP_DIR
        self._sources_by_id = {video.id: video.source for video in (*writer.other_videos, *writer.videos)}

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
                auto_crop=self.config.crop == "auto",
                stride=self.config.stride,
                max_fps=self.config.fps,
                max_frames=self.config.max_frames,
                salt=self.writer.meta["salt"],
                decoder_threads=self.decoder_threads,
                max_pixels=self.config.max_pixels,
                frame_rate=self.config.frame_rate,
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
                        f"{shown(task.source.path)}: {outcome.reason}; the {self.writer.store_videos} videos committed before "
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


def _write_report(
    root: Path,
    config: IngestConfig,
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
        "sources": [str(path.resolve()) for path in config.sources],
        "options": config.report_options(writer.size, writer.codec),
        "counts": {"added": summary.added, "already_present": summary.already_present, "skipped": len(summary.skipped)},
        "left_out": {
            "masks": found.masks_left_out,
            "links_not_followed": [
                {"link": str(link), "target": str(target)} for link, target in found.links_not_followed
            ],
        },
        "store": {"videos": writer.store_videos, "frames": writer.store_frames},
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


def run(args: argparse.Namespace) -> int:
    return ingest(IngestConfig.from_args(args))


def ingest(config: IngestConfig) -> int:
    """``sonocl ingest``; bad input raises a `UserError` (LabelError, StoreError, ConfigError …), printed by
    `sonocl.cli` as one line with exit code 2."""
    name_rules = parse_name_rules(config.label_from_name) if config.label_from_name else []
    store_root = config.out.resolve()
    found = discover(config.sources, exclude=store_root, frame_folders=not config.no_frame_folders)
    sources, rejected = found.sources, found.rejected
    if found.empty_arguments:
        raise ConfigError(_nothing_found(found))
    table = _load_table(config, sources)
    size = config.size if config.size is not None or (store_root / META_FILE).exists() else DEFAULT_SIZE
    claim(store_root, STORE, overwrite=config.overwrite)
    writer = FrameStoreWriter(store_root, size, config.shard, config.codec)
    if table is not None:
        _note_ids_not_found(table, sources)
    with writer:
        temp_dir = writer.directory / TEMP_DIR
        shutil.rmtree(temp_dir, ignore_errors=True)
        try:
            temp_dir.mkdir()
        except OSError as error:
            raise WriteFailedError(
                f"{temp_dir}: cannot create the folder for decoded frames ({error.strerror})"
            ) from error
        labeller = Labeller(writer.meta["salt"], table, name_rules, config.label_from_folder)
        with progress_report(len(sources) + len(rejected), "ingest", "video") as progress:
            workers = min(config.workers, max(1, len(sources)))
            session = Ingest(
                config, writer, labeller, progress, decoder_threads=max(1, len(os.sched_getaffinity(0)) // workers)
            )
            for link, target in found.links_not_followed:
                note = f"sonocl ingest: not following {shown(link)}: it leads to {shown(target)}, which is searched already"
                progress.write(note, file=sys.stderr)
            for path, reason in rejected:
                session.skip(path, reason)
            try:
                tasks = session.plan(sources)
                run_tasks(iter(tasks), min(workers, max(1, len(tasks))), session.commit)
            except KeyboardInterrupt:
                print(
                    f"sonocl ingest: interrupted; {session.summary.added} videos were committed, run again to finish",
                    file=sys.stderr,
                )
                return EXIT_INTERRUPTED
            finally:
                shutil.rmtree(temp_dir, ignore_errors=True)
        looked_at = {str(source.path) for source in sources} | {str(path) for path, _ in rejected}
        _write_report(store_root, config, session.summary, found, looked_at, writer)
        summary = session.summary
        masks = f", {found.masks_left_out} mask files left out" if found.masks_left_out else ""
        print(
            f"{store_root}: {summary.added} added, {summary.already_present} already in store, {len(summary.skipped)} skipped"
            f"{masks}; the store holds {writer.store_videos} videos, {writer.store_frames} frames"
        )
        if not writer.store_videos:
            print(
                f"sonocl ingest: no file under {_joined(config.sources)} could be read; the store is empty",
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


def _load_table(config: IngestConfig, sources: Sequence[Source]) -> LabelTable | None:
    if config.labels is None:
        return None
    return LabelTable.load(
        config.labels,
        [source.relative for source in sources],
        id_column=config.id_column,
        label_column=config.label_column,
        group_column=config.group_column,
        extra_columns=list(config.extra_columns),
    )
