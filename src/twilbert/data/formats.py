"""Delimited text files: the strict line and table parsing, the errors, and the atomic writer that the
task reader (``data/tasks.py``) and the corpus readers (``data/corpus_files.py``) share.

Every reader reports problems as ``path:line: problem`` (physical 1-based lines, header = line 1),
collects all of a file's problems into one :class:`DataFormatError`, and skips nothing silently.
Quoting is off: double quotes are ordinary text, as in TWilBert's files.
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

from twilbert.errors import TwilbertError
from twilbert.io_utils import atomic_write

PathLike = Union[str, "os.PathLike[str]"]

MAX_REPORTED = 20  # problems listed in one error message; the total is always counted
_BOM = b"\xef\xbb\xbf"


def has_printable(text: str) -> bool:
    """Whether ``text`` holds a character one can see: not only controls, NULs, format marks or blanks.
    The corpus drops rows without one, the task reader refuses them."""
    return any(ch.isprintable() and not ch.isspace() for ch in text)


class DataFormatError(TwilbertError, ValueError):
    """A data file is malformed; the message lists ``path:line: problem`` for each problem found."""

    def __init__(self, path: PathLike, problems: Sequence[tuple[Optional[int], str]], total: Optional[int] = None):
        self.path = str(path)
        self.problems = list(problems)
        self.total = max(total or 0, len(self.problems))
        super().__init__(self._message())

    def __reduce__(self):  # picklable across worker processes despite the custom __init__
        return (type(self), (self.path, self.problems, self.total))

    def _message(self) -> str:
        lines = [self.path if line is None else f"{self.path}:{line}" for line, _ in self.problems]
        lines = [f"{where}: {problem}" for where, (_, problem) in zip(lines, self.problems)]
        if self.total == 1:
            return lines[0]
        shown = "" if self.total == len(lines) else f", the first {len(lines)} shown"
        return f"{self.path}: {self.total} problems{shown}:\n" + "\n".join(lines)


class Problems:
    """Collects a file's problems, keeping the first ``MAX_REPORTED`` and counting the rest."""

    def __init__(self, path: PathLike):
        self.path = str(path)
        self.kept: list[tuple[Optional[int], str]] = []
        self.total = 0
        # Streaming readers set a list here: the problems of the row being read, cleared per row.
        self.recent: Optional[list[str]] = None

    def add(self, line: Optional[int], problem: str) -> None:
        self.total += 1
        if self.recent is not None:
            self.recent.append(problem)
        if len(self.kept) < MAX_REPORTED:
            self.kept.append((line, problem))

    def raise_if_any(self) -> None:
        if self.total:
            kept = sorted(self.kept, key=lambda p: -1 if p[0] is None else p[0])
            raise DataFormatError(self.path, kept, self.total)


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


@dataclass
class Table:
    """Columns of a delimited file, by name, plus the physical line number of each row."""

    path: str
    header: list[str]
    columns: dict[str, list[str]]
    line_numbers: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.line_numbers)

    def get(self, name: str) -> Optional[list[str]]:
        return self.columns.get(name)


def read_table(
    path: PathLike,
    columns: Sequence[str],
    delimiter: str = "\t",
    header: bool = True,
    names: Optional[Sequence[str]] = None,
    optional: Sequence[str] = (),
    non_empty: Optional[Sequence[str]] = None,
    header_hint: str = "",
) -> Table:
    """Read a delimited UTF-8 file with required ``columns``; raise one DataFormatError listing all problems.

    ``names`` are the column names of a headerless file (``header=False``). ``non_empty`` are the
    columns whose fields must hold more than whitespace (default: all required ``columns``).
    ``optional`` columns are only checked for presence by callers (``Table.get`` returns None).
    ``header_hint`` is appended to missing-column problems (e.g. which config key to change).
    """
    problems = Problems(path)
    table = parse_table(path, columns, delimiter, header, names, optional, non_empty, header_hint, problems)
    problems.raise_if_any()
    return table


