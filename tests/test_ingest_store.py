"""The store writer as ingest uses it: a refused video leaves no stray frames behind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sonocl.data.store import FrameStore, StoreError
from sonocl.data.store_writer import FrameStoreWriter


def _fields(video_id: str, count: int) -> dict[str, object]:
    return {
        "id": video_id,
        "source": f"{video_id}.mp4",
        "label": None,
        "group": video_id,
        "fps": 10.0,
        "original_size": (8, 8),
        "crop_box": (0, 0, 8, 8),
        "content_hash": video_id,
        "timestamps": [i / 10 for i in range(count)],
    }


def test_a_refused_video_does_not_shift_the_next_one(tmp_path: Path) -> None:
    first = np.full((2, 8, 8), 10, dtype=np.uint8)
    refused = np.full((3, 8, 8), 20, dtype=np.uint8)
    last = np.full((2, 8, 8), 30, dtype=np.uint8)
    raw = tmp_path / "refused.u8"
    raw.write_bytes(refused.tobytes())
    with FrameStoreWriter(tmp_path / "store", 8) as writer:
        writer.add_video(first, **_fields("a", 2))
        with pytest.raises(StoreError, match="already in the store"):
            writer.add_video_from_file(raw, **_fields("a", 3))
        with pytest.raises(StoreError, match="timestamps"):
            writer.add_video(refused, **{**_fields("b", 3), "timestamps": [0.0]})
        writer.add_video(last, **_fields("c", 2))
    store = FrameStore.open(tmp_path / "store")
    assert [video.id for video in store.videos] == ["a", "c"]
    assert np.array_equal(store.video_frames(1), last)
    assert (tmp_path / "store" / "frames.u8").stat().st_size == 4 * 64
