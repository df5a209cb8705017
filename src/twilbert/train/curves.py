"""Training curves as DVC plot files: the points a run logs per optimizer step and per epoch.

``CurveRecorder`` stands in for the MLflow tracker in the training loop: every per-step call is
recorded (with the running accuracies over the epoch's batches so far that the loop logs with it,
``Trainer(running=...)``) and forwarded. Its points travel in the training checkpoints, so a resumed run writes the same
files as an uninterrupted one, and they are written as CSV with a fixed column order (same config
and seed, same bytes).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Mapping, Optional

from twilbert.io_utils import atomic_write

EPOCHS_FILE = "epochs.csv"
STEPS_FILE = "steps.csv"


class CurveRecorder:
    """Records ``(step, metrics)`` points; forwards them to ``tracker`` (None: record only).

    ``prefix``: the loop's metric prefix (``pretrain_loss`` is recorded as ``loss``).
    """

    def __init__(self, tracker: Any = None, prefix: str = ""):
        self.tracker, self.prefix = tracker, prefix
        self.epoch = 0  # the epoch (from 1) the next steps belong to
        self.steps: list[dict] = []
        self.epochs: list[dict] = []

    # the Tracker's interface, as the training loop uses it
    def log_metrics(self, metrics: Mapping[str, float], step: Optional[int] = None) -> None:
        metrics = {k: float(v) for k, v in metrics.items()}
        strip = f"{self.prefix}_" if self.prefix else ""
        point = {"step": int(step or 0), "epoch": self.epoch}
        point.update({k[len(strip):] if strip and k.startswith(strip) else k: v for k, v in metrics.items()})
        self.steps.append(point)
        if self.tracker is not None:
            self.tracker.log_metrics(metrics, step=step)

    def add_epoch(self, epoch: int, step: int, metrics: Mapping[str, float]) -> None:
        self.epochs.append({"epoch": epoch, "step": step, **{k: float(v) for k, v in metrics.items() if k != "epoch"}})
        self.epoch = epoch + 1

    # checkpoints
    def state(self) -> dict:
        return {"steps": list(self.steps), "epochs": list(self.epochs), "epoch": self.epoch}

    def restore(self, state: Optional[Mapping[str, Any]]) -> None:
        if state:
            self.steps, self.epochs = list(state["steps"]), list(state["epochs"])
            self.epoch = state["epoch"]

    def write(self, directory: Path) -> None:
        """``epochs.csv`` and ``steps.csv`` under ``directory`` (atomically)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name, rows in ((EPOCHS_FILE, self.epochs), (STEPS_FILE, self.steps)):
            write_csv(directory / name, rows)


def write_csv(path: Path, rows: list[dict]) -> None:
    """Rows as CSV; the columns in first-seen order, a missing value empty."""
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with atomic_write(path) as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
