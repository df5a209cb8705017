"""Pretraining corpus files: TWilBert's pair TSVs and plain-text dumps, read whole or streamed.

Problems are reported as in :mod:`twilbert.data.formats`; a streaming reader's memory does not grow
with the file.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional

from twilbert.data.formats import (
    HEADER_IN_HEADERLESS,
    DataFormatError,
    PathLike,
    Problems,
    check_header,
    is_header_line,
    iter_lines,
    parse_table,
    read_lines,
    row_fields,
)

PAIR_COLUMNS = ("ORIG_ID", "ORIG_TEXT", "REPLY_ID", "REPLY_TEXT")  # headerless pair files

SkipBad = Callable[[str, int, str], bool]
"""Asked about each malformed row ``(path, line, problem)``: True skips the row and reading goes on."""


@dataclass
class PairCorpus:
    """Tweet/reply text pairs for pretraining (MLM + reply order prediction)."""

    path: str
    orig_texts: list[str]
    reply_texts: list[str]
    line_numbers: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.orig_texts)


NO_HEADER_HINT = "; if the file has no header line, set the pairs header option to false"


def _headerless_columns(orig_text_header: str, reply_text_header: str) -> list[str]:
    """A headerless pair file's 4 columns: ORIG_ID ORIG_TEXT REPLY_ID REPLY_TEXT."""
    return [PAIR_COLUMNS[0], orig_text_header, PAIR_COLUMNS[2], reply_text_header]


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
    names = None if header else _headerless_columns(orig_text_header, reply_text_header)
    hint = NO_HEADER_HINT if header else ""
    problems = Problems(path)
    table = parse_table(path, text_cols, delimiter, header, names, (), None, hint, problems)
    if not problems.total and not len(table):
        problems.add(None, "no pairs in the file")
    problems.raise_if_any()
    return PairCorpus(str(path), table.columns[orig_text_header], table.columns[reply_text_header], table.line_numbers)


def read_texts(path: PathLike) -> list[str]:
    """Read one text per line (no header, tabs allowed); blank lines are errors, so line i is text i."""
    problems = Problems(path)
    lines = read_lines(path, problems)
    for lineno, line in enumerate(lines, 1):
        if line is not None:
            _check_text_line(lineno, line, problems)
    if not lines and not problems.total:
        problems.add(None, "no texts (the file is empty)")
    problems.raise_if_any()
    return lines  # type: ignore[return-value]  # no None left once no problem was found


def iter_pairs(
    path: PathLike,
    header: bool = True,
    delimiter: str = "\t",
    orig_text_header: str = "ORIG_TEXT",
    reply_text_header: str = "REPLY_TEXT",
    skip_bad: Optional[SkipBad] = None,
) -> Iterator[tuple[int, str, str]]:
    """Stream a TWilBert pair corpus as ``(line, orig_text, reply_text)``: the rows :func:`read_pairs`
    returns, in memory that does not grow with the file. A malformed row is offered to ``skip_bad``;
    when it declines (or there is none) nothing more is yielded, the rest of the file is still checked,
    and ``read_pairs``'s :class:`DataFormatError` is raised at its end. A file that cannot be read as a
    pair corpus at all (missing, broken header, empty) raises at once, its header the only line checked."""
    if not delimiter or delimiter in "\r\n":
        raise ValueError(f"delimiter must be a non-empty string without line breaks, got {delimiter!r}")
    text_cols = [orig_text_header, reply_text_header]
    problems = Problems(path)
    problems.recent = []
    lines = iter_lines(path, problems)
    first = next(lines, None)
    if header:
        if first is None:
            problems.add(1, f"empty file; expected a header line with the columns {', '.join(text_cols)}")
        elif first[1] is not None:
            cols = [c.strip() for c in first[1].split(delimiter)]
            check_header(cols, text_cols, delimiter, NO_HEADER_HINT, problems)
        problems.raise_if_any()  # row checks are meaningless against a broken header
        rows: Iterable[tuple[int, Optional[str]]] = lines
    else:
        cols = _headerless_columns(orig_text_header, reply_text_header)
        if first is not None and is_header_line(first[1], cols, delimiter):
            problems.add(1, HEADER_IN_HEADERLESS)
        rows = lines if first is None else itertools.chain([first], lines)
    must_fill = [(c, cols.index(c)) for c in text_cols]
    i_orig, i_reply = cols.index(orig_text_header), cols.index(reply_text_header)
    yield from _stream_rows(path, rows, problems, skip_bad, "no pairs in the file",
                            lambda lineno, line: row_fields(lineno, line, delimiter, len(cols), must_fill, problems),
                            lambda fields: (fields[i_orig], fields[i_reply]))


def iter_texts(path: PathLike, skip_bad: Optional[SkipBad] = None,
               on_blank: Optional[Callable[[str, int], None]] = None) -> Iterator[tuple[int, str]]:
    """Stream a plain-text corpus (one tweet per line, tabs allowed) as ``(line, text)``. A blank line
    (or one of only whitespace) is reported to ``on_blank`` and skipped when it is given (a dump with
    blank lines between tweets is normal); without it a blank line is a malformed row, handled as in
    :func:`iter_pairs`. Other malformed rows are handled as in :func:`iter_pairs` either way."""
    problems = Problems(path)
    problems.recent = []

    def text(lineno: int, line: Optional[str]) -> Optional[str]:
        if line is not None and on_blank is not None and not line.strip():
            on_blank(str(path), lineno)
            return SKIPPED
        if line is not None and not _check_text_line(lineno, line, problems):
            return None
        return line

    yield from _stream_rows(path, iter_lines(path, problems), problems, skip_bad, "no texts (the file is empty)",
                            text, lambda line: (line,))


SKIPPED = object()  # a parsed line that is no row and no problem (a blank line being skipped)

LONE_CR = ("a carriage return (\\r) that ends no line: the file's lines seem to end in \\r alone (old Mac style), "
           "which would merge them into one text; convert them to \\n (e.g. `tr '\\r' '\\n'`)")


def _check_text_line(lineno: int, line: str, problems: Problems) -> bool:
    """One text a line: a blank line, or a line holding a lone \\r (lines ended by \\r alone), is a problem."""
    if not line.strip():
        problems.add(lineno, "blank line (every line must hold a text; remove it)")
        return False
    if "\r" in line:  # the readers strip the \r of a \r\n ending; any other is a line end they did not see
        problems.add(lineno, LONE_CR)
        return False
    return True


def _stream_rows(
    path: PathLike,
    lines: Iterable[tuple[int, Optional[str]]],
    problems: Problems,
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
        elif parsed is SKIPPED:
            continue
        elif not failing:
            n_rows += 1
            yield (lineno, *pick(parsed))
    if failing:
        problems.raise_if_any()
    if not n_rows and not problems.total:
        raise DataFormatError(path, [(None, empty_problem)])
