"""Finetuning one task: a classification head on an encoder (TWilBert's or a Hugging Face one) or the
TF-IDF baseline; the best dev epoch (early stopping), or k folds blended; test evaluated once.

A *learner* is one model family: it prepares splits (packed rows, or texts for the baseline) and
fits a model on a train split, monitored on a held-out one. ``evaluate_learner`` runs a learner
with or without k-fold and saves what it fits; ``finetune_task`` runs the configured backbone,
the baseline row, and writes the metrics files.

Neural learners checkpoint each epoch end (and every ``finetuning.checkpoint_every`` micro-steps)
when given a checkpoint directory, best epoch and early-stopping counters included; a rerun of the
same run (config, data, pretrained model, code) continues exactly. Under torchrun every rank trains
its slice of each batch and scores dev in full; only rank 0 writes.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import numpy as np
import torch
from torch import nn

from twilbert import distributed
from twilbert.baseline import fit_baseline, save_baseline
from twilbert.config import Config, ConfigError, FinetuningConfig, TaskConfig, to_dict
from twilbert.data.formats import TaskExamples
from twilbert.data.pairs import SHARD_KEYS, PairBatch
from twilbert.distributed import DistContext, n_rank_batches, rank_batch_indices, wrap_ddp
from twilbert.data.preprocess import Preprocessor
from twilbert.data.tasks import TaskData, load_task
from twilbert.data.tokenizer import META_FILE, Tokenizer
from twilbert.errors import naming
from twilbert.io_utils import atomic_write
from twilbert.model import TWilBertForClassification
from twilbert.model.backbone import (
    TWilBertPacker, hf_classifier, hf_packer, load_hf_backbone, save_hf_classifier, set_trainable,
    twilbert_classifier,
)
from twilbert.model.card import CONFIG_NAME, HeadConfig, KFoldSummary, ModelCard, read_card, row_width
from twilbert.progress import EpochClock
from twilbert.model.io import CheckpointError, load_pretrained_state, save_pretrained
from twilbert.model.manifest import verify_model_dir, write_manifest
from twilbert.track import Tracker
from twilbert.train.checkpoint import config_fingerprint, files_digest, package_paths, run_fingerprint
from twilbert.train.kfold import FoldResult, KFoldOutcome, concat_examples, run_kfold
from twilbert.train.loop import (
    BestEpoch, Checkpointing, Trainer, configure_matmul, resolve_device, seed_everything,
)
from twilbert.train.losses import build_loss, class_weights_tensor
from twilbert.train.metrics import evaluate_predictions, official_metric_name
from twilbert.train.optim import build_optimizer, build_scheduler, param_groups
from twilbert.train.scoring import Split, decide, n_outputs, predict_scores  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

FOLDS_DIR = "folds"
TRAIN_STATE_DIR = "train_state"  # training checkpoints of the single model; fold-<i> for k-fold
# The code a finetuning run's identity covers (the stage's code deps in dvc.yaml).
FINGERPRINT_CODE = ("model", "train", "data/tasks.py", "data/formats.py", "data/tokenizer.py",
                    "data/preprocess.py", "data/pairs.py", "distributed.py")


# --------------------------------------------------------------------------------------------
# Task shapes
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
    packed = packer.pack(ex.texts, ex.aux_texts, max_len)
    packed["labels"] = label_array(ex, task)
    return packed


def evaluate_scores(task: TaskConfig, labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    return evaluate_predictions(task.task, labels, decide(scores, task), scores)


def subset(split: Split, idx: np.ndarray) -> Split:
    return {k: v[idx] for k, v in split.items()}


# --------------------------------------------------------------------------------------------
# Neural classifiers: building, batching, predicting
# --------------------------------------------------------------------------------------------


def load_encoder_weights(model: TWilBertForClassification, pretrained_dir: Path,
                         verify: Optional[bool] = None) -> ModelCard:
    """Copy the pretrained encoder (``twilbert.*``) into the classifier; heads stay freshly initialised."""
    card, state = load_pretrained_state(pretrained_dir, verify)
    encoder_state = {k: v for k, v in state.items() if k.startswith("twilbert.")}
    missing, unexpected = model.load_state_dict(encoder_state, strict=False)
    missing = [k for k in missing if k.startswith("twilbert.")]
    if missing:
        raise CheckpointError(f"{pretrained_dir}: pretrained weights lack encoder parameters {missing[:5]}")
    return card


def shuffled_batches(data: Split, packer: Any, batch_size: int, seed: int, epoch: int,
                     ctx: Optional[DistContext] = None, start: int = 0) -> Iterator[PairBatch]:
    """This rank's training batches from batch ``start`` on, in an order that is a pure function of
    (seed, epoch) (every rank takes its slice of each global batch: ``distributed.rank_batch_indices``)."""
    ctx = ctx or DistContext()
    n = len(data["labels"])
    for idx in rank_batch_indices(n, batch_size, seed, epoch, ctx.rank, ctx.world_size, start=start):
        yield packer.batch(*(data[k][idx] for k in SHARD_KEYS))


def score_split(model, data: Split, task: TaskConfig, ft: FinetuningConfig, device, packer: Any = None) -> dict[str, float]:
    """Metrics of ``model`` on one split (the per-epoch dev monitor)."""
    scores = predict_scores(model, data, task, ft.pred_batch_size, device, ft.precision, packer)
    return evaluate_scores(task, data["labels"], scores)


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

    packer: Any = None
    new_model: Any = None  # () -> a fresh classifier holding the pretrained encoder weights
    hidden_size: int = 0  # for Noam
    save_model: Any = None  # (model, directory, extra) -> None
    tracker: Optional[Tracker] = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    ctx: DistContext = field(default_factory=DistContext)
    # Hugging Face encoders compute a pooler the head does not use: DDP must be told to expect it.
    find_unused_parameters: bool = False
    checkpoint_dir: Optional[Path] = None  # None: no training checkpoints, no resume
    fingerprint_parts: Optional[dict[str, str]] = None  # the run's identity (finetune_fingerprint)

    def prepare(self, ex: TaskExamples, max_len: int) -> Split:
        return encode_examples(self.packer, ex, max_len, self.task)

    def predict(self, model: nn.Module, split: Split) -> np.ndarray:
        ft = self.ft
        return predict_scores(model, split, self.task, ft.pred_batch_size, self.device, ft.precision, self.packer)

    def save(self, model: nn.Module, directory: Path, extra: dict) -> None:
        self.save_model(model, directory, {"head": HeadConfig.of(self.ft), **extra})

    def fit(self, train: Split, dev: Split, fold: Optional[int] = None) -> Fitted:
        ft, task, device, ctx = self.ft, self.task, self.device, self.ctx
        seed = self.seed + (fold or 0)
        tag = task.name if fold is None else f"{task.name} fold {fold}"
        torch.manual_seed(seed)
        model = self.new_model()
        set_trainable(model, ft.finetune_all, ft.trainable_layers)
        model.to(device)
        if ctx.is_distributed:
            torch.manual_seed(seed + ctx.rank)  # dropout differs per rank; DDP broadcasts rank 0's weights

        weights = class_weights_tensor(task.task, train["labels"])
        criterion = build_loss(resolve_loss(ft.loss, task), task.task, None if weights is None else weights.to(device))

        def loss_fn(m, batch):
            # Under DDP each rank's mean over its slice, averaged over ranks by DDP: the global mean
            # when the slices are equal (all but possibly an epoch's last batch).
            batch = batch.to(device)
            logits = m(batch.input_ids, batch.segment_ids, batch.attention_mask, batch.special_mask,
                       padded=batch.padded)
            return criterion(logits.float(), batch.labels), {}

        groups = param_groups(model, ft.lr, ft.weight_decay, None)  # skips frozen parameters
        optimizer = build_optimizer(ft.optimizer, groups, ft.lr, ft.weight_decay)
        scheduler = build_scheduler(optimizer, ft.noam_annealing, self.hidden_size, ft.warmup_steps)
        prefix = f"finetune_{task.name}" + ("" if fold is None else f"_fold{fold}")
        best, history = BestEpoch(lower_is_better=False), []
        ddp = wrap_ddp(model, ctx, find_unused_parameters=self.find_unused_parameters)
        trainer = Trainer(ddp, optimizer, scheduler, accum_iters=ft.accum_iters,
                          max_grad_norm=ft.max_grad_norm, precision=ft.precision, device=device, tracker=self.tracker,
                          log_every=10, prefix=prefix, checkpointing=self._checkpointing(fold, best, history))
        restored = trainer.resume()
        if restored:
            best.restore(restored)
            history.extend(restored["history"])
        metric_prefix = "" if fold is None else f"fold{fold}_"
        total = n_rank_batches(len(train["labels"]), ft.batch_size, ctx.world_size)
        clock = EpochClock(ft.epochs, first_epoch=trainer.state.epoch)
        # A resumed run that had stopped early (patience) or finished stays stopped.
        while trainer.state.epoch < ft.epochs and not (best.weights is not None and best.since >= ft.patience):
            epoch, start = trainer.state.epoch, trainer.state.batch_in_epoch
            batches = shuffled_batches(train, self.packer, ft.batch_size, seed, epoch, ctx, start)
            sums = trainer.train_epoch(batches, loss_fn, total=total)
            dev_metrics = score_split(model, dev, task, ft, device, self.packer)  # every rank: the same decision
            row = {"epoch": epoch + 1, "train_loss": sums["loss"], **{f"dev_{k}": v for k, v in dev_metrics.items()}}
            history.append(row if fold is None else {"fold": fold, **row})
            if self.tracker:
                self.tracker.log_metrics({f"{metric_prefix}{k}": v for k, v in row.items()}, step=epoch + 1)
            if ctx.is_main:
                shown = {"train_loss": sums["loss"], f"dev_{official_metric_name(task.task)}": dev_metrics["official"]}
                log.info("%s", clock.line(tag, epoch + 1, shown))
            # NaN-safe: epoch 1 always counts
            if not best.update(dev_metrics["official"], epoch + 1, {}, model) and best.since >= ft.patience:
                if ctx.is_main:
                    log.info("%s: early stop after epoch %d (best epoch %d)", tag, epoch + 1, best.epoch)
            trainer.save_checkpoint()
        model.load_state_dict(best.weights)
        return Fitted(self, model, best.epoch, history)

    def _checkpointing(self, fold: Optional[int], best: BestEpoch, history: list) -> Optional[Checkpointing]:
        if self.checkpoint_dir is None:
            return None
        parts = dict(self.fingerprint_parts or {})
        directory = Path(self.checkpoint_dir) / (TRAIN_STATE_DIR if fold is None else f"fold-{fold}")
        return Checkpointing(directory, run_fingerprint(parts), self.ft.checkpoint_every, parts=parts,
                             state=lambda: {**best.to_state(), "history": history}, tensors=best.tensors)


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


def check_max_len(cfg: Config, task: TaskConfig, card: ModelCard, pretrained_dir: Path) -> None:
    """The packed rows (``[CLS] a [SEP] (b [SEP])``) must fit the pretrained model's positions
    (``max_len_test`` is at most ``max_len``, checked on load)."""
    segments = 2 if task.dataset.aux_header else 1
    max_len = cfg.representation.max_len
    if not card.fits(max_len, segments):
        raise ConfigError(
            f"representation.max_len={max_len} gives rows of {row_width(max_len, segments)} tokens for task "
            f"{task.name!r}, more than the {card.max_positions} positions of {pretrained_dir}; lower "
            "representation.max_len or pretrain with a larger one"
        )


def twilbert_learner(cfg: Config, task: TaskConfig, ft: FinetuningConfig, pretrained_dir: Path,
                     tracker: Optional[Tracker], ctx: Optional[DistContext] = None) -> NeuralLearner:
    check_loss(ft, task)
    verify_model_dir(pretrained_dir)  # once, before any work; each fold's model then loads unverified
    tokenizer = Tokenizer(pretrained_dir)
    encoder_card = read_card(pretrained_dir / CONFIG_NAME)
    check_max_len(cfg, task, encoder_card, pretrained_dir)

    def new_model() -> nn.Module:
        model = twilbert_classifier(encoder_card, HeadConfig.of(ft), n_outputs(task))
        load_encoder_weights(model, pretrained_dir, verify=False)
        return model

    def save_model(model: nn.Module, directory: Path, extra: dict) -> None:
        save_pretrained(directory, model, encoder_card.replace(backbone="twilbert", **extra))
        tokenizer.copy_to(directory)

    model_cfg = encoder_card.model_config
    return NeuralLearner(
        "twilbert", model_cfg.name, task, ft, cfg.seed, tokenizer.preprocess,
        packer=TWilBertPacker(tokenizer), new_model=new_model, hidden_size=model_cfg.hidden_size,
        save_model=save_model, tracker=tracker, **_placement(ft, ctx),
    )


def hf_learner(cfg: Config, task: TaskConfig, ft: FinetuningConfig, tracker: Optional[Tracker],
               ctx: Optional[DistContext] = None) -> NeuralLearner:
    check_loss(ft, task)
    encoder, tokenizer = load_hf_backbone(ft.hf_path)
    packer = hf_packer(encoder, tokenizer, Preprocessor(cfg.preprocess))

    def new_model() -> nn.Module:
        return hf_classifier(copy.deepcopy(encoder), HeadConfig.of(ft), n_outputs(task))

    def save_model(model: nn.Module, directory: Path, extra: dict) -> None:
        save_hf_classifier(directory, model, packer, extra)

    return NeuralLearner(
        "hf", Path(ft.hf_path).name, task, ft, cfg.seed, packer.preprocess,
        packer=packer, new_model=new_model, hidden_size=encoder.config.hidden_size,
        save_model=save_model, tracker=tracker, find_unused_parameters=True, **_placement(ft, ctx),
    )


def _placement(ft: FinetuningConfig, ctx: Optional[DistContext]) -> dict:
    """The learner's device and process group: torchrun's when distributed, else ``finetuning.device``."""
    ctx = ctx or DistContext(device=resolve_device(ft.device))
    return {"device": ctx.device, "ctx": ctx}


def baseline_learner(cfg: Config, task: TaskConfig, ft: FinetuningConfig, preprocess: Preprocessor) -> BaselineLearner:
    return BaselineLearner("baseline", f"tfidf-{ft.baseline_model}", task, ft, cfg.seed, preprocess)


def task_preprocessor(cfg: Config, pretrained_dir: Path) -> Preprocessor:
    """The vocabulary's preprocessing when there is a pretrained model, else ``preprocess``."""
    if (Path(pretrained_dir) / META_FILE).is_file():
        return Tokenizer(pretrained_dir).preprocess
    return Preprocessor(cfg.preprocess)


