"""Label CSVs joined by the right rule and refused when malformed; decoding capped in pixels and frames.

Issue 21: a CSV id with a folder part labels only the file at that relative path, and a bare name that names
several files being ingested is refused (it would merge two patients); an unclosed quote, a NUL byte or a field
over the csv module's limit is named with its line. ``--max-pixels`` refuses (or, for JPEG, decodes reduced) an
image, video or DICOM whose frames are larger, before its pixels are decoded; ``--max-frames`` keeps the first
frames of a longer video and says so. Each case is one line naming the file, never a traceback, and the good
file beside it still goes in.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from reliability_support import good_video, ingest, line_naming, stored_ids, write_png_header

from sonocl.data.labels import hashed_group
from sonocl.data.store import FrameStore
from test_decode import scan_frames, write_dicom, write_video

# ---- which file a CSV id names -----------------------------------------------------------------------------------


@pytest.fixture()
def same_names(tmp_path: Path) -> Path:
    """``A/scan1.mp4``, ``B/scan1.mp4`` (two patients' scans with one file name) and ``B/scan2.mp4``."""
    source = tmp_path / "videos"
    for seed, relative in enumerate(("A/scan1.mp4", "B/scan1.mp4", "B/scan2.mp4")):
        (source / relative).parent.mkdir(parents=True, exist_ok=True)
        good_video(source / relative, seed=seed)
    return source


@pytest.mark.parametrize("path_id", ["A/scan1", "A/scan1.mp4", "a\\SCAN1.MP4", "./A/scan1"])
def test_csv_id_with_a_folder_labels_only_the_file_at_that_path(
    path_id: str, same_names: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv = same_names.parent / "labels.csv"
    csv.write_text(f"file,label,patient\n{path_id},covid,PATIENT-A\nscan2,regular,PATIENT-B\n")
    store_dir = same_names.parent / "store"
    result = ingest(capsys, same_names, "--out", store_dir, "--size", "32", "--labels", csv)
    assert result.code == 0, result.err
    store = FrameStore.open(store_dir)
    by_id = {video.id: video for video in store.videos}
    assert by_id["A/scan1"].label == "covid" and by_id["A/scan1"].group == hashed_group(store.salt, "PATIENT-A")
    assert by_id["B/scan1"].label is None and by_id["B/scan1"].group == "B/scan1"  # not A's patient
    assert by_id["B/scan2"].label == "regular"  # a bare name naming one file still works


def test_csv_bare_name_naming_several_files_is_refused_with_the_files(
    same_names: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv = same_names.parent / "labels.csv"
    csv.write_text("file,label,patient\nscan1,covid,PATIENT-A\nscan2,regular,PATIENT-B\n")
    result = ingest(capsys, same_names, "--out", same_names.parent / "store", "--size", "32", "--labels", csv)
    assert result.code == 2
    line = line_naming(result.err, csv)
    assert "'scan1'" in line and "A/scan1.mp4" in line and "B/scan1.mp4" in line, line
    assert len(result.err.strip().splitlines()) == 1, result.err
    assert not (same_names.parent / "store").exists()


# ---- malformed CSVs ------------------------------------------------------------------------------------------------


@pytest.fixture()
def three_videos(tmp_path: Path) -> Path:
    source = tmp_path / "videos"
    source.mkdir()
    for seed, name in enumerate("abc"):
        good_video(source / f"{name}.mp4", seed=seed)
    return source


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ('file,label\na,covid\nb,"regular\nc,covid\n', ("line 3", "quote")),
        ('file,label,comment\na,covid,"two\nlines"\nb,regular,"oops\nc,covid,\n', ("line 4", "quote")),
        ("file,label\na,covid\nb,reg\0ular\nc,covid\n", ("line 3", "NUL")),
        ("file,label,notes\na,covid,\nb,regular," + "x" * (129 << 10) + "\nc,covid,\n", ("line 3", "131072")),
    ],
    ids=["unclosed-quote", "unclosed-quote-after-a-closed-multiline-one", "nul-byte", "field-over-128-kib"],
)
def test_malformed_csv_is_refused_naming_the_line(
    content: str, words: tuple[str, ...], three_videos: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv = three_videos.parent / "labels.csv"
    csv.write_text(content)
    result = ingest(capsys, three_videos, "--out", three_videos.parent / "store", "--size", "32", "--labels", csv)
    assert result.code == 2
    line = line_naming(result.err, csv)
    assert all(word in line for word in words), line
    assert len(result.err.strip().splitlines()) == 1, result.err
    assert not (three_videos.parent / "store").exists()


def test_csv_quoted_field_over_several_lines_still_works(
    three_videos: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv = three_videos.parent / "labels.csv"
    csv.write_text('file,label,comment\na,covid,"two\nlines"\nb,regular,\nc,covid,"say ""hi"""\n')
    store_dir = three_videos.parent / "store"
    result = ingest(capsys, three_videos, "--out", store_dir, "--size", "32", "--labels", csv)
    assert result.code == 0, result.err
    assert {video.id: video.label for video in FrameStore.open(store_dir).videos} == {
        "a": "covid",
        "b": "regular",
        "c": "covid",
    }


# ---- resource caps ------------------------------------------------------------------------------------------------


def _png_16_bit(path: Path) -> None:
    pixels = (scan_frames(1, 200, 200)[0].astype(np.uint16) * 257).astype(np.uint16)
    Image.fromarray(pixels).save(path)
    with Image.open(path) as image:
        assert image.mode.startswith("I"), image.mode


OVER_PIXEL_CAP: dict[str, Callable[[Path], object]] = {
    "big_16_bit.png": _png_16_bit,
    # A valid header over the cap with no real pixel data: refused from the header, or it would read as broken.
    "header_only.png": lambda path: write_png_header(path, 200, 200),
    "big.mp4": lambda path: write_video(path, scan_frames(3, 128, 128)),
    "big.gif": lambda path: write_video(path, scan_frames(3, 128, 128)),
    "big.dcm": lambda path: write_dicom(path, scan_frames(3, 128, 128)),
}


@pytest.mark.parametrize("name", list(OVER_PIXEL_CAP))
def test_frames_over_max_pixels_are_skipped_by_name_before_decoding(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "src"
    source.mkdir()
    OVER_PIXEL_CAP[name](source / name)
    good_video(source / "good.mp4")  # 32×32 = 1,024 pixels: under the cap
    result = ingest(capsys, source, "--out", tmp_path / "store", "--size", "32", "--max-pixels", "10000")
    assert result.code == 3, result.err
    line = line_naming(result.err, source / name)
    assert line.startswith("sonocl ingest: skipped ") and "--max-pixels" in line, line
    assert stored_ids(tmp_path / "store") == ["good"]
    report = (tmp_path / "store" / "ingest_report.json").read_text()
    assert name in report and "--max-pixels" in report


def test_jpeg_over_max_pixels_is_decoded_reduced_with_a_note(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "src"
    source.mkdir()
    Image.fromarray(scan_frames(1, 400, 300)[0]).save(source / "big.jpg", quality=95)
    good_video(source / "good.mp4")
    result = ingest(capsys, source, "--out", tmp_path / "store", "--size", "32", "--max-pixels", "10000")
    assert result.code == 0, result.err
    line = line_naming(result.err, source / "big.jpg")
    assert "1/4" in line and "--max-pixels" in line, line
    store = FrameStore.open(tmp_path / "store")
    big = next(video for video in store.videos if video.id == "big")
    assert big.original_size == (100, 75)  # 400×300 decoded at 1/4: 7,500 pixels, not 120,000


OVER_FRAME_CAP: dict[str, Callable[[Path], object]] = {
    "long.gif": lambda path: write_video(path, scan_frames(30, 32, 32)),
    "long.mp4": lambda path: write_video(path, scan_frames(30, 32, 32)),
    "long.dcm": lambda path: write_dicom(path, scan_frames(30, 32, 32)),
}


@pytest.mark.parametrize("name", list(OVER_FRAME_CAP))
def test_video_over_max_frames_keeps_its_first_frames_with_a_note(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "src"
    source.mkdir()
    OVER_FRAME_CAP[name](source / name)
    good_video(source / "good.mp4", frames=4)
    result = ingest(capsys, source, "--out", tmp_path / "store", "--size", "32", "--max-frames", "10")
    assert result.code == 0, result.err
    line = line_naming(result.err, source / name)
    assert "--max-frames 10" in line and "first 10" in line, line
    assert "good.mp4" not in result.err  # a video under the cap goes in whole, without a note
    frames = {video.id: video.num_frames for video in FrameStore.open(tmp_path / "store").videos}
    assert frames == {"long": 10, "good": 4}
