"""`make compare`: the workspace, its commit and every DVC experiment in one table: the params that
differ among them and the headline metrics (pretraining held-out loss, MLM and ROP accuracy; each
task's dev and test official metric and its TF-IDF row's test), scores in points. Reads
``dvc exp show --json`` and fits a 160-column terminal: params and metrics that do not fit side by
side come as two tables, same rows.

A second table (:func:`verdict_table`) gives, per task, each experiment's Δ of the official test
metric against the reference (``--reference``, default the experiment `baseline`), with its 95%
interval from a paired bootstrap over the test examples and runs (:mod:`twilbert.reports.stats`), and
the verdict: better, worse or within noise. A run whose predictions.tsv is missing is said in the
verdict cell (``n=2 of 3``) and named below the table."""

from __future__ import annotations

import argparse
import json
import logging
import math
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

from twilbert.config import TaskSpec
from twilbert.config.strict import dig, flatten, from_dict
from twilbert.errors import TwilbertError
from twilbert.evaluation.predictions import PredictionsFileError, aligned, parse_predictions
from twilbert.reports.results import TFIDF_ROW
from twilbert.reports.stats import Delta, paired_delta
from twilbert.reports.tables import delta_cell

log = logging.getLogger(__name__)

PARAMS_FILE = "params.yaml"
PRETRAIN_FILE = "results/pretrain.json"
TASKS_FILE = "results/metrics.json"
# (key, header, a score shown in points): the held-out MLM loss stays a loss
PRETRAIN_COLUMNS = (("heldout_mlm_loss", "mlm loss", False), ("heldout_mlm_accuracy", "mlm acc", True),
                    ("heldout_rop_accuracy", "rop acc", True))
TASK_COLUMNS = (("dev_official", "dev"), ("test_official", "test"), ("test_official_sd", "test sd"),
                (f"{TFIDF_ROW}.test_official", f"{TFIDF_ROW} test"))  # the TF-IDF row, not the `baseline` experiment
WIDTH = 160
MAX_CELL = 24  # a longer param value is cut (the full value: `dvc params diff`)


class CompareError(TwilbertError, RuntimeError):
    """DVC could not list the experiments."""


def exp_show_json(repo: Path) -> list:
    cmd = [sys.executable, "-m", "dvc", "exp", "show", "--json"]
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True)
    if proc.returncode != 0:
        raise CompareError(f"`dvc exp show --json` failed: {proc.stderr.strip().splitlines()[-1:] or proc.returncode}")
    return json.loads(proc.stdout or "[]")


def _file_data(data: Mapping, section: str, name: str) -> dict:
    entry = (data.get(section) or {}).get(name) or {}
    return entry.get("data") or {}


def experiment_rows(shown: list) -> list[dict]:
    """One row per workspace, baseline commit and experiment: its name, flat params and metrics."""
    rows = []

    def add(name: str, rev: Mapping, kind: str) -> None:
        data = rev.get("data") or {}
        rows.append({
            "name": name,
            "params": flatten(_file_data(data, "params", PARAMS_FILE)),
            "params_tree": _file_data(data, "params", PARAMS_FILE),
            "pretrain": _file_data(data, "metrics", PRETRAIN_FILE),
            "tasks": _file_data(data, "metrics", TASKS_FILE),
            "error": bool(rev.get("error")),
            "rev": rev.get("rev", ""),
            "kind": kind,
        })

    for commit in shown:
        rev = commit.get("rev", "")
        kind = "workspace" if rev == "workspace" else "commit"
        add("workspace" if rev == "workspace" else commit.get("name") or rev[:7], commit, kind)
        for exp in commit.get("experiments") or []:
            revs = exp.get("revs") or []
            if revs:
                add(exp.get("name") or revs[0].get("name") or revs[0].get("rev", "")[:7], revs[0], "experiment")
    return rows


