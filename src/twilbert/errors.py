"""What a user sees when a stage or command fails for an expected reason: one ``error:`` line, exit 2.

Expected failures are the project's own errors (bad config, data, model directory, task files,
tracking store...) and the operating system's refusals (full disk, permission denied, missing
file, read-only file system). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import os
import re
import sys
from contextlib import contextmanager
from typing import Iterator, Optional, Union

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C

# errno -> what to do about it
OS_ADVICE = {
    errno.ENOSPC: "no space left on the device: free disk space and rerun (finished outputs are intact)",
    errno.EDQUOT: "disk quota exceeded: free space and rerun (finished outputs are intact)",
    errno.EFBIG: "file too large for this file system: write the outputs elsewhere",
    errno.EACCES: "permission denied: give this user access to it, or use another path",
    errno.EPERM: "operation not permitted: give this user access to it, or use another path",
    errno.EROFS: "read-only file system: write the outputs to a writable location",
    errno.ENOENT: "no such file or directory: check the path, or run the stage that writes it first",
    errno.ENOTDIR: "a part of the path is not a directory: check the path",
    errno.EISDIR: "is a directory where a file was expected: check the path",
    errno.ENAMETOOLONG: "file name too long: use a shorter path",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n) and rerun",
    errno.ELOOP: "a symbolic link loop (too many levels of symbolic links): fix the link",
}


class TwilbertError(Exception):
    """An expected failure of the project's own (bad config, data, model directory, task files, tracking
    store...): reported as its one-line message, without a traceback. Every error class of the package
    derives from it, beside the code that raises it."""


def one_line(text: str) -> str:
    """A multi-line message (e.g. several ``file:line`` problems) joined into one line."""
    return "; ".join(line.strip() for line in str(text).splitlines() if line.strip())


def user_message(err: BaseException) -> Optional[str]:
    """The one-line message for an expected failure; None for a bug (the traceback is wanted then)."""
    if isinstance(err, OSError) and err.errno in OS_ADVICE:
        paths = [p for p in (err.filename, err.filename2) if p is not None]
        where = " -> ".join(os.fsdecode(p) for p in paths)
        if not where:  # a write through an open file handle: name what was running instead
            where = "while running " + " ".join(sys.argv)
        return f"{where}: {OS_ADVICE[err.errno]}"
    if isinstance(err, (FileNotFoundError, TwilbertError)):
        return one_line(str(err))
    return None


STAGE_RESUME = ("rerun the same command (or `dvc repro`) to go on: training resumes from its last checkpoint, "
                "pairs after its last shard")


def interrupted_line(what: str, resume: str = STAGE_RESUME) -> str:
    """The one line for a Ctrl-C: what stopped, that finished outputs are intact, how to go on."""
    return f"interrupted: {what} stopped (Ctrl-C); outputs already written are intact; {resume}"


@contextmanager
def naming(path: Union[str, "os.PathLike[str]"]) -> Iterator[None]:
    """Give an OSError raised inside the block ``path`` as its file name when it has none
    (a full disk met by ``write()`` on an open handle names no file)."""
    try:
        yield
    except OSError as err:
        if err.filename is None and err.errno is not None:
            err.filename = os.fspath(path)
        raise


_LIBRARY_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how Rust's io::Error (safetensors) ends its message


@contextmanager
def library_os_errors(path: Union[str, "os.PathLike[str]"]) -> Iterator[None]:
    """Re-raise a library's wrapped operating-system failure (safetensors' ``SafetensorError: ... No
    space left on device (os error 28)``) as the OSError it is, naming ``path``: one ``error:`` line."""
    try:
        yield
    except OSError:
        raise
    except Exception as err:
        found = _LIBRARY_OS_ERROR.search(str(err))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), os.fspath(path)) from err
