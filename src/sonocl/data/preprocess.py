"""From decoded frames to stored frames: which frames to keep, the ultrasound-region crop, the resize.

The crop (``--crop auto``) is found once per video from a sample of its frames while the video is
still decoded only once and streamed: the first frames (up to `CROP_BUFFER_BYTES`, which covers
the whole of most clips) wait in a bounded buffer until the crop is known, then go out cropped.
The region is found on at most `CROP_SAMPLE_FRAMES` frames spread over that buffer, each reduced
to about `CROP_WORK_SIDE` pixels a side:

1. *image* pixels are those that change over the sample at all (`NOISE_LEVEL`): speckle, breathing
   and probe motion do, and even the deep, dark part of a scan carries noise, while black borders
   and static overlays (text, logos, rulers, colour bars) are constant. In a still image or a
   frozen clip nothing changes, and image pixels are those brighter than black (`BLACK_LEVEL`).
   Both maps are median-filtered so that isolated flicker (GIF dithering) does not count, and
   pixels that are colourful in any sampled frame are removed;
2. thin structures (text, calipers, scale ticks) are opened away and the rest is closed and filled,
   so that the scan becomes one solid region, and the mask is split into connected components;
3. the scan is the largest component and every component at least `COMPANION_AREA` of its size
   (the near field of a probe can be separated from the rest by a dark band); small changing marks
   such as a frame counter are left out. Its bounding box, widened by one work pixel, is the crop.

If the scan covers less than `MIN_REGION_FRACTION` of the frame the whole frame is kept.
After the crop every frame is resized to ``size×size`` without keeping the aspect ratio, as the
USCL and Meta-USCL papers do, by FFmpeg's scaler with area averaging (several times faster than
PIL on these frame sizes, which matters because resizing is the largest cost after decoding).
Video frames that need little cropping are scaled whole by FFmpeg, colour-to-grey conversion
included, and cropped afterwards (`FramePreparer._plan_whole_frame_scaling`).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Iterable, Iterator

import av
import numpy as np
from av.video.reformatter import VideoReformatter
from PIL import Image
from scipy import ndimage

from sonocl.data.decode import DecodeError, Frame

CROP_BUFFER_BYTES = 192 << 20
"""Cap on the decoded frames held back while the crop is found (per worker process)."""
CROP_SAMPLE_FRAMES = 32
"""Frames, spread over the buffer, from which the crop is found."""
COLOUR_SAMPLE_EVERY = 8
"""Colour saturation is measured on every this-many-th buffered frame (overlays are static)."""
CROP_WORK_SIDE = 256
"""The crop is found on frames reduced by an integer factor to at most about this many pixels a side."""
NOISE_LEVEL = 1.0
"""Temporal standard deviation (grey levels) above which a pixel changes: speckle does, overlays and borders do not."""
BLACK_LEVEL = 8
"""Grey level (full range) above which a pixel of a still image is more than black border."""
COLOUR_LEVEL = 48
"""Saturation (max minus min of R, G, B) above which a pixel is a colour overlay, not grey ultrasound."""
COMPANION_AREA = 0.1
"""A region at least this fraction of the largest one's area is part of the scan too."""
MIN_REGION_FRACTION = 0.02
"""A scan smaller than this fraction of the frame is not trusted; the whole frame is kept instead."""
MIN_SOURCE_SIDE = 8
"""Frames smaller than this many pixels a side are not ultrasound images (a 1×1 spacer GIF, an icon): refused."""
FULL_FRAME_SCALING_LIMIT = 2.0
"""Video frames are scaled whole and then cropped (one FFmpeg pass) while the scaled whole frame is at most
this many times the stored size a side; a smaller crop is cut out first, so as not to scale mostly border."""


@dataclasses.dataclass(frozen=True)
class CropBox:
    """Region kept, in source pixels: rows ``top…bottom-1`` and columns ``left…right-1``."""

    top: int
    left: int
    bottom: int
    right: int

    @classmethod
    def full(cls, height: int, width: int) -> CropBox:
        return cls(0, 0, height, width)

    def as_tuple(self) -> tuple[int, int, int, int]:
        return (self.top, self.left, self.bottom, self.right)


