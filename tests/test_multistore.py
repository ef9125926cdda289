"""Pretraining on several stores at once (``--store A --store B``): one table over both, frames of different stored
sizes in one batch, pairs balanced per store, provenance per store, and the leak guard across stores by content."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_pretrain, tiny_sets
from sonocl.cli import main
from sonocl.data.phantom import make_phantom, write_phantom_store
from sonocl.data.store import FrameStore, StoreError
from sonocl.data.store_writer import FrameStoreWriter
from sonocl.data.union import StoreUnion, open_stores
from sonocl.pairs import InstanceSampler

PRETRAIN = tiny_pretrain("--threads", "1", *tiny_sets(knn_frames=2))
EVALUATE = ["--protocol", "knn", "--folds", "3", "--fps", "0", "--frames-per-video", "4", "--device", "cpu"]


def _store(root: Path, size: int, seed: int, videos: int, copy_of: tuple[FrameStore, int] | None = None) -> FrameStore:
    """Phantom videos at ``size`` px (2 per patient); ``copy_of`` (store, video) adds that video again, as a second
    ingest of the same file would: the same frames and content hash under another id."""
    with FrameStoreWriter(root, size) as writer:
        for video in make_phantom(videos, 6, size, seed=seed):
            writer.add_video(
                video.frames, id=f"{root.name}-{video.name}", source=f"{video.name}.mp4", label=video.label,
                group=video.patient, fps=video.fps, timestamps=np.arange(len(video.frames)) / video.fps,
                original_size=(size, size), crop_box=(0, 0, size, size),
                content_hash=hashlib.sha256(video.frames.tobytes()).hexdigest(),
            )  # fmt: skip
        if copy_of is not None:
            other, index = copy_of
            record = other.videos[index]
            frames = [np.asarray(Image.fromarray(f).resize((size, size))) for f in other.video_frames(index)]
            writer.add_video(  # the hash is the source file's: a re-ingest at another size keeps it
                np.stack(frames), id=f"{root.name}-copy", source="copy.mp4", label=record.label,
                group="copied patient", fps=record.fps, timestamps=record.timestamps, original_size=(size, size),
                crop_box=(0, 0, size, size), content_hash=record.content_hash,
            )  # fmt: skip
    return FrameStore.open(root)


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> tuple[FrameStore, FrameStore]:
    """A (6 videos at 32 px) and B (12 videos at 48 px, one of them a copy of A's first video)."""
    root = tmp_path_factory.mktemp("stores")
    a = _store(root / "a", 32, seed=1, videos=6)
    return a, _store(root / "b", 48, seed=2, videos=11, copy_of=(a, 0))


def test_a_union_reads_both_stores_as_one_at_the_larger_size(stores) -> None:
    a, b = stores
    union = open_stores([a.root, b.root])
    assert isinstance(union, StoreUnion) and isinstance(open_stores([a.root]), FrameStore)
    assert (union.num_videos, union.num_frames, union.size) == (18, a.num_frames + b.num_frames, 48)
    assert union.video_source.tolist() == [0] * 6 + [1] * 12 and union.roots == [a.root, b.root]
    frames = union.gather(np.array([[b.num_frames - 1 + a.num_frames, 0]]))
    assert frames.shape == (1, 2, 48, 48) and frames.dtype == np.uint8
    assert np.array_equal(frames[0, 0], b.frame(b.num_frames - 1))  # B's frame as stored
    up = frames[0, 1].astype(float)
    assert abs(up.mean() - a.frame(0).mean()) < 2.0 and up.std() > 0  # A's frame resized, not blank
    groups = union.group_codes()
    assert not set(groups[:6]) & set(groups[6:])  # patients of two stores never share a group id
    assert union.label_codes()[1] == ["covid", "pneumonia", "regular"]


def test_pairs_are_balanced_per_store_or_as_weighted(stores) -> None:
    a, b = stores
    for weights, expected in (((), 0.5), ((3.0, 1.0), 0.75)):
        union = StoreUnion([a, b], weights or None)
        sampler = InstanceSampler(union, np.arange(union.num_videos), 3, seed=0, items="videos")
        from_a = [
            int((union.video_source[batch.video] == 0).sum()) for epoch in range(4) for batch in sampler.batches(epoch)
        ]
        drawn = 3 * len(sampler) * 4
        assert sum(from_a) / drawn == pytest.approx(expected, abs=0.1)
        assert sampler.source_items().tolist() == [round(18 * expected), 18 - round(18 * expected)]
    alone = InstanceSampler(a, np.arange(6), 3, seed=0, items="videos")
    order = np.random.default_rng([0, 0]).permutation(6)
    assert [v for batch in alone.batches(0) for v in batch.video] == order.tolist()  # one store: as before


def test_bad_store_lists_are_one_line(stores, tmp_path: Path, capsys) -> None:
    a, b = stores
    with pytest.raises(StoreError, match="named twice with --store"):
        open_stores([a.root, a.root])
    with pytest.raises(StoreError, match=r"store weights must be finite and > 0; .*b: 0.0"):
        open_stores([a.root, b.root], [1.0, 0.0])
    argv = ["pretrain", "--store", str(a.root), "--store", str(b.root), "--store-weights", "1", "--method", "simclr"]
    assert main([*argv, "--out", str(tmp_path / "run"), *PRETRAIN]) == 2
    assert "--store-weights: 1 weights for 2 stores" in capsys.readouterr().err


@pytest.fixture(scope="module")
def union_run(stores, tmp_path_factory) -> Path:
    a, b = stores
    out = tmp_path_factory.mktemp("union") / "run"
    argv = ["pretrain", "--store", str(a.root), "--store", str(b.root), "--method", "uscl", "--label-rate", "0"]
    assert main([*argv, "--out", str(out), *PRETRAIN]) == 0
    return out


def test_a_run_on_two_stores_records_each_store(union_run: Path, stores, capsys) -> None:
    a, b = stores
    provenance = json.loads((union_run / "provenance.json").read_text())
    assert provenance["stores"] == [str(a.root.resolve()), str(b.root.resolve())]
    per_store = {Path(entry["store"]).name: entry for entry in provenance["per_store"]}
    assert (per_store["a"]["videos"], per_store["b"]["videos"]) == (6, 12)
    assert per_store["a"]["share_of_pairs"] + per_store["b"]["share_of_pairs"] == pytest.approx(1.0)
    assert abs(per_store["a"]["share_of_pairs"] - 0.5) < 0.1  # balanced although B has twice the videos
    for name, store in (("a", a), ("b", b)):
        seen = set(per_store[name]["trained_on"]) | set(per_store[name]["held_out"])
        assert seen <= {video.content_hash for video in store.videos} and seen
    assert set(provenance["trained_on"]) == set(per_store["a"]["trained_on"]) | set(per_store["b"]["trained_on"])
    config = (union_run / "config.yaml").read_text()
    assert str(a.root.resolve()) in config and str(b.root.resolve()) in config


def test_the_leak_guard_matches_a_video_across_stores_by_content(stores, tmp_path: Path, capsys) -> None:
    """An encoder pretrained on A, evaluated on B, which holds a copy of one of A's videos: that copy is counted."""
    a, b = stores
    run = tmp_path / "on-a"
    assert main(["pretrain", "--store", str(a.root), "--method", "uscl", "--label-rate", "0", "--out", str(run),
                 *PRETRAIN, "--val-fraction", "0"]) == 0  # fmt: skip
    out = tmp_path / "eval"
    assert main(["evaluate", "--store", str(b.root), "--init", str(run), *EVALUATE, "--out", str(out)]) == 0
    overlap = json.loads((out / "results.json").read_text())["inits"][0]["pretraining_overlap"]
    assert (overlap["seen"], overlap["test_videos"], overlap["labels_seen"]) == (1, 12, 0)
    assert "1 of 12 test videos seen" in overlap["note"]
    assert "| a; 1 of 12 test videos seen |" in (out / "results.md").read_text()  # where it was pretrained, per row
    labelled = tmp_path / "labelled-on-a"  # USCL's semi-supervised term read A's labels: the copy in B is a leak
    assert main(["pretrain", "--store", str(a.root), "--method", "uscl", "--out", str(labelled), *PRETRAIN,
                 "--val-fraction", "0"]) == 0  # fmt: skip
    capsys.readouterr()
    assert (
        main(["evaluate", "--store", str(b.root), "--init", str(labelled), *EVALUATE, "--out", str(tmp_path / "x")])
        == 2
    )
    assert "pretraining used the labels of 1" in capsys.readouterr().err


def test_a_saved_configuration_of_one_store_still_loads(union_run: Path, tmp_path: Path) -> None:
    from sonocl.train.config import load_run_config

    text = (union_run / "config.yaml").read_text()
    lines = text.splitlines()
    start = lines.index("store:")
    one = [*lines[:start], f"store: {lines[start + 1].split('- ', 1)[1]}", *lines[start + 3 :]]
    (tmp_path / "config.yaml").write_text("\n".join(one) + "\n")
    assert len(load_run_config(tmp_path / "config.yaml").store) == 1  # runs of sonocl before several stores


def test_a_study_pretrains_each_fold_on_both_stores_without_the_folds_test_videos(stores, tmp_path: Path) -> None:
    """Multi-source per fold: B's test videos are left out of A too (B holds a copy of one of A's videos)."""
    a, b = stores
    pretrain = " ".join(["--method", "uscl", "--label-rate", "0", *PRETRAIN, "--val-fraction", "0"])
    out = tmp_path / "study"
    argv = ["study", "--store", str(b.root), "--also-store", str(a.root), "--pretrain", pretrain, *EVALUATE]
    assert main([*argv, "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["inits"][0]["pretraining_overlap"]["seen"] == 0
    copy = next(video.content_hash for video in b.videos if video.id.endswith("-copy"))
    for run in sorted((out / "pretrain").glob("seed0_fold*")):
        provenance = json.loads((run / "provenance.json").read_text())
        assert [Path(store).name for store in provenance["stores"]] == ["b", "a"]
        tested = {b.videos[i].content_hash for i, v in enumerate(b.videos) if v.id in _test_ids(results, run.name)}
        assert not tested & set(provenance["trained_on"])  # the copy's original in A too, when the copy is tested
        if copy in tested:
            assert copy not in {h for entry in provenance["per_store"] for h in entry["trained_on"]}


def _test_ids(results: dict, name: str) -> set[str]:
    fold = int(name.rsplit("fold", 1)[1])
    return {i for run in results["inits"][0]["runs"] if run["fold"] == fold for i in run["test_video_ids"]}


def test_two_ingests_in_other_orders_split_and_draw_the_same_videos(tmp_path: Path) -> None:
    """Ingest commits videos as its workers finish: pretraining on either store holds out and draws the same videos."""
    from conftest import make_sampler, method_config
    from sonocl.train.replay import split_videos

    videos = make_phantom(12, 4, 32, seed=7)
    hashes_by_store = []
    for name, order in (("forward", videos), ("backward", videos[::-1])):
        store = write_phantom_store(tmp_path / name, order, 32)
        kept, held = split_videos(method_config("uscl"), store)
        batches = make_sampler("uscl", store, kept, 4, seed=0).batches(0)
        hash_of = [video.content_hash for video in store.videos]
        hashes_by_store.append(
            ([hash_of[v] for v in kept], [hash_of[v] for v in held], [[hash_of[v] for v in b.video] for b in batches])
        )
    assert hashes_by_store[0] == hashes_by_store[1]


def test_info_of_a_run_names_each_store_and_its_share(union_run: Path, stores, capsys) -> None:
    a, b = stores
    assert main(["info", str(union_run)]) == 0
    text = capsys.readouterr().out
    assert "uscl, " in text and f"  {a.root.resolve()}: 6 videos, " in text and "% of the pairs" in text
    assert main(["info", str(union_run), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [entry["videos"] for entry in summary["stores"]] == [6, 12]
    assert sum(entry["trained_on"] + entry["held_out"] for entry in summary["stores"]) == 18
    assert summary["videos"]["labels_used"] == 0 and summary["method"] == "uscl"
