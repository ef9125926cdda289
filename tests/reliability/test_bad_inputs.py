"""Bad inputs, one kind per test: each is named on one line of stderr with what is wrong, never a traceback,
and the run goes on where it can (the good file beside a bad one still goes in).

Kinds: broken media files (`BAD_MEDIA`), odd but valid media that must go in (`ODD_MEDIA`), label CSVs,
stores, and the other commands' inputs (pretrain, evaluate, segment). docs/reliability.md counts them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import JPEGLSLossless
from reliability_support import (
    INIT_COMMANDS,
    good_video,
    ingest,
    line_naming,
    random_store,
    run_cli,
    stored_ids,
    with_init,
    write_audio_only,
    write_empty_video_stream,
    write_mixed_sizes,
    write_png_header,
)

from sonocl.data.store import FRAMES_FILE, META_FILE, REPORT_FILE, VIDEOS_FILE, FrameStore
from test_decode import scan_frames, write_dicom, write_video


@dataclass(frozen=True)
class BadMedia:
    """A broken file with a media name, and words its one-line skip message must hold."""

    name: str
    make: Callable[[Path], object]
    reason: str


def _truncated_mp4(path: Path) -> None:
    whole = write_video(path, scan_frames(20, 32, 32)).read_bytes()
    path.write_bytes(whole[: len(whole) // 2])


def _dicom_claiming_frames(path: Path) -> None:
    write_dicom(path, scan_frames(3, 16, 16))
    header = pydicom.dcmread(path)
    header.NumberOfFrames = 100_000
    header.save_as(path)


def _dicom_cut_short(path: Path) -> None:
    write_dicom(path, scan_frames(4, 32, 32))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1500])


def _dicom_private_syntax(path: Path) -> None:
    write_dicom(path, scan_frames(2, 16, 16))
    header = pydicom.dcmread(path)
    header.file_meta.TransferSyntaxUID = "1.2.826.0.1.3680043.9.9999.1"
    pydicom.dcmwrite(path, header, implicit_vr=False, little_endian=True)


def _dangling_link(path: Path) -> None:
    os.symlink(path.parent / "moved-away.mp4", path)


BAD_MEDIA = [
    BadMedia("zero_bytes.mp4", lambda path: path.write_bytes(b""), "empty file (0 bytes)"),
    BadMedia("truncated.mp4", _truncated_mp4, "not a readable video"),
    BadMedia("text.mp4", lambda path: path.write_text("this is not a video\n"), "not a readable video"),
    BadMedia("noise.mov", lambda path: path.write_bytes(np.random.default_rng(0).bytes(4096)), "not a readable video"),
    BadMedia("audio_only.mp4", write_audio_only, "holds no video stream"),
    BadMedia("no_frames.avi", write_empty_video_stream, "no decodable frame"),
    BadMedia("header_only.gif", lambda path: path.write_bytes(b"GIF89a"), "not a readable video"),
    BadMedia("mixed_sizes.mpeg", write_mixed_sizes, "frame size changes from (32, 32) to (48, 64)"),
    BadMedia("claims_100000_frames.dcm", _dicom_claiming_frames, "holds 3 of the 100000 frames"),
    BadMedia("cut_short.dcm", _dicom_cut_short, "holds 2 of the 4 frames"),
    BadMedia(
        "no_pixels.dcm", lambda path: write_dicom(path, scan_frames(1, 8, 8), with_pixels=False), "without pixel data"
    ),
    BadMedia(
        "private_syntax.dcm", _dicom_private_syntax, "transfer syntax 1.2.826.0.1.3680043.9.9999.1 is not supported"
    ),
    BadMedia("text.dcm", lambda path: path.write_text("not DICOM\n"), "pixel data"),
    BadMedia("one_pixel.png", lambda path: Image.new("L", (1, 1), 120).save(path), "1×1 pixels are too small"),
    BadMedia("broken.png", lambda path: path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64), "not a readable image"),
    BadMedia("bomb.png", lambda path: write_png_header(path, 60_000, 60_000), "decompression bomb"),
    BadMedia(
        "video_named.png",
        lambda path: write_video(path.with_suffix(".mp4"), scan_frames(3, 16, 16)).rename(path),
        "not a readable image",
    ),
    BadMedia("dangling_link.mp4", _dangling_link, "which does not exist"),
    BadMedia("line\nbreak.avi", lambda path: path.write_text("junk"), "not a readable video"),
]


@pytest.mark.parametrize("bad", BAD_MEDIA, ids=[bad.name.replace("\n", "_") for bad in BAD_MEDIA])
def test_broken_media_file_is_named_and_the_rest_goes_in(
    bad: BadMedia, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "src"
    source.mkdir()
    bad.make(source / bad.name)
    good_video(source / "good.mp4")
    result = ingest(capsys, source, "--out", tmp_path / "store", "--size", "32")
    assert result.code == 3
    line = line_naming(result.err, source / bad.name)
    assert line.startswith("sonocl ingest: skipped ") and bad.reason in line, line
    assert stored_ids(tmp_path / "store") == ["good"]
    skipped = json.loads((tmp_path / "store" / REPORT_FILE).read_text())["skipped"]
    assert [entry["file"] for entry in skipped] == [str(source / bad.name)]


def test_dicom_compression_without_its_plugin_names_the_syntax(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """JPEG-LS: refused by name without a plugin; with one installed, its (fake) pixel data is refused as unreadable."""
    source = tmp_path / "src"
    source.mkdir()
    write_dicom(source / "jpeg_ls.dcm", scan_frames(2, 16, 16), syntax=JPEGLSLossless)
    good_video(source / "good.mp4")
    result = ingest(capsys, source, "--out", tmp_path / "store", "--size", "32")
    assert result.code == 3
    line = line_naming(result.err, source / "jpeg_ls.dcm")
    assert "JPEG-LS" in line and "pip install" in line or "pixel data unreadable" in line, line


def test_whole_corpus_at_once_with_two_workers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The parallel path: every broken file named once, each good one in."""
    source = tmp_path / "src"
    source.mkdir()
    for bad in BAD_MEDIA:
        bad.make(source / bad.name)
    for seed in range(3):
        good_video(source / f"good{seed}.mp4", seed=seed)
    result = ingest(capsys, source, "--out", tmp_path / "store", "--size", "32", workers=2)
    assert result.code == 3
    for bad in BAD_MEDIA:
        assert bad.reason in line_naming(result.err, source / bad.name)
    assert stored_ids(tmp_path / "store") == ["good0", "good1", "good2"]


