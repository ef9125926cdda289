"""Pair-sampler properties: pairs stay inside a video, mixing weights, distance bounds, groups, sharding."""

from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import make_sampler
from sonocl.data.store import FrameStore
from sonocl.data.store_writer import FrameStoreWriter
from sonocl.methods.awcl import AWCLSampler
from sonocl.methods.meta_uscl import MetaSetSampler
from sonocl.pairs import PairBatch

CLASSES = ("covid", "pneumonia", "regular")
ZONES = ("R1", "R2", "R3", "L1", "L2", "L3")


def _write_store(path, lengths, fps=10.0, labels=None, anatomy=None, size=8):
    with FrameStoreWriter(path, size=size) as writer:
        for v, length in enumerate(lengths):
            frames = [np.full((size, size), (v * 7 + i) % 256, dtype=np.uint8) for i in range(length)]
            extra = {}
            if anatomy is not None and anatomy[v] is not None:
                extra = {"anatomy": anatomy[v], "anatomy_coarse": "right" if anatomy[v].startswith("R") else "left"}
            writer.add_video(
                frames,
                id=f"v{v:02d}",
                source=f"v{v:02d}.mp4",
                label=None if labels is None else labels[v],
                group=f"p{v // 2}",
                fps=fps,
                original_size=(size, size),
                crop_box=(0, 0, size, size),
                content_hash=f"h{v}",
                timestamps=[i / (fps or 1.0) for i in range(length)],
                extra_labels=extra,
            )
    return FrameStore.open(path)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """24 videos: short ones (1, 2, 3 frames) among 24-frame ones; labels and anatomy zones (one unlabelled)."""
    lengths = [1, 2, 3] + [24] * 21
    labels = [CLASSES[v % 3] for v in range(24)]
    anatomy = [ZONES[v % 6] for v in range(24)]
    anatomy[5] = None
    return _write_store(tmp_path_factory.mktemp("pairs") / "store", lengths, labels=labels, anatomy=anatomy)


def _all(sampler, epoch=0) -> PairBatch:
    batches = sampler.batches(epoch)
    return PairBatch(
        frames=np.concatenate([b.frames for b in batches]),
        mix=np.concatenate([b.mix for b in batches]),
        augment_first=batches[0].augment_first,
        video=np.concatenate([b.video for b in batches]),
        positive_group=np.concatenate([b.positive_group for b in batches]),
        weight=np.concatenate([b.weight for b in batches]),
        label=np.concatenate([b.label for b in batches]),
    )


def _check_views_from_own_video(store, batch):
    assert np.all(store.frame_video[batch.frames] == batch.video[:, None])
    used = batch.mix.sum(axis=1) > 0
    assert np.allclose(batch.mix.sum(axis=2), 1.0, atol=1e-6)
    return used


def test_uscl_triplets_are_distinct_frames_of_one_video_with_shared_anchor(store):
    sampler = make_sampler("uscl", store, np.arange(24), batch_size=4, seed=3)
    for epoch in range(5):
        batch = _all(sampler, epoch)
        _check_views_from_own_video(store, batch)
        assert batch.augment_first and batch.frames.shape[1] == 3
        long = np.diff(store.video_offsets)[batch.video] >= 3
        assert all(len(set(row)) == 3 for row in batch.frames[long])
        lam = batch.mix[long, 0, 0]
        np.testing.assert_allclose(
            batch.mix[long],
            np.stack([np.stack([lam, 1 - lam, 0 * lam], 1), np.stack([0 * lam, 1 - lam, lam], 1)], 1),
            atol=1e-6,
        )
        assert np.array_equal(batch.positive_group, batch.video)
        assert len(np.unique(batch.video)) == len(batch.video)  # one item per video per epoch


def test_uscl_short_videos_fall_back(store):
    sampler = make_sampler("uscl", store, np.array([0, 1, 2, 3]), batch_size=4, seed=0)
    batch = sampler.batches(0)[0]
    by_video = {int(v): i for i, v in enumerate(batch.video)}
    one, two = by_video[0], by_video[1]
    assert np.all(batch.frames[one] == store.video_offsets[0])
    np.testing.assert_array_equal(batch.mix[one], [[1, 0, 0], [0, 1, 0]])  # two augmentations of the frame
    assert batch.frames[two, 0] != batch.frames[two, 1]
    np.testing.assert_array_equal(batch.mix[two], [[1, 0, 0], [0, 1, 0]])


