"""Filesystem helpers shared by every stage: writes that never leave a half-written file or directory
behind (:func:`atomic_write` for a file, :func:`publish_dir` for a directory), and their checksums."""

from __future__ import annotations

import ctypes
import fnmatch
import glob
import hashlib
import json
import os
import secrets
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Iterator, Optional, Union

from twilbert.errors import TwilbertError, naming

if TYPE_CHECKING:
    import numpy as np

PathLike = Union[str, "os.PathLike[str]"]


class OutputPathError(TwilbertError, ValueError):
    """An output path names something that is not ours to replace (a directory, a block device...)."""


# Paths never replaced, only written through: /dev/stdout, /dev/fd/N, /proc/self/fd/N and the devices.
STREAMED_ROOTS = ("/dev/", "/proc/")


def output_kind(path: PathLike) -> str:
    """``"new"`` or ``"regular"`` (replaced atomically), ``"stream"`` (a pipe, FIFO, terminal,
    character device or /dev/stdout: written through); anything else raises OutputPathError."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "new"
    if stat.S_ISFIFO(st.st_mode) or stat.S_ISCHR(st.st_mode) or os.path.abspath(path).startswith(STREAMED_ROOTS):
        return "stream"
    if stat.S_ISREG(st.st_mode):
        return "regular"
    what = ("a directory" if stat.S_ISDIR(st.st_mode) else "a block device" if stat.S_ISBLK(st.st_mode)
            else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
    raise OutputPathError(f"{path}: is {what}; outputs replace regular files only, so write to a new "
                          "or regular file path (or a pipe, e.g. /dev/stdout)")


def _streamed(path: PathLike) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return stat.S_ISFIFO(st.st_mode) or stat.S_ISCHR(st.st_mode) or os.path.abspath(path).startswith(STREAMED_ROOTS)


def command_output(output: PathLike, inputs: tuple[Optional[PathLike], ...] = (),
                   model_dir: Optional[PathLike] = None, flag: str = "--output") -> Path:
    """Where a command (predict, embeddings, export-hf) writes ``output``: a symlink's target, so that
    the atomic replace swaps the target's bytes and the link stays a link (a stream path, such as a
    FIFO or /dev/stdout, as given). Refused in one line when it is one of ``inputs`` (``-`` is stdin)
    or lies in ``model_dir``: writing there would destroy what the command reads.
    """
    if _streamed(output):
        return Path(output)
    target = os.path.realpath(output)
    for source in inputs:
        if source is None or os.fspath(source) == "-":
            continue
        same = os.path.realpath(source) == target
        try:
            same = same or os.path.samefile(source, target)  # a hard link is the same file too
        except OSError:
            pass
        if same:
            raise OutputPathError(f"{flag} {output}: is the input file {source}; writing it would replace what is "
                                  f"being read, so choose another {flag}")
    if model_dir is not None:
        model = os.path.realpath(model_dir)
        if target == model or target.startswith(model.rstrip(os.sep) + os.sep):
            raise OutputPathError(f"{flag} {output}: lies in the model directory {model_dir}; its files are checksummed "
                                  f"and read by the command, so write {flag} elsewhere")
    return Path(target)


@contextmanager
def atomic_write(
    path: PathLike, mode: str = "w", encoding: Optional[str] = "utf-8", newline: Optional[str] = "\n"
) -> Iterator[IO]:
    """Open a temp file beside ``path``; on success fsync it and ``os.replace`` it onto ``path``.

    On any exception the temp file is removed and ``path`` keeps its old content (or stays absent).
    ``mode`` is ``"w"`` (text, UTF-8, ``\\n`` line endings) or ``"wb"``. The parent must exist.
    A pipe, FIFO, terminal or character device (``/dev/stdout``, ``/dev/null``) is written through,
    never replaced; a path that is none of these nor a regular file is refused (:func:`output_kind`).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    with naming(path):  # a full disk met by write() names no file: name the one being written
        if output_kind(path) == "stream":
            # no temp file: replacing a device or a pipe would put a regular file in its place
            with open(path, mode, **({} if mode == "wb" else {"encoding": encoding, "newline": newline})) as handle:
                yield handle
            return
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
    fsync_path(path.parent)


CHECKSUMS_NAME = "checksums.json"
_PUBLISH_TAG = ".publish-"  # work folders are ``.<name>.publish-<random>`` beside the target
_PREVIOUS = "previous"  # inside a work folder: the old target, only during the no-exchange swap