# --------------------------------------------------------------------------------------------
# One learner on one task: single model or k folds
# --------------------------------------------------------------------------------------------


@dataclass
class LearnerRun:
    metrics: dict
    history: list[dict]
    kfold: Optional[KFoldOutcome] = None


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
        dev_metrics = evaluate_scores(task, dev["labels"], fitted.predict(dev))
        test_metrics = dev_metrics if splits.test_is_dev else evaluate_scores(task, test["labels"], fitted.predict(test))
        if model_out is not None:
            fitted.save(model_out, {**extra, "best_epoch": fitted.best_epoch})
        metrics = {**base, "best_epoch": fitted.best_epoch, "epochs_run": epochs_run(learner, fitted.history),
                   "n_train": len(train["labels"]), "n_dev": len(dev["labels"]), "n_test": len(test["labels"]),
                   "dev": dev_metrics, "test": test_metrics}
        return LearnerRun(metrics, fitted.history)

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
    return LearnerRun(metrics, history, outcome)


def epochs_run(learner: Learner, history: list[dict]) -> Optional[int]:
    """Epochs trained (summed over folds); None for the baseline, which has none."""
    return None if isinstance(learner, BaselineLearner) else len(history)


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
            try:
                os.link(entry, target)
            except OSError:
                shutil.copy2(entry, target)
    config_path = model_out / CONFIG_NAME
    card = read_card(config_path)
    card.kfold = KFoldSummary(**kfold_info)
    card.write(config_path)  # a hard link: writes a fresh file rather than the fold's
    write_manifest(model_out)  # the selected fold's manifest came along as a link: replace it


