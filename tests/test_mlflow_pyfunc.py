"""Finetuned models logged as MLflow pyfunc models: loadable from a real local store, predicting as twilbert does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from finetune_data import first, make_config, make_pretrained, write_task
from helpers import REPO
from twilbert import load_classifier
from twilbert.config import TrackingConfig, compose
from twilbert.inference.pyfunc import save_classifier_model
from twilbert.tracking.runs import Tracker, local_store_uri
from twilbert.train.finetune.stage_work import finetune_task

mlflow = pytest.importorskip("mlflow")

TEXTS = ["hola que tal", "", "😂🙏", "odio el tráfico de la ciudad", "qué bonito día"]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project root (dvc.yaml) with a finetuned tiny model, as the finetune stage writes it."""
    root = tmp_path_factory.mktemp("project")
    (root / "dvc.yaml").write_text("stages: {}\n")
    pretrained = make_pretrained(root / "pretrained")
    tasks = {"t": write_task(root / "data"), "pair": write_task(root / "pair_data", aux=True)}
    cfg = make_config(compose(["model=tiny"], REPO / "conf"), tasks, epochs=1)
    for name in tasks:
        finetune_task(cfg, first(cfg, name), pretrained, root / "models" / name, root / "results" / name)
    return root


def logged_model_uri(project, task: str, monkeypatch) -> str:
    """Log the task's model through the Tracker into the project's SQLite store; its runs:/ URI."""
    tracker = Tracker(TrackingConfig(), stage="finetune")
    with tracker.start({"task": task}, run_name=f"finetune-{task}"):
        tracker.log_classifier(project / "models" / task, save_classifier_model)
    assert tracker.run_id is not None and not tracker._failed
    # the environment, not mlflow.set_tracking_uri: that would outlive the test (and reach other tests' subprocesses)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", local_store_uri(project))
    return f"runs:/{tracker.run_id}/model"


def test_a_logged_classifier_loads_from_the_local_store_and_predicts_as_twilbert(in_project, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    uri = logged_model_uri(in_project, "t", monkeypatch)
    loaded = mlflow.pyfunc.load_model(uri)
    clf = load_classifier(in_project / "models" / "t")
    ours = clf.predict(TEXTS)

    from_list = loaded.predict(TEXTS)
    from_frame = loaded.predict(pd.DataFrame({"text": TEXTS}))
    for out in (from_list, from_frame):
        assert list(out.columns) == ["label"] + [f"prob_{label}" for label in clf.labels]
        assert out["label"].tolist() == [p.label for p in ours]
        np.testing.assert_allclose(out[[f"prob_{c}" for c in clf.labels]].to_numpy(),
                                   [[p.probs[c] for c in clf.labels] for p in ours], atol=1e-6)

    signature = loaded.metadata.signature
    assert [c.name for c in signature.outputs.inputs] == ["label"] + [f"prob_{c}" for c in clf.labels]
    model_dir = Path(mlflow.artifacts.download_artifacts(uri))
    requirements = (model_dir / "requirements.txt").read_text().split()  # pinned here, not inferred
    assert {r.split("==")[0] for r in requirements} >= {"mlflow", "torch", "sentencepiece", "safetensors"}
    assert not list(model_dir.rglob("*.pkl"))  # models from code: nothing pickled


def test_a_two_text_model_takes_its_second_text_column(in_project, monkeypatch):
    uri = logged_model_uri(in_project, "pair", monkeypatch)
    loaded = mlflow.pyfunc.load_model(uri)
    frame = pd.DataFrame({"text": ["hola", "adiós"], "CONTEXT": ["contexto uno", ""]})
    out = loaded.predict(frame)
    clf = load_classifier(in_project / "models" / "pair")
    np.testing.assert_allclose(out[[f"prob_{c}" for c in clf.labels]].to_numpy(),
                               clf.scores(frame["text"], frame["CONTEXT"]), atol=1e-6)
    with pytest.raises(Exception, match="CONTEXT"):
        loaded.predict(pd.DataFrame({"text": ["hola"]}))


def test_logging_a_broken_model_directory_does_not_stop_the_stage(in_project, caplog):
    tracker = Tracker(TrackingConfig(), stage="finetune")
    with tracker.start({}, run_name="broken-model"):
        tracker.log_classifier(in_project / "no-such-model", save_classifier_model)
        tracker.log_metrics({"after": 1.0})  # tracking is off after a failure; nothing raises
    assert "MLflow: logging the MLflow model failed" in caplog.text


def test_the_model_is_a_logged_model_the_ui_lists_and_search_finds(in_project, monkeypatch):
    uri = logged_model_uri(in_project, "t", monkeypatch)
    run_id = uri.split("/")[1]
    models = mlflow.search_logged_models(experiment_ids=[mlflow.get_experiment_by_name("twilbert").experiment_id],
                                         filter_string=f"source_run_id = '{run_id}'", output_format="list")
    assert [(m.name, m.status.to_proto()) for m in models] == [("model", mlflow.entities.LoggedModelStatus.READY.to_proto())]
    run = mlflow.MlflowClient().get_run(run_id)
    assert [o.model_id for o in run.outputs.model_outputs] == [models[0].model_id]  # the run page's "Logged models"
    assert mlflow.pyfunc.load_model(f"models:/{models[0].model_id}").predict(["hola"]).shape[0] == 1


def test_a_copied_store_still_loads_its_model_with_no_path_of_the_original_inside(in_project, tmp_path, monkeypatch):
    import shutil

    uri = logged_model_uri(in_project, "t", monkeypatch)
    model_id = mlflow.MlflowClient().get_run(uri.split("/")[1]).outputs.model_outputs[0].model_id
    copy = tmp_path / "elsewhere"
    shutil.copytree(in_project / "mlartifacts", copy / "mlartifacts")
    shutil.copy(in_project / "mlflow.db", copy / "mlflow.db")
    [model_dir] = [p.parent for p in (copy / "mlartifacts").rglob("MLmodel") if model_id in str(p)]
    # MLflow's files (the model directory under artifacts/ is twilbert's own, checked elsewhere)
    for path in model_dir.rglob("*"):
        if path.is_file() and "artifacts" not in path.relative_to(model_dir).parts:
            text = path.read_text(encoding="utf-8", errors="replace")
            assert str(in_project) not in text and str(REPO) not in text, path  # no absolute path of the original
    # the original store moved away: nothing of it is read
    (in_project / "mlartifacts").rename(in_project / "mlartifacts.away")
    try:
        loaded = mlflow.pyfunc.load_model(str(model_dir))
        assert loaded.predict(TEXTS)["label"].tolist() == [p.label for p in load_classifier(
            in_project / "mlartifacts.away" / model_dir.relative_to(copy / "mlartifacts") / "artifacts" / "t").predict(TEXTS)]
    finally:
        (in_project / "mlartifacts.away").rename(in_project / "mlartifacts")


def test_a_rerun_replaces_the_logged_model_with_its_run(in_project, monkeypatch):
    first = logged_model_uri(in_project, "pair", monkeypatch).split("/")[1]
    second = logged_model_uri(in_project, "pair", monkeypatch).split("/")[1]
    exp = mlflow.get_experiment_by_name("twilbert").experiment_id
    sources = {m.source_run_id for m in mlflow.search_logged_models(experiment_ids=[exp], output_format="list")}
    assert second in sources and first not in sources
