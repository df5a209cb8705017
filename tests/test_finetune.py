"""Finetuning one task: freezing, early stopping, task shapes, missing splits, per-task overrides."""

from __future__ import annotations

import csv
import json
from collections import Counter

import numpy as np
import pytest
import torch
import yaml

import twilbert.train.finetune.learners as finetune
from finetune_data import MAX_LEN, first, make_config, make_pretrained, write_task
from helpers import REPO
from twilbert.config import ConfigError, compose, load_config
from twilbert.data.tasks import load_task
from twilbert.evaluation.scoring import decide, evaluate_scores, predict_scores
from twilbert.model.backbone import twilbert_classifier
from twilbert.model.card import HeadConfig, n_outputs, read_card
from twilbert.model.finetuned import load_classifier_module
from twilbert.model.io import load_pretrained_state
from twilbert.train.finetune.learners import encode_examples
from twilbert.train.finetune.stage_work import finetune_task


@pytest.fixture(scope="module")
def raw():
    return compose(["model=tiny"], REPO / "conf")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    return make_pretrained(tmp_path_factory.mktemp("pre") / "pretrained")


@pytest.fixture(scope="module")
def unshared(tmp_path_factory):
    return make_pretrained(tmp_path_factory.mktemp("pre") / "unshared", cross_sharing=False)


def run(tmp_path, cfg, pretrained, name=None):
    task = first(cfg, name)
    metrics = finetune_task(cfg, task, pretrained, tmp_path / "model" / task.name, tmp_path / "results" / task.name)
    return metrics, tmp_path / "model" / task.name, tmp_path / "results" / task.name


def encoder_state(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.startswith("twilbert.")}


def test_frozen_encoder_keeps_its_pretrained_weights_while_the_head_learns(tmp_path, raw, pretrained):
    cfg = make_config(raw, {"t": write_task(tmp_path / "data")}, finetune_all=False, lr=1e-2)
    metrics, model_dir, _ = run(tmp_path, cfg, pretrained)
    _, before = load_pretrained_state(pretrained)
    _, after = load_pretrained_state(model_dir)
    for name, tensor in encoder_state(after).items():
        assert torch.equal(tensor, before[name]), name
    torch.manual_seed(cfg.seed)
    fresh = twilbert_classifier(read_card(pretrained), HeadConfig.of(cfg.finetuning), n_outputs(first(cfg)))
    assert not torch.equal(after["classifier.out.weight"], fresh.classifier.out.weight.detach())


@pytest.mark.parametrize("shared", [False, True])
def test_trainable_layers_trains_only_the_top_layers(tmp_path, raw, request, shared):
    # under cross-sharing the top layer is the one shared layer: it trains, the embeddings do not
    pretrained = request.getfixturevalue("pretrained" if shared else "unshared")
    top = ".layers.0." if shared else ".layers.1."
    cfg = make_config(raw, {"t": write_task(tmp_path / "data")}, trainable_layers=1, lr=1e-2)
    _, model_dir, _ = run(tmp_path, cfg, pretrained)
    _, before = load_pretrained_state(pretrained)
    _, after = load_pretrained_state(model_dir)
    frozen = [k for k in encoder_state(after) if top not in k]
    trained = [k for k in encoder_state(after) if top in k]
    assert frozen and trained
    assert all(torch.equal(after[k], before[k]) for k in frozen)
    assert any(not torch.equal(after[k], before[k]) for k in trained)


