"""MLM/ROP losses, the soft-metric finetuning losses and class weights."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import f1_score, jaccard_score, precision_score, recall_score

from twilbert.config import TaskSpec
from twilbert.train import losses
from twilbert.train.losses import (
    build_loss,
    class_weights_tensor,
    mlm_loss,
    rop_loss,
    soft_f1,
    soft_f1_of_macro,
    soft_jaccard,
    soft_precision,
    soft_recall,
)

SOFT_LOSSES = ["macro_f1", "f1_macro", "micro_f1", "macro_precision", "macro_recall", "micro_precision",
               "micro_recall", "jaccard_acc"]


def _spec(n_classes, **kw):
    return TaskSpec(categories={f"c{i}": i for i in range(n_classes)}, **kw)


def _sk(metric, y, p, labels, average):
    return metric(y, p, labels=labels, average=average, zero_division=0)


def _sklearn_values(y, p, n_classes):
    """Exact metrics named like the losses (1 - loss must equal them on hard predictions)."""
    labels = list(range(n_classes))
    mp, mr = _sk(precision_score, y, p, labels, "macro"), _sk(recall_score, y, p, labels, "macro")
    values = {
        "macro_f1": _sk(f1_score, y, p, labels, "macro"),
        "f1_macro": 2 * mp * mr / (mp + mr) if mp + mr > 0 else 0.0,
        "micro_f1": _sk(f1_score, y, p, labels, "micro"),
        "macro_precision": mp,
        "macro_recall": mr,
        "micro_precision": _sk(precision_score, y, p, labels, "micro"),
        "micro_recall": _sk(recall_score, y, p, labels, "micro"),
    }
    if np.ndim(y) == 2:
        values["jaccard_acc"] = jaccard_score(y, p, average="samples", zero_division=0)
    return values


single_label = st.integers(2, 5).flatmap(
    lambda c: st.tuples(
        st.just(c),
        st.lists(st.tuples(st.integers(0, c - 1), st.integers(0, c - 1)), min_size=1, max_size=30),
    )
)
multi_label = st.tuples(st.integers(2, 5), st.integers(1, 20)).flatmap(
    lambda cn: st.tuples(
        st.just(cn[0]),
        st.lists(st.lists(st.integers(0, 1), min_size=cn[0], max_size=cn[0]), min_size=cn[1], max_size=cn[1]),
        st.lists(st.lists(st.integers(0, 1), min_size=cn[0], max_size=cn[0]), min_size=cn[1], max_size=cn[1]),
    )
)


@settings(max_examples=100, deadline=None)
@given(single_label)
def test_soft_losses_equal_one_minus_sklearn_on_hard_single_label_predictions(case):
    n_classes, pairs = case
    y, p = np.array([a for a, _ in pairs]), np.array([b for _, b in pairs])
    # logits this peaked give softmax outputs exactly one-hot in float32
    logits = 1e4 * F.one_hot(torch.from_numpy(p), n_classes).float()
    targets = torch.from_numpy(y)
    spec = _spec(n_classes)
    for name, value in _sklearn_values(y, p, n_classes).items():
        assert 1.0 - build_loss(name, spec)(logits, targets).item() == pytest.approx(value, abs=1e-6), name
    if n_classes == 2:
        expected = f1_score(y, p, average="binary", pos_label=1, zero_division=0)
        assert 1.0 - build_loss("binary_f1", spec)(logits, targets).item() == pytest.approx(expected, abs=1e-6)


@settings(max_examples=100, deadline=None)
@given(multi_label)
def test_soft_losses_equal_one_minus_sklearn_on_hard_multi_label_predictions(case):
    n_classes, y, p = case
    y, p = np.array(y), np.array(p)
    logits = torch.from_numpy(2e4 * p - 1e4).float()  # sigmoid -> exactly 0/1 in float32
    targets = torch.from_numpy(y).float()
    spec = _spec(n_classes, multi_label=True)
    for name, value in _sklearn_values(y, p, n_classes).items():
        assert 1.0 - build_loss(name, spec)(logits, targets).item() == pytest.approx(value, abs=1e-6), name


@settings(max_examples=100, deadline=None)
@given(multi_label)
def test_soft_metric_functions_equal_sklearn_per_class_and_averaged(case):
    n_classes, y, p = case
    y, p = np.array(y), np.array(p)
    yt, pt = torch.from_numpy(y).double(), torch.from_numpy(p).double()
    labels = list(range(n_classes))
    for fn, metric in ((soft_f1, f1_score), (soft_precision, precision_score), (soft_recall, recall_score)):
        for average in (None, "macro", "micro"):
            expected = _sk(metric, y, p, labels, average)
            assert fn(pt, yt, average).numpy() == pytest.approx(expected, abs=1e-12)
    assert soft_jaccard(pt, yt).item() == pytest.approx(jaccard_score(y, p, average="samples", zero_division=0))


def test_f1_macro_differs_from_macro_f1():
    # class 0: P=1, R=1/3; class 1: P=1/3, R=1 -> both F1 = 0.5, but mP = mR = 2/3
    y = torch.tensor([[1.0, 0], [1, 0], [1, 0], [0, 1]])
    p = torch.tensor([[1.0, 0], [0, 1], [0, 1], [0, 1]])
    assert soft_f1(p, y, "macro").item() == pytest.approx(0.5)
    assert soft_f1_of_macro(p, y).item() == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    "name,multi",
    [(n, m) for n in SOFT_LOSSES + ["bce"] for m in (False, True)] + [("binary_f1", False), ("cross_entropy", False)],
)
def test_soft_loss_gradients_are_finite_and_non_zero(name, multi):
    torch.manual_seed(0)
    n_classes = 2 if name == "binary_f1" else 4
    logits = torch.randn(8, n_classes, requires_grad=True)
    if multi:
        targets = (torch.rand(8, n_classes) > 0.5).float()
        targets[:, -1] = 0.0  # a class with no positives in the batch
    else:
        targets = torch.zeros(8, dtype=torch.long)  # every other class absent from the batch
        targets[:3] = 1
    loss = build_loss(name, _spec(n_classes, multi_label=multi))(logits, targets)
    assert 0.0 <= loss.item() <= (math.inf if name in ("cross_entropy", "bce") else 1.0)
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0


def test_soft_loss_is_differentiable_at_hard_zero_predictions():
    # every probability 0 for an absent class: the zero-division branch must not leak NaN
    logits = torch.full((3, 2), -100.0, requires_grad=True)
    loss = build_loss("macro_f1", _spec(2, multi_label=True))(logits, torch.zeros(3, 2))
    loss.backward()
    assert loss.item() == 1.0 and torch.isfinite(logits.grad).all()


def test_weighted_cross_entropy_matches_hand_computed_weighted_mean():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0], [-1.0, 1.0, 3.0]])
    targets = torch.tensor([0, 1, 2])
    weights = torch.tensor([1.0, 2.0, 0.5])
    nll = -torch.log_softmax(logits, -1)[torch.arange(3), targets]
    expected = (weights[targets] * nll).sum() / weights[targets].sum()
    got = build_loss("categorical_crossentropy", _spec(3), weights)(logits, targets)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    assert got.item() == pytest.approx(F.cross_entropy(logits, targets, weight=weights).item(), rel=1e-6)


def test_bce_uses_class_weights_as_positive_weights():
    logits = torch.tensor([[1.0, -2.0], [0.0, 3.0]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pos_weight = torch.tensor([3.0, 1.0])
    expected = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=pos_weight)
    got = build_loss("binary_crossentropy", _spec(2, multi_label=True), pos_weight)(logits, targets)
    assert got.item() == pytest.approx(expected.item())
    # a single-label task gets one-hot targets
    got = build_loss("bce", _spec(2))(logits, torch.tensor([0, 1]))
    assert got.item() == pytest.approx(F.binary_cross_entropy_with_logits(logits, targets).item())


def test_mse_and_rmse_accept_column_predictions():
    spec = TaskSpec(regression=True)
    preds, targets = torch.tensor([[1.0], [2.0], [4.0]]), torch.tensor([1.0, 2.0, 3.0])
    assert build_loss("mse", spec)(preds, targets).item() == pytest.approx(1 / 3)
    assert build_loss("RMSE", spec)(preds, targets).item() == pytest.approx(math.sqrt(1 / 3))


def test_build_loss_rejects_unknown_names_and_mismatched_tasks():
    with pytest.raises(ValueError, match=r"unknown loss 'hinge'.*macro_f1.*jaccard_acc"):
        build_loss("hinge", _spec(2))
    with pytest.raises(ValueError, match="regression"):
        build_loss("mse", _spec(2))
    with pytest.raises(ValueError, match="mse"):
        build_loss("macro_f1", TaskSpec(regression=True))
    with pytest.raises(ValueError, match="binary_crossentropy"):
        build_loss("categorical_crossentropy", _spec(3, multi_label=True))
    with pytest.raises(ValueError, match="2 categories"):
        build_loss("binary_f1", _spec(3))


def test_mlm_loss_is_summed_cross_entropy_over_normalizer():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 5.0]])
    targets = torch.tensor([0, 2, -100])
    ce = F.cross_entropy(logits[:2], targets[:2], reduction="sum")
    assert mlm_loss(logits, targets).item() == pytest.approx(ce.item() / 2)  # ignored token not counted
    assert mlm_loss(logits, targets, normalizer=8).item() == pytest.approx(ce.item() / 8)
    assert mlm_loss(logits, targets, normalizer=torch.tensor(4)).item() == pytest.approx(ce.item() / 4)
    assert mlm_loss(logits[:0], targets[:0]).item() == 0.0


def test_rop_loss_is_mean_cross_entropy():
    logits = torch.tensor([[0.0, 2.0], [1.0, -1.0]])
    labels = torch.tensor([1, 1])
    expected = (math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(2.0))) / 2
    assert rop_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)


def test_auto_class_weights_are_inverse_frequency_with_mean_one():
    spec = _spec(3, class_weights="auto")
    weights = class_weights_tensor(spec, np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 2]))
    # inverse frequencies 1/6, 1/3, 1 -> divided by their mean 1/2
    assert weights.tolist() == pytest.approx([1 / 3, 2 / 3, 2.0])
    assert weights.mean().item() == pytest.approx(1.0)


def test_auto_class_weights_count_positives_for_multi_label_and_skip_absent_classes():
    spec = _spec(3, multi_label=True, class_weights="auto")
    weights = class_weights_tensor(spec, np.array([[1, 1, 0], [1, 0, 0], [1, 1, 0], [1, 0, 0]]))
    assert weights.tolist() == pytest.approx([2 / 3, 4 / 3, 1.0])


def test_explicit_class_weights_by_label_name_and_index_string():
    spec = TaskSpec(categories={"AGAINST": 0, "NEUTRAL": 1, "FAVOR": 2}, class_weights={"FAVOR": 3.0, "0": 0.5})
    assert class_weights_tensor(spec, None).tolist() == [0.5, 1.0, 3.0]
    assert class_weights_tensor(TaskSpec(categories={"a": 0}), None) is None


def test_class_weights_with_unknown_label_names_it():
    spec = TaskSpec(categories={"AGAINST": 0, "FAVOR": 1}, class_weights={"FAVOUR": 2.0})
    with pytest.raises(ValueError, match=r"class_weights\.FAVOUR.*'AGAINST', 'FAVOR'"):
        class_weights_tensor(spec, None)


# --------------------------------------------------------------------------------------------
# linear_mlm_loss: the decoder and cross-entropy fused, chunk by chunk
# --------------------------------------------------------------------------------------------


def _mlm_problem(n: int, dim: int = 8, vocab: int = 50, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(n, dim, generator=g, requires_grad=True)
    weight = torch.randn(vocab, dim, generator=g).requires_grad_()
    bias = torch.randn(vocab, generator=g).requires_grad_()
    targets = torch.randint(0, vocab, (n,), generator=g)
    return states, weight, bias, targets


@pytest.mark.parametrize("chunk_elements", [50, 7 * 50, 1 << 22])  # one row per chunk, uneven chunks, one chunk
def test_linear_mlm_loss_equals_decoder_then_cross_entropy_in_value_gradients_and_accuracy(monkeypatch,
                                                                                           chunk_elements):
    monkeypatch.setattr(losses, "_LOGIT_CHUNK_ELEMENTS", chunk_elements)
    states, weight, bias, targets = _mlm_problem(23)
    logits = F.linear(states, weight, bias)
    targets[:5] = logits[:5].argmax(-1)  # some rows right, so the count is not trivially 0
    expected = mlm_loss(logits, targets)
    expected.backward()
    expected_grads = [t.grad.clone() for t in (states, weight, bias)]
    for t in (states, weight, bias):
        t.grad = None
    loss, correct = losses.linear_mlm_loss(states, weight, bias, targets)
    loss.backward()
    torch.testing.assert_close(loss, expected)
    for got, want in zip((states.grad, weight.grad, bias.grad), expected_grads):
        torch.testing.assert_close(got, want)
    assert correct.item() == (logits.argmax(-1) == targets).sum().item() >= 5


def test_linear_mlm_loss_divides_by_the_given_normalizer_and_runs_without_gradients():
    states, weight, bias, targets = _mlm_problem(9)
    summed = mlm_loss(F.linear(states, weight, bias), targets, normalizer=1.0)
    loss, _ = losses.linear_mlm_loss(states, weight, bias, targets, normalizer=torch.tensor(4))
    torch.testing.assert_close(loss, summed / 4)
    with torch.no_grad():
        loss, correct = losses.linear_mlm_loss(states, weight, bias, targets)
    torch.testing.assert_close(loss, summed / 9)
    assert not loss.requires_grad


def test_linear_mlm_loss_of_no_rows_is_zero_with_zero_gradients():
    states, weight, bias, targets = _mlm_problem(0)
    loss, correct = losses.linear_mlm_loss(states, weight, bias, targets)
    loss.backward()
    assert loss.item() == 0.0 and correct.item() == 0
    assert not weight.grad.any() and not bias.grad.any()


def test_linear_mlm_loss_under_bf16_autocast_stays_within_bf16_precision():
    states, weight, bias, targets = _mlm_problem(16, dim=32, vocab=200)
    expected = mlm_loss(F.linear(states, weight, bias), targets)
    expected.backward()
    want = weight.grad.clone()
    weight.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = losses.linear_mlm_loss(states, weight, bias, targets)
    loss.backward()
    assert loss.dtype == torch.float32 and weight.grad.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=0.02, atol=0.05)
    torch.testing.assert_close(weight.grad, want, rtol=0.05, atol=0.02)


def test_config_names_exactly_the_losses_training_builds():
    # config validates loss names as plain data (no import of training code); the two must agree
    from twilbert.config.training import LOSS_NAMES, SOFT_METRIC_LOSSES

    assert tuple(losses._SOFT_METRICS) == SOFT_METRIC_LOSSES
    spec = TaskSpec(categories={"a": 0, "b": 1})
    regression = TaskSpec(regression=True)
    for name in LOSS_NAMES:
        built = build_loss(name, regression if name in ("mse", "rmse") else spec)
        assert callable(built), name
