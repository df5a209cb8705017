"""A stage dies with the `dvc` process that started it: no orphan writers beside the next run's.

A stage started by DVC (which sets ``DVC_STAGE``) ends on SIGTERM when its parent dies
(``prctl(PR_SET_PDEATHSIG)``, Linux), and a watchdog thread ends it within a second of the death of
its nearest ancestor outside the stage's process tree (DVC itself, past ``$SHELL -c`` or ``torchrun``).
A stage run by hand (no ``DVC_STAGE``) is left alone, so ``nohup`` keeps working.

A worker the stage launched itself (``pipeline.workers``, ``WORKER_OF_ENV`` holds the launcher's PID)
dies with that launcher, however it is run: the launcher, not the worker, answers to DVC."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    import psutil

log = logging.getLogger(__name__)

STAGE_ENV = "DVC_STAGE"
# Set by pipeline.workers in the environment of the workers it starts: the PID of their launcher
WORKER_OF_ENV = "TWILBERT_WORKER_OF"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
POLL_S = 1.0


def _process(pid: int) -> Optional["psutil.Process"]:
    """A live process (not a zombie); None when it is gone."""
    import psutil  # only under DVC, which depends on it (a bare device image may lack it)

    try:
        proc = psutil.Process(pid)
        return None if proc.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD) else proc
    except psutil.Error:
        return None


def _in_stage_tree(proc: "psutil.Process") -> bool:
    """Whether ``proc`` was started for this stage (it has DVC_STAGE in its environment)."""
    import psutil

    try:
        return STAGE_ENV in proc.environ()
    except psutil.Error:
        return False


def launcher() -> Optional["psutil.Process"]:
    """The nearest ancestor outside the stage's process tree (DVC)."""
    proc = _process(os.getppid())
    while proc is not None and proc.pid > 1:
        if not _in_stage_tree(proc):
            return proc
        proc = _process(proc.ppid())
    return None


def _set_pdeathsig(sig: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            log.debug("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    except (OSError, AttributeError):  # no libc prctl: the watchdog alone
        pass


def _end_self(sig: int, why: str) -> None:
    log.error("%s; stopping this stage so that no orphan keeps writing its outputs", why)
    os.kill(os.getpid(), sig)


def _watch(watched: Optional["psutil.Process"], ppid: int, sig: int, stop: threading.Event) -> None:
    while not stop.wait(POLL_S):
        if watched is not None:
            if not watched.is_running() or _process(watched.pid) is None:  # gone, or its PID reused
                _end_self(sig, f"the process that started this stage (PID {watched.pid}) is gone")
                return
        elif os.getppid() != ppid:
            _end_self(sig, f"the parent of this stage (PID {ppid}) is gone")
            return


def _die_with_owner(owner: int, sig: int) -> Optional[threading.Event]:
    """A launched worker: end with the launcher (PID ``owner``), its parent, even if it died before
    this worker got here (torch's import takes seconds)."""
    if sys.platform.startswith("linux"):
        _set_pdeathsig(sig)
    if os.getppid() != owner:
        _end_self(sig, f"the stage process that launched this worker (PID {owner}) is gone")
        return None
    stop = threading.Event()
    threading.Thread(target=_watch, args=(None, owner, sig, stop), name="twilbert-lifeline", daemon=True).start()
    return stop


def die_with_launcher(sig: int = signal.SIGTERM) -> Optional[threading.Event]:
    """Under DVC, end this process when the process that started the stage dies; a launched worker,
    when its launcher dies. Returns the watchdog's stop event (None when neither)."""
    owner = os.environ.get(WORKER_OF_ENV)
    if owner and owner.isdigit():
        return _die_with_owner(int(owner), sig)
    if STAGE_ENV not in os.environ:
        return None
    ppid = os.getppid()
    watched = None
    if sys.platform.startswith("linux"):
        _set_pdeathsig(sig)
        watched = launcher()
        if watched is None:  # the walk met init: the launcher died before prctl took effect
            _end_self(sig, "the process that started this stage is gone")
            return None
    stop = threading.Event()
    threading.Thread(target=_watch, args=(watched, ppid, sig, stop), name="twilbert-lifeline",
                     daemon=True).start()
    return stop
