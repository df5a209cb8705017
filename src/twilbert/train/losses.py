"""Losses: MLM and ROP for pretraining; finetuning losses by TWilBert name.

The metric-approximating losses (González et al. 2018, LKE) replace counts by probabilities:
tp_c = sum_b y_bc p_bc, fp_c = sum_b (1 - y_bc) p_bc, fn_c = sum_b y_bc (1 - p_bc). On one-hot
predictions every ``soft_*`` function equals the scikit-learn metric with ``zero_division=0``
over all classes; the loss is ``1 - metric``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from twilbert.config import TaskSpec
from twilbert.config.training import canonical_loss, loss_misfit
from twilbert.data.special import IGNORE_INDEX

log = logging.getLogger(__name__)

LossFn = Callable[[Tensor, Tensor], Tensor]


# --------------------------------------------------------------------------------------------
# Pretraining
# --------------------------------------------------------------------------------------------


def mlm_loss(logits: Tensor, targets: Tensor, normalizer: Union[float, Tensor, None] = None) -> Tensor:
    """Summed cross-entropy over masked tokens divided by ``normalizer`` (default: their count).

    logits (N, V), targets (N,); targets equal to -100 are ignored. Micro-batches pass the masked
    count of the whole global batch so every token weighs the same whatever micro-batch it landed in.
    """
    total = F.cross_entropy(logits.float(), targets, reduction="sum", ignore_index=IGNORE_INDEX)
    return _normalized(total, (targets != IGNORE_INDEX).sum() if normalizer is None else normalizer)


def _normalized(total: Tensor, normalizer: Union[float, Tensor]) -> Tensor:
    """``total / normalizer``, a normalizer of 0 (no masked token) counting as 1."""
    if isinstance(normalizer, Tensor):
        return total / normalizer.to(total.dtype).clamp_min(1.0)
    return total / max(float(normalizer), 1.0)


# Rows of (rows, V) logits held at once by ``linear_mlm_loss``: ~16 MiB in fp32, small enough to stay
# in the allocator's reused memory instead of fresh pages every step.
_LOGIT_CHUNK_ELEMENTS = 1 << 22


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``states @ weight.T + bias`` and the count of correct argmaxes.

    The (N, V) logits exist only one chunk of rows at a time, and the gradients are computed while
    they do (softmax minus one-hot, times the decoder and the states), so backward only scales
    them. A plain decoder + ``F.cross_entropy`` holds the logits, the log-softmax, the zeroed
    gradient buffer and the logits' gradient, four (N, V) tensors.
    """

    @staticmethod
    def forward(ctx, states: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor):
        need_grad = any(ctx.needs_input_grad[:3])
        autocast = torch.is_autocast_enabled(states.device.type)
        rows = max(1, _LOGIT_CHUNK_ELEMENTS // weight.shape[0])
        loss = torch.zeros((), dtype=torch.float32, device=states.device)
        correct = torch.zeros((), dtype=torch.long, device=states.device)
        grad_states = torch.empty(states.shape, dtype=torch.float32, device=states.device) if need_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=states.device) if need_grad else None
        grad_bias = None if bias is None or not need_grad else torch.zeros(weight.shape[0], device=states.device)
        for start in range(0, states.shape[0], rows):
            h, t = states[start:start + rows], targets[start:start + rows, None]  # (c, E), (c, 1)
            logits = F.linear(h, weight, bias).float()  # (c, V)
            top, predicted = logits.max(-1)
            correct += (predicted == t[:, 0]).sum()
            picked = logits.gather(1, t)[:, 0] - top  # (c,)
            shifted = logits.sub_(top[:, None]).exp_()  # (c, V), exp(logit - max)
            total = shifted.sum(-1)  # (c,)
            loss += (total.log() - picked).sum()
            if not need_grad:
                continue
            grad_logits = shifted.div_(total[:, None])  # softmax, in place
            grad_logits.scatter_add_(1, t, grad_logits.new_full(t.shape, -1.0))  # minus the one-hot target
            grad_states[start:start + rows] = grad_logits @ (weight if autocast else weight.to(grad_logits.dtype))
            if autocast:  # the same reduced-precision product autograd would run under autocast
                grad_weight += grad_logits.t() @ h
            else:
                grad_weight.addmm_(grad_logits.t(), h.to(grad_logits.dtype))
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)
        ctx.save_for_backward(grad_states, grad_weight, grad_bias)
        ctx.dtypes = (states.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_correct: Tensor):
        grads = [None if g is None else (g * grad_loss).to(dtype) for g, dtype in zip(ctx.saved_tensors, ctx.dtypes)]
        return (*grads, None)


