"""k-fold training and blending: one model per fold, early-stopped on its held-out fold, and the
folds' probabilities on every evaluation split averaged (the RoBERTuito notebooks' blending).

Folds are seeded. Single-label tasks are stratified by class; multi-label and regression tasks
(and classes too rare to appear in every fold) fall back to a plain shuffled KFold.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Callable, Optional, Sequence

import numpy as np
from sklearn.model_selection import KFold, StratifiedKFold

from twilbert.config import TaskSpec
from twilbert.data.tasks import TaskExamples

log = logging.getLogger(__name__)


@dataclass
class FoldResult:
    """What one fold's model gives back."""

    score: float  # official metric on its held-out fold
    held_out: np.ndarray  # (n_held_out, C) scores on the held-out fold: out-of-fold predictions
    outputs: dict[str, np.ndarray]  # (n, C) scores on each evaluation split ("dev", "test")
    best_epoch: Optional[int] = None


@dataclass
class KFoldOutcome:
    k: int
    fold_scores: list[float]
    best_epochs: list[Optional[int]]
    blended: dict[str, np.ndarray]  # the mean of the folds' scores on each evaluation split
    out_of_fold: np.ndarray  # (n, C): each pooled example scored by the model that never saw it
    folds: list[FoldResult] = field(default_factory=list)

    @property
    def mean_fold_score(self) -> float:
        return float(np.mean(self.fold_scores))

    def summary(self) -> dict:
        return {"k": self.k, "fold_scores": self.fold_scores, "mean_fold_score": self.mean_fold_score,
                "best_epochs": self.best_epochs}


def fold_splits(labels: Sequence, spec: TaskSpec, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train indices, held-out indices) of each of ``k`` seeded folds over ``labels``."""
    n = len(labels)
    if k > n:
        raise ValueError(f"finetuning.kfold {k} is more folds than the {n} examples to split")
    X = np.zeros((n, 1))
    if not (spec.regression or spec.multi_label):
        y = np.asarray(labels, dtype=np.int64)
        counts = np.bincount(y)
        present = counts[counts > 0]
        if present.min() >= k:
            return list(StratifiedKFold(k, shuffle=True, random_state=seed).split(X, y))
        log.warning("kfold: a class has only %d examples, fewer than %d folds; folds are not stratified",
                    present.min(), k)
    return list(KFold(k, shuffle=True, random_state=seed).split(X))


def blend(scores: Sequence[np.ndarray]) -> np.ndarray:
    """The folds' probabilities (or regression values) averaged, example by example."""
    return np.mean(np.stack([np.asarray(s, dtype=np.float64) for s in scores]), axis=0).astype(np.float32)


def run_kfold(
    labels: Sequence, spec: TaskSpec, k: int, seed: int,
    train_fold: Callable[[int, np.ndarray, np.ndarray], FoldResult],
) -> KFoldOutcome:
    """Call ``train_fold(fold, train_idx, held_out_idx)`` for each fold and blend what they return."""
    folds, out_of_fold = [], None
    for i, (train_idx, held_idx) in enumerate(fold_splits(labels, spec, k, seed)):
        result = train_fold(i, train_idx, held_idx)
        log.info("kfold: fold %d (of %d) held-out score %.4f", i, k, result.score)
        if out_of_fold is None:
            out_of_fold = np.zeros((len(labels), *result.held_out.shape[1:]), dtype=np.float32)
        out_of_fold[held_idx] = result.held_out
        folds.append(result)
    blended = {name: blend([f.outputs[name] for f in folds]) for name in folds[0].outputs}
    return KFoldOutcome(k, [f.score for f in folds], [f.best_epoch for f in folds], blended, out_of_fold, folds)


def concat_examples(first: TaskExamples, second: TaskExamples) -> TaskExamples:
    """``first`` then ``second`` as one pool (``kfold_on: train+dev``)."""
    if (first.aux_texts is None) != (second.aux_texts is None):
        raise ValueError(f"{first.path} and {second.path}: one has an aux text column and the other not")
    aux = None if first.aux_texts is None else first.aux_texts + second.aux_texts
    return replace(
        first, path=f"{first.path}+{second.path}", ids=first.ids + second.ids, texts=first.texts + second.texts,
        labels=first.labels + second.labels, aux_texts=aux, line_numbers=first.line_numbers + second.line_numbers,
    )