def test_early_stopping_stops_after_patience_epochs_and_restores_the_best_epoch(tmp_path, raw, pretrained, monkeypatch):
    cfg = make_config(raw, {"t": write_task(tmp_path / "data")}, epochs=8, patience=2, lr=1e-2)
    scripted = iter([0.2, 0.7, 0.5, 0.6, 0.9, 0.9])  # best at epoch 2, then two epochs without improvement
    weights_at_epoch = []

    def fake_score_split(model, data, task, ft, device, packer=None):
        weights_at_epoch.append(model.classifier.out.weight.detach().clone())
        return {"official": next(scripted), "mf1": 0.0}

    monkeypatch.setattr(finetune, "score_split", fake_score_split)
    metrics, model_dir, results = run(tmp_path, cfg, pretrained)
    assert (metrics["best_epoch"], metrics["epochs_run"]) == (2, 4)
    _, state = load_pretrained_state(model_dir)
    assert torch.equal(state["classifier.out.weight"], weights_at_epoch[1])
    assert not torch.equal(weights_at_epoch[1], weights_at_epoch[3])
    # test is scored by the restored epoch-2 model
    model, packer, config = load_classifier_module(model_dir)
    task = first(cfg)
    test = encode_examples(packer, load_task(task, cfg.seed).test, MAX_LEN, task)
    scores = predict_scores(model, test, task, 64, torch.device("cpu"), packer=packer)
    assert metrics["test"] == evaluate_scores(task, test["labels"], scores)
    assert json.loads((results / "metrics.json").read_text())["best_epoch"] == 2 == config.best_epoch


def test_multi_label_task_trains_with_bce_and_reports_jaccard(tmp_path, raw, pretrained, monkeypatch):
    used = []
    real = finetune.build_loss
    monkeypatch.setattr(finetune, "build_loss", lambda name, *a, **k: used.append(name) or real(name, *a, **k))
    cfg = make_config(raw, {"emo": write_task(tmp_path / "data", "multi")}, epochs=1)
    metrics, _, _ = run(tmp_path, cfg, pretrained)
    assert used[-1] == "binary_crossentropy"
    assert metrics["official_metric"] == "jaccard"
    assert metrics["test"]["official"] == metrics["test"]["jaccard"]
    assert {"micro_f1", "macro_f1"} <= set(metrics["test"])


def test_regression_task_reports_pearson(tmp_path, raw, pretrained):
    cfg = make_config(raw, {"reg": write_task(tmp_path / "data", "regression")}, epochs=1)
    metrics, _, _ = run(tmp_path, cfg, pretrained)
    assert metrics["official_metric"] == "pearson"
    assert set(metrics["test"]) == {"pearson", "mse", "official"}
    assert -1.0 <= metrics["test"]["pearson"] <= 1.0


def test_task_without_dev_file_gets_a_stratified_dev_split_from_train(tmp_path, raw, pretrained):
    cfg = make_config(raw, {"t": write_task(tmp_path / "data", sizes=(48, 0, 16), dev=False)}, epochs=1)
    metrics, _, _ = run(tmp_path, cfg, pretrained)
    assert metrics["dev_from_train"] and not metrics["test_is_dev"]
    assert (metrics["n_train"], metrics["n_dev"]) == (40, 8)
    splits = load_task(first(cfg), cfg.seed)
    assert Counter(splits.dev.labels) == {0: 2, 1: 2, 2: 2, 3: 2}  # 12 of each class in train


def test_task_without_test_file_reports_dev_as_test_when_asked(tmp_path, raw, pretrained):
    cfg = make_config(raw, {"t": write_task(tmp_path / "data", test=False)}, epochs=1, no_test_protocol="dev_as_test")
    metrics, _, _ = run(tmp_path, cfg, pretrained)
    assert metrics["test_is_dev"] and metrics["protocol"] == "dev_as_test"
    assert metrics["test"] == metrics["dev"] and metrics["n_test"] == metrics["n_dev"]


def test_per_task_override_is_applied_to_that_task_only(tmp_path, raw, pretrained):
    tasks = {"a": write_task(tmp_path / "a"), "b": write_task(tmp_path / "b")}
    tasks["a"]["finetuning"] = {"epochs": 1, "collapse_mode": "cls", "patience": 1}
    cfg = make_config(raw, tasks, epochs=2, patience=5)
    ft_a = cfg.tasks["a"].finetuning_config(cfg.finetuning)
    assert (ft_a.epochs, ft_a.collapse_mode, ft_a.batch_size) == (1, "cls", 16)
    a, a_dir, _ = run(tmp_path, cfg, pretrained, "a")
    b, b_dir, _ = run(tmp_path, cfg, pretrained, "b")
    assert (a["epochs_run"], b["epochs_run"]) == (1, 2)
    head = lambda d: json.loads((d / "config.json").read_text())["head"]["collapse_mode"]  # noqa: E731
    assert (head(a_dir), head(b_dir)) == ("cls", "avg")