@contextmanager
def staged_directory(final: Path) -> Iterator[Path]:
    """A fresh directory that replaces ``final`` only when the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        with naming(final):  # a full disk met by write() names no file: name the output directory
            staged = tmp / final.name
            staged.mkdir()
            yield staged
            if final.exists():
                os.replace(final, tmp / "previous")
            os.replace(staged, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# The finetune stage's work
# --------------------------------------------------------------------------------------------


BASELINE_FILE = "baseline.json"
METRICS_FILE = "metrics.json"
EPOCHS_FILE = "epochs.csv"
BASELINE_DIR = "baseline"  # the baseline row's model, inside the task's model directory


def finetune_fingerprint(cfg: Config, task: TaskConfig, ft: FinetuningConfig, pretrained_dir: Path) -> dict[str, str]:
    """What makes two finetuning runs of a task the same run: config, task files, backbone, code."""
    raw = {"seed": cfg.seed, "finetuning": to_dict(ft), "representation": to_dict(cfg.representation),
           "preprocess": to_dict(cfg.preprocess),
           "task": {"dataset": to_dict(task.dataset), "task": to_dict(task.task)}}
    files = [task.dataset.path(name) for name in (task.dataset.train_file, task.dataset.dev_file,
                                                   task.dataset.test_file)]
    backbone = Path(ft.hf_path) if ft.backbone == "hf" else Path(pretrained_dir)
    return {"config": config_fingerprint(raw), "inputs": files_digest([f for f in files if f] + [backbone]),
            "code": files_digest(package_paths(*FINGERPRINT_CODE))}


def finetune_task(cfg: Config, task: TaskConfig, pretrained_dir: Path, model_out: Path, metrics_out: Path,
                  tracker: Optional[Tracker] = None, checkpoint_dir: Optional[Path] = None,
                  ctx: Optional[DistContext] = None, splits: Optional[TaskData] = None) -> dict:
    """Finetune the configured backbone on ``task`` (and the baseline row); write models and metrics.

    With ``checkpoint_dir`` the neural backbones checkpoint and resume there (``train_state/``, or
    ``fold-<i>/`` per fold). Under torchrun (``ctx``) every rank trains; rank 0 alone fits the
    baseline row and writes. ``splits``: the task's files already read (``load_task``), so that a
    caller can validate them before it opens its MLflow run.
    """
    ft = task.finetuning_config(cfg.finetuning)
    ctx = ctx or DistContext(device=resolve_device(ft.device))
    seed_everything(cfg.seed, ctx.device)
    configure_matmul(ctx.device, ft.tf32)
    pretrained_dir, model_out, metrics_out = Path(pretrained_dir), Path(model_out), Path(metrics_out)
    splits = splits if splits is not None else load_task(task, cfg.seed, ft.no_test_protocol)
    max_len = cfg.representation.max_len
    test_len = cfg.representation.test_len
    if ft.backbone == "twilbert":
        learner: Learner = twilbert_learner(cfg, task, ft, pretrained_dir, tracker, ctx)
    elif ft.backbone == "hf":
        learner = hf_learner(cfg, task, ft, tracker, ctx)
    else:
        learner = baseline_learner(cfg, task, ft, task_preprocessor(cfg, pretrained_dir))
    if checkpoint_dir is not None and isinstance(learner, NeuralLearner):
        learner.checkpoint_dir = Path(checkpoint_dir)
        learner.fingerprint_parts = finetune_fingerprint(cfg, task, ft, pretrained_dir)

    if not ctx.is_main:  # train beside rank 0, write nothing
        neural = isinstance(learner, NeuralLearner)
        metrics = evaluate_learner(learner, splits, max_len, test_len, None).metrics if neural else {}
        distributed.barrier()
        return metrics

    with staged_directory(model_out) as staged:
        run = evaluate_learner(learner, splits, max_len, test_len, staged)
        baseline: Union[dict, None] = None
        if ft.baseline_row and ft.backbone != "baseline":
            row = baseline_learner(cfg, task, ft, learner.preprocess)
            baseline = evaluate_learner(row, splits, max_len, test_len, staged / BASELINE_DIR).metrics
        write_manifest(staged)  # last: covers the k-fold publish, folds/ and baseline/

    if tracker:
        tracker.log_metrics({f"test_{k}": v for k, v in run.metrics["test"].items()})
        tracker.log_metrics({f"best_dev_{k}": v for k, v in run.metrics["dev"].items()})
        if baseline:
            tracker.log_metrics({f"baseline_test_{k}": v for k, v in baseline["test"].items()})
    write_metrics(metrics_out, run, baseline, ft)
    distributed.barrier()
    return run.metrics


def write_metrics(metrics_out: Path, run: LearnerRun, baseline: Optional[dict], ft: FinetuningConfig) -> None:
    """``metrics.json``, ``baseline.json`` (a note without scores when there is no separate baseline
    row, so DVC always finds it) and ``epochs.csv``."""
    metrics_out.mkdir(parents=True, exist_ok=True)
    if baseline is None:
        reason = ("finetuning.baseline_row is false" if not ft.baseline_row
                  else "the backbone is the baseline: see metrics.json")
        baseline = {"task": run.metrics["task"], "model": "baseline", "skipped": reason}
    for name, content in ((METRICS_FILE, run.metrics), (BASELINE_FILE, baseline)):
        with atomic_write(metrics_out / name) as fh:
            json.dump(content, fh, indent=2)
    fields = list(dict.fromkeys(k for row in run.history for k in row))
    with atomic_write(metrics_out / EPOCHS_FILE) as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(run.history)
