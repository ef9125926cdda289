"""What ingest finds in a source folder, tried as a new user would: empty folders, linked folders, mask trees.

An empty folder (or one holding only masks) is an error naming it and what was looked for; folder
links are followed, a link loop ends with a note naming the link; masks are left out by the rule of
`sonocl segment` (`sonocl.data.mask_names`) and counted.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from reliability_support import good_video, ingest, line_naming, run_cli, stored_ids

from sonocl.data.store import REPORT_FILE, FrameStore


def test_empty_folder_is_an_error_naming_it_and_what_was_looked_for(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "README.txt").write_text("the scans are elsewhere\n")
    result = ingest(capsys, tmp_path / "empty", "--out", tmp_path / "store")
    assert result.code == 2
    line = line_naming(result.err, tmp_path / "empty")
    assert "no video, DICOM or image file found" in line and ".mp4" in line and ".dcm" in line
    assert not (tmp_path / "store").exists()


def test_one_empty_folder_among_good_ones_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "good").mkdir()
    good_video(tmp_path / "good" / "scan.mp4")
    (tmp_path / "typo").mkdir()
    result = ingest(capsys, tmp_path / "good", tmp_path / "typo", "--out", tmp_path / "store")
    assert result.code == 2
    assert "no video, DICOM or image file found" in line_naming(result.err, tmp_path / "typo")


def test_folder_of_masks_only_says_the_masks_were_left_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    masks = tmp_path / "masks"
    masks.mkdir()
    for index in range(3):
        Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(masks / f"scan{index}_mask.png")
    result = ingest(capsys, masks, "--out", tmp_path / "store")
    assert result.code == 2
    assert "left out: 3 mask files" in line_naming(result.err, masks)


def _busi_tree(root: Path) -> dict[str, int]:
    """``class/images/NAME.png`` beside ``class/mask/NAME_mask.png`` (and a stray ``NAME_mask_1.png`` among the
    images), of different sizes as BUSI's are; returns the number of images per class."""
    rng = np.random.default_rng(0)
    counts = {"benign": 3, "malignant": 2}
    for label, count in counts.items():
        (root / label / "images").mkdir(parents=True)
        (root / label / "mask").mkdir()
        for index in range(1, count + 1):
            shape = (40 + 4 * index, 48)
            Image.fromarray(rng.integers(30, 220, shape, dtype=np.uint8)).save(
                root / label / "images" / f"{label} ({index}).png"
            )
            Image.fromarray((rng.random(shape) > 0.5).astype(np.uint8) * 255).save(
                root / label / "mask" / f"{label} ({index})_mask.png"
            )
        Image.fromarray(np.zeros((44, 48), dtype=np.uint8)).save(root / label / "images" / f"{label} (1)_mask_1.png")
    return counts


def test_busi_tree_stores_images_only_and_counts_the_masks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    counts = _busi_tree(tmp_path / "busi")
    result = ingest(capsys, tmp_path / "busi", "--out", tmp_path / "store", "--size", "32", "--label-from-folder")
    assert result.code == 0, result.err
    store = FrameStore.open(tmp_path / "store")
    assert sorted(video.label for video in store.videos) == sorted(
        label for label, n in counts.items() for _ in range(n)
    )
    assert not any("mask" in video.id for video in store.videos)
    masks = sum(counts.values()) + len(counts)
    assert f"{masks} mask files left out" in result.out
    assert json.loads((tmp_path / "store" / REPORT_FILE).read_text())["left_out"]["masks"] == masks


def test_class_folders_that_are_links_are_followed_and_labelled(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for seed, label in enumerate(("benign", "normal")):
        (tmp_path / "elsewhere" / label).mkdir(parents=True)
        good_video(tmp_path / "elsewhere" / label / "scan.mp4", seed=seed)
        (tmp_path / "data").mkdir(exist_ok=True)
        os.symlink(tmp_path / "elsewhere" / label, tmp_path / "data" / label)
    result = ingest(capsys, tmp_path / "data", "--out", tmp_path / "store", "--size", "32", "--label-from-folder")
    assert result.code == 0, result.err
    labels = {video.id: video.label for video in FrameStore.open(tmp_path / "store").videos}
    assert labels == {"benign/scan": "benign", "normal/scan": "normal"}


def test_a_link_loop_ends_with_a_note_naming_the_link(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "data" / "inner").mkdir(parents=True)
    good_video(tmp_path / "data" / "inner" / "scan.mp4")
    os.symlink(tmp_path / "data", tmp_path / "data" / "inner" / "back")
    result = ingest(capsys, tmp_path / "data", "--out", tmp_path / "store", "--size", "32")
    assert result.code == 0, result.err
    assert "searched already" in line_naming(result.err, tmp_path / "data" / "inner" / "back")
    assert stored_ids(tmp_path / "store") == ["inner/scan"]
    report = json.loads((tmp_path / "store" / REPORT_FILE).read_text())
    assert report["left_out"]["links_not_followed"] == [
        {"link": str(tmp_path / "data" / "inner" / "back"), "target": str(tmp_path / "data")}
    ]


def test_a_folder_whose_files_are_all_unreadable_says_the_store_is_empty(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.mp4").write_text("not a video")
    (tmp_path / "junk" / "b.png").write_text("not an image")
    result = ingest(capsys, tmp_path / "junk", "--out", tmp_path / "store", "--size", "32")
    assert result.code == 3
    assert f"no file under {tmp_path / 'junk'} could be read; the store is empty" in result.err
    assert FrameStore.open(tmp_path / "store").num_videos == 0


def test_a_frame_folder_takes_its_rate_from_frame_rate_and_ivpp_refuses_one_without(tmp_path: Path, capsys) -> None:
    """Frame folders record no rate: stored as such (ivpp refuses them, naming --frame-rate), or at --frame-rate."""
    clip = tmp_path / "sources" / "clip"
    clip.mkdir(parents=True)
    for index in range(6):
        Image.fromarray(np.full((32, 32), 40 * index, dtype=np.uint8)).save(clip / f"frame{index}.png")
    good_video(tmp_path / "sources" / "scan.mp4")
    unknown, timed = tmp_path / "unknown", tmp_path / "timed"
    assert ingest(capsys, tmp_path / "sources", "--out", unknown, "--size", "32").code == 0
    assert ingest(capsys, tmp_path / "sources", "--out", timed, "--size", "32", "--frame-rate", "10").code == 0
    stored = {video.id: video for video in FrameStore.open(unknown).videos}
    assert stored["clip"].fps is None and stored["scan"].fps
    clip_timed = next(video for video in FrameStore.open(timed).videos if video.id == "clip")
    assert clip_timed.fps == 10 and list(clip_timed.timestamps) == pytest.approx([i / 10 for i in range(6)])

    pretrain = ["pretrain", "--method", "ivpp", "--size", "32", "--batch-size", "2", "--steps", "1", "--device", "cpu",
                "--no-progress", "--val-fraction", "0"]  # fmt: skip
    outcome = run_cli(capsys, *pretrain, "--store", unknown, "--out", tmp_path / "run")
    assert outcome.code == 2
    assert "record no frame rate (clip)" in line_naming(outcome.err, unknown) and "--frame-rate" in outcome.err
    assert run_cli(capsys, *pretrain, "--store", timed, "--out", tmp_path / "run-timed").code == 0
