"""Where a video's labels and group come from: a CSV table, file-name prefix rules, class sub-folders.

Precedence, per video: a CSV row that names the video, then the class sub-folder rule, then the
file-name prefix rules; a video none of them labels is unlabelled, which is normal. Groups (for
grouped splits) come from the CSV group column, else the DICOM patient ID, else the video id; a
patient or CSV group value is only ever stored as a salted hash (`hashed_group`).

Labels that differ only in case or surrounding spaces (``regular`` / ``Regular``) are one class,
spelt as most rows of the CSV spell it.

Which file a CSV id names (`id_matches`): an id with a folder part (``A/scan1``, ``A\\scan1.mp4``) names
only the file at that path relative to the source folder, with or without its extension; a bare id
(``scan1``, ``scan1.mp4``) names the files of that name or stem in any folder. An id that names several
files being ingested is refused (two patients' ``scan1`` would share a label and a group), and so is a
CSV that cannot be parsed as written: an unclosed quote, a NUL byte, a field over the csv module's limit.
"""

from __future__ import annotations

import codecs
import collections
import csv
import dataclasses
import hashlib
import io
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath

from sonocl.errors import UserError

LABEL_COLUMN_NAMES = ("label", "class", "diagnosis", "category", "target")
"""Column names (any case) taken as the label column when ``--label-column`` is not given."""
GROUP_COLUMN_NAMES = ("patient_id", "patient id", "patientid", "patient", "subject_id", "subject", "group")
"""Column names (any case) taken as the group column; failing those, a column mentioning ``patient``."""


MATCHES_SHOWN = 5
"""Files listed in the message refusing an id that names several files."""


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
    return [*_path_keys(relative), *_name_keys(relative)]


def _path_keys(relative: PurePosixPath) -> list[str]:
    """The ids with a folder part that name ``relative``: its relative path, with and without its extension."""
    return list(dict.fromkeys(_normalise(key) for key in (str(relative), str(relative.with_suffix("")))))


def _name_keys(relative: PurePosixPath) -> list[str]:
    """The bare ids that name ``relative``: its file name, with and without its extension."""
    name = PurePosixPath(relative.name)
    return list(dict.fromkeys(_normalise(key) for key in (name.name, name.stem)))


def _normalise(key: str) -> str:
    return key.strip().replace("\\", "/").casefold()


def _id_key(value: str) -> tuple[str, bool]:
    """A CSV id as compared with sources: normalised (case, ``\\``, ``./``), and whether it has a folder part."""
    normalised = _normalise(value)
    if not normalised:
        return "", False
    path = PurePosixPath(normalised)
    return str(path), len(path.parts) > 1


def id_matches(value: str, relative: PurePosixPath) -> bool:
    """Whether CSV id ``value`` names the source at ``relative``: an id with a folder part only the file at that
    relative path (with or without its extension), a bare id a file of that name or stem in any folder."""
    key, has_folder = _id_key(value)
    return bool(key) and key in (_path_keys(relative) if has_folder else _name_keys(relative))


