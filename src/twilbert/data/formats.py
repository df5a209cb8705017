"""Delimited text files (TWilBert's task CSVs and pair TSVs): strict readers and atomic writers.

Every reader reports problems as ``path:line: problem`` (physical 1-based lines, header = line 1),
collects all of a file's problems into one :class:`DataFormatError`, and skips nothing silently.
Quoting is off: double quotes are ordinary text, as in TWilBert's files.
"""

from __future__ import annotations

import gzip
import itertools
import math
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union

from twilbert.io_utils import atomic_write

PathLike = Union[str, "os.PathLike[str]"]

MAX_REPORTED = 20  # problems listed in one error message; the total is always counted
PAIR_COLUMNS = ("ORIG_ID", "ORIG_TEXT", "REPLY_ID", "REPLY_TEXT")  # headerless pair files
_BOM = b"\xef\xbb\xbf"


class DataFormatError(ValueError):
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


class _Problems:
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
    problems = _Problems(path)
    table = _read_table(path, columns, delimiter, header, names, optional, non_empty, header_hint, problems)
    problems.raise_if_any()
    return table


def _read_table(
    path: PathLike,
    columns: Sequence[str],
    delimiter: str,
    header: bool,
    names: Optional[Sequence[str]],
    optional: Sequence[str],
    non_empty: Optional[Sequence[str]],
    header_hint: str,
    problems: _Problems,
) -> Table:
    if not delimiter or delimiter in "\r\n":
        raise ValueError(f"delimiter must be a non-empty string without line breaks, got {delimiter!r}")
    if not header and not names:
        raise ValueError("read_table needs names= (the column names) when header=False")
    lines = _read_lines(path, problems)
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
        _check_header(cols, columns, delimiter, header_hint, problems)
        if problems.total > before:  # row checks are meaningless against a broken header
            return Table(str(path), cols, {c: [] for c in cols}, [])
    else:
        cols = list(names)
        unknown = [c for c in columns if c not in cols]
        if unknown:
            raise ValueError(f"required columns {unknown} are not among names={cols}")
        if lines and _is_header_line(lines[0], cols, delimiter):
            problems.add(1, HEADER_IN_HEADERLESS)
            first = 1

    must_fill = [(c, cols.index(c)) for c in (columns if non_empty is None else non_empty)]
    n_cols = len(cols)
    values: list[list[str]] = [[] for _ in cols]  # per column: no million surviving row lists for the GC to scan
    appenders = [v.append for v in values]
    line_numbers: list[int] = []
    for lineno, line in enumerate(lines[first:], first + 1):
        fields = _row_fields(lineno, line, delimiter, n_cols, must_fill, problems)
        if fields is not None:
            for append, value in zip(appenders, fields):
                append(value)
            line_numbers.append(lineno)
    return Table(str(path), cols, dict(zip(cols, values)), line_numbers)


