"""A compressed store (`--codec png|zlib`, `sonocl.data.codecs`) holds what a raw one holds, under the same failures.

Every frame comes back exactly (lossless); an ingest killed with SIGKILL leaves the committed videos whole and the
same command finishes; a full disk under the compressed frames keeps what was committed; a refused video leaves no
trace in the frame file or its index; a store keeps one codec, merged stores too; pretraining reads it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from reliability_support import (
    fill_on_open,
    good_video,
    ingest,
    kill_after_commits,
    line_naming,
    run_cli,
    start_ingest,
)

import sonocl.data.store_writer as writer_module
from conftest import tiny_pretrain, tiny_sets
from sonocl.data.store import BLOBS_FILE, INDEX_FILE, VIDEOS_FILE, FrameStore, StoreError, frame_ends
from sonocl.data.store_writer import FrameStoreWriter

SIZE = 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    root = tmp_path_factory.mktemp("codecs")
    videos = root / "videos"
    videos.mkdir()
    for seed in range(10):
        good_video(videos / f"clip{seed:02d}.mp4", seed=seed, frames=8 + seed % 3)
    from sonocl.cli import main

    assert main(["ingest", str(videos), "--out", str(root / "raw"), "--size", str(SIZE), "--workers", "1"]) == 0
    raw = FrameStore.open(root / "raw")
    return videos, {v.id: raw.video_frames(i).tobytes() for i, v in enumerate(raw.videos)}


def _same(store: FrameStore, reference: dict[str, bytes]) -> None:
    assert sorted(v.id for v in store.videos) == sorted(reference)
    for index, video in enumerate(store.videos):
        assert store.video_frames(index).tobytes() == reference[video.id], video.id
    everything = np.concatenate([store.video_frames(i) for i in range(store.num_videos)])
    picks = np.random.default_rng(0).permutation(store.num_frames)[:24].reshape(3, 8)
    assert np.array_equal(store.gather(picks), everything[picks])


def _committed_files_only(part: Path, frames: int) -> None:
    """The index holds one end per committed frame and the compressed frames end where the last one does."""
    assert (part / INDEX_FILE).stat().st_size == frames * 8
    assert (part / BLOBS_FILE).stat().st_size == frame_ends(part / INDEX_FILE, frames)


@pytest.mark.parametrize("codec", ["png", "zlib"])
def test_every_frame_comes_back_and_the_store_is_smaller(
    codec: str, corpus: tuple[Path, dict[str, bytes]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    videos, reference = corpus
    store = tmp_path / "store"
    assert ingest(capsys, videos, "--out", store, "--size", str(SIZE), "--codec", codec).code == 0
    opened = FrameStore.open(store)
    assert opened.codec == codec
    _same(opened, reference)
    _committed_files_only(store, opened.num_frames)
    assert (store / BLOBS_FILE).stat().st_size < opened.num_frames * SIZE * SIZE
    info = run_cli(capsys, "info", store, "--json")
    assert json.loads(info.out)["codec"] == codec
    refused = ingest(capsys, videos, "--out", store, "--codec", "raw")
    assert refused.code == 2 and f"this store keeps its frames {codec}, not raw" in refused.err


def test_an_ingest_killed_while_compressing_resumes(
    corpus: tuple[Path, dict[str, bytes]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    videos, reference = corpus
    store = tmp_path / "store"
    process = start_ingest(videos, "--out", store, "--size", str(SIZE), "--codec", "png")
    kill_after_commits(process, store / VIDEOS_FILE, 3)
    partial = FrameStore.open(store)
    for index, video in enumerate(partial.videos):
        assert partial.video_frames(index).tobytes() == reference[video.id], video.id
    result = ingest(capsys, videos, "--out", store)
    assert result.code == 0, result.err
    done = FrameStore.open(store)
    _same(done, reference)
    _committed_files_only(store, done.num_frames)


@pytest.mark.parametrize("name", [BLOBS_FILE, INDEX_FILE])
def test_a_full_disk_under_the_compressed_frames_keeps_the_committed_ones(
    name: str,
    corpus: tuple[Path, dict[str, bytes]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    videos, reference = corpus
    store = tmp_path / "store"
    room = 12_000 if name == BLOBS_FILE else 40 * 8

    fill_on_open(monkeypatch, writer_module, lambda path: path.name == name, room=room)
    result = ingest(capsys, videos, "--out", store, "--size", str(SIZE), "--codec", "zlib")
    assert result.code == 1
    assert "committed before are intact" in line_naming(result.err, store / name)
    partial = FrameStore.open(store)
    assert 0 < partial.num_videos < 10
    _committed_files_only(store, partial.num_frames)
    for index, video in enumerate(partial.videos):
        assert partial.video_frames(index).tobytes() == reference[video.id], video.id
    monkeypatch.undo()
    assert ingest(capsys, videos, "--out", store).code == 0
    _same(FrameStore.open(store), reference)


def test_a_refused_video_leaves_no_trace_in_the_frames_or_the_index(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    clips = [rng.integers(0, 256, (4, SIZE, SIZE), dtype=np.uint8) for _ in range(3)]

    def fields(name: str) -> dict[str, object]:
        return dict(source=f"{name}.mp4", label=None, group=name, fps=None, original_size=(SIZE, SIZE),
                    crop_box=(0, 0, SIZE, SIZE), content_hash=name * 8, timestamps=[0, 1, 2, 3])  # fmt: skip

    with FrameStoreWriter(tmp_path / "store", SIZE, codec="png") as writer:
        writer.add_video(iter(clips[0]), id="a", **fields("a"))
        with pytest.raises(StoreError, match="already in the store"):
            writer.add_video(iter(clips[1]), id="a", **fields("b"))
        writer.add_video(iter(clips[2]), id="c", **fields("c"))
    store = FrameStore.open(tmp_path / "store")
    assert [v.id for v in store.videos] == ["a", "c"]
    assert np.array_equal(store.video_frames(0), clips[0]) and np.array_equal(store.video_frames(1), clips[2])
    _committed_files_only(tmp_path / "store", 8)


def test_merge_keeps_one_codec_and_pretraining_reads_a_compressed_store(
    corpus: tuple[Path, dict[str, bytes]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    videos, reference = corpus
    png, merged = tmp_path / "png", tmp_path / "merged"
    assert ingest(capsys, videos, "--out", png, "--size", str(SIZE), "--codec", "png").code == 0
    assert run_cli(capsys, "merge", png, "--out", merged).code == 0
    _same(FrameStore.open(merged), reference)
    assert (merged / "shards" / "png-root" / BLOBS_FILE).samefile(png / BLOBS_FILE)
    raw = tmp_path / "raw"
    assert ingest(capsys, videos, "--out", raw, "--size", str(SIZE)).code == 0
    refused = run_cli(capsys, "merge", raw, "--out", merged)
    assert refused.code == 2 and "keeps its frames raw" in refused.err
    run = tmp_path / "run"
    argv = ["pretrain", "--store", str(png), "--method", "simclr", "--out", str(run), "--steps", "2",
            *tiny_pretrain("--threads", "1", *tiny_sets(knn_frames=2))]  # fmt: skip
    result = run_cli(capsys, *argv)
    assert result.code == 0, result.err
    assert (run / "encoder.safetensors").exists()


def _gather_digest(store: FrameStore, picks: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(store.gather(picks).tobytes()).hexdigest()


_INHERITED: dict[str, FrameStore] = {}
"""The store a forked process inherits (as a DataLoader worker inherits its dataset: not pickled)."""


def _inherited_digest(picks: np.ndarray) -> str:
    return _gather_digest(_INHERITED["store"], picks)


@pytest.mark.parametrize("codec", ["raw", "png"])
def test_threaded_reads_give_the_frames_one_thread_gives_in_any_process(
    codec: str, corpus: tuple[Path, dict[str, bytes]], tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """A gather of many frames is read in chunks by a pool of threads (`SONOCL_READ_THREADS`); the frames are those
    of one thread, in the parent and in a forked loader worker (which makes its own threads), and a bad value is one
    line naming the variable."""
    import multiprocessing

    from sonocl.data.store import READ_CHUNK, READ_THREADS_VARIABLE
    from sonocl.errors import UserError

    videos, _ = corpus
    assert ingest(capsys, videos, "--out", tmp_path / "s", "--size", str(SIZE), "--codec", codec).code == 0
    picks = np.random.default_rng(1).permutation(FrameStore.open(tmp_path / "s").num_frames)
    assert len(picks) > 2 * READ_CHUNK
    monkeypatch.setenv(READ_THREADS_VARIABLE, "1")
    alone = FrameStore.open(tmp_path / "s")
    expected = _gather_digest(alone, picks)
    assert alone._readers is None
    monkeypatch.setenv(READ_THREADS_VARIABLE, "3")
    threaded = FrameStore.open(tmp_path / "s")
    assert _gather_digest(threaded, picks) == expected
    assert threaded._readers is not None and threaded._readers._max_workers == 3
    _INHERITED["store"] = threaded  # with its maps and threads, which the forked child must not use
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply(_inherited_digest, (picks,)) == expected
    _INHERITED.clear()
    monkeypatch.setenv(READ_THREADS_VARIABLE, "many")
    with pytest.raises(UserError, match=f"{READ_THREADS_VARIABLE}='many'"):
        FrameStore.open(tmp_path / "s").gather(picks)