def select_frames(
    frames: Iterable[Frame],
    stride: int = 1,
    max_fps: float | None = None,
    max_frames: int | None = None,
    on_limit: Callable[[], None] | None = None,
) -> Iterator[Frame]:
    """Frames kept by ``--stride`` (every Nth decoded frame), then ``--fps`` and ``--max-frames``.

    ``max_fps`` keeps a frame only when its timestamp reaches the next slot of a ``1/max_fps`` grid
    started at the first kept frame, so at most ``max_fps`` frames are kept in any second of real time
    whatever the irregularity of the source timing. Decoding stops once ``max_frames`` are kept, at the
    next frame that would have been kept; ``on_limit`` is then called (the video was truncated).
    """
    kept = 0
    next_slot = 0
    first_time: float | None = None
    for index, frame in enumerate(frames):
        if index % stride:
            continue
        slot = next_slot
        if max_fps is not None:
            if first_time is None:
                first_time = frame.time
            elapsed = (frame.time - first_time) * max_fps
            if elapsed < next_slot - 1e-6:
                continue
            slot = int(np.floor(elapsed + 1e-6)) + 1
        if max_frames is not None and kept >= max_frames:
            if on_limit is not None:
                on_limit()
            return
        next_slot = slot
        kept += 1
        yield frame