@pytest.mark.parametrize(
    "override,message",
    [
        ({"epoch": 3}, r"tasks\.t\.finetuning\.epoch\b"),
        ({"lr": "fast"}, r"tasks\.t\.finetuning\.lr must be a number"),
        ({"kfold": 1}, r"tasks\.t\.finetuning\.kfold must be 0"),
        ({"backbone": "hf"}, r"tasks\.t\.finetuning\.hf_path must name"),
    ],
)
def test_bad_task_override_is_rejected_with_its_dotted_name(tmp_path, raw, override, message):
    task = write_task(tmp_path / "data")
    task["finetuning"] = override
    with pytest.raises(ConfigError, match=message):
        make_config(raw, {"t": task})


def test_loss_unfit_for_the_task_is_rejected_on_load(tmp_path, raw):
    with pytest.raises(ConfigError, match=r"tasks\.t\.finetuning\.loss \('mse'\)"):
        make_config(raw, {"t": write_task(tmp_path / "data")}, loss="mse")


@pytest.mark.reliability
def test_max_len_beyond_the_pretrained_positions_is_rejected_before_training(tmp_path, raw, pretrained):
    # a task with a second text: rows are 2 * max_len + 3 wide, one more token per text needs 2 more positions
    cfg = make_config(raw, {"t": write_task(tmp_path / "data", aux=True)})
    cfg.representation.max_len = MAX_LEN + 1
    with pytest.raises(ConfigError, match=rf"representation\.max_len={MAX_LEN + 1} gives rows of {2 * MAX_LEN + 5} "):
        run(tmp_path, cfg, pretrained)
    assert not (tmp_path / "model").exists() and not (tmp_path / "results").exists()


@pytest.mark.parametrize("optimizer,noam,accum", [("lamb", True, 2), ("SGD", False, 3)])
def test_optimizer_noam_and_accumulation_settings_train(tmp_path, raw, pretrained, optimizer, noam, accum):
    cfg = make_config(raw, {"t": write_task(tmp_path / "data", aux=True)}, epochs=1, optimizer=optimizer,
                      noam_annealing=noam, warmup_steps=2, accum_iters=accum, n_hidden=1, hidden_size=8,
                      use_special_tokens=False)
    metrics, model_dir, _ = run(tmp_path, cfg, pretrained)
    assert metrics["epochs_run"] == 1
    _, state = load_pretrained_state(model_dir)
    assert state["classifier.hidden.0.weight"].shape == (8, 16)


def test_finetuned_model_reloads_and_predicts_as_evaluated(tmp_path, raw, pretrained):
    cfg = make_config(raw, {"t": write_task(tmp_path / "data")}, epochs=1)
    metrics, model_dir, _ = run(tmp_path, cfg, pretrained)
    model, packer, config = load_classifier_module(model_dir)
    assert config.backbone == "twilbert"
    assert {"model", "vocab_size", "max_positions", "head", "task", "max_len_test"} <= set(config.to_dict())
    assert {"spm.model", "meta.json", "model.safetensors", "config.json"} <= {p.name for p in model_dir.iterdir()}
    task = first(cfg)
    test = encode_examples(packer, load_task(task, cfg.seed).test, MAX_LEN, task)
    scores = predict_scores(model, test, task, 64, torch.device("cpu"), packer=packer)
    assert metrics["test"] == evaluate_scores(task, test["labels"], scores)