class _SourceIndex:
    """The sources being ingested, by the ids that name them (`id_matches`, without a scan per id)."""

    def __init__(self, relatives: Sequence[PurePosixPath]) -> None:
        self._by_path: dict[str, list[PurePosixPath]] = collections.defaultdict(list)
        self._by_name: dict[str, list[PurePosixPath]] = collections.defaultdict(list)
        for relative in dict.fromkeys(relatives):
            for key in _path_keys(relative):
                self._by_path[key].append(relative)
            for key in _name_keys(relative):
                self._by_name[key].append(relative)

    def named_by(self, value: str) -> list[PurePosixPath]:
        key, has_folder = _id_key(value)
        if not key:
            return []
        return list(dict.fromkeys((self._by_path if has_folder else self._by_name).get(key, [])))


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
        self._rows: dict[tuple[str, bool], tuple[int, str, CsvLabels]] = {}
        """Per id key (`_id_key`): the line of its first row, the id as written there, and the row kept."""
        self._ids: list[str] = []
        self._resolved: dict[PurePosixPath, CsvLabels] = {}
        """Files named by several ids (``A/scan1`` and ``scan1``): the row kept (`check_unambiguous`)."""
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
            written = (row.get(id_column) or "").strip()
            key = _id_key(written)
            if not key[0]:
                continue
            self._ids.append(written)
            if key in self._rows:
                first_line, first_written, first = self._rows[key]
                kept = _check_same_row(path, repr(written), (first_line, first), (line, entry))
                self._rows[key] = (first_line, first_written, kept)
                continue
            self._rows[key] = (line, written, entry)

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
        table = cls(path, rows, id_column, label_column, group_column, extra_columns, lines)
        table.check_unambiguous(relatives)
        return table

    def check_unambiguous(self, relatives: Sequence[PurePosixPath]) -> None:
        """Refuse an id that names several of ``relatives``: ``scan1`` for ``A/scan1.mp4`` and ``B/scan1.mp4`` would
        give two patients' files one label and one group. A file named by several ids (``A/scan1``, ``scan1``) is
        held to the rule for rows repeating an id (`_check_same_row`)."""
        index = _SourceIndex(relatives)
        for line, written, _ in self._rows.values():
            named = index.named_by(written)
            if len(named) > 1:
                shown = ", ".join(str(relative) for relative in named[:MATCHES_SHOWN])
                more = f" and {len(named) - MATCHES_SHOWN} more" if len(named) > MATCHES_SHOWN else ""
                raise LabelError(
                    f"{self.path}: line {line}: id {written!r} names {len(named)} files being ingested ({shown}{more}); "
                    f"write the file's path relative to the source folder (e.g. {str(named[0])!r}) to say which"
                )
        for relative in dict.fromkeys(relatives):
            naming = [self._rows[key] for key in self._keys_naming(relative) if key in self._rows]
            if len(naming) < 2:
                continue
            (line, written, kept), rest = naming[0], naming[1:]
            for other_line, other_written, other in rest:
                both = f"{str(relative)!r} (as {written!r} and {other_written!r})"
                kept = _check_same_row(self.path, both, (line, kept), (other_line, other))
            self._resolved[relative] = kept

    def ids_not_in(self, relatives: Sequence[PurePosixPath]) -> list[str]:
        """The table's ids (as written) that name none of ``relatives``: a typo, another folder, a file not supplied."""
        index = _SourceIndex(relatives)
        return [value for value in dict.fromkeys(self._ids) if not index.named_by(value)]

    def lookup(self, relative: PurePosixPath) -> CsvLabels | None:
        """The row naming ``relative`` (`id_matches`): a row naming its path first, else one naming its file name."""
        if relative in self._resolved:
            return self._resolved[relative]
        return next((self._rows[key][2] for key in self._keys_naming(relative) if key in self._rows), None)

    @staticmethod
    def _keys_naming(relative: PurePosixPath) -> list[tuple[str, bool]]:
        """The id keys that name ``relative``, most specific first."""
        return [*((key, True) for key in _path_keys(relative)), *((key, False) for key in _name_keys(relative))]


