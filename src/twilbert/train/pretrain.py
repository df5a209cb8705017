"""Pretraining: masked LM (dynamic masking) + reply-order prediction on the pair shards.

One training step is ``Trainer.train_step(batch, PretrainObjective)`` on the stack that
``build_pretraining`` assembles: the stage runs it through ``Trainer.fit`` (``PretrainingTask``), and
``benchmarks/pretrain_throughput.py`` times that very call. The objective lives in ``train.objective``,
the held-out evaluation in ``train.heldout``.

The stage checkpoints every ``training.checkpoint_every`` micro-steps and at each epoch end, and a
rerun continues the newest valid checkpoint of the same run (config, inputs and code) exactly: the
batch order, the masks and the dropout are pure functions of (seed, epoch, global batch, micro-batch).
Under torchrun each worker trains its block of every global batch's ``training.micro_batches``
micro-batches (``train.loop``), the result is the same bytes for any number of workers, and only rank 0
writes.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Callable, Mapping, NamedTuple, Optional, Sequence

import torch

from twilbert.codebase import code_digest
from twilbert.data.batch import Examples
from twilbert.data.pairs import load_shards
from twilbert.data.prefetch import prefetch
from twilbert.data.shards import MANIFEST, PairsDataError, read_manifest, verify_pairs
from twilbert.data.tokenizer import Tokenizer
from twilbert.device import configure_matmul, resolve_device
from twilbert.io_utils import publish_dir
from twilbert.model import TWilBertForPretraining, count_parameters
from twilbert.model.card import ModelCard, pretraining_positions
from twilbert.model.io import CheckpointError, LoadReport, load_into, load_pretrained_state, save_pretrained
from twilbert.tracking.runs import Tracker
from twilbert.train import distributed
from twilbert.train.best_epoch import BestEpoch
from twilbert.train.curves import CurveRecorder
from twilbert.train.distributed import DistContext, check_workers, iterate_micro_batches, n_global_batches
from twilbert.train.fingerprint import config_fingerprint, files_digest, run_fingerprint
from twilbert.train.heldout import heldout_metrics, summarize
from twilbert.train.loop import Callback, Checkpointing, Trainer, seed_everything
from twilbert.train.objective import PretrainObjective
from twilbert.train.optim import build_optimizer, build_scheduler, param_groups
from twilbert.train.pretrain_run import KEYS, PretrainRun
from twilbert.train.run_dirs import run_directory

log = logging.getLogger(__name__)

# The epoch's log line; every metric still goes to MLflow and the curves.
EPOCH_LINE_KEYS = ("train_loss", "train_mlm_accuracy", "train_rop_accuracy", "heldout_mlm_loss",
                   "heldout_mlm_accuracy", "heldout_rop_accuracy", "heldout_perplexity")
TRAIN_STATE_DIR = "train_state"  # training checkpoints, under the stage's checkpoint directory
# What a run's identity covers: the run's params (train.pretrain_run: the stage's params in dvc.yaml), its
# input files, and the package code this module imports (twilbert.codebase).
FINGERPRINT_KEYS = KEYS
PREFETCH_BATCHES = 4  # batches read ahead of the step on a background thread
# Which epoch is published without a held-out score: the last one, never the first by accident.
NO_HELDOUT_RULE = ("no held-out score (no held-out pairs, or too few for one batch): the last epoch is "
                   "the best epoch and is published (selection rule: last epoch)")




# --------------------------------------------------------------------------------------------
# The training step: model, objective, optimizer
# --------------------------------------------------------------------------------------------


def build_pretraining_model(run: PretrainRun, vocab_size: int) -> TWilBertForPretraining:
    torch.manual_seed(run.seed)
    return TWilBertForPretraining(run.model, vocab_size, pretraining_positions(run.max_len))


def load_initial_weights(model: TWilBertForPretraining, directory: Path) -> LoadReport:
    """Continue from a saved model directory; heads it lacks (e.g. ROP) stay freshly initialised."""
    _, state = load_pretrained_state(Path(directory))
    report = load_into(model, state, strict=False)
    if len(report.missing) == len(model.state_dict()):
        raise CheckpointError(f"training.path_initial_weights: {directory} holds no parameter of this model")
    log.info("pretrain: continuing from %s (%d tensors left as initialised)", directory, len(report.missing))
    return report


class Pretraining(NamedTuple):
    model: TWilBertForPretraining  # the plain model (the trainer may hold it compiled)
    trainer: Trainer
    objective: PretrainObjective


def running_metrics(sums: Mapping[str, float]) -> dict[str, float]:
    """The MLM/ROP accuracies over the epoch's batches so far, logged with each logged step."""
    return summarize(dict(sums), "running")