def test_uscl_lambda_follows_beta_half_half(store):
    lams = np.concatenate(
        [_all(make_sampler("uscl", store, np.arange(3, 24), 7, seed=s), 0).mix[:, 0, 0] for s in range(60)]
    )
    # Beta(0.5, 0.5): mean 1/2, variance 1/8, U-shaped (a third of the mass below 0.067 or above 0.933).
    assert abs(lams.mean() - 0.5) < 0.04 and abs(lams.var() - 0.125) < 0.015
    assert 0.25 < np.mean((lams < 0.067) | (lams > 0.933)) < 0.42


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.5, 1.0])
def test_uscl_label_rate_gives_exact_count_fixed_for_the_run(store, rate):
    videos = np.arange(24)
    sampler = make_sampler("uscl", store, videos, batch_size=4, seed=9, label_rate=rate)
    assert len(sampler.labelled_videos) == math.ceil(24 * rate)
    codes, names = store.label_codes()
    assert sampler.class_names == names
    for epoch in range(2):
        batch = _all(sampler, epoch)
        labelled = batch.label >= 0
        assert set(batch.video[labelled]) == set(sampler.labelled_videos)
        assert np.array_equal(batch.label[labelled], codes[batch.video[labelled]])
    again = make_sampler("uscl", store, videos, batch_size=4, seed=9, label_rate=rate)
    assert np.array_equal(again.labelled_videos, sampler.labelled_videos)


@pytest.mark.parametrize("max_dist", [2, 5, 999])
def test_meta_uscl_triplets_are_ordered_within_max_dist(store, max_dist):
    sampler = make_sampler("meta-uscl", store, np.arange(24), batch_size=4, seed=1, max_dist=max_dist)
    for epoch in range(4):
        batch = _all(sampler, epoch)
        _check_views_from_own_video(store, batch)
        assert not batch.augment_first
        long = np.diff(store.video_offsets)[batch.video] >= 3
        f = batch.frames[long]
        assert np.all(f[:, 0] < f[:, 1]) and np.all(f[:, 1] < f[:, 2])
        assert np.all(f[:, 2] - f[:, 0] <= max_dist)
        alpha, beta = batch.mix[long, 0, 1], batch.mix[long, 1, 1]
        np.testing.assert_allclose(batch.mix[long, 0, 0], 1 - alpha, atol=1e-6)
        np.testing.assert_allclose(batch.mix[long, 1, 2], 1 - beta, atol=1e-6)
        assert np.all(batch.mix[long, 0, 2] == 0) and np.all(batch.mix[long, 1, 0] == 0)


def test_meta_uscl_fallbacks_and_beta_mean(store):
    sampler = make_sampler("meta-uscl", store, np.arange(24), batch_size=24, seed=0, max_dist=999)
    batch = sampler.batches(0)[0]
    row = {int(v): i for i, v in enumerate(batch.video)}
    assert np.all(batch.frames[row[0]] == store.video_offsets[0])  # one frame: frame 0 twice
    two = batch.frames[row[1]]
    assert {two[0], two[2]} == {store.video_offsets[1], store.video_offsets[1] + 1}
    np.testing.assert_array_equal(batch.mix[row[1]], [[1, 0, 0], [0, 0, 1]])
    alphas = np.concatenate(
        [_all(make_sampler("meta-uscl", store, np.arange(3, 24), 7, seed=s)).mix[:, 0, 1] for s in range(40)]
    )
    assert abs(alphas.mean() - 3 / 8) < 0.02  # Beta(3, 5)


def test_ivpp_pairs_within_seconds_and_weight_formula(tmp_path):
    store = _write_store(tmp_path / "ivpp", [40] * 8, fps=20.0)
    for seconds in (0.25, 1.0):
        sampler = make_sampler("ivpp", store, np.arange(8), batch_size=4, seed=2, delta_t=seconds, items="frames")
        batch = _all(sampler)
        _check_views_from_own_video(store, batch)
        first, second = batch.frames[:, 0], batch.frames[:, 1]
        assert np.all(first != second)
        assert np.all(np.abs(store.frame_time[first] - store.frame_time[second]) <= seconds + 1e-6)
        delta_max = int(seconds * 20)
        delta = np.abs(first - second)
        assert delta.max() == delta_max  # the bound is reached, not undershot
        np.testing.assert_allclose(batch.weight, (delta_max - delta + 1) / (delta_max + 1), rtol=1e-6)
        np.testing.assert_array_equal(batch.mix, np.broadcast_to(np.eye(2), (len(batch), 2, 2)))
        assert len(np.unique(first)) == len(first)  # items = frames: each frame once as anchor


