"""What a long run tells its user: one line per epoch (epoch i/N, its metrics, elapsed time and an
ETA for the whole run) and durations written for people (``1m05s``)."""

from __future__ import annotations

import math
import time
from typing import Callable, Mapping, Optional

# Metric names shortened in the epoch line; the files and MLflow keep the full names.
SHORT_NAMES = (("heldout_", "ho_"), ("accuracy", "acc"), ("perplexity", "ppl"), ("official", "off"))


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def short_name(name: str) -> str:
    for long, short in SHORT_NAMES:
        name = name.replace(long, short)
    return name


def format_metrics(metrics: Mapping[str, float], keys: Optional[tuple[str, ...]] = None) -> str:
    shown = keys if keys is not None else tuple(k for k in metrics if k != "epoch")
    return " ".join(f"{short_name(k)} {metrics[k]:.4g}" for k in shown if k in metrics)


class EpochClock:
    """Times the epochs of one run; ``line`` is the run's one log line per epoch.

    The ETA extrapolates the mean time of the epochs run by this process to the epochs left (a
    resumed run counts from where it resumed; early stopping can only make it shorter).
    """

    def __init__(self, total_epochs: int, first_epoch: int = 0, clock: Callable[[], float] = time.monotonic):
        self.total, self.first, self.clock = total_epochs, first_epoch, clock
        self.start = clock()

    def line(self, tag: str, epoch: int, metrics: Mapping[str, float], keys: Optional[tuple[str, ...]] = None) -> str:
        """``epoch`` counts from 1."""
        elapsed = self.clock() - self.start
        done = max(epoch - self.first, 1)
        eta = elapsed / done * max(self.total - epoch, 0)
        return (f"{tag} epoch {epoch}/{self.total}: {format_metrics(metrics, keys)} | "
                f"{format_duration(elapsed)} elapsed, ETA {format_duration(eta)}")
