"""Decoding of videos (PyAV), DICOM (pydicom) and still images (PIL) into greyscale frames with timestamps.

Every source kind is opened with `open_media` and read as a stream of `Frame` objects, one at a time,
so that memory stays bounded whatever the length of a recording. A `Frame` carries its greyscale
pixels and presentation time; its colour saturation is computed only when asked for (the crop
finder asks for a few frames per video), because most of the time colour is thrown away.

Decoding is capped (``max_pixels``, `check_frame_size`): a frame larger than the cap is refused from
the header of the image, video stream or DICOM file, before its pixels are decoded, except a JPEG
still, which is decoded at 1/2, 1/4 or 1/8 scale to fit (``Image.draft``), with a note in `notes`.

Anything wrong with a file surfaces as `DecodeError` naming the file and the reason. Nothing is
read from DICOM headers except frame timing, the pixel-data description, and the patient ID, which
callers may only use through a salted hash (see `sonocl.data.ingest`).
"""

from __future__ import annotations

import abc
import re
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType

import av
import numpy as np
import pydicom
import pydicom.dataelem
import pydicom.errors
from PIL import Image, UnidentifiedImageError
from pydicom.pixels import apply_color_lut, iter_pixels
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import DeflatedExplicitVRLittleEndian

VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mov", ".mpeg", ".mpg", ".mkv", ".gif"})
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})

DEFAULT_MAX_PIXELS = 50_000_000
"""Default cap on the pixels of one decoded frame (width × height), see ``sonocl ingest --max-pixels``."""
JPEG_REDUCTIONS = (2, 4, 8)
"""Scales at which a JPEG can be decoded reduced (``Image.draft``)."""

_DICOM_MAGIC_OFFSET = 128
_DICOM_MAGIC = b"DICM"


class DecodeError(Exception):
    """A file that cannot be decoded: ``str()`` names the file and what is wrong, ``reason`` only the latter."""

    def __init__(self, path: Path | None, reason: str) -> None:
        super().__init__(f"{path}: {reason}" if path is not None else reason)
        self.path = path
        self.reason = reason


def media_kind(path: Path) -> str | None:
    """``"video"``, ``"dicom"``, ``"image"`` or ``None`` (not a media file) from the name, any case.

    A file without an extension is DICOM when it has the DICM preamble, as PACS exports often do.
    """
    suffix = path.suffix.lower()
    if suffix in VIDEO_SUFFIXES:
        return "video"
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in DICOM_SUFFIXES:
        return "dicom"
    if suffix == "" and _has_dicom_preamble(path):
        return "dicom"
    return None


