"""How fast a store's frames are read, and what compressing them would buy (issue 26, item 2: measure, then choose).

For each store given (e.g. the POCUS and covid_blues stores of the studies, 128 px):

- **Codecs**, on frames sampled evenly from every video (seeded): the compression ratio (raw bytes over encoded bytes)
  and the time to encode and decode one frame on one core, of zlib on the raw bytes (levels 1 and 6), PNG (Pillow,
  levels 1 and 6), lossless WebP and JPEG at quality 95 (lossy: its PSNR and largest pixel error are given).
- **Stores**: the store written again with each codec of `sonocl.data.codecs` (png, zlib): its size against the raw
  frames, and `FrameStore.gather`'s frames/s, read and decoded, on batches of random frames, cold and warm, with
  1 and 4 reading threads (``--threads``, `SONOCL_READ_THREADS`).
- **Reads** of training-like batches (``--batch`` frames at random over the store) from the store's memory map, with
  the page cache emptied for the frame file before every round (``posix_fadvise(DONTNEED)``: cold, as a first epoch
  on a large store) and kept (warm), each either in the order asked (one page fault per frame, where the old reader
  went) or sorted by offset (`FrameStore.gather`'s order for a sharded store); interleaved rounds.

    python benchmarks/store_codecs.py STORE [STORE ...] [--frames 1500] [--rounds 5] [--batch 128]

Writes ``benchmarks/out/store_codecs.json`` and prints a Markdown table per store.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, features

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from sonocl.data.store import FRAMES_FILE, READ_CHUNK, READ_THREADS_VARIABLE, FrameStore  # noqa: E402
from sonocl.data.store_writer import FrameStoreWriter  # noqa: E402

Codec = tuple[Callable[[np.ndarray], bytes], Callable[[bytes, int], np.ndarray], bool]


def _pil_encode(format: str, **options: object) -> Callable[[np.ndarray], bytes]:
    def encode(frame: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format=format, **options)
        return buffer.getvalue()

    return encode


def _pil_decode(data: bytes, size: int) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("L"))


def _zlib(level: int) -> Codec:
    return (
        lambda frame: zlib.compress(frame.tobytes(), level),
        lambda data, size: np.frombuffer(zlib.decompress(data), dtype=np.uint8).reshape(size, size),
        True,
    )


def codecs() -> dict[str, Codec]:
    found: dict[str, Codec] = {
        "zlib-1": _zlib(1),
        "zlib-6": _zlib(6),
        "png-1": (_pil_encode("PNG", compress_level=1), _pil_decode, True),
        "png-6": (_pil_encode("PNG", compress_level=6), _pil_decode, True),
        "jpeg-95": (_pil_encode("JPEG", quality=95), _pil_decode, False),
    }
    if features.check("webp"):
        found["webp-lossless"] = (_pil_encode("WEBP", lossless=True, quality=50, method=2), _pil_decode, True)
    return found


def sample(store: FrameStore, count: int, seed: int) -> np.ndarray:
    """``count`` frames spread evenly over every video (each video gives its share, evenly spaced), seeded."""
    rng = np.random.default_rng(seed)
    per_video = max(1, math.ceil(count / store.num_videos))
    picks = []
    for video in range(store.num_videos):
        start, stop = store.video_offsets[video], store.video_offsets[video + 1]
        picks.append(np.unique(np.linspace(start, stop - 1, min(per_video, stop - start)).astype(np.int64)))
    chosen = np.concatenate(picks)
    return store.gather(np.sort(rng.choice(chosen, size=min(count, len(chosen)), replace=False)))


def measure_codec(frames: np.ndarray, codec: Codec) -> dict[str, float]:
    encode, decode, lossless = codec
    started = time.perf_counter()
    blobs = [encode(frame) for frame in frames]
    encoded = time.perf_counter()
    back = [decode(blob, frames.shape[-1]) for blob in blobs]
    decoded = time.perf_counter()
    restored = np.stack(back)
    if lossless and not np.array_equal(restored, frames):
        raise AssertionError("a lossless codec changed the frames")
    error = restored.astype(np.float64) - frames
    mse = float(np.mean(error**2))
    return {
        "ratio": frames.nbytes / sum(len(blob) for blob in blobs),
        "encode_us_per_frame": 1e6 * (encoded - started) / len(frames),
        "decode_us_per_frame": 1e6 * (decoded - encoded) / len(frames),
        "decode_frames_per_s_per_core": len(frames) / (decoded - encoded),
        "psnr_db": math.inf if mse == 0 else 10 * math.log10(255**2 / mse),
        "max_abs_error": int(np.abs(error).max()),
    }


def _drop_cache(path: Path) -> None:
    with open(path, "rb") as handle:
        os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def measure_reads(store: FrameStore, batch: int, rounds: int, seed: int) -> dict[str, float]:
    """Frames per second of batches of ``batch`` random frames, four ways, in interleaved rounds."""
    frames = np.memmap(store.part_dirs[0] / FRAMES_FILE, dtype=np.uint8, mode="r",
                       shape=(store.num_frames, store.size, store.size))  # fmt: skip
    rng = np.random.default_rng(seed)
    totals = {f"{cache}_{order}": 0.0 for cache in ("cold", "warm") for order in ("as_asked", "sorted")}
    batches = 8
    for _ in range(rounds):
        for cache in ("cold", "warm"):
            for order in ("as_asked", "sorted"):
                wanted = [rng.integers(0, store.num_frames, batch) for _ in range(batches)]
                if cache == "cold":
                    _drop_cache(store.part_dirs[0] / FRAMES_FILE)
                else:
                    for indices in wanted:
                        np.asarray(frames[np.sort(indices)])  # in the page cache before the clock starts
                started = time.perf_counter()
                for indices in wanted:
                    if order == "sorted":
                        ranked = np.argsort(indices, kind="stable")
                        out = np.empty((batch, store.size, store.size), dtype=np.uint8)
                        out[ranked] = frames[indices[ranked]]
                    else:
                        out = np.stack([np.asarray(frames[i]) for i in indices])
                totals[f"{cache}_{order}"] += time.perf_counter() - started
    return {key: rounds * batches * batch / seconds for key, seconds in totals.items()}


def compressed_copy(store: FrameStore, codec: str, out: Path) -> FrameStore:
    """``store`` written again with ``codec`` (every video, its records' fields kept)."""
    shutil.rmtree(out, ignore_errors=True)
    with FrameStoreWriter(out, store.size, codec=codec) as writer:
        for index, video in enumerate(store.videos):
            fields = {k: v for k, v in dataclasses.asdict(video).items() if k not in ("num_frames", "frame_offset")}
            writer.add_video(iter(store.video_frames(index)), **fields)
    return FrameStore.open(out)


def measure_stores(store: FrameStore, batch: int, rounds: int, seed: int, scratch: Path,
                   threads: list[int]) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Each codec's copy of ``store``: its size against the raw frames, and `FrameStore.gather`'s frames/s (read and
    decoded, one process) on batches of ``batch`` random frames, with each count of reading threads
    (`READ_THREADS_VARIABLE`), from a cold page cache (the copy's frame files dropped) and a warm one; interleaved
    rounds."""
    roots = {"raw": store.root} | {c: compressed_copy(store, c, scratch / c).root for c in ("png", "zlib")}
    readers = {}
    for codec, root in roots.items():
        for count in threads:
            os.environ[READ_THREADS_VARIABLE] = str(count)
            opened = FrameStore.open(root)
            opened.gather(np.arange(min(opened.num_frames, 4 * READ_CHUNK)))  # its threads are made now, with count
            readers[codec, count] = opened
    os.environ.pop(READ_THREADS_VARIABLE)
    seconds = {(codec, count, cache): 0.0 for codec, count in readers for cache in ("cold", "warm")}
    rng = np.random.default_rng(seed)
    for _ in range(rounds):
        wanted = [rng.integers(0, store.num_frames, batch) for _ in range(8)]
        for (codec, count), opened in readers.items():
            for cache in ("cold", "warm"):
                if cache == "cold":
                    for path in _frame_files(opened):
                        _drop_cache(path)
                else:
                    for indices in wanted:
                        opened.gather(np.sort(indices))
                started = time.perf_counter()
                for indices in wanted:
                    opened.gather(indices)
                seconds[codec, count, cache] += time.perf_counter() - started
    measured: dict[str, dict[str, Any]] = {}
    raw_bytes = store.num_frames * store.size * store.size
    for codec in roots:
        size = sum(p.stat().st_size for p in _frame_files(readers[codec, threads[0]]))
        per_s = {f"{cache}, {count} threads": rounds * 8 * batch / seconds[codec, count, cache]
                 for (c, count, cache) in seconds if c == codec}  # fmt: skip
        measured[codec] = {"ratio": raw_bytes / size, "gather_frames_per_s": per_s}
    shutil.rmtree(scratch, ignore_errors=True)
    return measured


def _frame_files(store: FrameStore) -> list[Path]:
    return [p for d in store.part_dirs for p in d.iterdir() if p.name.startswith("frames.")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stores", nargs="+", type=Path)
    parser.add_argument("--frames", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 4], help="reading threads to compare")
    args = parser.parse_args()
    results: dict[str, object] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.node()}, {os.cpu_count()} CPUs",
        "command": "python benchmarks/store_codecs.py " + " ".join(map(str, args.stores)),
        "stores": {},
    }
    for path in args.stores:
        store = FrameStore.open(path)
        frames = sample(store, args.frames, args.seed)
        measured = {name: measure_codec(frames, codec) for name, codec in codecs().items()}
        reads = measure_reads(store, args.batch, args.rounds, args.seed)
        with tempfile.TemporaryDirectory(prefix="sonocl_store_codecs_") as scratch:
            stores = measure_stores(store, args.batch, args.rounds, args.seed, Path(scratch), args.threads)
        results["stores"][str(path)] = {  # type: ignore[index]
            "videos": store.num_videos, "frames": store.num_frames, "size": store.size,
            "sampled_frames": len(frames), "codecs": measured, "reads_frames_per_s": reads, "stores": stores,
        }  # fmt: skip
        print(
            f"\n{path}: {store.num_videos} videos, {store.num_frames} frames of {store.size} px; {len(frames)} sampled"
        )
        print("| codec | ratio | encode (µs/frame) | decode (µs/frame) | decode frames/s per core | PSNR (dB) |")
        print("|---|---|---|---|---|---|")
        for name, m in measured.items():
            psnr = "lossless" if math.isinf(m["psnr_db"]) else f"{m['psnr_db']:.1f} (max error {m['max_abs_error']})"
            print(f"| {name} | {m['ratio']:.2f} | {m['encode_us_per_frame']:.0f} | {m['decode_us_per_frame']:.0f} "
                  f"| {m['decode_frames_per_s_per_core']:,.0f} | {psnr} |")  # fmt: skip
        print("reads (frames/s): " + ", ".join(f"{key} {value:,.0f}" for key, value in reads.items()))
        for codec, m in stores.items():
            rates = ", ".join(f"{key} {value:,.0f}" for key, value in m["gather_frames_per_s"].items())
            print(f"store {codec}: {m['ratio']:.2f}× smaller; gather frames/s: {rates}")
    out = REPO / "benchmarks" / "out" / "store_codecs.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=float) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
