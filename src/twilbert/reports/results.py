"""Results tables regenerated from the per-task metrics files: every finetuning run of a model
(``results/tasks/<task>/runs/s<seed>/metrics.json``) and the baseline row
(``results/tasks/<task>/baseline/metrics.json``), each beside its ``predictions.tsv``; a task folder
without ``runs/`` is read the older way (``metrics.json``, ``baseline.json``... at its top). All
files share one layout (``task``, ``model``, ``official_metric``, ``best_epoch``, ``protocol``,
``test_is_dev``, ``dev``, ``test``, optionally ``kfold``).

Two tables: TWilBert's (dev and test MP, MR, MF1, F1, Acc and the official metric) and the models
compared on each task's official metric. A model's number is the mean over its runs, shown with the
standard deviation and the number of runs n; the difference to the baseline comes with a 95%
interval from :mod:`twilbert.reports.stats`, computed from the runs' test predictions. Scores are copied
from the metrics files; only the interval is computed here.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from twilbert.config import TaskSpec
from twilbert.config.strict import flatten
from twilbert.errors import TwilbertError
from twilbert.evaluation.predictions import FILE as PREDICTIONS_FILE
from twilbert.evaluation.predictions import aligned, read_predictions
from twilbert.io_utils import atomic_write
from twilbert.reports.stats import Delta, paired_delta, spread

log = logging.getLogger(__name__)


class MetricsFileError(TwilbertError, ValueError):
    """A per-task metrics file is unreadable or incomplete, or there is none; the message names it."""


COLUMNS = ("mp", "mr", "mf1", "f1", "acc")
HEADERS = {"mp": "MP", "mr": "MR", "mf1": "MF1", "f1": "F1", "acc": "Acc"}
# Shown beside the official metric when a task reports them (SemEval's micro F1, stance F1...).
EXTRAS = ("stance_f1", "jaccard", "micro_f1", "pearson")
PRIMARY_FILE = "metrics.json"
RUNS_DIR = "runs"  # runs/s<seed>/: one finetuning run
BASELINE_DIR = "baseline"  # baseline/: the deterministic baseline row, run once
BASELINE_MODEL = "baseline"
REQUIRED_KEYS = ("task", "official_metric", "dev", "test")
SCALARS = ("official_metric", "protocol", "test_is_dev", "dev_from_train", "best_epoch", "epochs_run", "n_train",
           "n_dev", "n_test")
RUN, MEAN = "run", "mean"  # results.csv's `row`: one run, or the mean over a model's runs

LEGEND = """\
Scores in %. MP/MR/MF1: macro precision/recall/F1; F1: F1 of the task's class of interest
(`class_metric`, or class 1 of a binary task); Acc: accuracy (exact match for multi-label).
Official metrics: mf1 macro F1; f1 F1 of the class of interest; acc accuracy; stance_f1 mean F1
of FAVOR and AGAINST; jaccard sample-averaged Jaccard index; micro_f1 micro-averaged F1.
A model finetuned several times (seeds) shows mean ± standard deviation over its n runs.
"""
TEST_IS_DEV_NOTE = "† the task ships no test file: its dev split is reported as test.\n"
DELTA_NOTE = (
    "Δ: the model's mean test score minus the baseline's, in points, with a 95% interval from a paired "
    "bootstrap over the test examples that also resamples the model's runs (seeds); *within noise*: the "
    "interval holds 0, so the data cannot tell the two apart; *better*/*worse*: it lies entirely above/below 0.\n"
)
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
_SEED_DIR = re.compile(r"s(\d+)")


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _seed_of(run_dir: Path) -> Optional[int]:
    match = _SEED_DIR.fullmatch(run_dir.name)
    return int(match.group(1)) if match else None


def run_dirs(task_dir: Path) -> list[Path]:
    """The folders of a task's finetuning runs that hold a metrics file, by seed (``runs/s<seed>``);
    the task folder itself when it holds its one run at the top (the older layout)."""
    task_dir = Path(task_dir)
    runs = [d for d in (task_dir / RUNS_DIR).glob("s*") if _seed_of(d) is not None and (d / PRIMARY_FILE).is_file()]
    if runs:
        return sorted(runs, key=_seed_of)
    return [task_dir] if (task_dir / PRIMARY_FILE).is_file() else []


def task_metrics_files(task_dir: Path) -> list[Path]:
    """The metrics files of one task folder: each run's (``runs/s<seed>/metrics.json``, by seed),
    then the baseline's; in a folder without ``runs/``, ``metrics.json`` then the other ``*.json``."""
    task_dir = Path(task_dir)
    if (task_dir / RUNS_DIR).is_dir() or (task_dir / BASELINE_DIR / PRIMARY_FILE).is_file():
        files = [d / PRIMARY_FILE for d in run_dirs(task_dir) if d != task_dir]
        baseline = task_dir / BASELINE_DIR / PRIMARY_FILE
        return files + ([baseline] if baseline.is_file() else [])
    files = sorted(task_dir.glob("*.json"), key=lambda p: (p.name != PRIMARY_FILE, p.name))
    return [p for p in files if p.is_file()]