def local_rows(rows: list[dict]) -> list[dict]:
    """The rows made on this machine: every experiment, and the workspace unless it is one of them
    (after `make exp` or `make baseline` it holds that experiment's results). A commit's row is left
    out: its results may come from another machine, and the host would be part of every difference."""
    experiments = [r for r in rows if r["kind"] == "experiment"]
    same = lambda a, b: (a["params"], a["pretrain"], a["tasks"]) == (b["params"], b["pretrain"], b["tasks"])  # noqa: E731
    workspace = [r for r in rows if r["kind"] == "workspace" and not any(same(r, e) for e in experiments)]
    return workspace + experiments


def run_predictions(repo: Path, row: Mapping, missing: Optional[list[str]] = None) -> dict[str, list[Optional[str]]]:
    """``task -> [predictions.tsv text of each run]`` of a row: from the experiment's commit, or from
    the workspace's files; only the runs its params list (``finetune_runs``). A run without the file
    is None in the list, and ``<row>: <path>`` in ``missing``: never dropped unsaid."""
    runs = (row.get("params_tree") or {}).get("finetune_runs") or {}
    texts: dict[str, list[Optional[str]]] = {}
    for entry in runs.values():
        path = f"results/tasks/{entry['task']}/runs/s{entry['seed']}/predictions.tsv"
        if row["kind"] == "workspace":
            file = Path(repo) / path
            text = file.read_text(encoding="utf-8") if file.is_file() else None
        else:
            proc = subprocess.run(["git", "show", f"{row['rev']}:{path}"], cwd=repo, capture_output=True, text=True)
            text = proc.stdout if proc.returncode == 0 else None
        if text is None and missing is not None:
            missing.append(f"{row['name']}: {path}")
        texts.setdefault(entry["task"], []).append(text)
    return texts


def changed_params(rows: list[dict]) -> list[str]:
    """The params whose values differ among the rows that have params, in params.yaml's order."""
    with_params = [r for r in rows if r["params"]]
    keys = list(dict.fromkeys(k for r in with_params for k in r["params"]))
    return [k for k in keys if len({json.dumps(r["params"].get(k), sort_keys=True) for r in with_params}) > 1]


def short_labels(keys: list[str]) -> dict[str, str]:
    """The shortest dotted suffix of each key that is unique among ``keys`` (model.n_encoders -> n_encoders)."""
    labels = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            label = ".".join(parts[-n:])
            if sum(1 for k in keys if k == label or k.endswith("." + label)) == 1:
                break
        labels[key] = label
    return labels


def cell(value: Any, metric: bool = False, in_points: bool = False) -> str:
    """A param's value (cut to MAX_CELL), or a metric's: a score in points (0.3314 -> 33.14), a loss as it is."""
    if value is None:
        return "-"
    if metric and isinstance(value, (int, float)) and not isinstance(value, bool):
        if math.isnan(value):
            return "nan"
        return f"{100 * value:.2f}" if in_points else f"{value:.4f}"
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text if len(text) <= MAX_CELL else text[: MAX_CELL - 1] + "…"


def metric_columns(rows: list[dict]) -> list[tuple[str, str, str, str, bool]]:
    """(group, header, source, key, in points) of the headline metrics that some row has."""
    cols = [("pretrain held-out", label, "pretrain", key, in_points) for key, label, in_points in PRETRAIN_COLUMNS
            if any(key in r["pretrain"] for r in rows)]
    tasks = list(dict.fromkeys(t for r in rows for t in r["tasks"]))
    for task in tasks:
        cols += [(task, label, "tasks", f"{task}.{key}", True) for key, label in TASK_COLUMNS
                 if any(dig(r["tasks"], f"{task}.{key}") is not None for r in rows)]
    return cols


