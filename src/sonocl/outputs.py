"""Where a command may write: a new or empty directory, or one it can prove it made; never over a user's files.

Every command that writes a directory claims it first with `claim` (ingest's store, pretrain's run, evaluate's,
study's and segment's outputs, export's bundle, the demo's folder). A claimed directory holds ``.sonocl.json``:
the kind of output, an id and when it was made (an encoder bundle, made to be shared, is known by its files alone). A later command of the same kind writes into it again (a rerun,
a resume, more videos); any other non-empty directory is refused in one line naming it, and ``--overwrite``
writes into it anyway: files of the same names are replaced, nothing else is touched. A directory made by an
older sonocl, before the marker, is recognised by its files (`Kind.signature`, and nothing but `Kind.own`).

Single-file outputs (``report``'s HTML, ``embed``'s table) follow the same rule with `claim_file`: an existing
file is replaced only when sonocl wrote it. Nothing here removes anything; `removable` says whether a whole
directory is one a command made and holds nothing else (the demo's rerun uses it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sonocl._version import __version__
from sonocl.data.store import LOCK_FILE
from sonocl.errors import UserError
from sonocl.files import WriteFailedError, write_json

MARKER = ".sonocl.json"
"""The claim of a directory: ``{"kind": …, "id": …, "created": …, "sonocl": version}``."""


class OutputError(UserError):
    """An output path a command may not write: it holds what the command did not make."""


@dataclass(frozen=True)
class Kind:
    """One kind of output directory: its name, the command that makes it and the entries it writes."""

    name: str
    command: str
    own: frozenset[str]
    """Top-level entries the command writes (besides the marker and its lock)."""
    signature: str
    """An entry only this kind writes: a directory without marker holding it, and nothing but `own`, was made by
    an older sonocl and is adopted."""
    marked: bool = True
    """Whether the marker is written; an encoder bundle, made to be shared, is known by its `signature` alone."""

    def holds_only_own(self, directory: Path) -> bool:
        return all(entry.name in self.own | {MARKER, LOCK_FILE} for entry in directory.iterdir())


STORE = Kind(
    "frame store",
    "sonocl ingest",
    frozenset(
        {"store.json", "frames.u8", "videos.jsonl", "ingest_report.json", ".ingest-tmp", ".manifest.lock", "shards"}
    ),
    "store.json",
)
RUN = Kind(
    "pretraining run",
    "sonocl pretrain",
    frozenset(
        {
            "config.yaml",
            "provenance.json",
            "metrics.csv",
            "tb",
            "checkpoints",
            "encoder.safetensors",
            "trackers.json",
            "wandb",
            "mlruns",
        }
    ),
    "config.yaml",
)
EVALUATION = Kind(
    "evaluation",
    "sonocl evaluate",
    frozenset({"results.json", "results.md", "predictions.csv", "folds"}),
    "results.json",
)
STUDY = Kind(
    "study",
    "sonocl study",
    frozenset({"results.json", "results.md", "predictions.csv", "folds", "pretrain"}),
    "pretrain",
)
SEGMENTATION = Kind(
    "segmentation",
    "sonocl segment",
    frozenset({"results.json", "results.md", "per_image.csv", "folds", "overlays"}),
    "per_image.csv",
)
BUNDLE = Kind(
    "encoder bundle",
    "sonocl export",
    # MODEL_CARD.md: the card's name in bundles written before it became README.md (the Hub's)
    frozenset(
        {"encoder.safetensors", "config.json", "sonocl_encoder.json", "README.md", "MODEL_CARD.md", "encoder.onnx"}
    ),
    "sonocl_encoder.json",
    marked=False,
)
DEMO = Kind(
    "demo",
    "sonocl demo",
    frozenset({"data", "store", "pretrain-simclr", "evaluation-knn", "evaluation-last-block", "report.html"}),
    "pretrain-simclr",
)
PHANTOM = Kind("phantom dataset", "sonocl demo", frozenset({"videos", "labels.csv"}), "labels.csv")


def marker_kind(directory: Path) -> str | None:
    """The kind named by ``directory``'s marker, None without one (or an unreadable one)."""
    try:
        data = json.loads((directory / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    kind = data.get("kind") if isinstance(data, dict) else None
    return kind if isinstance(kind, str) else None


def claim(directory: str | Path, kind: Kind, *, overwrite: bool = False) -> Path:
    """Make ``directory`` this command's output, or raise `OutputError` naming it (see the module docstring).

    Returns the directory. A read-only or full disk is a `WriteFailedError` naming it.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise OutputError(f"{directory}: --out is a file; a {kind.name} is a directory: choose another --out")
    found = marker_kind(directory) if directory.is_dir() else None
    if found == kind.name:
        return directory
    if found is not None:
        raise OutputError(
            f"{directory}: holds a sonocl {found}, not a {kind.name}; choose another --out for `{kind.command}`"
        )
    if directory.is_dir() and _entries(directory) and not overwrite:
        adopted = (directory / kind.signature).exists() and kind.holds_only_own(directory)
        if not adopted:
            if marker_kind(directory) == kind.name:  # claimed since the check above by a concurrent run of `kind`
                return directory
            raise OutputError(
                f"{directory}: not empty ({_some_entries(directory)}) and not made by `{kind.command}`; choose a new "
                "or empty --out, or pass --overwrite to write into it (files of the same names are replaced, nothing "
                "else is touched)"
            )
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise WriteFailedError(
            f"{directory}: cannot create the output directory ({error.strerror or error}); choose a writable --out"
        ) from error
    if not kind.marked:
        return directory
    marker = {
        "kind": kind.name,
        "id": uuid.uuid4().hex,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "sonocl": __version__,
    }
    write_json(directory / MARKER, marker)
    return directory


def removable(directory: Path, kind: Kind) -> bool:
    """Whether ``directory`` is a ``kind`` output that sonocl made and that holds nothing else (safe to replace)."""
    return directory.is_dir() and marker_kind(directory) == kind.name and kind.holds_only_own(directory)


def claim_file(path: str | Path, made_by_sonocl: Callable[[Path], bool], *, overwrite: bool = False) -> Path:
    """Allow writing the file ``path``: new, or one that ``made_by_sonocl`` recognises, or ``overwrite``."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path}: --out is a directory; give a file name")
    if path.exists() and not overwrite and not made_by_sonocl(path):
        raise OutputError(
            f"{path}: exists and was not written by sonocl; choose another --out, or pass --overwrite to replace it"
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise WriteFailedError(
            f"{path.parent}: cannot create the output directory ({error.strerror or error}); choose a writable --out"
        ) from error
    return path


def add_overwrite_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup, file: bool = False) -> None:
    """The ``--overwrite`` flag of every command that writes (``file``: a command whose --out is one file)."""
    what = (
        "replace an --out file that sonocl did not write (default: refuse)"
        if file
        else "write into an --out that holds other files (files of the same names are replaced, nothing else is "
        "touched); by default only a new or empty folder, or one this command made, is written"
    )
    parser.add_argument("--overwrite", action="store_true", help=what)


def _entries(directory: Path) -> list[Path]:
    """The directory's entries but the marker another process is writing at this moment (its atomic write's
    temporary file): two commands claiming one new folder at once (two ingests into two shards of a new store)."""
    claiming = re.compile(rf"\.{re.escape(MARKER)}\.\d+\.tmp")
    return [entry for entry in directory.iterdir() if not claiming.fullmatch(entry.name)]


def _some_entries(directory: Path, shown: int = 3) -> str:
    names = sorted(entry.name for entry in directory.iterdir())
    listed = ", ".join(names[:shown]) + (", …" if len(names) > shown else "")
    return f"{len(names)} entr{'y' if len(names) == 1 else 'ies'}: {listed}"
