"""Pairing images with their segmentation masks, and reading masks as boolean arrays.

Naming rules, tried for each image ``DIR/NAME.ext`` (relative path ``REL`` under the image root):

- ``NAME_mask.*`` / ``NAME_Mask.*`` (any case of ``mask``) in the image's own folder or the mask folder;
- several lesion masks ``NAME_mask.*``, ``NAME_mask_1.*``, ``NAME_mask_2.*`` … : merged (union);
- a parallel mask tree: ``MASKS/REL`` with the same relative name (any image extension);
- ``…/images/NAME.*`` ↔ ``…/mask/NAME*`` or ``…/masks/NAME*`` (``class/images`` + ``class/masks`` layouts).

Files that are masks themselves (``*_mask*`` names, or anything under a ``mask``/``masks`` folder, or under
the mask root when it lies inside the image root) are never listed as images, so BUSI-style folders
(``benign/benign (1).png`` beside ``benign/benign (1)_mask.png``) work with ``--masks`` = ``--images``.

What a mask's values mean is decided once for the whole data set (`mask_task`, ``--mask-classes``):

- **binary** (one foreground class): each mask is binarised as ``value > max / 2`` over the colour channels (0/1,
  0/255, RGB and anti-aliased masks all work); an all-zero mask is a valid empty mask;
- **indexed** (K classes): each value is a class index, 0 the background and 1..K the classes (indexed or palette
  PNGs, grey masks with values 0..K); several files of one image are merged by their maximum.

``auto`` (the default) reads every mask's values: 0 and at most one other value is binary; integers 0..K with K ≥ 2
(K ≤ `MAX_CLASSES`) are indexed; more than `MAX_LEVELS` values are anti-aliased binary masks; anything else (a few
grey levels such as 0/128/255, colour-coded classes) is refused with a message naming a file and the fix, never
scored as one foreground class.
"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

from sonocl.data.mask_names import MASK_DIR_NAMES, in_mask_folder, is_mask_name
from sonocl.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif")
IMAGE_DIR_NAMES = ("image", "images", "img", "imgs")


MAX_CLASSES = 32
"""The most classes an indexed mask may hold (values 0..32)."""
MAX_LEVELS = 8
"""A mask set with more distinct values than this (and not 0..K) is anti-aliased: binarised at half its maximum."""


class MaskError(UserError, ValueError):
    """An image whose mask is missing, unreadable or of another size; the message names both and the fix."""


@dataclasses.dataclass(frozen=True)
class MaskPair:
    """One image and the mask file(s) whose union is its ground truth."""

    image: Path
    masks: tuple[Path, ...]
    relative: str
    """The image's path relative to the image root, without extension, POSIX separators (``benign/benign (1)``)."""
    classes: tuple[tuple[Path, ...], ...] | None = None
    """With one mask folder per class (`pair_class_folders`): each class's mask file(s), in class order."""


@dataclasses.dataclass(frozen=True)
class PairingResult:
    pairs: list[MaskPair]
    errors: list[tuple[str, str]]
    """``(image path, message)`` for each image without a usable mask."""


def _is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def list_images(images_root: Path, masks_root: Path | None = None) -> list[Path]:
    """Image files under ``images_root`` (recursive, sorted), leaving out masks and mask folders."""
    images_root = Path(images_root)
    if not images_root.is_dir():
        raise MaskError(f"{images_root}: not a directory of images")
    masks_inside = None
    if masks_root is not None:
        masks_root = Path(masks_root).resolve()
        root = images_root.resolve()
        if masks_root != root and root in masks_root.parents:
            masks_inside = masks_root
    found = []
    for path in sorted(images_root.rglob("*")):
        if not _is_image_file(path) or is_mask_name(path):
            continue
        if in_mask_folder(path.relative_to(images_root).parts[:-1]):
            continue
        if masks_inside is not None and masks_inside in path.resolve().parents:
            continue
        found.append(path)
    return found


class _FolderIndex:
    """File names of each folder under a root, listed once (pairing 10⁴ images must not stat 10⁵ candidates)."""

    def __init__(self) -> None:
        self._cache: dict[Path, dict[str, list[Path]]] = {}

    def by_stem(self, folder: Path) -> dict[str, list[Path]]:
        if folder not in self._cache:
            stems: dict[str, list[Path]] = defaultdict(list)
            if folder.is_dir():
                for path in sorted(folder.iterdir()):
                    if _is_image_file(path):
                        stems[path.stem].append(path)
            self._cache[folder] = stems
        return self._cache[folder]