def _sixteen_bit(path: Path) -> None:
    Image.fromarray(scan_frames(1, 24, 24)[0].astype(np.uint16) * 200).save(path)


ODD_MEDIA: list[tuple[str, Callable[[Path], object], int]] = [
    ("one_frame.mp4", lambda path: write_video(path, scan_frames(1, 32, 32)), 1),
    ("sixteen_bit.png", _sixteen_bit, 1),
    ("palette.png", lambda path: Image.fromarray(scan_frames(1, 24, 24)[0]).convert("P").save(path), 1),
    ("rgba.png", lambda path: Image.fromarray(scan_frames(1, 24, 24)[0]).convert("RGBA").save(path), 1),
    ("cmyk.jpg", lambda path: Image.fromarray(scan_frames(1, 24, 24)[0]).convert("CMYK").save(path), 1),
    ("sixteen_bit.dcm", lambda path: write_dicom(path, scan_frames(3, 24, 24).astype(np.uint16) * 257), 3),
    ("naïve name with spaces.mp4", lambda path: write_video(path, scan_frames(2, 32, 32)), 2),
]


@pytest.mark.parametrize(("name", "make", "frames"), ODD_MEDIA, ids=[name for name, _, _ in ODD_MEDIA])
def test_odd_but_valid_media_goes_in(
    name: str, make: Callable[[Path], object], frames: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make(tmp_path / name)
    result = ingest(capsys, tmp_path / name, "--out", tmp_path / "store", "--size", "32")
    assert result.code == 0, result.err
    store = FrameStore.open(tmp_path / "store")
    assert [video.num_frames for video in store.videos] == [frames]
    assert store.frames.std() > 0, "the pixels went in as a blank frame"


# ---- label CSVs -------------------------------------------------------------------------------------------------


@pytest.fixture()
def three_videos(tmp_path: Path) -> Path:
    source = tmp_path / "videos"
    source.mkdir()
    for seed, name in enumerate("abc"):
        good_video(source / f"{name}.mp4", seed=seed)
    return source


def _ingest_with_csv(
    capsys: pytest.CaptureFixture[str], source: Path, csv: Path
) -> tuple[int, str, dict[str, str | None]]:
    store = source.parent / "store"
    result = ingest(capsys, source, "--out", store, "--size", "32", "--labels", csv)
    labels = {video.id: video.label for video in FrameStore.open(store).videos} if (store / META_FILE).exists() else {}
    return result.code, result.err, labels


@pytest.mark.parametrize(
    ("content", "encoding"),
    [
        ("\ufefffile,label\na,covid\nb,regular\nc,covid\n", "utf-8"),
        ("file;label\na;covid\nb;regular\nc;covid\n", "utf-8"),
        ("file,label\na,covid\nb,regular\nc,covid\na,covid\n", "utf-8"),
    ],
    ids=["byte-order-mark", "semicolons", "identical-duplicate-row"],
)
def test_csv_variants_that_must_just_work(
    content: str, encoding: str, three_videos: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv = three_videos.parent / "labels.csv"
    csv.write_bytes(content.encode(encoding))
    code, err, labels = _ingest_with_csv(capsys, three_videos, csv)
    assert code == 0, err
    assert labels == {"a": "covid", "b": "regular", "c": "covid"}


def test_csv_in_windows_encoding_keeps_its_accents(three_videos: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv = three_videos.parent / "labels.csv"
    csv.write_bytes("file,label\na,épanchement\nb,regular\nc,covid\n".encode("cp1252"))
    code, err, labels = _ingest_with_csv(capsys, three_videos, csv)
    assert code == 0, err
    assert labels["a"] == "épanchement"


def test_csv_ids_naming_no_file_are_noted(three_videos: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv = three_videos.parent / "labels.csv"
    csv.write_text("file,label\na,covid\nb,regular\nc,covid\nmissing_scan,covid\nother,regular\n")
    code, err, labels = _ingest_with_csv(capsys, three_videos, csv)
    assert code == 0 and labels == {"a": "covid", "b": "regular", "c": "covid"}
    line = line_naming(err, csv)
    assert "2 ids name no file being ingested ('missing_scan', 'other')" in line


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            "file,label\na,covid\nb,regular\na,regular\n",
            "'a' is on lines 2 and 4, which differ in label 'covid' vs 'regular'",
        ),
        ("file,patient\na,p1\nb,p2\n", "no label column found"),
        ("scan_name,label\nx,covid\ny,regular\n", "no column holds the names of the files"),
        ("", "has no header row"),
    ],
    ids=["conflicting-duplicate-ids", "missing-label-column", "missing-id-column", "empty-file"],
)
def test_csv_that_cannot_be_used_is_refused_by_name(
    content: str, message: str, three_videos: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv = three_videos.parent / "labels.csv"
    csv.write_text(content)
    code, err, _ = _ingest_with_csv(capsys, three_videos, csv)
    assert code == 2
    assert message in line_naming(err, csv)
    assert not (three_videos.parent / "store").exists()


def test_conflicting_groups_keep_the_video_as_its_own_group_without_showing_the_patient_ids(
    three_videos: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One recording listed under two patients (POCUS's `Reg-nephropocus`): the label is kept, the group dropped."""
    csv = three_videos.parent / "labels.csv"
    csv.write_text("file,label,patient\na,covid,PATIENT-1111\nb,regular,PATIENT-2222\na,covid,PATIENT-3333\n")
    code, err, _ = _ingest_with_csv(capsys, three_videos, csv)
    assert code == 0
    assert "different groups" in line_naming(err, csv) and "its own" in line_naming(err, csv)
    assert "PATIENT-" not in err
    store = FrameStore.open(three_videos.parent / "store")
    video = next(v for v in store.videos if v.id.startswith("a"))
    assert video.label == "covid" and video.group == video.id


def test_class_with_a_single_video_is_named_by_evaluate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = random_store(tmp_path / "store", ["a", "a", "a", "b", "b", "b", "lonely"])
    result = run_cli(
        capsys,
        "evaluate",
        "--store",
        store,
        "--init",
        "random",
        "--protocol",
        "knn",
        "--folds",
        "2",
        "--out",
        tmp_path / "eval",
        "--device",
        "cpu",
    )
    assert result.code == 0
    warnings = [line for line in result.err.splitlines() if "warning" in line and "'lonely'" in line]
    assert len(warnings) == 1, result.err
    assert ("1 video" in warnings[0] or "1 group" in warnings[0]) and "fold" in warnings[0], warnings[0]


# ---- stores -------------------------------------------------------------------------------------------------------


@pytest.fixture()
def small_store(tmp_path: Path) -> Path:
    return random_store(tmp_path / "store", ["a", "b", "a", "b"])


@pytest.mark.parametrize(
    "command",
    [
        ["ingest", "{video}", "--out", "{file}"],
        ["info", "{file}"],
        ["pretrain", "--store", "{file}", "--method", "simclr", "--out", "{run}", "--threads", "1", "--no-progress"],
        ["evaluate", "--store", "{file}", "--init", "random", "--protocol", "knn", "--folds", "2", "--out", "{run}"],
        ["embed", "--store", "{file}", "--init", "random", "--out", "{run}.npz"],
    ],
    ids=lambda command: command[0],
)
def test_store_path_that_is_a_file(command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    not_a_store = tmp_path / "store.txt"
    not_a_store.write_text("a store was expected here\n")
    video = good_video(tmp_path / "scan.mp4")
    args = [part.format(video=video, file=not_a_store, run=tmp_path / "run") for part in command]
    result = run_cli(capsys, *args)
    assert result.code == 2
    line = line_naming(result.err, not_a_store)
    assert "must be a directory" in line or "not a sonocl frame store" in line, line


def _damage_header(store: Path) -> None:
    (store / META_FILE).write_text("{ not json")


def _future_format(store: Path) -> None:
    meta = json.loads((store / META_FILE).read_text())
    (store / META_FILE).write_text(json.dumps({**meta, "format": 99}))


def _cut_frames(store: Path) -> None:
    os.truncate(store / FRAMES_FILE, (store / FRAMES_FILE).stat().st_size // 2)


def _corrupt_record(store: Path) -> None:
    lines = (store / VIDEOS_FILE).read_bytes().splitlines(keepends=True)
    lines[1] = b'{"id": "v1", "truncated\n'
    (store / VIDEOS_FILE).write_bytes(b"".join(lines))


@pytest.mark.parametrize(
    ("damage", "named", "message"),
    [
        (_damage_header, META_FILE, "unreadable store header"),
        (_future_format, META_FILE, "store format 99, this sonocl reads formats 1 and 2"),
        (_cut_frames, FRAMES_FILE, "the store is damaged"),
        (_corrupt_record, VIDEOS_FILE, "corrupt record at byte"),
    ],
    ids=["unreadable-header", "future-format", "frames-cut-short", "corrupt-record"],
)
@pytest.mark.parametrize("command", ["info", "ingest"])
def test_damaged_store_is_named_by_every_reader_and_writer(
    damage: Callable[[Path], None],
    named: str,
    message: str,
    command: str,
    small_store: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    damage(small_store)
    args = (
        ["info", small_store]
        if command == "info"
        else ["ingest", good_video(tmp_path / "new.mp4"), "--out", small_store, "--workers", "1"]
    )
    result = run_cli(capsys, *args)
    assert result.code == 2
    assert message in line_naming(result.err, small_store / named)


# ---- other commands' inputs ----------------------------------------------------------------------------------------


def test_pretrain_with_fewer_videos_than_the_batch(
    small_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = run_cli(
        capsys,
        "pretrain",
        "--store",
        small_store,
        "--method",
        "uscl",
        "--out",
        tmp_path / "run",
        "--epochs",
        "1",
        "--size",
        "32",
        "--batch-size",
        "16",
        "--threads",
        "1",
        "--no-progress",
        "--device",
        "cpu",
    )
    assert result.code == 2
    assert "--batch-size" in result.err and "4" in result.err


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("epochs: 1\nbatch_sise: 8\n", "unknown configuration key(s) batch_sise"),
        ("epochs: many\n", "epochs: expected an integer, got 'many'"),
        ("optim:\n  lr: fast\n", "optim.lr: expected a number, got 'fast'"),
    ],
    ids=["unknown-key", "wrong-type", "wrong-nested-type"],
)
def test_pretrain_config_with_unknown_keys_or_wrong_types(
    config: str, message: str, small_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(config)
    result = run_cli(
        capsys, "pretrain", "--store", small_store, "--method", "simclr", "--config", path, "--out", tmp_path / "run"
    )
    assert result.code == 2
    assert message in result.err and len(result.err.strip().splitlines()) == 1, result.err


@pytest.mark.parametrize("command", INIT_COMMANDS)
def test_init_file_that_is_not_a_checkpoint(
    command: str, small_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = tmp_path / "weights.pt"
    fake.write_text("these are not weights\n")
    result = run_cli(capsys, *with_init(command, small_store, fake, tmp_path))
    assert result.code == 2
    assert "not a readable weights file" in line_naming(result.err, fake)


def test_segment_mask_of_the_wrong_size_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    images = tmp_path / "images"
    images.mkdir()
    for index in range(4):
        Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(images / f"scan{index}.png")
        shape = (20, 24) if index == 0 else (32, 32)
        Image.fromarray((rng.random(shape) > 0.5).astype(np.uint8) * 255).save(images / f"scan{index}_mask.png")
    result = run_cli(
        capsys,
        "segment",
        "--images",
        images,
        "--init",
        "random",
        "--folds",
        "2",
        "--size",
        "32",
        "--epochs",
        "1",
        "--out",
        tmp_path / "seg",
        "--device",
        "cpu",
    )
    assert result.code == 2
    assert "is 24×20 but the image is 32×32" in line_naming(result.err, images / "scan0_mask.png")
