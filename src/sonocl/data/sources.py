"""What `sonocl ingest` finds under its arguments: the sources (a media file, or a folder of numbered frame images),
their content hashes, and what was left out (masks, links to folders searched already, files that are not media)."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from sonocl.data.decode import is_frame_folder, media_kind, natural_key
from sonocl.data.mask_names import in_mask_folder, is_mask_name

_HASH_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class Source:
    """One video to be: a media file, or a folder of numbered frame images."""

    path: Path
    relative: PurePosixPath
    """Path relative to the source root: the folder argument, or the parent of a file argument."""
    frame_files: tuple[Path, ...] | None = None

    @property
    def default_id(self) -> str:
        return str(self.relative) if self.frame_files is not None else str(self.relative.with_suffix(""))

    def size_on_disk(self) -> int:
        files = self.frame_files if self.frame_files is not None else (self.path,)
        return sum(file.stat().st_size for file in files)


def content_hash(source: Source) -> str:
    """sha256 of the file bytes; for a frame folder, of each frame's name and bytes in frame order."""
    digest = hashlib.sha256()
    files = source.frame_files if source.frame_files is not None else (source.path,)
    for file in files:
        if source.frame_files is not None:
            digest.update(file.name.encode("utf-8") + b"\0")
        with open(file, "rb") as handle:
            while chunk := handle.read(_HASH_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


@dataclasses.dataclass
class Discovery:
    """What `discover` found under the source arguments."""

    sources: list[Source]
    rejected: list[tuple[Path, str]]
    """Named files that are not media, with the reason."""
    masks_left_out: int
    """Mask files (`sonocl.data.mask_names`): segmentation ground truth, not images to learn from."""
    links_not_followed: list[tuple[Path, Path]]
    """Links to folders already searched (a link loop, or a second way into one folder) and their targets."""
    empty_arguments: list[Path]
    """Folder arguments under which no media file was found."""


def discover(arguments: Sequence[Path], exclude: Path, frame_folders: bool) -> Discovery:
    """Sources under the arguments, each once, and what was left out.

    Hidden files and folders and the store itself (``exclude``) are not searched; files that are
    not media inside a folder are ignored silently (READMEs, CSVs), named ones are reported. Links
    to folders are followed (data is often linked in from elsewhere), each real folder searched
    once per argument, so that a link loop ends. Masks are left out and counted.
    """
    found = Discovery([], [], 0, [], [])
    sources: dict[Path, Source] = {}
    for argument in arguments:
        argument = argument.resolve()
        if argument.is_file():
            if media_kind(argument) is None:
                found.rejected.append((argument, "not a video, DICOM or image file (by its extension and content)"))
            elif is_mask_name(argument):
                found.masks_left_out += 1
            else:
                sources.setdefault(argument, Source(argument, PurePosixPath(argument.name)))
            continue
        before = len(sources)
        searched = {_folder_key(argument)}
        for folder, subfolders, files in os.walk(argument, followlinks=True):
            folder_path = Path(folder)
            subfolders[:] = [
                name
                for name in sorted(subfolders)
                if not name.startswith(".")
                and (folder_path / name).resolve() != exclude
                and _first_visit(folder_path / name, searched, found.links_not_followed)
            ]
            media = [
                folder_path / name
                for name in sorted(files)
                if not name.startswith(".") and media_kind(folder_path / name)
            ]
            in_masks = in_mask_folder(folder_path.relative_to(argument).parts)
            images = [path for path in media if not (in_masks or is_mask_name(path))]
            found.masks_left_out += len(media) - len(images)
            media = images
            if frame_folders and not subfolders and is_frame_folder(media):
                root = argument.parent if folder_path == argument else argument
                relative = PurePosixPath(folder_path.relative_to(root).as_posix())
                frames = tuple(sorted(media, key=lambda path: natural_key(path.name)))
                sources.setdefault(folder_path, Source(folder_path, relative, frames))
                continue
            for path in media:
                sources.setdefault(path, Source(path, PurePosixPath(path.relative_to(argument).as_posix())))
        if len(sources) == before:
            found.empty_arguments.append(argument)
    found.sources = list(sources.values())
    return found


def _folder_key(path: Path) -> tuple[int, int]:
    status = path.stat()
    return status.st_dev, status.st_ino


def _first_visit(folder: Path, searched: set[tuple[int, int]], not_followed: list[tuple[Path, Path]]) -> bool:
    """Whether to search ``folder``: not if its real folder was searched already (recorded when it is a link)."""
    try:
        key = _folder_key(folder)
    except OSError:
        return False
    if key in searched:
        if folder.is_symlink():
            not_followed.append((folder, folder.resolve()))
        return False
    searched.add(key)
    return True


def shown(path: Path) -> str:
    """A path for a one-line message: as it is, or quoted with escapes where its name holds a line break or tab."""
    text = str(path)
    return text if text.isprintable() else ascii(text)