def _row_fields(
    lineno: int, line: Optional[str], delimiter: str, n_cols: int, must_fill: Sequence[tuple[str, int]],
    problems: _Problems,
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


def _read_lines(path: PathLike, problems: _Problems) -> list[Optional[str]]:
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


def _is_header_line(line: Optional[str], names: Sequence[str], delimiter: str) -> bool:
    return line is not None and [f.strip() for f in line.split(delimiter)] == list(names)


def _utf8_problem(raw: bytes, err: UnicodeDecodeError, line_offset: int) -> str:
    bad = raw[err.start : err.start + 4]
    return (
        f"invalid UTF-8 at byte offset {line_offset + err.start} (byte {err.start + 1} of the line, "
        f"{bad!r}); re-save the file as UTF-8"
    )


def _check_header(
    cols: list[str], required: Sequence[str], delimiter: str, hint: str, problems: _Problems
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
# Task splits, pair corpora, plain texts
# --------------------------------------------------------------------------------------------


@dataclass
class TaskExamples:
    """One split of a finetuning task. ``labels`` are class indices (list[int]), 0/1 indicator
    vectors (list[list[int]], multi-label) or floats (regression)."""

    path: str
    ids: list[str]
    texts: list[str]
    labels: list[Any]
    aux_texts: Optional[list[str]] = None
    line_numbers: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)


def read_task_split(
    path: PathLike,
    ds: Any,
    categories: Optional[Mapping[str, int]],
    multi_label: bool = False,
    regression: bool = False,
) -> TaskExamples:
    """Read one split of a task described by a ``TaskDataset`` (headers, delimiter).

    Classification: each CLASS field (surrounding whitespace ignored) must be a key of ``categories``.
    Multi-label: CLASS is ``'|'``-separated 0/1 flags, flag i meaning the category with index i; the
    width must equal ``len(categories)``, or, with no categories, the width of the first row.
    Regression: CLASS is a finite float. Texts are kept exactly as written.
    """
    if multi_label and regression:
        raise ValueError("a task cannot be both multi_label and regression")
    if not (multi_label or regression) and not categories:
        raise ValueError(f"{path}: a classification task needs categories (label -> index)")
    required = [ds.id_header, ds.text_header, ds.class_header] + ([ds.aux_header] if ds.aux_header else [])
    problems = _Problems(path)
    hint = "; set the task's dataset id_header/text_header/class_header/aux_header to the file's names"
    table = _read_table(path, required, ds.delimiter, True, None, (), None, hint, problems)
    if not problems.total and not len(table):
        problems.add(None, "no examples (the file has only a header)")

    raw = table.columns.get(ds.class_header, [])
    if regression:
        labels, bad = _parse_floats(raw)
    elif multi_label:
        labels, bad = _parse_flags(raw, len(categories) if categories else None, categories)
    else:
        labels, bad = _parse_classes(raw, categories)
    for i, problem in bad:
        problems.add(table.line_numbers[i], problem)
    problems.raise_if_any()
    aux = table.columns[ds.aux_header] if ds.aux_header else None
    return TaskExamples(
        path=str(path),
        ids=table.columns[ds.id_header],
        texts=table.columns[ds.text_header],
        labels=labels,
        aux_texts=aux,
        line_numbers=table.line_numbers,
    )


def _parse_classes(raw: list[str], categories: Mapping[str, int]) -> tuple[list[int], list[tuple[int, str]]]:
    labels, bad = [], []
    for i, value in enumerate(raw):
        index = categories.get(value.strip())
        if index is None:
            known = ", ".join(repr(k) for k in list(categories)[:30])
            bad.append((i, f"unknown label {value.strip()!r} (known: {known})"))
            index = -1
        labels.append(index)
    return labels, bad


def _parse_flags(
    raw: list[str], width: Optional[int], categories: Optional[Mapping[str, int]]
) -> tuple[list[list[int]], list[tuple[int, str]]]:
    labels, bad = [], []
    for i, value in enumerate(raw):
        parts = value.strip().split("|")
        if any(p not in ("0", "1") for p in parts):
            bad.append((i, f"multi-label value {value.strip()!r} must be '|'-separated 0/1 flags, e.g. '0|1|0'"))
            labels.append([])
            continue
        if width is None:
            width = len(parts)
        if len(parts) != width:
            names = f" (one per category: {', '.join(categories)})" if categories else " (as in the first row)"
            bad.append((i, f"multi-label value {value.strip()!r} has {len(parts)} flags, expected {width}{names}"))
        labels.append([int(p) for p in parts])
    return labels, bad


def _parse_floats(raw: list[str]) -> tuple[list[float], list[tuple[int, str]]]:
    labels, bad = [], []
    for i, value in enumerate(raw):
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not math.isfinite(number):
            bad.append((i, f"regression label {value.strip()!r} is not a finite number"))
        labels.append(number)
    return labels, bad


@dataclass
class PairCorpus:
    """Tweet/reply text pairs for pretraining (MLM + reply order prediction)."""

    path: str
    orig_texts: list[str]
    reply_texts: list[str]
    line_numbers: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.orig_texts)


def read_pairs(
    path: PathLike,
    header: bool = True,
    delimiter: str = "\t",
    orig_text_header: str = "ORIG_TEXT",
    reply_text_header: str = "REPLY_TEXT",
) -> PairCorpus:
    """Read a TWilBert pair corpus; headerless files have the 4 columns ORIG_ID ORIG_TEXT REPLY_ID REPLY_TEXT.

    Both texts of every pair must be non-empty; IDs may be empty.
    """
    text_cols = [orig_text_header, reply_text_header]
    names = [PAIR_COLUMNS[0], orig_text_header, PAIR_COLUMNS[2], reply_text_header] if not header else None
    hint = "; if the file has no header line, set the pairs header option to false" if header else ""
    problems = _Problems(path)
    table = _read_table(path, text_cols, delimiter, header, names, (), None, hint, problems)
    if not problems.total and not len(table):
        problems.add(None, "no pairs in the file")
    problems.raise_if_any()
    return PairCorpus(str(path), table.columns[orig_text_header], table.columns[reply_text_header], table.line_numbers)


def read_texts(path: PathLike) -> list[str]:
    """Read one text per line (no header, tabs allowed); blank lines are errors, so line i is text i."""
    problems = _Problems(path)
    lines = _read_lines(path, problems)
    for lineno, line in enumerate(lines, 1):
        if line is not None and not line.strip():
            problems.add(lineno, "blank line (every line must hold a text; remove it)")
    if not lines and not problems.total:
        problems.add(None, "no texts (the file is empty)")
    problems.raise_if_any()
    return lines  # type: ignore[return-value]  # no None left once no problem was found