def _check_same_row(path: Path, named: str, first: tuple[int, CsvLabels], again: tuple[int, CsvLabels]) -> CsvLabels:
    """The row to keep for a file named twice (``named``: the id, or the file and its two ids, quoted). Rows that differ in a label cannot both be right: an error. Rows that
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
            f"{path}: {named} is on lines {first_line} and {line}, which differ in {', '.join(differences)}; keep one row per file"
        )
    if a.group == b.group:
        return a
    print(f"sonocl: note: {path}: {named} is on lines {first_line} and {line} with different groups; its video is "
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
    """Header, rows and the line number of each row. UTF-8 (with or without a BOM), UTF-16 with a BOM, else
    Windows-1252, as spreadsheet programs on Windows save CSV.

    Refused, naming the line: an unclosed quote (the csv module would silently read the rest of the file
    into one cell), a NUL byte (never in a text CSV; it would make a label of its own), a field over the
    csv module's size limit, and anything else the csv module cannot parse.
    """
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise LabelError(f"{path}: cannot read the labels CSV ({error.strerror})") from error
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        text = raw.decode("utf-16", errors="replace")
    else:
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            text = raw.decode("cp1252", errors="replace")
    if "\0" in text:
        raise LabelError(
            f"{path}: line {_line_of(text, text.index(chr(0)))} holds a NUL byte, which a text CSV never does (a "
            "binary file, or a CSV saved as UTF-16 without a byte-order mark?); save it as CSV (UTF-8)"
        )
    try:
        dialect: type[csv.Dialect] | csv.Dialect = csv.Sniffer().sniff(text[:65536], delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    unclosed = _unclosed_quote(text, dialect)
    if unclosed is not None:
        raise LabelError(
            f"{path}: line {_line_of(text, unclosed)}: the quoted field starting there is never closed, so the rest "
            f"of the file would read as one cell; add the closing {dialect.quotechar} (or remove the opening one)"
        )
    reader = csv.DictReader(io.StringIO(text, newline=""), dialect=dialect)
    rows, lines = [], []
    try:
        header = [name for name in (reader.fieldnames or []) if name]
        if not header:
            raise LabelError(f"{path}: the labels CSV has no header row")
        for row in reader:
            rows.append({key: value or "" for key, value in row.items() if key})
            lines.append(reader.line_num)
    except csv.Error as error:
        line = max(1, reader.reader.line_num)  # DictReader.line_num is only set once a row is read whole
        if "field limit" in str(error):
            raise LabelError(
                f"{path}: line {line} holds a field over {csv.field_size_limit()} characters ({error}); a labels CSV "
                "holds file names and labels: check that this is the right file, or cut the long cell"
            ) from error
        raise LabelError(f"{path}: line {line} cannot be read as CSV ({error}); fix that line") from error
    return header, rows, lines


def _line_of(text: str, position: int) -> int:
    """Line number (from 1) of ``text[position]``, counting line breaks as the csv module does (CR LF, LF, CR)."""
    return len(_LINE_BREAK.findall(text, 0, position)) + 1


_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def _unclosed_quote(text: str, dialect: type[csv.Dialect] | csv.Dialect) -> int | None:
    """Position of the opening quote of a quoted field that the text never closes, else ``None``.

    Follows the csv module's reading (not strict): a quote opens a field only at the start of the field
    (after spaces where ``skipinitialspace``), a doubled quote inside is a literal one, an escape
    character takes the next character literally, and a quote inside an unquoted field is literal.
    """
    quote, delimiter, escape = dialect.quotechar, dialect.delimiter, dialect.escapechar
    if not quote or dialect.quoting == csv.QUOTE_NONE:
        return None
    field_start, quoted, opened = True, False, 0
    position, end = 0, len(text)
    while position < end:
        char = text[position]
        if quoted:
            if char == escape:
                position += 1
            elif char == quote:
                if dialect.doublequote and text.startswith(quote, position + 1):
                    position += 1
                else:
                    quoted = False
        elif char == delimiter or char in "\r\n":
            field_start = True
        elif field_start and char == quote:
            quoted, opened, field_start = True, position, False
        elif field_start and char == " " and dialect.skipinitialspace:
            pass
        else:
            field_start = False
            if char == escape:
                position += 1
        position += 1
    return opened if quoted else None


def _detect_id_column(
    path: Path, header: list[str], rows: list[dict[str, str]], relatives: Sequence[PurePosixPath]
) -> str:
    index = _SourceIndex(relatives)
    best, best_hits = None, 0
    for column in header:
        hits = len({relative for row in rows for relative in index.named_by(row.get(column, "") or "")})
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
    return next(iter(with_id or patient), None)