def _candidate_folders(image: Path, images_root: Path, masks_root: Path) -> list[tuple[Path, bool]]:
    """Folders that may hold the image's mask, with whether a plain same-name file there counts as its mask."""
    relative_dir = image.parent.relative_to(images_root)
    folders: list[tuple[Path, bool]] = []
    same_root = masks_root.resolve() == images_root.resolve()
    folders.append((masks_root / relative_dir, not same_root))
    if not same_root:
        folders.append((image.parent, False))
    parts = relative_dir.parts
    for i in range(len(parts) - 1, -1, -1):
        if parts[i].lower() in IMAGE_DIR_NAMES:
            for root in dict.fromkeys((masks_root, images_root)):
                for name in MASK_DIR_NAMES + tuple(n.capitalize() for n in MASK_DIR_NAMES):
                    folders.append((root.joinpath(*parts[:i], name, *parts[i + 1 :]), True))
            break
    return list(dict.fromkeys(folders))


def _mask_sort_key(path: Path) -> tuple[int, str]:
    match = re.search(r"_(\d+)$", path.stem)
    return (int(match.group(1)) if match and is_mask_name(path) else -1, path.name)


def find_mask_files(
    image: Path, images_root: Path, masks_root: Path, index: _FolderIndex | None = None
) -> tuple[Path, ...]:
    """The mask file(s) of ``image``: from the first candidate folder holding any; empty when none is found."""
    index = index or _FolderIndex()
    stem = image.stem
    pattern = re.compile(re.escape(stem) + r"_(?i:mask)(?:_\d+)?$")
    for folder, plain_name_counts in _candidate_folders(image, images_root, masks_root):
        stems = index.by_stem(folder)
        if not stems:
            continue
        matches = [p for s, paths in stems.items() if pattern.fullmatch(s) for p in paths]
        if plain_name_counts:
            matches += [p for p in stems.get(stem, []) if p.resolve() != image.resolve()]
        if matches:
            return tuple(sorted(dict.fromkeys(matches), key=_mask_sort_key))
    return ()


def expected_mask_names(image: Path, images_root: Path, masks_root: Path) -> str:
    """Where the mask of ``image`` was looked for, for error messages."""
    folders = _candidate_folders(image, images_root, masks_root)
    stem = image.stem
    lines = []
    for folder, plain in folders[:4]:
        names = [f"{stem}_mask.png", f"{stem}_Mask.png", f"{stem}_mask_1.png…"] + (
            [f"{stem}{image.suffix}"] if plain else []
        )
        lines.append(f"{folder}/{{{', '.join(names)}}}")
    return "; ".join(lines)


def pair_images(
    images_root: str | Path, masks_root: str | Path | None = None, check_sizes: bool = True
) -> PairingResult:
    """Every image under ``images_root`` with its mask file(s); images without a usable mask go to ``errors``.

    With ``check_sizes`` each mask's size is read from its header (no decoding) and must equal the image's.
    """
    images_root = Path(images_root)
    masks_root = Path(masks_root) if masks_root is not None else images_root
    if not masks_root.is_dir():
        raise MaskError(f"{masks_root}: not a directory of masks")
    index = _FolderIndex()
    pairs: list[MaskPair] = []
    errors: list[tuple[str, str]] = []
    for image in list_images(images_root, masks_root):
        masks = find_mask_files(image, images_root, masks_root, index)
        if not masks:
            errors.append(
                (str(image), f"no mask found; looked for {expected_mask_names(image, images_root, masks_root)}")
            )
            continue
        if check_sizes:
            problem = _size_problem(image, masks)
            if problem:
                errors.append((str(image), problem))
                continue
        relative = image.relative_to(images_root).with_suffix("").as_posix()
        pairs.append(MaskPair(image=image, masks=masks, relative=relative))
    return PairingResult(pairs=pairs, errors=errors)


