"""Mask pairing for every naming rule, binarisation, and the error cases."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sonocl.evaluate.masks import (
    MaskError,
    MaskPair,
    binarize,
    list_images,
    mask_task,
    pair_images,
    read_labels,
    read_mask,
)


def _write(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _image(size: tuple[int, int] = (12, 10)) -> np.ndarray:
    return np.full((size[1], size[0]), 90, dtype=np.uint8)


def _mask(
    size: tuple[int, int] = (12, 10), box: tuple[int, int, int, int] = (2, 2, 6, 6), value: int = 255
) -> np.ndarray:
    mask = np.zeros((size[1], size[0]), dtype=np.uint8)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = value
    return mask


def _names(result, root: Path) -> dict[str, list[str]]:
    return {pair.relative: [m.relative_to(root).as_posix() for m in pair.masks] for pair in result.pairs}


def test_suffix_rules_in_the_same_folder(tmp_path: Path) -> None:
    _write(tmp_path / "a.png", _image())
    _write(tmp_path / "a_Mask.png", _mask())
    _write(tmp_path / "b.png", _image())
    _write(tmp_path / "b_mask.png", _mask())
    _write(tmp_path / "c.png", _image())
    _write(tmp_path / "c_mask.png", _mask(box=(0, 0, 3, 3)))
    _write(tmp_path / "c_mask_1.png", _mask(box=(8, 6, 11, 9)))
    _write(tmp_path / "c_mask_2.png", _mask(box=(5, 0, 6, 1)))
    result = pair_images(tmp_path)
    assert result.errors == []
    assert _names(result, tmp_path) == {
        "a": ["a_Mask.png"],
        "b": ["b_mask.png"],
        "c": ["c_mask.png", "c_mask_1.png", "c_mask_2.png"],
    }
    merged = read_mask(result.pairs[2].masks)
    assert merged.sum() == 9 + 9 + 1  # the union of three lesions


def test_busi_layout_masks_are_not_images(tmp_path: Path) -> None:
    for cls in ("benign", "malignant"):
        _write(tmp_path / cls / f"{cls} (1).png", _image())
        _write(tmp_path / cls / f"{cls} (1)_mask.png", _mask())
        _write(tmp_path / cls / f"{cls} (1)_mask_1.png", _mask(box=(8, 1, 10, 3)))
    assert [p.name for p in list_images(tmp_path)] == ["benign (1).png", "malignant (1).png"]
    result = pair_images(tmp_path, tmp_path)
    assert _names(result, tmp_path) == {
        "benign/benign (1)": ["benign/benign (1)_mask.png", "benign/benign (1)_mask_1.png"],
        "malignant/malignant (1)": ["malignant/malignant (1)_mask.png", "malignant/malignant (1)_mask_1.png"],
    }


def test_parallel_mask_tree_same_relative_name(tmp_path: Path) -> None:
    images, masks = tmp_path / "images", tmp_path / "masks"
    _write(images / "p1" / "x.png", _image())
    _write(masks / "p1" / "x.png", _mask())
    _write(images / "y.jpg", _image())
    _write(masks / "y.png", _mask())  # another extension is fine
    _write(images / "z.png", _image())
    _write(masks / "z_Mask.png", _mask())  # HC18: images/NNN_HC.png ↔ masks/NNN_HC_Mask.png
    result = pair_images(images, masks)
    assert result.errors == []
    assert _names(result, masks) == {"p1/x": ["p1/x.png"], "y": ["y.png"], "z": ["z_Mask.png"]}


def test_class_images_and_mask_folders(tmp_path: Path) -> None:
    _write(tmp_path / "benign" / "images" / "u.png", _image())
    _write(tmp_path / "benign" / "mask" / "u.png", _mask())
    _write(tmp_path / "malignant" / "images" / "v.png", _image())
    _write(tmp_path / "malignant" / "masks" / "v_mask.png", _mask())
    result = pair_images(tmp_path)
    assert result.errors == []
    assert _names(result, tmp_path) == {
        "benign/images/u": ["benign/mask/u.png"],
        "malignant/images/v": ["malignant/masks/v_mask.png"],
    }


def test_mask_root_inside_the_image_root_is_not_listed(tmp_path: Path) -> None:
    _write(tmp_path / "a.png", _image())
    _write(tmp_path / "gt" / "a.png", _mask())
    result = pair_images(tmp_path, tmp_path / "gt")
    assert _names(result, tmp_path) == {"a": ["gt/a.png"]}


def test_missing_mask_names_the_image_and_what_was_expected(tmp_path: Path) -> None:
    _write(tmp_path / "ok.png", _image())
    _write(tmp_path / "ok_mask.png", _mask())
    _write(tmp_path / "lonely.png", _image())
    result = pair_images(tmp_path)
    assert [pair.relative for pair in result.pairs] == ["ok"]
    [(image, message)] = result.errors
    assert image.endswith("lonely.png")
    assert "no mask found" in message and "lonely_mask.png" in message and "lonely_Mask.png" in message


def test_mis_sized_mask_is_an_error(tmp_path: Path) -> None:
    _write(tmp_path / "a.png", _image((12, 10)))
    _write(tmp_path / "a_mask.png", _mask((6, 5), box=(1, 1, 3, 3)))
    result = pair_images(tmp_path)
    assert result.pairs == []
    [(image, message)] = result.errors
    assert image.endswith("a.png") and "6×5" in message and "12×10" in message


def test_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(MaskError, match="not a directory"):
        pair_images(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "array",
    [
        np.array([[0, 1], [1, 0]], dtype=np.uint8),  # 0/1
        np.array([[0, 255], [255, 0]], dtype=np.uint8),  # 0/255
        np.array([[0, 255], [255, 0]], dtype=np.uint8)[..., None].repeat(3, axis=2),  # RGB
        np.array([[[0, 0, 0], [0, 0, 200]], [[0, 0, 200], [0, 0, 0]]], dtype=np.uint8),  # a blue lesion
        np.array([[10, 200], [255, 120]], dtype=np.uint8),  # anti-aliased: > 127.5
        np.array([[0.0, 1.0], [1.0, 0.2]], dtype=np.float32),
    ],
)
def test_binarize(array: np.ndarray) -> None:
    assert binarize(array).tolist() == [[False, True], [True, False]]


def test_binarize_empty_and_alpha() -> None:
    assert not binarize(np.zeros((3, 3), dtype=np.uint8)).any()
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[..., 3] = 255  # opaque everywhere, no foreground: empty, not full
    rgba[0, 1, :3] = 255
    assert binarize(rgba).tolist() == [[False, True], [False, False]]


def test_rgb_mask_file_round_trip(tmp_path: Path) -> None:
    rgb = np.zeros((10, 12, 3), dtype=np.uint8)
    rgb[2:6, 3:7] = 255
    path = _write(tmp_path / "m.png", rgb)
    assert read_mask(path).sum() == 16


def _pairs_of(tmp_path: Path, *masks: np.ndarray, mode: str = "L") -> list[MaskPair]:
    pairs = []
    for i, array in enumerate(masks):
        path = tmp_path / f"m{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(array) if mode == "L" or array.ndim == 3 else Image.fromarray(array, mode=mode)
        if mode == "P":
            image.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255])
        image.save(path)
        pairs.append(MaskPair(image=path, masks=(path,), relative=f"m{i}"))
    return pairs


def test_mask_task_reads_what_the_values_mean(tmp_path: Path) -> None:
    """0 and one value: binary; 0..K: K classes (palette or grey); many values: anti-aliased binary; a few grey
    levels or class colours: refused, naming a file."""
    zero = np.zeros((6, 6), dtype=np.uint8)
    binary = mask_task(_pairs_of(tmp_path / "a", zero, np.where(np.eye(6) > 0, 255, 0).astype(np.uint8)))
    assert binary.binary and not binary.indexed and binary.classes == ("foreground",)
    three = np.arange(36, dtype=np.uint8).reshape(6, 6) % 4
    indexed = mask_task(_pairs_of(tmp_path / "b", three, zero, mode="P"))
    assert indexed.indexed and indexed.classes == ("class1", "class2", "class3")
    assert mask_task(_pairs_of(tmp_path / "c", three), names=("a", "b", "c", "d")).classes == ("a", "b", "c", "d")
    smooth = (np.arange(36).reshape(6, 6) * 7).astype(np.uint8)  # 36 levels: an anti-aliased binary mask
    assert mask_task(_pairs_of(tmp_path / "d", smooth)).binary
    with pytest.raises(MaskError, match=r"values \[0, 128, 255\] \(e\.g\. .*m0\.png\)"):
        mask_task(_pairs_of(tmp_path / "e", np.array([[0, 128], [255, 0]], dtype=np.uint8)))
    colours = np.zeros((4, 4, 3), dtype=np.uint8)
    colours[0, :, 0], colours[1, :, 1] = 255, 255
    with pytest.raises(MaskError, match="m0.png: a colour mask with 3 colours"):
        mask_task(_pairs_of(tmp_path / "f", colours))
    assert mask_task(_pairs_of(tmp_path / "g", colours), mode="binary").binary  # asked for: binarised as before
    with pytest.raises(MaskError, match="the value 3, but the masks are class indices 0..2"):
        mask_task(_pairs_of(tmp_path / "h", three), mode="indexed", names=("a", "b"))


def test_read_labels_merges_files_by_their_maximum(tmp_path: Path) -> None:
    first, second = np.zeros((4, 4), dtype=np.uint8), np.zeros((4, 4), dtype=np.uint8)
    first[0], second[1] = 1, 2
    paths = tuple(_write(tmp_path / f"{i}.png", a) for i, a in enumerate((first, second)))
    assert read_labels(paths, 2)[:2].tolist() == [[1] * 4, [2] * 4]
    with pytest.raises(MaskError, match="not a mask of class indices 0..1"):
        read_labels(paths, 1)
