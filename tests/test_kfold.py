"""k-fold training: seeded (stratified) folds, blending by the mean, one saved model per fold."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from finetune_data import MAX_LEN, first, make_config, make_pretrained, write_task
from helpers import REPO
from twilbert.config import TaskSpec, compose
from twilbert.data.tasks import load_task
from twilbert.evaluation.scoring import evaluate_scores, predict_scores
from twilbert.model.finetuned import load_classifier_module
from twilbert.train.finetune.learner_run import FoldResult, blend, evaluate_learner, fold_splits, run_kfold
from twilbert.train.finetune.learners import encode_examples, twilbert_learner
from twilbert.train.finetune.resolved import resolve_finetune_run
from twilbert.train.finetune.stage_work import finetune_task

SINGLE = TaskSpec(categories={"a": 0, "b": 1, "c": 2})


@pytest.fixture(scope="module")
def raw():
    return compose(["model=tiny"], REPO / "conf")


def test_folds_partition_the_data_and_keep_class_proportions():
    labels = [0] * 12 + [1] * 6 + [2] * 3
    splits = fold_splits(labels, SINGLE, 3, seed=7)
    held = np.concatenate([h for _, h in splits])
    assert sorted(held.tolist()) == list(range(len(labels)))
    for train_idx, held_idx in splits:
        assert not set(train_idx) & set(held_idx)
        assert Counter(labels[i] for i in held_idx) == {0: 4, 1: 2, 2: 1}
    assert [h.tolist() for _, h in splits] == [h.tolist() for _, h in fold_splits(labels, SINGLE, 3, seed=7)]
    assert [h.tolist() for _, h in splits] != [h.tolist() for _, h in fold_splits(labels, SINGLE, 3, seed=8)]


@pytest.mark.parametrize("spec", [TaskSpec(multi_label=True, categories={"x": 0, "y": 1}), TaskSpec(regression=True)])
def test_multi_label_and_regression_fall_back_to_plain_kfold(spec):
    labels = [[1, 0]] * 5 + [[0, 1]] * 5 if spec.multi_label else list(np.linspace(0, 1, 10))
    splits = fold_splits(labels, spec, 5, seed=0)
    assert sorted(np.concatenate([h for _, h in splits]).tolist()) == list(range(10))
    assert all(len(h) == 2 for _, h in splits)


def test_too_few_examples_for_the_folds_is_an_error():
    with pytest.raises(ValueError, match="more folds than the 2 examples"):
        fold_splits([0, 1], SINGLE, 3, seed=0)


def test_blended_probabilities_are_the_mean_of_the_folds():
    rng = np.random.default_rng(0)
    labels = [0, 1, 2] * 4
    test_scores = {}

    def train_fold(fold, train_idx, held_idx):
        scores = rng.dirichlet(np.ones(3), size=5).astype(np.float32)
        test_scores[fold] = scores
        return FoldResult(score=fold / 10, held_out=np.full((len(held_idx), 3), fold, dtype=np.float32),
                          outputs={"test": scores})

    outcome = run_kfold(labels, SINGLE, 3, seed=1, train_fold=train_fold)
    np.testing.assert_allclose(outcome.blended["test"], (test_scores[0] + test_scores[1] + test_scores[2]) / 3, rtol=1e-6)
    np.testing.assert_allclose(blend(list(test_scores.values())), outcome.blended["test"])
    assert outcome.fold_scores == [0.0, 0.1, 0.2] and outcome.mean_fold_score == pytest.approx(0.1)
    for fold, (_, held_idx) in enumerate(fold_splits(labels, SINGLE, 3, seed=1)):
        assert (outcome.out_of_fold[held_idx] == fold).all()


def test_kfold_finetuning_blends_the_saved_fold_models(tmp_path, raw):
    pretrained = make_pretrained(tmp_path / "pretrained")
    cfg = make_config(raw, {"t": write_task(tmp_path / "data", sizes=(40, 12, 12))}, epochs=1, kfold=2)
    task = first(cfg)
    learner = twilbert_learner(resolve_finetune_run(cfg, task, pretrained), tracker=None)
    run = evaluate_learner(learner, load_task(task, cfg.seed), MAX_LEN, MAX_LEN, tmp_path / "model")
    metrics, kfold = run.metrics, run.metrics["kfold"]
    assert kfold["k"] == 2 and len(kfold["fold_scores"]) == 2 and kfold["on"] == "train"
    assert kfold["mean_fold_score"] == pytest.approx(np.mean(kfold["fold_scores"]))
    assert metrics["n_train"] == 40 and metrics["epochs_run"] == 2

    test_probs = []
    for fold in range(2):
        model, packer, _ = load_classifier_module(tmp_path / "model" / "folds" / str(fold))
        test = encode_examples(packer, load_task(task, cfg.seed).test, MAX_LEN, task)
        test_probs.append(predict_scores(model, test, task, 64, torch.device("cpu"), packer=packer))
    assert not np.allclose(test_probs[0], test_probs[1])
    np.testing.assert_allclose(run.kfold.blended["test"], (test_probs[0] + test_probs[1]) / 2, rtol=1e-5, atol=1e-7)
    assert metrics["test"] == evaluate_scores(task, test["labels"], run.kfold.blended["test"])

    top = json.loads((tmp_path / "model" / "config.json").read_text())
    assert top["kfold"]["members"] == ["folds/0", "folds/1"]
    assert top["kfold"]["selected_fold"] == int(np.argmax(kfold["fold_scores"]))
    load_classifier_module(tmp_path / "model")  # the directory itself is a usable model (the best fold)


def test_kfold_on_train_and_dev_reports_out_of_fold_dev(tmp_path, raw):
    cfg = make_config(raw, {"t": write_task(tmp_path / "data", sizes=(40, 12, 12))}, backbone="baseline", kfold=3,
                      kfold_on="train+dev")
    metrics = finetune_task(cfg, first(cfg), tmp_path / "no-pretrained", tmp_path / "model", tmp_path / "results")
    assert metrics["n_train"] == 52 and metrics["kfold"]["dev_is_out_of_fold"]
    assert metrics["model"] == "baseline" and metrics["epochs_run"] is None
    assert sorted(p.name for p in (tmp_path / "model" / "folds").iterdir()) == ["0", "1", "2"]
