"""Synthetic lung-ultrasound videos: the embedded default data of sonocl, deterministic by seed.

Tests and ``sonocl demo`` need data that behaves like the real thing without shipping any: a
contrastive encoder must be able to learn the classes from it, the crop detector must find a fan
among overlay marks, and ingestion must read it from real mp4 and DICOM cine files.

How a video is made. Anatomy is drawn once, in probe coordinates (depth along the beam × position
across the sector), where lung ultrasound is simple to describe: the pleura is a line at one depth,
A-lines are its copies at multiples of that depth, B-lines and rib shadows run along beams. There are
two such tissue layers, the chest wall and the lung beneath it, so that each frame can move them
separately (probe drift moves both, breathing slides the lung under the wall) with a lookup per
pixel and no per-frame drawing. Each frame is sampled straight into the convex fan of a square
frame (scan conversion), surrounded by static overlay marks.

Classes and their patterns (each also appears faintly or rarely in the other classes, so that the
classes are distinguishable but not trivially):

- ``regular``: A-lines, lung sliding (the pleural line's texture moves to and fro with breathing);
- ``covid``: B-lines (comet tails from the pleura to the bottom that move and flicker), an irregular,
  thickened, fragmented pleural line, sometimes a small subpleural consolidation;
- ``pneumonia``: consolidation (hypoechoic, tissue-like lung with bright air-bronchogram dots and a
  shredded deep border), often an anechoic effusion between the pleura and the consolidated lung.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from sonocl.data.phantom_scan import (
    Patient,
    overlay,
    render_tissue,
    sample_fan,
    sample_findings,
    sample_motion,
    sample_patient,
    scan,
)
from sonocl.data.store import FrameStore
from sonocl.data.store_writer import FrameStoreWriter

CLASSES: tuple[str, ...] = ("covid", "pneumonia", "regular")
CLASS_PREFIX: dict[str, str] = {"covid": "cov", "pneumonia": "pneu", "regular": "reg"}
"""File-name prefix of each class, as in the POCUS data set (``--label-from-name cov=covid,…``)."""
FINDINGS: tuple[str, ...] = ("a_lines", "b_lines", "consolidation", "effusion")
ANATOMY_COARSE: dict[str, str] = {
    "R1": "right",
    "R2": "right",
    "R3": "right",
    "L1": "left",
    "L2": "left",
    "L3": "left",
}
"""Fine chest zone (side, then 1 = anterior-superior … 3 = lateral-basal) → side of the chest."""
FPS = 20.0


@dataclass(frozen=True)
class PhantomVideo:
    name: str
    """File stem, starting with the class prefix: ``cov_p03_v01``, ``pneu_…``, ``reg_…``."""
    frames: np.ndarray
    """(T, H, W) uint8."""
    label: str
    patient: str
    fps: float
    findings: dict[str, str]
    """``"0"``/``"1"`` for each of `FINDINGS`: what was actually rendered in this video."""
    anatomy: str
    """Fine chest zone, a key of `ANATOMY_COARSE`."""


def _simulate(
    label: str, anatomy: str, patient: Patient, num_frames: int, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, dict[str, str]]:
    """Frames (T, size, size) uint8 of one video and its finding flags."""
    if label not in CLASSES:
        raise ValueError(f"unknown phantom class {label!r}; choose one of {', '.join(CLASSES)}")
    if anatomy not in ANATOMY_COARSE:
        raise ValueError(f"unknown chest zone {anatomy!r}; choose one of {', '.join(ANATOMY_COARSE)}")
    time = np.arange(num_frames, dtype=np.float32) / np.float32(FPS)
    findings = sample_findings(label, rng)
    tissue = render_tissue(label, anatomy, patient, findings, time, size, rng)
    motion = sample_motion(label, time, size, rng)
    fan = sample_fan(patient, size, rng)
    pixels, inside = scan(tissue, motion, fan, patient, size, rng)
    frames = np.broadcast_to(overlay(fan, size, rng), (num_frames, size, size)).copy()
    frames[:, inside] = pixels
    return frames, {name: str(int(flag)) for name, flag in findings.items()}


def make_phantom_video(label: str, seed: int, num_frames: int = 40, size: int = 128, anatomy: str = "R1") -> np.ndarray:
    """One phantom video of class ``label``: (num_frames, size, size) uint8, the same for the same arguments."""
    rng = np.random.default_rng(seed)
    frames, _ = _simulate(label, anatomy, sample_patient(rng), num_frames, size, rng)
    return frames


def _patients_per_class(videos_per_class: dict[str, int], num_patients: int) -> dict[str, int]:
    """Share patients among classes in proportion to their videos, at least one each (one patient, one diagnosis)."""
    counts = {label: 1 for label in videos_per_class}
    for _ in range(num_patients - len(counts)):
        label = max(
            (c for c in counts if counts[c] < videos_per_class[c]), key=lambda c: videos_per_class[c] / counts[c]
        )
        counts[label] += 1
    return counts


def make_phantom(
    num_videos: int = 30, frames_per_video: int = 40, size: int = 128, seed: int = 0, num_patients: int | None = None
) -> list[PhantomVideo]:
    """Balanced phantom data set: classes differ in count by at most one, each patient has one class and
    (by default) about two videos of different chest zones, and shares body habitus and scanner across them."""
    labels = [CLASSES[i % len(CLASSES)] for i in range(num_videos)]
    videos_per_class = {label: labels.count(label) for label in CLASSES if label in labels}
    if num_patients is None:
        num_patients = max(len(videos_per_class), num_videos // 2)
    if not len(videos_per_class) <= num_patients <= num_videos:
        raise ValueError(
            f"num_patients={num_patients}: need between {len(videos_per_class)} (one per class) and {num_videos} (one per video)"
        )
    videos: list[PhantomVideo] = []
    patient_number = 0
    for label, patients in _patients_per_class(videos_per_class, num_patients).items():
        for video_count in (len(part) for part in np.array_split(np.arange(videos_per_class[label]), patients)):
            patient_number += 1
            patient = f"p{patient_number:02d}"
            patient_rng = np.random.default_rng([seed, 1, patient_number])
            traits = sample_patient(patient_rng)
            zones = patient_rng.permutation(list(ANATOMY_COARSE))
            for video_number in range(1, video_count + 1):
                anatomy = str(zones[(video_number - 1) % len(zones)])
                rng = np.random.default_rng([seed, 2, patient_number, video_number])
                frames, findings = _simulate(label, anatomy, traits, frames_per_video, size, rng)
                name = f"{CLASS_PREFIX[label]}_{patient}_v{video_number:02d}"
                videos.append(PhantomVideo(name, frames, label, patient, FPS, findings, anatomy))
    return videos


def write_mp4(path: str | Path, frames: np.ndarray, fps: float) -> None:
    """Write greyscale frames as an H.264 mp4 (MPEG-4 part 2 where libx264 is missing), yuv420p."""
    import av

    height, width = frames.shape[1:]
    if height % 2 or width % 2:
        raise ValueError(f"{path}: yuv420p video needs even frame sizes, got {width}x{height}")
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), mode="w") as container:
        options = {"crf": "18", "preset": "veryfast"} if codec == "libx264" else {"b": "2M"}
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001), options=options)
        assert isinstance(stream, av.VideoStream)  # a video codec's stream
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for frame in frames:
            rgb = np.repeat(frame[:, :, None], 3, axis=2)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode(None))


def write_dicom_cine(path: str | Path, frames: np.ndarray, fps: float, patient_name: str, patient_id: str) -> None:
    """Write an uncompressed Ultrasound Multi-frame Image (explicit VR little endian, MONOCHROME2) carrying the
    given patient name and id, so that tests can check they never reach a store. Same input, same bytes."""
    from pydicom import dcmwrite
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, UltrasoundMultiFrameImageStorage, generate_uid

    frames = np.ascontiguousarray(frames, dtype=np.uint8)
    digest = hashlib.sha256(frames.tobytes()).hexdigest()
    entropy = [digest, patient_name, patient_id, str(fps)]
    sop_instance = generate_uid(entropy_srcs=[*entropy, "instance"])

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UltrasoundMultiFrameImageStorage
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = UltrasoundMultiFrameImageStorage
    ds.SOPInstanceUID = sop_instance
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[*entropy, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[*entropy, "series"])
    ds.Modality = "US"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = "20200101"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.NumberOfFrames = frames.shape[0]
    ds.Rows, ds.Columns = frames.shape[1:]
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.FrameTime = f"{1000.0 / fps:.4f}"
    ds.CineRate = round(fps)
    ds.FrameIncrementPointer = 0x00181063  # (0018,1063) Frame Time
    pixel_bytes = frames.tobytes()
    ds.PixelData = pixel_bytes + b"\0" * (len(pixel_bytes) % 2)  # DICOM values have even length
    dcmwrite(str(path), ds, enforce_file_format=True)


LABEL_COLUMNS: tuple[str, ...] = ("file", "label", "patient", "anatomy", *FINDINGS)


def write_phantom_dataset(
    out_dir: str | Path,
    num_videos: int = 30,
    frames_per_video: int = 40,
    size: int = 128,
    seed: int = 0,
    dicom_share: float = 0.25,
) -> Path:
    """Write the phantom as a user would bring data: ``videos/<name>.mp4`` (a ``dicom_share`` of them as DICOM cine
    ``videos/<name>.dcm``, patient name ``PHANTOM^<patient>``) and ``labels.csv`` (`LABEL_COLUMNS`)."""
    out_dir = Path(out_dir)
    video_dir = out_dir / "videos"
    video_dir.mkdir(parents=True, exist_ok=True)
    videos = make_phantom(num_videos, frames_per_video, size, seed)
    num_dicom = min(len(videos), round(dicom_share * len(videos)))
    as_dicom = set(np.random.default_rng([seed, 3]).permutation(len(videos))[:num_dicom].tolist())
    with open(out_dir / "labels.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=LABEL_COLUMNS)
        writer.writeheader()
        for index, video in enumerate(videos):
            if index in as_dicom:
                patient_name = f"PHANTOM^{video.patient}"
                write_dicom_cine(video_dir / f"{video.name}.dcm", video.frames, video.fps, patient_name, video.patient)
            else:
                write_mp4(video_dir / f"{video.name}.mp4", video.frames, video.fps)
            row = {"file": video.name, "label": video.label, "patient": video.patient, "anatomy": video.anatomy}
            writer.writerow({**row, **video.findings})
    return out_dir


def build_phantom_store(
    store_dir: str | Path, num_videos: int = 12, frames_per_video: int = 24, size: int = 64, seed: int = 0
) -> FrameStore:
    """A frame store of the phantom written directly (no encoding or decoding): the fast fixture for tests."""
    return write_phantom_store(store_dir, make_phantom(num_videos, frames_per_video, size, seed), size)


def write_phantom_store(
    store_dir: str | Path,
    videos: Sequence[PhantomVideo],
    size: int,
    extra_labels: Callable[[int, PhantomVideo], dict[str, str]] | None = None,
    group: Callable[[PhantomVideo], str] | None = None,
) -> FrameStore:
    """``videos`` written straight into a store, in this order, each with its findings and chest zone as extra labels
    (and ``extra_labels(index, video)`` over them) and its patient as its group (or ``group(video)``)."""
    with FrameStoreWriter(store_dir, size) as writer:
        for index, video in enumerate(videos):
            labels = {**video.findings, "anatomy": video.anatomy, "anatomy_coarse": ANATOMY_COARSE[video.anatomy]}
            writer.add_video(
                video.frames,
                id=video.name,
                source=f"{video.name}.mp4",
                label=video.label,
                group=group(video) if group else video.patient,
                fps=video.fps,
                timestamps=np.arange(len(video.frames)) / video.fps,
                original_size=(size, size),
                crop_box=(0, 0, size, size),
                content_hash=hashlib.sha256(video.frames.tobytes()).hexdigest(),
                extra_labels={**labels, **(extra_labels(index, video) if extra_labels else {})},
            )
    return FrameStore.open(store_dir)


def save_montage(path: str | Path, size: int = 128, seed: int = 0, per_row: int = 5, num_videos: int = 90) -> Path:
    """One PNG of phantom frames: a row per class, then a row of pneumonia videos with effusion (drawn from
    ``num_videos`` videos, enough to find a few with effusion)."""
    from PIL import Image, ImageDraw

    videos = make_phantom(num_videos=num_videos, frames_per_video=4, size=size, seed=seed)
    rows: list[tuple[str, list[PhantomVideo]]] = [(label, [v for v in videos if v.label == label]) for label in CLASSES]
    rows.append(("pneumonia + effusion", [v for v in videos if v.findings["effusion"] == "1"]))
    caption = 14
    sheet = Image.new("L", (per_row * size, len(rows) * (size + caption)), 0)
    draw = ImageDraw.Draw(sheet)
    for row, (title, chosen) in enumerate(rows):
        top = row * (size + caption)
        draw.text((2, top + 1), title, fill=255)
        for column, video in enumerate(chosen[:per_row]):
            sheet.paste(Image.fromarray(video.frames[-1]), (column * size, top + caption))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sonocl.data.phantom", description=__doc__.splitlines()[0])
    parser.add_argument("--montage", type=Path, required=True, help="PNG to write: phantom frames, a row per class")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(save_montage(args.montage, args.size, args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