def parse_table(
    path: PathLike,
    columns: Sequence[str],
    delimiter: str,
    header: bool,
    names: Optional[Sequence[str]],
    optional: Sequence[str],
    non_empty: Optional[Sequence[str]],
    header_hint: str,
    problems: Problems,
) -> Table:
    if not delimiter or delimiter in "\r\n":
        raise ValueError(f"delimiter must be a non-empty string without line breaks, got {delimiter!r}")
    if not header and not names:
        raise ValueError("read_table needs names= (the column names) when header=False")
    lines = read_lines(path, problems)
    empty = Table(str(path), list(names or ()), {c: [] for c in (names or ())}, [])
    first = 0

    if header:
        if not lines or lines[0] is None:
            if not lines:
                problems.add(1, f"empty file; expected a header line with the columns {', '.join(columns)}")
            return empty
        cols = [c.strip() for c in lines[0].split(delimiter)]
        first = 1
        before = problems.total
        check_header(cols, columns, delimiter, header_hint, problems)
        if problems.total > before:  # row checks are meaningless against a broken header
            return Table(str(path), cols, {c: [] for c in cols}, [])
    else:
        cols = list(names)
        unknown = [c for c in columns if c not in cols]
        if unknown:
            raise ValueError(f"required columns {unknown} are not among names={cols}")
        if lines and is_header_line(lines[0], cols, delimiter):
            problems.add(1, HEADER_IN_HEADERLESS)
            first = 1

    must_fill = [(c, cols.index(c)) for c in (columns if non_empty is None else non_empty)]
    n_cols = len(cols)
    values: list[list[str]] = [[] for _ in cols]  # per column: no million surviving row lists for the GC to scan
    appenders = [v.append for v in values]
    line_numbers: list[int] = []
    for lineno, line in enumerate(lines[first:], first + 1):
        fields = row_fields(lineno, line, delimiter, n_cols, must_fill, problems)
        if fields is not None:
            for append, value in zip(appenders, fields):
                append(value)
            line_numbers.append(lineno)
    return Table(str(path), cols, dict(zip(cols, values)), line_numbers)


def row_fields(
    lineno: int, line: Optional[str], delimiter: str, n_cols: int, must_fill: Sequence[tuple[str, int]],
    problems: Problems,
) -> Optional[list[str]]:
    """The fields of one data line, or None when it is malformed (each problem added to ``problems``)."""
    if line is None:  # undecodable; already reported
        return None
    if not line or (delimiter not in line and not line.strip()):
        problems.add(lineno, "blank line (blank lines are not skipped; remove it)")
        return None
    fields = line.split(delimiter)
    if len(fields) != n_cols:
        problems.add(lineno, _field_count_problem(n_cols, len(fields), delimiter))
        return None
    bad = False
    for name, i in must_fill:
        if not fields[i].strip():
            problems.add(lineno, f"empty {name!r} field")
            bad = True
    return None if bad else fields


def read_lines(path: PathLike, problems: Problems) -> list[Optional[str]]:
    """Physical lines of a strictly UTF-8 file, BOM and line terminators removed; None for undecodable lines."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise DataFormatError(path, [(None, "file not found")]) from None
    except IsADirectoryError:
        raise DataFormatError(path, [(None, "is a directory, expected a file")]) from None
    skipped = len(_BOM) if data.startswith(_BOM) else 0
    data = data[skipped:]
    try:
        lines: list[Optional[str]] = list(data.decode("utf-8").split("\n"))
    except UnicodeDecodeError:
        lines = []
        offset = skipped
        for lineno, raw in enumerate(data.split(b"\n"), 1):  # 0x0A never occurs inside a UTF-8 sequence
            try:
                lines.append(raw.decode("utf-8"))
            except UnicodeDecodeError as err:
                problems.add(lineno, _utf8_problem(raw, err, offset))
                lines.append(None)
            offset += len(raw) + 1
    if lines and lines[-1] == "":  # the newline that ends the last line (or an empty file)
        lines.pop()
    return [line[:-1] if line and line[-1] == "\r" else line for line in lines]


HEADER_IN_HEADERLESS = "this line is a header, but the file is read as headerless; set the header option to true"


def is_header_line(line: Optional[str], names: Sequence[str], delimiter: str) -> bool:
    return line is not None and [f.strip() for f in line.split(delimiter)] == list(names)


def _utf8_problem(raw: bytes, err: UnicodeDecodeError, line_offset: int) -> str:
    bad = raw[err.start : err.start + 4]
    return (
        f"invalid UTF-8 at byte offset {line_offset + err.start} (byte {err.start + 1} of the line, "
        f"{bad!r}); re-save the file as UTF-8"
    )


def check_header(
    cols: list[str], required: Sequence[str], delimiter: str, hint: str, problems: Problems
) -> None:
    shown = ", ".join(repr(c if len(c) <= 40 else c[:37] + "...") for c in cols[:12])
    shown += ", ..." if len(cols) > 12 else ""
    seen: set[str] = set()
    for c in cols:
        if not c:
            problems.add(1, f"empty column name in the header ({shown}); a stray delimiter?")
        elif c in seen:
            problems.add(1, f"duplicate column {c!r} in the header")
        seen.add(c)
    for c in required:
        if c not in cols:
            extra = f" (is the delimiter {delimiter!r} right?)" if len(cols) == 1 and len(required) > 1 else ""
            problems.add(1, f"missing required column {c!r}; the header has {shown}{extra}{hint}")


def _field_count_problem(expected: int, found: int, delimiter: str) -> str:
    if found > expected:
        why = f"a field probably contains the delimiter {delimiter!r}"
    else:
        why = f"a field may contain a line break, or the delimiter is not {delimiter!r}"
    return f"expected {expected} fields, found {found} ({why})"



# --------------------------------------------------------------------------------------------
# Streaming: files of any size, plain or gzip-compressed
# --------------------------------------------------------------------------------------------


def iter_lines(path: PathLike, problems: Problems) -> Iterator[tuple[int, Optional[str]]]:
    """The physical lines of a UTF-8 file one at a time, as :func:`read_lines` gives them all (BOM and
    line terminators removed, None for an undecodable line, its problem added). A ``.gz`` file is
    decompressed on the fly (byte offsets then count decompressed bytes). Memory holds one line,
    whatever the file's size."""
    path = Path(path)
    gzipped = path.suffix == ".gz"
    try:
        fh = gzip.open(path, "rb") if gzipped else path.open("rb")
    except FileNotFoundError:
        raise DataFormatError(path, [(None, "file not found")]) from None
    except IsADirectoryError:
        raise DataFormatError(path, [(None, "is a directory, expected a file")]) from None
    lineno = offset = 0
    with fh:
        try:
            for raw in fh:
                lineno += 1
                start, offset = offset, offset + len(raw)
                if lineno == 1 and raw.startswith(_BOM):
                    raw = raw[len(_BOM) :]
                    start += len(_BOM)
                if raw.endswith(b"\n"):
                    raw = raw[:-1]
                elif not raw:  # the file holds only a byte order mark
                    return
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    problems.add(lineno, _utf8_problem(raw, err, start))
                    yield lineno, None
                    continue
                yield lineno, line[:-1] if line.endswith("\r") else line
        except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
            what = "a truncated or corrupt gzip file?" if gzipped else "a read error"
            raise DataFormatError(path, [(lineno + 1, f"cannot read past this point ({what}): {err}")]) from None




# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def write_table(
    path: PathLike, header: Optional[Sequence[str]], rows: Iterable[Sequence[Any]], delimiter: str = "\t"
) -> int:
    """Write rows atomically (temp file + ``os.replace``); return the number of rows written.

    Refuses, naming each offending row, any field holding the delimiter or a line break, rows of
    the wrong width and non-UTF-8-encodable text: the target file is then left untouched.
    ``header=None`` writes a headerless file whose width is the first row's. Fields may be str, int
    or float (written with ``str``).
    """
    if not delimiter or delimiter in "\r\n":
        raise ValueError(f"delimiter must be a non-empty string without line breaks, got {delimiter!r}")
    problems = Problems(path)
    width = len(header) if header is not None else None
    n_rows = 0
    with atomic_write(path, "w") as out:
        lineno = 0
        if header is not None:
            lineno = 1
            line = _format_row(list(header), width, delimiter, 1, "header", problems)
            if line is not None:
                out.write(line)
        for n_rows, row in enumerate(rows, 1):
            lineno += 1
            if width is None:
                width = len(row)
            line = _format_row(row, width, delimiter, lineno, f"row {n_rows}", problems)
            if line is not None and not problems.total:
                out.write(line)
        problems.raise_if_any()
    return n_rows


def _format_row(
    row: Sequence[Any], width: int, delimiter: str, lineno: int, what: str, problems: Problems
) -> Optional[str]:
    if isinstance(row, (str, bytes)):
        problems.add(lineno, f"{what} is a {type(row).__name__}, expected a sequence of fields")
        return None
    fields = []
    ok = True
    for col, value in enumerate(row):
        if isinstance(value, str):
            text = value
        elif isinstance(value, (int, float)):
            text = str(value)
        else:
            problems.add(lineno, f"{what}, field {col + 1}: {type(value).__name__} value {value!r} is not text")
            ok = False
            continue
        if delimiter in text or "\n" in text or "\r" in text:
            problems.add(
                lineno, f"{what}, field {col + 1}: contains the delimiter {delimiter!r} or a line break: {text[:60]!r}"
            )
            ok = False
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            problems.add(lineno, f"{what}, field {col + 1}: not encodable as UTF-8 ({err.reason} at {err.start})")
            ok = False
        fields.append(text)
    if len(row) != width:
        problems.add(lineno, f"{what} has {len(row)} fields, expected {width}")
        ok = False
    line = delimiter.join(fields)
    if ok and (not line or (delimiter not in line and not line.strip())):
        problems.add(lineno, f"{what} would be written as a blank line, which readers reject")
        ok = False
    if ok and lineno == 1 and line.startswith("\ufeff"):
        problems.add(lineno, f"{what} starts with U+FEFF, which readers strip as a byte order mark")
        ok = False
    return line + "\n" if ok else None