# --------------------------------------------------------------------------------------------
# Streaming: pretraining corpora of any size, plain or gzip-compressed
# --------------------------------------------------------------------------------------------

SkipBad = Callable[[str, int, str], bool]
"""Asked about each malformed row ``(path, line, problem)``: True skips the row and reading goes on."""


def iter_lines(path: PathLike, problems: _Problems) -> Iterator[tuple[int, Optional[str]]]:
    """The physical lines of a UTF-8 file one at a time, as :func:`_read_lines` gives them all (BOM and
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


def iter_pairs(
    path: PathLike,
    header: bool = True,
    delimiter: str = "\t",
    orig_text_header: str = "ORIG_TEXT",
    reply_text_header: str = "REPLY_TEXT",
    skip_bad: Optional[SkipBad] = None,
) -> Iterator[tuple[int, str, str]]:
    """Stream a TWilBert pair corpus as ``(line, orig_text, reply_text)``: the rows :func:`read_pairs`
    returns, in memory that does not grow with the file.

    A malformed row is offered to ``skip_bad``; when it declines (or there is none) nothing more is
    yielded, the rest of the file is still checked, and the :class:`DataFormatError` ``read_pairs``
    would raise is raised at its end. A file that cannot be read as a pair corpus at all (missing,
    broken header, empty) raises at once; its header is the only line checked then.
    """
    if not delimiter or delimiter in "\r\n":
        raise ValueError(f"delimiter must be a non-empty string without line breaks, got {delimiter!r}")
    text_cols = [orig_text_header, reply_text_header]
    problems = _Problems(path)
    problems.recent = []
    lines = iter_lines(path, problems)
    first = next(lines, None)
    if header:
        if first is None:
            problems.add(1, f"empty file; expected a header line with the columns {', '.join(text_cols)}")
        elif first[1] is not None:
            cols = [c.strip() for c in first[1].split(delimiter)]
            hint = "; if the file has no header line, set the pairs header option to false"
            _check_header(cols, text_cols, delimiter, hint, problems)
        problems.raise_if_any()  # row checks are meaningless against a broken header
        rows: Iterable[tuple[int, Optional[str]]] = lines
    else:
        cols = [PAIR_COLUMNS[0], orig_text_header, PAIR_COLUMNS[2], reply_text_header]
        if first is not None and _is_header_line(first[1], cols, delimiter):
            problems.add(1, HEADER_IN_HEADERLESS)
        rows = lines if first is None else itertools.chain([first], lines)
    must_fill = [(c, cols.index(c)) for c in text_cols]
    i_orig, i_reply = cols.index(orig_text_header), cols.index(reply_text_header)
    yield from _stream_rows(path, rows, problems, skip_bad, "no pairs in the file",
                            lambda lineno, line: _row_fields(lineno, line, delimiter, len(cols), must_fill, problems),
                            lambda fields: (fields[i_orig], fields[i_reply]))


def iter_texts(path: PathLike, skip_bad: Optional[SkipBad] = None) -> Iterator[tuple[int, str]]:
    """Stream a plain-text corpus (one tweet per line, tabs allowed) as ``(line, text)``; blank lines
    are malformed rows, handled as in :func:`iter_pairs`."""
    problems = _Problems(path)
    problems.recent = []

    def text(lineno: int, line: Optional[str]) -> Optional[str]:
        if line is not None and not line.strip():
            problems.add(lineno, "blank line (every line must hold a text; remove it)")
            return None
        return line

    yield from _stream_rows(path, iter_lines(path, problems), problems, skip_bad, "no texts (the file is empty)",
                            text, lambda line: (line,))


def _stream_rows(
    path: PathLike,
    lines: Iterable[tuple[int, Optional[str]]],
    problems: _Problems,
    skip_bad: Optional[SkipBad],
    empty_problem: str,
    parse: Callable[[int, Optional[str]], Any],
    pick: Callable[[Any], tuple],
) -> Iterator[tuple]:
    """``(line, *pick(parsed))`` for each line that parses; malformed rows go to ``skip_bad``.
    ``problems.recent`` holds the problems found so far on the line being read."""
    assert problems.recent is not None
    failing = False
    n_rows = 0
    for lineno, line in lines:
        parsed = parse(lineno, line)
        if problems.recent:  # this line's problems, its decoding included
            reason = "; ".join(problems.recent)
            problems.recent.clear()
            if not failing and skip_bad is not None and skip_bad(str(path), lineno, reason):
                continue
            failing = True
        elif not failing:
            n_rows += 1
            yield (lineno, *pick(parsed))
    if failing:
        problems.raise_if_any()
    if not n_rows and not problems.total:
        raise DataFormatError(path, [(None, empty_problem)])


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
    problems = _Problems(path)
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
    row: Sequence[Any], width: int, delimiter: str, lineno: int, what: str, problems: _Problems
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
