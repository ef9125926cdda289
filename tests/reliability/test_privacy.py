"""Privacy: no patient identity in anything sonocl writes, salted group ids, burned-in header text cropped away.

DICOM cine files carry planted identities (patient name, ID, birth date, institution, referring physician).
They go through ingest, a tiny pretraining, a kNN evaluation, embedding export and the HTML report; then
every byte of every file written, and everything printed, is searched for each planted string.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageDraw
from reliability_support import ingest, run_cli, smallest_pretrain

from sonocl.data.labels import hashed_group
from sonocl.data.phantom import CLASS_PREFIX, make_phantom, make_phantom_video, write_dicom_cine, write_mp4
from sonocl.data.store import FrameStore

PATIENTS = {
    "p01": {"PatientName": "Qorbanian^Zyxwvut", "PatientID": "MRN-88431-ZQ", "PatientBirthDate": "19310417"},
    "p02": {"PatientName": "Vantrebolk^Ulmira", "PatientID": "MRN-55102-VU", "PatientBirthDate": "19440923"},
    "p03": {"PatientName": "Oskelund^Pyratt", "PatientID": "MRN-70366-OP", "PatientBirthDate": "19520608"},
}
SITE = {"InstitutionName": "Saint Ixworth Qorvath Hospital", "ReferringPhysicianName": "Dr^Vexlomir^Hanneke"}


def planted_strings() -> list[str]:
    """Every planted value, and the parts of each by which it could be recognised."""
    values = [value for identity in PATIENTS.values() for value in identity.values()] + list(SITE.values())
    parts = {part for value in values for part in value.replace("^", " ").replace("-", " ").split() if len(part) >= 4}
    return sorted(set(values) | parts | {value.replace("^", " ") for value in values})


def _write_identified_dicoms(folder: Path) -> dict[str, str]:
    """Six phantom videos as DICOM cine of three planted patients; returns file stem → patient."""
    folder.mkdir(parents=True)
    patients = {}
    for video in make_phantom(num_videos=6, frames_per_video=8, size=64, seed=2, num_patients=3):
        path = folder / f"{video.name}.dcm"
        identity = PATIENTS[video.patient]
        write_dicom_cine(path, video.frames, video.fps, identity["PatientName"], identity["PatientID"])
        header = pydicom.dcmread(path)
        header.PatientBirthDate = identity["PatientBirthDate"]
        for keyword, value in SITE.items():
            setattr(header, keyword, value)
        header.save_as(path, enforce_file_format=True)
        patients[video.name] = video.patient
    return patients


def test_no_planted_identity_reaches_any_written_file_or_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    patients = _write_identified_dicoms(tmp_path / "dicom")
    assert all(b"Qorvath" in path.read_bytes() for path in (tmp_path / "dicom").iterdir()), (
        "the identities must be in the sources"
    )
    out = tmp_path / "out"
    rules = ",".join(f"{prefix}={label}" for label, prefix in CLASS_PREFIX.items())
    printed = []
    commands = [
        [
            "ingest",
            tmp_path / "dicom",
            "--out",
            out / "store",
            "--size",
            "32",
            "--label-from-name",
            rules,
            "--workers",
            "1",
        ],
        ["info", out / "store"],
        ["info", out / "store", "--json"],
        ["pretrain", "--store", out / "store", *smallest_pretrain(out / "run")],
        [
            "evaluate",
            "--store",
            out / "store",
            "--init",
            out / "run",
            "--protocol",
            "knn",
            "--folds",
            "2",
            "--group-by",
            "group",
            "--out",
            out / "eval",
            "--device",
            "cpu",
        ],
        [
            "embed",
            "--store",
            out / "store",
            "--init",
            out / "run",
            "--out",
            out / "embeddings.parquet",
            "--no-progress",
            "--device",
            "cpu",
        ],
        ["report", out / "run", out / "eval", "--out", out / "report.html"],
    ]
    for command in commands:
        result = run_cli(capsys, *command)
        assert result.code == 0, (command[0], result.err)
        printed += [result.out, result.err]

    written = [path for path in out.rglob("*") if path.is_file()]
    assert {"store.json", "frames.u8", "videos.jsonl", "encoder.safetensors", "results.json", "report.html"} <= {
        p.name for p in written
    }
    for path in written:
        content = path.read_bytes()
        for secret in planted_strings():
            assert secret.encode() not in content, (path, secret)
            assert secret.encode("utf-16-le") not in content, (path, secret)
    for text in printed:
        for secret in planted_strings():
            assert secret not in text, secret

    store = FrameStore.open(out / "store")
    groups = {video.id: video.group for video in store.videos}
    for patient, identity in PATIENTS.items():
        ids = [name for name, owner in patients.items() if owner == patient]
        assert {groups[name] for name in ids} == {hashed_group(store.salt, identity["PatientID"])}


def test_group_ids_are_salted_per_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """One patient is one group within a store, a different one in another store, and none is a plain hash of the ID."""
    _write_identified_dicoms(tmp_path / "dicom")
    for name in ("first", "second"):
        assert ingest(capsys, tmp_path / "dicom", "--out", tmp_path / name, "--size", "32").code == 0
    first, second = FrameStore.open(tmp_path / "first"), FrameStore.open(tmp_path / "second")
    assert first.salt != second.salt and len(first.salt) == 32
    by_id = {video.id: video.group for video in second.videos}
    for video in first.videos:
        assert video.group != by_id[video.id]
    unsalted = {hashlib.sha256(identity["PatientID"].encode()).hexdigest() for identity in PATIENTS.values()}
    assert not any(video.group.removeprefix("p-") in digest for video in first.videos for digest in unsalted)
    assert len({video.group for video in first.videos}) == len(PATIENTS)


def _with_burned_in_header(frames: np.ndarray, band: int, text: str) -> tuple[np.ndarray, int]:
    """Frames with a black header band of ``band`` rows above them holding ``text``; also its last text row."""
    count, _, width = frames.shape
    header = Image.new("L", (width, band), 0)
    ImageDraw.Draw(header).text((2, 4), text, fill=255)
    header_pixels = np.asarray(header)
    out = np.zeros((count, band + frames.shape[1], width), dtype=np.uint8)
    out[:, :band] = header_pixels
    out[:, band:] = frames
    return out, int(np.nonzero(header_pixels.max(axis=1))[0].max())


@pytest.mark.parametrize("kind", ["video", "still"])
def test_burned_in_header_text_is_cropped_away(kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    frames, last_text_row = _with_burned_in_header(
        make_phantom_video("covid", seed=3, num_frames=12, size=96), 20, "QORBANIAN 1931"
    )
    source = tmp_path / "src"
    source.mkdir()
    if kind == "video":
        write_mp4(source / "scan.mp4", frames, fps=20.0)
    else:
        Image.fromarray(frames[0]).save(source / "scan.png")
    assert ingest(capsys, source, "--out", tmp_path / "store", "--size", "32").code == 0
    (video,) = FrameStore.open(tmp_path / "store").videos
    top, _, bottom, _ = video.crop_box
    assert top > last_text_row, f"crop {video.crop_box} keeps header rows up to {last_text_row}"
    assert bottom - top > 0.6 * 96, f"crop {video.crop_box} lost the scan"