def _place(path: Path) -> tuple[str, str, Optional[int]]:
    """(file as shown, source, seed): ``runs/s3/metrics.json`` comes from source ``runs``, seed 3."""
    parent = path.parent
    if path.name == PRIMARY_FILE and parent.parent.name == RUNS_DIR and _seed_of(parent) is not None:
        return f"{RUNS_DIR}/{parent.name}/{path.name}", RUNS_DIR, _seed_of(parent)
    if path.name == PRIMARY_FILE and parent.name == BASELINE_DIR:
        return f"{BASELINE_DIR}/{path.name}", BASELINE_DIR, None
    return path.name, path.stem, None


def read_metrics(path: Path) -> Optional[dict]:
    """One metrics file as a row (``model``, ``file``, ``source``, ``seed`` and ``predictions``, the
    predictions file beside it or None, filled in); None for a JSON that is not one."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise MetricsFileError(f"{path}: not a readable metrics file ({err})") from None
    if isinstance(data, dict) and "skipped" in data:  # e.g. the baseline's when no baseline row ran
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
    shown, source, seed = _place(path)
    beside = path.parent / PREDICTIONS_FILE
    predictions = beside if source in (RUNS_DIR, BASELINE_DIR) and beside.is_file() else None
    model = data.get("model") or (BASELINE_MODEL if source == BASELINE_DIR else path.stem)
    return {**data, "model": model, "file": shown, "source": source, "seed": seed, "predictions": predictions}


def collect(metrics_files: Iterable[Path]) -> list[dict]:
    """Rows of the given metrics files (one per run), grouped by task in first-seen order, the
    primary model first (its runs by seed, or the top ``metrics.json``)."""
    rows = [row for row in map(read_metrics, metrics_files) if row is not None]
    order = {task: i for i, task in reversed(list(enumerate(r["task"] for r in rows)))}
    primary = lambda r: r["source"] == RUNS_DIR or r["file"] == PRIMARY_FILE  # noqa: E731
    # runs by seed, so the means' float sums do not depend on the order the files came in; stable otherwise
    rows.sort(key=lambda r: (order[r["task"]], not primary(r), -1 if r["seed"] is None else r["seed"]))
    return rows


def _numbers(tree: Mapping) -> dict[str, float]:
    return {k: v for k, v in tree.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _mean_tree(trees: list[Mapping]) -> tuple[dict, dict]:
    """Means and standard deviations (None for one run) of the numbers every tree holds."""
    keys = [k for k in _numbers(trees[0]) if all(k in _numbers(t) for t in trees[1:])]
    spreads = {k: spread([t[k] for t in trees]) for k in keys}
    return {k: s.mean for k, s in spreads.items()}, {k: s.sd for k, s in spreads.items()}


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
        if seen[key] > 1:  # two sources may name the same model (a baseline backbone and the baseline row)
            model = f"{model} ({source})"
        out.append({**agreed, "task": task, "model": model, "source": source, "dev": dev, "test": test,
                    "sd": {"dev": dev_sd, "test": test_sd}, "n": len(runs), "runs": runs,
                    "official_metric": runs[0]["official_metric"], "test_is_dev": runs[0].get("test_is_dev"),
                    "protocol": protocol_of(runs[0]),
                    "warnings": list(dict.fromkeys(w for r in runs for w in r.get("warnings") or ()))})
    return out


# --------------------------------------------------------------------------------------------
# Δ against the baseline
# --------------------------------------------------------------------------------------------


def _run_predictions(group: dict, specs: Mapping[str, TaskSpec]) -> Optional[list]:
    """Each run's predictions of a model, or None when a run has none or its task's spec is unknown."""
    if any(r["predictions"] is None or r["task"] not in specs for r in group["runs"]):
        return None
    return [read_predictions(r["predictions"], specs[r["task"]]) for r in group["runs"]]


def _where(run: dict) -> str:
    return f"{run['task']}/{run['file'].removesuffix(PRIMARY_FILE)}{PREDICTIONS_FILE}"


def baseline_deltas(groups: list[dict], specs: Optional[Mapping[str, TaskSpec]] = None,
                    labels: Optional[Mapping[str, str]] = None) -> dict[int, Delta]:
    """Δ test vs the task's baseline row with its interval (:func:`stats.paired_delta`), keyed by
    the index of the model's group; only where both sides have every run's predictions."""
    specs = specs or {}
    out: dict[int, Delta] = {}
    index = {id(g): i for i, g in enumerate(groups)}
    for task_groups in _by_task(groups, labels).values():
        baseline = next((g for g in task_groups if g["model"] == BASELINE_MODEL), None)
        base_runs = _run_predictions(baseline, specs) if baseline is not None else None
        if base_runs is None:
            continue
        for group in task_groups:
            runs = _run_predictions(group, specs) if group is not baseline else None
            if runs is None:
                continue
            names = [_where(r) for r in baseline["runs"] + group["runs"]]
            gold, preds = aligned(base_runs + runs, names)
            spec = specs[group["task"]]
            out[index[id(group)]] = paired_delta(spec, gold, preds[:len(base_runs)], preds[len(base_runs):])
    return out


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def _pct(value: Any) -> str:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-"
    return "nan" if math.isnan(value) else f"{100 * value:.2f}"


def _pct_sd(group: dict, split: str, key: str) -> str:
    """The mean in %, with ± the standard deviation when the model ran more than once."""
    mean, sd = group[split].get(key), group["sd"][split].get(key)
    return _pct(mean) if sd is None else f"{_pct(mean)} ± {_pct(sd)}"


def protocol_of(row: dict) -> str:
    """The row's protocol; metrics files from before the protocols existed say it with test_is_dev."""
    return row.get("protocol") or ("dev_as_test" if row.get("test_is_dev") else "test_file")


