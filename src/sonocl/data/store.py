"""The frame store: uint8 greyscale frames of many videos in memory-mapped files, plus a video table.

Layout of a store directory::

    store.json      format version, frame size, the salt for group-id hashing, the shards (written atomically)
    frames.u8       the root part's frames, S×S uint8, back to back, append-only
    videos.jsonl    one JSON line per committed video of the root part (its frame offset and count, labels, …)
    shards/NAME/    a shard: frames.u8, videos.jsonl and .lock of its own, as the root part's
    ingest_report.json   what the last ingest did and which files it skipped (written by ingest)
    .lock           held (flock) by the one writer of the root part allowed at a time
    .manifest.lock  held for the moment store.json is created or a shard is added to it

A store is its parts: the root part (every store has it; a store without shards, format 1, is only it) and the
shards that ``store.json`` lists (format 2). Each part has its one writer at a time (`FrameStoreWriter`, ``shard=``),
so several processes or hosts ingest one corpus at once, each into its own shard; ``sonocl merge`` adds other stores'
parts as sealed shards (read-only: their frame files may be hard links shared with the store they came from).

A video is *committed* when its line in its part's ``videos.jsonl`` is written and fsynced, which happens only
after its frames are fsynced in that part's ``frames.u8``. A writer killed at any moment therefore leaves a
part whose committed videos are all readable: bytes past the last committed frame and a torn last
line are ignored by readers and cut off by the next writer of that part.

Readers (`FrameStore.open`) never decode anything: a frame is a slice of its part's memory map. The maps are
opened lazily in each process, so a `FrameStore` can be handed to DataLoader workers and DDP ranks. A video whose
content (or id) a part read earlier already holds is read once: the first part holding it, root first, then the
shards in the order ``store.json`` lists them (two writers may ingest the same file at once).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import re
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from sonocl.data.codecs import decode
from sonocl.errors import UserError

READ_THREADS_VARIABLE = "SONOCL_READ_THREADS"
"""The environment variable that sets how many threads each process reads and decodes frames with (default
`READ_THREADS`; 1: none). Memory-map copies and zlib decoding release the GIL, so a gather's chunks overlap their
page faults (a cold cache, a network filesystem's latency) and spread their decoding over cores."""
READ_THREADS = min(4, os.cpu_count() or 1)
"""Four threads, or one per core where there are fewer (on 2 cores, 4 threads read no faster than 2:
docs/benchmarks.md, `benchmarks/store_codecs.py --threads`)."""
READ_CHUNK = 32
"""Frames per read task: a gather of 128 frames is 4 tasks."""

FORMAT_VERSION = 1
"""A store of one part (the root); `SHARDED_FORMAT` once store.json lists shards (older sonocl refuses to read it)."""
SHARDED_FORMAT = 2
META_FILE = "store.json"
FRAMES_FILE = "frames.u8"
BLOBS_FILE = "frames.bin"
"""A compressed part's frames, each compressed on its own, back to back (`sonocl.data.codecs`)."""
INDEX_FILE = "frames.idx"
"""A compressed part's index: where each frame ends in ``frames.bin``, little-endian uint64."""
VIDEOS_FILE = "videos.jsonl"
REPORT_FILE = "ingest_report.json"
LOCK_FILE = ".lock"
MANIFEST_LOCK = ".manifest.lock"
SHARDS_DIR = "shards"
SHARD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


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


def read_meta(root: Path) -> dict[str, Any]:
    meta_path = root / META_FILE
    if not meta_path.is_file():
        raise StoreError(
            f"{root}: not a sonocl frame store (no {META_FILE}); create one with `sonocl ingest … --out {root}`"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise StoreError(f"{meta_path}: unreadable store header ({error})") from error
    if meta.get("format") not in (FORMAT_VERSION, SHARDED_FORMAT):
        raise StoreError(
            f"{meta_path}: store format {meta.get('format')!r}, this sonocl reads formats {FORMAT_VERSION} and "
            f"{SHARDED_FORMAT}"
        )
    return meta


@dataclasses.dataclass(frozen=True)
class Part:
    """One part of a store: the root part (``name`` "") or a shard, and whether it is sealed (read-only: a merged
    store's part, whose frame file may be shared with the store it came from)."""

    name: str
    sealed: bool = False

    def directory(self, root: Path) -> Path:
        return root / SHARDS_DIR / self.name if self.name else root


def parts(meta: dict[str, Any]) -> list[Part]:
    """The parts of a store in reading order: the root part, then the shards in the order store.json lists them."""
    return [Part(""), *(Part(str(shard["name"]), bool(shard.get("sealed"))) for shard in meta.get("shards", []))]


def read_records(path: Path) -> tuple[list[VideoRecord], int]:
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

    ``store.videos`` is the committed `VideoRecord` list, part after part, each part's in commit order (video index
    = position in that list); a video's ``frame_offset`` is its first frame in its part's frame file.
    """

    def __init__(self, root: Path, meta: dict[str, Any], videos: list[VideoRecord], video_part: np.ndarray,
                 part_dirs: list[Path], duplicates: int = 0) -> None:  # fmt: skip
        super().__init__(videos)
        self.root = root
        self.size = int(meta["size"])
        self.salt: str = meta["salt"]
        self.codec: str = meta.get("codec", "raw")
        """How the frames are kept (`sonocl.data.codecs`): raw, or each frame compressed (decoded when read)."""
        self.part_dirs = part_dirs
        """The directory of each part the store reads (`Part.directory`), root part first."""
        self.video_part = video_part
        """The part of each video (an index into ``part_dirs``)."""
        self.duplicates = duplicates
        """Videos left out because an earlier part holds their content or id (`FrameStore.open`)."""
        self._video_local = np.array([v.frame_offset for v in videos], dtype=np.int64)
        self._contiguous = (
            self.codec == "raw"
            and len(part_dirs) == 1
            and bool(np.array_equal(self._video_local, self.video_offsets[:-1]))
        )
        self._maps: dict[int, np.memmap] = {}
        self._maps_pid: int | None = None
        self._readers: ThreadPoolExecutor | None = None

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> FrameStore:
        root = Path(path)
        meta = read_meta(root)
        size = int(meta["size"])
        videos: list[VideoRecord] = []
        video_part: list[int] = []
        part_dirs: list[Path] = []
        hashes: set[str] = set()
        ids: set[str] = set()
        duplicates = 0
        for part in parts(meta):
            directory = part.directory(root)
            records, _ = read_records(directory / VIDEOS_FILE)
            _check_part(directory, records, size, part.sealed, meta.get("codec", "raw"))
            index = len(part_dirs)
            part_dirs.append(directory)
            for record in records:
                if record.content_hash in hashes or record.id in ids:
                    duplicates += 1
                    continue
                hashes.add(record.content_hash)
                ids.add(record.id)
                videos.append(record)
                video_part.append(index)
        return cls(root, meta, videos, np.array(video_part, dtype=np.int64), part_dirs, duplicates)

    def _reader_threads(self) -> ThreadPoolExecutor | None:
        """This process's reading threads (`READ_THREADS_VARIABLE`), None for one thread."""
        self._own_process()
        if self._readers is None:
            value = os.environ.get(READ_THREADS_VARIABLE, str(READ_THREADS))
            if not value.isdigit() or int(value) < 1:
                raise UserError(f"{READ_THREADS_VARIABLE}={value!r}: give a whole number of threads, at least 1")
            if int(value) == 1:
                return None
            self._readers = ThreadPoolExecutor(int(value), thread_name_prefix="sonocl-read")
        return self._readers

    def _own_process(self) -> None:
        """Maps and threads belong to one process: a forked loader worker opens its own."""
        if self._maps_pid != os.getpid():
            self._maps, self._maps_pid, self._readers = {}, os.getpid(), None

    def _part_frames(self, part: int) -> np.memmap | np.ndarray | EncodedFrames:
        """Part ``part``'s frames as a read-only ``(n, S, S)`` uint8 memory map (a compressed part: `EncodedFrames`,
        indexed alike), opened once per process."""
        self._own_process()
        if self.codec != "raw":
            if part not in self._maps:
                self._maps[part] = EncodedFrames(self.part_dirs[part], self.codec, self.size)  # type: ignore[assignment]
            return self._maps[part]
        if part not in self._maps:
            path = self.part_dirs[part] / FRAMES_FILE
            count = (path.stat().st_size if path.exists() else 0) // (self.size * self.size)
            if count == 0:
                return np.zeros((0, self.size, self.size), dtype=np.uint8)
            self._maps[part] = np.memmap(path, dtype=np.uint8, mode="r", shape=(count, self.size, self.size))
        return self._maps[part]

    @property
    def frames(self) -> np.ndarray:
        """All frames as one ``(N, S, S)`` uint8 array: the memory map itself for a store of one part laid out video
        after video; otherwise the frames are read (`gather`: for a large sharded store, read what you need)."""
        if self.num_frames == 0:
            return np.zeros((0, self.size, self.size), dtype=np.uint8)
        if self._contiguous:
            return self._part_frames(0)[: self.num_frames]
        return self.gather(np.arange(self.num_frames))

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_maps"] = {}
        state["_maps_pid"] = None
        state["_readers"] = None
        return state

    def frame(self, index: int) -> np.ndarray:
        return self.gather(np.array([index]))[0]

    def gather(self, indices: np.ndarray) -> np.ndarray:
        """Frames at any array of global frame indices, shape ``indices.shape + (S, S)``: read part by part, each
        part's frames in file order (sorted offsets read 1.1–1.4× faster than the order asked from a cold cache:
        docs/benchmarks.md, `benchmarks/store_codecs.py`)."""
        indices = np.asarray(indices, dtype=np.int64)
        flat = indices.reshape(-1)
        if self._contiguous:
            part_of, local = np.zeros(len(flat), dtype=np.int64), flat
        else:
            videos = self.frame_video[flat]
            part_of = self.video_part[videos]
            local = self._video_local[videos] + self.frame_in_video[flat]
        out = np.empty((len(flat), self.size, self.size), dtype=np.uint8)
        chunks = []
        for part in np.unique(part_of):
            where = np.flatnonzero(part_of == part)
            order = where[np.argsort(local[where], kind="stable")]
            frames = self._part_frames(int(part))
            chunks += [(frames, order[start : start + READ_CHUNK]) for start in range(0, len(order), READ_CHUNK)]

        def read(chunk: tuple[Any, np.ndarray]) -> None:
            frames, rows = chunk
            out[rows] = frames[local[rows]]

        readers = self._reader_threads() if len(chunks) > 1 else None
        if readers is None:
            for chunk in chunks:
                read(chunk)
        else:
            list(readers.map(read, chunks))  # list: a chunk's error is raised here
        return out.reshape(*indices.shape, self.size, self.size)

    def video_frames(self, video: int) -> np.ndarray:
        start = self._video_local[video]
        return np.asarray(self._part_frames(int(self.video_part[video]))[start : start + self.videos[video].num_frames])

    def read_report(self) -> dict[str, Any] | None:
        path = self.root / REPORT_FILE
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def _check_part(directory: Path, records: list[VideoRecord], size: int, sealed: bool, codec: str) -> None:
    """Every committed video of a part lies in its frame file, with a timestamp per frame; in a part a writer appends
    to, video after video (a sealed part may leave out videos its store of origin held: see `merge_stores`)."""
    expected, frames = 0, 0
    for index, video in enumerate(records):
        misplaced = video.frame_offset < 0 if sealed else video.frame_offset != expected
        if misplaced or len(video.timestamps) != video.num_frames:
            raise StoreError(f"{directory / VIDEOS_FILE}: record {index} ({video.id}) has inconsistent frame offsets")
        expected = video.frame_offset + video.num_frames
        frames = max(frames, expected)
    checks = [(directory / FRAMES_FILE, frames * size * size)]
    if codec != "raw":
        checks = [(directory / INDEX_FILE, frames * 8)]
        if (directory / INDEX_FILE).exists() and frames:
            checks.append((directory / BLOBS_FILE, frame_ends(directory / INDEX_FILE, frames)))
    for path, needed in checks:
        have = path.stat().st_size if path.exists() else 0
        if have < needed:
            raise StoreError(f"{path}: holds {have} bytes but the video table needs {needed}; the store is damaged")


def frame_ends(index: Path, frames: int) -> int:
    """Where frame ``frames - 1`` of a compressed part ends in its ``frames.bin`` (0 for none), from ``index``."""
    if frames == 0:
        return 0
    with open(index, "rb") as handle:
        handle.seek((frames - 1) * 8)
        return int(np.frombuffer(handle.read(8), dtype="<u8")[0])


class EncodedFrames:
    """A compressed part's frames, indexed as its memory map would be (an array of frame numbers, or a slice), each
    frame decoded when read (`sonocl.data.codecs`). Both files are memory-mapped."""

    def __init__(self, directory: Path, codec: str, size: int) -> None:
        self.codec, self.size = codec, size
        index = directory / INDEX_FILE
        count = index.stat().st_size // 8 if index.exists() else 0
        self.ends = np.memmap(index, dtype="<u8", mode="r", shape=(count,)) if count else np.zeros(0, dtype="<u8")
        blobs = directory / BLOBS_FILE
        length = blobs.stat().st_size if blobs.exists() else 0
        self.blobs = np.memmap(blobs, dtype=np.uint8, mode="r", shape=(length,)) if length else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self.ends)

    def __getitem__(self, key: np.ndarray | slice) -> np.ndarray:
        numbers = np.arange(len(self))[key] if isinstance(key, slice) else np.asarray(key, dtype=np.int64)
        out = np.empty((len(numbers), self.size, self.size), dtype=np.uint8)
        for row, number in enumerate(numbers):
            start = int(self.ends[number - 1]) if number else 0
            out[row] = decode(self.codec, self.blobs[start : int(self.ends[number])].tobytes(), self.size)
        return out
