"""Scores over several finetuning runs, and how sure a difference between two models is.

A model's score on a task is the mean over its runs (seeds) with the sample standard deviation
(ddof=1) and the number of runs (:func:`spread`).

A difference Δ = (mean official metric of B) − (mean official metric of A) on the same test
examples gets a percentile interval from a **paired bootstrap over the test examples** (Koehn 2004,
"Statistical Significance Tests for Machine Translation Evaluation"; Efron & Tibshirani 1993, "An
Introduction to the Bootstrap") that **also resamples each model's runs**, as Bouthillier et al.
2021 ("Accounting for Variance in Machine Learning Benchmarks", MLSys) recommend, so that the
interval holds both sources of noise: the sample of test examples and the seeds. Each replicate
draws the test examples with replacement, one draw shared by both models (paired), and each
model's runs with replacement (a model with one run, like the deterministic baseline, keeps it),
then recomputes the official metric of every drawn run on the drawn examples and averages.
Macro-F1 and its kin are not means of per-example values, so a replicate sums per-example counts
(true positives, predictions and gold labels per class...) over the drawn examples and derives
the metric from the totals: one matrix product scores all replicates of a chunk at once.
:func:`metric_from_totals` is pinned to ``train.metrics.evaluate_predictions`` by the tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from twilbert.config import TaskSpec
from twilbert.evaluation.metrics import official_metric_name, reference_class, stance_indices

BETTER, WORSE, WITHIN_NOISE = "better", "worse", "within noise"
LEVEL = 0.95
N_RESAMPLES = 2000
SEED = 0  # the bootstrap's own seed: the same inputs give the same interval, byte for byte
_CHUNK = 256  # replicates per matrix product: bounds memory at chunk × n_examples counts


@dataclass(frozen=True)
class Spread:
    """Mean, sample standard deviation (None for a single run) and number of runs."""

    mean: float
    sd: Optional[float]
    n: int


def spread(values: Sequence[float]) -> Spread:
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("spread of no values")
    return Spread(float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else None, int(x.size))


def verdict(low: float, high: float) -> str:
    """better / worse when the interval lies entirely above / below 0, else within noise."""
    if low > 0:
        return BETTER
    if high < 0:
        return WORSE
    return WITHIN_NOISE


@dataclass(frozen=True)
class Delta:
    """Δ = mean metric of B − mean metric of A, with its bootstrap percentile interval."""

    delta: float
    low: float
    high: float
    level: float
    n_examples: int
    n_runs_a: int
    n_runs_b: int

    @property
    def verdict(self) -> str:
        return verdict(self.low, self.high)


# --------------------------------------------------------------------------------------------
# The official metric from per-example counts, for many resamples at once
# --------------------------------------------------------------------------------------------


def example_counts(spec: TaskSpec, gold: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """(n, d) per-example counts whose sums over any resample determine the official metric.

    Single-label: true positive, prediction and gold one-hots per class (3C). Multi-label: the same
    from the flags, then exact match and the example's Jaccard index (3C + 2). Regression: x, y,
    x², y², xy of the centred values (5); centring leaves Pearson's r unchanged and makes a
    constant input exactly zero variance.
    """
    gold, pred = np.asarray(gold), np.asarray(pred)
    if gold.shape[0] != pred.shape[0]:
        raise ValueError(f"gold has {gold.shape[0]} examples but the predictions have {pred.shape[0]}")
    if spec.regression:
        x = gold.astype(np.float64).reshape(-1)
        y = pred.astype(np.float64).reshape(-1)
        x, y = x - x.mean(), y - y.mean()
        return np.stack([x, y, x * x, y * y, x * y], axis=1)
    n_classes = len(spec.categories)
    if spec.multi_label:
        g, p = gold.astype(bool), pred.astype(bool)
        inter, union = (g & p).sum(1), (g | p).sum(1)
        jaccard = np.divide(inter, union, out=np.zeros(len(g)), where=union > 0)
        exact = np.all(g == p, axis=1)
        return np.concatenate([g & p, p, g, exact[:, None], jaccard[:, None]], axis=1).astype(np.float64)
    eye = np.eye(n_classes)
    g, p = eye[gold.astype(np.int64)], eye[pred.astype(np.int64)]
    return np.concatenate([g * p, p, g], axis=1)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, 0 where den is 0 (scikit-learn's zero_division=0)."""
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den > 0)


def metric_from_totals(spec: TaskSpec, totals: np.ndarray, n: int) -> np.ndarray:
    """The official metric from :func:`example_counts` summed over ``n`` examples; totals (..., d) -> (...)."""
    name = official_metric_name(spec)
    if spec.regression:
        sx, sy, sxx, syy, sxy = np.moveaxis(totals, -1, 0)
        vx, vy = n * sxx - sx * sx, n * syy - sy * sy
        # a resample holding one distinct value has no correlation (as train.metrics); the tolerance
        # absorbs the rounding of n·Σx² − (Σx)² on such a resample
        ok = (vx > 1e-12 * n * sxx) & (vy > 1e-12 * n * syy)
        r = _ratio(n * sxy - sx * sy, np.sqrt(np.where(ok, vx * vy, 0.0)))
        return np.clip(np.where(ok, r, 0.0), -1.0, 1.0)
    c = len(spec.categories)
    tp, n_pred, n_gold = totals[..., :c], totals[..., c:2 * c], totals[..., 2 * c:3 * c]
    if name == "acc":
        return (totals[..., 3 * c] if spec.multi_label else tp.sum(-1)) / n
    if name == "jaccard":
        return totals[..., 3 * c + 1] / n
    if name.startswith("micro_"):
        tp, n_pred, n_gold = tp.sum(-1), n_pred.sum(-1), n_gold.sum(-1)
    precision, recall, f1 = _ratio(tp, n_pred), _ratio(tp, n_gold), _ratio(2 * tp, n_pred + n_gold)
    per_class = {"p": precision, "r": recall, "f1": f1}
    if name.startswith("micro_"):
        return per_class[name.removeprefix("micro_")]
    if name == "stance_f1":
        return f1[..., stance_indices(spec)].mean(-1)
    if name in ("mp", "mr", "mf1"):
        return per_class[name[1:]].mean(-1)
    return per_class[name][..., reference_class(spec)]


