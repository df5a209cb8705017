"""One folder of training checkpoints per run: ``<stage checkpoints>/run-<identity[:16]>/``.

A run resumes only from its own folder, so two experiments (two identities) can never continue each
other's checkpoints, and going back to a run that is still on disk continues it. Disk stays bounded:
opening a run keeps its folder and the most recently opened other one (``KEEP_RUNS``) and deletes the
rest, each by name in the log. The folder's ``run.json`` records the identity's parts, so a new run
says which of them (config, inputs, code) differ from the run before it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Mapping, Optional, Union

from twilbert.train import distributed

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

RUN_PREFIX = "run-"
RUN_FILE = "run.json"
KEEP_RUNS = 2  # this run and the most recently opened other one, per stage checkpoint directory
# Folders of the layout before run folders (one shared folder per stage; fold-<i> under k-fold): no
# identity says whose they are.
LEGACY_NAMES = ("train_state", "superseded", "fold-")


def run_directory(root: PathLike, fingerprint: str, parts: Optional[Mapping[str, str]] = None,
                  keep_runs: int = KEEP_RUNS) -> Path:
    """``root/run-<fingerprint[:16]>``, this run's checkpoint folder, opened now (rank 0 creates it and
    prunes the others; every rank gets the same path)."""
    root = Path(root)
    directory = root / f"{RUN_PREFIX}{fingerprint[:16]}"
    if distributed.rank() != 0:
        return directory
    if keep_runs < 1:
        raise ValueError(f"keep_runs must be >= 1, got {keep_runs}")
    others = _runs(root, but=directory)
    new = not directory.is_dir()
    directory.mkdir(parents=True, exist_ok=True)
    if new:
        _say_what_changed(directory, others[0] if others else None, parts)
        (directory / RUN_FILE).write_text(json.dumps({"fingerprint": fingerprint, "parts": dict(parts or {})},
                                                     indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.utime(directory)  # opened now: the newest run in the folder's order
    for old in others[keep_runs - 1:]:
        shutil.rmtree(old, ignore_errors=True)
        log.info("deleted the training checkpoints of an older run, %s (a stage keeps the checkpoints of %d runs)",
                 old, keep_runs)
    for old in sorted(root.iterdir()):
        if old.is_dir() and any(old.name == n or (n.endswith("-") and old.name.startswith(n)) for n in LEGACY_NAMES):
            shutil.rmtree(old, ignore_errors=True)
            log.info("deleted %s: training checkpoints of the layout before run folders, whose run is unknown", old)
    return directory


def _runs(root: Path, but: Path) -> list[Path]:
    """The other run folders of ``root``, the most recently opened first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(RUN_PREFIX) and p.is_dir() and p != but]
    return sorted(found, key=lambda p: (p.stat().st_mtime_ns, p.name), reverse=True)


def _say_what_changed(directory: Path, previous: Optional[Path], parts: Optional[Mapping[str, str]]) -> None:
    if previous is None:
        return
    try:
        saved = json.loads((previous / RUN_FILE).read_text(encoding="utf-8")).get("parts") or {}
    except (OSError, ValueError, AttributeError):
        saved = {}
    changed = [name for name in sorted(set(saved) | set(parts or {})) if saved.get(name) != (parts or {}).get(name)]
    what = " and ".join(f"the {name}" for name in changed) if changed and saved else "the run's identity"
    # The normal path of an experiment that changes a param: an info line, not a warning.
    log.info("%s changed since the run of %s: another run, starting fresh in %s", what, previous, directory)
