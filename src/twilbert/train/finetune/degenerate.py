"""Runs whose score says little: a classifier that predicts one class for every test example, or a
training set with too few examples per class to learn from. Such a run still gets its numbers; the
finetune log warns and the results tables mark its row (``warnings`` in its ``metrics.json``)."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Optional, Sequence

import numpy as np

from twilbert.config import TaskSpec
from twilbert.evaluation.predictions import Predictions

log = logging.getLogger(__name__)

MIN_PER_CLASS = 5  # train examples of a class below which a classifier has little to learn from
MIN_MEAN_PER_CLASS = 10  # train examples per class, on average, below which the whole set is too small


def run_warnings(spec: TaskSpec, train_labels: Sequence, test: Optional[Predictions]) -> list[str]:
    """What makes a run's score say little, one sentence each (none for a sound run)."""
    out: list[str] = []
    if spec.regression:
        return out
    names = {index: name for name, index in spec.categories.items()}
    if not spec.multi_label and names:
        counts = Counter(int(label) for label in train_labels)
        rare = [f"{names[i]} {counts.get(i, 0)}" for i in sorted(names) if counts.get(i, 0) < MIN_PER_CLASS]
        if len(train_labels) < MIN_MEAN_PER_CLASS * len(names):
            out.append(f"small training set: {len(train_labels)} examples for {len(names)} classes "
                       f"(fewer than {MIN_MEAN_PER_CLASS} a class)")
        elif rare:
            out.append(f"classes with fewer than {MIN_PER_CLASS} training examples: {', '.join(rare)}")
    if test is not None and len(test.pred) > 1:
        rows = np.asarray(test.pred).reshape(len(test.pred), -1)
        if (rows == rows[0]).all():
            what = names.get(int(rows[0][0]), str(rows[0][0])) if not spec.multi_label else "the same label set"
            out.append(f"predicts a single class on test ({what} for all {len(test.pred)} examples)")
    return out


def warn(task: str, model: str, warnings: Sequence[str]) -> None:
    for text in warnings:
        log.warning("%s (%s): %s; its score says little (marked ⚠ in the results tables)", task, model, text)
