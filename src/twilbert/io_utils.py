"""Filesystem helpers shared by every stage: writes that never leave a half-written file behind."""

from __future__ import annotations

import ctypes
import os
import secrets
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator, Optional, Union

from twilbert.errors import naming

PathLike = Union[str, "os.PathLike[str]"]


@contextmanager
def atomic_write(
    path: PathLike, mode: str = "w", encoding: Optional[str] = "utf-8", newline: Optional[str] = "\n"
) -> Iterator[IO]:
    """Open a temp file beside ``path``; on success fsync it and ``os.replace`` it onto ``path``.

    On any exception the temp file is removed and ``path`` keeps its old content (or stays absent).
    ``mode`` is ``"w"`` (text, UTF-8, ``\\n`` line endings) or ``"wb"``. The parent must exist.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    with naming(path):  # a full disk met by write() names no file: name the one being written
        tmp, fd = _create_temp(path)
        try:
            if mode == "wb":
                handle = os.fdopen(fd, "wb")
            else:
                handle = os.fdopen(fd, "w", encoding=encoding, newline=newline)
            with handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
    _fsync_dir(path.parent)


def replace_dir(new: PathLike, target: PathLike, aside: PathLike) -> None:
    """Publish directory ``new`` at ``target``; a previous ``target`` ends at ``aside`` for the caller
    to delete (all three on one filesystem).

    On Linux the two directories swap in one atomic step (``renameat2(RENAME_EXCHANGE)``), so
    ``target`` always holds a complete directory, old or new. Where that call is missing the old one
    is renamed aside first: ``target`` is then absent, never half-written, between two renames.
    """
    new, target, aside = Path(new), Path(target), Path(aside)
    if not os.path.lexists(target):
        os.rename(new, target)
    elif _exchange(new, target):
        os.rename(new, aside)  # `new` now names the old directory
    else:
        os.rename(target, aside)
        os.rename(new, target)
    _fsync_dir(target.parent)


def _exchange(a: Path, b: Path) -> bool:
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not glibc >= 2.28
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _create_temp(path: Path) -> tuple[Path, int]:
    # os.open with 0o666 honours the umask, unlike mkstemp's 0o600; an existing file keeps its mode.
    mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o666
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        except FileExistsError:
            continue
        if path.exists():
            os.chmod(tmp, mode)
        return tmp, fd


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable on POSIX; not every platform can open a directory.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# A fixed timestamp for zip entries: np.savez stamps each entry with the current time, so the
# same arrays written a second later give different bytes (and a new md5 in dvc.lock).
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def save_npz(path: PathLike, **arrays: "np.ndarray") -> None:
    """``np.savez`` with reproducible bytes: entries in the given order, fixed timestamps, no pickles.

    Read back with ``np.load`` as usual.
    """
    import zipfile

    import numpy as np

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=ZIP_EPOCH)
            info.external_attr = 0o644 << 16
            with zf.open(info, "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.asanyarray(array), allow_pickle=False)
