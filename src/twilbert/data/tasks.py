"""Task files -> train/dev/test examples, with the fallbacks benchmark folders need.

No dev file: a seeded, stratified share of train becomes dev (``dataset.dev_fraction``). No test file:
``finetuning.no_test_protocol`` ``carve_dev`` (default) selects on dev carved from train and reports the
dev file as test; ``dev_as_test`` (TWilBert's) selects on the dev file and reports it as test (marked †).
Strata: class; label set (multi-label, rare sets pooled); quantile bins (regression); else random, logged."""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from twilbert.config import TaskConfig
from twilbert.data.formats import PathLike, Problems, has_printable, parse_table
from twilbert.errors import TwilbertError

log = logging.getLogger(__name__)


class TaskFilesError(TwilbertError, FileNotFoundError):
    """A task listed in params has no usable files."""


@dataclass
class TaskExamples:
    """One split of a finetuning task. ``labels`` are class indices (list[int]), 0/1 indicator
    vectors (list[list[int]], multi-label) or floats (regression)."""

    path: str
    ids: list[str]
    texts: list[str]
    labels: list[Any]
    aux_texts: Optional[list[str]] = None
    line_numbers: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)


def read_task_split(
    path: PathLike,
    ds: Any,
    categories: Optional[Mapping[str, int]],
    multi_label: bool = False,
    regression: bool = False,
) -> TaskExamples:
    """Read one split of a task described by a ``TaskDataset`` (headers, delimiter).

    Classification: each CLASS field (surrounding whitespace ignored) must be a key of ``categories``.
    Multi-label: CLASS is ``'|'``-separated 0/1 flags, flag i meaning the category with index i; the
    width must equal ``len(categories)``, or, with no categories, the width of the first row.
    Regression: CLASS is a finite float. Texts are kept exactly as written.
    """
    if multi_label and regression:
        raise ValueError("a task cannot be both multi_label and regression")
    if not (multi_label or regression) and not categories:
        raise ValueError(f"{path}: a classification task needs categories (label -> index)")
    required = [ds.id_header, ds.text_header, ds.class_header] + ([ds.aux_header] if ds.aux_header else [])
    problems = Problems(path)
    hint = "; set the task's dataset id_header/text_header/class_header/aux_header to the file's names"
    table = parse_table(path, required, ds.delimiter, True, None, (), None, hint, problems)
    if not problems.total and not len(table):
        problems.add(None, "no examples (the file has only a header)")

    # a text of NULs or controls alone (a binary file's row) would train as an empty text: refused, as
    # the corpus reader drops it (blank texts are already an "empty field")
    for header in (ds.text_header, ds.aux_header):
        for i, text in enumerate(table.columns.get(header, []) if header else []):
            if text.strip() and not has_printable(text):
                problems.add(table.line_numbers[i], f"{header!r} field has no printable character (only NULs, "
                             "controls or format marks; a binary file?)")
    raw = table.columns.get(ds.class_header, [])
    if regression:
        labels, bad = _parse_floats(raw)
    elif multi_label:
        labels, bad = _parse_flags(raw, len(categories) if categories else None, categories)
    else:
        labels, bad = _parse_classes(raw, categories)
    for i, problem in bad:
        problems.add(table.line_numbers[i], problem)
    problems.raise_if_any()
    aux = table.columns[ds.aux_header] if ds.aux_header else None
    return TaskExamples(
        path=str(path),
        ids=table.columns[ds.id_header],
        texts=table.columns[ds.text_header],
        labels=labels,
        aux_texts=aux,
        line_numbers=table.line_numbers,
    )


def _parse_classes(raw: list[str], categories: Mapping[str, int]) -> tuple[list[int], list[tuple[int, str]]]:
    labels, bad = [], []
    for i, value in enumerate(raw):
        index = categories.get(value.strip())
        if index is None:
            known = ", ".join(repr(k) for k in list(categories)[:30])
            bad.append((i, f"unknown label {value.strip()!r} (known: {known})"))
            index = -1
        labels.append(index)
    return labels, bad


def _parse_flags(
    raw: list[str], width: Optional[int], categories: Optional[Mapping[str, int]]
) -> tuple[list[list[int]], list[tuple[int, str]]]:
    labels, bad = [], []
    for i, value in enumerate(raw):
        parts = value.strip().split("|")
        if any(p not in ("0", "1") for p in parts):
            bad.append((i, f"multi-label value {value.strip()!r} must be '|'-separated 0/1 flags, e.g. '0|1|0'"))
            labels.append([])
            continue
        if width is None:
            width = len(parts)
        if len(parts) != width:
            names = f" (one per category: {', '.join(categories)})" if categories else " (as in the first row)"
            bad.append((i, f"multi-label value {value.strip()!r} has {len(parts)} flags, expected {width}{names}"))
        labels.append([int(p) for p in parts])
    return labels, bad


