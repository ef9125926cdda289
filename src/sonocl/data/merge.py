"""``sonocl merge SOURCE... --out STORE``: join frame stores into one, without copying frames where it can.

Each part of each source store (its root part and its shards) becomes a sealed shard of ``STORE`` (`sonocl.data.store`,
created if new): the part's frame file is hard-linked into the shard (no copy; on another file system it is copied
once, its committed bytes only), its committed video records are written anew, leaving out the videos ``STORE``
already holds (by content hash or id) and those an earlier source gave. A sealed shard is never written again: its
frame file may be the source store's own, which goes on appending to it (the merged store reads only the frames its
records name). Frames must have one stored size; stores of different sizes are read together by
``sonocl pretrain --store A --store B`` instead (docs/corpora.md).

Group ids are kept as each source store made them: a patient id is hashed with each store's own salt, so the same
patient in two source stores is two groups in the merged one (a CSV group column names groups as written, and is
merged as one group).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from sonocl.data.store import (
    BLOBS_FILE,
    FRAMES_FILE,
    INDEX_FILE,
    META_FILE,
    SHARDS_DIR,
    VIDEOS_FILE,
    FrameStore,
    StoreError,
    directory_lock,
    frame_ends,
    parts,
    read_meta,
    read_records,
)
from sonocl.data.store_writer import add_shard, open_or_create_meta
from sonocl.files import atomic_write, atomic_write_text
from sonocl.outputs import STORE, add_overwrite_argument, claim


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sources", nargs="+", type=Path, metavar="SOURCE", help="frame stores to add")
    parser.add_argument(
        "--out", required=True, type=Path, metavar="STORE", help="the merged store (created, or added to)"
    )
    add_overwrite_argument(parser)


def run(args: argparse.Namespace) -> int:
    merged = merge_stores(args.sources, args.out, overwrite=args.overwrite)
    store = FrameStore.open(args.out)
    print(
        f"{args.out}: {merged} videos added from {len(args.sources)} stores; the store holds {store.num_videos} videos, "
        f"{store.num_frames} frames in {len(store.part_dirs)} parts"
    )
    return 0


def merge_stores(sources: list[Path], out: Path, overwrite: bool = False) -> int:
    """Add every part of every store of ``sources`` to store ``out`` as a sealed shard; returns the videos added."""
    opened = [FrameStore.open(source) for source in sources]  # each checked whole before anything is written
    out = out.resolve()
    existing = FrameStore.open(out) if (out / META_FILE).exists() else None
    first = existing if existing is not None else opened[0]
    size, codec, sized_by = first.size, first.codec, out if existing is not None else sources[0]
    for source, store in zip(sources, opened):
        if store.root.resolve() == out:
            raise StoreError(f"{source}: is the --out store itself")
        if store.codec != codec:
            raise StoreError(
                f"{source}: keeps its frames {store.codec}, {sized_by} {codec}; a store keeps one codec (ingest the "
                "videos again with --codec, or read the stores together with `sonocl pretrain --store A --store B`)"
            )
        if store.size != size:
            raise StoreError(
                f"{source}: holds {store.size}px frames, {sized_by} {size}px; a store holds one size (read stores of "
                "several sizes together with `sonocl pretrain --store A --store B`)"
            )
    claim(out, STORE, overwrite=overwrite)
    open_or_create_meta(out, size, codec)
    held = existing.videos if existing is not None else []
    hashes = {video.content_hash for video in held}
    ids = {video.id for video in held}
    taken = {part.name for part in parts(read_meta(out))}
    added = 0
    for store in opened:
        for part in parts(read_meta(store.root)):
            directory = part.directory(store.root)
            with _no_writer(directory):
                records, _ = read_records(directory / VIDEOS_FILE)
                kept = [v for v in records if v.content_hash not in hashes and v.id not in ids]
                if not kept:
                    continue
                name = _shard_name(f"{store.root.name}-{part.name or 'root'}", taken)
                add_shard(out, name, sealed=True)
                shard = out / SHARDS_DIR / name
                frames = max(v.frame_offset + v.num_frames for v in kept)
                if codec == "raw":
                    _link_or_copy(directory / FRAMES_FILE, shard / FRAMES_FILE, frames * size * size)
                else:
                    _link_or_copy(directory / INDEX_FILE, shard / INDEX_FILE, frames * 8)
                    _link_or_copy(
                        directory / BLOBS_FILE, shard / BLOBS_FILE, frame_ends(directory / INDEX_FILE, frames)
                    )
                text = "".join(v.to_json() + "\n" for v in kept)
                atomic_write_text(shard / VIDEOS_FILE, text)
            taken.add(name)
            hashes |= {v.content_hash for v in kept}
            ids |= {v.id for v in kept}
            added += len(kept)
    return added


@contextlib.contextmanager
def _no_writer(directory: Path) -> Iterator[None]:
    """Hold the part's writer lock while its records are read and its frame file linked (a writer of it is refused
    meanwhile: one line naming it); a part on a read-only file system has no writer and is read as it is."""
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(directory_lock(directory, "store part"))
        except OSError as error:
            if not isinstance(error, PermissionError) and error.errno != errno.EROFS:
                raise
        yield


def _shard_name(wanted: str, taken: set[str]) -> str:
    """``wanted`` made a valid shard name, numbered where it is taken."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", wanted).lstrip(".-")[:90] or "part"
    name, number = base, 2
    while name in taken:
        name, number = f"{base}-{number}", number + 1
    return name


def _link_or_copy(source: Path, target: Path, length: int) -> None:
    """``target`` made the same file as ``source`` (a hard link: no frame is copied), or, across file systems, a copy
    of its first ``length`` bytes (the committed frames)."""
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
        return
    except OSError as error:
        if error.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise

    def copy(handle: IO[bytes]) -> None:
        with open(source, "rb") as reader:
            left = length
            while left and (chunk := reader.read(min(left, 1 << 24))):
                handle.write(chunk)
                left -= len(chunk)

    atomic_write(target, copy)
