"""MLflow as a view of DVC's state: the sync (twilbert.pipeline.mlflow_sync) on a real git + DVC
repository with a `baseline` and an experiment, and `make ui`'s view and its refusals (a taken port,
a damaged, locked or directory store) in one line with exit 2."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from twilbert.config import TrackingConfig
from twilbert.pipeline.experiments import save
from twilbert.pipeline.mlflow_sync import sync
from twilbert.tracking.runs import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, Tracker
from twilbert.tracking.view import SHARED_VIEW_TAG, VIEW_KEY, ViewError, prepare

REPO = Path(__file__).resolve().parents[1]
SPEC = {"regression": False, "multi_label": False, "categories": {"N": 0, "P": 1}, "class_weights": None,
        "eval_metric": "accuracy", "average_metric": None, "class_metric": None, "stance_f1": False}
N_TEST = 60
DVC_YAML = """stages:
  evaluate:
    cmd: "true"
    params: [model, tasks, finetune_runs]
    metrics:
    - results/metrics.json:
        cache: false
"""


def git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    proc = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def write_run(repo: Path, n_encoders: int, right: list[int]) -> None:
    """params.yaml and results/ of a run with one finetuning run per seed: seed i gets ``right[i]`` of
    the N_TEST test examples right (accuracy is the official metric)."""
    runs = {f"t-s{seed}": {"task": "t", "seed": seed} for seed in range(len(right))}
    params = {"model": {"n_encoders": n_encoders}, "tasks": {"t": {"task": SPEC}}, "finetune_runs": runs}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    scores = []
    for seed, n_right in enumerate(right):
        run = repo / "results" / "tasks" / "t" / "runs" / f"s{seed}"
        run.mkdir(parents=True, exist_ok=True)
        gold = ["N" if i % 2 else "P" for i in range(N_TEST)]
        pred = [g if i < n_right else ("P" if g == "N" else "N") for i, g in enumerate(gold)]
        (run / "predictions.tsv").write_text("id\tgold\tpred\n" + "".join(
            f"x{i}\t{g}\t{p}\n" for i, (g, p) in enumerate(zip(gold, pred))), encoding="utf-8")
        scores.append(n_right / N_TEST)
        (run / "metrics.json").write_text(json.dumps({"test": {"official": n_right / N_TEST}}), encoding="utf-8")
    (repo / "results" / "metrics.json").write_text(json.dumps({"t": {"test_official": sum(scores) / len(scores)}}))


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A committed project; `make repro`'s run kept as `baseline` (n_encoders 2: 30, 33, 36 of 60 right)
    and the experiment `enc4` (n_encoders 4: 54, 57 right), which the workspace holds afterwards."""
    repo = tmp_path_factory.mktemp("sync") / "repo"
    repo.mkdir()
    (repo / "dvc.yaml").write_text(DVC_YAML, encoding="utf-8")
    write_run(repo, 2, [30, 33, 36])
    git(repo, "init", "-q", "-b", "main")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=repo, check=True)
    git(repo, "add", "dvc.yaml", "params.yaml", ".dvc")
    git(repo, "commit", "-qm", "init")
    save(repo, "baseline")
    write_run(repo, 4, [54, 57])
    save(repo, "enc4")
    return repo