def test_epochs_csv_holds_the_columns_the_dvc_plot_reads(tmp_path, raw, pretrained):
    cfg = make_config(raw, {"t": write_task(tmp_path / "data")})
    _, _, results = run(tmp_path, cfg, pretrained)
    with (results / "epochs.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    # evaluate copies these columns to results/curves/finetune/<column>/<run>.csv, which dvc.yaml's plots draw
    plots = yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]
    specs = [d for p in plots for k, d in p.items() if k.startswith("results/curves/finetune/")]
    assert sorted(s["y"] for s in specs) == ["dev_official", "train_loss"]  # each curve its own axis
    # no shared title: DVC titles each run's chart with its file, <task>-s<seed>.csv (tests/test_dvc_plots.py)
    assert all("title" not in s and s["y_label"] for s in specs)
    assert all([int(r[s["x"]]) for r in rows] == [1, 2] for s in specs)
    assert all(0.0 <= float(r[s["y"]]) for s in specs for r in rows)
    assert all(0.0 <= float(r["dev_official"]) <= 1.0 for r in rows)


def test_dvc_finetune_and_baseline_stages_declare_their_metrics_files():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    run, baseline = stages["finetune"]["do"], stages["baseline"]["do"]
    assert [next(iter(m)) for m in run["metrics"]] == ["results/tasks/${item.task}/runs/s${item.seed}/metrics.json"]
    assert [next(iter(m)) for m in baseline["metrics"]] == ["results/tasks/${key}/baseline/metrics.json"]
    for stage in (run, baseline):
        assert "preprocess" in stage["params"] and "src/twilbert/model/baseline.py" in stage["deps"]


def test_auto_loss_is_the_default(raw):
    assert load_config(raw).finetuning.loss == "auto"


@pytest.mark.parametrize("weights,expected", [("auto", [1.0, 1.0, 1.0, 1.0]), ({"N": 3.0}, [1.0, 3.0, 1.0, 1.0])])
def test_class_weights_reach_the_loss(tmp_path, raw, pretrained, monkeypatch, weights, expected):
    seen = []
    real = finetune.SummedLoss
    monkeypatch.setattr(finetune, "SummedLoss", lambda name, spec, w=None: seen.append(w) or real(name, spec, w))
    task = write_task(tmp_path / "data")  # 12 examples of each class: auto weights are all 1
    task["task"]["class_weights"] = weights
    run(tmp_path, make_config(raw, {"t": task}, epochs=1), pretrained)
    assert seen[-1].tolist() == expected


def test_multi_label_decision_uses_the_task_threshold(raw, tmp_path):
    task = write_task(tmp_path / "data", "multi")
    task["task"]["threshold"] = 0.25
    cfg = make_config(raw, {"emo": task})
    scores = np.array([[0.3, 0.6, 0.2]])
    assert decide(scores, first(cfg)).tolist() == [[1, 1, 0]]


def test_the_child_runs_scores_are_the_selected_epochs_under_the_tables_names(tmp_path, raw, pretrained, monkeypatch):
    import mlflow

    from twilbert.config import TrackingConfig
    from twilbert.reports.rendering import render_results
    from twilbert.tracking.runs import Tracker

    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # 4 epochs and a patience that lets them all run: the last epoch is seldom the selected one
    cfg = make_config(raw, {"t": write_task(tmp_path / "data")}, epochs=4, patience=4, lr=1e-2)
    task = first(cfg)
    tracker = Tracker(TrackingConfig(), stage="finetune")
    with tracker.start({}, run_name="finetune-t-s0"):
        finetune_task(cfg, task, pretrained, tmp_path / "model", tmp_path / "results" / "runs" / "s0", tracker)
    child = mlflow.MlflowClient(tracking_uri=uri).get_run(tracker.run_id)
    table = render_results([tmp_path / "results" / "runs" / "s0" / "metrics.json"])["results.csv"]
    row = next(csv.DictReader(table.splitlines()))
    assert child.data.metrics["dev_official"] == pytest.approx(float(row["dev_official"]), abs=1e-12)
    assert child.data.metrics["test_official"] == pytest.approx(float(row["test_official"]), abs=1e-12)
    assert child.data.metrics["best_epoch"] == float(row["best_epoch"])
    history = mlflow.MlflowClient(tracking_uri=uri).get_metric_history(tracker.run_id, "epochs/dev_official")
    assert len(history) == 4  # the per-epoch curve keeps its own name
    best = max(history, key=lambda m: (m.value, -m.step))
    assert child.data.metrics["dev_official"] == pytest.approx(best.value)
