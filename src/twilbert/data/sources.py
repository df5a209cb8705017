"""The user's pretraining corpus: which files (paths, globs, lists), read as one stream of rows
``(text, reply or None)``: pair TSVs give both, plain-text dumps ``None`` (the ``pairs`` stage splits them
SOP-style). A malformed row fails the stage with ``file:line: problem`` unless ``data.max_bad_rows``
allows skipping it: each skipped row is logged and counted, never dropped silently."""

from __future__ import annotations

import errno
import glob
import logging
import os
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from twilbert.config import DataConfig
from twilbert.data.corpus_files import iter_pairs, iter_texts
from twilbert.data.formats import DataFormatError
from twilbert.errors import TwilbertError

log = logging.getLogger(__name__)

MAX_LISTED = 100  # skipped rows listed in the stage's summary; every one is logged and counted
_GLOB_CHARS = set("*?[")


class CorpusError(TwilbertError, RuntimeError):
    """The configured corpus cannot be read; the message names the key or file:line."""


def resolve_corpus_files(cfg: DataConfig) -> list[Path]:
    """The selected source's files in reading order: entries as listed, each glob's matches sorted."""
    key = f"data.{cfg.source}"
    files: list[Path] = []
    seen: set[str] = set()
    for entry in cfg.corpus_files():
        pattern = os.path.expanduser(entry)
        if _GLOB_CHARS & set(pattern):
            matches = sorted(m for m in glob.glob(pattern, recursive=True) if not os.path.isdir(m))
            if not matches:
                raise CorpusError(f"{key}: {entry!r} matches no file (relative paths start at {os.getcwd()})")
        else:
            matches = [pattern]
        for match in matches:
            check_regular_file(match, key)
            real = os.path.realpath(match)
            if real in seen:
                log.warning("%s: %s is listed twice in %s; it is read once", match, real, key)
                continue
            seen.add(real)
            files.append(Path(match))
    return files


def check_regular_file(path: str, key: str) -> None:
    """Refuse, naming ``path`` and ``key``, anything but a regular file (or a link to one): a FIFO or a
    device would block the reader or never end, and a link loop is not a missing file."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        problem = ("a symbolic link to a missing file" if os.path.islink(path) else "file not found")
        raise DataFormatError(path, [(None, f"{problem} (set by {key})")]) from None
    except OSError as err:
        problem = ("a symbolic link loop (too many levels of symbolic links); fix the link" if err.errno == errno.ELOOP
                   else f"cannot be opened: {err.strerror}")
        raise DataFormatError(path, [(None, f"{problem} (set by {key})")]) from None
    if not stat.S_ISREG(mode):
        what = ("a directory" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
        raise DataFormatError(path, [(None, f"is {what}; corpus files must be regular files (set by {key})")])


def untracked_files(files: list[Path], corpus_dir: str) -> list[Path]:
    """Files outside ``corpus_dir``: DVC does not hash them, so editing them reruns nothing."""
    root = os.path.abspath(corpus_dir)
    return [f for f in files if os.path.commonpath([root, os.path.abspath(f)]) != root]


class BadRowBudget:
    """Skips up to ``max_bad_rows`` malformed rows over the whole corpus, logging each one."""

    def __init__(self, max_bad_rows: int):
        self.max_bad_rows = max_bad_rows
        self.skipped = 0
        self.declined = False  # a row came past the budget: the stage fails
        self.listed: list[str] = []

    def __call__(self, path: str, line: int, problem: str) -> bool:
        if self.skipped >= self.max_bad_rows:
            self.declined = True
            return False
        self.skipped += 1
        where = f"{path}:{line}: {problem}"
        log.warning("%s (row skipped: %d of data.max_bad_rows=%d)", where, self.skipped, self.max_bad_rows)
        if len(self.listed) < MAX_LISTED:
            self.listed.append(where)
        return True


class BlankLines:
    """Counts the blank lines of plain-text files, which are skipped: no text, but no malformed row either."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, path: str, line: int) -> None:
        self.count += 1


def iter_corpus_rows(cfg: DataConfig, files: list[Path], budget: BadRowBudget,
                     blank: Optional[BlankLines] = None) -> Iterator[tuple[str, Optional[str]]]:
    """Every well-formed row of ``files``, streamed in order; the blank lines of plain-text files are
    skipped and counted in ``blank``.

    Past the budget the file's :class:`DataFormatError` is raised as it is (max_bad_rows 0, today's
    error), or, when some rows were allowed, with a line saying the budget ran out.
    """
    for path in files:
        if cfg.source == "text_file":
            rows = ((text, None) for _, text in iter_texts(path, skip_bad=budget,
                                                                 on_blank=blank if blank is not None else BlankLines()))
        else:
            rows = (
                (a, b)
                for _, a, b in iter_pairs(path, cfg.pairs_header, cfg.delimiter, cfg.orig_text_header,
                                          cfg.reply_text_header, skip_bad=budget)
            )
        with budget_message(budget):
            yield from rows


@contextmanager
def budget_message(budget: BadRowBudget) -> Iterator[None]:
    """A file's :class:`DataFormatError` as it is (max_bad_rows 0), or, when some rows were allowed,
    with a line saying the budget ran out."""
    try:
        yield
    except DataFormatError as err:
        if not (budget.max_bad_rows and budget.declined):
            raise
        raise CorpusError(
            f"{err}\n{budget.skipped} malformed rows were skipped before this, the most data.max_bad_rows="
            f"{budget.max_bad_rows} allows: fix the rows above or raise data.max_bad_rows"
        ) from None
