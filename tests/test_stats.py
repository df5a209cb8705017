"""Scores over runs and the paired bootstrap interval of a difference (twilbert.reports.stats)."""

from __future__ import annotations

import time

import numpy as np
import pytest
from scipy import stats as scipy_stats

from twilbert.config import TaskSpec
from twilbert.evaluation.metrics import evaluate_predictions
from twilbert.reports.stats import (
    BETTER,
    WITHIN_NOISE,
    WORSE,
    Resamples,
    bootstrap_deltas,
    draw_resamples,
    example_counts,
    metric_from_totals,
    official_scores,
    paired_delta,
    replicate_deltas,
    spread,
)

LABELS3 = {"P": 0, "N": 1, "NEU": 2}
EMOTIONS = {"joy": 0, "anger": 1, "fear": 2}
ACCURACY = TaskSpec(categories={"no": 0, "yes": 1}, eval_metric="accuracy")
SPECS = {  # one per kind of official metric
    "mf1": TaskSpec(categories={**LABELS3, "NONE": 3}),
    "mp": TaskSpec(categories=LABELS3, eval_metric="precision"),
    "f1 of class_metric": TaskSpec(categories=LABELS3, class_metric="N"),
    "r of class 1 (binary, average none)": TaskSpec(categories={"no": 0, "yes": 1}, eval_metric="recall",
                                                    average_metric="none"),
    "acc": TaskSpec(categories=LABELS3, eval_metric="accuracy"),
    "stance_f1": TaskSpec(categories={"FAVOR": 0, "AGAINST": 1, "NONE": 2}, stance_f1=True),
    "jaccard": TaskSpec(multi_label=True, categories=EMOTIONS, eval_metric="jaccard"),
    "micro_f1": TaskSpec(multi_label=True, categories=EMOTIONS, average_metric="micro"),
    "multi-label mf1": TaskSpec(multi_label=True, categories=EMOTIONS),
    "pearson": TaskSpec(regression=True, eval_metric="pearson"),
}