def _parse_floats(raw: list[str]) -> tuple[list[float], list[tuple[int, str]]]:
    labels, bad = [], []
    for i, value in enumerate(raw):
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not math.isfinite(number):
            bad.append((i, f"regression label {value.strip()!r} is not a finite number"))
        labels.append(number)
    return labels, bad


@dataclass
class TaskData:
    train: TaskExamples
    dev: TaskExamples
    test: TaskExamples
    dev_from_train: bool
    test_is_dev: bool
    protocol: str = "test_file"  # test_file | carve_dev | dev_as_test (how test and dev were obtained)
    test_from_train: bool = False
    # ids repeated in a file or shared by two (possible leakage), one sentence each with its counts:
    # logged, and kept in each run's metrics.json (``warnings``)
    id_warnings: list[str] = field(default_factory=list)


NO_TEST_PROTOCOLS = ("carve_dev", "dev_as_test")


def _some(ids: list[str], shown: int = 3) -> str:
    return ", ".join(repr(i[:40]) for i in ids[:shown]) + (", ..." if len(ids) > shown else "")


def id_gaps(files: Mapping[str, TaskExamples]) -> list[str]:
    """The task files' id problems, one sentence each with its counts: ids repeated within a file, and
    ids shared by two files (a test example also in train inflates the test score). Ids compare
    without surrounding whitespace. No problem, no sentence."""
    out: list[str] = []
    ids = {name: [i.strip() for i in ex.ids] for name, ex in files.items()}
    for name, values in ids.items():
        counts = Counter(values)
        repeated = [i for i, c in counts.items() if c > 1]
        if repeated:
            rows = sum(counts[i] for i in repeated)
            out.append(f"duplicate ids in {name}: {len(repeated)} id(s) on {rows} rows (e.g. {_some(repeated)})")
    names = list(ids)
    for at, a in enumerate(names):
        for b in names[at + 1:]:
            shared = sorted(set(ids[a]) & set(ids[b]))
            if shared:
                out.append(f"ids shared by {a} and {b}: {len(shared)} (possible leakage; e.g. {_some(shared)})")
    return out


def _subset(ex: TaskExamples, idx: np.ndarray) -> TaskExamples:
    pick = lambda seq: None if seq is None else [seq[i] for i in idx]  # noqa: E731
    return replace(ex, ids=pick(ex.ids), texts=pick(ex.texts), aux_texts=pick(ex.aux_texts),
                   labels=pick(ex.labels), line_numbers=pick(ex.line_numbers))


def _pool_rare(keys: list, n_held: int) -> Optional[list]:
    """``keys`` with those seen once pooled into one stratum; None if no stratified split of
    ``n_held`` (and the rest) can have every stratum on both sides."""
    counts = Counter(keys)
    keys = [k if counts[k] >= 2 else "<rare>" for k in keys]
    counts = Counter(keys)
    n_strata = len(counts)
    if min(counts.values()) < 2 or n_strata > n_held or n_strata > len(keys) - n_held:
        return None
    return keys


def _multi_label_keys(labels: list) -> list:
    """Each example's rarest present label (or 'none'): strata for when label sets are too many."""
    flags = np.asarray(labels)
    freq = flags.sum(axis=0)
    keys = []
    for row in flags:
        present = np.flatnonzero(row)
        keys.append(str(present[np.argmin(freq[present])]) if len(present) else "none")
    return keys


def _regression_keys(values: list, n_held: int) -> list:
    """Quantile bins of the target: as many as the held-out share can hold, at most 10."""
    y = np.asarray(values, dtype=np.float64)
    n_bins = max(1, min(10, n_held, len(y) - n_held))
    edges = np.quantile(y, np.linspace(0, 1, n_bins + 1)[1:-1])
    return [str(b) for b in np.searchsorted(edges, y, side="right")]


def _stratify_key(task: TaskConfig, labels: list, n_held: int) -> Optional[list]:
    """Strata for a held-out share of ``n_held`` examples, falling back as the module doc says."""
    if task.task.regression:
        candidates = [_regression_keys(labels, n_held)]
    elif task.task.multi_label:
        candidates = [["|".join(map(str, y)) for y in labels], _multi_label_keys(labels)]
    else:
        candidates = [list(labels)]
    for keys in candidates:
        pooled = _pool_rare(keys, n_held)
        if pooled is not None:
            return pooled
    log.warning("task %s: too few examples per label to stratify; the held-out split is random", task.name)
    return None


