"""The writing side of the frame store (`sonocl.data.store`): `FrameStoreWriter`, the one writer of a part of a
store, and the two changes of ``store.json`` that writers of different parts share, made under ``.manifest.lock``:
creating the store's header (`open_or_create_meta`) and listing a shard (`add_shard`)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from sonocl.data.codecs import CODECS, encode
from sonocl.data.store import (
    BLOBS_FILE,
    FORMAT_VERSION,
    FRAMES_FILE,
    INDEX_FILE,
    MANIFEST_LOCK,
    META_FILE,
    SHARD_NAME,
    SHARDED_FORMAT,
    SHARDS_DIR,
    VIDEOS_FILE,
    DirectoryLockedError,
    Part,
    StoreError,
    StoreLockedError,
    VideoRecord,
    directory_lock,
    frame_ends,
    parts,
    read_meta,
    read_records,
)
from sonocl.files import WriteFailedError, write_json


@contextlib.contextmanager
def manifest_lock(root: Path) -> Iterator[None]:
    """Hold ``ROOT/.manifest.lock`` (``flock``, exclusive, waiting for it) while store.json is created or changed:
    the moments a writer of one part and a writer of another meet."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / MANIFEST_LOCK, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def open_or_create_meta(root: Path, size: int | None, codec: str | None = None) -> dict[str, Any]:
    """The store's header, created with ``size``, ``codec`` (`sonocl.data.codecs`; default raw) and a fresh salt if
    there is none (under the manifest lock, so that two writers starting a store at once agree on one header)."""
    if codec is not None and codec not in CODECS:
        raise StoreError(f"{root}: codec {codec!r}: choose one of {', '.join(CODECS)}")
    with manifest_lock(root):
        if (root / META_FILE).exists():
            meta = read_meta(root)
            if size is not None and int(meta["size"]) != size:
                raise StoreError(
                    f"{root}: this store holds {meta['size']}px frames, not {size}px; use --size {meta['size']} or a "
                    "new --out"
                )
            kept = meta.get("codec", "raw")
            if codec is not None and codec != kept:
                raise StoreError(
                    f"{root}: this store keeps its frames {kept}, not {codec}; use --codec {kept} or a new --out"
                )
            return meta
        if size is None:
            raise StoreError(f"{root}: a new store needs a frame size")
        meta = {"format": FORMAT_VERSION, "size": int(size), "salt": secrets.token_hex(16)}
        if codec not in (None, "raw"):
            meta = {**meta, "format": SHARDED_FORMAT, "codec": codec}  # an older sonocl refuses it
        write_json(root / META_FILE, meta)
        return meta


def add_shard(root: Path, name: str, sealed: bool = False) -> dict[str, Any]:
    """List shard ``name`` in store.json (format 2 from then on) unless it is listed; returns the header. A sealed
    shard is refused to a writer, and a name is refused unless it is `SHARD_NAME`'s."""
    if not SHARD_NAME.fullmatch(name):
        raise StoreError(
            f"{root}: shard name {name!r}: use letters, digits, '.', '_' and '-' (at most 100, not starting with '.')"
        )
    with manifest_lock(root):
        meta = read_meta(root)
        listed = {shard["name"]: shard for shard in meta.get("shards", [])}
        if name in listed:
            if listed[name].get("sealed") and not sealed:
                raise StoreError(
                    f"{root}: shard {name!r} is sealed (merged from another store, read-only); write to a new shard"
                )
            return meta
        meta = {**meta, "format": SHARDED_FORMAT, "shards": [*listed.values(), {"name": name, "sealed": sealed}]}
        (root / SHARDS_DIR / name).mkdir(parents=True, exist_ok=True)
        write_json(root / META_FILE, meta)
        return meta


