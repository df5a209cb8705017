"""One writer per checkpoint directory: ``writer.lock`` holds its owner's PID under an ``flock``."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Union

try:
    import fcntl
except ImportError:  # not POSIX: the lock falls back to checking the PID in the file
    fcntl = None  # type: ignore[assignment]

from twilbert.train.checkpoint import TrainingCheckpointError

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]


class CheckpointLockError(TrainingCheckpointError):
    """Another live process writes training checkpoints to the same directory."""


LOCK_FILE = "writer.lock"


@contextmanager
def checkpoint_lock(directory: PathLike, enabled: bool = True) -> Iterator[Optional[Path]]:
    """Hold ``<directory>/writer.lock`` (the owner's PID) while this process writes there.

    A second writer is refused with CheckpointLockError naming the owner's PID. The lock is an
    ``flock`` on the file, which the kernel drops when its owner dies however it dies, so a lock
    file left by a killed run (its PID gone) is simply taken over. The file is removed on release:
    DVC hashes the directory. Without ``fcntl`` (Windows) the PID in the file is checked instead.
    """
    if not enabled:
        yield None
        return
    directory = Path(directory)
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    try:
        fd = _acquire_lock(path)
    except BaseException:
        if created:
            _remove_if_empty(directory)
        raise
    try:
        yield path
    finally:
        try:
            os.unlink(path)  # while still holding it: a waiting writer re-checks the inode
        except FileNotFoundError:
            pass
        os.close(fd)
        if created:  # a run that failed before its first checkpoint leaves nothing behind
            _remove_if_empty(directory)


def _remove_if_empty(directory: Path) -> None:
    try:
        directory.rmdir()
    except OSError:
        pass


def _acquire_lock(path: Path) -> int:
    for _ in range(100):  # retried only when the file is replaced between open() and flock()
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            owner = _read_pid(fd)
            if not _try_flock(fd) or (fcntl is None and owner not in (None, os.getpid()) and _pid_alive(owner)):
                raise CheckpointLockError(
                    f"{path.parent}: another process (PID {owner if owner is not None else '?'}) is writing training "
                    f"checkpoints here; wait for it to finish or stop it (kill {owner}), then rerun"
                )
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if not same:  # its owner removed it as we opened it: lock the new one
                os.close(fd)
                continue
            if owner is not None and owner != os.getpid():
                # The flock is free, so no writer holds it; the PID may still be alive (reused by an
                # unrelated process, or the file came from another machine): do not call it gone then.
                state = ("which is running but does not hold the lock (a stale file: the PID now belongs to "
                         "another process, or the file came from elsewhere)" if _pid_alive(owner) else "which is gone")
                log.warning("%s: taking over the lock of PID %d, %s", path, owner, state)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            os.fsync(fd)
            return fd
        except BaseException:
            try:
                os.close(fd)
            except OSError:
                pass
            raise
    raise CheckpointLockError(f"{path}: could not take the lock (the file keeps being replaced)")


def _try_flock(fd: int) -> bool:
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _read_pid(fd: int) -> Optional[int]:
    text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