@contextmanager
def publish_dir(target: PathLike, checksums: bool = False) -> Iterator[Path]:
    """Yield an empty staging directory named like ``target``; on success it replaces ``target``.

    The staging directory sits in ``.<name>.publish-<random>/`` beside ``target``. When the block
    succeeds, ``checksums.json`` is written (if asked), every file and directory is fsynced, and the
    two directories swap in one atomic step (``renameat2(RENAME_EXCHANGE)``): a crash at any point
    leaves the old complete ``target`` or the new one. On failure ``target`` is untouched. Work
    folders left by a killed publish are removed (or their old ``target`` restored) by the next one.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(target.parent, glob.escape(target.name))
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}{_PUBLISH_TAG}", dir=target.parent))
    try:
        with naming(target):  # a full disk met by write() names no file: name the output
            staged = work / target.name
            staged.mkdir()
            yield staged
            if checksums:
                write_checksums(staged)
            fsync_tree(staged)
            _swap(staged, target, work / _PREVIOUS)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def publish_built(built: PathLike, target: PathLike, checksums: bool = False) -> None:
    """:func:`publish_dir` for a directory already complete at ``built`` (same filesystem)."""
    with publish_dir(target, checksums=checksums) as staged:
        os.replace(built, staged)  # onto the empty staging directory


def _swap(staged: Path, target: Path, aside: Path) -> None:
    if not os.path.lexists(target):
        os.rename(staged, target)
    elif not _exchange(staged, target):
        # No atomic exchange (not glibc >= 2.28, or the filesystem refuses it): ``target`` is absent
        # between these two renames; a crash there is repaired by the next publish's clean_leftovers.
        os.rename(target, aside)
        try:
            os.rename(staged, target)
        except BaseException:
            os.rename(aside, target)
            raise
    fsync_path(target.parent)


def clean_leftovers(parent: PathLike, pattern: str = "*") -> None:
    """Remove the work folders a killed publish left in ``parent`` for targets matching ``pattern``.

    A target found missing beside its work folder's ``previous`` (a kill between the two renames of
    the no-exchange swap) gets that previous, complete, directory back.
    """
    parent = Path(parent)
    if not parent.is_dir():
        return
    for work in sorted(parent.glob(f".{pattern}{_PUBLISH_TAG}*")):
        name = work.name[1:work.name.rindex(_PUBLISH_TAG)]
        if not work.is_dir() or not fnmatch.fnmatchcase(name, pattern):
            continue
        target = parent / name
        if not os.path.lexists(target) and (work / _PREVIOUS).is_dir():
            os.rename(work / _PREVIOUS, target)
            fsync_path(parent)
        shutil.rmtree(work, ignore_errors=True)


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
    # Read-write: the corpus writer cuts late-found duplicates from its own file before publishing it.
    mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o666
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)
        except FileExistsError:
            continue
        if path.exists():
            os.chmod(tmp, mode)
        return tmp, fd


def fsync_path(path: PathLike) -> None:
    """fsync a file (a failure raises: its bytes may not be on disk) or a directory (best effort:
    not every platform can open or fsync one)."""
    is_dir = os.path.isdir(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if is_dir:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not is_dir:
            raise
    finally:
        os.close(fd)


def fsync_tree(root: PathLike) -> None:
    """fsync every file and directory under ``root`` (deepest first), ``root`` included."""
    root = Path(root)
    for path in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if not path.is_symlink():
            fsync_path(path)
    fsync_path(root)


def sha256_file(path: PathLike) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def link_or_copy(src: PathLike, dst: PathLike) -> None:
    """Hard-link ``src`` at ``dst`` (no bytes copied), or copy it where links are refused."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def checksums_text(directory: PathLike) -> str:
    """``checksums.json`` for ``directory`` as it is now: the sha256 of every file below it (relative
    POSIX paths, sorted; its own checksums.json left out, those of subdirectories listed)."""
    directory = Path(directory)
    sums = {name: sha256_file(directory / name) for name in checksummed_files(directory)}
    return json.dumps(sums, indent=2, sort_keys=True) + "\n"


def checksummed_files(directory: PathLike) -> list[str]:
    directory = Path(directory)
    names = [p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()]
    return sorted(name for name in names if name != CHECKSUMS_NAME)


def verify_checksums(directory: PathLike, error: type[Exception], advice: str = "",
                     required: tuple[str, ...] = ()) -> dict[str, str]:
    """Raise ``error`` naming the file unless every file ``directory/checksums.json`` lists is present
    with its sha256 (and every ``required`` name is listed); returns the listed sums.

    The one check of the model directories' manifests and the training checkpoints' alike.
    """
    directory = Path(directory)
    path = directory / CHECKSUMS_NAME
    tail = f"; {advice}" if advice else ""
    if os.path.lexists(path) and not path.is_file():  # present but no file: damage, not an absent manifest
        raise error(f"{path}: not a regular file (a directory or a broken link?){tail}")
    try:
        sums = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: missing (an incomplete directory){tail}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise error(f"{path}: unreadable ({err}){tail}") from None
    if not isinstance(sums, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in sums.items()):
        raise error(f"{path}: corrupted (expected a JSON object of sha256 strings){tail}")
    unlisted = [name for name in required if name not in sums]
    if unlisted:
        raise error(f"{path}: does not list {unlisted}{tail}")
    for name in sorted(sums):
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise error(f"{path}: entry {name!r} points outside {directory}{tail}")
        file = directory / name
        if not file.is_file():
            raise error(f"{file}: missing, but listed in {path}{tail}")
        if sha256_file(file) != sums[name]:
            raise error(f"{file}: sha256 differs from {path} (corrupt or changed){tail}")
    return sums


def write_checksums(directory: PathLike) -> Path:
    """(Re)write ``directory/checksums.json``; call it after the last file is written."""
    path = Path(directory) / CHECKSUMS_NAME
    text = checksums_text(directory)
    # Atomic replace, never an in-place write: the old file may be a hard link to another directory's.
    with atomic_write(path) as fh:
        fh.write(text)
    return path


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
