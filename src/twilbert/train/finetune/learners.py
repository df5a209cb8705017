"""Finetuning one model on one task: a classification head on an encoder (TWilBert's or a Hugging
Face one, ``encoders``) trained to its best dev epoch with early stopping, or the TF-IDF baseline.

A *learner* is one model family: it prepares splits (packed rows, or texts for the baseline) and
fits a model on a train split, monitored on a held-out one. ``learner_run.evaluate_learner`` runs a
learner with or without k-fold; ``stage_work`` is the stage's work.

Neural learners checkpoint each epoch end (and every ``finetuning.checkpoint_every`` micro-steps)
when given a checkpoint directory, best epoch and early-stopping counters included; a rerun of the
same run (config, data, pretrained model, code) continues exactly. Under torchrun every worker trains
its block of each global batch's ``finetuning.micro_batches`` micro-batches (the same bytes for any
number of workers: ``train.loop``) and scores dev in full; only rank 0 writes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import nn

from twilbert.config import ConfigError, FinetuningConfig, TaskConfig
from twilbert.data.batch import PACKED_KEYS, PairBatch
from twilbert.data.hf_vocab import vocab_preprocessor
from twilbert.data.packers import TWilBertPacker
from twilbert.data.preprocess import Preprocessor
from twilbert.data.tasks import TaskExamples
from twilbert.data.tokenizer import META_FILE, Tokenizer
from twilbert.device import resolve_device
from twilbert.evaluation.metrics import official_metric_name
from twilbert.evaluation.scoring import Split, evaluate_scores, predict_scores
from twilbert.model.baseline import fit_baseline, save_baseline
from twilbert.model.card import HeadConfig
from twilbert.model.manifest import write_manifest
from twilbert.model.trainable import set_trainable
from twilbert.tracking.runs import Tracker
from twilbert.train.best_epoch import BestEpoch
from twilbert.train.distributed import DistContext, GlobalBatch, check_workers, micro_batch_indices, n_global_batches
from twilbert.train.finetune.encoders import Backbone, HFBackbone, TWilBertBackbone
from twilbert.train.finetune.resolved import FinetuneRun
from twilbert.train.fingerprint import run_fingerprint
from twilbert.train.loop import Callback, Checkpointing, Trainer
from twilbert.train.losses import SummedLoss, build_loss, class_weights_tensor
from twilbert.train.optim import build_optimizer, build_scheduler, param_groups
from twilbert.train.run_dirs import run_directory

log = logging.getLogger(__name__)
EPOCH_CURVES = "epochs/"  # MLflow metric prefix of the per-epoch curves (a chart section in the UI)

TRAIN_STATE_DIR = "train_state"  # training checkpoints of the single model; fold-<i> for k-fold


# --------------------------------------------------------------------------------------------
# Task shapes, batches, the dev monitor
# --------------------------------------------------------------------------------------------


def resolve_loss(name: str, task: TaskConfig) -> str:
    """``auto``: cross-entropy for single-label, BCE for multi-label, MSE for regression."""
    if name != "auto":
        return name
    if task.task.regression:
        return "mse"
    return "binary_crossentropy" if task.task.multi_label else "categorical_crossentropy"


def label_array(ex: TaskExamples, task: TaskConfig) -> np.ndarray:
    """Class indices (N,), 0/1 flags (N, C) for multi-label, or floats (N,) for regression."""
    if task.task.regression or task.task.multi_label:
        return np.asarray(ex.labels, dtype=np.float32)
    return np.asarray(ex.labels, dtype=np.int64)


def encode_examples(packer: Any, ex: TaskExamples, max_len: int, task: TaskConfig) -> Split:
    """Packed ``[CLS] text [SEP] (aux [SEP])`` rows with their targets; ``packer`` may be a Tokenizer."""
    if isinstance(packer, Tokenizer):
        packer = TWilBertPacker(packer)
    a, b = packer.encode(ex.texts, ex.aux_texts)
    log_truncated(task.name, ex.path, a, b, max_len)
    packed = packer.pack(ex.texts, ex.aux_texts, max_len, encoded=(a, b))
    packed["labels"] = label_array(ex, task)
    return packed


def log_truncated(task: str, path: str, a: Sequence[Sequence[int]], b: Optional[Sequence[Sequence[int]]],
                  max_len: int) -> int:
    """Log, in one line, how many examples of a split lose tokens to ``max_len`` (a text or its second
    text over it); returns that count. Nothing is logged when none does."""
    over = [len(x) > max_len for x in a]
    if b is not None:
        over = [o or len(y) > max_len for o, y in zip(over, b)]
    n = sum(over)
    if n:
        log.info("%s %s: %d of %d examples cut to %d tokens", task, Path(path).name, n, len(over), max_len)
    return n


def shuffled_batches(data: Split, packer: Any, batch_size: int, seed: int, epoch: int,
                     ctx: Optional[DistContext] = None, start: int = 0, length_grouping: bool = False,
                     n_micro: int = 1) -> Iterator[GlobalBatch]:
    """This worker's share of the training batches from global batch ``start`` on, in an order that is a
    pure function of (seed, epoch), each cut into ``n_micro`` micro-batches
    (``distributed.micro_batch_indices``); with ``length_grouping``, of rows of similar length
    (``data.grouping``)."""
    ctx = ctx or DistContext()
    n = len(data["labels"])
    lengths = (lambda idx: data["length"][idx]) if length_grouping else None
    for s, parts in micro_batch_indices(n, batch_size, n_micro, seed, epoch, ctx.rank, ctx.world_size, start=start,
                                        lengths=lengths):
        yield GlobalBatch(s, n_micro, [(k, packer.batch(*(data[key][idx] for key in PACKED_KEYS)) if len(idx) else None)
                                       for k, idx in parts])


class ClassifierLoss:
    """The task's loss as the loop's ``MicroLoss``: a micro-batch's summed loss over the global batch's
    count (or class-weight sum, ``losses.SummedLoss``)."""

    normalizers = 1

    def __init__(self, loss: SummedLoss, device: torch.device):
        self.summed, self.device = loss, device

    def prepare(self, batch: PairBatch, keys: tuple[int, ...]) -> tuple[PairBatch, tuple[float]]:
        return batch, (self.summed.denominator(batch.labels),)

    def micro_loss(self, model: nn.Module, batch: PairBatch, totals: torch.Tensor) -> tuple[torch.Tensor, dict]:
        batch = batch.to(self.device)
        logits = model(batch.input_ids, batch.segment_ids, batch.attention_mask, batch.special_mask,
                       padded=batch.padded)
        return self.summed.numerator(logits, batch.labels) / totals[0].float(), {}


def score_split(model, data: Split, task: TaskConfig, ft: FinetuningConfig, device, packer: Any = None) -> dict[str, float]:
    """Metrics of ``model`` on one split (the per-epoch dev monitor)."""
    scores = predict_scores(model, data, task, ft.pred_batch_size, device, ft.precision, packer)
    return evaluate_scores(task, data["labels"], scores)


@dataclass
class FinetuningTask:
    """Finetuning one classifier as the loop's ``TrainingTask``: shuffled batches of ``train``, the
    task's loss, the dev monitor that picks the best epoch, and the per-epoch history (with its curves
    in MLflow), which travels in the training checkpoints."""

    model: nn.Module
    loss: ClassifierLoss
    train: Split
    dev: Split
    task: TaskConfig
    ft: FinetuningConfig
    packer: Any
    seed: int
    device: torch.device
    ctx: DistContext
    tracker: Optional[Tracker] = None
    fold: Optional[int] = None
    history: list[dict] = field(default_factory=list)

    def batches(self, epoch: int, skip: int) -> Iterator[PairBatch]:
        ft = self.ft
        return shuffled_batches(self.train, self.packer, ft.batch_size, self.seed, epoch, self.ctx, skip,
                                ft.length_grouping, ft.micro_batches)

    def evaluate(self, epoch: int, sums: dict) -> tuple[float, dict]:
        # every rank scores dev in full: the same decision
        dev_metrics = score_split(self.model, self.dev, self.task, self.ft, self.device, self.packer)
        row = {"epoch": epoch + 1, "train_loss": sums["loss"], **{f"dev_{k}": v for k, v in dev_metrics.items()}}
        return dev_metrics["official"], row

    def shown(self, row: dict) -> dict:
        return {"train_loss": row["train_loss"], f"dev_{official_metric_name(self.task.task)}": row["dev_official"]}

    def on_epoch(self, epoch: int, row: dict, improved: bool) -> None:
        self.history.append(row if self.fold is None else {"fold": self.fold, **row})
        if self.tracker:
            # under epochs/: the run's own dev_official... are the selected epoch's (stage_work)
            prefix = "" if self.fold is None else f"fold{self.fold}_"
            self.tracker.log_metrics({f"{EPOCH_CURVES}{prefix}{k}": v for k, v in row.items()}, step=epoch)

    def state(self) -> dict:
        return {"history": self.history}

    def load_state(self, state: dict) -> None:
        self.history.extend(state["history"])


# --------------------------------------------------------------------------------------------
# Learners
# --------------------------------------------------------------------------------------------


@dataclass
class Fitted:
    """One fitted model: how to score a prepared split and how to save it."""

    learner: "Learner"
    model: Any
    best_epoch: Optional[int]
    history: list[dict]

    def predict(self, split: Split) -> np.ndarray:
        return self.learner.predict(self.model, split)

    def save(self, directory: Path, extra: dict) -> None:
        self.learner.save(self.model, directory, extra)
        write_manifest(directory)  # after every file of every learner (vocabulary, hf/ included)


@dataclass
class Learner:
    """What ``evaluate_learner`` needs from a model family."""

    kind: str  # twilbert | hf | baseline: the "model" of the metrics file
    name: str  # a readable name for tables (pretrained preset, HF checkpoint folder, tfidf-svm)
    task: TaskConfig
    ft: FinetuningConfig
    seed: int
    preprocess: Preprocessor

    def prepare(self, ex: TaskExamples, max_len: int) -> Split:
        raise NotImplementedError

    def fit(self, train: Split, dev: Split, fold: Optional[int] = None) -> Fitted:
        raise NotImplementedError

    def predict(self, model: Any, split: Split) -> np.ndarray:
        raise NotImplementedError

    def save(self, model: Any, directory: Path, extra: dict) -> None:
        raise NotImplementedError


@dataclass
class NeuralLearner(Learner):
    """An encoder plus ``ClassificationHead``, trained with early stopping on dev."""

    backbone: Backbone  # builds, packs for and saves the classifiers (encoders)
    tracker: Optional[Tracker] = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    ctx: DistContext = field(default_factory=DistContext)
    # The stage's checkpoint root (None: no training checkpoints, no resume); this run's folder in it
    # (train.run_dirs) is opened only once the model is built, so a backbone that cannot load leaves none.
    checkpoint_dir: Optional[Path] = None
    fingerprint_parts: Optional[dict[str, str]] = None  # the run's identity (finetune_fingerprint)
    callbacks: list[Callback] = field(default_factory=list)  # the training loop's hooks

    @property
    def packer(self) -> Any:
        return self.backbone.packer

    def prepare(self, ex: TaskExamples, max_len: int) -> Split:
        return encode_examples(self.packer, ex, max_len, self.task)

    def predict(self, model: nn.Module, split: Split) -> np.ndarray:
        ft = self.ft
        return predict_scores(model, split, self.task, ft.pred_batch_size, self.device, ft.precision, self.packer)

    def save(self, model: nn.Module, directory: Path, extra: dict) -> None:
        self.backbone.save(model, directory, {"head": HeadConfig.of(self.ft), **extra})

    def fit(self, train: Split, dev: Split, fold: Optional[int] = None) -> Fitted:
        ft, task, device, ctx = self.ft, self.task, self.device, self.ctx
        seed = self.seed + (fold or 0)
        check_workers(ft.micro_batches, ctx.world_size, f"tasks.{task.name}.finetuning.micro_batches")
        torch.manual_seed(seed)
        model = self.backbone.build()
        set_trainable(model, ft.finetune_all, ft.trainable_layers)
        model.to(device)

        weights = class_weights_tensor(task.task, train["labels"])
        loss = ClassifierLoss(SummedLoss(resolve_loss(ft.loss, task), task.task, weights), device)
        run = FinetuningTask(model, loss, train, dev, task, ft, self.packer, seed, device, ctx, self.tracker, fold)

        groups = param_groups(model, ft.lr, ft.weight_decay, None)  # skips frozen parameters
        optimizer = build_optimizer(ft.optimizer, groups, ft.lr, ft.weight_decay)
        scheduler = build_scheduler(optimizer, ft.noam_annealing, self.backbone.hidden_size, ft.warmup_steps)
        prefix = f"finetune_{task.name}" + ("" if fold is None else f"_fold{fold}")
        trainer = Trainer(model, optimizer, scheduler, accum_iters=ft.accum_iters,
                          max_grad_norm=ft.max_grad_norm, precision=ft.precision, device=device, tracker=self.tracker,
                          log_every=10, prefix=prefix, checkpointing=self._checkpointing(fold),
                          callbacks=self.callbacks, seed=seed)
        best = trainer.fit(run, ft.epochs, BestEpoch(lower_is_better=False), patience=ft.patience,
                           total=n_global_batches(len(train["labels"]), ft.batch_size),
                           tag=task.name if fold is None else f"{task.name} fold {fold}")
        model.load_state_dict(best.weights)
        return Fitted(self, model, best.epoch, run.history)

    def _checkpointing(self, fold: Optional[int]) -> Optional[Checkpointing]:
        if self.checkpoint_dir is None:
            return None
        parts = dict(self.fingerprint_parts or {})
        fingerprint = run_fingerprint(parts)
        run_dir = run_directory(self.checkpoint_dir, fingerprint, parts)
        directory = run_dir / (TRAIN_STATE_DIR if fold is None else f"fold-{fold}")
        return Checkpointing(directory, fingerprint, self.ft.checkpoint_every, parts=parts)


@dataclass
class BaselineLearner(Learner):
    """TF-IDF n-grams and a linear model; one fit, no epochs."""

    def prepare(self, ex: TaskExamples, max_len: int) -> Split:
        split = {"texts": np.asarray(ex.texts, dtype=object), "labels": label_array(ex, self.task)}
        if ex.aux_texts is not None:
            split["aux"] = np.asarray(ex.aux_texts, dtype=object)
        return split

    def predict(self, model, split: Split) -> np.ndarray:
        aux = split["aux"].tolist() if "aux" in split else None
        return model.predict_scores(split["texts"].tolist(), aux)

    def save(self, model, directory: Path, extra: dict) -> None:
        save_baseline(directory, model, self.ft.baseline_model, self.ft.baseline_c, extra)

    def fit(self, train: Split, dev: Split, fold: Optional[int] = None) -> Fitted:
        weights = class_weights_tensor(self.task.task, train["labels"])
        model = fit_baseline(
            train["texts"].tolist(), train["aux"].tolist() if "aux" in train else None, train["labels"],
            self.task.task, self.ft.baseline_model, self.ft.baseline_c, self.seed + (fold or 0), self.preprocess,
            None if weights is None else weights.numpy(),
        )
        dev_metrics = evaluate_scores(self.task, dev["labels"], self.predict(model, dev))
        row = {"epoch": 1, **{f"dev_{k}": v for k, v in dev_metrics.items()}}
        return Fitted(self, model, None, [row if fold is None else {"fold": fold, **row}])


def check_loss(ft: FinetuningConfig, task: TaskConfig) -> None:
    """Fail before any work when the loss does not fit the task."""
    try:
        build_loss(resolve_loss(ft.loss, task), task.task)
    except ValueError as err:
        raise ConfigError(f"tasks.{task.name}.finetuning.loss ({ft.loss!r}): {err}") from None


def twilbert_learner(run: FinetuneRun, tracker: Optional[Tracker], ctx: Optional[DistContext] = None) -> NeuralLearner:
    check_loss(run.ft, run.task)
    backbone = TWilBertBackbone.load(run.max_len, run.task, run.ft, run.pretrained_dir)
    return neural_learner(run, backbone, tracker, ctx)


def hf_learner(run: FinetuneRun, tracker: Optional[Tracker], ctx: Optional[DistContext] = None) -> NeuralLearner:
    check_loss(run.ft, run.task)
    return neural_learner(run, HFBackbone.load(Preprocessor(run.preprocess), run.task, run.ft), tracker, ctx)


def neural_learner(run: FinetuneRun, backbone: Backbone, tracker: Optional[Tracker],
                   ctx: Optional[DistContext] = None) -> NeuralLearner:
    return NeuralLearner(backbone.kind, backbone.name, run.task, run.ft, run.seed, backbone.preprocess,
                         backbone=backbone, tracker=tracker, **_placement(run.ft, ctx))


def _placement(ft: FinetuningConfig, ctx: Optional[DistContext]) -> dict:
    """The learner's device and process group: torchrun's when distributed, else ``finetuning.device``."""
    ctx = ctx or DistContext(device=resolve_device(ft.device))
    return {"device": ctx.device, "ctx": ctx}


def baseline_learner(run: FinetuneRun, preprocess: Preprocessor) -> BaselineLearner:
    return BaselineLearner("baseline", f"tfidf-{run.ft.baseline_model}", run.task, run.ft, run.seed, preprocess)


def task_preprocessor(run: FinetuneRun) -> Preprocessor:
    """The vocabulary's preprocessing when there is a pretrained model, else ``preprocess``."""
    if (run.pretrained_dir / META_FILE).is_file():  # twilbert's vocabulary, or a checkpoint's (init_from hf)
        return vocab_preprocessor(run.pretrained_dir)
    return Preprocessor(run.preprocess)
