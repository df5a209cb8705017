"""Runs whose score says little are warned about in the log and marked ⚠ in the results tables."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from finetune_data import first, make_config, make_pretrained, write_task
from helpers import REPO
from twilbert.config import TaskSpec, compose
from twilbert.evaluation.predictions import Predictions
from twilbert.reports.rendering import render_results
from twilbert.train.finetune.degenerate import run_warnings
from twilbert.train.finetune.stage_work import baseline_task

SPEC = TaskSpec(categories={"P": 0, "N": 1, "NEU": 2})


def predictions(pred: list[int]) -> Predictions:
    return Predictions([str(i) for i in range(len(pred))], np.zeros(len(pred), dtype=int), np.array(pred), SPEC)


def test_a_model_predicting_one_class_on_test_is_flagged_naming_the_class():
    found = run_warnings(SPEC, [0, 1, 2] * 20, predictions([1, 1, 1, 1]))
    assert found == ["predicts a single class on test (N for all 4 examples)"]


def test_a_training_set_with_too_few_examples_per_class_is_flagged():
    assert run_warnings(SPEC, [0, 1, 2, 0, 1, 2, 0], predictions([0, 1]))[0].startswith(
        "small training set: 7 examples for 3 classes")
    assert run_warnings(SPEC, [0] * 40 + [1] * 40 + [2] * 2, predictions([0, 1])) == [
        "classes with fewer than 5 training examples: NEU 2"]


def test_a_sound_run_and_a_regression_run_are_not_flagged():
    assert run_warnings(SPEC, [0, 1, 2] * 20, predictions([0, 1, 2, 0])) == []
    assert run_warnings(TaskSpec(regression=True, eval_metric="pearson"), [0.1] * 3, None) == []


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    return make_pretrained(tmp_path_factory.mktemp("pre") / "pretrained")


def test_a_tiny_task_is_warned_in_the_log_and_marked_in_both_tables(tmp_path, pretrained, caplog):
    raw = compose(["model=tiny"], REPO / "conf")
    cfg = make_config(raw, {"t": write_task(tmp_path / "data", sizes=(12, 8, 8))}, baseline_row=True)
    with caplog.at_level(logging.WARNING):
        baseline_task(cfg, first(cfg), pretrained, tmp_path / "model", tmp_path / "baseline")
    assert "t (baseline): small training set: 12 examples for 4 classes" in caplog.text
    metrics = json.loads((tmp_path / "baseline" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["warnings"][0].startswith("small training set")
    table = render_results([tmp_path / "baseline" / "metrics.json"])["results.md"]
    marked = [line for line in table.splitlines() if line.startswith("| t |")]
    assert len(marked) == 2 and all("| tfidf ⚠ |" in line for line in marked)
    assert "- t tfidf: small training set: 12 examples for 4 classes" in table