def _protocol(row: dict) -> str:
    return PROTOCOLS.get(protocol_of(row), protocol_of(row))


def _label(row: dict, labels: Mapping[str, str]) -> str:
    name = labels.get(row["task"], row["task"])
    return f"{name} †" if row.get("test_is_dev") else name


def _model(group: dict) -> str:
    """The model column: a Hugging Face backbone with its folder's name, so that the checkpoint as it is
    and the same checkpoint after continued pretraining (``models/pretrained``) read apart; marked ⚠
    when a run's score says little (a single class predicted...)."""
    name = group["runs"][0].get("model_name") if group.get("runs") else None
    model = f"{group['model']} ({name})" if group["model"] == "hf" and name else group["model"]
    return f"{model} ⚠" if group.get("warnings") else model


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
    shown = [f"{k} {_pct_sd(group, 'test', k)}" for k in EXTRAS if k in group["test"] and k != group["official_metric"]]
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
        cells = [_label(g, labels), _model(g), _protocol(g), str(g["n"])]
        cells += [_pct_sd(g, "dev", c) for c in COLUMNS] + [_pct_sd(g, "test", c) for c in COLUMNS]
        cells += [g["official_metric"], _pct_sd(g, "dev", "official"), _pct_sd(g, "test", "official"), _extras(g)]
        lines.append(_md_row(cells))
    return "\n".join(lines) + "\n"


def _points(value: float) -> str:
    return f"{100 * value:+.2f}"


def comparison_table(groups: list[dict], labels: Optional[Mapping[str, str]] = None,
                     deltas: Optional[Mapping[int, Delta]] = None) -> str:
    """Every model that ran on each task, on the task's official metric (mean ± sd over n runs):
    the best mean test score of a task in bold, and where the task has a baseline row, the
    difference to it with its 95% interval and verdict (``deltas``: :func:`baseline_deltas`)."""
    labels, deltas = labels or {}, deltas or {}
    index = {id(g): i for i, g in enumerate(groups)}
    head = ["Task", "Official", "Model", "Protocol", "n", "dev", "test", "Δ test vs baseline [95% CI]", "verdict"]
    lines = _md_head(head, "llllrrrrl")
    for task_groups in _by_task(groups, labels).values():
        scores = [g["test"]["official"] for g in task_groups]
        best = max(scores) if len(task_groups) > 1 else None
        baseline = next((g for g in task_groups if g["model"] == BASELINE_MODEL), None)
        for group, score in zip(task_groups, scores):
            test = _pct_sd(group, "test", "official")
            if best is not None and score == best:
                test = f"**{test}**"
            delta, word = "-", "-"
            found = deltas.get(index[id(group)])
            if found is not None:
                delta = f"{_points(found.delta)} [{_points(found.low)}, {_points(found.high)}]"
                word = found.verdict
            elif baseline is not None and group is not baseline:  # no predictions to pair: the point Δ alone
                delta = _points(score - baseline["test"]["official"])
            lines.append(_md_row([_label(group, labels), group["official_metric"], _model(group), _protocol(group),
                                  str(group["n"]), _pct_sd(group, "dev", "official"), test, delta, word]))
    return "\n".join(lines) + "\n"