def pair_class_folders(images_root: Path, folders: list[tuple[str, Path]]) -> PairingResult:
    """Every image under ``images_root`` with its mask in each class's folder (``(name, folder)``, paired by the rules
    of `pair_images`); an image without a usable mask in some class's folder goes to ``errors``, naming the class."""
    results = [pair_images(images_root, folder) for _, folder in folders]
    found = [{pair.image: pair for pair in result.pairs} for result in results]
    problems = [dict(result.errors) for result in results]
    images = set.intersection(*(set(list_images(images_root, folder)) for _, folder in folders))
    pairs: list[MaskPair] = []
    errors: list[tuple[str, str]] = []
    for image in sorted(images):
        missing = [(name, problem.get(str(image), "")) for (name, _), mine, problem in zip(folders, found, problems)
                   if image not in mine]  # fmt: skip
        if missing:
            errors.append((str(image), "; ".join(f"class {name}: {why or 'no mask'}" for name, why in missing)))
            continue
        classes = tuple(mine[image].masks for mine in found)
        relative = found[0][image].relative
        pairs.append(MaskPair(image, tuple(path for files in classes for path in files), relative, classes))
    return PairingResult(pairs=pairs, errors=errors)


def read_class_folders(classes: tuple[tuple[Path, ...], ...]) -> np.ndarray:
    """Class indices uint8 (H, W) from one binary mask (or several, merged) per class: class k where its mask is on,
    a later class winning where two overlap."""
    labels: np.ndarray | None = None
    for index, files in enumerate(classes, start=1):
        mask = read_mask(files)
        labels = np.zeros(mask.shape, dtype=np.uint8) if labels is None else labels
        if labels.shape != mask.shape:
            raise MaskError(f"{files[0]}: {mask.shape[1]}×{mask.shape[0]}, but the other classes' masks are "
                            f"{labels.shape[1]}×{labels.shape[0]}")  # fmt: skip
        labels[mask] = index
    if labels is None:
        raise MaskError("no mask file given")
    return labels


def _size_problem(image: Path, masks: tuple[Path, ...]) -> str | None:
    try:
        with Image.open(image) as handle:
            size = handle.size
    except OSError as error:
        return f"image unreadable ({error})"
    for mask in masks:
        try:
            with Image.open(mask) as handle:
                mask_size = handle.size
        except OSError as error:
            return f"mask {mask} unreadable ({error})"
        if mask_size != size:
            return (
                f"mask {mask} is {mask_size[0]}×{mask_size[1]} but the image is {size[0]}×{size[1]}; "
                "a mask must have the image's size"
            )
    return None


def binarize(array: np.ndarray) -> np.ndarray:
    """A mask image (H, W) or (H, W, C) of any value range → bool (H, W): ``value > max / 2``; all-zero → empty."""
    array = np.asarray(array)
    if array.ndim == 3:
        channels = array.shape[2]
        if channels in (2, 4):  # grey/colour + alpha: the alpha channel is not the mask
            array = array[..., : channels - 1]
        array = array.max(axis=2)
    if array.ndim != 2:
        raise MaskError(f"a mask must be a 2-D image, got shape {array.shape}")
    array = array.astype(np.float64)
    peak = array.max() if array.size else 0.0
    if peak <= 0:
        return np.zeros(array.shape, dtype=bool)
    return array > peak / 2


def read_mask(paths: tuple[Path, ...] | list[Path] | Path) -> np.ndarray:
    """The union of the binarised mask files, bool (H, W)."""
    if isinstance(paths, (str, Path)):
        paths = (Path(paths),)
    merged: np.ndarray | None = None
    for path in paths:
        with Image.open(path) as handle:
            mask = binarize(np.asarray(handle))
        if merged is not None and merged.shape != mask.shape:
            raise MaskError(
                f"{path}: {mask.shape[1]}×{mask.shape[0]}, but {paths[0]} is {merged.shape[1]}×{merged.shape[0]}"
            )
        merged = mask if merged is None else merged | mask
    if merged is None:
        raise MaskError("no mask file given")
    return merged


@dataclasses.dataclass(frozen=True)
class MaskTask:
    """What the masks of a data set mean: the names of the foreground classes (one: a binary task), and whether the
    values are class indices (`read_labels`) or binarised (`read_mask`)."""

    classes: tuple[str, ...]
    indexed: bool

    @property
    def binary(self) -> bool:
        return len(self.classes) == 1


def mask_values(path: Path) -> np.ndarray:
    """A mask file's values, 2-D: palette indices, grey levels, or colour (H, W, C) when the channels differ (an
    alpha channel dropped; equal colour channels read as grey)."""
    with Image.open(path) as handle:
        array = np.asarray(handle)
    if array.ndim == 3:
        channels = array.shape[2]
        if channels in (2, 4):
            array = array[..., : channels - 1]
        if all(np.array_equal(array[..., 0], array[..., c]) for c in range(1, array.shape[2])):
            array = array[..., 0]
    return array