def _has_dicom_preamble(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            head = handle.read(_DICOM_MAGIC_OFFSET + len(_DICOM_MAGIC))
    except OSError:
        return False
    return head[_DICOM_MAGIC_OFFSET:] == _DICOM_MAGIC


def check_frame_size(path: Path, width: int, height: int, max_pixels: int | None) -> None:
    """Refuse frames of more than ``max_pixels`` pixels: called on the size a header announces, before decoding."""
    if max_pixels is not None and width * height > max_pixels:
        raise DecodeError(
            path,
            f"frames of {width}×{height} = {width * height} pixels are over --max-pixels {max_pixels}; not decoded "
            "(raise --max-pixels to ingest it)",
        )


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key putting ``frame2`` before ``frame10``: digit runs compare as numbers, the rest case-insensitively."""
    return tuple((0, int(part)) if part.isdigit() else (1, part.lower()) for part in re.split(r"(\d+)", name) if part)


def frame_folder_pattern(name: str) -> str:
    """A frame file's name with its last number replaced by ``#``: files of one clip share the pattern."""
    return re.sub(r"\d+(?=\D*$)", "#", name.lower(), count=1)


def is_frame_folder(files: Sequence[Path]) -> bool:
    """Whether a folder's files are the numbered frames of one clip rather than independent still images.

    The frames of a clip are at least two images whose names differ only in one number
    (``frame001.png``, ``frame002.png``…) and which all have the same pixel size; a class folder of
    unrelated stills (``covid/IMG_1.jpg``, ``covid/scan.png``…) almost never passes both tests.
    Only image headers are read.
    """
    if len(files) < 2 or any(media_kind(path) != "image" for path in files):
        return False
    patterns = {frame_folder_pattern(path.name) for path in files}
    if len(patterns) != 1 or "#" not in next(iter(patterns)):
        return False
    sizes = set()
    for path in files:
        try:
            with Image.open(path) as image:
                sizes.add(image.size)
        except (OSError, UnidentifiedImageError):
            return False
    return len(sizes) == 1


def limited_range_lut() -> np.ndarray:
    """Map video-range luma (16…235) to full-range grey (0…255), as FFmpeg's conversion to ``gray`` does.

    Applied after resizing (the map is affine, so the order barely matters) to keep the per-pixel
    work on the small stored frame rather than the full decoded one.
    """
    levels = (np.arange(256, dtype=np.float32) - 16.0) * (255.0 / 219.0)
    return np.clip(np.rint(levels), 0, 255).astype(np.uint8)


_LIMITED_RANGE_LUT = limited_range_lut()
_PLANAR_YUV = frozenset({"yuv410p", "yuv411p", "yuv420p", "yuv422p", "yuv440p", "yuv444p"})
_PLANAR_YUV_FULL_RANGE = frozenset({"yuvj411p", "yuvj420p", "yuvj422p", "yuvj440p", "yuvj444p"})
_GREY_FORMATS = frozenset({"gray", "gray8", "monob", "monow"})


class Frame:
    """One decoded frame: greyscale pixels, presentation time, and what else resizing and cropping can use.

    ``grey`` may be a view into the decoder's frame, which the `Frame` keeps alive: holding a few
    hundred frames back (as the crop finder does) costs no copy. ``level_lut`` (or ``None``) maps
    ``grey`` values to full-range grey: the fast path for YUV video reads the luma plane as it is
    and leaves the range expansion to after resizing, where there are far fewer pixels.
    ``video_frame`` is the decoded FFmpeg frame of a video (FFmpeg can scale and grey it in one
    pass); ``rgb`` the colour pixels of a colour image or DICOM frame.
    """

    __slots__ = ("grey", "time", "level_lut", "video_frame", "rgb")

    def __init__(
        self,
        grey: np.ndarray,
        time: float,
        level_lut: np.ndarray | None = None,
        video_frame: av.VideoFrame | None = None,
        rgb: np.ndarray | None = None,
    ) -> None:
        self.grey = grey
        self.time = time
        self.level_lut = level_lut
        self.video_frame = video_frame
        self.rgb = rgb

    @property
    def bytes_per_pixel(self) -> int:
        """Memory held per pixel while this frame is referenced (grey plus colour planes, upper bound)."""
        return 4 if self.video_frame is not None or self.rgb is not None else 1

    def saturation(self, reduction: int = 1) -> np.ndarray | None:
        """Colourfulness of ``reduction``×``reduction`` blocks, ``None`` for a grey source.

        Colourfulness is max minus min of R, G, B; for YUV video it is read from the chroma planes
        as twice the larger chroma offset from neutral, which approximates it closely at a fraction
        of the cost of a colour conversion. The shape is that of ``grey`` reduced by PIL's
        ``Image.reduce(reduction)`` (sizes rounded up).
        """
        height, width = self.grey.shape
        shape = (-(-height // reduction), -(-width // reduction))
        if self.video_frame is not None:
            name = self.video_frame.format.name
            if name in _GREY_FORMATS:
                return None
            if name in _PLANAR_YUV or name in _PLANAR_YUV_FULL_RANGE:
                offsets = [np.abs(_plane_array(plane).astype(np.int16) - 128) for plane in self.video_frame.planes[1:3]]
                colour = np.clip(2 * np.maximum(*offsets), 0, 255).astype(np.uint8)
                return np.asarray(Image.fromarray(colour).resize((shape[1], shape[0]), Image.Resampling.BOX))
            rgb = self.video_frame.to_ndarray(format="rgb24")
        elif self.rgb is not None:
            rgb = self.rgb
        else:
            return None
        red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
        colour = np.maximum(np.maximum(red, green), blue) - np.minimum(np.minimum(red, green), blue)
        return np.asarray(Image.fromarray(colour).reduce(reduction)) if reduction > 1 else colour


def _plane_array(plane: av.video.plane.VideoPlane) -> np.ndarray:
    """An 8-bit plane as an array view (rows padded to ``line_size`` are cut to the plane width)."""
    return np.frombuffer(memoryview(plane), dtype=np.uint8).reshape(plane.height, plane.line_size)[:, : plane.width]


class MediaSource(abc.ABC):
    """An open media file. Read `frames` once; `fps` is final once the frames are exhausted."""

    path: Path
    fps: float | None = None
    patient_id: str | None = None
    """Only DICOM sets this; callers must hash it with the store salt and never write it anywhere."""
    notes: tuple[str, ...] = ()
    """What a user should know about how the file was decoded (a JPEG decoded reduced), one line each."""

    @abc.abstractmethod
    def frames(self) -> Iterator[Frame]:
        """The frames in presentation order, times in seconds from the first."""

    def close(self) -> None:  # noqa: B027 (a no-op default, not an abstract method)
        """Release the file; sources that hold nothing open need not override this."""

    def __enter__(self) -> MediaSource:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class VideoSource(MediaSource):
    """A video file through PyAV (FFmpeg).

    ``threads`` > 1 turns on FFmpeg's frame and slice threading. It pays only when cores would
    otherwise idle: with one ingest worker per core it costs about a fifth more CPU for nothing.
    """

    def __init__(self, path: Path, threads: int = 1, max_pixels: int | None = None) -> None:
        self.path = path
        self._max_pixels = max_pixels
        try:
            self._container = av.open(str(path))
        except av.FFmpegError as error:
            raise DecodeError(path, f"not a readable video ({error.strerror})") from error
        except OSError as error:
            raise DecodeError(path, f"cannot read the file ({error.strerror})") from error
        if not self._container.streams.video:
            self._container.close()
            raise DecodeError(path, "the file holds no video stream")
        self._stream = self._container.streams.video[0]
        try:
            check_frame_size(path, self._stream.codec_context.width, self._stream.codec_context.height, max_pixels)
        except DecodeError:
            self._container.close()
            raise
        if threads > 1:
            self._stream.thread_type = "AUTO"
        self._stream.thread_count = threads
        rate = self._stream.average_rate or self._stream.guessed_rate
        self.fps = float(rate) if rate else None

    def frames(self) -> Iterator[Frame]:
        interval = 1.0 / self.fps if self.fps else 1.0
        start: float | None = None
        previous = -interval
        count = 0
        try:
            for frame in self._container.decode(self._stream):
                check_frame_size(self.path, frame.width, frame.height, self._max_pixels)  # a stream without a size
                time = frame.time
                if time is None:
                    time = previous + interval
                elif start is None:
                    start = time
                    time = 0.0
                else:
                    time -= start
                previous = time
                count += 1
                yield _video_frame(frame, time)
        except av.FFmpegError as error:
            raise DecodeError(self.path, f"video decoding failed after {count} frames ({error.strerror})") from error
        except ValueError as error:
            raise DecodeError(self.path, f"video decoding failed after {count} frames ({error})") from error
        if count == 0:
            raise DecodeError(self.path, "the video stream holds no decodable frame")
        if self.fps is None and count > 1 and previous > 0:
            self.fps = (count - 1) / previous

    def close(self) -> None:
        self._container.close()


def _video_frame(frame: av.VideoFrame, time: float) -> Frame:
    """Grey pixels of a decoded frame: the luma plane as it is for 8-bit planar YUV, FFmpeg's conversion otherwise.

    Ultrasound video is RGB-encoded grey, so luma is the grey image; reading the plane costs nothing,
    while a per-frame colour conversion at full resolution costs as much as the decoding itself.
    """
    name = frame.format.name
    if name in _PLANAR_YUV or name in _PLANAR_YUV_FULL_RANGE:
        luma = _plane_array(frame.planes[0])
        full_range = name in _PLANAR_YUV_FULL_RANGE or frame.color_range == 2
        return Frame(luma, time, None if full_range else _LIMITED_RANGE_LUT, video_frame=frame)
    return Frame(frame.to_ndarray(format="gray"), time, video_frame=frame)


def _to_uint8(pixels: np.ndarray, bits: int) -> np.ndarray:
    """Scale integer pixels of ``bits`` significant bits to 0…255."""
    if pixels.dtype == np.uint8 and bits <= 8:
        return pixels
    top = float((1 << bits) - 1)
    scaled = np.clip(pixels.astype(np.float32), 0, top) * (255.0 / top)
    return np.rint(scaled).astype(np.uint8)


_GREY_BLOCK_PIXELS = 1 << 20
"""Pixels converted from colour to grey at a time (`_grey_and_rgb`)."""


def _grey_and_rgb(pixels: np.ndarray, bits: int, monochrome1: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Grey uint8 image and (for colour pixels) the RGB uint8 image, from a DICOM or image array."""
    if pixels.ndim == 3:
        rgb = _to_uint8(pixels[..., :3], bits)
        weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)
        grey = np.empty(rgb.shape[:2], dtype=np.uint8)
        # Blocks of rows: a float copy of a whole large image would take 12 bytes a pixel.
        rows = max(1, _GREY_BLOCK_PIXELS // max(1, rgb.shape[1]))
        for top in range(0, rgb.shape[0], rows):
            grey[top : top + rows] = np.rint(rgb[top : top + rows] @ weights)
        return grey, rgb
    grey = _to_uint8(pixels, bits)
    return (255 - grey if monochrome1 else grey), None


class DicomSource(MediaSource):
    """A DICOM file, multi-frame (cine) or single-frame, read frame by frame from disk.

    Timing comes from Frame Time, Frame Time Vector, Cine Rate or Recommended Display Frame Rate.
    Pixels with more than 8 bits are scaled by their Bits Stored range; MONOCHROME1 is inverted so
    that bright always means echo; palette colour is expanded before greying.
    """

    def __init__(self, path: Path, max_pixels: int | None = None) -> None:
        self.path = path
        self._max_pixels = max_pixels
        # pydicom warns about malformed values by quoting them, and a quoted patient field must never reach stderr.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._read_header(path)

    def _read_header(self, path: Path) -> None:
        try:
            header = pydicom.dcmread(path, defer_size="64 KB", force=path.suffix.lower() in DICOM_SUFFIXES)
        except (pydicom.errors.InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError) as error:
            raise DecodeError(path, f"not a readable DICOM file ({type(error).__name__})") from error
        if "PixelData" not in header:
            raise DecodeError(path, "DICOM file without pixel data (a report or structured document)")
        file_meta = getattr(header, "file_meta", None)
        syntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
        if syntax is None:
            raise DecodeError(path, "DICOM file without a transfer syntax in its file meta information")
        try:
            available = get_decoder(syntax).is_available
        except NotImplementedError:
            raise DecodeError(path, f"DICOM transfer syntax {syntax!s} is not supported") from None
        if not available:
            raise DecodeError(
                path,
                f"DICOM transfer syntax {syntax.name} ({syntax}) needs a pixel-data plugin that is not "
                "installed (pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg, or python-gdcm)",
            )
        check_frame_size(path, int(header.get("Columns", 0) or 0), int(header.get("Rows", 0) or 0), self._max_pixels)
        self._deflated = syntax == DeflatedExplicitVRLittleEndian
        if not syntax.is_encapsulated and not self._deflated:
            _check_native_pixel_data(path, header)
        self._photometric = str(header.get("PhotometricInterpretation", "MONOCHROME2")).upper()
        self._bits = int(header.get("BitsStored", 8) or 8)
        self._palette = header if self._photometric == "PALETTE COLOR" else None
        self._frame_times = _dicom_frame_times(header)
        self.fps = _dicom_fps(header, self._frame_times)
        patient_id = str(header.get("PatientID", "") or "").strip()
        self.patient_id = patient_id or None

    def frames(self) -> Iterator[Frame]:
        count = 0
        monochrome1 = self._photometric == "MONOCHROME1"
        try:
            # Frames are read from the file one at a time, except in a deflated file, which must be inflated whole.
            for pixels in iter_pixels(pydicom.dcmread(self.path) if self._deflated else self.path):
                bits = self._bits
                if self._palette is not None:
                    pixels = apply_color_lut(pixels, self._palette)
                    bits = 16 if pixels.dtype == np.uint16 else 8
                grey, rgb = _grey_and_rgb(pixels, bits, monochrome1)
                time = self._frame_times[count] if count < len(self._frame_times) else count / (self.fps or 1.0)
                count += 1
                yield Frame(grey, time, rgb=rgb)
        except (
            ValueError,
            NotImplementedError,
            RuntimeError,
            KeyError,
            AttributeError,
            TypeError,
            OSError,
            EOFError,
        ) as error:
            raise DecodeError(
                self.path, f"DICOM pixel data unreadable after {count} frames ({type(error).__name__}: {error})"
            ) from error
        if count == 0:
            raise DecodeError(self.path, "DICOM pixel data holds no frame")


def _check_native_pixel_data(path: Path, header: pydicom.Dataset) -> None:
    """Uncompressed pixel data must hold every frame the header announces, else the file is cut short or its header wrong.

    Checked on the header alone (the deferred element's length and file position), so that a header
    claiming 100,000 frames is refused before any frame is decoded, with the counts in the message.
    """
    rows, columns = int(header.get("Rows", 0) or 0), int(header.get("Columns", 0) or 0)
    bits = int(header.get("BitsAllocated", 8) or 8)
    frame_bytes = rows * columns * int(header.get("SamplesPerPixel", 1) or 1) * bits // 8
    if frame_bytes == 0 or bits % 8:
        return  # a missing size or bit-packed pixels: left to the pixel decoder's own checks
    element = header.get_item("PixelData")
    if isinstance(element, pydicom.dataelem.RawDataElement) and element.value is None:
        held_bytes = min(element.length, max(0, path.stat().st_size - element.value_tell))
    else:
        held_bytes = len(element.value or b"")
    announced = int(header.get("NumberOfFrames", 1) or 1)
    held = held_bytes // frame_bytes
    if held < announced:
        raise DecodeError(
            path,
            f"the pixel data holds {held} of the {announced} frames of {columns}×{rows} its header announces "
            "(the file is cut short, or its header is wrong)",
        )


def _dicom_frame_times(header: pydicom.Dataset) -> list[float]:
    """Seconds from the first frame of each frame, from Frame Time Vector or Frame Time; empty if neither is given."""
    frames = int(header.get("NumberOfFrames", 1) or 1)
    vector = header.get("FrameTimeVector")
    if vector is not None and len(vector) == frames:
        return [float(t) for t in np.cumsum(np.asarray(vector, dtype=np.float64) / 1000.0) - float(vector[0]) / 1000.0]
    frame_time = header.get("FrameTime")
    if frame_time:
        return [index * float(frame_time) / 1000.0 for index in range(frames)]
    return []


def _dicom_fps(header: pydicom.Dataset, times: list[float]) -> float | None:
    for keyword in ("CineRate", "RecommendedDisplayFrameRate"):
        value = header.get(keyword)
        if value:
            return float(value)
    if len(times) > 1 and times[-1] > 0:
        return (len(times) - 1) / times[-1]
    return None


def image_grey(path: Path, max_pixels: int | None = None) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Grey uint8 pixels of a still image, its RGB pixels when it is in colour, and the reduction it was decoded at.

    8-bit images keep their values; 16-bit and 32-bit greyscale images are scaled from their own
    minimum…maximum to 0…255 (their nominal range is rarely used, so a fixed scale would leave them
    nearly black). Palette and RGBA images are converted to RGB first (alpha is dropped).

    The size is checked on the header, before any pixel is decoded, as Pillow's decompression-bomb check
    does (and that check still refuses more than twice ``Image.MAX_IMAGE_PIXELS``, whatever ``max_pixels``):
    over ``max_pixels``, a JPEG is decoded at the smallest reduction (1/2, 1/4, 1/8) that fits, anything
    else is refused (`check_frame_size`).
    """
    reduction = 1
    try:
        with warnings.catch_warnings():
            # Pillow warns (several lines on stderr) from MAX_IMAGE_PIXELS on; the size is checked below instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
        with image:
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels and image.format == "JPEG":
                reduction = next(
                    (s for s in JPEG_REDUCTIONS if -(-width // s) * -(-height // s) <= max_pixels), JPEG_REDUCTIONS[-1]
                )
                image.draft(image.mode, (width // reduction, height // reduction))
            check_frame_size(path, *image.size, max_pixels)
            image.load()
            if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
                pixels = np.array(image, dtype=np.float64)  # scaled in place: one float copy, not three
                low, high = float(pixels.min()), float(pixels.max())
                pixels -= low
                pixels *= 255.0 / (high - low) if high > low else 0.0
                return np.rint(pixels, out=pixels).astype(np.uint8), None, reduction
            if image.mode in ("L", "1", "LA"):
                return np.asarray(image.convert("L")), None, reduction
            rgb = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    except UnidentifiedImageError as error:
        raise DecodeError(path, "not a readable image (no image format recognised in its content)") from error
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as error:
        raise DecodeError(path, f"not a readable image ({error})") from error
    return (*_grey_and_rgb(rgb, 8, monochrome1=False), reduction)


def _reduction_note(reduction: int, shape: tuple[int, ...], max_pixels: int | None) -> str:
    return f"decoded at 1/{reduction} scale ({shape[1]}×{shape[0]} pixels) to stay under --max-pixels {max_pixels}"


class ImageSource(MediaSource):
    """A still image: a one-frame video at time 0 without a frame rate."""

    def __init__(self, path: Path, max_pixels: int | None = None) -> None:
        self.path = path
        self._grey, self._rgb, reduction = image_grey(path, max_pixels)
        if reduction > 1:
            self.notes = (_reduction_note(reduction, self._grey.shape, max_pixels),)

    def frames(self) -> Iterator[Frame]:
        yield Frame(self._grey, 0.0, rgb=self._rgb)


class FrameFolderSource(MediaSource):
    """A folder of numbered frame images read as one clip, in natural numeric order.

    A frame folder has no timing, so frame *i* gets time *i* seconds and the clip has no frame rate.
    """

    def __init__(self, path: Path, files: Sequence[Path], max_pixels: int | None = None) -> None:
        self.path = path
        self._files = sorted(files, key=lambda file: natural_key(file.name))
        self._max_pixels = max_pixels

    def frames(self) -> Iterator[Frame]:
        first_shape: tuple[int, ...] | None = None
        for index, file in enumerate(self._files):
            grey, rgb, reduction = image_grey(file, self._max_pixels)
            if first_shape is None:
                first_shape = grey.shape
                if reduction > 1:
                    self.notes = (_reduction_note(reduction, grey.shape, self._max_pixels),)
            elif grey.shape != first_shape:
                raise DecodeError(file, f"frame of size {grey.shape} in a clip of {first_shape} frames")
            yield Frame(grey, float(index), rgb=rgb)


def open_media(
    path: Path, frame_files: Sequence[Path] | None = None, threads: int = 1, max_pixels: int | None = None
) -> MediaSource:
    """Open a file by its kind, or a frame folder when ``frame_files`` lists its frames.

    ``threads``: decoder threads for a video (see `VideoSource`); ``max_pixels``: cap on a frame's pixels
    (`check_frame_size`; ``None``: no cap).
    """
    if frame_files is not None:
        return FrameFolderSource(path, frame_files, max_pixels)
    try:
        empty = path.stat().st_size == 0
    except OSError as error:
        raise DecodeError(path, f"cannot read the file ({error.strerror})") from error
    if empty:
        raise DecodeError(path, "empty file (0 bytes)")
    kind = media_kind(path)
    if kind == "video":
        return VideoSource(path, threads, max_pixels)
    if kind == "dicom":
        return DicomSource(path, max_pixels)
    if kind == "image":
        return ImageSource(path, max_pixels)
    raise DecodeError(path, "not a video, DICOM or image file")