def _by_task(rows: list[dict], labels: Optional[Mapping[str, str]] = None) -> dict[str, list[dict]]:
    """Rows grouped by the task name shown, so a task listed ``compare_as`` another joins its rows."""
    labels = labels or {}
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(labels.get(row["task"], row["task"]), []).append(row)
    return groups


def _flat_run(row: dict) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for split in ("dev", "test"):
        out.update(flatten(row[split], split, "_"))
    if "kfold" in row:
        out.update(flatten(row["kfold"], "kfold", "_"))
    return out


def csv_table(groups: list[dict], labels: Optional[Mapping[str, str]] = None) -> str:
    """Every number of every metrics file, one line per run (``row`` run, with its seed), then one
    line per (task, model) with the means (``row`` mean) and, in the ``*_sd`` columns, the
    standard deviations over its ``n`` runs."""
    labels = labels or {}
    flat = []
    for g in groups:
        ident = {"task": g["task"], "label": labels.get(g["task"], g["task"]), "model": g["model"]}
        runs = [_flat_run(r) for r in g["runs"]]
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
    the top level, and every other model's under its name (``coset17.baseline.test_official``);
    each key the mean over the runs, ``<key>_sd`` and ``<key>_n`` beside it."""
    out: dict[str, dict] = {}
    for task, task_groups in _by_task(groups).items():
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
    ``_n``), ``<task>.<model>.test_official``... of the others (the baseline), and the pretraining
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


def results_markdown(groups: list[dict], title: str, labels: Optional[Mapping[str, str]] = None,
                     plots: Iterable[str] = (), deltas: Optional[Mapping[int, Delta]] = None,
                     header: str = "") -> str:
    note = PROTOCOL_NOTE if any(protocol_of(g) != "test_file" for g in groups) else ""
    text = f"# {title}\n\n" + (f"{header}\n\n" if header else "")
    text += f"{LEGEND}{note}\n## Per task\n\n{markdown_table(groups, labels)}\n"
    text += f"## Models compared (official metric, test)\n\n{comparison_table(groups, labels, deltas)}"
    text += "\n" + DELTA_NOTE
    if any(g.get("test_is_dev") for g in groups):
        text += TEST_IS_DEV_NOTE
    text += warnings_note(groups, labels)
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
    specs: Optional[Mapping[str, TaskSpec]] = None,
    header: str = "",
) -> dict[str, str]:
    """The text of results.md, results.csv and metrics.json; every metrics file is read and checked,
    nothing is written (so a stage can check its other preconditions before writing).

    ``labels`` renames tasks in the tables (task -> shown name); the CSV keeps both. ``plots``:
    images (paths relative to the output folder) linked from results.md. ``specs`` (task -> its
    ``task`` keys) reads the predictions files for the Δ intervals; without it Δ has none.
    """
    groups = aggregate(collect(metrics_files))
    if not groups:
        raise MetricsFileError("evaluate: no per-task metrics files found; did the finetune stages run?")
    deltas = baseline_deltas(groups, specs, labels)
    return {"results.md": results_markdown(groups, title, labels, plots, deltas, header),
            "results.csv": csv_table(groups, labels),
            "metrics.json": json.dumps(summary_metrics(groups), indent=2)}


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
    specs: Optional[Mapping[str, TaskSpec]] = None,
) -> str:
    """Write results.md, results.csv and metrics.json under ``out_dir``; return the markdown
    (the arguments as :func:`render_results`')."""
    rendered = render_results(metrics_files, labels, title, plots, specs)
    write_rendered(rendered, out_dir)
    return rendered["results.md"]
