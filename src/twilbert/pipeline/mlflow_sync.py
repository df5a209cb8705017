"""MLflow as a view of what DVC knows: one sync makes the store's parent runs match DVC's state.

For the workspace and for every DVC experiment (``dvc exp show --json``; an experiment's files are
read from its commit, the workspace's from disk, so a fresh clone with the experiments' refs is
enough), the sync finds or creates the experiment's parent run (the one its stages log under, found
by name and params) and writes, per task: the official test score's mean, sd and n over the runs
the params list, in points; Δ against the reference run (the experiment ``baseline`` that
``make repro`` keeps, else the workspace) with its 95% interval's bounds, from
``twilbert.reports.compare`` (paired bootstrap over test examples and runs); and the verdict as a
tag. It is the only writer of the parents' scores: a stage that DVC skips logs nothing, and the
sync after ``make repro``, ``make exp``, ``make baseline`` and inside ``make ui`` fills the gap.

It is idempotent: a value already in the store is not written again, so a rerun changes nothing.
Parents DVC no longer knows (a removed experiment, the workspace's older params) and the workspace
when it holds an experiment's results are tagged ``twilbert.shown = false``: the view leaves them out.

    python -m twilbert.pipeline.mlflow_sync [--repo .] [--warn]
    python -m twilbert.pipeline.mlflow_sync --ui [--port 5000]     # `make ui`: sync, then the UI
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from twilbert.config import TrackingConfig
from twilbert.errors import TwilbertError
from twilbert.evaluation.predictions import PredictionsFileError
from twilbert.pipeline.experiments import BASELINE
from twilbert.reports.compare import CompareError, compare_task, exp_show_json, experiment_rows, local_rows, task_specs
from twilbert.reports.stats import spread
from twilbert.tracking import view
from twilbert.tracking.runs import experiment_id, flatten, git_commit, parent_run, repo_root, tracking_uri
from twilbert.tracking.store import bounded_http, local_store_problem, quiet_store_logs, redact, store_lock

log = logging.getLogger(__name__)

WORKSPACE = "workspace"
REFERENCE_TAG = "twilbert.reference"
REFERENCE_VERDICT = "reference"
UNPAIRED_VERDICT = "other test examples"  # the task's test file differs from the reference's: no paired Δ
DIGITS = 2  # points, rounded for reading: 33.14


class SyncError(TwilbertError, RuntimeError):
    """The store cannot be synced; the message says what is wrong and what to do."""


class DvcStateError(SyncError):
    """DVC's state cannot be read now (e.g. `dvc exp show` while an experiment runs)."""


@dataclass
class Entry:
    """One row of DVC's state: the workspace or an experiment, with what the sync writes for it."""

    name: str
    row: dict  # twilbert.reports.compare.experiment_rows's row
    commit: str
    shown: bool
    metrics: dict[str, float] = field(default_factory=dict)  # in the order they are first written
    tags: dict[str, str] = field(default_factory=dict)


