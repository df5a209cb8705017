"""Task definitions -> train/dev/test examples, with the fallbacks benchmark folders need.

- No dev file: a seeded, stratified share of train becomes dev (``dataset.dev_fraction``).
- No test file: dev is reported as test, and the results mark it (``test_is_dev``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np
from sklearn.model_selection import train_test_split

from twilbert.config import TaskConfig
from twilbert.data.formats import TaskExamples, read_task_split

log = logging.getLogger(__name__)


class TaskFilesError(FileNotFoundError):
    """A task listed in params has no usable files."""


@dataclass
class TaskData:
    train: TaskExamples
    dev: TaskExamples
    test: TaskExamples
    dev_from_train: bool
    test_is_dev: bool


def _subset(ex: TaskExamples, idx: np.ndarray) -> TaskExamples:
    pick = lambda seq: None if seq is None else [seq[i] for i in idx]  # noqa: E731
    return replace(ex, ids=pick(ex.ids), texts=pick(ex.texts), aux_texts=pick(ex.aux_texts),
                   labels=pick(ex.labels), line_numbers=pick(ex.line_numbers))


def _stratify_key(task: TaskConfig, labels: list) -> Optional[list]:
    if task.task.regression:
        return None
    keys = ["|".join(map(str, y)) if isinstance(y, (list, tuple)) else y for y in labels]
    counts = {k: keys.count(k) for k in set(keys)}
    return keys if min(counts.values()) >= 2 else None


def load_task(task: TaskConfig, seed: int) -> TaskData:
    ds, spec = task.dataset, task.task
    train_path = ds.path(ds.train_file)
    if train_path is None or not train_path.is_file():
        raise TaskFilesError(
            f"tasks.{task.name}: train file {train_path} not found (dataset.data_dir={ds.data_dir!r}, "
            f"dataset.train_file={ds.train_file!r}); place the task's files there or fix the params"
        )

    def read(path: Path) -> TaskExamples:
        return read_task_split(path, ds, spec.categories or None, spec.multi_label, spec.regression)

    train = read(train_path)
    dev_path, test_path = ds.path(ds.dev_file), ds.path(ds.test_file)
    for key, path in (("dev_file", dev_path), ("test_file", test_path)):
        if path is not None and not path.is_file():
            raise TaskFilesError(f"tasks.{task.name}: dataset.{key} {path} not found (set it to null if the task has none)")
    dev_from_train = dev_path is None
    if dev_from_train:
        idx = np.arange(len(train.texts))
        tr_idx, dev_idx = train_test_split(
            idx, test_size=ds.dev_fraction, random_state=seed, stratify=_stratify_key(task, train.labels)
        )
        train, dev = _subset(train, np.sort(tr_idx)), _subset(train, np.sort(dev_idx))
        log.info("task %s: no dev file; %d train examples held out as dev", task.name, len(dev.texts))
    else:
        dev = read(dev_path)
    test_is_dev = test_path is None
    test = dev if test_is_dev else read(test_path)
    return TaskData(train, dev, test, dev_from_train, test_is_dev)
