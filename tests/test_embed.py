"""`sonocl embed`: the right rows and columns in Parquet and .npz, features equal to the encoder's on the frames."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sonocl.cli import main
from sonocl.evaluate.data import sample_frames
from sonocl.models import build_backbone, save_encoder

METADATA = {"arch": "resnet18", "channels": 1, "size": 32, "mean": 0.4, "std": 0.3, "method": "simclr"}


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("encoder") / "encoder.safetensors"
    save_encoder(build_backbone("resnet18", 1), path, METADATA)
    return path


def _expected_features(store, frames: np.ndarray, encoder_file: Path) -> np.ndarray:
    from sonocl.augment import resize_to
    from sonocl.models import load_encoder

    backbone = load_encoder(encoder_file).eval()
    images = (resize_to(torch.from_numpy(store.gather(frames)), 32) - 0.4) / 0.3
    with torch.no_grad():
        return backbone(images).numpy()


def test_parquet_rows_columns_and_features(phantom_store, encoder_file: Path, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    out = tmp_path / "embeddings.parquet"
    assert (
        main(
            [
                "embed",
                "--store",
                str(phantom_store.root),
                "--init",
                str(encoder_file),
                "--out",
                str(out),
                "--fps",
                "5",
                "--batch-size",
                "7",
                "--device",
                "cpu",
                "--no-progress",
            ]
        )
        == 0
    )
    table = pq.read_table(out)
    expected_rows = sum(len(sample_frames(np.asarray(v.timestamps), 5.0, 0)) for v in phantom_store.videos)
    assert table.num_rows == expected_rows
    extra = sorted(phantom_store.videos[0].extra_labels)
    assert table.column_names == [
        "video_id",
        "video_index",
        "frame_index",
        "frame",
        "timestamp",
        "group",
        "label",
        *extra,
        "embedding",
    ]
    metadata = json.loads(table.schema.metadata[b"sonocl"])
    assert (metadata["size"], metadata["mean"], metadata["std"]) == (32, 0.4, 0.3)  # from the encoder's metadata
    columns = table.to_pydict()
    frames = np.array(columns["frame"])
    assert list(columns["video_id"]) == [phantom_store.videos[v].id for v in phantom_store.frame_video[frames]]
    assert list(columns["label"]) == [phantom_store.videos[v].label for v in phantom_store.frame_video[frames]]
    assert np.allclose(columns["timestamp"], phantom_store.frame_time[frames])
    assert columns["frame_index"][:4] == [0, 4, 8, 12]  # 20 fps sampled at 5 fps
    embeddings = np.array(columns["embedding"], dtype=np.float32)
    assert embeddings.shape == (expected_rows, 512)
    np.testing.assert_allclose(embeddings[:5], _expected_features(phantom_store, frames[:5], encoder_file), atol=1e-4)


def test_npz_every_nth_frame(phantom_store, tmp_path: Path) -> None:
    out = tmp_path / "embeddings.npz"
    assert (
        main(
            [
                "embed",
                "--store",
                str(phantom_store.root),
                "--init",
                "random",
                "--out",
                str(out),
                "--every",
                "6",
                "--size",
                "32",
                "--device",
                "cpu",
                "--no-progress",
            ]
        )
        == 0
    )
    data = np.load(out)
    per_video = [len(range(0, v.num_frames, 6)) for v in phantom_store.videos]
    assert data["embeddings"].shape == (sum(per_video), 512) and data["embeddings"].dtype == np.float32
    assert list(data["frame_index"][: per_video[0]]) == list(range(0, phantom_store.videos[0].num_frames, 6))
    assert set(data["label"]) == {"covid", "pneumonia", "regular"} and "anatomy" in data.files
    metadata = json.loads(str(data["metadata"]))
    assert (metadata["init"], metadata["size"], metadata["mean"]) == ("random", 32, 0.5)


def test_embed_rejects_other_extensions(phantom_store, tmp_path: Path, capsys) -> None:
    assert (
        main(["embed", "--store", str(phantom_store.root), "--init", "random", "--out", str(tmp_path / "e.csv")]) == 2
    )
    assert ".parquet or .npz" in capsys.readouterr().err