def fake_task(spec: TaskSpec, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    if spec.regression:
        gold = rng.normal(size=n)
        return gold, gold + rng.normal(size=n)
    if spec.multi_label:  # some examples with no label at all, in gold or predicted
        return (rng.random((n, 3)) < 0.3).astype(np.int64), (rng.random((n, 3)) < 0.3).astype(np.int64)
    c = len(spec.categories)
    gold = rng.integers(0, c, size=n)
    return gold, np.where(rng.random(n) < 0.5, gold, rng.integers(0, c, size=n))


def planted(gold: np.ndarray, right: float, seed: int) -> np.ndarray:
    """Binary predictions right on exactly round(right * n) examples, chosen at random."""
    rng = np.random.default_rng(seed)
    wrong = rng.permutation(len(gold))[: len(gold) - round(right * len(gold))]
    pred = gold.copy()
    pred[wrong] = 1 - pred[wrong]
    return pred


def test_spread_is_the_mean_the_sample_sd_and_the_count():
    values = [0.61, 0.64, 0.58, 0.66, 0.6]
    s = spread(values)
    assert s.mean == pytest.approx(np.mean(values), abs=1e-15)
    assert s.sd == pytest.approx(np.std(values, ddof=1), abs=1e-15)
    assert s.sd == pytest.approx(scipy_stats.tstd(values), abs=1e-15)
    assert s.n == 5
    assert spread([0.7]).sd is None and spread([0.7]).n == 1  # one run has no spread
    with pytest.raises(ValueError):
        spread([])


@pytest.mark.parametrize("kind", list(SPECS))
def test_the_metric_from_counts_equals_the_project_metric_on_resampled_examples(kind):
    spec = SPECS[kind]
    gold, pred = fake_task(spec, 60, seed=1)
    resamples = draw_resamples(np.random.default_rng(2), 60, 1, 1, 20)
    counts = example_counts(spec, gold, pred)
    for drawn in resamples.examples:
        idx = np.repeat(np.arange(60), drawn)
        expected = evaluate_predictions(spec, gold[idx], pred[idx])["official"]
        assert metric_from_totals(spec, drawn @ counts, 60) == pytest.approx(expected, abs=1e-12), kind
    assert official_scores(spec, gold, [pred])[0] == pytest.approx(evaluate_predictions(spec, gold, pred)["official"],
                                                                  abs=1e-12)


def test_pearson_of_a_constant_resample_is_zero_as_in_the_project_metric():
    spec = SPECS["pearson"]
    gold, pred = np.array([0.1, 0.2, 0.3, 0.4]), np.array([0.3, 0.1, 0.2, 0.4])
    drawn = np.array([0, 0, 4, 0])  # example 2, four times
    assert metric_from_totals(spec, drawn @ example_counts(spec, gold, pred), 4) == 0.0


def test_a_replicate_by_hand():
    """Accuracy on 4 examples; A has one run, B two. The replicate draws examples 0, 0, 2, 3."""
    gold = np.array([0, 1, 0, 1])
    a = np.array([0, 1, 1, 1])  # on 0, 0, 2, 3: right, right, wrong, right -> 3/4
    b1 = np.array([0, 1, 0, 1])  # all right -> 1
    b2 = np.array([1, 1, 0, 0])  # wrong, wrong, right, wrong -> 1/4
    counts_a = example_counts(ACCURACY, gold, a)[:, None, :]
    counts_b = np.stack([example_counts(ACCURACY, gold, p) for p in (b1, b2)], axis=1)
    drawn = np.array([[2, 0, 1, 1], [2, 0, 1, 1]])
    resamples = Resamples(drawn, weights_a=np.ones((2, 1)), weights_b=np.array([[1.0, 0.0], [0.5, 0.5]]))
    # first: B drew b1 twice -> 1 - 3/4; second: b1 and b2 -> (1 + 1/4)/2 - 3/4
    assert replicate_deltas(ACCURACY, counts_a, counts_b, resamples).tolist() == [0.25, -0.125]


def test_each_replicate_draws_n_examples_and_k_runs_and_keeps_a_single_run():
    resamples = draw_resamples(np.random.default_rng(0), 50, 1, 5, 300)
    assert resamples.examples.shape == (300, 50) and (resamples.examples.sum(1) == 50).all()
    assert (resamples.weights_a == 1).all()  # the baseline's one run, in every replicate
    assert resamples.weights_b.shape == (300, 5) and np.allclose(resamples.weights_b.sum(1), 1)
    assert set(np.unique(resamples.weights_b * 5)) <= {0, 1, 2, 3, 4, 5}
    assert (resamples.weights_b != 0.2).any()  # runs are resampled, not all kept


def test_the_interval_is_the_percentile_of_the_replicates_and_delta_the_difference_of_mean_scores():
    spec = SPECS["mf1"]
    gold, _ = fake_task(spec, 400, seed=3)
    runs_a = [fake_task(spec, 400, seed=3 + i)[1] for i in range(1, 4)]
    runs_b = [np.where(np.random.default_rng(10 + i).random(400) < 0.7, gold, p) for i, p in enumerate(runs_a)]
    deltas = bootstrap_deltas(spec, gold, runs_a, runs_b, n_resamples=500, seed=7)
    for level in (0.95, 0.8):
        result = paired_delta(spec, gold, runs_a, runs_b, level=level, n_resamples=500, seed=7)
        low, high = np.quantile(deltas, [(1 - level) / 2, (1 + level) / 2])
        assert (result.low, result.high) == (low, high)
    mean = lambda runs: np.mean([evaluate_predictions(spec, gold, p)["official"] for p in runs])  # noqa: E731
    assert result.delta == pytest.approx(mean(runs_b) - mean(runs_a), abs=1e-12)
    assert (result.n_examples, result.n_runs_a, result.n_runs_b) == (400, 3, 3)
    again = paired_delta(spec, gold, runs_a, runs_b, level=0.8, n_resamples=500, seed=7)
    assert again == result  # seeded: the same interval every time
    assert paired_delta(spec, gold, runs_a, runs_b, level=0.8, n_resamples=500, seed=8) != result


def test_one_run_a_side_agrees_with_scipys_paired_percentile_bootstrap():
    """With one run a side and accuracy, Δ is a mean of per-example differences: scipy's own
    resampler must give nearly the same interval."""
    gold = np.random.default_rng(0).integers(0, 2, size=2000)
    a, b = planted(gold, 0.70, seed=1), planted(gold, 0.74, seed=2)
    ours = paired_delta(ACCURACY, gold, [a], [b])
    theirs = scipy_stats.bootstrap(((a == gold).astype(float), (b == gold).astype(float)),
                                   lambda x, y, axis=-1: np.mean(y, axis=axis) - np.mean(x, axis=axis),
                                   paired=True, vectorized=True, method="percentile", n_resamples=2000,
                                   random_state=np.random.default_rng(1)).confidence_interval
    assert ours.delta == pytest.approx(0.04, abs=1e-12)
    assert ours.low == pytest.approx(theirs.low, abs=0.004) and ours.high == pytest.approx(theirs.high, abs=0.004)


def test_identical_predictions_read_within_noise():
    spec = SPECS["mf1"]
    gold, pred = fake_task(spec, 300, seed=4)
    one = paired_delta(spec, gold, [pred], [pred.copy()])
    assert (one.delta, one.low, one.high, one.verdict) == (0.0, 0.0, 0.0, WITHIN_NOISE)
    runs = [fake_task(spec, 300, seed=4 + i)[1] for i in range(3)]
    several = paired_delta(spec, gold, runs, [r.copy() for r in runs])
    assert several.delta == 0.0 and several.low < 0 < several.high and several.verdict == WITHIN_NOISE


def test_a_model_right_on_95_percent_is_better_than_one_right_on_60_percent():
    gold = np.random.default_rng(0).integers(0, 2, size=2000)
    strong = [planted(gold, 0.95, seed=s) for s in (1, 2, 3)]
    weak = [planted(gold, 0.60, seed=s) for s in (4, 5, 6)]
    result = paired_delta(ACCURACY, gold, weak, strong)
    assert result.delta == pytest.approx(0.35, abs=1e-12) and result.low > 0.3 and result.verdict == BETTER
    assert paired_delta(ACCURACY, gold, strong, weak).verdict == WORSE


def test_two_thousand_replicates_on_2000_examples_and_5_runs_take_seconds_at_most():
    spec = SPECS["mf1"]
    gold, _ = fake_task(spec, 2000, seed=0)
    runs = [fake_task(spec, 2000, seed=s)[1] for s in range(1, 11)]
    start = time.perf_counter()
    paired_delta(spec, gold, runs[:5], runs[5:], n_resamples=2000)
    assert time.perf_counter() - start < 5  # ~0.3 s on a shared 2-core machine


# --------------------------------------------------------------------------------------------
# Coverage on simulated data with a known truth
# --------------------------------------------------------------------------------------------
# Example i has a difficulty z_i ~ N(0, 1); run j of model m (its seed's offset s_mj ~ N(0, σ²))
# is right on it when z_i + τ·e_ij < t_m + s_mj, e_ij ~ N(0, 1): runs of a model agree on most
# examples, as finetuning seeds do. Over the population of tweets and seeds a model's expected
# accuracy is Φ(t_m / sqrt(1 + τ² + σ²)), so the true Δ is known exactly.

T_A, T_B, SEED_SD, RUN_NOISE = 0.55, 0.75, 0.1, 0.3
N_EXAMPLES, N_RUNS, N_DRAWS = 400, 5, 200


def _simulated_runs(rng: np.random.Generator, z: np.ndarray, t: float) -> list[np.ndarray]:
    """Each run's correctness, as binary predictions against an all-ones gold."""
    return [(z + RUN_NOISE * rng.normal(size=len(z)) < t + rng.normal(scale=SEED_SD)).astype(np.int64)
            for _ in range(N_RUNS)]


def test_the_95_percent_interval_covers_the_true_difference_about_95_percent_of_the_time():
    """(94.5% here; resampling the test examples alone, and not the runs, covers 56.5%.)"""
    scale = np.sqrt(1 + RUN_NOISE ** 2 + SEED_SD ** 2)
    truth = scipy_stats.norm.cdf(T_B / scale) - scipy_stats.norm.cdf(T_A / scale)
    rng = np.random.default_rng(2021)
    gold = np.ones(N_EXAMPLES, dtype=np.int64)
    covered = 0
    for draw in range(N_DRAWS):  # a fresh test sample and fresh runs of both models each time
        z = rng.normal(size=N_EXAMPLES)
        result = paired_delta(ACCURACY, gold, _simulated_runs(rng, z, T_A), _simulated_runs(rng, z, T_B),
                              n_resamples=1000, seed=draw)
        covered += result.low <= truth <= result.high
    assert 0.90 <= covered / N_DRAWS <= 0.99, covered