def work_factor(height: int, width: int) -> int:
    """Integer reduction factor bringing a frame to at most about `CROP_WORK_SIDE` pixels a side."""
    return max(1, -(-max(height, width) // CROP_WORK_SIDE))


def find_ultrasound_region(grey: np.ndarray, saturation: np.ndarray | None) -> tuple[int, int, int, int] | None:
    """Bounding box ``(top, left, bottom, right)`` of the scan in small work frames, or ``None`` if not found.

    ``grey``: ``(K, h, w)`` uint8 sample of reduced full-range frames; ``saturation``: ``(h, w)``
    maximum colour saturation over the sample (``None`` for a grey source). The method is described
    in the module docstring.
    """
    height, width = grey.shape[1:]
    changing = ndimage.median_filter(grey.std(axis=0, dtype=np.float32), size=3) > NOISE_LEVEL
    if changing.mean() >= MIN_REGION_FRACTION:
        image = changing
    else:
        image = ndimage.median_filter(grey.max(axis=0), size=3) > BLACK_LEVEL
    if saturation is not None:
        image &= ~ndimage.binary_dilation(saturation > COLOUR_LEVEL, iterations=1)
    labels, count = ndimage.label(_solidify(image))
    if count == 0:
        return None
    areas = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    scan = areas >= COMPANION_AREA * areas.max()
    if areas[scan].sum() < MIN_REGION_FRACTION * height * width:
        return None
    rows, cols = np.nonzero(scan[labels - 1] & (labels > 0))
    return (
        max(0, int(rows.min()) - 1),
        max(0, int(cols.min()) - 1),
        min(height, int(rows.max()) + 2),
        min(width, int(cols.max()) + 2),
    )


def _solidify(mask: np.ndarray, closing: int = 3) -> np.ndarray:
    """Open away thin structures, close and fill the rest; the frame edge neither erodes nor grows the mask."""
    padded = np.pad(mask, closing + 1, mode="edge")
    solid = ndimage.binary_closing(ndimage.binary_opening(padded), iterations=closing)
    inner = (slice(closing + 1, -(closing + 1)),) * 2
    return ndimage.binary_fill_holes(solid[inner])


def _reduce(image: np.ndarray, factor: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).reduce(factor)) if factor > 1 else image


def _full_range(grey: np.ndarray, level_lut: np.ndarray | None) -> np.ndarray:
    return np.take(level_lut, grey) if level_lut is not None else grey


class FramePreparer:
    """Turns a stream of decoded frames into ``size×size`` uint8 frames, cropping first when asked.

    After `prepare` is exhausted, `original_size`, `crop_box` and `timestamps` describe what was stored.
    """

    def __init__(self, size: int, auto_crop: bool) -> None:
        self.size = size
        self.auto_crop = auto_crop
        self.original_size: tuple[int, int] | None = None
        self.crop_box: CropBox | None = None
        self.timestamps: list[float] = []
        self._reformatter = VideoReformatter()
        self._whole_frame: _WholeFrameScaling | None = None

    def prepare(self, frames: Iterable[Frame]) -> Iterator[np.ndarray]:
        iterator = iter(frames)
        if self.auto_crop:
            yield from self._prepare_sample(iterator)
        for frame in iterator:
            yield self._finish(frame)

    def _prepare_sample(self, iterator: Iterator[Frame]) -> Iterator[np.ndarray]:
        """Hold back the first frames, find the crop from a sample of them, then emit them."""
        buffered: collections.deque[Frame] = collections.deque()
        saturation: np.ndarray | None = None
        factor = 1
        limit = 1
        for frame in iterator:
            if not buffered:
                height, width = frame.grey.shape
                factor = work_factor(height, width)
                limit = max(1, CROP_BUFFER_BYTES // (height * width * frame.bytes_per_pixel))
            elif frame.grey.shape != buffered[0].grey.shape:
                raise DecodeError(
                    None, f"frame size changes from {buffered[0].grey.shape} to {frame.grey.shape} within the video"
                )
            if len(buffered) % COLOUR_SAMPLE_EVERY == 0:
                colour = frame.saturation(factor)
                if colour is not None:
                    saturation = colour if saturation is None else np.maximum(saturation, colour)
            buffered.append(frame)
            if len(buffered) >= limit:
                break
        if not buffered:
            return
        height, width = buffered[0].grey.shape
        picks = np.unique(np.linspace(0, len(buffered) - 1, min(len(buffered), CROP_SAMPLE_FRAMES)).round().astype(int))
        sample = np.stack([_full_range(_reduce(buffered[i].grey, factor), buffered[i].level_lut) for i in picks])
        region = find_ultrasound_region(sample, saturation)
        if region is not None:
            top, left, bottom, right = region
            self.crop_box = CropBox(
                top * factor, left * factor, min(height, bottom * factor), min(width, right * factor)
            )
        while buffered:
            yield self._finish(buffered.popleft())

    def _finish(self, frame: Frame) -> np.ndarray:
        grey = frame.grey
        if self.original_size is None:
            if min(grey.shape) < MIN_SOURCE_SIDE:
                raise DecodeError(
                    None,
                    f"frames of {grey.shape[1]}×{grey.shape[0]} pixels are too small for an ultrasound image "
                    f"(at least {MIN_SOURCE_SIDE}×{MIN_SOURCE_SIDE})",
                )
            self.original_size = (int(grey.shape[0]), int(grey.shape[1]))
            self.crop_box = self.crop_box or CropBox.full(*self.original_size)
            if frame.video_frame is not None:
                self._whole_frame = self._plan_whole_frame_scaling(self.crop_box)
        elif grey.shape != self.original_size:
            raise DecodeError(None, f"frame size changes from {self.original_size} to {grey.shape} within the video")
        self.timestamps.append(float(frame.time))
        box = self.crop_box
        assert box is not None
        region = grey[box.top : box.bottom, box.left : box.right]
        if region.shape == (self.size, self.size):
            return np.ascontiguousarray(_full_range(region, frame.level_lut))
        if self._whole_frame is not None and frame.video_frame is not None:
            plan = self._whole_frame
            scaled = self._reformatter.reformat(
                frame.video_frame, width=plan.width, height=plan.height, format="gray", interpolation="AREA", threads=1
            ).to_ndarray()
            return np.ascontiguousarray(scaled[plan.top : plan.top + self.size, plan.left : plan.left + self.size])
        scaled = self._reformatter.reformat(
            av.VideoFrame.from_ndarray(region, format="gray"),
            width=self.size,
            height=self.size,
            interpolation="AREA",
            threads=1,
        ).to_ndarray()
        return np.ascontiguousarray(_full_range(scaled, frame.level_lut))

    def _plan_whole_frame_scaling(self, box: CropBox) -> _WholeFrameScaling | None:
        """Scale the whole decoded frame so that the box becomes ``size×size``, then cut the box out.

        One FFmpeg pass then does the colour-to-grey conversion, the range expansion and the scaling
        on the decoder's own frame, about twice as fast as copying the cropped luma out and scaling
        that. The box is moved to whole pixels of the scaled frame, which shifts it by under half a
        stored pixel; `crop_box` is updated to the region actually stored. ``None`` when the scaled
        frame would be more than `FULL_FRAME_SCALING_LIMIT` times the stored size (mostly border).
        """
        assert self.original_size is not None
        height, width = self.original_size
        out_height = max(self.size, round(height * self.size / (box.bottom - box.top)))
        out_width = max(self.size, round(width * self.size / (box.right - box.left)))
        if max(out_height, out_width) > FULL_FRAME_SCALING_LIMIT * self.size:
            return None
        top = min(round(box.top * out_height / height), out_height - self.size)
        left = min(round(box.left * out_width / width), out_width - self.size)
        self.crop_box = CropBox(
            round(top * height / out_height),
            round(left * width / out_width),
            min(height, round((top + self.size) * height / out_height)),
            min(width, round((left + self.size) * width / out_width)),
        )
        return _WholeFrameScaling(out_height, out_width, top, left)


@dataclasses.dataclass(frozen=True)
class _WholeFrameScaling:
    """Size to scale a whole video frame to, and where the stored ``size×size`` region starts in it."""

    height: int
    width: int
    top: int
    left: int
