"""The results tables from the rows of :mod:`twilbert.reports.results`: TWilBert's per-task layout,
the models compared on each task's official metric (Δ against the TF-IDF row), every pair of a task
with two or more models beside it, and results.csv.

The markdown tables show points (100 × the fraction, two decimals); results.csv keeps the metrics
files' fractions, every digit, for programs."""

from __future__ import annotations

import csv
import io
import math
from typing import Any, Mapping, Optional

from twilbert.reports.results import COLUMNS, EXTRAS, SCALARS, TFIDF_ROW, by_task, flat_run, protocol_of
from twilbert.reports.stats import Delta, spread

HEADERS = {"mp": "MP", "mr": "MR", "mf1": "MF1", "f1": "F1", "acc": "Acc"}
RUN, MEAN = "run", "mean"  # results.csv's `row`: one run, or the mean over a model's runs
# How each row's test and dev splits were obtained (finetuning.no_test_protocol for tasks without a test file).
PROTOCOLS = {
    "test_file": "test file",  # the task's own test file; dev from its dev file or carved from train
    "carve_dev": "carved dev",  # no test file: the dev file is the test, dev carved from train
    "dev_as_test": "dev as test",  # no test file: the dev file selects the epoch and is reported as test
}


def points(value: Any) -> str:
    """A score in points: 0.3314 -> 33.14; '-' for none."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-"
    return "nan" if math.isnan(value) else f"{100 * value:.2f}"


def signed_points(value: float) -> str:
    return f"{100 * value:+.2f}"


def delta_cell(delta: Delta) -> str:
    """Δ [low, high] in points."""
    return f"{signed_points(delta.delta)} [{signed_points(delta.low)}, {signed_points(delta.high)}]"


def _points_sd(group: dict, split: str, key: str) -> str:
    """The mean in points, with ± the standard deviation when the model ran more than once."""
    mean, sd = group[split].get(key), group["sd"][split].get(key)
    return points(mean) if sd is None else f"{points(mean)} ± {points(sd)}"


def _protocol(row: dict) -> str:
    return PROTOCOLS.get(protocol_of(row), protocol_of(row))


def _label(row: dict, labels: Mapping[str, str]) -> str:
    name = labels.get(row["task"], row["task"])
    return f"{name} †" if row.get("test_is_dev") else name


def model_name(group: dict, mark: bool = True) -> str:
    """The model column: a Hugging Face backbone with its folder's name, so that the checkpoint as it is
    and the same checkpoint after continued pretraining (``models/pretrained``) read apart; marked ⚠
    when a run's score says little (a single class predicted...)."""
    name = group["runs"][0].get("model_name") if group.get("runs") else None
    model = f"{group['model']} ({name})" if group["model"] == "hf" and name else group["model"]
    return f"{model} ⚠" if mark and group.get("warnings") else model