def test_ivpp_weights_on_a_strided_store_equal_those_at_full_rate(tmp_path):
    """Every 4th frame of a 20 fps video, stored with its source fps and timestamps: same weights for the same times."""
    full = _write_store(tmp_path / "full", [80] * 4, fps=20.0)
    with FrameStoreWriter(tmp_path / "strided", size=8) as writer:
        for v in range(4):
            kept = range(0, 80, 4)
            writer.add_video(
                [full.frames[full.video_offsets[v] + i] for i in kept],
                id=f"v{v:02d}",
                source=f"v{v:02d}.mp4",
                label=None,
                group=f"p{v}",
                fps=20.0,
                original_size=(8, 8),
                crop_box=(0, 0, 8, 8),
                content_hash=f"s{v}",
                timestamps=[i / 20.0 for i in kept],
            )
    strided = FrameStore.open(tmp_path / "strided")
    batch = _all(make_sampler("ivpp", strided, np.arange(4), batch_size=4, seed=0, delta_t=1.0, items="frames"))
    gap = np.abs(strided.frame_time[batch.frames[:, 0]] - strided.frame_time[batch.frames[:, 1]])
    source_frames = np.rint(gap * 20.0)  # the distance the full-rate video has between the same two moments
    np.testing.assert_allclose(batch.weight, (20 - source_frames + 1) / 21, rtol=1e-6)
    assert batch.weight.min() < 0.3 and batch.weight.max() > 0.8  # spread over the window, not flat


def test_ivpp_lone_frame_pairs_with_itself(tmp_path):
    store = _write_store(tmp_path / "sparse", [3, 3], fps=0.2)  # frames 5 s apart
    batch = make_sampler("ivpp", store, np.arange(2), batch_size=2, seed=0).batches(0)[0]
    assert np.all(batch.frames[:, 0] == batch.frames[:, 1]) and np.all(batch.weight == 1)


def test_ivpp_refuses_videos_without_a_frame_rate_naming_them(tmp_path):
    """Times of a video whose rate is unknown count frames: δt in seconds would silently be δt frames."""
    from sonocl.errors import ConfigError

    store = _write_store(tmp_path / "no-rate", [4, 4, 1], fps=None)  # two clips and a still
    with pytest.raises(ConfigError, match=r"2 videos record no frame rate \(v00, v01\).*--frame-rate"):
        make_sampler("ivpp", store, np.arange(3), batch_size=2, seed=0)


def test_awcl_positives_by_anatomy_and_unlabelled_never_share_a_group(store):
    sampler = make_sampler("awcl", store, np.arange(24), batch_size=16, seed=0, anatomy_ratio=0.5)
    assert sampler.class_names == sorted(ZONES)
    batch = _all(sampler)
    anatomy = np.array([store.videos[v].extra_labels.get("anatomy", "") for v in batch.video])
    labelled = batch.label >= 0
    assert np.all(anatomy[labelled] == np.array(sampler.class_names)[batch.label[labelled]])
    assert np.array_equal(batch.positive_group[labelled], batch.label[labelled])
    unlabelled_groups = batch.positive_group[~labelled]
    assert len(np.unique(unlabelled_groups)) == len(unlabelled_groups)
    assert np.all(unlabelled_groups >= len(sampler.class_names))
    assert 0.35 < labelled.mean() < 0.6
    assert np.any(batch.video == 5) and np.all(batch.label[batch.video == 5] == -1)  # no anatomy: never labelled


@pytest.mark.parametrize("ratio", [0.0, 1.0])
def test_awcl_anatomy_ratio_extremes(store, ratio):
    videos = np.delete(np.arange(24), 5)  # all with anatomy
    batch = _all(make_sampler("awcl", store, videos, batch_size=8, seed=4, anatomy_ratio=ratio))
    if ratio == 0.0:
        assert np.all(batch.label == -1) and len(np.unique(batch.positive_group)) == len(batch)
    else:
        assert np.all(batch.label >= 0)


def test_awcl_coarse_level_from_map_and_column(store):
    coarse_map = {z: ("right" if z.startswith("R") else "left") for z in ZONES}
    by_map = AWCLSampler(store, np.arange(24), 8, 0, anatomy_level="coarse", coarse_map=coarse_map)
    by_column = make_sampler("awcl", store, np.arange(24), 8, seed=0, anatomy_level="coarse")
    assert by_map.class_names == by_column.class_names == ["left", "right"]
    assert np.array_equal(_all(by_map).positive_group, _all(by_column).positive_group)
    with pytest.raises(ValueError, match="no entry"):
        AWCLSampler(store, np.arange(24), 8, 0, anatomy_level="coarse", coarse_map={"R1": "right"})