def render(head: list[str], body: list[list[str]], groups: Optional[list[str]] = None) -> str:
    """A table aligned for the terminal; ``groups`` labels runs of columns on a line above the header."""
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    if groups:  # widen a run of columns whose group label is longer than the run
        start = 0
        while start < len(groups):
            end = start
            while end + 1 < len(groups) and groups[end + 1] == groups[start]:
                end += 1
            span = sum(widths[start:end + 1]) + 3 * (end - start)
            widths[end] += max(0, len(groups[start]) - span)
            start = end + 1
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    lines = [line(head), rule, *map(line, body)]
    if groups:
        cells, start = [], 0
        while start < len(groups):
            end = start
            while end + 1 < len(groups) and groups[end + 1] == groups[start]:
                end += 1
            cells.append(groups[start].center(sum(widths[start:end + 1]) + 3 * (end - start)))
            start = end + 1
        lines.insert(0, "| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare_table(rows: list[dict], width: int = WIDTH) -> str:
    params = changed_params(rows)
    labels = short_labels(params)
    metrics = metric_columns(rows)
    names = [r["name"] + (" (failed)" if r["error"] else "") for r in rows]
    param_cells = [[cell(r["params"].get(k)) if r["params"] else "-" for k in params] for r in rows]
    metric_cells = [[cell(dig(r[src], key), True, in_points) for _, _, src, key, in_points in metrics] for r in rows]
    param_head = ["experiment", *(labels[k] for k in params)]
    param_groups = ["", *(["params that differ"] * len(params))]
    metric_head = ["experiment", *(h for _, h, _, _, _ in metrics)]
    metric_groups = ["", *(g for g, _, _, _, _ in metrics)]
    together = render(param_head + metric_head[1:], [[n, *p, *m] for n, p, m in zip(names, param_cells, metric_cells)],
                      param_groups + metric_groups[1:])
    if max(map(len, together.splitlines())) <= width:
        text = together
    else:
        text = (render(param_head, [[n, *p] for n, p in zip(names, param_cells)], param_groups) + "\n\n"
                + render(metric_head, [[n, *m] for n, m in zip(names, metric_cells)], metric_groups))
    if not params:
        text += "\n\n(no param differs among these rows)"
    full = [f"{labels[k]} = {k}" for k in params if labels[k] != k]
    if full:
        text += "\n\nparams: " + ", ".join(full)
    if metrics:
        text += (f"\n\nScores in points (100 × the fraction); {TFIDF_ROW}: the TF-IDF row of results.md; "
                 "mlm loss: the held-out masked-LM loss")
    return text


# --------------------------------------------------------------------------------------------
# Δ against the reference row (`baseline`, or --reference), paired on the test examples
# --------------------------------------------------------------------------------------------

# exp name -> task -> the text of each run's predictions.tsv, None for a run without one (a mapping,
# or a function of the name)
RunTexts = Mapping[str, Sequence[Optional[str]]]
PredictionTexts = Union[Mapping[str, RunTexts], Callable[[str], RunTexts]]
REFERENCE = "workspace"


def task_specs(params_tree: Mapping) -> dict[str, TaskSpec]:
    """Each task's ``task`` keys (labels, official metric) from a params.yaml tree."""
    tasks = params_tree.get("tasks") or {}
    return {name: from_dict(TaskSpec, (entry or {}).get("task"), f"tasks.{name}.task") for name, entry in tasks.items()}


def compare_task(spec: TaskSpec, reference: Sequence[str], other: Sequence[str],
                 names: tuple[str, str] = (REFERENCE, "experiment")) -> Delta:
    """Δ of ``other`` over ``reference`` on one task (each a list of its runs' predictions.tsv texts),
    with its interval and verdict; refused (PredictionsFileError) unless all are on the same test ids."""
    runs = [parse_predictions(text, spec, f"{names[0]} run {i}") for i, text in enumerate(reference)]
    runs += [parse_predictions(text, spec, f"{names[1]} run {i}") for i, text in enumerate(other)]
    labels = [f"{names[0]} run {i}" for i in range(len(reference))] + [f"{names[1]} run {i}" for i in range(len(other))]
    gold, preds = aligned(runs, labels)
    return paired_delta(spec, gold, preds[:len(reference)], preds[len(reference):])


def _texts(predictions: PredictionTexts, name: str) -> RunTexts:
    found = predictions(name) if callable(predictions) else predictions.get(name)
    return found or {}


def _verdict_cells(spec: TaskSpec, reference: Sequence[Optional[str]], other: Sequence[Optional[str]],
                   names: tuple[str, str]) -> list[str]:
    """Δ [interval] and verdict; a side short of runs' predictions says so in the verdict (``n=2 of 3``)."""
    ref = [t for t in reference if t is not None]
    oth = [t for t in other if t is not None]
    if not ref or not oth:
        return ["-", "-" if not reference or not other else "no predictions"]
    try:
        delta = compare_task(spec, ref, oth, names)
    except PredictionsFileError as err:  # e.g. the experiment changed the task's test file: not paired
        log.warning("compare: %s", err)
        return ["-", "other test examples"]
    short = [f"{name} n={len(found)} of {len(listed)}" for name, found, listed in
             ((names[0], ref, reference), (names[1], oth, other)) if len(found) < len(listed)]
    return [delta_cell(delta), "; ".join([delta.verdict, *short])]


def verdict_table(rows: list[dict], predictions: PredictionTexts, specs: Optional[Mapping[str, TaskSpec]] = None,
                  reference: str = REFERENCE) -> str:
    """Per task, each experiment's Δ test vs ``reference`` (a row's name) [95% CI] and its verdict, in
    points of the official metric; ``specs`` default to the reference row's params. '-' where either
    side has no predictions for the task."""
    ref_row = next((r for r in rows if r["name"] == reference), None)
    if ref_row is None:
        raise CompareError(f"no row named {reference!r} to compare against (have {[r['name'] for r in rows]})")
    specs = specs if specs is not None else task_specs(ref_row.get("params_tree") or {})
    ref_texts = _texts(predictions, reference)
    others = [r for r in rows if r is not ref_row]
    tasks = [t for t in specs if t in ref_texts or any(t in _texts(predictions, r["name"]) for r in others)]
    head, groups = ["experiment"], [""]
    for task in tasks:
        head += [f"Δ test vs {reference} [95% CI]", "verdict"]
        groups += [task, task]
    body = []
    for row in others:
        texts = _texts(predictions, row["name"])
        cells = [row["name"] + (" (failed)" if row["error"] else "")]
        for task in tasks:
            cells += _verdict_cells(specs[task], ref_texts.get(task, ()), texts.get(task, ()), (reference, row["name"]))
        body.append(cells)
    note = (f"Δ: official test metric minus {reference}'s, in points, mean over runs; 95% paired bootstrap "
            "interval over test examples and runs; within noise: the interval holds 0.")
    return render(head, body, groups) + "\n\n" + textwrap.fill(note, 100)


def main(argv: Optional[Iterable[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m twilbert.reports.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=Path("."))
    parser.add_argument("--width", type=int, default=WIDTH, help="terminal columns to fit (default 160)")
    parser.add_argument("--reference", help="the row (experiment) the others are measured against (default: the "
                                            "experiment `baseline` that `make repro` keeps, else the workspace)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        rows = local_rows(experiment_rows(exp_show_json(args.repo)))
    except CompareError as err:
        print(f"compare: {err}", file=sys.stderr)
        return 2
    if not rows:
        print("compare: no experiment yet: `make repro` keeps its run as `baseline`", file=sys.stderr)
        return 2
    names = [r["name"] for r in rows]
    if args.reference is not None and args.reference not in names:
        print(f"compare: --reference {args.reference!r} is no row here (have: {', '.join(names)})", file=sys.stderr)
        return 2
    reference = args.reference or ("baseline" if "baseline" in names else names[0])
    rows.sort(key=lambda r: r["name"] != reference)  # the reference first, the others as DVC lists them
    print(compare_table(rows, args.width))
    if len(rows) > 1:
        missing: list[str] = []
        texts = {r["name"]: run_predictions(args.repo, r, missing) for r in rows}
        try:
            table = verdict_table(rows, texts, reference=reference)
        except CompareError as err:
            print(f"compare: {err}", file=sys.stderr)
            return 2
        print("\n" + table)
        if missing:  # the verdict cells say n=k of m; these are the runs left out
            print("\nno predictions.tsv, so Δ is over the other runs: " + "; ".join(missing))
    return 0

if __name__ == "__main__":
    sys.exit(main())