def carve(task: TaskConfig, ex: TaskExamples, fraction: float, seed: int) -> tuple[TaskExamples, TaskExamples]:
    """(rest, held out): a seeded, stratified ``fraction`` of ``ex``, both in file order."""
    n = len(ex.texts)
    n_held = int(np.ceil(fraction * n))  # what train_test_split holds out
    if n_held < 1 or n_held >= n:
        raise TaskFilesError(f"tasks.{task.name}: {n} training examples cannot spare dataset.dev_fraction="
                             f"{fraction} of them for a held-out split; add examples or a dev file")
    from sklearn.model_selection import train_test_split  # not for the data stage's task check (pandas too)

    idx = np.arange(n)
    rest, held = train_test_split(idx, test_size=n_held, random_state=seed,
                                  stratify=_stratify_key(task, ex.labels, n_held))
    return _subset(ex, np.sort(rest)), _subset(ex, np.sort(held))


def load_task(task: TaskConfig, seed: int, no_test_protocol: str = "carve_dev") -> TaskData:
    """The task's splits; ``no_test_protocol`` applies when it ships no test file (module doc)."""
    if no_test_protocol not in NO_TEST_PROTOCOLS:
        raise ValueError(f"no_test_protocol must be one of {NO_TEST_PROTOCOLS}, got {no_test_protocol!r}")
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
    files = {"train": train}  # each file as read, by its key: what id_gaps checks
    dev_path, test_path = ds.path(ds.dev_file), ds.path(ds.test_file)
    for key, path in (("dev_file", dev_path), ("test_file", test_path)):
        if path is not None and not path.is_file():
            raise TaskFilesError(f"tasks.{task.name}: dataset.{key} {path} not found (set it to null if the task has none)")
    if test_path is not None:
        test, protocol, test_from_train = read(test_path), "test_file", False
        files["test"] = test
    elif no_test_protocol == "dev_as_test":
        test, protocol, test_from_train = None, "dev_as_test", False
    elif dev_path is not None:
        test, protocol, test_from_train = read(dev_path), "carve_dev", False
        files["dev"] = test
        dev_path = None  # the dev file is the test now: carve dev from train below
        log.info("task %s: no test file; the dev file is the test, dev is carved from train "
                 "(finetuning.no_test_protocol: carve_dev)", task.name)
    else:
        train, test = carve(task, train, ds.dev_fraction, seed)
        protocol, test_from_train = "carve_dev", True
        log.info("task %s: no dev or test file; %d train examples held out as test", task.name, len(test.texts))
    dev_from_train = dev_path is None
    if dev_from_train:
        train, dev = carve(task, train, ds.dev_fraction, seed)
        log.info("task %s: %d train examples held out as dev", task.name, len(dev.texts))
    else:
        dev = files["dev"] = read(dev_path)
    test_is_dev = test is None
    gaps = id_gaps(dict(sorted(files.items(), key=lambda kv: ("train", "dev", "test").index(kv[0]))))
    for text in gaps:
        log.warning("task %s: %s", task.name, text)
    return TaskData(train, dev, dev if test_is_dev else test, dev_from_train, test_is_dev, protocol, test_from_train,
                    gaps)


def check_config_tasks(cfg: Any, default_dir: Path, default_pending: bool = False) -> None:
    """:func:`check_tasks` on a loaded ``Config`` (its tasks, seed, protocols and data source)."""
    protocols = {name: task.finetuning_config(cfg.finetuning).no_test_protocol for name, task in cfg.tasks.items()}
    check_tasks(cfg.tasks, cfg.seed, protocols, cfg.data.source, default_dir, default_pending)


def check_tasks(tasks: Mapping[str, TaskConfig], seed: int, protocols: Mapping[str, str], data_source: str,
                default_dir: Path, default_pending: bool = False) -> None:
    """Every task's files, read and checked, before a stage spends time: a missing or malformed file
    raises :class:`TaskFilesError` naming the task and the file.

    ``default_dir``: where the data stage writes the default task, which exists only with
    ``data.source: evomsa``; ``default_pending``: it is about to be written (the data stage), so its
    files are not read yet. ``protocols``: each task's ``finetuning.no_test_protocol``.
    """
    quiet = log.level
    log.setLevel(logging.WARNING)  # the splits' own notes ("held out as dev") belong to finetuning's log
    try:
        for name, task in tasks.items():
            ds = task.dataset
            if Path(ds.data_dir).resolve() == Path(default_dir).resolve():
                if data_source != "evomsa":
                    raise TaskFilesError(
                        f"tasks.{name}: {ds.path(ds.train_file)} is the default task, which the data stage writes only "
                        f"with data.source: evomsa (data.source is {data_source}); remove the task from conf/config.yaml's "
                        "defaults, or point its dataset.data_dir at your own task files")
                if default_pending:
                    continue
            try:
                load_task(task, seed, protocols.get(name, "carve_dev"))
            except TaskFilesError:
                raise
            except (OSError, ValueError) as err:
                raise TaskFilesError(f"tasks.{name}: {err}") from None
    finally:
        log.setLevel(quiet)
