from __future__ import annotations

import csv
import hashlib
from collections import Counter
from pathlib import Path

import av
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import ExplicitVRLittleEndian, UltrasoundMultiFrameImageStorage
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from sonocl.data.phantom import (
    ANATOMY_COARSE,
    CLASS_PREFIX,
    CLASSES,
    FINDINGS,
    LABEL_COLUMNS,
    make_phantom,
    make_phantom_video,
    save_montage,
    write_dicom_cine,
    write_mp4,
)


@pytest.fixture(scope="module")
def small_phantom():
    return make_phantom(num_videos=30, frames_per_video=6, size=64, seed=0)


def test_video_is_deterministic_by_seed():
    first = make_phantom_video("covid", seed=3, num_frames=5, size=64, anatomy="L2")
    assert first.shape == (5, 64, 64) and first.dtype == np.uint8
    np.testing.assert_array_equal(first, make_phantom_video("covid", seed=3, num_frames=5, size=64, anatomy="L2"))
    assert not np.array_equal(first, make_phantom_video("covid", seed=4, num_frames=5, size=64, anatomy="L2"))


def test_make_phantom_is_deterministic_by_seed():
    first = make_phantom(num_videos=6, frames_per_video=3, size=32, seed=0)
    again = make_phantom(num_videos=6, frames_per_video=3, size=32, seed=0)
    assert [v.name for v in again] == [v.name for v in first]
    for ours, theirs in zip(first, again):
        np.testing.assert_array_equal(ours.frames, theirs.frames)
        assert (ours.findings, ours.anatomy) == (theirs.findings, theirs.anatomy)
    other = make_phantom(num_videos=6, frames_per_video=3, size=32, seed=1)
    assert not np.array_equal(other[0].frames, first[0].frames)


def test_unknown_class_or_zone_is_refused():
    with pytest.raises(ValueError, match="unknown phantom class"):
        make_phantom_video("flu", seed=0, num_frames=2, size=32)
    with pytest.raises(ValueError, match="unknown chest zone"):
        make_phantom_video("covid", seed=0, num_frames=2, size=32, anatomy="X9")
    with pytest.raises(ValueError, match="num_patients"):
        make_phantom(num_videos=6, frames_per_video=2, size=32, num_patients=2)


def test_phantom_is_balanced_grouped_and_labelled(small_phantom):
    assert Counter(v.label for v in small_phantom) == {label: 10 for label in CLASSES}
    assert len({v.name for v in small_phantom}) == 30
    patients: dict[str, set[str]] = {}
    for video in small_phantom:
        assert video.frames.shape == (6, 64, 64) and video.frames.dtype == np.uint8
        assert video.name.startswith(f"{CLASS_PREFIX[video.label]}_{video.patient}_v")
        assert video.fps == 20.0
        assert video.anatomy in ANATOMY_COARSE
        assert set(video.findings) == set(FINDINGS) and set(video.findings.values()) <= {"0", "1"}
        patients.setdefault(video.patient, set()).add(video.label)
    assert len(patients) == 15
    assert all(len(labels) == 1 for labels in patients.values()), "a patient has one diagnosis"
    assert set(ANATOMY_COARSE.values()) == {"left", "right"}
    # The class-defining finding is always there; the others vary.
    typical = {"regular": "a_lines", "covid": "b_lines", "pneumonia": "consolidation"}
    assert all(v.findings[typical[v.label]] == "1" for v in small_phantom)
    assert any(v.findings["b_lines"] == "0" for v in small_phantom if v.label == "pneumonia")


def test_fan_moves_and_overlay_marks_stay_outside_it():
    frames = make_phantom_video("regular", seed=5, num_frames=12, size=96, anatomy="R2")
    moving = frames.std(axis=0) > 0
    assert 0.3 < moving.mean() < 0.8, "the fan should fill part of the frame"
    rows, cols = np.flatnonzero(moving.any(axis=1)), np.flatnonzero(moving.any(axis=0))
    assert rows[0] > 0 and cols[0] > 0 and cols[-1] < 95, "black borders around the fan for the crop to remove"
    left_of_fan, right_of_fan = frames[0][:, : cols[0]], frames[0][:, cols[-1] + 1 :]
    assert (left_of_fan > 0).sum() > 20 and (right_of_fan > 0).sum() > 20, (
        "static marks beside the fan for the crop to ignore"
    )
    assert (left_of_fan == 0).mean() > 0.5, "the background is black"


def test_mp4_decodes_back(tmp_path: Path):
    frames = make_phantom_video("pneumonia", seed=2, num_frames=10, size=64)
    path = tmp_path / "pneu_p01_v01.mp4"
    write_mp4(path, frames, fps=20.0)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name in ("h264", "mpeg4")
        decoded = np.stack([frame.to_ndarray(format="gray") for frame in container.decode(stream)])
    assert decoded.shape == frames.shape
    assert np.abs(decoded.astype(np.int16) - frames).mean() < 6


