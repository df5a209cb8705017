"""results.md, results.csv and metrics.json rendered from the per-task metrics files, and written.

Two tables, plus a third where a task holds two or more models beside the TF-IDF row: TWilBert's (dev and test MP, MR,
MF1, F1, Acc and the official metric), the models compared on each task's official metric with Δ
against the TF-IDF row, and every pair of models of such a task. Scores are copied from the metrics
files; only the intervals are computed (:mod:`twilbert.reports.deltas`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Mapping, Optional

from twilbert.config import TaskSpec
from twilbert.io_utils import atomic_write
from twilbert.reports.deltas import pair_deltas, tfidf_deltas
from twilbert.reports.results import TFIDF_ROW, MetricsFileError, aggregate, collect, protocol_of, summary_metrics
from twilbert.reports.stats import Delta
from twilbert.reports.tables import comparison_table, csv_table, markdown_table, pairs_table, warnings_note

LEGEND = f"""\
Scores in points (100 × the fraction: 33.14 is 0.3314). MP/MR/MF1: macro precision/recall/F1; F1: F1
of the task's class of interest (`class_metric`, or class 1 of a binary task); Acc: accuracy (exact
match for multi-label). Official metrics: mf1 macro F1; f1 F1 of the class of interest; acc accuracy;
stance_f1 mean F1 of FAVOR and AGAINST; jaccard sample-averaged Jaccard index; micro_f1 micro-averaged F1.
A model finetuned several times (seeds) shows mean ± standard deviation over its n runs.
`{TFIDF_ROW}`: the TF-IDF + linear row (`finetuning.baseline_model`), fitted once per task.
"""
TEST_IS_DEV_NOTE = "† the task ships no test file: its dev split is reported as test.\n"
DELTA_NOTE = (
    f"Δ: the model's mean test score minus {TFIDF_ROW}'s, in points, with a 95% interval from a paired "
    "bootstrap over the test examples that also resamples the model's runs (seeds); *within noise*: the "
    "interval holds 0, so the data cannot tell the two apart; *better*/*worse*: it lies entirely above/below 0.\n"
)
PAIRS_NOTE = "Δ: A's mean test score minus B's, in points, with its 95% interval and verdict as above.\n"
PROTOCOL_NOTE = (
    "Protocol: *test file*: the task's test file; *carved dev*: the task has no test file, so its dev file "
    "is the test and the epoch is chosen on a stratified dev split carved from train; *dev as test* (†): the "
    "dev file chose the epoch and is reported as test (optimistic; `finetuning.no_test_protocol: dev_as_test`).\n"
)
RESULT_FILES = ("results.md", "results.csv", "metrics.json")


def results_markdown(groups: list[dict], title: str, labels: Optional[Mapping[str, str]] = None,
                     plots: Iterable[str] = (), deltas: Optional[Mapping[int, Delta]] = None,
                     header: str = "", pairs: Optional[list] = None) -> str:
    note = PROTOCOL_NOTE if any(protocol_of(g) != "test_file" for g in groups) else ""
    text = f"# {title}\n\n" + (f"{header}\n\n" if header else "")
    text += f"{LEGEND}{note}\n## Per task\n\n{markdown_table(groups, labels)}\n"
    text += f"## Models compared (official metric, test)\n\n{comparison_table(groups, labels, deltas)}"
    text += "\n" + DELTA_NOTE
    if any(g.get("test_is_dev") for g in groups):
        text += TEST_IS_DEV_NOTE
    text += warnings_note(groups, labels)
    if pairs:
        text += f"\n## Every pair compared (official metric, test)\n\n{pairs_table(pairs)}\n{PAIRS_NOTE}"
    plots = list(plots)
    if plots:
        text += "\n## Curves\n\n" + "".join(f"- [{Path(p).stem}]({p})\n" for p in plots)
    return text


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
    ``task`` keys) reads the predictions files for the Δ intervals, every run's: one missing is
    refused; without ``specs`` Δ has no interval.
    """
    groups = aggregate(collect(metrics_files))
    if not groups:
        raise MetricsFileError("evaluate: no per-task metrics files found; did the finetune stages run?")
    deltas = tfidf_deltas(groups, specs, labels)
    pairs = pair_deltas(groups, specs, labels)
    return {"results.md": results_markdown(groups, title, labels, plots, deltas, header, pairs),
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
