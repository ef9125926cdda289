"""A sharded store (docs/ingest.md, Shards) holds what the single-file store holds, under the same failures.

Several ingests write one store at once, each into its own shard; a shard's ingest killed with SIGKILL resumes; a
full disk under a shard keeps its committed videos; one shard has one writer at a time; shards listed at the same
moment by many processes are all listed; a store without shards still opens and takes shards; `sonocl merge` joins
stores by hard links, seals what it links and never reads a source's later appends.
"""

from __future__ import annotations

import multiprocessing
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
    stored_ids,
)

import sonocl.data.store_writer as store_module
from sonocl.data.ingest import TEMP_DIR
from sonocl.data.store import FRAMES_FILE, META_FILE, SHARDS_DIR, VIDEOS_FILE, FrameStore, StoreError, read_meta
from sonocl.data.store_writer import FrameStoreWriter, add_shard

SIZE = 32


def _videos(folder: Path, seeds: range) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        good_video(folder / f"clip{seed:02d}.mp4", seed=seed, frames=6 + seed % 4)
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, bytes]]:
    """Two folders of videos and the frames of every video after one plain ingest of both, by id."""
    root = tmp_path_factory.mktemp("shards")
    first, second = _videos(root / "a", range(0, 8)), _videos(root / "b", range(8, 16))
    from sonocl.cli import main

    assert main(["ingest", str(first), str(second), "--out", str(root / "plain"), "--size", str(SIZE)]) == 0
    plain = FrameStore.open(root / "plain")
    return first, second, {v.id: plain.video_frames(i).tobytes() for i, v in enumerate(plain.videos)}


def _same_videos(store: FrameStore, reference: dict[str, bytes]) -> None:
    assert sorted(v.id for v in store.videos) == sorted(reference)
    for index, video in enumerate(store.videos):
        assert store.video_frames(index).tobytes() == reference[video.id], video.id
    everything = np.concatenate([store.video_frames(i) for i in range(store.num_videos)])
    assert np.array_equal(store.gather(np.arange(store.num_frames)), everything)
    shuffled = np.random.default_rng(0).permutation(store.num_frames)[:40].reshape(5, 8)
    assert np.array_equal(store.gather(shuffled), everything[shuffled])  # any order and shape


def test_two_ingests_at_once_into_two_shards_give_the_plain_store(
    corpus: tuple[Path, Path, dict[str, bytes]], tmp_path: Path
) -> None:
    first, second, reference = corpus
    store = tmp_path / "store"
    processes = [start_ingest(first, "--out", store, "--shard", "a", "--size", str(SIZE)),
                 start_ingest(second, "--out", store, "--shard", "b", "--size", str(SIZE))]  # fmt: skip
    for process in processes:
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err.decode()
    meta = read_meta(store)
    assert meta["format"] == 2 and {s["name"] for s in meta["shards"]} == {"a", "b"}  # listed as they started
    opened = FrameStore.open(store)
    _same_videos(opened, reference)
    assert opened.duplicates == 0 and not (store / VIDEOS_FILE).exists()  # the root part holds nothing
    assert not (store / SHARDS_DIR / "a" / TEMP_DIR).exists()


