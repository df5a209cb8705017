"""Δ rows: a model's mean official test score minus another's on the same task, with the 95% interval
of a paired bootstrap over the test examples that also resamples each side's runs
(:func:`twilbert.reports.stats.paired_delta`), read from the runs' ``predictions.tsv``.

Every run's predictions take part: a run without its file is refused, naming it, never left out (a Δ
over two of three runs would read as the Δ over three)."""

from __future__ import annotations

from typing import Mapping, Optional

from twilbert.config import TaskSpec
from twilbert.evaluation.predictions import FILE as PREDICTIONS_FILE
from twilbert.evaluation.predictions import Predictions, aligned, read_predictions
from twilbert.reports.results import PRIMARY_FILE, TFIDF_ROW, MetricsFileError, by_task
from twilbert.reports.stats import Delta, paired_delta


def _where(run: dict) -> str:
    return f"{run['task']}/{run['file'].removesuffix(PRIMARY_FILE)}{PREDICTIONS_FILE}"


class _Predictions:
    """Each group's runs' predictions, read once however many pairs the group is in."""

    def __init__(self, specs: Mapping[str, TaskSpec]):
        self.specs = specs
        self.read: dict[int, list[Predictions]] = {}

    def __call__(self, group: dict) -> list[Predictions]:
        if id(group) not in self.read:
            runs = []
            for run in group["runs"]:
                if run["predictions"] is None:
                    raise MetricsFileError(
                        f"{_where(run)}: missing, beside {run['file']}; Δ pairs every run's predictions "
                        f"({group['model']} has {group['n']} runs), so none is left out")
                runs.append(read_predictions(run["predictions"], self.specs[run["task"]]))
            self.read[id(group)] = runs
        return self.read[id(group)]


def _delta(read: _Predictions, a: dict, b: dict) -> Delta:
    """Δ of ``b`` over ``a`` (both on one task shown), refused unless on the same test examples."""
    runs_a, runs_b = read(a), read(b)
    gold, preds = aligned(runs_a + runs_b, [_where(r) for r in a["runs"] + b["runs"]])
    return paired_delta(read.specs[b["task"]], gold, preds[:len(runs_a)], preds[len(runs_a):])


def _pairable(groups: list[dict], specs: Mapping[str, TaskSpec]) -> bool:
    return all(g["task"] in specs for g in groups)


def tfidf_deltas(groups: list[dict], specs: Optional[Mapping[str, TaskSpec]] = None,
                 labels: Optional[Mapping[str, str]] = None) -> dict[int, Delta]:
    """Δ test vs the task's TF-IDF row with its interval, keyed by the index of the model's group;
    none without ``specs`` (task -> its ``task`` keys) or on a task without a TF-IDF row."""
    if not specs:
        return {}
    read = _Predictions(specs)
    index = {id(g): i for i, g in enumerate(groups)}
    out: dict[int, Delta] = {}
    for task_groups in by_task(groups, labels).values():
        tfidf = next((g for g in task_groups if g["model"] == TFIDF_ROW), None)
        if tfidf is None or not _pairable(task_groups, specs):
            continue
        for group in task_groups:
            if group is not tfidf:
                out[index[id(group)]] = _delta(read, tfidf, group)
    return out


def pair_deltas(groups: list[dict], specs: Optional[Mapping[str, TaskSpec]] = None,
                labels: Optional[Mapping[str, str]] = None) -> list[tuple[str, dict, dict, Delta]]:
    """(task shown, A, B, Δ of A over B) for every pair of models of a task where two or more are not
    the TF-IDF row (the continued checkpoint, the checkpoint as it is, twilbert from scratch, TF-IDF:
    "did continuing help?" is a pair of its own). With one model beside TF-IDF, the TF-IDF Δ of the
    comparison table is the only pair: nothing here."""
    if not specs:
        return []
    read = _Predictions(specs)
    out = []
    for task, task_groups in by_task(groups, labels).items():
        if sum(g["model"] != TFIDF_ROW for g in task_groups) < 2 or not _pairable(task_groups, specs):
            continue
        for i, a in enumerate(task_groups):
            for b in task_groups[i + 1:]:
                out.append((task, a, b, _delta(read, b, a)))
    return out
