"""The frame store: uint8 greyscale frames of many videos in one memory-mapped file, plus a video table.

Layout of a store directory::

    store.json      format version, frame size, the salt for group-id hashing (written once, atomically)
    frames.u8       every frame, S×S uint8, back to back, append-only
    videos.jsonl    one JSON line per committed video (its frame offset and count, labels, …)
    ingest_report.json   what the last ingest did and which files it skipped (written by ingest)
    .lock           held (flock) by the one writer allowed at a time

A video is *committed* when its line in ``videos.jsonl`` is written and fsynced, which happens only
after its frames are fsynced in ``frames.u8``. A writer killed at any moment therefore leaves a
store whose committed videos are all readable: bytes past the last committed frame and a torn last
line are ignored by readers and cut off by the next writer.

Readers (`FrameStore.open`) never decode anything: a frame is a slice of the memory map. The map is
opened lazily in each process, so a `FrameStore` can be handed to DataLoader workers and DDP ranks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from sonocl.errors import UserError
from sonocl.files import WriteFailedError, write_json

FORMAT_VERSION = 1
META_FILE = "store.json"
FRAMES_FILE = "frames.u8"
VIDEOS_FILE = "videos.jsonl"
REPORT_FILE = "ingest_report.json"
LOCK_FILE = ".lock"


class StoreError(UserError, RuntimeError):
    """A store that cannot be opened or written as asked; the message names the path and the fix."""


class DirectoryLockedError(UserError):
    """Another process holds the lock of a directory (a store, a run directory)."""


class StoreLockedError(StoreError, DirectoryLockedError):
    """Another process is writing to the store."""


@contextlib.contextmanager
def directory_lock(path: str | os.PathLike[str], what: str) -> Iterator[None]:
    """Hold ``PATH/.lock`` (``flock``, exclusive) for the ``with`` block, or raise `DirectoryLockedError` at once.

    ``what`` names the directory in the message ("store", "run directory"). The kernel releases the lock
    when the process dies, however it dies (SIGKILL included), so a crashed writer never blocks the next.
    Processes forked while the lock is held share it until they exit (the descriptor is not inherited by
    exec'd or spawned ones).
    """
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    handle = open(root / LOCK_FILE, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as error:
        handle.close()
        raise DirectoryLockedError(
            f"{root}: another sonocl process is writing to this {what}; wait for it to finish and run again"
        ) from error
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


@dataclasses.dataclass(frozen=True)
class VideoRecord:
    """One committed video. Frames ``frame_offset … frame_offset + num_frames - 1`` of the store are its frames."""

    id: str
    """Unique id: the source path relative to its source root, without extension (``convex/Cov-Atlas``)."""
    source: str
    """Source file (or frame folder) relative to the source root it was found under."""
    label: str | None
    """Primary class label (``None`` when unlabelled)."""
    group: str
    """Group id for grouped splits: a salted hash of the patient id, a CSV group, or the video id itself."""
    fps: float | None
    num_frames: int
    frame_offset: int
    original_size: tuple[int, int]
    """(height, width) of the decoded source frames."""
    crop_box: tuple[int, int, int, int]
    """(top, left, bottom, right) of the region kept, in source pixels (bottom/right exclusive)."""
    content_hash: str
    """sha256 of the source bytes; re-ingesting a file with a known hash adds nothing."""
    timestamps: tuple[float, ...]
    """Presentation time in seconds of each stored frame."""
    extra_labels: dict[str, str] = dataclasses.field(default_factory=dict)
    """Further label columns (anatomy, findings, …) by column name."""

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["timestamps"] = [round(t, 6) for t in self.timestamps]
        return json.dumps(data, separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VideoRecord:
        return cls(
            id=data["id"],
            source=data["source"],
            label=data.get("label"),
            group=data["group"],
            fps=data.get("fps"),
            num_frames=int(data["num_frames"]),
            frame_offset=int(data["frame_offset"]),
            original_size=tuple(data["original_size"]),
            crop_box=tuple(data["crop_box"]),
            content_hash=data["content_hash"],
            timestamps=tuple(float(t) for t in data["timestamps"]),
            extra_labels=dict(data.get("extra_labels") or {}),
        )


def _read_meta(root: Path) -> dict[str, Any]:
    meta_path = root / META_FILE
    if not meta_path.is_file():
        raise StoreError(
            f"{root}: not a sonocl frame store (no {META_FILE}); create one with `sonocl ingest … --out {root}`"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise StoreError(f"{meta_path}: unreadable store header ({error})") from error
    if meta.get("format") != FORMAT_VERSION:
        raise StoreError(f"{meta_path}: store format {meta.get('format')!r}, this sonocl reads format {FORMAT_VERSION}")
    return meta


def _read_records(path: Path) -> tuple[list[VideoRecord], int]:
    """Committed records of ``videos.jsonl`` and the byte length of its committed part (torn tail excluded)."""
    records: list[VideoRecord] = []
    committed = 0
    if not path.exists():
        return records, committed
    with open(path, "rb") as handle:
        for raw in handle:
            if not raw.endswith(b"\n"):
                break  # torn last line: the writer was killed while appending it
            try:
                records.append(VideoRecord.from_dict(json.loads(raw)))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
                raise StoreError(f"{path}: corrupt record at byte {committed} ({error})") from error
            committed += len(raw)
    return records, committed


class VideoTable:
    """The video table of frames laid out video after video: offsets, per-frame video and time, labels and groups.

    `FrameStore` is one store's table over its memory map; `sonocl.data.union.StoreUnion` is several stores' tables
    read as one. ``video_source`` says which store each video is from (all 0 in one store), ``source_weights`` the
    share of a pretraining epoch's items each store gives (`sonocl.pairs.PairSampler`)."""

    root: Path
    size: int

    def __init__(self, videos: list[VideoRecord], sources: np.ndarray | None = None) -> None:
        self.videos = videos
        self.num_videos = len(videos)
        counts = np.array([v.num_frames for v in videos], dtype=np.int64)
        self.video_offsets = np.zeros(len(videos) + 1, dtype=np.int64)
        np.cumsum(counts, out=self.video_offsets[1:])
        self.num_frames = int(self.video_offsets[-1])
        self.frame_video = np.repeat(np.arange(len(videos), dtype=np.int64), counts)
        """Video index of every frame."""
        self.frame_in_video = np.arange(self.num_frames, dtype=np.int64) - self.video_offsets[self.frame_video]
        """Position of every frame within its video."""
        self.frame_time = np.fromiter(
            (t for v in videos for t in v.timestamps), dtype=np.float64, count=self.num_frames
        )
        """Timestamp in seconds of every frame."""
        self.video_source = np.zeros(len(videos), dtype=np.int64) if sources is None else sources
        """Index of the store each video is from (`StoreUnion`); 0 in a single store."""
        self.source_weights: tuple[float, ...] = (1.0,)
        """Each store's share of a pretraining epoch's items (one store: all of them)."""

    def __len__(self) -> int:
        return self.num_frames

    @property
    def roots(self) -> list[Path]:
        """The store directories the table reads, in the order of ``video_source``."""
        return [self.root]

    def gather(self, indices: np.ndarray) -> np.ndarray:
        """Frames at any array of global frame indices, shape ``indices.shape + (S, S)``."""
        raise NotImplementedError

    def label_column(self, column: str = "label") -> list[str | None]:
        """Per-video values of the primary label (``"label"``) or of an extra label column."""
        if column == "label":
            return [v.label for v in self.videos]
        return [v.extra_labels.get(column) for v in self.videos]

    def label_codes(self, column: str = "label") -> tuple[np.ndarray, list[str]]:
        """Per-video integer codes of a label column (-1 where unlabelled) and the sorted class names."""
        values = self.label_column(column)
        names = sorted({value for value in values if value not in (None, "")})
        lookup = {name: code for code, name in enumerate(names)}
        codes = np.array([lookup.get(value, -1) if value else -1 for value in values], dtype=np.int64)
        return codes, names

    def content_order(self, videos: Iterable[int]) -> np.ndarray:
        """``videos`` in the order of their content hashes (ids break ties): the order two ingests of the same files
        share, whatever order ingest's workers committed them in. Splits and samplers that take videos in this order
        draw the same videos from either store."""
        return np.array(
            sorted((int(v) for v in videos), key=lambda v: (self.videos[v].content_hash, self.videos[v].id)),
            dtype=np.int64,
        )

    def group_codes_of(self, videos: np.ndarray) -> np.ndarray:
        """The group ids of ``videos`` numbered as they first appear in that order (`group_codes` numbers them in the
        store's order)."""
        if len(videos) == 0:
            return np.zeros(0, dtype=np.int64)
        _, first, inverse = np.unique(self.group_codes()[videos], return_index=True, return_inverse=True)
        return np.argsort(np.argsort(first))[inverse]

    def group_codes(self) -> np.ndarray:
        """Per-video integer group ids (videos of one patient or source of one store share an id)."""
        lookup: dict[tuple[int, str], int] = {}
        return np.array(
            [lookup.setdefault((int(s), v.group), len(lookup)) for s, v in zip(self.video_source, self.videos)],
            dtype=np.int64,
        )


class FrameStore(VideoTable):
    """Read-only random access to the frames and video table of a store.

    ``store.frames`` is an ``(num_frames, size, size)`` uint8 memory map; ``store.videos`` the committed
    `VideoRecord` list in commit order (video index = position in that list).
    """

    def __init__(self, root: Path, meta: dict[str, Any], videos: list[VideoRecord]) -> None:
        super().__init__(videos)
        self.root = root
        self.size = int(meta["size"])
        self.salt: str = meta["salt"]
        self._frames: np.memmap | None = None
        self._frames_pid: int | None = None
        self._check_offsets()

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> FrameStore:
        root = Path(path)
        meta = _read_meta(root)
        videos, _ = _read_records(root / VIDEOS_FILE)
        store = cls(root, meta, videos)
        needed = store.num_frames * store.size * store.size
        frames_path = root / FRAMES_FILE
        have = frames_path.stat().st_size if frames_path.exists() else 0
        if have < needed:
            raise StoreError(
                f"{frames_path}: holds {have} bytes but the video table needs {needed}; the store is damaged"
            )
        return store

    def _check_offsets(self) -> None:
        for index, video in enumerate(self.videos):
            if video.frame_offset != self.video_offsets[index] or len(video.timestamps) != video.num_frames:
                raise StoreError(
                    f"{self.root / VIDEOS_FILE}: record {index} ({video.id}) has inconsistent frame offsets"
                )

    @property
    def frames(self) -> np.ndarray:
        """All frames as a read-only ``(N, S, S)`` uint8 memory map, opened once per process."""
        if self._frames is None or self._frames_pid != os.getpid():
            if self.num_frames == 0:
                return np.zeros((0, self.size, self.size), dtype=np.uint8)
            self._frames = np.memmap(
                self.root / FRAMES_FILE, dtype=np.uint8, mode="r", shape=(self.num_frames, self.size, self.size)
            )
            self._frames_pid = os.getpid()
        return self._frames

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_frames"] = None
        state["_frames_pid"] = None
        return state

    def frame(self, index: int) -> np.ndarray:
        return np.asarray(self.frames[index])

    def gather(self, indices: np.ndarray) -> np.ndarray:
        """Frames at any array of global frame indices, shape ``indices.shape + (S, S)``."""
        indices = np.asarray(indices, dtype=np.int64)
        return np.asarray(self.frames[indices.reshape(-1)]).reshape(*indices.shape, self.size, self.size)

    def video_frames(self, video: int) -> np.ndarray:
        start, stop = self.video_offsets[video], self.video_offsets[video + 1]
        return np.asarray(self.frames[start:stop])

    def read_report(self) -> dict[str, Any] | None:
        path = self.root / REPORT_FILE
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


class FrameStoreWriter:
    """The one writer of a store: creates it, repairs a killed writer's tail, appends and commits videos.

    Use as a context manager; a second writer on the same store raises `StoreLockedError`. A failed
    write (disk full) cuts the files back to the last commit and raises `WriteFailedError`; the writer
    then accepts no more videos.
    """

    _frames_handle: IO[bytes] | None
    _videos_handle: IO[bytes] | None

    def __init__(self, path: str | os.PathLike[str], size: int | None = None) -> None:
        self.root = Path(path)
        self._lock = contextlib.ExitStack()
        try:
            self._lock.enter_context(directory_lock(self.root, "store"))
        except DirectoryLockedError as error:
            raise StoreLockedError(str(error)) from error
        try:
            self.meta = self._open_or_create_meta(size)
            self.size = int(self.meta["size"])
            self._frame_bytes = self.size * self.size
            self.videos, committed_bytes = _read_records(self.root / VIDEOS_FILE)
            self.num_frames = sum(v.num_frames for v in self.videos)
            self._repair(committed_bytes)
            self._videos_bytes = committed_bytes
            self._hashes = {v.content_hash for v in self.videos}
            self._ids = {v.id for v in self.videos}
            self._frames_handle = open(self.root / FRAMES_FILE, "ab")
            self._videos_handle = open(self.root / VIDEOS_FILE, "ab")
        except BaseException:
            self.close()
            raise

    def _open_or_create_meta(self, size: int | None) -> dict[str, Any]:
        if (self.root / META_FILE).exists():
            meta = _read_meta(self.root)
            if size is not None and int(meta["size"]) != size:
                raise StoreError(
                    f"{self.root}: this store holds {meta['size']}px frames, not {size}px; "
                    f"use --size {meta['size']} or a new --out"
                )
            return meta
        if size is None:
            raise StoreError(f"{self.root}: a new store needs a frame size")
        meta = {"format": FORMAT_VERSION, "size": int(size), "salt": secrets.token_hex(16)}
        write_json(self.root / META_FILE, meta)
        return meta

    def _repair(self, committed_bytes: int) -> None:
        """Cut off what a killed writer left past the last commit."""
        videos_path = self.root / VIDEOS_FILE
        if videos_path.exists() and videos_path.stat().st_size != committed_bytes:
            os.truncate(videos_path, committed_bytes)
        frames_path = self.root / FRAMES_FILE
        needed = self.num_frames * self._frame_bytes
        have = frames_path.stat().st_size if frames_path.exists() else 0
        if have < needed:
            raise StoreError(
                f"{frames_path}: holds {have} bytes but the video table needs {needed}; the store is damaged"
            )
        if have > needed:
            os.truncate(frames_path, needed)

    def __enter__(self) -> FrameStoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for name in ("_frames_handle", "_videos_handle"):
            handle = getattr(self, name, None)
            if handle is not None:
                handle.close()
                setattr(self, name, None)
        self._lock.close()

    def has_hash(self, content_hash: str) -> bool:
        return content_hash in self._hashes

    def add_video(self, frames: Iterable[np.ndarray], **fields: Any) -> VideoRecord:
        """Append the frames of one video (streamed, each ``(S, S)`` uint8) and commit its record.

        ``fields`` are the `VideoRecord` fields other than ``num_frames`` and ``frame_offset``.
        """
        with self._appending(fields.get("source")):
            return self._commit(self._write_frames(frames), **fields)

    def add_video_from_file(self, frames_path: str | os.PathLike[str], **fields: Any) -> VideoRecord:
        """Append a raw file of back-to-back ``S×S`` uint8 frames (as written by an ingest worker) and commit it."""
        size = os.path.getsize(frames_path)
        if size % self._frame_bytes:
            raise StoreError(f"{frames_path}: {size} bytes is not a whole number of {self.size}px frames")
        with open(frames_path, "rb") as source, self._appending(fields.get("source")):
            while chunk := source.read(1 << 24):
                self._handle("_frames_handle").write(chunk)
            return self._commit(size // self._frame_bytes, **fields)

    def _handle(self, name: str) -> IO[bytes]:
        handle = getattr(self, name)
        if handle is None:
            raise StoreError(
                f"{self.root}: this writer is closed (or stopped after a failed write); open the store again"
            )
        return handle

    @contextlib.contextmanager
    def _appending(self, source: str | None) -> Iterator[None]:
        """Undo what an append left past the last commit: a refused video's frames (bad fields, duplicate id) are
        cut and the writer goes on; after a failed write (disk full) both files are cut and the writer stops,
        since its buffers may still hold bytes that the next flush would write."""
        self._handle("_frames_handle")
        self._failing_file = self.root / FRAMES_FILE
        try:
            yield
        except OSError as error:
            self._abandon()
            raise WriteFailedError(
                f"{self._failing_file}: writing {source or 'a video'} failed ({error.strerror or error}); the "
                f"{len(self.videos)} videos committed before are intact. Free disk space and run again to add the rest"
            ) from error
        except BaseException:
            self._handle("_frames_handle").flush()
            os.truncate(self.root / FRAMES_FILE, self.num_frames * self._frame_bytes)
            raise

    def _abandon(self) -> None:
        """Close both files without trusting their buffers and cut them back to the last commit."""
        for name in ("_frames_handle", "_videos_handle"):
            handle = getattr(self, name)
            setattr(self, name, None)
            with contextlib.suppress(OSError):
                handle.close()  # its flush may fail again; the descriptor is closed regardless
        with contextlib.suppress(OSError):
            os.truncate(self.root / FRAMES_FILE, self.num_frames * self._frame_bytes)
            os.truncate(self.root / VIDEOS_FILE, self._videos_bytes)

    def _write_frames(self, frames: Iterable[np.ndarray]) -> int:
        count = 0
        for frame in frames:
            if frame.shape != (self.size, self.size) or frame.dtype != np.uint8:
                raise StoreError(
                    f"frame of shape {frame.shape} {frame.dtype}, the store needs ({self.size}, {self.size}) uint8"
                )
            self._handle("_frames_handle").write(np.ascontiguousarray(frame).tobytes())
            count += 1
        return count

    def _commit(self, num_frames: int, **fields: Any) -> VideoRecord:
        if num_frames == 0:
            raise StoreError(f"{fields.get('source')}: no frames to store")
        timestamps = tuple(float(t) for t in fields.pop("timestamps"))
        if len(timestamps) != num_frames:
            raise StoreError(f"{fields.get('source')}: {len(timestamps)} timestamps for {num_frames} frames")
        record = VideoRecord(num_frames=num_frames, frame_offset=self.num_frames, timestamps=timestamps, **fields)
        if record.id in self._ids:
            raise StoreError(f"{record.source}: video id {record.id!r} is already in the store")
        frames_handle, videos_handle = self._handle("_frames_handle"), self._handle("_videos_handle")
        frames_handle.flush()
        os.fsync(frames_handle.fileno())
        self._failing_file = self.root / VIDEOS_FILE
        line = record.to_json().encode("utf-8") + b"\n"
        videos_handle.write(line)
        videos_handle.flush()
        os.fsync(videos_handle.fileno())
        self._videos_bytes += len(line)
        self.videos.append(record)
        self.num_frames += num_frames
        self._hashes.add(record.content_hash)
        self._ids.add(record.id)
        return record