def test_simclr_items_unique_groups_across_ranks(store):
    shards = [_all(make_sampler("simclr", store, np.arange(24), 5, seed=1, rank=r, world_size=3)) for r in range(3)]
    groups = np.concatenate([s.positive_group for s in shards])
    assert len(np.unique(groups)) == len(groups)
    for shard in shards:
        np.testing.assert_array_equal(shard.mix, np.ones((len(shard), 2, 1)))
        assert not shard.augment_first


@pytest.mark.parametrize("method", ["simclr", "uscl", "meta-uscl", "ivpp", "awcl"])
def test_rank_shards_disjoint_equal_and_equal_to_one_process(store, method):
    one = make_sampler(method, store, np.arange(24), batch_size=6, seed=5)
    ranks = [make_sampler(method, store, np.arange(24), batch_size=3, seed=5, rank=r, world_size=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(one)
    for epoch in range(2):
        whole = one.batches(epoch)
        shards = [r.batches(epoch) for r in ranks]
        key = (lambda b: b.frames[:, 0]) if one.items == "frames" else (lambda b: b.video)
        items = [np.concatenate([key(b) for b in s]) for s in shards]
        assert len(set(items[0]) | set(items[1])) == len(items[0]) + len(items[1])  # disjoint, no repeats
        for step, batch in enumerate(whole):
            np.testing.assert_array_equal(
                batch.frames, np.concatenate([shards[0][step].frames, shards[1][step].frames])
            )
            np.testing.assert_array_equal(batch.mix, np.concatenate([shards[0][step].mix, shards[1][step].mix]))


@pytest.mark.parametrize("method", ["simclr", "uscl", "meta-uscl", "ivpp", "awcl"])
def test_deterministic_by_seed_and_epoch(store, method):
    a, b = (make_sampler(method, store, np.arange(24), 4, seed=11) for _ in range(2))
    assert np.array_equal(_all(a, 3).frames, _all(b, 3).frames)
    assert np.array_equal(_all(a, 3).mix, _all(b, 3).mix)
    assert not np.array_equal(_all(a, 3).frames, _all(a, 4).frames)
    c = make_sampler(method, store, np.arange(24), 4, seed=12)
    assert not np.array_equal(_all(a, 3).frames, _all(c, 3).frames)


def test_items_option_and_drop_last(store):
    by_video = make_sampler("simclr", store, np.arange(24), 5, seed=0, items="videos")
    assert len(by_video) == 24 // 5 and all(len(b) == 5 for b in by_video.batches(0))
    by_frame = make_sampler("uscl", store, np.arange(24), 5, seed=0, items="frames")
    assert len(by_frame) == store.num_frames // 5
    with pytest.raises(ValueError, match="items"):
        make_sampler("simclr", store, np.arange(24), 5, seed=0, items="clips")
    with pytest.raises(ValueError, match="unknown method"):
        make_sampler("simsiam", store, np.arange(24), 5, seed=0)
    with pytest.raises(ValueError, match="batch"):
        make_sampler("uscl", store, np.arange(4), 3, seed=0, world_size=2)


@pytest.mark.parametrize("meta_frame", ["first", "random"])
def test_meta_set_pairs(store, meta_frame):
    held_out = np.arange(18, 24)
    sampler = MetaSetSampler(store, held_out, batch_size=4, seed=0, meta_frame=meta_frame)
    batch = sampler.batch(0, 0)
    assert set(batch.video) <= set(held_out) and batch.frames.shape == (4, 1)
    assert np.array_equal(batch.positive_group, batch.video)
    first = store.video_offsets[batch.video]
    draws = np.concatenate(
        [sampler.batch(0, s).frames[:, 0] - store.video_offsets[sampler.batch(0, s).video] for s in range(10)]
    )
    if meta_frame == "first":
        assert np.all(batch.frames[:, 0] == first) and np.all(draws == 0)
    else:
        assert len(np.unique(draws)) > 3
    assert np.array_equal(
        sampler.batch(2, 5).frames, MetaSetSampler(store, held_out, 4, 0, meta_frame=meta_frame).batch(2, 5).frames
    )
    big = MetaSetSampler(store, held_out, batch_size=5, seed=0, rank=1, world_size=2).batch(0, 0)
    assert len(big) == 5  # 10 > 6 videos: drawn with replacement
