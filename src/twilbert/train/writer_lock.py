"""One writer per checkpoint directory: ``writer.lock``, held with ``filelock`` and naming its owner's PID."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Union

from filelock import FileLock, Timeout

from twilbert.train.checkpoint import TrainingCheckpointError

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]


class CheckpointLockError(TrainingCheckpointError):
    """Another live process writes training checkpoints to the same directory."""


LOCK_FILE = "writer.lock"


@contextmanager
def checkpoint_lock(directory: PathLike, enabled: bool = True) -> Iterator[Optional[Path]]:
    """Hold ``<directory>/writer.lock`` while this process writes there; the file holds the owner's PID.

    A second writer is refused with CheckpointLockError naming the owner's PID. The lock is the
    kernel's (``filelock``: an ``flock``), dropped when its owner dies however it dies, so a file left by
    a killed run is simply taken over. The file is removed on release, and a run that failed before
    its first checkpoint leaves no directory behind.
    """
    if not enabled:
        yield None
        return
    directory = Path(directory)
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    lock = FileLock(path, blocking=False)
    try:
        lock.acquire()
    except Timeout:
        owner = _read_pid(path)
        raise CheckpointLockError(
            f"{directory}: another process (PID {owner if owner is not None else '?'}) is writing training "
            f"checkpoints here; wait for it to finish or stop it (kill {owner}), then rerun") from None
    try:
        _record_owner(path)
        yield path
    finally:
        path.unlink(missing_ok=True)  # while still holding it: filelock re-checks the inode it locked
        lock.release()
        if created:
            _remove_if_empty(directory)


def _record_owner(path: Path) -> None:
    previous = _read_pid(path)
    if previous is not None and previous != os.getpid():
        # The lock was free, so no writer holds it; the PID may still be alive (reused by an unrelated
        # process, or the file came from another machine): do not call it gone then.
        state = ("which is running but does not hold the lock (a stale file: the PID now belongs to another "
                 "process, or the file came from elsewhere)" if _pid_alive(previous) else "which is gone")
        log.warning("%s: taking over the lock of PID %d, %s", path, previous, state)
    path.write_text(f"{os.getpid()}\n", encoding="ascii")  # same inode: we hold its lock


def _read_pid(path: Path) -> Optional[int]:
    try:
        text = path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_if_empty(directory: Path) -> None:
    try:
        directory.rmdir()
    except OSError:
        pass
