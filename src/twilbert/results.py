"""Results tables regenerated from the per-task metrics files, one per model that ran on a task
(``results/tasks/<task>/metrics.json``, ``baseline.json``...), all in one layout (``task``, ``model``,
``official_metric``, ``best_epoch``, ``protocol``, ``test_is_dev``, ``dev``, ``test``, optionally ``kfold``).
Two tables: TWilBert's (dev and test MP, MR, MF1, F1, Acc and the official metric) and the models
compared on each task's official metric. Every number is copied from the files, never recomputed."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from twilbert.io_utils import atomic_write

log = logging.getLogger(__name__)


class MetricsFileError(ValueError):
    """A per-task metrics file is unreadable or incomplete, or there is none; the message names it."""


COLUMNS = ("mp", "mr", "mf1", "f1", "acc")
HEADERS = {"mp": "MP", "mr": "MR", "mf1": "MF1", "f1": "F1", "acc": "Acc"}
# Shown beside the official metric when a task reports them (SemEval's micro F1, stance F1...).
EXTRAS = ("stance_f1", "jaccard", "micro_f1", "pearson")
PRIMARY_FILE = "metrics.json"
BASELINE_MODEL = "baseline"
REQUIRED_KEYS = ("task", "official_metric", "dev", "test")
SCALARS = ("official_metric", "protocol", "test_is_dev", "dev_from_train", "best_epoch", "epochs_run", "n_train",
           "n_dev", "n_test")

LEGEND = """\
Scores in %. MP/MR/MF1: macro precision/recall/F1; F1: F1 of the task's class of interest
(`class_metric`, or class 1 of a binary task); Acc: accuracy (exact match for multi-label).
Official metrics: mf1 macro F1; f1 F1 of the class of interest; acc accuracy; stance_f1 mean F1
of FAVOR and AGAINST; jaccard sample-averaged Jaccard index; micro_f1 micro-averaged F1.
"""
TEST_IS_DEV_NOTE = "† the task ships no test file: its dev split is reported as test.\n"
# How each row's test and dev splits were obtained (finetuning.no_test_protocol for tasks without a test file).
PROTOCOLS = {
    "test_file": "test file",  # the task's own test file; dev from its dev file or carved from train
    "carve_dev": "carved dev",  # no test file: the dev file is the test, dev carved from train
    "dev_as_test": "dev as test",  # no test file: the dev file selects the epoch and is reported as test
}
PROTOCOL_NOTE = (
    "Protocol: *test file*: the task's test file; *carved dev*: the task has no test file, so its dev file "
    "is the test and the epoch is chosen on a stratified dev split carved from train; *dev as test* (†): the "
    "dev file chose the epoch and is reported as test (optimistic; `finetuning.no_test_protocol: dev_as_test`).\n"
)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def task_metrics_files(task_dir: Path) -> list[Path]:
    """The metrics files of one task folder: ``metrics.json`` first, then the other ``*.json``."""
    task_dir = Path(task_dir)
    files = sorted(task_dir.glob("*.json"), key=lambda p: (p.name != PRIMARY_FILE, p.name))
    return [p for p in files if p.is_file()]


def read_metrics(path: Path) -> Optional[dict]:
    """One metrics file as a row (``model`` and ``file`` filled in); None for a JSON that is not one."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise MetricsFileError(f"{path}: not a readable metrics file ({err})") from None
    if isinstance(data, dict) and "skipped" in data:  # e.g. baseline.json when no baseline row ran
        log.info("%s: skipped (%s)", path, data["skipped"])
        return None
    if not isinstance(data, dict) or "official_metric" not in data:
        log.info("%s: no official_metric key; not a metrics file, left out of the tables", path)
        return None
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise MetricsFileError(f"{path}: metrics file lacks {missing} (expected keys: {', '.join(REQUIRED_KEYS)})")
    for split in ("dev", "test"):
        if "official" not in data[split]:
            raise MetricsFileError(f"{path}: {split!r} has no 'official' score")
    return {**data, "model": data.get("model") or path.stem, "file": path.name}


def collect(metrics_files: Iterable[Path]) -> list[dict]:
    """Rows of the given metrics files, grouped by task in first-seen order, primary file first."""
    rows = [row for row in map(read_metrics, metrics_files) if row is not None]
    order = {task: i for i, task in reversed(list(enumerate(r["task"] for r in rows)))}
    rows.sort(key=lambda r: (order[r["task"]], r["file"] != PRIMARY_FILE))  # stable: keeps file order
    seen: dict[tuple[str, str], int] = {}
    for row in rows:  # two files may name the same model (a baseline backbone and baseline.json)
        key = (row["task"], row["model"])
        seen[key] = seen.get(key, 0) + 1
        if seen[key] > 1:
            row["model"] = f"{row['model']} ({Path(row['file']).stem})"
    return rows


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def _pct(value: Any) -> str:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-"
    return "nan" if math.isnan(value) else f"{100 * value:.2f}"


