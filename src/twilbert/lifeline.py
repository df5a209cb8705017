"""A stage dies with the `dvc` process that started it: no orphan writers beside the next run's.

A stage started by DVC (which sets ``DVC_STAGE``) ends on SIGTERM when its parent dies
(``prctl(PR_SET_PDEATHSIG)``, Linux), and a watchdog thread ends it within a second of the death of
its nearest ancestor outside the stage's process tree (DVC itself, past ``$SHELL -c`` or ``torchrun``).
A stage run by hand (no ``DVC_STAGE``) is left alone, so ``nohup`` keeps working."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

STAGE_ENV = "DVC_STAGE"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
POLL_S = 1.0


def _stat(pid: int) -> Optional[tuple[str, int, int]]:
    """(state, parent pid, start time) of a live process from /proc; None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the name, in parentheses, may hold spaces
    state, ppid, start = fields[0], int(fields[1]), int(fields[19])
    return None if state in ("Z", "X") else (state, ppid, start)


def _in_stage_tree(pid: int) -> bool:
    """Whether ``pid`` was started for this stage (it has DVC_STAGE in its environment)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return any(item.startswith(STAGE_ENV.encode() + b"=") for item in environ.split(b"\0"))


def launcher() -> Optional[tuple[int, int]]:
    """(pid, start time) of the nearest ancestor outside the stage's process tree (DVC), Linux only."""
    pid = os.getppid()
    while pid > 1:
        stat = _stat(pid)
        if stat is None:
            return None
        if not _in_stage_tree(pid):
            return pid, stat[2]
        pid = stat[1]
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


def _watch(pid: int, start: Optional[int], ppid: int, sig: int, stop: threading.Event) -> None:
    while not stop.wait(POLL_S):
        if start is not None:
            stat = _stat(pid)
            if stat is None or stat[2] != start:  # gone (or its PID reused by another process)
                _end_self(sig, f"the process that started this stage (PID {pid}) is gone")
                return
        elif os.getppid() != ppid:
            _end_self(sig, f"the parent of this stage (PID {ppid}) is gone")
            return


def die_with_launcher(sig: int = signal.SIGTERM) -> Optional[threading.Event]:
    """Under DVC, end this process when the process that started the stage dies; returns the
    watchdog's stop event (None when not under DVC)."""
    if STAGE_ENV not in os.environ:
        return None
    ppid = os.getppid()
    watched, start = ppid, None
    if sys.platform.startswith("linux") and _stat(os.getpid()) is not None:  # /proc is readable
        _set_pdeathsig(sig)
        found = launcher()
        if found is None:  # the walk met init: the launcher died before prctl took effect
            _end_self(sig, "the process that started this stage is gone")
            return None
        watched, start = found
    stop = threading.Event()
    threading.Thread(target=_watch, args=(watched, start, ppid, sig, stop), name="twilbert-lifeline",
                     daemon=True).start()
    return stop
