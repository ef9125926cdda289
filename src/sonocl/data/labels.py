"""Where a video's labels and group come from: a CSV table, file-name prefix rules, class sub-folders.

Precedence, per video: a CSV row that names the video, then the class sub-folder rule, then the
file-name prefix rules; a video none of them labels is unlabelled, which is normal. Groups (for
grouped splits) come from the CSV group column, else the DICOM patient ID, else the video id; a
patient or CSV group value is only ever stored as a salted hash (`hashed_group`).

Labels that differ only in case or surrounding spaces (``regular`` / ``Regular``) are one class,
spelt as most rows of the CSV spell it.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import hashlib
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath

from sonocl.errors import UserError

LABEL_COLUMN_NAMES = ("label", "class", "diagnosis", "category", "target")
"""Column names (any case) taken as the label column when ``--label-column`` is not given."""
GROUP_COLUMN_NAMES = ("patient_id", "patient id", "patientid", "patient", "subject_id", "subject", "group")
"""Column names (any case) taken as the group column; failing those, a column mentioning ``patient``."""


class LabelError(UserError, ValueError):
    """A label rule or CSV that cannot be used as given; the message names the file or rule and the fix."""


def hashed_group(salt: str, value: str) -> str:
    """Group id of a patient ID or CSV group value: salted, so the store never holds the value itself."""
    return "p-" + hashlib.sha256((salt + value).encode("utf-8")).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class NameRule:
    """``prefix=label``: a file whose name starts with ``prefix`` (any case) gets ``label``."""

    prefix: str
    label: str


def parse_name_rules(spec: str) -> list[NameRule]:
    """Rules from ``'cov=covid,pneu=pneumonia'``; the longest matching prefix wins."""
    rules = []
    for part in spec.split(","):
        prefix, equals, label = part.partition("=")
        if not equals or not prefix.strip() or not label.strip():
            raise LabelError(
                f"--label-from-name: {part.strip()!r} is not PREFIX=LABEL (example: 'cov=covid,reg=regular')"
            )
        rules.append(NameRule(prefix.strip().casefold(), label.strip()))
    return sorted(rules, key=lambda rule: len(rule.prefix), reverse=True)


def label_from_name(name: str, rules: Sequence[NameRule]) -> str | None:
    """Label of the first (longest) rule whose prefix starts ``name``, case-insensitively."""
    folded = name.casefold()
    return next((rule.label for rule in rules if folded.startswith(rule.prefix)), None)


def label_from_folder(relative: PurePosixPath) -> str | None:
    """The class sub-folder rule: ``covid/scan1.png`` → ``covid``; a file at the source root has no class."""
    return relative.parts[0] if len(relative.parts) > 1 else None


def source_keys(relative: PurePosixPath) -> list[str]:
    """Names a CSV may use for a source, most specific first: relative path, without extension, file name, stem."""
    name = PurePosixPath(relative.name)
    return [_normalise(key) for key in (str(relative), str(relative.with_suffix("")), name.name, name.stem)]


def _normalise(key: str) -> str:
    return key.strip().replace("\\", "/").casefold()


def _value_keys(value: str) -> list[str]:
    """Keys under which a CSV id value is indexed: as written and as a bare file name / stem."""
    path = PurePosixPath(_normalise(value))
    return list(dict.fromkeys([str(path), path.name, PurePosixPath(path.name).stem]))


@dataclasses.dataclass(frozen=True)
class CsvLabels:
    """Label, group value (not yet hashed) and extra labels of one CSV row."""

    label: str | None
    group: str | None
    extra: dict[str, str]


class LabelTable:
    """A labels CSV joined to sources by an id column holding file names, stems or relative paths."""

    def __init__(
        self,
        path: Path,
        rows: list[dict[str, str]],
        id_column: str,
        label_column: str | None,
        group_column: str | None,
        extra_columns: Sequence[str],
        lines: Sequence[int] | None = None,
    ) -> None:
        """``lines``: the CSV line number of each row, for messages (default: one line per row after the header)."""
        self.path = path
        self.id_column = id_column
        self.label_column = label_column
        self.group_column = group_column
        self.extra_columns = tuple(extra_columns)
        spelling = {
            column: _canonical_spellings(row.get(column, "") for row in rows) for column in self._label_columns()
        }
        self._index: dict[str, CsvLabels] = {}
        self._ids: list[str] = []
        first_seen: dict[str, tuple[int, CsvLabels]] = {}
        for line, row in zip(lines or range(2, len(rows) + 2), rows):
            group = (row.get(group_column) or "").strip() if group_column else ""
            entry = CsvLabels(
                label=spelling[label_column].get(_fold(row.get(label_column, ""))) if label_column else None,
                group=group or None,
                extra={
                    column: spelling[column][_fold(row[column])]
                    for column in self.extra_columns
                    if (row.get(column) or "").strip()
                },
            )
            value = _normalise(row.get(id_column) or "")
            if not value:
                continue
            self._ids.append(row[id_column].strip())
            if value in first_seen:
                kept = _check_same_row(path, row[id_column].strip(), first_seen[value], (line, entry))
                if kept is not first_seen[value][1]:
                    first_seen[value] = (first_seen[value][0], kept)
                    for key in _value_keys(value):
                        self._index[key] = kept
                continue
            first_seen[value] = (line, entry)
            for key in _value_keys(value):
                self._index.setdefault(key, entry)

    def _label_columns(self) -> list[str]:
        return [column for column in (self.label_column, *self.extra_columns) if column]

    @classmethod
    def load(
        cls,
        path: Path,
        relatives: Sequence[PurePosixPath],
        id_column: str | None = None,
        label_column: str | None = None,
        group_column: str | None = None,
        extra_columns: Sequence[str] = (),
    ) -> LabelTable:
        """Read ``path``; columns not named are detected (see `LABEL_COLUMN_NAMES`, `GROUP_COLUMN_NAMES`;
        the id column is the one whose values name the most of ``relatives``)."""
        header, rows, lines = _read_csv(path)
        for option, column in (
            ("--id-column", id_column),
            ("--label-column", label_column),
            ("--group-column", group_column),
        ):
            if column is not None and column not in header:
                raise LabelError(f"{path}: {option} {column!r} is not a column; columns are {', '.join(header)}")
        missing = [column for column in extra_columns if column not in header]
        if missing:
            raise LabelError(
                f"{path}: --extra-columns {', '.join(missing)} not in the CSV; columns are {', '.join(header)}"
            )
        if id_column is None:
            id_column = _detect_id_column(path, header, rows, relatives)
        if label_column is None:
            label_column = next((c for c in header if _fold(c) in LABEL_COLUMN_NAMES and c != id_column), None)
            if label_column is None and not extra_columns:  # a CSV of extra columns only (AWCL's anatomy) is fine
                raise LabelError(
                    f"{path}: no label column found (looked for {', '.join(LABEL_COLUMN_NAMES)}); name it with "
                    "--label-column (or name the columns to keep with --extra-columns)"
                )
        if group_column is None:
            group_column = _detect_group_column(header, exclude=(id_column, label_column))
        return cls(path, rows, id_column, label_column, group_column, extra_columns, lines)

    def ids_not_in(self, relatives: Sequence[PurePosixPath]) -> list[str]:
        """The table's ids (as written) that name none of ``relatives``: a typo, another folder, a file not supplied."""
        known = {key for relative in relatives for key in source_keys(relative)}
        return [value for value in dict.fromkeys(self._ids) if not known.intersection(_value_keys(_normalise(value)))]

    def lookup(self, relative: PurePosixPath) -> CsvLabels | None:
        for key in source_keys(relative):
            if key in self._index:
                return self._index[key]
        return None


