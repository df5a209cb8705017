"""MLflow tracking: an unreachable store never kills training, parallel runs share one SQLite store."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from twilbert.config import ConfigError, TrackingConfig, load_config
from twilbert.tracking.runs import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    MAX_KEY_CHARS,
    MAX_PARAM_CHARS,
    Tracker,
    TrackingUnavailableError,
    flatten,
    is_locked_error,
    local_store_uri,
    repo_root,
)

pytestmark = pytest.mark.reliability

BOUND_S = 15.0  # MLflow's own HTTP retries would take minutes


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("project")
    (root / "dvc.yaml").write_text("stages: {}\n")
    return root


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed once the with-block ends: connections are refused


def runs_named(root, name: str):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=local_store_uri(root))
    exp = client.get_experiment_by_name("twilbert")
    # a stage's run is named after the stage's run name and its DVC experiment (here the workspace)
    runs = client.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{name}@workspace'")
    return client, runs


def test_an_unreachable_server_falls_back_to_the_local_store_quickly(in_project, caplog):
    cfg = TrackingConfig(uri=f"http://127.0.0.1:{closed_port()}")
    start = time.monotonic()
    with caplog.at_level(logging.WARNING):
        tracker = Tracker(cfg, stage="pretrain")
        with tracker.start({"model": {"n_encoders": 2}}, run_name="fallback-run"):
            tracker.log_metrics({"loss": 1.25}, step=3)
    assert time.monotonic() - start < BOUND_S
    assert "unreachable" in caplog.text and "local store" in caplog.text
    client, runs = runs_named(in_project, "fallback-run")
    assert len(runs) == 1
    assert runs[0].data.params["model.n_encoders"] == "2"
    assert [(m.step, m.value) for m in client.get_metric_history(runs[0].info.run_id, "loss")] == [(3, 1.25)]
    assert runs[0].info.status == "FINISHED"


def test_an_unreachable_server_with_fail_stops_before_training_with_a_clear_error(in_project):
    cfg = TrackingConfig(uri=f"http://user:secret@127.0.0.1:{closed_port()}", on_unreachable="fail")
    trained = []
    start = time.monotonic()
    with pytest.raises(TrackingUnavailableError, match=r"unreachable.*tracking\.on_unreachable is 'fail'") as info:
        with Tracker(cfg, stage="pretrain").start({}):
            trained.append(True)
    assert time.monotonic() - start < BOUND_S
    assert trained == [] and "secret" not in str(info.value)
    assert isinstance(info.value, ConfigError)  # stages print it as one line and exit 2


def test_a_server_that_accepts_but_never_answers_is_bounded_by_the_timeout(in_project):
    with socket.socket() as hang:  # listens, never accepts nor answers
        hang.bind(("127.0.0.1", 0))
        hang.listen(8)
        cfg = TrackingConfig(uri=f"http://127.0.0.1:{hang.getsockname()[1]}", timeout=1.0, on_unreachable="fail")
        start = time.monotonic()
        with pytest.raises(TrackingUnavailableError, match="no HTTP answer"):
            with Tracker(cfg, stage="finetune").start({}):
                pass
        assert time.monotonic() - start < 5.0


def test_a_logging_failure_during_training_is_reported_once_and_training_goes_on(in_project, caplog):
    tracker = Tracker(TrackingConfig(), stage="finetune")
    steps = []
    with caplog.at_level(logging.WARNING):
        with tracker.start({}, run_name="flaky"):
            def broken(*args, **kwargs):
                raise ConnectionError("store went away")

            tracker._client.log_batch = broken
            tracker._client.log_artifact = broken
            for step in range(3):
                tracker.log_metrics({"loss": 1.0}, step=step)
                tracker.log_artifact(in_project / "dvc.yaml")
                steps.append(step)
    assert steps == [0, 1, 2]
    assert caplog.text.count("tracking is off") == 1 and "store went away" in caplog.text


def test_an_error_in_training_propagates_and_marks_the_run_failed(in_project):
    with pytest.raises(ValueError, match="boom"):
        with Tracker(TrackingConfig(), stage="pretrain").start({}, run_name="crashing"):
            raise ValueError("boom")
    _, runs = runs_named(in_project, "crashing")
    assert [r.info.status for r in runs] == ["FAILED"]


def full_params(n_encoders: int) -> dict:
    """A config with more params than MLflow takes in one call (100)."""
    return {"model": {"n_encoders": n_encoders, **{f"k{i}": i for i in range(150)}}, "seed": 1}


def parents(root):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=local_store_uri(root))
    exp = client.get_experiment_by_name("twilbert")
    return client, exp, client.search_runs([exp.experiment_id], filter_string="tags.`twilbert.parent` = 'true'")


def test_an_experiment_is_one_parent_run_with_every_param_and_no_score_of_a_stage(tmp_path, monkeypatch):
    """The stages log their own metrics on their child runs; the parents' scores come from the sync
    (twilbert.pipeline.mlflow_sync, tests/test_mlflow_view.py) alone."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for name, n_encoders in (("workspace", 2), ("enc4", 4)):
        monkeypatch.setenv("DVC_EXP_NAME", name)
        for stage in ("pretrain", "evaluate"):
            tracker = Tracker(TrackingConfig(), stage=stage)
            with tracker.start({"stage_only": stage}, run_name=stage, experiment_params=full_params(n_encoders)):
                tracker.log_metrics({"test_official": n_encoders / 10})
    client, exp, found = parents(tmp_path)
    assert exp.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND  # the UI opens on the runs table
    by_name = {r.info.run_name: r for r in found}
    assert set(by_name) == {"workspace", "enc4"}  # one parent per experiment, not one per stage
    for name, n_encoders in (("workspace", 2), ("enc4", 4)):
        data = by_name[name].data
        assert data.params["model.n_encoders"] == str(n_encoders) and len(data.params) == 152
        assert data.metrics == {}
        assert data.tags["dvc.exp_name"] == name
    children = client.search_runs([exp.experiment_id], filter_string="tags.`twilbert.pipeline.stage` = 'evaluate'")
    assert sorted(r.info.run_name for r in children) == ["evaluate@enc4", "evaluate@workspace"]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {r.info.run_id for r in found}


