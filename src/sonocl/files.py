"""Files that matter written atomically, and JSON read and written one way.

`atomic_write` is the one writer of every checkpoint, encoder file, bundle, results file and store metadata file:
a reader sees the old content or the new, never a mix, and a failed write is one `WriteFailedError` line naming the
file. `write_json` and `read_json` are the JSON of results, caches and bundles: numpy numbers as plain numbers,
no NaN outside the caches that round-trip floats exactly, and a file that cannot be read named in one line.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from sonocl.errors import UserError


class WriteFailedError(UserError, OSError):
    """A write failed (disk full, read-only, no permission): the message names the file, and what was there is intact."""

    exit_code = 1


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], object]) -> None:
    """Write a file through ``write(handle)`` so that readers see either the old or the new content, never a mix.

    The content goes to a temporary file beside ``path``, is fsynced, and replaces ``path`` in one rename.
    Any `OSError` (disk full, read-only file system), also one that a library's writer raises as a ``RuntimeError``
    (``torch.save``), removes the temporary file and becomes a `WriteFailedError` naming ``path``; the previous file
    is then untouched. Every checkpoint, encoder file and bundle is written through it.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    replaced = False
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        replaced = True
        _fsync_dir(path.parent)
    except BaseException as error:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        failure = _write_failure(error)
        if failure is None:
            raise
        raise write_failed(path, failure, replaced) from error


_TORCH_WRITER = ("PytorchStreamWriter", "inline_container.cc")
"""Words of the ``RuntimeError`` that ``torch.save``'s zip writer raises when a write under it fails."""


def _write_failure(error: BaseException) -> OSError | RuntimeError | None:
    """The failed write behind ``error``: itself when it is an `OSError`; for a ``RuntimeError`` (what torch's writer
    raises around the `OSError` of a full disk) the `OSError` in its chain, else the error itself when it is torch's
    writer failing; None for anything else (a bug, which keeps its traceback)."""
    if isinstance(error, OSError):
        return error
    if not isinstance(error, RuntimeError):
        return None
    cause = error.__cause__ or error.__context__
    for _ in range(8):  # follow the chain a few links (never round a cycle)
        if cause is None or isinstance(cause, OSError):
            break
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, OSError):
        return cause
    return error if any(word in str(error) for word in _TORCH_WRITER) else None


def write_failed(path: Path, failure: OSError | RuntimeError, replaced: bool = False) -> WriteFailedError:
    """The `WriteFailedError` of a failed write of ``path``: one line with the file, why, its state and the fix."""
    if isinstance(failure, OSError):
        reason = failure.strerror or str(failure)
    else:  # torch's writer: "[enforce fail at inline_container.cc:N] . PytorchStreamWriter failed writing file …"
        reason = (str(failure).strip().splitlines() or [type(failure).__name__])[0].split("] . ", 1)[-1]
        with contextlib.suppress(OSError):
            stats = os.statvfs(path.parent)
            if stats.f_bavail * stats.f_frsize < 1 << 20:
                reason = f"{os.strerror(errno.ENOSPC)}: {reason}"
    state = (
        "written, but may not survive a power cut"
        if replaced
        else "unchanged (its previous content, if any, is intact)"
    )
    return WriteFailedError(
        f"{path}: writing failed ({reason}); the file is {state}. Free disk space or fix the permissions, then run again"
    )


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """`atomic_write` of UTF-8 text. A character UTF-8 cannot hold (a file name's byte that was not UTF-8, which
    Python keeps as a surrogate) is written escaped, ``scan\\udcff``, as JSON writes it: never a lost file."""
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8", "backslashreplace")))


def json_text(data: Any, *, nan: bool = False) -> str:
    """``data`` as indented JSON text: numpy scalars and arrays as plain numbers and lists; a non-finite float as
    ``null`` (JSON has no NaN), or, with ``nan``, as ``NaN``/``Infinity`` (Python's JSON, for caches that must give
    back exactly the floats they were given)."""
    return json.dumps(data if nan else _finite(data), indent=1, allow_nan=nan, default=_plain)


def write_json(path: str | os.PathLike[str], data: Any, *, nan: bool = False) -> None:
    """`json_text` of ``data``, written atomically."""
    atomic_write_text(path, json_text(data, nan=nan) + "\n")


def read_json(path: str | os.PathLike[str], error: type[UserError] = UserError, hint: str = "") -> dict[str, Any]:
    """The JSON object in ``path``; a missing, unreadable or malformed file, or one holding something other than an
    object, raises ``error`` in one line naming the file, what is wrong and ``hint`` (what the file should be)."""
    path = Path(path)
    suffix = f"; {hint}" if hint else ""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: not found{suffix}") from None
    except (OSError, UnicodeDecodeError) as failure:
        raise error(f"{path}: cannot be read ({failure}){suffix}") from None
    except json.JSONDecodeError as failure:
        raise error(f"{path}: not valid JSON ({failure}){suffix}") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, found {type(data).__name__}{suffix}")
    return data


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    if hasattr(value, "item") and hasattr(value, "dtype"):  # a numpy scalar or array: its plain value, then the rule
        return _finite(value.tolist())
    return value


def _plain(value: Any) -> Any:
    """``json.dumps``'s fallback: numpy scalars and arrays (``.tolist()`` gives Python numbers and lists)."""
    if hasattr(value, "tolist") and hasattr(value, "dtype"):
        return value.tolist()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")
