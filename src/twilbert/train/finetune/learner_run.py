"""One learner on one task, fitted once or once per fold (``evaluate_learner``); k-fold training and
blending: one model per fold, early-stopped on its held-out fold, and the folds' probabilities on
every evaluation split averaged (the RoBERTuito notebooks' blending).

Folds are seeded. Single-label tasks are stratified by class; multi-label and regression tasks
(and classes too rare to appear in every fold) fall back to a plain shuffled KFold.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import numpy as np
from sklearn.model_selection import KFold, StratifiedKFold

from twilbert.config import TaskSpec
from twilbert.data.tasks import TaskData, TaskExamples
from twilbert.evaluation.metrics import official_metric_name
from twilbert.evaluation.predictions import Predictions
from twilbert.evaluation.scoring import Split, decide, evaluate_scores
from twilbert.io_utils import link_or_copy
from twilbert.model.card import CONFIG_NAME, KFoldSummary, read_card
from twilbert.model.manifest import write_manifest

if TYPE_CHECKING:
    from twilbert.train.finetune.learners import Learner

log = logging.getLogger(__name__)

FOLDS_DIR = "folds"


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


def subset(split: Split, idx: np.ndarray) -> Split:
    return {k: v[idx] for k, v in split.items()}


@dataclass
class LearnerRun:
    metrics: dict
    history: list[dict]
    kfold: Optional[KFoldOutcome] = None
    test: Optional[Predictions] = None  # the reported test split's predictions (k-fold: the blend's)


def reported_predictions(learner: Learner, examples: TaskExamples, labels: np.ndarray,
                         scores: np.ndarray) -> Predictions:
    """The decisions on the reported test split, by example id."""
    return Predictions(list(examples.ids), np.asarray(labels), decide(scores, learner.task), learner.task.task)


def evaluate_learner(learner: Learner, splits: TaskData, max_len: int, test_len: int,
                     model_out: Optional[Path]) -> LearnerRun:
    """Fit (once, or once per fold), evaluate dev and test, save the model(s) under ``model_out``
    (None: save nothing, as on the ranks other than 0 under torchrun)."""
    task, ft = learner.task, learner.ft
    extra = {"task": task, "max_len_test": test_len, "finetuning": ft}  # the finetuned model card's keys
    kfold_on = ft.kfold_on
    if ft.kfold and kfold_on == "train+dev" and splits.test_is_dev:
        log.warning("%s: no test file, so dev is the test; k-fold on train only to keep it unseen", task.name)
        kfold_on = "train"
    base = {
        "task": task.name, "model": learner.kind, "model_name": learner.name,
        "official_metric": official_metric_name(task.task),
        "protocol": splits.protocol, "dev_from_train": splits.dev_from_train, "test_is_dev": splits.test_is_dev,
    }
    if not ft.kfold:
        train, dev = learner.prepare(splits.train, max_len), learner.prepare(splits.dev, test_len)
        test = dev if splits.test_is_dev else learner.prepare(splits.test, test_len)
        fitted = learner.fit(train, dev)
        dev_scores = fitted.predict(dev)
        test_scores = dev_scores if splits.test_is_dev else fitted.predict(test)
        dev_metrics = evaluate_scores(task, dev["labels"], dev_scores)
        test_metrics = dev_metrics if splits.test_is_dev else evaluate_scores(task, test["labels"], test_scores)
        if model_out is not None:
            fitted.save(model_out, {**extra, "best_epoch": fitted.best_epoch})
        metrics = {**base, "best_epoch": fitted.best_epoch, "epochs_run": epochs_run(learner, fitted.history),
                   "n_train": len(train["labels"]), "n_dev": len(dev["labels"]), "n_test": len(test["labels"]),
                   "dev": dev_metrics, "test": test_metrics}
        test_examples = splits.dev if splits.test_is_dev else splits.test
        return LearnerRun(metrics, fitted.history,
                          test=reported_predictions(learner, test_examples, test["labels"], test_scores))

    pool_ex = concat_examples(splits.train, splits.dev) if kfold_on == "train+dev" else splits.train
    pool = learner.prepare(pool_ex, max_len)
    evals = {"test": learner.prepare(splits.test, test_len)} if not splits.test_is_dev else {}
    if kfold_on == "train":
        evals["dev"] = learner.prepare(splits.dev, test_len)
    history: list[dict] = []

    def train_fold(fold: int, train_idx: np.ndarray, held_idx: np.ndarray) -> FoldResult:
        held = subset(pool, held_idx)
        fitted = learner.fit(subset(pool, train_idx), held, fold)
        history.extend(fitted.history)
        held_scores = fitted.predict(held)
        if model_out is not None:
            fitted.save(model_out / FOLDS_DIR / str(fold), {**extra, "best_epoch": fitted.best_epoch, "fold": fold})
        return FoldResult(evaluate_scores(task, held["labels"], held_scores)["official"], held_scores,
                          {name: fitted.predict(split) for name, split in evals.items()}, fitted.best_epoch)

    outcome = run_kfold(pool["labels"], task.task, ft.kfold, learner.seed, train_fold)
    if kfold_on == "train":
        dev_metrics = evaluate_scores(task, evals["dev"]["labels"], outcome.blended["dev"])
    else:  # dev is inside the pool: each example scored by the fold model that never saw it
        dev_metrics = evaluate_scores(task, pool["labels"], outcome.out_of_fold)
    test_metrics = (dev_metrics if splits.test_is_dev
                    else evaluate_scores(task, evals["test"]["labels"], outcome.blended["test"]))
    # no test file: the test is the dev file, outside the pool (k-fold on train only), scored by the blend
    test_name, test_examples = ("dev", splits.dev) if splits.test_is_dev else ("test", splits.test)
    test = reported_predictions(learner, test_examples, evals[test_name]["labels"], outcome.blended[test_name])
    members = [f"{FOLDS_DIR}/{i}" for i in range(ft.kfold)]
    selected = int(np.argmax(outcome.fold_scores))
    if model_out is not None:
        _publish_fold(model_out, selected,
                      {**outcome.summary(), "on": kfold_on, "members": members, "selected_fold": selected})
    n_test = len(splits.test) if not splits.test_is_dev else len(splits.dev)
    metrics = {**base, "best_epoch": None, "epochs_run": epochs_run(learner, history),
               "n_train": len(pool["labels"]), "n_dev": len(splits.dev), "n_test": n_test,
               "dev": dev_metrics, "test": test_metrics,
               "kfold": {**outcome.summary(), "on": kfold_on, "dev_is_out_of_fold": kfold_on == "train+dev"}}
    return LearnerRun(metrics, history, outcome, test)


def epochs_run(learner: Learner, history: list[dict]) -> Optional[int]:
    """Epochs trained (summed over folds); None for the baseline, which has none."""
    return None if learner.kind == "baseline" else len(history)


def _publish_fold(model_out: Path, fold: int, kfold_info: dict) -> None:
    """The selected fold's model becomes the directory's own (loaders see a normal model);
    ``config.json["kfold"]`` lists every fold model for blended prediction."""
    source = model_out / FOLDS_DIR / str(fold)
    for entry in source.rglob("*"):
        target = model_out / entry.relative_to(source)
        if entry.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            link_or_copy(entry, target)
    config_path = model_out / CONFIG_NAME
    card = read_card(config_path)
    card.kfold = KFoldSummary(**kfold_info)
    card.write(config_path)  # a hard link: writes a fresh file rather than the fold's
    write_manifest(model_out)  # the selected fold's manifest came along as a link: replace it