def linear_mlm_loss(states: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                    normalizer: Union[float, Tensor, None] = None) -> tuple[Tensor, Tensor]:
    """``mlm_loss(F.linear(states, weight, bias), targets, normalizer)`` and the number of rows whose
    argmax is the target, without the (N, V) logits ever held whole (see ``_LinearCrossEntropy``).

    states (N, E) at the masked positions only, weight (V, E), bias (V,), targets (N,) all valid ids.
    """
    total, correct = _LinearCrossEntropy.apply(states, weight, bias, targets)
    return _normalized(total, targets.numel() if normalizer is None else normalizer), correct


def rop_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of reply order prediction; logits (B, 2), labels (B,), 1 = original order."""
    return F.cross_entropy(logits.float(), labels)


# --------------------------------------------------------------------------------------------
# Soft metrics: probabilities p (B, C) against 0/1 targets y (B, C)
# --------------------------------------------------------------------------------------------


def _div(num: Tensor, den: Tensor) -> Tensor:
    # num <= den and num >= 0 here, so den == 0 implies num == 0: the clamp yields sklearn's
    # zero_division=0 without the NaN gradients torch.where would leak
    return num / den.clamp_min(torch.finfo(den.dtype).tiny)


def _counts(p: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Soft tp, fp, fn per class, each (C,)."""
    tp = (y * p).sum(0)
    fp = ((1.0 - y) * p).sum(0)
    fn = (y * (1.0 - p)).sum(0)
    return tp, fp, fn


def soft_precision(p: Tensor, y: Tensor, average: Optional[str] = "macro") -> Tensor:
    """Precision with ``average`` in macro | micro | None (per class, (C,))."""
    tp, fp, _ = _counts(p, y)
    if average == "micro":
        return _div(tp.sum(), tp.sum() + fp.sum())
    per_class = _div(tp, tp + fp)
    return per_class.mean() if average == "macro" else per_class


def soft_recall(p: Tensor, y: Tensor, average: Optional[str] = "macro") -> Tensor:
    """Recall with ``average`` in macro | micro | None (per class, (C,))."""
    tp, _, fn = _counts(p, y)
    if average == "micro":
        return _div(tp.sum(), tp.sum() + fn.sum())
    per_class = _div(tp, tp + fn)
    return per_class.mean() if average == "macro" else per_class


def soft_f1(p: Tensor, y: Tensor, average: Optional[str] = "macro") -> Tensor:
    """F1 = 2tp / (2tp + fp + fn) with ``average`` in macro | micro | None (per class, (C,))."""
    tp, fp, fn = _counts(p, y)
    if average == "micro":
        tp, fp, fn = tp.sum(), fp.sum(), fn.sum()
        return _div(2.0 * tp, 2.0 * tp + fp + fn)
    per_class = _div(2.0 * tp, 2.0 * tp + fp + fn)
    return per_class.mean() if average == "macro" else per_class


def soft_f1_of_macro(p: Tensor, y: Tensor) -> Tensor:
    """TWilBert's ``f1_macro``: harmonic mean of macro precision and macro recall."""
    mp, mr = soft_precision(p, y, "macro"), soft_recall(p, y, "macro")
    return _div(2.0 * mp * mr, mp + mr)


