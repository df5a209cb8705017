"""Results-table metrics, the official metric of each task, MLM accuracy and perplexity."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import jaccard_score

from twilbert.config import TaskSpec
from twilbert.evaluation.metrics import evaluate_predictions, mlm_accuracy, official_metric_name, perplexity

STANCE = {"AGAINST": 0, "NEUTRAL": 1, "FAVOR": 2}
Y_TRUE = np.array([0, 0, 1, 1, 2, 2])
Y_PRED = np.array([0, 1, 1, 1, 2, 0])
# class 0: P 1/2 R 1/2 F1 1/2; class 1: P 2/3 R 1 F1 4/5; class 2: P 1 R 1/2 F1 2/3


def test_single_label_macro_keys_and_accuracy():
    out = evaluate_predictions(TaskSpec(categories=STANCE), Y_TRUE, Y_PRED)
    assert out["mp"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert out["mr"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    assert out["mf1"] == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)
    assert out["acc"] == pytest.approx(4 / 6)
    assert out["official"] == out["mf1"]
    assert "f1" not in out and "stance_f1" not in out and "jaccard" not in out
    assert all(type(v) is float for v in out.values())


def test_stance_f1_averages_favor_and_against_only():
    out = evaluate_predictions(TaskSpec(categories=STANCE, stance_f1=True), Y_TRUE, Y_PRED)
    assert out["stance_f1"] == pytest.approx((1 / 2 + 2 / 3) / 2)  # NEUTRAL's 4/5 left out
    assert out["official"] == out["stance_f1"]


def test_stance_f1_finds_labels_by_name_whatever_their_index():
    spec = TaskSpec(categories={"NONE": 0, "FAVOR": 1, "AGAINST": 2}, stance_f1=True)
    out = evaluate_predictions(spec, Y_TRUE, Y_PRED)
    assert out["stance_f1"] == pytest.approx((4 / 5 + 2 / 3) / 2)


def test_stance_f1_without_favor_label_is_an_error():
    with pytest.raises(ValueError, match="FAVOR"):
        evaluate_predictions(TaskSpec(categories={"a": 0, "b": 1, "AGAINST": 2}, stance_f1=True), Y_TRUE, Y_PRED)


def test_class_metric_reports_the_humour_class_even_at_index_zero():
    spec = TaskSpec(categories={"HUMOR": 0, "NOT_HUMOR": 1}, class_metric="HUMOR")
    y_true, y_pred = np.array([0, 0, 0, 1, 1]), np.array([0, 0, 1, 0, 1])
    out = evaluate_predictions(spec, y_true, y_pred)
    # HUMOR: tp 2, fp 1, fn 1 -> P = R = F1 = 2/3 (NOT_HUMOR would give 1/2)
    assert (out["p"], out["r"], out["f1"]) == pytest.approx((2 / 3, 2 / 3, 2 / 3))
    assert out["official"] == out["f1"]


def test_binary_task_reports_f1_of_positive_class():
    spec = TaskSpec(categories={"no": 0, "yes": 1})
    out = evaluate_predictions(spec, np.array([1, 1, 0, 0]), np.array([1, 0, 1, 0]))
    assert out["f1"] == pytest.approx(0.5)
    assert out["official"] == out["mf1"]  # eval_metric f1 + macro


def test_absent_class_counts_in_macro_average():
    spec = TaskSpec(categories=STANCE)
    out = evaluate_predictions(spec, np.array([0, 1]), np.array([0, 1]))
    assert out["mf1"] == pytest.approx(2 / 3) and out["acc"] == 1.0


def test_multi_label_jaccard_micro_macro_and_exact_match():
    spec = TaskSpec(categories={"joy": 0, "anger": 1, "fear": 2}, multi_label=True, eval_metric="jaccard")
    y_true = np.array([[1, 0, 1], [0, 1, 0], [0, 0, 0]])
    y_pred = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 0]])
    out = evaluate_predictions(spec, y_true, y_pred)
    assert out["jaccard"] == pytest.approx((1 / 2 + 1 / 2 + 0) / 3)
    assert out["jaccard"] == pytest.approx(jaccard_score(y_true, y_pred, average="samples", zero_division=0))
    assert out["micro_f1"] == pytest.approx(2 / 3)  # tp 2, fp 1, fn 1
    assert out["macro_f1"] == out["mf1"] == pytest.approx(2 / 3)  # fear F1 = 0
    assert out["acc"] == pytest.approx(1 / 3)  # only the empty row matches exactly
    assert out["official"] == out["jaccard"]


def test_multi_label_from_scores_uses_threshold():
    spec = TaskSpec(categories={"a": 0, "b": 1}, multi_label=True, threshold=0.3)
    scores = np.array([[0.4, 0.2], [0.1, 0.9]])
    out = evaluate_predictions(spec, np.array([[1, 0], [0, 1]]), None, scores)
    assert out["acc"] == 1.0


def test_regression_pearson_and_mse():
    out = evaluate_predictions(TaskSpec(regression=True, eval_metric="pearson"), [1.0, 2.0, 3.0], [1.0, 2.0, 4.0])
    assert out["pearson"] == pytest.approx(9 / math.sqrt(84))
    assert out["mse"] == pytest.approx(1 / 3)
    assert out["official"] == out["pearson"]
    constant = evaluate_predictions(TaskSpec(regression=True, eval_metric="pearson"), [1.0, 2.0], [0.5, 0.5])
    assert constant["pearson"] == 0.0


@pytest.mark.parametrize(
    "spec,name",
    [
        (TaskSpec(categories=STANCE), "mf1"),
        (TaskSpec(categories=STANCE, eval_metric="precision"), "mp"),
        (TaskSpec(categories=STANCE, eval_metric="recall"), "mr"),
        (TaskSpec(categories=STANCE, stance_f1=True), "stance_f1"),
        (TaskSpec(categories=STANCE, eval_metric="accuracy", stance_f1=True), "acc"),
        (TaskSpec(categories=STANCE, class_metric="FAVOR"), "f1"),
        (TaskSpec(categories=STANCE, class_metric="FAVOR", eval_metric="recall"), "r"),
        (TaskSpec(categories=STANCE, average_metric="micro"), "acc"),
        (TaskSpec(categories={"no": 0, "yes": 1}, average_metric="none"), "f1"),
        (TaskSpec(categories={"no": 0, "yes": 1}, average_metric=None), "f1"),
        (TaskSpec(categories={"a": 0, "b": 1}, multi_label=True, average_metric="micro"), "micro_f1"),
        (TaskSpec(categories={"a": 0, "b": 1}, multi_label=True), "mf1"),
        (TaskSpec(categories={"a": 0, "b": 1}, multi_label=True, eval_metric="accuracy"), "jaccard"),
        (TaskSpec(categories={"a": 0, "b": 1}, multi_label=True, eval_metric="jaccard"), "jaccard"),
        (TaskSpec(regression=True, eval_metric="pearson"), "pearson"),
    ],
)
def test_official_metric_selection(spec, name):
    assert official_metric_name(spec) == name
    y = np.array([[1, 0], [0, 1]]) if spec.multi_label else np.array([0, 1])
    y = y.astype(float) if spec.regression else y
    out = evaluate_predictions(spec, y, y)
    assert out["official"] == out[name]


@pytest.mark.parametrize(
    "spec,match",
    [
        (TaskSpec(categories=STANCE, average_metric="none"), "class_metric"),
        (TaskSpec(categories=STANCE, eval_metric="jaccard"), "multi_label"),
        (TaskSpec(categories=STANCE, eval_metric="pearson"), "regression"),
        (TaskSpec(regression=True), "pearson"),
    ],
)
def test_official_metric_rejects_inconsistent_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        official_metric_name(spec)


def test_mlm_accuracy_ignores_unmasked_positions():
    logits = torch.tensor([[5.0, 0.0], [0.0, 5.0], [5.0, 0.0], [0.0, 5.0]])
    assert mlm_accuracy(logits, torch.tensor([0, 0, -100, 1])) == pytest.approx(2 / 3)
    assert mlm_accuracy(logits, torch.full((4,), -100)) == 0.0


def test_perplexity_is_exp_of_mean_nll():
    assert perplexity(math.log(30.0)) == pytest.approx(30.0)
    assert perplexity(1e6) == math.inf