def test_an_ingest_killed_in_its_shard_resumes_there(
    corpus: tuple[Path, Path, dict[str, bytes]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Half the corpus in the root part (a store made before shards), the rest killed mid-way into a shard, then the
    same command again: every video once, whole, the shard's frame file cut to its committed frames."""
    first, second, reference = corpus
    store = tmp_path / "store"
    assert ingest(capsys, first, "--out", store, "--size", str(SIZE)).code == 0
    shard = store / SHARDS_DIR / "late"
    process = start_ingest(second, "--out", store, "--shard", "late", "--size", str(SIZE))
    kill_after_commits(process, shard / VIDEOS_FILE, 3)
    partial = FrameStore.open(store)
    for index, video in enumerate(partial.videos):
        assert partial.video_frames(index).tobytes() == reference[video.id], video.id
    committed = partial.num_videos - 8
    result = ingest(capsys, first, second, "--out", store, "--shard", "late")
    assert result.code == 0, result.err
    assert f"{8 - committed} added, {8 + committed} already in store" in result.out
    done = FrameStore.open(store)
    _same_videos(done, reference)
    shard_frames = sum(v.num_frames for v, part in zip(done.videos, done.video_part) if part == 1)
    assert (shard / FRAMES_FILE).stat().st_size == shard_frames * SIZE * SIZE


def test_a_full_disk_under_a_shard_keeps_its_committed_videos(
    corpus: tuple[Path, Path, dict[str, bytes]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    first, _, reference = corpus
    store = tmp_path / "store"
    shard = store / SHARDS_DIR / "s"

    fill_on_open(monkeypatch, store_module, lambda path: path == shard / FRAMES_FILE, room=20 * SIZE * SIZE)
    result = ingest(capsys, first, "--out", store, "--size", str(SIZE), "--shard", "s")
    assert result.code == 1
    assert "committed before are intact" in line_naming(result.err, shard / FRAMES_FILE)
    partial = FrameStore.open(store)
    assert 0 < partial.num_videos < 8
    assert (shard / FRAMES_FILE).stat().st_size == partial.num_frames * SIZE * SIZE
    for index, video in enumerate(partial.videos):
        assert partial.video_frames(index).tobytes() == reference[video.id], video.id
    monkeypatch.undo()
    assert ingest(capsys, first, "--out", store, "--shard", "s").code == 0
    assert stored_ids(store) == sorted(f"clip{seed:02d}" for seed in range(8))


def test_one_writer_per_shard_and_writers_of_other_parts_side_by_side(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = _videos(tmp_path / "videos", range(2))
    store = tmp_path / "store"
    with FrameStoreWriter(store, SIZE, shard="busy"), FrameStoreWriter(store, SIZE):
        result = ingest(capsys, source, "--out", store, "--shard", "busy")
        assert result.code == 2 and "another sonocl process is writing to this shard" in result.err
        assert ingest(capsys, source, "--out", store, "--shard", "free").code == 0  # the root part's writer too
    assert stored_ids(store) == ["clip00", "clip01"]
    with pytest.raises(StoreError, match="shard name '../up'"):
        FrameStoreWriter(store, SIZE, shard="../up")


def _list_shard(args: tuple[Path, str]) -> None:
    add_shard(*args)


def test_shards_listed_at_the_same_moment_are_all_listed(tmp_path: Path) -> None:
    store = tmp_path / "store"
    with FrameStoreWriter(store, SIZE):
        pass
    names = [f"s{index:02d}" for index in range(12)]
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        pool.map(_list_shard, [(store, name) for name in names])
    assert sorted(shard["name"] for shard in read_meta(store)["shards"]) == names
    assert FrameStore.open(store).num_videos == 0  # listed shards without frames are empty parts


def test_the_same_file_ingested_into_two_shards_at_once_is_read_once(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (3, SIZE, SIZE), dtype=np.uint8)
    fields = dict(source="x.mp4", label=None, group="g", fps=None, original_size=(SIZE, SIZE),
                  crop_box=(0, 0, SIZE, SIZE), content_hash="h" * 64, timestamps=[0.0, 1.0, 2.0])  # fmt: skip
    store = tmp_path / "store"
    with FrameStoreWriter(store, SIZE, shard="a") as a, FrameStoreWriter(store, SIZE, shard="b") as b:
        a.add_video(iter(frames), id="x", **fields)  # b opened before a committed: it does not know x
        b.add_video(iter(frames[::-1]), id="x", **fields)
    opened = FrameStore.open(store)
    assert opened.num_videos == 1 and opened.duplicates == 1
    assert np.array_equal(opened.video_frames(0), frames)  # the first part's


def test_merge_links_every_part_seals_it_and_skips_what_the_store_holds(
    corpus: tuple[Path, Path, dict[str, bytes]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second, reference = corpus
    one, two, merged = tmp_path / "one", tmp_path / "two", tmp_path / "merged"
    assert ingest(capsys, first, "--out", one, "--size", str(SIZE)).code == 0
    assert ingest(capsys, second, "--out", two, "--size", str(SIZE), "--shard", "x").code == 0
    result = run_cli(capsys, "merge", one, two, "--out", merged)
    assert result.code == 0 and "16 videos added from 2 stores" in result.out, result.err
    store = FrameStore.open(merged)
    _same_videos(store, reference)
    shards = read_meta(merged)["shards"]
    assert [(s["name"], s["sealed"]) for s in shards] == [("one-root", True), ("two-x", True)]
    assert (merged / SHARDS_DIR / "one-root" / FRAMES_FILE).samefile(one / FRAMES_FILE)  # linked, not copied
    again = run_cli(capsys, "merge", one, "--out", merged)
    assert again.code == 0 and "0 videos added" in again.out
    with pytest.raises(StoreError, match="shard 'one-root' is sealed"):
        FrameStoreWriter(merged, shard="one-root")
    extra = _videos(tmp_path / "extra", range(20, 22))
    assert ingest(capsys, extra, "--out", one).code == 0  # the source appends to the linked frame file
    assert FrameStore.open(merged).num_videos == 16  # the merged store reads only what it listed
    _same_videos(FrameStore.open(merged), reference)
    bigger = tmp_path / "bigger"
    assert ingest(capsys, extra, "--out", bigger, "--size", "48").code == 0
    refused = run_cli(capsys, "merge", bigger, "--out", merged)
    assert refused.code == 2 and "holds 48px frames" in refused.err
    assert (merged / META_FILE).exists() and FrameStore.open(merged).num_videos == 16