def warnings_note(groups: list[dict], labels: Optional[Mapping[str, str]] = None) -> str:
    """What each ⚠ row's runs were warned about (train/degenerate.py), or nothing."""
    labels = labels or {}
    lines = [f"- {labels.get(g['task'], g['task'])} {g['model']}: {w}" for g in groups for w in g.get("warnings") or ()]
    if not lines:
        return ""
    return "⚠ the score of these runs says little:\n" + "\n".join(lines) + "\n"


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _md_head(head: list[str], align: str) -> list[str]:
    """Header and rule; ``align`` has one letter per column: l (text) or r (numbers)."""
    return [_md_row(head), "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]


def _extras(group: dict) -> str:
    shown = [f"{k} {_points_sd(group, 'test', k)}" for k in EXTRAS if k in group["test"] and k != group["official_metric"]]
    return ", ".join(shown) or "-"


def markdown_table(groups: list[dict], labels: Optional[Mapping[str, str]] = None) -> str:
    """TWilBert's layout, one row per (task, model): dev and test MP, MR, MF1, F1, Acc, then the
    official metric on dev and test, each the mean ± sd over the model's n runs; a metric a task
    does not report is '-'."""
    labels = labels or {}
    head = ["Task", "Model", "Protocol", "n"] + [f"dev {HEADERS[c]}" for c in COLUMNS]
    head += [f"test {HEADERS[c]}" for c in COLUMNS] + ["Official", "dev official", "test official", "Other (test)"]
    lines = _md_head(head, "lllr" + "r" * 2 * len(COLUMNS) + "lrrl")
    for g in groups:
        cells = [_label(g, labels), model_name(g), _protocol(g), str(g["n"])]
        cells += [_points_sd(g, "dev", c) for c in COLUMNS] + [_points_sd(g, "test", c) for c in COLUMNS]
        cells += [g["official_metric"], _points_sd(g, "dev", "official"), _points_sd(g, "test", "official"), _extras(g)]
        lines.append(_md_row(cells))
    return "\n".join(lines) + "\n"


def comparison_table(groups: list[dict], labels: Optional[Mapping[str, str]] = None,
                     deltas: Optional[Mapping[int, Delta]] = None) -> str:
    """Every model that ran on each task, on the task's official metric (mean ± sd over n runs):
    the best mean test score of a task in bold, and where the task has a TF-IDF row, the
    difference to it with its 95% interval and verdict (``deltas``: :func:`deltas.tfidf_deltas`)."""
    labels, deltas = labels or {}, deltas or {}
    index = {id(g): i for i, g in enumerate(groups)}
    head = ["Task", "Official", "Model", "Protocol", "n", "dev", "test", f"Δ test vs {TFIDF_ROW} [95% CI]", "verdict"]
    lines = _md_head(head, "llllrrrrl")
    for task_groups in by_task(groups, labels).values():
        scores = [g["test"]["official"] for g in task_groups]
        best = max(scores) if len(task_groups) > 1 else None
        tfidf = next((g for g in task_groups if g["model"] == TFIDF_ROW), None)
        for group, score in zip(task_groups, scores):
            test = _points_sd(group, "test", "official")
            if best is not None and score == best:
                test = f"**{test}**"
            delta, word = "-", "-"
            found = deltas.get(index[id(group)])
            if found is not None:
                delta, word = delta_cell(found), found.verdict
            elif tfidf is not None and group is not tfidf:  # no predictions to pair: the point Δ alone
                delta = signed_points(score - tfidf["test"]["official"])
            lines.append(_md_row([_label(group, labels), group["official_metric"], model_name(group), _protocol(group),
                                  str(group["n"]), _points_sd(group, "dev", "official"), test, delta, word]))
    return "\n".join(lines) + "\n"


def pairs_table(pairs: list[tuple[str, dict, dict, Delta]]) -> str:
    """Each pair of models of a task (:func:`deltas.pair_deltas`): A's mean test score minus B's, in
    points, with its 95% interval and verdict."""
    lines = _md_head(["Task", "A", "B", "Δ test A − B [95% CI]", "verdict"], "lllrl")
    for task, a, b, delta in pairs:
        lines.append(_md_row([task, model_name(a, mark=False), model_name(b, mark=False), delta_cell(delta),
                              delta.verdict]))
    return "\n".join(lines) + "\n"


def csv_table(groups: list[dict], labels: Optional[Mapping[str, str]] = None) -> str:
    """Every number of every metrics file, one line per run (``row`` run, with its seed), then one
    line per (task, model) with the means (``row`` mean) and, in the ``*_sd`` columns, the
    standard deviations over its ``n`` runs; scores as fractions, as in the metrics files."""
    labels = labels or {}
    flat = []
    for g in groups:
        ident = {"task": g["task"], "label": labels.get(g["task"], g["task"]), "model": g["model"]}
        runs = [flat_run(r) for r in g["runs"]]
        for run, numbers in zip(g["runs"], runs):
            flat.append({**ident, "row": RUN, "seed": run["seed"], "n": 1, "file": run["file"],
                         **{k: run.get(k) for k in SCALARS}, "protocol": protocol_of(run), **numbers})
        common = [k for k in runs[0] if all(k in r for r in runs[1:])]
        mean = {}
        for key in common:
            values = [r[key] for r in runs]
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                s = spread(values)
                mean[key] = s.mean
                if key.startswith(("dev_", "test_")):
                    mean[f"{key}_sd"] = s.sd
            elif all(v == values[0] for v in values):
                mean[key] = values[0]
        flat.append({**ident, "row": MEAN, "seed": None, "n": g["n"], "file": None,
                     **{k: g.get(k) for k in SCALARS}, "protocol": protocol_of(g), **mean})
    fields = ["task", "label", "model", "row", "seed", "n", "file", *SCALARS]
    for split in ("dev", "test"):
        fields += [f"{split}_{c}" for c in (*COLUMNS, "official")]
    keys = {k for out in flat for k in out} - set(fields)
    sds = sorted(k for k in keys if k.endswith("_sd"))
    rest = sorted(keys - set(sds))
    fields += [k for k in rest if not k.startswith("kfold_")] + [k for k in rest if k.startswith("kfold_")] + sds
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(flat)
    return buf.getvalue()