def _check_same_row(path: Path, value: str, first: tuple[int, CsvLabels], again: tuple[int, CsvLabels]) -> CsvLabels:
    """The row to keep for a file named twice. Rows that differ in a label cannot both be right: an error. Rows that
    differ only in the group (the same recording listed under two patients) keep the label and drop the group,
    with a note: the video is then its own group, which no split can leak through.

    Messages name the differing columns and show label values, never group values (patient IDs).
    """
    (first_line, a), (line, b) = first, again
    differences = [f"label {a.label!r} vs {b.label!r}"] if a.label != b.label else []
    differences += [
        repr(column) for column in sorted(set(a.extra) | set(b.extra)) if a.extra.get(column) != b.extra.get(column)
    ]
    if differences:
        raise LabelError(
            f"{path}: {value!r} is on lines {first_line} and {line}, which differ in {', '.join(differences)}; keep one row per file"
        )
    if a.group == b.group:
        return a
    print(f"sonocl: note: {path}: {value!r} is on lines {first_line} and {line} with different groups; its video is "
          f"kept as a group of its own", file=sys.stderr)  # fmt: skip
    return dataclasses.replace(a, group=None)


def _fold(value: str) -> str:
    return value.strip().casefold()


def _canonical_spellings(values: Iterable[str]) -> dict[str, str]:
    """For each case-folded value, its most frequent spelling (ties: the first seen)."""
    counts: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for value in values:
        value = (value or "").strip()
        if value:
            counts[value.casefold()][value] += 1
    return {folded: spellings.most_common(1)[0][0] for folded, spellings in counts.items()}


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]], list[int]]:
    """Header, rows and the line number of each row. UTF-8 (with or without a BOM), else Windows-1252, as
    spreadsheet programs on Windows save CSV."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise LabelError(f"{path}: cannot read the labels CSV ({error.strerror})") from error
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("cp1252", errors="replace")
    try:
        dialect: type[csv.Dialect] | csv.Dialect = csv.Sniffer().sniff(text[:65536], delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    reader = csv.DictReader(text.splitlines(), dialect=dialect)
    header = [name for name in (reader.fieldnames or []) if name]
    if not header:
        raise LabelError(f"{path}: the labels CSV has no header row")
    rows, lines = [], []
    for row in reader:
        rows.append({key: value or "" for key, value in row.items() if key})
        lines.append(reader.line_num)
    return header, rows, lines


def _detect_id_column(
    path: Path, header: list[str], rows: list[dict[str, str]], relatives: Sequence[PurePosixPath]
) -> str:
    wanted = [set(source_keys(relative)) for relative in relatives]
    best, best_hits = None, 0
    for column in header:
        keys = {key for row in rows for key in _value_keys(row.get(column, "")) if key}
        hits = sum(1 for source in wanted if source & keys)
        if hits > best_hits:
            best, best_hits = column, hits
    if best is None:
        raise LabelError(f"{path}: no column holds the names of the files being ingested; name it with --id-column")
    return best


def _detect_group_column(header: list[str], exclude: Sequence[str | None]) -> str | None:
    candidates = [column for column in header if column not in exclude]
    exact = next((column for column in candidates if _fold(column) in GROUP_COLUMN_NAMES), None)
    if exact is not None:
        return exact
    patient = [column for column in candidates if "patient" in _fold(column)]
    with_id = [column for column in patient if "id" in _fold(column).replace("/", " ").split()]
    return (with_id or patient or [None])[0]