@pytest.fixture(scope="module")
def synced(project, tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    summary = sync(project, uri)
    return project, uri, summary


def parents(uri: str) -> dict:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("twilbert")
    found = client.search_runs([exp.experiment_id], filter_string="tags.`twilbert.parent` = 'true'")
    return {r.info.run_name: r for r in found}


def store_state(uri: str) -> list:
    """Every run of the store with its params, tags and every metric's whole history."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("twilbert")
    state = []
    for run in client.search_runs([exp.experiment_id], max_results=1000, run_view_type=3):
        history = {k: [(m.value, m.step, m.timestamp) for m in client.get_metric_history(run.info.run_id, k)]
                   for k in run.data.metrics}
        state.append((run.info.run_id, run.info.lifecycle_stage, run.data.params, run.data.tags, history))
    return sorted(state, key=lambda s: s[0])


def test_each_experiment_gets_its_score_sd_n_delta_and_verdict_in_points(synced):
    _, uri, summary = synced
    found = parents(uri)
    baseline, enc4 = found["baseline"].data, found["enc4"].data
    assert baseline.metrics["t test"] == 55.0 and baseline.metrics["t sd"] == 5.0 and baseline.metrics["t n"] == 3
    assert baseline.tags["t verdict"] == "reference" and baseline.metrics["t Δ"] == 0.0
    assert enc4.metrics["t test"] == 92.5 and enc4.metrics["t n"] == 2
    assert enc4.metrics["t Δ"] == 37.5  # 92.5 - 55.0, in points
    assert 0 < enc4.metrics["t Δ low"] < 37.5 < enc4.metrics["t Δ high"]
    assert enc4.tags["t verdict"] == "better" and enc4.tags["twilbert.reference"] == "baseline"
    assert enc4.params["model.n_encoders"] == "4" and baseline.params["model.n_encoders"] == "2"
    assert "Δ against baseline" in summary
    # the test score first, as MLflow lists the run's metrics: its Compare page plots the first one
    assert list(enc4.metrics)[0] == "t test" and list(baseline.metrics)[0] == "t test"


def test_the_workspace_holding_an_experiments_results_and_runs_dvc_no_longer_knows_are_left_out_of_the_view(
        synced, tmp_path, monkeypatch):
    repo, uri, _ = synced
    found = parents(uri)
    assert found["workspace"].data.metrics["t test"] == 92.5  # it holds enc4's results: scored, not shown
    assert {name: r.data.tags["twilbert.shown"] for name, r in found.items()} == \
        {"workspace": "false", "baseline": "true", "enc4": "true"}
    monkeypatch.chdir(tmp_path)  # a parent from a removed experiment, as its stages left it
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("DVC_EXP_NAME", "removed")
    with Tracker(TrackingConfig(), stage="evaluate").start({}, experiment_params={"model": {"n_encoders": 8}}):
        pass
    sync(repo, uri)
    assert parents(uri)["removed"].data.tags["twilbert.shown"] == "false"
    view = prepare(uri, "twilbert")
    assert view.n_parents == 2


def test_a_rerun_of_the_sync_changes_nothing_in_the_store(synced):
    repo, uri, _ = synced
    before = store_state(uri)
    summary = sync(repo, uri)
    assert "(0 value(s) changed)" in summary
    assert store_state(uri) == before


def test_a_fresh_clone_with_the_experiments_refs_syncs_the_same_scores(synced, tmp_path):
    repo, uri, _ = synced
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(repo), str(clone))
    git(clone, "fetch", "-q", "origin", "refs/exps/*:refs/exps/*")  # what `dvc exp pull` brings
    fresh = f"sqlite:///{tmp_path / 'fresh.db'}"
    sync(clone, fresh)
    got, want = parents(fresh), parents(uri)
    for name in ("baseline", "enc4"):
        keys = ("t test", "t sd", "t Δ", "t Δ low", "t Δ high")
        assert {k: got[name].data.metrics.get(k) for k in keys} == {k: want[name].data.metrics.get(k) for k in keys}
        assert got[name].data.tags["t verdict"] == want[name].data.tags["t verdict"]
    # the clone's workspace is the commit, with no results: a parent with params, no score
    assert "t test" not in got["workspace"].data.metrics


def test_the_view_shows_the_changed_param_and_each_tasks_score_delta_and_verdict_at_readable_widths(synced):
    import mlflow

    _, uri, _ = synced
    view = prepare(uri, "twilbert")
    assert view.params == ["model.n_encoders"]
    assert view.metrics == ["t test", "t sd", "t n", "t Δ", "t Δ low", "t Δ high"]  # n: 3 runs and 2
    assert view.tags == ["t verdict"]
    assert "workflowType=machine_learning" in view.path() and f"viewStateShareKey={VIEW_KEY}" in view.path()
    tags = mlflow.MlflowClient(tracking_uri=uri).get_experiment_by_name("twilbert").tags
    state = json.loads(tags[SHARED_VIEW_TAG + VIEW_KEY])
    assert state["selectedColumns"] == ["params.`model.n_encoders`", *(f"metrics.`{k}`" for k in view.metrics),
                                        "tags.`t verdict`"]
    assert state["columnOrder"] == state["selectedColumns"]  # MLflow applies the widths of the listed columns
    widths = state["columnWidths"]
    assert widths["tags.`t verdict`"] >= 6 * len("reference") and widths["params.`model.n_encoders`"] >= 6 * 16
    assert state["searchFilter"] == "tags.`twilbert.parent` = 'true' and tags.`twilbert.shown` = 'true'"
    assert tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND


def test_an_empty_store_says_to_run_the_pipeline_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    with pytest.raises(ViewError, match="make repro"):
        prepare(f"sqlite:///{tmp_path / 'mlflow.db'}", "twilbert")


# --------------------------------------------------------------------------------------------
# `make ui`'s refusals: one line, exit 2, before the server starts
# --------------------------------------------------------------------------------------------


def make_ui(cwd: Path, *args: str, timeout: float = 120, uri: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri or f"sqlite:///{cwd / 'mlflow.db'}"}
    return subprocess.run([sys.executable, "-m", "twilbert.pipeline.mlflow_sync", "--ui", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line(proc: subprocess.CompletedProcess, *phrases: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]


def test_make_ui_on_a_taken_port_fails_in_one_line(tmp_path):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = make_ui(tmp_path, "--port", str(port))
    assert_one_line(proc, f"port {port}", f"PORT={port + 1}")
    assert "open http" not in proc.stdout


def test_make_ui_on_a_damaged_store_says_how_to_move_it_aside(tmp_path):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "mlflow.db").write_bytes(b"not an sqlite file at all, " * 200)
    assert_one_line(make_ui(tmp_path, "--prepare-only"), "not an SQLite database", f"mv {tmp_path / 'mlflow.db'}")


def test_make_ui_on_a_locked_store_names_the_lock(tmp_path):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    holder = sqlite3.connect(str(tmp_path / "mlflow.db"), isolation_level=None)
    try:
        holder.execute("CREATE TABLE t (x)")
        holder.execute("BEGIN EXCLUSIVE")  # another process writing, and never letting go
        assert_one_line(make_ui(tmp_path, "--prepare-only"), "is locked by another process", "mv ")
    finally:
        holder.close()


def test_make_ui_on_a_directory_store_fails_at_once(tmp_path):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "mlflow.db").mkdir()
    assert_one_line(make_ui(tmp_path, "--prepare-only", timeout=60), "is a directory")


def test_make_ui_when_dvc_cannot_list_the_experiments_warns_and_opens_the_store_as_last_synced(synced, tmp_path):
    """`dvc exp show` fails while an experiment runs (its temporary refs): the UI still opens."""
    _, uri, _ = synced
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")  # no .dvc/: DVC refuses to list experiments
    proc = make_ui(tmp_path, "--prepare-only", uri=uri)
    assert proc.returncode == 0, proc.stderr
    assert "warning: MLflow sync: cannot read DVC's experiments" in proc.stderr
    assert "open http" in proc.stdout and "2 experiment run(s)" in proc.stdout
