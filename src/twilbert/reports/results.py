"""The per-task metrics files read into table rows: every finetuning run of a model
(``results/tasks/<task>/runs/s<seed>/metrics.json``) and the TF-IDF row
(``results/tasks/<task>/baseline/metrics.json``), each beside its ``predictions.tsv``. All files share
one layout (``task``, ``model``, ``official_metric``, ``best_epoch``, ``protocol``, ``test_is_dev``,
``dev``, ``test``, optionally ``kfold``).

A model's number is the mean over its runs, with the standard deviation and the number of runs n.
The rows go to the tables (:mod:`twilbert.reports.tables`), to the Δ rows
(:mod:`twilbert.reports.deltas`) and, as flat names, to DVC's metrics file and MLflow (below). Scores
stay fractions here, as in the metrics files; the tables a person reads show points.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from twilbert.config.strict import flatten
from twilbert.errors import TwilbertError
from twilbert.evaluation.predictions import FILE as PREDICTIONS_FILE
from twilbert.reports.stats import spread

log = logging.getLogger(__name__)


class MetricsFileError(TwilbertError, ValueError):
    """A per-task metrics file is unreadable or incomplete, or there is none; the message names it."""


COLUMNS = ("mp", "mr", "mf1", "f1", "acc")
# Shown beside the official metric when a task reports them (SemEval's micro F1, stance F1...).
EXTRAS = ("stance_f1", "jaccard", "micro_f1", "pearson")
PRIMARY_FILE = "metrics.json"
RUNS_DIR = "runs"  # runs/s<seed>/: one finetuning run
BASELINE_DIR = "baseline"  # baseline/: the TF-IDF row, run once (the `baseline@<task>` stage)
# The TF-IDF row's name in every table, in results.csv and in DVC's metrics file. Its metrics file says
# "baseline" (the `finetuning.backbone` value); `baseline` in `make compare` is the experiment that
# `make repro` keeps, so the row is named apart from it.
TFIDF_ROW = "tfidf"
ROW_NAMES = {"baseline": TFIDF_ROW}  # a metrics file's "model" -> the row's name
REQUIRED_KEYS = ("task", "official_metric", "dev", "test")
SCALARS = ("official_metric", "protocol", "test_is_dev", "dev_from_train", "best_epoch", "epochs_run", "n_train",
           "n_dev", "n_test")
_SEED_DIR = re.compile(r"s(\d+)")


def _seed_of(run_dir: Path) -> Optional[int]:
    match = _SEED_DIR.fullmatch(run_dir.name)
    return int(match.group(1)) if match else None


def run_dirs(task_dir: Path) -> list[Path]:
    """The folders of a task's finetuning runs that hold a metrics file (``runs/s<seed>``), by seed."""
    runs = [d for d in (Path(task_dir) / RUNS_DIR).glob("s*")
            if _seed_of(d) is not None and (d / PRIMARY_FILE).is_file()]
    return sorted(runs, key=_seed_of)


def task_metrics_files(task_dir: Path) -> list[Path]:
    """The metrics files of one task folder: each run's (``runs/s<seed>/metrics.json``, by seed),
    then the TF-IDF row's (``baseline/metrics.json``) when there is one."""
    files = [d / PRIMARY_FILE for d in run_dirs(task_dir)]
    tfidf = Path(task_dir) / BASELINE_DIR / PRIMARY_FILE
    return files + ([tfidf] if tfidf.is_file() else [])


def _place(path: Path) -> tuple[str, str, Optional[int]]:
    """(file as shown, source, seed): ``runs/s3/metrics.json`` comes from source ``runs``, seed 3."""
    parent = path.parent
    if path.name == PRIMARY_FILE and parent.parent.name == RUNS_DIR and _seed_of(parent) is not None:
        return f"{RUNS_DIR}/{parent.name}/{path.name}", RUNS_DIR, _seed_of(parent)
    if path.name == PRIMARY_FILE and parent.name == BASELINE_DIR:
        return f"{BASELINE_DIR}/{path.name}", BASELINE_DIR, None
    raise MetricsFileError(f"{path}: not where a metrics file lives (<task>/{RUNS_DIR}/s<seed>/{PRIMARY_FILE} "
                           f"or <task>/{BASELINE_DIR}/{PRIMARY_FILE})")