def protocol_of(row: dict) -> str:
    """The row's protocol; metrics files from before the protocols existed say it with test_is_dev."""
    return row.get("protocol") or ("dev_as_test" if row.get("test_is_dev") else "test_file")


def _protocol(row: dict) -> str:
    return PROTOCOLS.get(protocol_of(row), protocol_of(row))


def _label(row: dict, labels: Mapping[str, str]) -> str:
    name = labels.get(row["task"], row["task"])
    return f"{name} †" if row.get("test_is_dev") else name


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _md_head(head: list[str], align: str) -> list[str]:
    """Header and rule; ``align`` has one letter per column: l (text) or r (numbers)."""
    return [_md_row(head), "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]


def _extras(row: dict) -> str:
    test = row["test"]
    shown = [f"{k} {_pct(test[k])}" for k in EXTRAS if k in test and k != row["official_metric"]]
    return ", ".join(shown) or "-"


def markdown_table(rows: list[dict], labels: Optional[Mapping[str, str]] = None) -> str:
    """TWilBert's layout, one row per (task, model): dev and test MP, MR, MF1, F1, Acc, then the
    official metric on dev and test; a metric a task does not report is '-'."""
    labels = labels or {}
    head = ["Task", "Model", "Protocol"] + [f"dev {HEADERS[c]}" for c in COLUMNS]
    head += [f"test {HEADERS[c]}" for c in COLUMNS] + ["Official", "dev official", "test official", "Other (test)"]
    lines = _md_head(head, "lll" + "r" * 2 * len(COLUMNS) + "lrrl")
    for row in rows:
        cells = [_label(row, labels), row["model"], _protocol(row)]
        cells += [_pct(row["dev"].get(c)) for c in COLUMNS] + [_pct(row["test"].get(c)) for c in COLUMNS]
        cells += [row["official_metric"], _pct(row["dev"]["official"]), _pct(row["test"]["official"]), _extras(row)]
        lines.append(_md_row(cells))
    return "\n".join(lines) + "\n"


def comparison_table(rows: list[dict], labels: Optional[Mapping[str, str]] = None) -> str:
    """Every model that ran on each task, on the task's official metric: the best test score of a
    task in bold, and the difference to the baseline where the task has one."""
    labels = labels or {}
    lines = _md_head(["Task", "Official", "Model", "Protocol", "dev", "test", "Δ test vs baseline"], "llllrrr")
    for task_rows in _by_task(rows, labels).values():
        scores = [r["test"]["official"] for r in task_rows]
        best = max(scores) if len(task_rows) > 1 else None
        baseline = next((r for r in task_rows if r["model"] == BASELINE_MODEL), None)
        for row, score in zip(task_rows, scores):
            test = _pct(score)
            if best is not None and score == best:
                test = f"**{test}**"
            delta = "-"
            if baseline is not None and row is not baseline:
                delta = f"{100 * (score - baseline['test']['official']):+.2f}"
            lines.append(_md_row([_label(row, labels), row["official_metric"], row["model"], _protocol(row),
                                  _pct(row["dev"]["official"]), test, delta]))
    return "\n".join(lines) + "\n"


def _by_task(rows: list[dict], labels: Optional[Mapping[str, str]] = None) -> dict[str, list[dict]]:
    """Rows grouped by the task name shown, so a task listed ``compare_as`` another joins its rows."""
    labels = labels or {}
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(labels.get(row["task"], row["task"]), []).append(row)
    return groups


def _flatten(tree: Any, prefix: str) -> dict[str, Any]:
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}_{key}"))
        return out
    return {prefix: tree}


def csv_table(rows: list[dict], labels: Optional[Mapping[str, str]] = None) -> str:
    """Every number of every metrics file: one line per (task, model)."""
    labels = labels or {}
    flat = []
    for row in rows:
        out = {"task": row["task"], "label": labels.get(row["task"], row["task"]), "model": row["model"],
               "file": row["file"], **{k: row.get(k) for k in SCALARS}, "protocol": protocol_of(row)}
        for split in ("dev", "test"):
            out.update(_flatten(row[split], split))
        if "kfold" in row:
            out.update(_flatten(row["kfold"], "kfold"))
        flat.append(out)
    fields = ["task", "label", "model", "file", *SCALARS]
    for split in ("dev", "test"):
        fields += [f"{split}_{c}" for c in (*COLUMNS, "official")]
    rest = sorted({k for out in flat for k in out} - set(fields))
    fields += [k for k in rest if not k.startswith("kfold_")] + [k for k in rest if k.startswith("kfold_")]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(flat)
    return buf.getvalue()


