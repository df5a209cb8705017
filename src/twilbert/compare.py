"""`make compare`: the workspace, its commit and every DVC experiment in one table: the params that
differ among them and the headline metrics (pretraining held-out loss, MLM and ROP accuracy; each
task's dev and test official metric and its baseline's test). Reads ``dvc exp show --json`` and fits
a 160-column terminal: params and metrics that do not fit side by side come as two tables, same rows."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from twilbert.config.strict import dig

PARAMS_FILE = "params.yaml"
PRETRAIN_FILE = "results/pretrain.json"
TASKS_FILE = "results/metrics.json"
PRETRAIN_COLUMNS = (("heldout_mlm_loss", "mlm loss"), ("heldout_mlm_accuracy", "mlm acc"),
                    ("heldout_rop_accuracy", "rop acc"))
TASK_COLUMNS = (("dev_official", "dev"), ("test_official", "test"), ("baseline.test_official", "baseline test"))
WIDTH = 160
MAX_CELL = 24  # a longer param value is cut (the full value: `dvc params diff`)


class CompareError(RuntimeError):
    """DVC could not list the experiments."""


def exp_show_json(repo: Path) -> list:
    cmd = [sys.executable, "-m", "dvc", "exp", "show", "--json"]
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True)
    if proc.returncode != 0:
        raise CompareError(f"`dvc exp show --json` failed: {proc.stderr.strip().splitlines()[-1:] or proc.returncode}")
    return json.loads(proc.stdout or "[]")


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: tree}


def _file_data(data: Mapping, section: str, name: str) -> dict:
    entry = (data.get(section) or {}).get(name) or {}
    return entry.get("data") or {}


def experiment_rows(shown: list) -> list[dict]:
    """One row per workspace, baseline commit and experiment: its name, flat params and metrics."""
    rows = []

    def add(name: str, rev: Mapping) -> None:
        data = rev.get("data") or {}
        rows.append({
            "name": name,
            "params": flatten(_file_data(data, "params", PARAMS_FILE)),
            "pretrain": _file_data(data, "metrics", PRETRAIN_FILE),
            "tasks": _file_data(data, "metrics", TASKS_FILE),
            "error": bool(rev.get("error")),
        })

    for commit in shown:
        rev = commit.get("rev", "")
        add("workspace" if rev == "workspace" else commit.get("name") or rev[:7], commit)
        for exp in commit.get("experiments") or []:
            revs = exp.get("revs") or []
            if revs:
                add(exp.get("name") or revs[0].get("name") or revs[0].get("rev", "")[:7], revs[0])
    return rows


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


def _cell(value: Any, metric: bool = False) -> str:
    if value is None:
        return "-"
    if metric and isinstance(value, (int, float)) and not isinstance(value, bool):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text if len(text) <= MAX_CELL else text[: MAX_CELL - 1] + "…"


def metric_columns(rows: list[dict]) -> list[tuple[str, str, str, str]]:
    """(group, header, source, key) of the headline metrics that some row has."""
    cols = [("pretrain held-out", label, "pretrain", key) for key, label in PRETRAIN_COLUMNS
            if any(key in r["pretrain"] for r in rows)]
    tasks = list(dict.fromkeys(t for r in rows for t in r["tasks"]))
    for task in tasks:
        cols += [(task, label, "tasks", f"{task}.{key}") for key, label in TASK_COLUMNS
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
    param_cells = [[_cell(r["params"].get(k)) if r["params"] else "-" for k in params] for r in rows]
    metric_cells = [[_cell(dig(r[src], key), metric=True) for _, _, src, key in metrics] for r in rows]
    param_head = ["experiment", *(labels[k] for k in params)]
    param_groups = ["", *(["params that differ"] * len(params))]
    metric_head = ["experiment", *(h for _, h, _, _ in metrics)]
    metric_groups = ["", *(g for g, _, _, _ in metrics)]
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
    return text


def main(argv: Optional[Iterable[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m twilbert.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=Path("."))
    parser.add_argument("--width", type=int, default=WIDTH, help="terminal columns to fit (default 160)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        rows = experiment_rows(exp_show_json(args.repo))
    except CompareError as err:
        print(f"compare: {err}", file=sys.stderr)
        return 2
    print(compare_table(rows, args.width))
    return 0


if __name__ == "__main__":
    sys.exit(main())
