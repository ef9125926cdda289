"""Before/after figures of ``--crop auto`` for docs/ingest.md.

Each panel pairs a source frame (the 11th of the video) with the crop box drawn in red,
and the frame as stored (crop, then resize to 256×256). Writes ``docs/figures/crop_pocus.png``
(real POCUS videos, when ``../shared/data/pocus`` exists) and ``docs/figures/crop_phantom.png``
(phantom videos with scanner text, a depth scale and a grey-map bar around the fan)::

    .venv/bin/python benchmarks/crop_figure.py
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from sonocl.data.decode import Frame, open_media
from sonocl.data.phantom import make_phantom_video
from sonocl.data.preprocess import FramePreparer

REPO = Path(__file__).resolve().parents[1]
POCUS = REPO.parent / "shared" / "data" / "pocus" / "pocus_videos"
POCUS_EXAMPLES = (
    "convex/Reg_Avi_Video_001.mp4",
    "convex/Reg_Avi_lung-sliding.MP4",
    "convex/Pneu_basalpneumonia_liftle_case1.mp4",
    "convex/Reg_northumbria_0409_set3_vid1.avi",
    "linear/Reg_Image_181206_crop.mp4",
    "convex/Pneu-Atlas-pneumonia2.gif",
)
PANEL = 256
CAPTION = 16
SHOWN_FRAME = 10


def before_after(frames: Iterable[Frame]) -> tuple[Image.Image, Image.Image]:
    """Frame `SHOWN_FRAME` (or the last) as decoded, with the crop box, and as stored by the real pipeline."""
    preparer = FramePreparer(PANEL, auto_crop=True)
    shown: list[np.ndarray] = []

    def watched() -> Iterable[Frame]:
        for index, frame in enumerate(frames):
            if index <= SHOWN_FRAME:
                grey = np.take(frame.level_lut, frame.grey) if frame.level_lut is not None else np.array(frame.grey)
                shown[:] = [grey]
            yield frame

    stored = list(preparer.prepare(watched()))
    box = preparer.crop_box
    assert box is not None
    before = Image.fromarray(shown[0]).convert("RGB")
    width = max(2, max(before.size) // 120)
    ImageDraw.Draw(before).rectangle(
        [box.left, box.top, box.right - 1, box.bottom - 1], outline=(255, 40, 40), width=width
    )
    return before.resize((PANEL, PANEL)), Image.fromarray(stored[min(SHOWN_FRAME, len(stored) - 1)]).convert("RGB")


def sheet(panels: list[tuple[str, Image.Image, Image.Image]], path: Path) -> None:
    """Rows of (caption, before, after) pairs, two pairs per row."""
    per_row = 2
    rows = -(-len(panels) // per_row)
    canvas = Image.new("RGB", (per_row * 2 * PANEL + (per_row - 1) * 8, rows * (PANEL + CAPTION)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for index, (caption, before, after) in enumerate(panels):
        left = (index % per_row) * (2 * PANEL + 8)
        top = (index // per_row) * (PANEL + CAPTION)
        draw.text((left + 2, top + 2), f"{caption}: source with crop box | stored {PANEL}x{PANEL}", fill=(0, 0, 0))
        canvas.paste(before, (left, top + CAPTION))
        canvas.paste(after, (left + PANEL, top + CAPTION))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    print(path)


def main() -> int:
    figures = REPO / "docs" / "figures"
    phantom = []
    for seed, label in enumerate(("covid", "pneumonia", "regular", "covid")):
        frames = make_phantom_video(label, seed=seed, num_frames=24, size=256)
        phantom.append((f"phantom {label}", *before_after(Frame(f, i / 20) for i, f in enumerate(frames))))
    sheet(phantom, figures / "crop_phantom.png")
    if not POCUS.is_dir():
        print(f"{POCUS} not found: crop_pocus.png not made", file=sys.stderr)
        return 0
    pocus = []
    for name in POCUS_EXAMPLES:
        with open_media(POCUS / name) as media:
            pocus.append((Path(name).name, *before_after(media.frames())))
    sheet(pocus, figures / "crop_pocus.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