def read_metrics(path: Path) -> Optional[dict]:
    """One metrics file as a row (``model`` as the tables name it, ``file``, ``source``, ``seed`` and
    ``predictions``, the predictions file beside it or None, filled in); None for a skipped row's note."""
    path = Path(path)
    shown, source, seed = _place(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise MetricsFileError(f"{path}: not a readable metrics file ({err})") from None
    if isinstance(data, dict) and "skipped" in data:  # e.g. the TF-IDF row's when the task has none
        log.info("%s: skipped (%s)", path, data["skipped"])
        return None
    if not isinstance(data, dict):
        raise MetricsFileError(f"{path}: not a metrics file (a JSON {type(data).__name__}, not an object)")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise MetricsFileError(f"{path}: metrics file lacks {missing} (expected keys: {', '.join(REQUIRED_KEYS)})")
    for split in ("dev", "test"):
        if "official" not in data[split]:
            raise MetricsFileError(f"{path}: {split!r} has no 'official' score")
    beside = path.parent / PREDICTIONS_FILE
    model = data.get("model") or ("baseline" if source == BASELINE_DIR else "twilbert")
    return {**data, "model": ROW_NAMES.get(model, model), "file": shown, "source": source, "seed": seed,
            "predictions": beside if beside.is_file() else None}


def collect(metrics_files: Iterable[Path]) -> list[dict]:
    """Rows of the given metrics files (one per run), grouped by task in first-seen order, the
    finetuning runs first, by seed, then the TF-IDF row."""
    rows = [row for row in map(read_metrics, metrics_files) if row is not None]
    order = {task: i for i, task in reversed(list(enumerate(r["task"] for r in rows)))}
    # runs by seed, so the means' float sums do not depend on the order the files came in; stable otherwise
    rows.sort(key=lambda r: (order[r["task"]], r["source"] != RUNS_DIR, -1 if r["seed"] is None else r["seed"]))
    return rows


def _numbers(tree: Mapping) -> dict[str, float]:
    return {k: v for k, v in tree.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _mean_tree(trees: list[Mapping]) -> tuple[dict, dict]:
    """Means and standard deviations (None for one run) of the numbers every tree holds."""
    keys = [k for k in _numbers(trees[0]) if all(k in _numbers(t) for t in trees[1:])]
    spreads = {k: spread([t[k] for t in trees]) for k in keys}
    return {k: s.mean for k, s in spreads.items()}, {k: s.sd for k, s in spreads.items()}


def protocol_of(row: dict) -> str:
    """How the row's test and dev splits were obtained (``finetuning.no_test_protocol``)."""
    return row.get("protocol") or "test_file"


def aggregate(rows: list[dict]) -> list[dict]:
    """One row per (task, model, source): the mean of each dev and test metric over the runs, their
    standard deviations under ``sd``, ``n`` and the runs themselves under ``runs``."""
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["task"], row["model"], row["source"]), []).append(row)
    out, seen = [], {}
    for (task, model, source), runs in groups.items():
        dev, dev_sd = _mean_tree([r["dev"] for r in runs])
        test, test_sd = _mean_tree([r["test"] for r in runs])
        agreed = {k: runs[0].get(k) for k in SCALARS if all(r.get(k) == runs[0].get(k) for r in runs)}
        key = (task, model)
        seen[key] = seen.get(key, 0) + 1
        if seen[key] > 1:  # finetuning.backbone: baseline in runs/ beside the TF-IDF row: both are tfidf
            model = f"{model} ({source})"
        out.append({**agreed, "task": task, "model": model, "source": source, "dev": dev, "test": test,
                    "sd": {"dev": dev_sd, "test": test_sd}, "n": len(runs), "runs": runs,
                    "official_metric": runs[0]["official_metric"], "test_is_dev": runs[0].get("test_is_dev"),
                    "protocol": protocol_of(runs[0]),
                    "warnings": list(dict.fromkeys(w for r in runs for w in r.get("warnings") or ()))})
    return out


