"""`make ui`'s view: the parent runs with the params that differ among them and each task's test score."""

from __future__ import annotations

import json

import pytest

from twilbert.config import TrackingConfig
from twilbert.tracking.runs import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, Tracker, local_store_uri
from twilbert.tracking.view import SHARED_VIEW_TAG, VIEW_KEY, ViewError, prepare


def experiment(n_encoders: int) -> dict:
    return {"seed": 1, "model": {"n_encoders": n_encoders, "hidden_size": 64}, "training": {"lr": 0.001}}


def test_the_view_shows_the_changed_param_and_each_tasks_test_score_in_model_training_mode(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for name, n_encoders in (("workspace", 2), ("enc4", 4)):
        monkeypatch.setenv("DVC_EXP_NAME", name)
        tracker = Tracker(TrackingConfig(), stage="evaluate")
        with tracker.start({}, run_name="evaluate", experiment_params=experiment(n_encoders)):
            tracker.log_experiment_metrics({"tass_default.test_official": n_encoders / 10,
                                            "tass_default.test_official_sd": 0.01,
                                            "tass_default.tfidf.test_official": 0.4})
    uri = local_store_uri(tmp_path)
    view = prepare(uri, "twilbert")
    assert view.n_parents == 2
    assert view.params == ["model.n_encoders"]  # hidden_size, lr and seed are the same in both
    assert view.metrics == ["tass_default.test_official", "tass_default.tfidf.test_official"]
    assert "workflowType=machine_learning" in view.path() and f"viewStateShareKey={VIEW_KEY}" in view.path()
    tags = mlflow.MlflowClient(tracking_uri=uri).get_experiment_by_name("twilbert").tags
    state = json.loads(tags[SHARED_VIEW_TAG + VIEW_KEY])
    assert state["selectedColumns"] == ["params.`model.n_encoders`", "metrics.`tass_default.test_official`",
                                        "metrics.`tass_default.tfidf.test_official`"]
    assert state["searchFilter"] == "tags.`twilbert.parent` = 'true'"
    assert tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND


def test_an_empty_store_says_to_run_the_pipeline_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    with pytest.raises(ViewError, match="make repro"):
        prepare(local_store_uri(tmp_path), "twilbert")