def soft_jaccard(p: Tensor, y: Tensor) -> Tensor:
    """Sample-averaged Jaccard |y ∩ ŷ| / |y ∪ ŷ|, with ∪ as y + p - y p (= max(y, p) for 0/1 y)."""
    inter = (y * p).sum(1)
    union = (y + p - y * p).sum(1)
    return _div(inter, union).mean()


# --------------------------------------------------------------------------------------------
# Finetuning losses by name
# --------------------------------------------------------------------------------------------

_SOFT_METRICS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "macro_f1": lambda p, y: soft_f1(p, y, "macro"),
    "f1_macro": soft_f1_of_macro,
    "micro_f1": lambda p, y: soft_f1(p, y, "micro"),
    "binary_f1": lambda p, y: soft_f1(p, y, None)[1],
    "macro_precision": lambda p, y: soft_precision(p, y, "macro"),
    "macro_recall": lambda p, y: soft_recall(p, y, "macro"),
    "micro_precision": lambda p, y: soft_precision(p, y, "micro"),
    "micro_recall": lambda p, y: soft_recall(p, y, "micro"),
    "jaccard_acc": soft_jaccard,
}


def _probs_and_onehot(logits: Tensor, targets: Tensor, multi_label: bool) -> tuple[Tensor, Tensor]:
    logits = logits.float()
    if multi_label:
        return torch.sigmoid(logits), targets.float()
    return torch.softmax(logits, dim=-1), F.one_hot(targets.long(), logits.shape[-1]).float()


def _soft_metric_loss(metric: Callable[[Tensor, Tensor], Tensor], multi_label: bool) -> LossFn:
    def loss(logits: Tensor, targets: Tensor) -> Tensor:
        p, y = _probs_and_onehot(logits, targets, multi_label)
        return 1.0 - metric(p, y)

    return loss


def _regression_loss(root: bool) -> LossFn:
    def loss(logits: Tensor, targets: Tensor) -> Tensor:
        mse = F.mse_loss(logits.float().reshape(targets.shape), targets.float())
        return mse.sqrt() if root else mse

    return loss


def build_loss(name: str, spec: TaskSpec, class_weights: Optional[Tensor] = None) -> LossFn:
    """Finetuning loss ``(logits, targets) -> scalar`` by TWilBert name.

    Targets: class indices (B,) for single-label, 0/1 floats (B, C) for multi-label, floats
    (B,) or (B, 1) for regression. ``class_weights`` (C,) weight the cross-entropy and act as
    BCE positive weights; the soft-metric losses ignore them.
    """
    key = canonical_loss(name)
    misfit = loss_misfit(name, spec)
    if misfit:
        raise ValueError(misfit)
    if key in ("mse", "rmse"):
        return _regression_loss(root=key == "rmse")
    if key == "cross_entropy":
        weight = None if class_weights is None else class_weights.float()

        def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
            w = None if weight is None else weight.to(logits.device)
            return F.cross_entropy(logits.float(), targets.long(), weight=w)

        return cross_entropy

    if key == "bce":
        pos_weight = None if class_weights is None else class_weights.float()

        def bce(logits: Tensor, targets: Tensor) -> Tensor:
            _, y = _probs_and_onehot(logits, targets, spec.multi_label)
            w = None if pos_weight is None else pos_weight.to(logits.device)
            return F.binary_cross_entropy_with_logits(logits.float(), y, pos_weight=w)

        return bce

    return _soft_metric_loss(_SOFT_METRICS[key], spec.multi_label)