def by_task(rows: list[dict], labels: Optional[Mapping[str, str]] = None) -> dict[str, list[dict]]:
    """Rows grouped by the task name shown, so a task listed ``compare_as`` another joins its rows."""
    labels = labels or {}
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(labels.get(row["task"], row["task"]), []).append(row)
    return groups


def flat_run(row: dict) -> dict[str, Any]:
    """One run's dev, test and k-fold numbers as flat names (``dev_mf1``, ``kfold_mean_official``...)."""
    out: dict[str, Any] = {}
    for split in ("dev", "test"):
        out.update(flatten(row[split], split, "_"))
    if "kfold" in row:
        out.update(flatten(row["kfold"], "kfold", "_"))
    return out


# --------------------------------------------------------------------------------------------
# Flat names: DVC's metrics file (results/metrics.json) and MLflow
# --------------------------------------------------------------------------------------------


def _summary(group: dict) -> dict[str, Any]:
    """The headline keys of a model: each the mean, with ``<key>_sd`` (None for one run) and ``<key>_n``."""
    keys = [("test", "official"), ("dev", "official")]
    keys += [("test", c) for c in (*COLUMNS, *EXTRAS) if c in group["test"]]
    out: dict[str, Any] = {}
    for split, metric in keys:
        key = f"{split}_{metric}"
        out.update({key: group[split][metric], f"{key}_sd": group["sd"][split][metric], f"{key}_n": group["n"]})
    return out


def summary_metrics(groups: list[dict]) -> dict:
    """The DVC metrics file: per task, the primary model's official dev/test and test columns at
    the top level, and every other model's under its name (``coset17.tfidf.test_official``);
    each key the mean over the runs (a fraction), ``<key>_sd`` and ``<key>_n`` beside it."""
    out: dict[str, dict] = {}
    for task, task_groups in by_task(groups).items():
        primary, others = task_groups[0], task_groups[1:]
        out[task] = {**_summary(primary), **{g["model"]: _summary(g) for g in others}}
    return out


def _numeric(flat: Mapping[str, Any]) -> dict[str, float]:
    """MLflow takes numbers only: a single run's undefined standard deviation is left out."""
    return {k: v for k, v in flat.items() if v is not None}


def tracked_metrics(groups: list[dict]) -> dict[str, float]:
    """The table's numbers as flat MLflow metric names: ``<task>.<model>.test_official`` (the mean),
    ``..._sd``, ``..._n``..."""
    out = {}
    for group in groups:
        for key, value in _summary(group).items():
            out[f"{group['task']}.{group['model'].replace(' ', '_')}.{key}"] = value
    return _numeric(out)


# The pretraining numbers on an experiment's MLflow parent run and in `make compare` (results/pretrain.json).
PRETRAIN_HEADLINE = ("heldout_mlm_loss", "heldout_mlm_accuracy", "heldout_rop_accuracy")


def pretrain_headline(pretrain: Mapping[str, Any]) -> dict[str, float]:
    return {f"pretrain.{k}": float(pretrain[k]) for k in PRETRAIN_HEADLINE if k in pretrain}


HEADLINE_KEYS = tuple(f"{split}_official{suffix}" for split in ("dev", "test") for suffix in ("", "_sd", "_n"))


def headline_metrics(groups: list[dict], pretrain: Optional[Mapping[str, Any]] = None) -> dict[str, float]:
    """What an experiment is judged by, as flat MLflow metric names: ``<task>.dev_official`` and
    ``<task>.test_official`` of the task's primary model (means over its runs, with ``_sd`` and
    ``_n``), ``<task>.<model>.test_official``... of the others (the TF-IDF row), and the pretraining
    held-out loss, MLM and ROP accuracy."""
    out: dict[str, Any] = {}
    for task, scores in summary_metrics(groups).items():
        for key in HEADLINE_KEYS:
            out[f"{task}.{key}"] = scores[key]
        for model, sub in scores.items():
            if isinstance(sub, dict):
                for key in HEADLINE_KEYS:
                    out[f"{task}.{model.replace(' ', '_')}.{key}"] = sub[key]
    out.update(pretrain_headline(pretrain or {}))
    return _numeric(out)
