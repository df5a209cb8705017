"""What ``predict`` and ``embeddings`` read: text lines or TSV rows, in chunks, numbered for errors.

Bytes are decoded line by line, so a bad line is named, not fatal; every input line yields one row.
"""

from __future__ import annotations

import io
import itertools
import logging
import sys
from typing import IO, Iterable, Iterator, NamedTuple, Optional, Union

from twilbert.errors import TwilbertError

log = logging.getLogger(__name__)

CHUNK_SIZE = 10_000  # lines read, scored and written at a time


class PredictError(TwilbertError, ValueError):
    """A model directory or an input cannot be used; the one-line message names the file and the fix."""


class Chunk(NamedTuple):
    ids: list  # 1-based line (or argument) numbers, or the values of the TSV's ID column
    texts: list[str]
    aux: Optional[list[str]]  # second texts (segment B), when the model takes them


def open_input(path: str) -> IO[bytes]:
    """A file, or stdin for ``-``, as bytes: :func:`iter_lines` decodes it line by line (and says where it cannot)."""
    if path == "-":
        try:  # closefd=False: closing the input must not close the process's stdin
            return open(sys.stdin.fileno(), "rb", closefd=False)
        except (AttributeError, OSError, ValueError):  # a replaced sys.stdin (tests) has no file descriptor
            return getattr(sys.stdin, "buffer", None) or io.BytesIO(sys.stdin.read().encode("utf-8"))
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise PredictError(f"{path}: input file not found") from None
    except IsADirectoryError:
        raise PredictError(f"{path}: is a directory, expected a text file") from None
    except OSError as err:
        raise PredictError(f"{path}: cannot read the input ({err.strerror})") from None


MAX_SHOWN = 5  # line numbers quoted in a warning


def iter_lines(handle: Iterable[Union[bytes, str]], name: str = "input") -> Iterator[str]:
    """Lines without their ``\\n`` / ``\\r\\n`` ending, split on ``\\n`` only; blank lines are kept.

    Bytes are decoded as UTF-8 (a leading BOM dropped). A line that is not valid UTF-8 is still
    labelled, its undecodable bytes read as U+FFFD, and a warning names those lines; lines with NUL
    bytes get a warning that the input looks binary.
    """
    bad: list[int] = []
    binary: list[int] = []
    n_bad = n_binary = 0
    for number, raw in enumerate(handle, 1):
        if isinstance(raw, bytes):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if b"\0" in raw:
                n_binary += 1
                if len(binary) < MAX_SHOWN:
                    binary.append(number)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                n_bad += 1
                if len(bad) < MAX_SHOWN:
                    bad.append(number)
                line = raw.decode("utf-8", errors="replace")
        else:
            line = raw
        if line.endswith("\n"):
            line = line[:-1]
        yield line[:-1] if line.endswith("\r") else line
    if n_binary:
        log.warning("%s looks like a binary file, not text: %d lines hold NUL bytes (lines %s); every line was "
                    "labelled as text anyway", name, n_binary, _shown(binary, n_binary))
    if n_bad:
        log.warning("%s: %d lines are not valid UTF-8 (lines %s); their undecodable bytes were read as U+FFFD. "
                    "Convert the input to UTF-8 (e.g. iconv -f latin1 -t utf-8)", name, n_bad, _shown(bad, n_bad))


def _shown(numbers: list[int], total: int) -> str:
    return ", ".join(map(str, numbers)) + (", ..." if total > len(numbers) else "")


def text_rows(lines: Iterable[str]) -> Iterator[tuple[int, str, None]]:
    """One text per line, numbered from 1."""
    for number, line in enumerate(lines, 1):
        yield number, line, None


def tsv_rows(lines: Iterable[str], name: str, column: str, id_column: Optional[str] = None,
             aux_column: Optional[str] = None,
             allow_empty: bool = False) -> Iterator[tuple[Union[int, str], str, Optional[str]]]:
    """(id, text, aux) per data row of a tab-separated file with a header line.

    The id is the ``id_column`` value (default: ``ID`` when the header has it), else the line number.
    A row with too few fields still gets a prediction (missing fields read as empty) and is reported.
    ``allow_empty``: a file without even a header line has no rows, rather than being an error.
    """
    lines = iter(lines)
    header = next(lines, None)
    if header is None:
        if allow_empty:
            return
        raise PredictError(f"{name}: empty input; expected a header line with a {column!r} column")
    cols = [c.strip() for c in header.split("\t")]

    def index(col: Optional[str], what: str) -> Optional[int]:
        if col is None:
            return None
        if col not in cols:
            shown = ", ".join(repr(c) for c in cols[:12])
            raise PredictError(f"{name}:1: no {col!r} column in the header ({shown}); {what}")
        return cols.index(col)

    i_text = index(column, "set --column to the text column")
    i_id = index(id_column, "set --id-column to one of them") if id_column else (
        cols.index("ID") if "ID" in cols else None)
    i_aux = index(aux_column, "the model was trained with this second text; add it or pass --aux-input")
    width = len(cols)
    bad: list[int] = []
    n_bad = 0
    for number, line in enumerate(lines, 2):
        fields = line.split("\t")
        if len(fields) != width:
            n_bad += 1
            if len(bad) < MAX_SHOWN:
                bad.append(number)
            fields += [""] * (width - len(fields))
        row_id = fields[i_id] if i_id is not None else number
        yield row_id, fields[i_text], (None if i_aux is None else fields[i_aux])
    if n_bad:
        log.warning("%s: %d rows have a field count other than the header's %d (lines %s); missing fields "
                    "were read as empty", name, n_bad, len(cols), _shown(bad, n_bad))


def with_aux(rows: Iterable[tuple], aux_lines: Iterable[str], name: str, aux_name: str) -> Iterator[tuple]:
    """Pair each row with the line of the same number in the aux file; the counts must agree."""
    aux_lines = iter(aux_lines)
    n = 0
    for n, (row_id, text, _) in enumerate(rows, 1):
        aux = next(aux_lines, None)
        if aux is None:
            raise PredictError(f"{aux_name}: {n - 1} lines, fewer than the input {name}; "
                               "give one second text per input line")
        yield row_id, text, aux
    if next(aux_lines, None) is not None:
        raise PredictError(f"{aux_name}: more lines than the {n} of the input {name}; "
                           "give one second text per input line")


def chunked(rows: Iterable[tuple], name: str, size: int = CHUNK_SIZE, allow_empty: bool = False) -> Iterator[Chunk]:
    """Chunks of at most ``size`` rows; an input without a single row is an error unless ``allow_empty``."""
    if size < 1:
        raise ValueError(f"chunk size must be >= 1, got {size}")
    n = 0
    rows = iter(rows)
    while True:
        block = list(itertools.islice(rows, size))
        if not block:
            break
        n += len(block)
        ids, texts, aux = (list(col) for col in zip(*block))
        yield Chunk(ids, texts, None if aux[0] is None else aux)
    if n == 0 and not allow_empty:
        raise PredictError(f"{name}: empty input; nothing to label (give TEXT arguments, a non-empty file or stdin)")