def _summary(row: dict) -> dict[str, float]:
    out = {"test_official": row["test"]["official"], "dev_official": row["dev"]["official"]}
    out.update({f"test_{c}": row["test"][c] for c in (*COLUMNS, *EXTRAS) if c in row["test"]})
    return out


def summary_metrics(rows: list[dict]) -> dict:
    """The DVC metrics file: per task, the primary model's official dev/test and test columns at
    the top level, and every other model's under its name (``coset17.baseline.test_official``)."""
    out: dict[str, dict] = {}
    for task, task_rows in _by_task(rows).items():
        primary, others = task_rows[0], task_rows[1:]
        out[task] = {**_summary(primary), **{r["model"]: _summary(r) for r in others}}
    return out


def tracked_metrics(rows: list[dict]) -> dict[str, float]:
    """The table's numbers as flat MLflow metric names: ``<task>.<model>.test_official``..."""
    out = {}
    for row in rows:
        for key, value in _summary(row).items():
            out[f"{row['task']}.{row['model'].replace(' ', '_')}.{key}"] = value
    return out


# The pretraining numbers on an experiment's MLflow parent run and in `make compare` (results/pretrain.json).
PRETRAIN_HEADLINE = ("heldout_mlm_loss", "heldout_mlm_accuracy", "heldout_rop_accuracy")


def pretrain_headline(pretrain: Mapping[str, Any]) -> dict[str, float]:
    return {f"pretrain.{k}": float(pretrain[k]) for k in PRETRAIN_HEADLINE if k in pretrain}


def headline_metrics(rows: list[dict], pretrain: Optional[Mapping[str, Any]] = None) -> dict[str, float]:
    """What an experiment is judged by, as flat MLflow metric names: ``<task>.dev_official`` and
    ``<task>.test_official`` of the task's primary model, ``<task>.<model>.test_official`` of the
    others (the baseline), and the pretraining held-out loss, MLM and ROP accuracy."""
    out: dict[str, float] = {}
    for task, scores in summary_metrics(rows).items():
        for key in ("dev_official", "test_official"):
            out[f"{task}.{key}"] = scores[key]
        for model, sub in scores.items():
            if isinstance(sub, dict):
                for key in ("dev_official", "test_official"):
                    out[f"{task}.{model.replace(' ', '_')}.{key}"] = sub[key]
    out.update(pretrain_headline(pretrain or {}))
    return out


def results_markdown(rows: list[dict], title: str, labels: Optional[Mapping[str, str]] = None,
                     plots: Iterable[str] = ()) -> str:
    note = PROTOCOL_NOTE if any(protocol_of(r) != "test_file" for r in rows) else ""
    text = f"# {title}\n\n{LEGEND}{note}\n## Per task\n\n{markdown_table(rows, labels)}\n"
    text += f"## Models compared (official metric, test)\n\n{comparison_table(rows, labels)}"
    if any(r.get("test_is_dev") for r in rows):
        text += "\n" + TEST_IS_DEV_NOTE
    plots = list(plots)
    if plots:
        text += "\n## Curves\n\n" + "".join(f"- [{Path(p).stem}]({p})\n" for p in plots)
    return text


RESULT_FILES = ("results.md", "results.csv", "metrics.json")


def render_results(
    metrics_files: Iterable[Path],
    labels: Optional[Mapping[str, str]] = None,
    title: str = "twilbert results",
    plots: Iterable[str] = (),
) -> dict[str, str]:
    """The text of results.md, results.csv and metrics.json; every metrics file is read and checked,
    nothing is written (so a stage can check its other preconditions before writing).

    ``labels`` renames tasks in the tables (task -> shown name); the CSV keeps both. ``plots``:
    images (paths relative to the output folder) linked from results.md.
    """
    rows = collect(metrics_files)
    if not rows:
        raise MetricsFileError("evaluate: no per-task metrics files found; did the finetune stages run?")
    return {"results.md": results_markdown(rows, title, labels, plots), "results.csv": csv_table(rows, labels),
            "metrics.json": json.dumps(summary_metrics(rows), indent=2)}


def write_rendered(rendered: Mapping[str, str], out_dir: Path) -> None:
    """Write what :func:`render_results` returned under ``out_dir``, each file atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in RESULT_FILES:
        with atomic_write(out_dir / name) as fh:
            fh.write(rendered[name])


def write_results(
    metrics_files: Iterable[Path],
    out_dir: Path,
    labels: Optional[Mapping[str, str]] = None,
    title: str = "twilbert results",
    plots: Iterable[str] = (),
) -> str:
    """Write results.md, results.csv and metrics.json under ``out_dir``; return the markdown.

    ``labels`` renames tasks in the tables (task -> shown name); the CSV keeps both. ``plots``:
    images (paths relative to ``out_dir``) linked from results.md.
    """
    rendered = render_results(metrics_files, labels, title, plots)
    write_rendered(rendered, out_dir)
    return rendered["results.md"]
