"""A run's per-example test predictions, ``predictions.tsv`` beside its ``metrics.json``: what makes
comparisons between models paired (the same test examples) and what error analysis reads.

One line per test example under the header ``id\\tgold\\tpred``: the example's id as in the task
file; labels by category name (multi-label: the names joined by ``|``, empty for none; regression:
the value as Python's ``repr`` of the float, which reads back exactly).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from twilbert.config import TaskSpec
from twilbert.errors import TwilbertError
from twilbert.io_utils import atomic_write

FILE = "predictions.tsv"
HEADER = ("id", "gold", "pred")
SEP = "|"  # between the names of a multi-label example


class PredictionsFileError(TwilbertError, ValueError):
    """A predictions file is malformed, or two do not cover the same test examples; the message names it."""


@dataclass
class Predictions:
    """One run's test predictions in the task's label encoding: class indices (N,), 0/1 flags (N, C)
    or values (N,); ``spec`` says which and names the classes."""

    ids: list[str]
    gold: np.ndarray
    pred: np.ndarray
    spec: TaskSpec

    def __post_init__(self) -> None:
        if not (len(self.ids) == len(self.gold) == len(self.pred)):
            raise ValueError(f"{len(self.ids)} ids, {len(self.gold)} gold labels and {len(self.pred)} predictions")

    def scores(self) -> dict[str, float]:
        """The task's metrics (its official one under ``official``), as the finetune run reported them."""
        from twilbert.evaluation.metrics import evaluate_predictions  # scikit-learn and scipy: only when scoring

        return evaluate_predictions(self.spec, self.gold, self.pred)


def _names(spec: TaskSpec) -> list[str]:
    return [name for name, _ in sorted(spec.categories.items(), key=lambda kv: kv[1])]


def _encode(spec: TaskSpec, value) -> str:
    if spec.regression:
        return repr(float(value))
    names = _names(spec)
    if spec.multi_label:
        return SEP.join(names[i] for i, on in enumerate(value) if on)
    return names[int(value)]


def format_predictions(preds: Predictions) -> str:
    lines = ["\t".join(HEADER)]
    for id_, gold, pred in zip(preds.ids, preds.gold, preds.pred):
        if "\t" in id_ or "\n" in id_:
            raise ValueError(f"test id {id_!r} holds a tab or a newline; it cannot be written to {FILE}")
        lines.append(f"{id_}\t{_encode(preds.spec, gold)}\t{_encode(preds.spec, pred)}")
    return "\n".join(lines) + "\n"


def write_predictions(path: Path, preds: Predictions) -> None:
    with atomic_write(path) as fh:
        fh.write(format_predictions(preds))


def _decode(spec: TaskSpec, text: str, where: str, column: str):
    if spec.regression:
        try:
            value = float(text)
        except ValueError:
            raise PredictionsFileError(f"{where}: {column} {text!r} is not a number") from None
        if not np.isfinite(value):
            raise PredictionsFileError(f"{where}: {column} {text!r} is not a finite number")
        return value
    names = (text.split(SEP) if text else []) if spec.multi_label else [text]
    unknown = [name for name in names if name not in spec.categories]
    if unknown:
        raise PredictionsFileError(f"{where}: {column} {unknown[0]!r} is not a category of the task "
                                   f"({', '.join(_names(spec))})")
    if spec.multi_label:
        flags = [0] * len(spec.categories)
        for name in names:
            flags[spec.categories[name]] = 1
        return flags
    return spec.categories[text]


def parse_predictions(text: str, spec: TaskSpec, source: Union[str, Path] = FILE) -> Predictions:
    """A predictions file's text read back; ``source`` names it in errors (``file:line: problem``)."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines or tuple(lines[0].split("\t")) != HEADER:
        got = repr(lines[0]) if lines else "an empty file"
        raise PredictionsFileError(f"{source}:1: expected the header {chr(9).join(HEADER)!r}, got {got}")
    ids, gold, pred = [], [], []
    for number, line in enumerate(lines[1:], start=2):
        where = f"{source}:{number}"
        fields = line.split("\t")
        if len(fields) != 3:
            raise PredictionsFileError(f"{where}: expected 3 tab-separated fields (id, gold, pred), got {len(fields)}")
        ids.append(fields[0])
        gold.append(_decode(spec, fields[1], where, "gold"))
        pred.append(_decode(spec, fields[2], where, "pred"))
    dtype = np.float64 if spec.regression else np.int64
    width = (len(spec.categories),) if spec.multi_label else ()
    return Predictions(ids, np.asarray(gold, dtype=dtype).reshape(-1, *width),
                       np.asarray(pred, dtype=dtype).reshape(-1, *width), spec)


def read_predictions(path: Path, spec: TaskSpec) -> Predictions:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise PredictionsFileError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    return parse_predictions(text, spec, path)


def aligned(runs: Sequence[Predictions], names: Optional[Sequence[str]] = None) -> tuple[np.ndarray, list[np.ndarray]]:
    """The shared gold labels and each run's predictions, after checking that every run holds the
    same test ids in the same order with the same gold labels; ``names`` say which run is which."""
    if not runs:
        raise PredictionsFileError("no predictions to compare")
    names = list(names) if names is not None else [f"run {i}" for i in range(len(runs))]
    first = runs[0]
    for name, run in zip(names[1:], runs[1:]):
        if run.ids != first.ids:
            missing = sorted(set(first.ids) - set(run.ids))[:3]
            extra = sorted(set(run.ids) - set(first.ids))[:3]
            detail = (f"{len(run.ids)} ids against {len(first.ids)}; missing {missing}, extra {extra}"
                      if missing or extra else "the same ids in another order")
            raise PredictionsFileError(f"{name} and {names[0]} are not on the same test examples ({detail}): "
                                       "rerun both on the same test file to compare them")
        if not np.array_equal(run.gold, first.gold):
            row = int(np.flatnonzero(np.any((run.gold != first.gold).reshape(len(run.ids), -1), axis=1))[0])
            raise PredictionsFileError(f"{name} and {names[0]} disagree on the gold label of test id "
                                       f"{first.ids[row]!r}: the test file changed between them")
    return first.gold, [run.pred for run in runs]