def test_changed_params_in_the_same_workspace_open_a_new_parent(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    for var in ("MLFLOW_TRACKING_URI", "DVC_EXP_NAME"):
        monkeypatch.delenv(var, raising=False)
    for n_encoders in (2, 2, 3):
        with Tracker(TrackingConfig(), stage="pretrain").start({}, experiment_params=full_params(n_encoders)):
            pass
    _, _, found = parents(tmp_path)
    assert sorted(r.data.params["model.n_encoders"] for r in found) == ["2", "3"]


def test_only_rank_zero_tracks(in_project, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    tracker = Tracker(TrackingConfig(uri=f"http://127.0.0.1:{closed_port()}", on_unreachable="fail"), "pretrain")
    with tracker.start({}):  # no probe, no error: rank 1 never talks to the store
        tracker.log_metrics({"loss": 1.0})
    assert tracker.run_id is None


WORKER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from twilbert.config import TrackingConfig
    from twilbert.tracking.runs import Tracker

    uri, me, other = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    me.touch()
    while not other.exists():  # start together: the fresh store's creation is the race
        time.sleep(0.01)
    tracker = Tracker(TrackingConfig(uri=uri), stage="finetune")
    with tracker.start({"worker": me.name}, run_name=me.name):
        for step in range(40):
            tracker.log_metrics({f"m{k}": step + k for k in range(5)}, step=step)
    assert not tracker._failed, "tracking was switched off"
""")


def test_two_processes_logging_into_one_fresh_sqlite_store_record_every_metric(tmp_path):
    import mlflow

    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    uri = local_store_uri(tmp_path)
    ready = [tmp_path / "ready-a", tmp_path / "ready-b"]
    procs = [
        subprocess.Popen([sys.executable, "-c", WORKER, uri, str(ready[i]), str(ready[1 - i])], cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out
        assert "database is locked" not in out and "Traceback" not in out, out

    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("twilbert").experiment_id],
                              filter_string="tags.`twilbert.pipeline.stage` = 'finetune'")
    assert len(runs) == 2
    recorded = sum(len(client.get_metric_history(r.info.run_id, f"m{k}")) for r in runs for k in range(5))
    assert recorded == 2 * 40 * 5  # 200 metric values per process
    assert len({r.data.tags["mlflow.parentRunId"] for r in runs}) == 1  # one parent, not one per racer


# --------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------


def test_repo_root_resolves_past_a_queued_experiment_copy(tmp_path):
    copy = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpab12cd" / "stages"
    copy.mkdir(parents=True)
    (copy.parent / "dvc.yaml").write_text("stages: {}\n")  # the copy has its own dvc.yaml: not the root
    assert repo_root(copy) == tmp_path / "repo"


def test_repo_root_walks_up_to_the_dvc_project(tmp_path):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "a" / "b").mkdir(parents=True)
    assert repo_root(tmp_path / "a" / "b") == tmp_path


def test_flatten_dots_nested_keys_and_caps_long_values():
    flat = flatten({"model": {"pkm_params": {"in_layers": [1, 2]}}, "note": "x" * 7000, "n": 3})
    assert flat["model.pkm_params.in_layers"] == "[1, 2]"
    assert flat["n"] == "3"
    assert len(flat["note"]) == MAX_PARAM_CHARS and flat["note"].endswith("...")


def test_flatten_keeps_keys_within_mlflows_rules():
    flat = flatten({"labels": {"P+": 1, "NEU": 2}, "k" * 300: 1, "k" * 299 + "x": 2})
    assert {"labels.P_", "labels.NEU"} <= set(flat)
    long_keys = [k for k in flat if k.startswith("kkk")]
    assert len(long_keys) == 2 and all(len(k) <= MAX_KEY_CHARS for k in long_keys)


def test_our_limits_are_mlflows():
    from mlflow.utils import validation

    assert MAX_PARAM_CHARS == validation.MAX_PARAM_VAL_LENGTH
    assert MAX_KEY_CHARS == validation.MAX_ENTITY_KEY_LENGTH


def test_locked_errors_are_recognized_through_wrapping():
    try:
        try:
            raise RuntimeError("(sqlite3.OperationalError) database is locked")
        except RuntimeError as inner:
            raise ValueError("MlflowException: internal error") from inner
    except ValueError as outer:
        assert is_locked_error(outer)
    assert not is_locked_error(ValueError("no such table"))


def test_tracking_config_rejects_bad_values_naming_the_key(tiny_raw):
    tiny_raw["tracking"]["timeout"] = 0
    with pytest.raises(ConfigError, match=r"tracking\.timeout"):
        load_config(tiny_raw)
    tiny_raw["tracking"].update(timeout=5.0, on_unreachable="ignore")
    with pytest.raises(ConfigError, match=r"tracking\.on_unreachable"):
        load_config(tiny_raw)


def test_a_rerun_of_a_stage_replaces_its_child_under_the_same_parent(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    for var in ("MLFLOW_TRACKING_URI", "DVC_EXP_NAME"):
        monkeypatch.delenv(var, raising=False)
    for _ in range(3):  # three reruns of the same configuration, as `dvc repro -f` would
        for task in ("a", "b"):
            with Tracker(TrackingConfig(), stage="finetune").start({}, run_name=f"finetune-{task}-s0",
                                                                     experiment_params=full_params(2)):
                pass
    client, exp, found = parents(tmp_path)
    assert len(found) == 1
    children = client.search_runs([exp.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{found[0].info.run_id}'")
    assert sorted(r.info.run_name for r in children) == ["finetune-a-s0@workspace", "finetune-b-s0@workspace"]


def test_a_commit_between_two_stages_keeps_them_under_one_parent(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    for stage, commit in (("pretrain", "a" * 40), ("finetune", "b" * 40)):
        monkeypatch.setenv("DVC_EXP_BASELINE_REV", commit)
        with Tracker(TrackingConfig(), stage=stage).start({}, experiment_params=full_params(2)):
            pass
    _, _, found = parents(tmp_path)
    assert len(found) == 1 and found[0].data.tags["git.commit"] == "b" * 40


def test_a_stage_that_fails_before_its_run_opens_marks_its_parent_failed(tmp_path, monkeypatch):
    import mlflow

    from helpers import REPO
    from twilbert.config import compose

    (tmp_path / "conf").symlink_to(REPO / "conf")
    overrides = ["tasks.tass_default.dataset.data_dir=nowhere"]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.chdir(tmp_path)
    # the pipeline so far: a stage of this configuration ran and finished
    with Tracker(TrackingConfig(), stage="pretrain").start({}, experiment_params=compose(overrides, REPO / "conf")):
        pass
    env = {k: v for k, v in __import__("os").environ.items() if k != "DVC_EXP_NAME"}
    proc = subprocess.run([sys.executable, str(REPO / "stages" / "finetune.py"), "--task", "tass_default", *overrides],
                          cwd=tmp_path, env={**env, "MLFLOW_TRACKING_URI": uri}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "nowhere" in proc.stderr, proc.stderr[-2000:]
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("twilbert")
    found = client.search_runs([exp.experiment_id], filter_string="tags.`twilbert.parent` = 'true'")
    assert [r.info.status for r in found] == ["FAILED"]