def build_pretraining(
    run: PretrainRun, vocab_size: int, device: torch.device, tracker: Optional[Tracker] = None,
    ctx: Optional[DistContext] = None, checkpointing: Optional[Checkpointing] = None,
    callbacks: Sequence[Callback] = (),
) -> Pretraining:
    """Model (from ``path_initial_weights`` when set), optimizer, schedule, loop and objective;
    ``checkpointing`` and ``callbacks``: the loop's (``pretrain_checkpointing``; none for a bare training
    step)."""
    tcfg = run.training
    ctx = ctx or DistContext(device=device)
    check_workers(tcfg.micro_batches, ctx.world_size, "training.micro_batches")
    model = build_pretraining_model(run, vocab_size)
    if tcfg.path_initial_weights:
        load_initial_weights(model, Path(tcfg.path_initial_weights))
    model.to(device)
    value_lr = run.model.pkm_params.value_lr if run.model.pkm else None
    optimizer = build_optimizer(tcfg.optimizer, param_groups(model, tcfg.lr, tcfg.weight_decay, value_lr),
                                tcfg.lr, tcfg.weight_decay)
    scheduler = build_scheduler(optimizer, tcfg.noam_annealing, run.model.hidden_size, tcfg.warmup_steps)
    trained = torch.compile(model) if tcfg.compile else model
    trainer = Trainer(trained, optimizer, scheduler, accum_iters=tcfg.accum_iters,
                      max_grad_norm=tcfg.max_grad_norm, precision=tcfg.precision, device=device, tracker=tracker,
                      log_every=tcfg.log_every, prefix="pretrain", checkpointing=checkpointing, callbacks=callbacks,
                      running=running_metrics, seed=run.seed)
    # masks keyed by (epoch, global batch, micro-batch), which the loop hands to ``objective.prepare``
    objective = PretrainObjective(run.model.masked_lm, run.seed, vocab_size, device)
    return Pretraining(model, trainer, objective)


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def pretrain_fingerprint(run: PretrainRun, pairs_dir: Path, vocab_dir: Path) -> dict[str, str]:
    """What makes two pretraining runs the same run: config, input data, and the code that trains.

    The pairs count through their manifest, which holds every shard's sha256: a restart reads no shard.
    """
    inputs = [pairs_dir / MANIFEST, vocab_dir]
    if run.training.path_initial_weights:
        inputs.append(Path(run.training.path_initial_weights))
    return {"config": config_fingerprint(run.params(), include=FINGERPRINT_KEYS), "inputs": files_digest(inputs),
            "code": code_digest(__name__)}


def pretrain_checkpointing(run: PretrainRun, checkpoint_dir: Path, parts: dict[str, str]) -> Checkpointing:
    """The run's training checkpoints: ``checkpoint_dir/run-<identity>/train_state`` (``train.run_dirs``), every
    ``training.checkpoint_every`` micro-steps; only this run (``parts``, its identity) resumes them."""
    fingerprint = run_fingerprint(parts)
    directory = run_directory(checkpoint_dir, fingerprint, parts) / TRAIN_STATE_DIR
    return Checkpointing(directory, fingerprint, run.training.checkpoint_every, parts=parts)