class FrameStoreWriter:
    """The one writer of a part of a store (the root part, or shard ``shard``): creates the store or the shard,
    repairs a killed writer's tail, appends and commits videos.

    Use as a context manager; a second writer of the same part raises `StoreLockedError` (writers of different parts
    run side by side). A video whose content or id any part of the store holds is refused (`has_hash`, ids). A failed
    write (disk full) cuts the part's files back to the last commit and raises `WriteFailedError`; the writer then
    accepts no more videos.
    """

    _frames_handle: IO[bytes] | None
    _index_handle: IO[bytes] | None
    _videos_handle: IO[bytes] | None

    def __init__(
        self, path: str | os.PathLike[str], size: int | None = None, shard: str | None = None, codec: str | None = None
    ) -> None:
        self.root = Path(path)
        self._lock = contextlib.ExitStack()
        self._index_handle = None
        try:
            self.meta = open_or_create_meta(self.root, size, codec)
            if shard is not None:
                self.meta = add_shard(self.root, shard)
            self.directory = Part(shard or "").directory(self.root)
            """The part this writer appends to: the store's root, or ``shards/SHARD``."""
            try:
                self._lock.enter_context(directory_lock(self.directory, "store" if shard is None else "shard"))
            except DirectoryLockedError as error:
                raise StoreLockedError(str(error)) from error
            self.size = int(self.meta["size"])
            self._frame_bytes = self.size * self.size
            self.codec: str = self.meta.get("codec", "raw")
            """How this store keeps its frames (`sonocl.data.codecs`): raw, or each frame compressed."""
            self._frames_path = self.directory / (FRAMES_FILE if self.codec == "raw" else BLOBS_FILE)
            self._pending_ends: list[int] = []
            self.videos, committed_bytes = read_records(self.directory / VIDEOS_FILE)
            """This part's committed videos."""
            self.num_frames = sum(v.num_frames for v in self.videos)
            """This part's committed frames."""
            self._repair(committed_bytes)
            self._videos_bytes = committed_bytes
            self.other_videos = self._other_parts_videos()
            """The committed videos of the store's other parts, when this writer opened."""
            self._hashes = {v.content_hash for v in (*self.other_videos, *self.videos)}
            self._ids = {v.id for v in (*self.other_videos, *self.videos)}
            self._frames_handle = open(self._frames_path, "ab")
            if self.codec != "raw":
                self._index_handle = open(self.directory / INDEX_FILE, "ab")
            self._videos_handle = open(self.directory / VIDEOS_FILE, "ab")
        except BaseException:
            self.close()
            raise

    def _other_parts_videos(self) -> list[VideoRecord]:
        found: list[VideoRecord] = []
        for part in parts(self.meta):
            if part.directory(self.root) != self.directory:
                found += read_records(part.directory(self.root) / VIDEOS_FILE)[0]
        return found

    @property
    def store_videos(self) -> int:
        """Videos of the whole store (every part, as this writer knows them)."""
        return len(self.other_videos) + len(self.videos)

    @property
    def store_frames(self) -> int:
        """Frames of the whole store (every part, as this writer knows them)."""
        return sum(v.num_frames for v in self.other_videos) + self.num_frames

    def _repair(self, committed_bytes: int) -> None:
        """Cut off what a killed writer left past the last commit."""
        videos_path = self.directory / VIDEOS_FILE
        if videos_path.exists() and videos_path.stat().st_size != committed_bytes:
            os.truncate(videos_path, committed_bytes)
        if self.codec != "raw":
            index_path = self.directory / INDEX_FILE
            _cut_to(index_path, self.num_frames * 8)
            self._committed_end = frame_ends(index_path, self.num_frames)
            self._blob_bytes = self._committed_end
        _cut_to(self._frames_path, self._frames_end())

    def _frames_end(self) -> int:
        """The committed length of the frame file: S² bytes a frame (raw), or where the last committed frame ends."""
        return self.num_frames * self._frame_bytes if self.codec == "raw" else self._committed_end

    def __enter__(self) -> FrameStoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for name in ("_frames_handle", "_index_handle", "_videos_handle"):
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
            if self.codec != "raw":
                chunks = iter(lambda: source.read(self._frame_bytes), b"")
                frames = (np.frombuffer(chunk, dtype=np.uint8).reshape(self.size, self.size) for chunk in chunks)
                return self._commit(self._write_frames(frames), **fields)
            while chunk := source.read(1 << 24):
                self._handle("_frames_handle").write(chunk)
            return self._commit(size // self._frame_bytes, **fields)

    def _handle(self, name: str) -> IO[bytes]:
        handle = getattr(self, name)
        if handle is None:
            raise StoreError(
                f"{self.directory}: this writer is closed (or stopped after a failed write); open the store again"
            )
        return handle

    @contextlib.contextmanager
    def _appending(self, source: str | None) -> Iterator[None]:
        """Undo what an append left past the last commit: a refused video's frames (bad fields, duplicate id) are
        cut and the writer goes on; after a failed write (disk full) both files are cut and the writer stops,
        since its buffers may still hold bytes that the next flush would write."""
        self._handle("_frames_handle")
        self._failing_file = self._frames_path
        try:
            yield
        except OSError as error:
            self._abandon()
            raise WriteFailedError(
                f"{self._failing_file}: writing {source or 'a video'} failed ({error.strerror or error}); the "
                f"{len(self.videos)} videos committed before are intact. Free disk space and run again to add the rest"
            ) from error
        except BaseException:
            for name in ("_frames_handle", "_index_handle"):
                handle = getattr(self, name)
                if handle is not None:
                    handle.flush()
            self._cut_to_commit()
            raise

    def _cut_to_commit(self) -> None:
        """Cut the frame file (and a compressed part's index) back to the last commit."""
        os.truncate(self._frames_path, self._frames_end())
        if self.codec != "raw":
            os.truncate(self.directory / INDEX_FILE, self.num_frames * 8)
            self._blob_bytes, self._pending_ends = self._committed_end, []

    def _abandon(self) -> None:
        """Close both files without trusting their buffers and cut them back to the last commit."""
        for name in ("_frames_handle", "_index_handle", "_videos_handle"):
            handle = getattr(self, name)
            setattr(self, name, None)
            if handle is not None:
                with contextlib.suppress(OSError):
                    handle.close()  # its flush may fail again; the descriptor is closed regardless
        with contextlib.suppress(OSError):
            self._cut_to_commit()
            os.truncate(self.directory / VIDEOS_FILE, self._videos_bytes)

    def _write_frames(self, frames: Iterable[np.ndarray]) -> int:
        count = 0
        for frame in frames:
            if frame.shape != (self.size, self.size) or frame.dtype != np.uint8:
                raise StoreError(
                    f"frame of shape {frame.shape} {frame.dtype}, the store needs ({self.size}, {self.size}) uint8"
                )
            if self.codec == "raw":
                self._handle("_frames_handle").write(np.ascontiguousarray(frame).tobytes())
            else:
                blob = encode(self.codec, frame)
                self._handle("_frames_handle").write(blob)
                self._blob_bytes += len(blob)
                self._pending_ends.append(self._blob_bytes)
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
        if self.codec != "raw":  # the index after the frames it points into, the record after both
            self._failing_file = self.directory / INDEX_FILE
            index_handle = self._handle("_index_handle")
            index_handle.write(np.asarray(self._pending_ends, dtype="<u8").tobytes())
            index_handle.flush()
            os.fsync(index_handle.fileno())
        self._failing_file = self.directory / VIDEOS_FILE
        line = record.to_json().encode("utf-8") + b"\n"
        videos_handle.write(line)
        videos_handle.flush()
        os.fsync(videos_handle.fileno())
        self._videos_bytes += len(line)
        self.videos.append(record)
        self.num_frames += num_frames
        if self.codec != "raw":
            self._committed_end, self._pending_ends = self._blob_bytes, []
        self._hashes.add(record.content_hash)
        self._ids.add(record.id)
        return record


def _cut_to(path: Path, length: int) -> None:
    """Cut ``path`` to ``length`` bytes (what a killed writer left past the last commit); shorter is damage."""
    have = path.stat().st_size if path.exists() else 0
    if have < length:
        raise StoreError(f"{path}: holds {have} bytes but the video table needs {length}; the store is damaged")
    if have > length:
        os.truncate(path, length)
