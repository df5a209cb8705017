"""Evaluation metrics: TWilBert's results-table columns and the task's official metric.

All classification metrics use scikit-learn semantics with ``zero_division=0`` over every
category index, so a class absent from a split still counts in macro averages.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from scipy.stats import pearsonr
from sklearn.metrics import jaccard_score, precision_recall_fscore_support

from twilbert.config import TaskSpec

STANCE_LABELS = ("FAVOR", "AGAINST")


def official_metric_name(spec: TaskSpec) -> str:
    """Key of ``evaluate_predictions`` holding the task's official metric.

    f1/precision/recall: ``stance_f1`` when ``stance_f1`` is set (f1 only), the reference class
    (``f1``/``p``/``r``) when ``class_metric`` is set or ``average_metric`` is none on a binary
    task, else ``mf1``/``mp``/``mr`` (macro) or the micro keys; single-label micro P = R = F1 =
    accuracy. ``accuracy`` on a multi-label task is the Jaccard index, as in TWilBert.
    """
    metric, average = spec.eval_metric, spec.average_metric
    if spec.regression:
        if metric != "pearson":
            raise ValueError(f"task.eval_metric {metric!r} does not apply to regression; use 'pearson'")
        return "pearson"
    if metric == "pearson":
        raise ValueError("task.eval_metric 'pearson' needs task.regression: true")
    if metric == "jaccard" or (metric == "accuracy" and spec.multi_label):
        if not spec.multi_label:
            raise ValueError("task.eval_metric 'jaccard' needs task.multi_label: true")
        return "jaccard"
    if metric == "accuracy":
        return "acc"
    if metric == "f1" and spec.stance_f1:
        return "stance_f1"
    short = {"f1": "f1", "precision": "p", "recall": "r"}[metric]
    if spec.class_metric is not None:
        return short
    if average == "micro":
        return f"micro_{short}" if spec.multi_label else "acc"
    if average in (None, "none"):
        if _binary(spec):
            return short
        raise ValueError(
            "task.average_metric none needs task.class_metric to name the class to report "
            f"(one of {list(spec.categories)})"
        )
    return "m" + short


def evaluate_predictions(
    spec: TaskSpec,
    y_true: np.ndarray,
    y_pred: Optional[np.ndarray],
    y_score: Optional[np.ndarray] = None,
) -> dict[str, float]:
    """Results-table metrics as floats in [0, 1] (pearson in [-1, 1]) plus ``official``.

    Single-label: mp, mr, mf1, acc, f1/p/r of the reference class (``class_metric``, or class
    1 of a binary task), stance_f1. Multi-label: the same macro keys, acc (exact match),
    jaccard (sample-averaged), micro_p, micro_r, micro_f1, macro_f1. Regression: pearson, mse.
    ``y_pred`` may be None when ``y_score`` holds probabilities (argmax / ``spec.threshold``).
    """
    y_true = np.asarray(y_true)
    if y_pred is None:
        if y_score is None:
            raise ValueError("evaluate_predictions needs y_pred or y_score")
        y_pred = _decide(spec, np.asarray(y_score))
    y_pred = np.asarray(y_pred)
    if y_true.shape[0] != y_pred.shape[0]:
        raise ValueError(f"y_true has {y_true.shape[0]} rows but y_pred has {y_pred.shape[0]}")
    if spec.regression:
        out = _regression_metrics(y_true, y_pred)
    else:
        out = _classification_metrics(spec, y_true, y_pred)
    out["official"] = out[official_metric_name(spec)]
    return out


def _decide(spec: TaskSpec, y_score: np.ndarray) -> np.ndarray:
    if spec.regression:
        return y_score.reshape(-1)
    if spec.multi_label:
        return (y_score >= spec.threshold).astype(np.int64)
    return y_score.argmax(-1)


def _binary(spec: TaskSpec) -> bool:
    return not spec.multi_label and len(spec.categories) == 2


def _regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    t, p = y_true.astype(np.float64).reshape(-1), y_pred.astype(np.float64).reshape(-1)
    # pearsonr is undefined for a constant input; report no correlation rather than NaN
    constant = len(t) < 2 or np.ptp(t) == 0 or np.ptp(p) == 0
    pearson = 0.0 if constant else float(pearsonr(t, p)[0])
    return {"pearson": pearson, "mse": float(np.mean((t - p) ** 2)) if len(t) else 0.0}


def _classification_metrics(spec: TaskSpec, y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    labels = sorted(spec.categories.values())
    if spec.multi_label:
        y_true, y_pred = y_true.astype(np.int64), y_pred.astype(np.int64)
    precision, recall, f1, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average=None, zero_division=0
    )
    out = {
        "mp": float(precision.mean()),
        "mr": float(recall.mean()),
        "mf1": float(f1.mean()),
        # single-label accuracy; exact-match (subset) accuracy for multi-label
        "acc": float(np.mean(np.all(y_true == y_pred, axis=-1) if spec.multi_label else y_true == y_pred)),
    }
    reference = reference_class(spec)
    if reference is not None:
        out.update(p=float(precision[reference]), r=float(recall[reference]), f1=float(f1[reference]))
    if spec.stance_f1:
        out["stance_f1"] = float(np.mean([f1[i] for i in stance_indices(spec)]))
    if spec.multi_label:
        micro_p, micro_r, micro_f1, _ = precision_recall_fscore_support(
            y_true, y_pred, labels=labels, average="micro", zero_division=0
        )
        out.update(
            jaccard=float(jaccard_score(y_true, y_pred, average="samples", zero_division=0)),
            micro_p=float(micro_p),
            micro_r=float(micro_r),
            micro_f1=float(micro_f1),
            macro_f1=out["mf1"],
        )
    return out


def reference_class(spec: TaskSpec) -> Optional[int]:
    """Index whose own P/R/F1 is reported: ``class_metric``, else class 1 of a binary task."""
    if spec.class_metric is not None:
        if spec.class_metric not in spec.categories:
            raise ValueError(
                f"task.class_metric {spec.class_metric!r} is not one of the categories {list(spec.categories)}"
            )
        return spec.categories[spec.class_metric]
    return 1 if _binary(spec) else None


def stance_indices(spec: TaskSpec) -> list[int]:
    by_upper = {label.upper(): index for label, index in spec.categories.items()}
    missing = [label for label in STANCE_LABELS if label not in by_upper]
    if missing:
        raise ValueError(
            f"task.stance_f1 needs categories named {' and '.join(STANCE_LABELS)}; "
            f"{missing} not in {list(spec.categories)}"
        )
    return [by_upper[label] for label in STANCE_LABELS]


def mlm_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Share of masked tokens whose argmax prediction is the target; targets of -100 are ignored."""
    keep = targets != -100
    n = int(keep.sum())
    if n == 0:
        return 0.0
    return float((logits.argmax(-1)[keep] == targets[keep]).sum()) / n


def perplexity(mean_nll: float) -> float:
    """exp(mean negative log-likelihood in nats); inf when it overflows."""
    try:
        return math.exp(mean_nll)
    except OverflowError:
        return math.inf