def open_pretrain_data(pairs_dir: Path, max_len: int, vocab_size: int) -> tuple[Examples, Examples]:
    """The train and held-out examples of ``pairs_dir``, memory-mapped (nothing is read but the
    manifests), after checking that they were built for this max_len and vocabulary."""
    manifest = read_manifest(pairs_dir)
    where = pairs_dir / MANIFEST
    if manifest["max_len"] != max_len:
        raise PairsDataError(f"{where}: pairs were built with max_len={manifest['max_len']} but "
                         f"representation.max_len={max_len}; rerun the pairs stage")
    if manifest["vocab_size"] != vocab_size:
        raise PairsDataError(f"{where}: pairs were tokenized with a vocabulary of {manifest['vocab_size']} pieces, "
                         f"the vocabulary has {vocab_size}; rerun the pairs stage")
    # Before any step, held-out shards included: damage would otherwise surface as an IndexError
    # mid-epoch, or train silently on wrong ids. Cheap (sizes, sampled bytes and rows), not a re-read.
    checked = verify_pairs(pairs_dir, vocab_size)
    log.info("pretrain: %d pair shards match %s (sizes, sampled checksums and rows; `twilbert verify-pairs %s` "
             "reads every byte)", checked, where, pairs_dir)
    return load_shards(pairs_dir / "train"), load_shards(pairs_dir / "heldout")


def pretrain(run: PretrainRun, pairs_dir: Path, vocab_dir: Path, out_dir: Path, checkpoint_dir: Path,
             tracker: Optional[Tracker] = None, ctx: Optional[DistContext] = None,
             curves_dir: Optional[Path] = None, callbacks: Sequence[Callback] = ()) -> dict[str, float]:
    """Pretrain on ``pairs_dir``; write the best epoch's model (safetensors + JSON + vocab) to ``out_dir``.

    Training checkpoints go to ``checkpoint_dir/run-<identity>/train_state`` (every ``training.checkpoint_every``
    micro-steps and each epoch end) and a rerun resumes the newest valid one of the same run. Each
    epoch's model is also saved to ``checkpoint_dir/last``, the best so far (held-out MLM loss plus
    ROP error) to ``checkpoint_dir/best``. Under torchrun (``ctx``) only rank 0 writes. With
    ``curves_dir``, the curves per logged step and per epoch go there (``train.curves``). ``callbacks``:
    the training loop's hooks (``train.loop.Callback``).
    """
    tcfg = run.training
    ctx = ctx or DistContext(device=resolve_device(tcfg.device))
    device = ctx.device
    seed_everything(run.seed, device)
    configure_matmul(device, tcfg.tf32)
    pairs_dir, vocab_dir, out_dir, checkpoint_dir = map(Path, (pairs_dir, vocab_dir, out_dir, checkpoint_dir))
    tokenizer = Tokenizer(vocab_dir)
    vocab_size = tokenizer.vocab_size
    train_data, heldout_data = open_pretrain_data(pairs_dir, run.max_len, vocab_size)
    curves = CurveRecorder(tracker, prefix="pretrain")
    checkpointing = pretrain_checkpointing(run, checkpoint_dir, pretrain_fingerprint(run, pairs_dir, vocab_dir))
    model, trainer, objective = build_pretraining(run, vocab_size, device, curves, ctx, checkpointing, callbacks)
    n_params = count_parameters(model)
    if ctx.is_main:
        log.info("pretrain: %s preset, %d parameters, device %s, %d process(es)", run.model.name, n_params, device,
                 ctx.world_size)

    card = ModelCard.pretrained(run.model, vocab_size, run.max_len)

    def save_epoch(epoch: int, metrics: dict, improved: bool) -> None:
        save_pretrained(checkpoint_dir / "last", model, card.replace(epoch=epoch, metrics=metrics))
        if improved:
            save_pretrained(checkpoint_dir / "best", model, card.replace(epoch=epoch, metrics=metrics))

    best = run_epochs(PretrainingTask(run, ctx, model, trainer, objective, train_data, heldout_data, curves, tracker,
                                      save_epoch))
    if ctx.is_main:
        publish_best(model, best, card, tokenizer, checkpoint_dir / "best", out_dir)
        if curves_dir is not None:
            curves.write(curves_dir)
    distributed.barrier()
    return {**best.metrics, "parameters": n_params}