class SummedLoss:
    """A finetuning loss split for micro-batches (the training loop's ``MicroLoss`` shape): the
    micro-batch's ``numerator`` and ``denominator`` such that the global batch's loss is the sum of the
    numerators over the sum of the denominators, exactly the full batch's loss for cross-entropy (class
    weights included: the denominator is the batch's weight sum), BCE and MSE. RMSE and the soft-metric
    losses do not decompose: there the global loss is the micro-batches' losses averaged by their sizes
    (with one micro-batch, the batch's loss).
    """

    def __init__(self, name: str, spec: TaskSpec, class_weights: Optional[Tensor] = None):
        self.key, self.spec = canonical_loss(name), spec
        self.whole = build_loss(name, spec, class_weights)  # validates the name against the task
        self.class_weights = None if class_weights is None else class_weights.float()

    def denominator(self, targets: Tensor) -> float:
        """From the host targets of the micro-batch, before its forward: its weight or element count."""
        if self.key == "cross_entropy" and self.class_weights is not None:
            return float(self.class_weights.double()[targets.long()].sum())
        if self.key == "bce" and not self.spec.multi_label:  # one-hot targets of every class
            return float(targets.shape[0] * len(self.spec.categories))
        if self.key in ("bce", "mse"):
            return float(targets.numel())
        return float(targets.shape[0])

    def numerator(self, logits: Tensor, targets: Tensor) -> Tensor:
        """The micro-batch's summed loss (device targets; nothing read from the device)."""
        logits = logits.float()
        w = None if self.class_weights is None else self.class_weights.to(logits.device)
        if self.key == "cross_entropy":
            return F.cross_entropy(logits, targets.long(), weight=w, reduction="sum")
        if self.key == "bce":
            _, y = _probs_and_onehot(logits, targets, self.spec.multi_label)
            return F.binary_cross_entropy_with_logits(logits, y, pos_weight=w, reduction="sum")
        if self.key == "mse":
            return F.mse_loss(logits.reshape(targets.shape), targets.float(), reduction="sum")
        return self.whole(logits, targets) * float(targets.shape[0])


# --------------------------------------------------------------------------------------------
# Class weights
# --------------------------------------------------------------------------------------------


def class_weights_tensor(
    spec: TaskSpec, train_targets: Union[Sequence, np.ndarray, Tensor, None] = None
) -> Optional[Tensor]:
    """Class weights (C,) from ``task.class_weights``: None, ``'auto'`` or a mapping label → weight.

    ``'auto'`` is inverse training frequency normalized to mean 1 over the classes present
    (absent classes get 1). Mapping keys are label names; a key that is not a label but an
    index string (``"0"``, as in TWilBert's JSON configs) is read as that index. Unlisted
    classes weigh 1.
    """
    if spec.class_weights is None:
        return None
    if spec.regression:
        raise ValueError("task.class_weights is set but the task is a regression; remove it")
    n_classes = len(spec.categories)
    if spec.class_weights == "auto":
        if train_targets is None:
            raise ValueError("task.class_weights 'auto' needs the training targets")
        y = np.asarray(train_targets.cpu() if isinstance(train_targets, Tensor) else train_targets)
        if spec.multi_label:
            counts = y.reshape(-1, n_classes).sum(0).astype(np.float64)
        else:
            counts = np.bincount(y.astype(int).reshape(-1), minlength=n_classes).astype(np.float64)
        present = counts > 0
        weights = np.ones(n_classes)
        if present.any():
            inv = 1.0 / counts[present]
            weights[present] = inv / inv.mean()
        if not present.all():
            absent = [lab for lab, i in spec.categories.items() if not present[i]]
            log.warning("class_weights auto: labels %s never occur in the training set; weight 1", absent)
        return torch.tensor(weights, dtype=torch.float32)
    if isinstance(spec.class_weights, str):
        raise ValueError(f"task.class_weights must be 'auto' or a mapping, got {spec.class_weights!r}")

    weights = np.ones(n_classes)
    for label, value in spec.class_weights.items():
        if label in spec.categories:
            weights[spec.categories[label]] = value
        elif str(label).isdigit() and int(label) < n_classes:
            weights[int(label)] = value
        else:
            raise ValueError(
                f"task.class_weights.{label}: {label!r} is not one of the categories {list(spec.categories)}"
            )
    return torch.tensor(weights, dtype=torch.float32)