def mask_task(pairs: list[MaskPair], mode: str = "auto", names: tuple[str, ...] | None = None) -> MaskTask:
    """The task the masks of ``pairs`` pose (``mode``: auto | binary | indexed; ``names``: the foreground classes'
    names, ``--class-names``). Raises `MaskError` naming a file when the values do not fit."""
    if mode == "binary":
        if names is not None and len(names) != 1:
            raise MaskError(f"--mask-classes binary has one foreground class, but --class-names gives {len(names)}")
        return MaskTask(names or ("foreground",), indexed=False)
    values: dict[int, Path] = {}  # each value seen, with a file that holds it
    colours = 0
    for pair in pairs:
        for path in pair.masks:
            array = mask_values(path)
            if array.ndim == 3:
                colours = max(colours, len(np.unique(array.reshape(-1, array.shape[2]), axis=0)))
                if mode == "indexed" or colours <= MAX_LEVELS:
                    raise MaskError(
                        f"{path}: a colour mask with {colours} colours; class colours are not read as classes: save "
                        "the masks as indexed (palette) PNGs with values 0..K, or pass --mask-classes binary to "
                        "binarise them"
                    )
                continue
            for value in np.unique(array).tolist():
                values.setdefault(int(value) if float(value).is_integer() else -1, path)
    found = sorted(values)
    if mode == "auto" and (len([v for v in found if v != 0]) <= 1 or colours):
        return _named(MaskTask(("foreground",), indexed=False), names)
    fits = found and found[0] >= 0 and found[-1] <= MAX_CLASSES
    if mode == "auto" and not fits:
        if len(found) > MAX_LEVELS:
            return _named(MaskTask(("foreground",), indexed=False), names)
        example = values[found[-1]]
        raise MaskError(
            f"the masks hold the values {found} (e.g. {example}): neither binary (0 and one other value) nor class "
            f"indices 0..K (K ≤ {MAX_CLASSES}); remap the classes to 0, 1, …, K, or pass --mask-classes binary to "
            "binarise each mask at half its maximum"
        )
    top = found[-1] if found else 0
    classes = len(names) if names is not None else max(top, 1)
    if not fits or top > classes:
        bad = next(v for v in reversed(found) if v < 0 or v > classes)
        shown = "a non-integer value" if bad < 0 else f"the value {bad}"
        raise MaskError(
            f"{values[bad]}: {shown}, but the masks are class indices 0..{classes}"
            + (f" ({classes} --class-names)" if names is not None else f" (at most {MAX_CLASSES})")
            + "; fix the mask, or name every class with --class-names"
        )
    return MaskTask(names or tuple(f"class{k}" for k in range(1, classes + 1)), indexed=True)


def _named(task: MaskTask, names: tuple[str, ...] | None) -> MaskTask:
    if names is None:
        return task
    if len(names) != len(task.classes):
        raise MaskError(
            f"--class-names gives {len(names)} classes, but the masks are binary (0 and one other value): one class"
        )
    return dataclasses.replace(task, classes=names)


def read_labels(paths: tuple[Path, ...], classes: int) -> np.ndarray:
    """The class index of each pixel, uint8 (H, W) in 0..``classes``: indexed masks merged by their maximum."""
    merged: np.ndarray | None = None
    for path in paths:
        array = mask_values(path)
        if array.ndim != 2 or (array.size and (array.min() < 0 or array.max() > classes)):
            raise MaskError(f"{path}: not a mask of class indices 0..{classes}")
        labels = array.astype(np.uint8)
        if merged is not None and merged.shape != labels.shape:
            raise MaskError(
                f"{path}: {labels.shape[1]}×{labels.shape[0]}, but {paths[0]} is {merged.shape[1]}×{merged.shape[0]}"
            )
        merged = labels if merged is None else np.maximum(merged, labels)
    if merged is None:
        raise MaskError("no mask file given")
    return merged


def read_grey(path: Path) -> np.ndarray:
    """An image as uint8 greyscale (H, W) (colour images are converted with PIL's luma weights)."""
    with Image.open(path) as handle:
        if handle.mode in ("I;16", "I;16B", "I"):
            array = np.asarray(handle).astype(np.float64)
            peak = array.max() or 1.0
            return np.clip(array / peak * 255.0, 0, 255).astype(np.uint8)
        return np.asarray(handle.convert("L"))