def row_text(repo: Path, row: dict, path: str) -> Optional[str]:
    """A file of the row: the workspace's on disk, an experiment's from its commit; None if absent."""
    if row["kind"] == "workspace":
        file = repo / path
        return file.read_text(encoding="utf-8") if file.is_file() else None
    proc = subprocess.run(["git", "show", f"{row['rev']}:{path}"], cwd=repo, capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 else None


def task_runs(repo: Path, row: dict) -> dict[str, list[tuple[float, Optional[str]]]]:
    """``task -> [(official test score, predictions.tsv text)]`` of the runs the row's params list."""
    runs = (row.get("params_tree") or {}).get("finetune_runs") or {}
    found: dict[str, list[tuple[float, Optional[str]]]] = {}
    for entry in runs.values():
        base = f"results/tasks/{entry['task']}/runs/s{entry['seed']}"
        metrics = row_text(repo, row, f"{base}/metrics.json")
        if metrics is None:
            continue  # not run yet (a fresh clone before `make repro`, a failed experiment)
        try:
            score = float(json.loads(metrics)["test"]["official"])
        except (ValueError, KeyError, TypeError) as err:
            raise SyncError(f"{row['name']}: {base}/metrics.json has no test.official score ({err})") from err
        found.setdefault(entry["task"], []).append((score, row_text(repo, row, f"{base}/predictions.tsv")))
    return found


def points(value: float) -> float:
    return round(100 * value, DIGITS) + 0.0  # + 0.0: a -0.0 would read "-0"


def entries(repo: Path) -> tuple[list[Entry], str]:
    """The workspace and every experiment with their scores, Δ and verdicts; and the reference's name."""
    shown = exp_show_json(repo)
    rows = [r for r in experiment_rows(shown) if r["kind"] in ("workspace", "experiment")]
    baselines = {exp.get("name"): commit.get("rev", "") for commit in shown for exp in commit.get("experiments") or []}
    visible = {r["name"] for r in local_rows(rows)}
    names = [r["name"] for r in rows]
    reference = BASELINE if BASELINE in names else WORKSPACE
    workspace_commit = git_commit(repo)
    found = [Entry(r["name"], r, workspace_commit if r["kind"] == "workspace" else baselines.get(r["name"]) or r["rev"],
                   r["name"] in visible) for r in rows if r["params"]]
    ref = next((e for e in found if e.name == reference), None)
    specs = task_specs(ref.row.get("params_tree") or {}) if ref is not None else {}
    ref_runs = task_runs(repo, ref.row) if ref is not None else {}
    for entry in found:
        runs = ref_runs if entry is ref else task_runs(repo, entry.row)
        for task, scored in runs.items():
            score = spread([s for s, _ in scored])
            entry.metrics[view.score_key(task, "test")] = points(score.mean)
            if score.sd is not None:
                entry.metrics[view.score_key(task, "sd")] = points(score.sd)
            entry.metrics[view.score_key(task, "n")] = float(score.n)
            verdict = delta_of(entry, ref, task, scored, ref_runs.get(task, []), specs)
            entry.tags[view.score_key(task, view.VERDICT_SUFFIX)] = verdict
        entry.tags[REFERENCE_TAG] = reference
    return found, reference


def delta_of(entry: Entry, ref: Optional[Entry], task: str, scored: list, ref_scored: list, specs: dict) -> str:
    """Write Δ and its bounds on ``entry`` (none when not paired); the verdict."""
    if ref is None:
        return "no reference"
    if entry is ref:
        entry.metrics.update({view.score_key(task, s): 0.0 for s in ("Δ", "Δ low", "Δ high")})
        return REFERENCE_VERDICT
    texts, ref_texts = [t for _, t in scored], [t for _, t in ref_scored]
    if task not in specs or not ref_texts or None in texts or None in ref_texts:
        return "no reference" if task not in specs or not ref_texts else "no predictions"
    try:
        delta = compare_task(specs[task], ref_texts, texts, (ref.name, entry.name))
    except PredictionsFileError as err:
        log.warning("MLflow sync: %s, %s: %s", entry.name, task, err)
        return UNPAIRED_VERDICT
    entry.metrics.update({view.score_key(task, "Δ"): points(delta.delta), view.score_key(task, "Δ low"): points(delta.low),
                          view.score_key(task, "Δ high"): points(delta.high)})
    return delta.verdict


def write(client: Any, exp_id: str, found: list[Entry]) -> tuple[list[str], int]:
    """Make the store's parents match ``found``: the names synced and the number of values written."""
    from mlflow.entities import Metric, RunTag

    written, synced = 0, set()
    for entry in found:
        run_id = parent_run(client, exp_id, entry.name, entry.commit, flatten(entry.row["params_tree"]))
        synced.add(run_id)
        current = client.get_run(run_id).data
        tags = {**entry.tags, view.SHOWN_TAG: "true" if entry.shown else "false"}
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, 0) for k, v in entry.metrics.items() if current.metrics.get(k) != v]
        new_tags = [RunTag(k, v) for k, v in tags.items() if current.tags.get(k) != v]
        if metrics or new_tags:
            client.log_batch(run_id, metrics=metrics, tags=new_tags)
        written += len(metrics) + len(new_tags)
    query = f"tags.`{view.PARENT_TAG}` = 'true'"
    for stale in client.search_runs([exp_id], filter_string=query, max_results=10000):
        if stale.info.run_id not in synced and stale.data.tags.get(view.SHOWN_TAG) != "false":
            client.set_tag(stale.info.run_id, view.SHOWN_TAG, "false")  # DVC no longer knows it
            written += 1
    return [e.name for e in found], written


def sync(repo: Path, uri: str, cfg: Optional[TrackingConfig] = None) -> str:
    """Make the store at ``uri`` match DVC's state in ``repo``; a one-line summary."""
    import mlflow

    cfg = cfg or TrackingConfig()
    problem = local_store_problem(uri, cfg.timeout)
    if problem is not None:
        raise SyncError(problem)
    try:
        found, reference = entries(repo)
    except CompareError as err:
        raise DvcStateError(f"cannot read DVC's experiments in {repo}: {err}") from err
    quiet_store_logs()
    try:
        with store_lock(uri), bounded_http(cfg):  # the client's first use may create the store's tables
            client = mlflow.MlflowClient(tracking_uri=uri)
            exp_id = experiment_id(client, cfg.experiment, uri, repo_root(repo))
            names, written = write(client, exp_id, found)
    except TwilbertError:
        raise
    except Exception as err:  # MLflow wraps SQLAlchemy wraps sqlite3: one line, not its traceback
        raise SyncError(f"MLflow store {redact(uri)}: {type(err).__name__}: {str(err).strip().splitlines()[0]}") from err
    shown = ", ".join(e.name for e in found if e.shown) or "none"
    return (f"MLflow {redact(uri)}: {len(names)} experiment run(s) synced from DVC ({written} value(s) changed); "
            f"shown: {shown}; Δ against {reference}")


def ui_sync(repo: Path, uri: str) -> None:
    """`make ui`'s sync: DVC's state unreadable for now (an experiment running) leaves the store as
    last synced, with a warning; a store that cannot be used stops `make ui` (SyncError)."""
    try:
        print(sync(repo, uri), flush=True)
    except DvcStateError as err:
        print(f"warning: MLflow sync: {err}; the view shows the store as last synced", file=sys.stderr, flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--ui" in argv:  # `make ui`: the store's checks, the port's, this sync, then the UI
        argv.remove("--ui")
        repo = repo_root()
        return view.main(argv, sync=lambda uri: ui_sync(repo, uri), prog="make ui")
    parser = argparse.ArgumentParser(prog="python -m twilbert.pipeline.mlflow_sync", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=Path("."))
    parser.add_argument("--warn", action="store_true",
                        help="a store that cannot be synced is a warning, exit 0 (after `make repro`: the "
                             "results are written; `make ui` syncs again)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    repo = repo_root(args.repo)
    try:
        print(sync(repo, tracking_uri(TrackingConfig(), repo)))
    except TwilbertError as err:
        print(f"{'warning' if args.warn else 'error'}: MLflow sync: {err}", file=sys.stderr)
        return 0 if args.warn else 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