class PretrainingTask:
    """Pretraining as the loop's ``TrainingTask``, for twilbert's encoder and a continued checkpoint
    alike: length-grouped batches read ahead, the objective, the held-out score that picks the best
    epoch, curves and tracking per epoch; ``save_epoch(epoch, metrics, improved)`` writes the epoch's
    model on rank 0. The curves travel in the training checkpoints."""

    def __init__(self, run: PretrainRun, ctx: DistContext, model: torch.nn.Module, trainer: Trainer,
                 objective: PretrainObjective, train_data: Examples, heldout_data: Examples, curves: CurveRecorder,
                 tracker: Optional[Tracker], save_epoch: Callable[[int, dict, bool], None]):
        self.run, self.ctx, self.model, self.trainer, self.objective = run, ctx, model, trainer, objective
        self.train_data, self.heldout_data = train_data, heldout_data
        self.curves, self.tracker, self.save_epoch = curves, tracker, save_epoch
        self.loss = objective  # the loop's MicroLoss
        self._said_rule = False

    def batches(self, epoch: int, skip: int):
        tcfg = self.run.training
        return prefetch(iterate_micro_batches(self.train_data, tcfg.batch_size, tcfg.micro_batches, self.run.seed,
                                              epoch, self.ctx, start=skip, length_grouping=tcfg.length_grouping),
                        PREFETCH_BATCHES)

    def evaluate(self, epoch: int, sums: dict) -> tuple[float, dict]:
        # Every rank scores the whole held-out set: the same numbers, so the same best-epoch decision.
        tcfg = self.run.training
        metrics = {
            **summarize(sums, "train"),
            **heldout_metrics(self.model, self.objective, self.heldout_data, tcfg.batch_size, tcfg.pll_examples,
                              self.ctx.device, tcfg.precision),
            "epoch": epoch + 1,
        }
        if "heldout_mlm_loss" not in metrics:  # no held-out pairs, or too few for one batch
            if not self._said_rule and self.ctx.is_main:
                log.info("pretrain: %s", NO_HELDOUT_RULE)
            self._said_rule = True
            return -float(epoch + 1), metrics  # lower is better: the newest epoch always improves
        return metrics["heldout_mlm_loss"] + (1.0 - metrics.get("heldout_rop_accuracy", 1.0)), metrics

    def shown(self, metrics: dict) -> dict:
        return {k: metrics[k] for k in EPOCH_LINE_KEYS if k in metrics}

    def on_epoch(self, epoch: int, metrics: dict, improved: bool) -> None:
        if self.ctx.is_main:
            step = self.trainer.state.optimizer_steps
            self.curves.add_epoch(epoch, step, metrics)
            if self.tracker:
                self.tracker.log_metrics(metrics, step=step)
            self.save_epoch(epoch, metrics, improved)

    def state(self) -> dict:
        return {"curves": self.curves.state()}

    def load_state(self, state: dict) -> None:
        self.curves.restore(state.get("curves"))


def run_epochs(task: PretrainingTask) -> BestEpoch:
    """The epochs of pretraining (resumed from the run's training checkpoints); the best epoch."""
    tcfg = task.run.training
    best = task.trainer.fit(task, tcfg.epochs, BestEpoch(lower_is_better=True),
                            total=n_global_batches(len(task.train_data), tcfg.batch_size))
    if best.weights is None:
        raise ValueError(f"pretrain: no epoch trained (training.epochs={tcfg.epochs})")
    return best


def publish_best(model: TWilBertForPretraining, best: BestEpoch, card: ModelCard, tokenizer: Tokenizer,
                 best_dir: Path, out_dir: Path) -> None:
    """The stage's output: the best epoch's weights (as the checkpoint recorded them) with the vocabulary."""
    model.load_state_dict(best.weights)
    save_pretrained(best_dir, model, card.replace(epoch=best.epoch, metrics=best.metrics))
    with publish_dir(out_dir, checksums=True) as staged:  # the checksums cover the vocabulary too
        shutil.copytree(best_dir, staged, dirs_exist_ok=True)
        tokenizer.copy_to(staged)