def test_mp4_needs_even_size(tmp_path: Path):
    with pytest.raises(ValueError, match="even frame sizes"):
        write_mp4(tmp_path / "odd.mp4", np.zeros((2, 33, 33), dtype=np.uint8), fps=20.0)


def test_dicom_cine_carries_frames_and_planted_patient(tmp_path: Path):
    frames = make_phantom_video("covid", seed=1, num_frames=7, size=48)
    path = tmp_path / "cine.dcm"
    write_dicom_cine(path, frames, fps=25.0, patient_name="PLANTED^NAME", patient_id="ID-4711")
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.SOPClassUID == UltrasoundMultiFrameImageStorage
    assert (ds.PatientName, ds.PatientID) == ("PLANTED^NAME", "ID-4711")
    assert int(ds.NumberOfFrames) == 7 and ds.PhotometricInterpretation == "MONOCHROME2"
    assert float(ds.FrameTime) == pytest.approx(40.0) and int(ds.CineRate) == 25
    np.testing.assert_array_equal(ds.pixel_array, frames)
    again = tmp_path / "again.dcm"
    write_dicom_cine(again, frames, fps=25.0, patient_name="PLANTED^NAME", patient_id="ID-4711")
    assert again.read_bytes() == path.read_bytes(), "same input, same file: re-ingest must see the same hash"


def test_phantom_dataset_files_and_labels(phantom_dataset: Path):
    with open(phantom_dataset / "labels.csv", newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames or ()) == LABEL_COLUMNS
        rows = list(reader)
    assert len(rows) == 9
    assert Counter(row["label"] for row in rows) == {label: 3 for label in CLASSES}
    files = {path.stem: path for path in (phantom_dataset / "videos").iterdir()}
    assert set(files) == {row["file"] for row in rows}
    assert sorted(path.suffix for path in files.values()) == [".dcm"] * 2 + [".mp4"] * 7
    for row in rows:
        assert row["file"].startswith(CLASS_PREFIX[row["label"]] + "_" + row["patient"])
        assert row["anatomy"] in ANATOMY_COARSE and all(row[name] in ("0", "1") for name in FINDINGS)
        if files[row["file"]].suffix == ".dcm":
            ds = pydicom.dcmread(files[row["file"]])
            assert (str(ds.PatientName), ds.PatientID) == (f"PHANTOM^{row['patient']}", row["patient"])
            assert int(ds.NumberOfFrames) == 16 and (ds.Rows, ds.Columns) == (96, 96)


def test_phantom_store_holds_the_phantom(phantom_store):
    videos = make_phantom(num_videos=12, frames_per_video=24, size=64, seed=0)
    assert (phantom_store.num_videos, phantom_store.num_frames, phantom_store.size) == (12, 12 * 24, 64)
    for index, (record, video) in enumerate(zip(phantom_store.videos, videos)):
        assert (record.id, record.source, record.label, record.group) == (
            video.name,
            video.name + ".mp4",
            video.label,
            video.patient,
        )
        assert record.fps == 20.0 and record.timestamps[1] == pytest.approx(0.05)
        assert record.original_size == (64, 64) and record.crop_box == (0, 0, 64, 64)
        assert record.content_hash == hashlib.sha256(video.frames.tobytes()).hexdigest()
        assert record.extra_labels == {
            **video.findings,
            "anatomy": video.anatomy,
            "anatomy_coarse": ANATOMY_COARSE[video.anatomy],
        }
        np.testing.assert_array_equal(phantom_store.video_frames(index), video.frames)
    codes, names = phantom_store.label_codes()
    assert names == sorted(CLASSES) and (codes >= 0).all()
    assert len(set(phantom_store.group_codes().tolist())) == 6


def test_classes_are_learnable_across_patients():
    """A linear model on each video's grey-level histogram, trained and tested on different patients, beats
    chance (1/3) clearly: the phantom carries class signal (and a weak model does not solve it outright)."""

    def histograms(videos) -> np.ndarray:
        return np.stack(
            [np.histogram(v.frames[v.frames > 0], bins=16, range=(0, 256), density=True)[0] for v in videos]
        )

    train = make_phantom(num_videos=30, frames_per_video=4, size=64, seed=0)
    test = make_phantom(num_videos=30, frames_per_video=4, size=64, seed=1)
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    model.fit(histograms(train), [v.label for v in train])
    assert model.score(histograms(test), [v.label for v in test]) >= 0.6


def test_montage_is_written(tmp_path: Path):
    path = save_montage(tmp_path / "figures" / "phantom.png", size=32, per_row=3, num_videos=24)
    with Image.open(path) as image:
        assert image.size == (3 * 32, 4 * (32 + 14))
        assert np.asarray(image).max() > 0
