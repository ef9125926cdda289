"""Decoding of every supported format into grey frames, frame selection and the ultrasound-region crop.

The module-level writers (`write_video`, `write_dicom`, `scan_frames`) make small media files and are
also used by the ingest tests.
"""

from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    UltrasoundMultiFrameImageStorage,
    generate_uid,
)

from sonocl.data.decode import (
    DecodeError,
    Frame,
    is_frame_folder,
    media_kind,
    natural_key,
    open_media,
)
from sonocl.data.preprocess import CropBox, FramePreparer, find_ultrasound_region, select_frames

VIDEO_CODECS = {
    ".mp4": "libx264",
    ".avi": "mjpeg",
    ".mkv": "ffv1",
    ".mov": "mpeg4",
    ".mpeg": "mpeg1video",
    ".gif": "gif",
}


def scan_frames(
    count: int, height: int, width: int, seed: int = 0, region: tuple[int, int, int, int] | None = None
) -> np.ndarray:
    """Frames with a moving speckled scan in ``region`` (top, left, bottom, right) on black, uint8 (T, H, W)."""
    rng = np.random.default_rng(seed)
    top, left, bottom, right = region or (0, 0, height, width)
    frames = np.zeros((count, height, width), dtype=np.uint8)
    blocks = rng.integers(40, 200, size=((bottom - top) // 4 + 1, (right - left) // 4 + 1))
    base = blocks.repeat(4, axis=0).repeat(4, axis=1)[: bottom - top, : right - left]
    for index in range(count):
        speckle = rng.integers(-10, 10, size=base.shape)
        frames[index, top:bottom, left:right] = np.clip(np.roll(base, index, axis=0) + speckle, 20, 255)
    return frames


def write_video(path: Path, frames: np.ndarray, fps: float = 10.0) -> Path:
    """Encode grey (T, H, W) or RGB (T, H, W, 3) uint8 frames with the codec usual for the file's extension."""
    codec = VIDEO_CODECS[path.suffix.lower()]
    pixel_format = {"mjpeg": "yuvj420p", "ffv1": "yuv420p", "gif": "rgb8"}.get(codec, "yuv420p")
    with av.open(str(path), mode="w") as container:
        rate = Fraction(25) if codec == "mpeg1video" else Fraction(fps).limit_denominator(1000)
        stream = container.add_stream(codec, rate=rate)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = pixel_format
        if codec == "libx264":
            stream.options = {"crf": "10", "preset": "ultrafast"}
        elif codec in ("mpeg4", "mpeg1video"):
            stream.bit_rate = 4_000_000
        for frame in frames:
            rgb = frame if frame.ndim == 3 else np.repeat(frame[:, :, None], 3, axis=2)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")))
        container.mux(stream.encode(None))
    return path


def write_dicom(
    path: Path,
    frames: np.ndarray,
    fps: float | None = 20.0,
    patient_name: str = "Anonymous",
    patient_id: str = "",
    syntax: str = ExplicitVRLittleEndian,
    photometric: str | None = None,
    with_pixels: bool = True,
) -> Path:
    """A DICOM file of (T, H, W) grey or (T, H, W, 3) RGB frames (T = 1 gives a single-frame image)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UltrasoundMultiFrameImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = UltrasoundMultiFrameImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "US"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19610203"
    if with_pixels:
        colour = frames.ndim == 4
        ds.SamplesPerPixel = 3 if colour else 1
        ds.PhotometricInterpretation = photometric or ("RGB" if colour else "MONOCHROME2")
        if colour:
            ds.PlanarConfiguration = 0
        ds.Rows, ds.Columns = frames.shape[1:3]
        bits = 16 if frames.dtype == np.uint16 else 8
        ds.BitsAllocated = ds.BitsStored = bits
        ds.HighBit = bits - 1
        ds.PixelRepresentation = 0
        if len(frames) > 1:
            ds.NumberOfFrames = len(frames)
            if fps:
                ds.FrameTime = f"{1000.0 / fps:.3f}"
        ds.PixelData = np.ascontiguousarray(frames if len(frames) > 1 else frames[0]).tobytes()
        if syntax == RLELossless:
            ds.compress(RLELossless)
        elif syntax == JPEGBaseline8Bit:
            ds.PixelData = encapsulate([_jpeg_bytes(frame) for frame in frames])
            ds["PixelData"].VR = "OB"
            ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
            ds.PhotometricInterpretation = "YBR_FULL_422" if colour else "MONOCHROME2"
        elif syntax != ExplicitVRLittleEndian:
            ds.PixelData = encapsulate([b"\xff\xd8not really compressed\xff\xd9"] * len(frames))
            ds["PixelData"].VR = "OB"
            ds.file_meta.TransferSyntaxUID = syntax
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def _jpeg_bytes(frame: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def decode_all(path: Path, frame_files: list[Path] | None = None) -> tuple[list[np.ndarray], list[float], float | None]:
    """Full-range grey frames, timestamps and fps of a file."""
    greys, times = [], []
    with open_media(path, frame_files) as media:
        for frame in media.frames():
            grey = np.array(frame.grey)
            greys.append(np.take(frame.level_lut, grey) if frame.level_lut is not None else grey)
            times.append(frame.time)
        fps = media.fps
    return greys, times, fps


@pytest.mark.parametrize("suffix", [".mp4", ".avi", ".mkv", ".mov", ".mpeg", ".gif"])
def test_video_formats_decode_to_grey_with_timestamps(tmp_path: Path, suffix: str) -> None:
    frames = scan_frames(12, 48, 64)
    path = write_video(tmp_path / f"clip{suffix}", frames, fps=10.0)
    greys, times, fps = decode_all(path)
    assert len(greys) == 12
    assert greys[0].shape == (48, 64) and greys[0].dtype == np.uint8
    expected_fps = 25.0 if suffix == ".mpeg" else 10.0
    assert fps == pytest.approx(expected_fps, rel=0.02)
    assert times[0] == 0.0
    assert np.allclose(np.diff(times), 1.0 / expected_fps, atol=0.011)
    tolerance = 40 if suffix == ".gif" else 12
    assert np.abs(greys[5].astype(int) - frames[5]).mean() < tolerance


def test_limited_range_video_is_expanded_to_full_range(tmp_path: Path) -> None:
    levels = np.array([0, 64, 128, 200, 255], dtype=np.uint8)
    frames = np.repeat(levels, 16)[None, None, :].repeat(16, axis=1).repeat(3, axis=0)
    greys, _, _ = decode_all(write_video(tmp_path / "levels.mp4", frames))
    measured = greys[1][8, 8::16]
    assert np.abs(measured.astype(int) - levels).max() <= 3


def test_rgb_encoded_grey_and_colour_video_give_luma(tmp_path: Path) -> None:
    frames = np.zeros((3, 32, 32, 3), dtype=np.uint8)
    frames[:, :, :16] = 150
    frames[:, :, 16:] = (255, 0, 0)
    greys, _, _ = decode_all(write_video(tmp_path / "colour.mp4", frames))
    assert abs(int(greys[1][16, 4]) - 150) <= 3
    assert abs(int(greys[1][16, 28]) - 76) <= 6


def test_extensions_are_matched_in_any_case(tmp_path: Path) -> None:
    path = write_video(tmp_path / "CLIP.MP4", scan_frames(3, 16, 16))
    assert media_kind(path) == "video"
    assert media_kind(tmp_path / "scan.JPEG") == "image"
    assert media_kind(tmp_path / "notes.txt") is None


@pytest.mark.parametrize(
    ("mode", "suffix"),
    [("L", ".png"), ("RGB", ".jpg"), ("RGB", ".bmp"), ("RGBA", ".png"), ("P", ".png"), ("L", ".tif"), ("RGB", ".tiff")],
)
def test_eight_bit_images_are_one_frame_videos(tmp_path: Path, mode: str, suffix: str) -> None:
    grey = np.tile(np.arange(0, 256, 8, dtype=np.uint8), (24, 1))
    image = Image.fromarray(grey).convert(mode)
    path = tmp_path / f"still{suffix}"
    image.save(path)
    greys, times, fps = decode_all(path)
    assert len(greys) == 1 and times == [0.0] and fps is None
    assert greys[0].shape == (24, 32)
    assert np.abs(greys[0].astype(int) - grey).max() <= (8 if suffix == ".jpg" else 1)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_sixteen_bit_images_are_scaled_by_their_own_range(tmp_path: Path, suffix: str) -> None:
    values = np.linspace(1000, 5000, 32 * 16).reshape(16, 32).astype(np.uint16)
    path = tmp_path / f"deep{suffix}"
    Image.fromarray(values).save(path)
    greys, _, _ = decode_all(path)
    expected = (values.astype(float) - 1000) * 255 / 4000
    assert greys[0].min() == 0 and greys[0].max() == 255
    assert np.abs(greys[0] - expected).max() <= 0.51


def test_dicom_cine_has_frames_and_timing_from_frame_time(tmp_path: Path) -> None:
    frames = scan_frames(6, 20, 30)
    greys, times, fps = decode_all(write_dicom(tmp_path / "cine.dcm", frames, fps=25.0))
    assert np.array_equal(np.stack(greys), frames)
    assert fps == pytest.approx(25.0)
    assert times == pytest.approx([i / 25.0 for i in range(6)])


def test_dicom_single_frame_rgb_monochrome1_and_16_bit(tmp_path: Path) -> None:
    grey = scan_frames(1, 16, 16)
    single, times, fps = decode_all(write_dicom(tmp_path / "single.dcm", grey))
    assert len(single) == 1 and times == [0.0] and fps is None
    rgb = np.repeat(grey[..., None], 3, axis=3)
    colour, _, _ = decode_all(write_dicom(tmp_path / "rgb.dcm", rgb))
    assert np.abs(colour[0].astype(int) - grey[0]).max() <= 1
    inverted, _, _ = decode_all(write_dicom(tmp_path / "mono1.dcm", grey, photometric="MONOCHROME1"))
    assert np.array_equal(inverted[0], 255 - grey[0])
    deep, _, _ = decode_all(write_dicom(tmp_path / "deep.dcm", grey.astype(np.uint16) * 257))
    assert np.abs(deep[0].astype(int) - grey[0]).max() <= 1


def test_implicit_vr_and_deflated_dicom_decode(tmp_path: Path) -> None:
    frames = scan_frames(3, 16, 16)
    dataset = pydicom.dcmread(write_dicom(tmp_path / "plain.dcm", frames))
    dataset.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    dataset.save_as(tmp_path / "implicit.dcm", implicit_vr=True, little_endian=True, enforce_file_format=True)
    dataset.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    dataset.save_as(tmp_path / "deflated.dcm", implicit_vr=False, little_endian=True, enforce_file_format=True)
    for name in ("implicit.dcm", "deflated.dcm"):
        greys, _, _ = decode_all(tmp_path / name)
        assert np.array_equal(np.stack(greys), frames), name


def test_extensionless_dicom_is_recognised_by_its_preamble(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "IM0001", scan_frames(2, 8, 8))
    assert media_kind(path) == "dicom"
    (tmp_path / "README").write_text("not dicom")
    assert media_kind(tmp_path / "README") is None


@pytest.mark.parametrize("syntax", [RLELossless, JPEGBaseline8Bit])
def test_compressed_dicom_with_an_installed_plugin_decodes(tmp_path: Path, syntax: str) -> None:
    frames = scan_frames(3, 16, 24)
    greys, _, _ = decode_all(write_dicom(tmp_path / "compressed.dcm", frames, syntax=syntax))
    assert len(greys) == 3
    assert np.abs(np.stack(greys).astype(int) - frames).mean() < (6 if syntax == JPEGBaseline8Bit else 0.5)


def test_compressed_dicom_without_a_plugin_names_the_transfer_syntax(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "jpegls.dcm", scan_frames(2, 8, 8), syntax=JPEGLSLossless)
    with pytest.raises(DecodeError, match="JPEG-LS Lossless") as error:
        open_media(path)
    assert str(path) in str(error.value)


def test_dicom_without_pixel_data_is_a_decode_error(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "report.dcm", scan_frames(1, 8, 8), with_pixels=False)
    with pytest.raises(DecodeError, match="without pixel data"):
        open_media(path)


def test_natural_order_and_frame_folder_detection(tmp_path: Path) -> None:
    names = ["frame10.png", "frame2.png", "frame1.png", "Frame3.png"]
    assert sorted(names, key=natural_key) == ["frame1.png", "frame2.png", "Frame3.png", "frame10.png"]
    for index, name in enumerate(names):
        Image.fromarray(np.full((8, 8), index * 40, dtype=np.uint8)).save(tmp_path / name)
    files = sorted(tmp_path.iterdir())
    assert is_frame_folder(files)
    greys, times, _ = decode_all(tmp_path, files)
    assert [int(g[0, 0]) for g in greys] == [80, 40, 120, 0]
    assert times == [0.0, 1.0, 2.0, 3.0]


def test_unrelated_or_differently_sized_images_are_not_a_frame_folder(tmp_path: Path) -> None:
    Image.new("L", (8, 8)).save(tmp_path / "scan_1.png")
    Image.new("L", (8, 10)).save(tmp_path / "scan_2.png")
    assert not is_frame_folder(sorted(tmp_path.iterdir()))
    (tmp_path / "scan_2.png").unlink()
    Image.new("L", (8, 8)).save(tmp_path / "liver.png")
    assert not is_frame_folder(sorted(tmp_path.iterdir()))


def _frames_at(times: list[float]) -> list[Frame]:
    return [Frame(np.zeros((2, 2), dtype=np.uint8), t) for t in times]


def test_select_frames_stride_fps_and_max_frames() -> None:
    regular = [i / 30 for i in range(90)]
    assert [f.time for f in select_frames(_frames_at(regular), stride=3)] == pytest.approx(regular[::3])
    kept = [f.time for f in select_frames(_frames_at(regular), max_fps=10)]
    assert kept == pytest.approx(regular[::3])
    jittery = [0.0, 0.04, 0.09, 0.11, 0.2, 0.26, 0.31, 0.5, 0.52, 1.0]
    kept = [f.time for f in select_frames(_frames_at(jittery), max_fps=5)]
    assert kept == [0.0, 0.2, 0.5, 1.0]
    assert all(len([t for t in kept if start <= t < start + 1]) <= 5 for start in np.arange(0, 1, 0.05))
    assert len(list(select_frames(_frames_at(regular), stride=2, max_frames=7))) == 7


def _overlaid_scan(count: int = 16) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """RGB frames: a moving scan on black, a static white text block, a colour bar and a grey ruler."""
    region = (20, 30, 100, 130)
    grey = scan_frames(count, 128, 160, region=region)
    rgb = np.repeat(grey[..., None], 3, axis=3)
    rgb[:, 4:12, 30:90] = 255
    rgb[:, 40:90, 145:152] = (0, 200, 255)
    rgb[:, 20:100, 4:7] = 180
    return rgb, region


def test_auto_crop_keeps_the_moving_scan_and_drops_border_text_and_colour(tmp_path: Path) -> None:
    rgb, (top, left, bottom, right) = _overlaid_scan()
    path = write_video(tmp_path / "overlaid.mp4", rgb)
    preparer = FramePreparer(64, auto_crop=True)
    with open_media(path) as media:
        stored = list(preparer.prepare(media.frames()))
    assert len(stored) == 16 and stored[0].shape == (64, 64)
    box = preparer.crop_box
    assert box is not None
    assert abs(box.top - top) <= 3 and abs(box.left - left) <= 3
    assert abs(box.bottom - bottom) <= 3 and abs(box.right - right) <= 3
    assert preparer.original_size == (128, 160)
    assert preparer.timestamps == pytest.approx([i / 10 for i in range(16)], abs=0.011)


def test_auto_crop_of_a_still_image_takes_the_largest_bright_region() -> None:
    rgb, (top, left, bottom, right) = _overlaid_scan(count=1)
    grey = rgb[..., 1]
    box = find_ultrasound_region(grey, saturation=None)
    assert box is not None
    assert box[0] <= top and box[1] <= left and box[2] >= bottom and box[3] >= right
    assert box[3] - box[1] < 140


@pytest.mark.parametrize("region", [(8, 12, 120, 150), (40, 60, 72, 92)], ids=["scaled-whole", "cropped-first"])
def test_stored_frames_are_the_crop_box_resized(tmp_path: Path, region: tuple[int, int, int, int]) -> None:
    top, left, bottom, right = region
    rows, columns = np.mgrid[0 : bottom - top, 0 : right - left]
    frames = np.zeros((12, 128, 160), dtype=np.uint8)
    for index in range(12):
        frames[index, top:bottom, left:right] = 128 + 80 * np.sin(columns / 9 + index / 3) * np.cos(rows / 11)
    path = write_video(tmp_path / "scan.mp4", frames)
    preparer = FramePreparer(24, auto_crop=True)
    with open_media(path) as media:
        stored = list(preparer.prepare(media.frames()))
    box = preparer.crop_box
    assert box is not None and abs(box.top - region[0]) <= 5 and abs(box.right - region[3]) <= 5
    greys, _, _ = decode_all(path)
    for grey, frame in zip(greys, stored):
        expected = np.asarray(
            Image.fromarray(grey[box.top : box.bottom, box.left : box.right]).resize((24, 24), Image.BOX)
        )
        inner = (slice(1, -1), slice(1, -1))  # the outer ring depends on each scaler's filter support at the black edge
        assert np.abs(frame[inner].astype(int) - expected[inner]).mean() < 3


def test_crop_none_and_blank_video_keep_the_whole_frame() -> None:
    frames = [Frame(np.zeros((40, 50), dtype=np.uint8), i / 10) for i in range(5)]
    preparer = FramePreparer(16, auto_crop=True)
    stored = list(preparer.prepare(frames))
    assert preparer.crop_box == CropBox.full(40, 50)
    assert len(stored) == 5 and stored[0].shape == (16, 16)
    plain = FramePreparer(16, auto_crop=False)
    list(plain.prepare(frames))
    assert plain.crop_box == CropBox.full(40, 50)


def test_frame_size_change_within_a_video_is_a_decode_error() -> None:
    frames = [Frame(np.zeros((40, 50), dtype=np.uint8), 0.0), Frame(np.zeros((40, 52), dtype=np.uint8), 0.1)]
    with pytest.raises(DecodeError, match="frame size changes"):
        list(FramePreparer(16, auto_crop=True).prepare(frames))