def official_scores(spec: TaskSpec, gold: np.ndarray, runs: Sequence[np.ndarray]) -> np.ndarray:
    """The official metric of each run's predictions on all of ``gold``: (n_runs,)."""
    counts = np.stack([example_counts(spec, gold, p) for p in runs], axis=0)  # (K, n, d)
    return metric_from_totals(spec, counts.sum(1), len(gold))


# --------------------------------------------------------------------------------------------
# The paired bootstrap over test examples and runs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Resamples:
    """One chunk of replicates: how often each test example is drawn, and each side's run weights."""

    examples: np.ndarray  # (m, n) draw counts, each row summing to n
    weights_a: np.ndarray  # (m, K_a) share of each run of A among the K_a drawn, rows summing to 1
    weights_b: np.ndarray  # (m, K_b)


def _draw_counts(rng: np.random.Generator, n: int, m: int) -> np.ndarray:
    """(m, n): how often each of ``n`` items is drawn in each of ``m`` draws of ``n`` with replacement."""
    drawn = rng.integers(0, n, size=(m, n))
    offsets = (np.arange(m) * n)[:, None]  # one bincount for all rows
    return np.bincount((drawn + offsets).ravel(), minlength=m * n).reshape(m, n)


def draw_resamples(rng: np.random.Generator, n: int, k_a: int, k_b: int, m: int) -> Resamples:
    """``m`` replicates over ``n`` test examples and ``k_a`` / ``k_b`` runs."""
    examples = _draw_counts(rng, n, m)
    # a single run (the deterministic baseline) is kept in every replicate
    weights = [np.ones((m, 1)) if k == 1 else _draw_counts(rng, k, m) / k for k in (k_a, k_b)]
    return Resamples(examples, *weights)


def _side_means(spec: TaskSpec, counts: np.ndarray, draw: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """counts (n, K, d), draw (m, n), weights (m, K) -> each replicate's weighted mean metric (m,)."""
    n, k, d = counts.shape
    totals = (draw.astype(np.float64) @ counts.reshape(n, k * d)).reshape(-1, k, d)  # (m, K, d)
    return (metric_from_totals(spec, totals, n) * weights).sum(-1)


def replicate_deltas(spec: TaskSpec, counts_a: np.ndarray, counts_b: np.ndarray, resamples: Resamples) -> np.ndarray:
    """Δ of each replicate (m,) from the sides' :func:`example_counts` stacked per run, (n, K, d)."""
    return (_side_means(spec, counts_b, resamples.examples, resamples.weights_b)
            - _side_means(spec, counts_a, resamples.examples, resamples.weights_a))


def _side_counts(spec: TaskSpec, gold: np.ndarray, runs: Sequence[np.ndarray], side: str) -> np.ndarray:
    """The side's :func:`example_counts` stacked per run: (n, K, d)."""
    runs = [np.asarray(p) for p in runs]
    if not runs:
        raise ValueError(f"side {side} has no runs")
    for i, p in enumerate(runs):
        if p.shape[0] != gold.shape[0]:
            raise ValueError(f"side {side}, run {i}: {p.shape[0]} predictions for {gold.shape[0]} test examples")
    return np.stack([example_counts(spec, gold, p) for p in runs], axis=1)


def bootstrap_deltas(spec: TaskSpec, gold: np.ndarray, runs_a: Sequence[np.ndarray], runs_b: Sequence[np.ndarray],
                     n_resamples: int = N_RESAMPLES, seed: int = SEED) -> np.ndarray:
    """Δ of B over A in each of ``n_resamples`` seeded replicates (see the module's docstring)."""
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    gold = np.asarray(gold)
    n = gold.shape[0]
    if n == 0:
        raise ValueError("no test examples to compare on")
    counts_a, counts_b = _side_counts(spec, gold, runs_a, "A"), _side_counts(spec, gold, runs_b, "B")
    rng = np.random.default_rng(seed)
    deltas = np.empty(n_resamples)
    for start in range(0, n_resamples, _CHUNK):
        m = min(_CHUNK, n_resamples - start)
        resamples = draw_resamples(rng, n, counts_a.shape[1], counts_b.shape[1], m)
        deltas[start:start + m] = replicate_deltas(spec, counts_a, counts_b, resamples)
    return deltas


def paired_delta(spec: TaskSpec, gold: np.ndarray, runs_a: Sequence[np.ndarray], runs_b: Sequence[np.ndarray],
                 level: float = LEVEL, n_resamples: int = N_RESAMPLES, seed: int = SEED) -> Delta:
    """Δ of B over A on the task's official metric, with its percentile interval at ``level``.

    ``gold``: the test labels (class indices, 0/1 flags or values); ``runs_a``/``runs_b``: each
    run's predictions on the same examples, in the same order.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    gold = np.asarray(gold)
    deltas = bootstrap_deltas(spec, gold, runs_a, runs_b, n_resamples, seed)
    delta = float(official_scores(spec, gold, runs_b).mean() - official_scores(spec, gold, runs_a).mean())
    low, high = np.quantile(deltas, [(1 - level) / 2, (1 + level) / 2])
    return Delta(delta, float(low), float(high), level, len(gold), len(runs_a), len(runs_b))
