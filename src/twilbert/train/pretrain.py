"""Pretraining: masked LM (dynamic masking) + reply-order prediction on the pair shards.

One training step is ``Trainer.train_step(batch, PretrainObjective)`` on the stack that
``build_pretraining`` assembles: the stage runs it through ``Trainer.train_epoch``, and
``benchmarks/pretrain_throughput.py`` times that very call.

The stage checkpoints every ``training.checkpoint_every`` micro-steps and at each epoch end, and a
rerun continues the newest valid checkpoint of the same run (config, inputs and code) exactly: the
batch order and the masks are pure functions of (seed, epoch, step). Under torchrun each rank trains
its slice of every global batch and only rank 0 writes.
"""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F

from twilbert import distributed
from twilbert.config import Config, ConfigError, MaskedLMConfig, to_dict
from twilbert.data.masking import IGNORE_INDEX, mask_tokens
from twilbert.data.pairs import Examples, PairBatch, as_examples, batch_of, iterate_batches, load_shards
from twilbert.data.prefetch import prefetch
from twilbert.data.shards import MANIFEST, PairsDataError, read_manifest
from twilbert.data.tokenizer import MASK_ID, N_SPECIAL, Tokenizer
from twilbert.distributed import DistContext, iterate_rank_batches, loss_normalizer, n_rank_batches, wrap_ddp
from twilbert.model import TWilBertForPretraining, count_parameters
from twilbert.io_utils import replace_dir
from twilbert.model.card import ModelCard, pretraining_positions
from twilbert.model.io import CheckpointError, LoadReport, load_into, load_pretrained_state, save_pretrained
from twilbert.model.manifest import write_manifest
from twilbert.track import Tracker
from twilbert.progress import EpochClock
from twilbert.train.checkpoint import config_fingerprint, files_digest, package_paths, run_fingerprint
from twilbert.train.curves import CurveRecorder
from twilbert.train.loop import (
    BestEpoch, Checkpointing, Trainer, autocast, configure_matmul, resolve_device, seed_everything,
)
from twilbert.train.losses import linear_mlm_loss, rop_loss
from twilbert.train.optim import build_optimizer, build_scheduler, param_groups

log = logging.getLogger(__name__)

EVAL_STREAM = 2**31 - 1  # the "epoch" key of held-out masks: fixed, and never a training epoch
PLL_CHUNK = 256  # single-mask variants per forward pass of the pseudo-log-likelihood
# The epoch's log line; every metric still goes to MLflow and the curves.
EPOCH_LINE_KEYS = ("train_loss", "train_mlm_accuracy", "train_rop_accuracy", "heldout_mlm_loss",
                   "heldout_mlm_accuracy", "heldout_rop_accuracy", "heldout_perplexity")
TRAIN_STATE_DIR = "train_state"  # training checkpoints, under the stage's checkpoint directory
# What a run's identity covers: the stage's params in dvc.yaml, and the package code it runs.
FINGERPRINT_KEYS = ("seed", "model", "training", "representation.max_len")
FINGERPRINT_CODE = ("model", "train", "data/masking.py", "data/pairs.py", "data/shards.py", "distributed.py")
PREFETCH_BATCHES = 4  # batches read ahead of the step on a background thread


def step_seed(seed: int, *keys: int) -> int:
    """A seed that is a pure function of (seed, epoch, step): masks replay exactly on resume."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0])


# --------------------------------------------------------------------------------------------
# The training step: model, objective, optimizer
# --------------------------------------------------------------------------------------------


def build_pretraining_model(cfg: Config, vocab_size: int) -> TWilBertForPretraining:
    torch.manual_seed(cfg.seed)
    return TWilBertForPretraining(cfg.model, vocab_size, pretraining_positions(cfg.representation.max_len))


def load_initial_weights(model: TWilBertForPretraining, directory: Path) -> LoadReport:
    """Continue from a saved model directory; heads it lacks (e.g. ROP) stay freshly initialised."""
    _, state = load_pretrained_state(Path(directory))
    report = load_into(model, state, strict=False)
    if len(report.missing) == len(model.state_dict()):
        raise CheckpointError(f"training.path_initial_weights: {directory} holds no parameter of this model")
    log.info("pretrain: continuing from %s (%d tensors left as initialised)", directory, len(report.missing))
    return report


def masked_positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices (N,) of the positions with an MLM label in host ``labels`` (B, T): computed where the
    masks are drawn, so that neither the count nor the selection waits for the device."""
    return (labels != IGNORE_INDEX).flatten().nonzero().squeeze(1)


class PretrainObjective:
    """MLM + ROP loss of one batch; masks drawn from a generator seeded by (seed, epoch, step).

    Under DDP (``rank`` set) the key also holds the rank, so that ranks draw different masks, and
    the losses are divided by the masked-token and pair counts summed over ranks (``loss_normalizer``).
    """

    def __init__(self, masked_lm: MaskedLMConfig, seed: int, vocab_size: int, device: torch.device,
                 rank: Optional[int] = None):
        self.masked_lm, self.seed, self.vocab_size, self.device = masked_lm, seed, vocab_size, device
        self.rank = rank
        self.epoch, self.step = 0, 0  # the step restarts at each epoch; a resumed epoch sets it to its batch

    def mask(self, batch: PairBatch, *keys: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(step_seed(self.seed, *keys))
        return mask_tokens(
            batch.input_ids, batch.special_mask, self.masked_lm, self.vocab_size, MASK_ID, N_SPECIAL, generator
        )

    def outputs(self, model: torch.nn.Module, batch: PairBatch, masked: torch.Tensor, labels: torch.Tensor,
                normalizers: Optional[torch.Tensor] = None, positions: Optional[torch.Tensor] = None):
        """(loss, summable counts) of ``batch`` under the given masks (host tensors).

        ``normalizers`` (2,): the divisors of the summed MLM and ROP losses (DDP); default, this
        batch's own counts (means). The counts are device tensors or host numbers, never read here:
        the training loop reads them once per logging window, so a step never waits for the device.
        """
        positions = masked_positions(labels) if positions is None else positions
        n_masked = positions.numel()
        batch = batch.to(self.device)
        out = model(masked.to(self.device, non_blocking=True), batch.segment_ids, batch.attention_mask,
                    labels.to(self.device, non_blocking=True), padded=batch.padded,
                    mlm_positions=positions.to(self.device, non_blocking=True))
        mlm, correct = linear_mlm_loss(out.mlm_states, out.decoder_weight, out.decoder_bias, out.mlm_targets,
                                       None if normalizers is None else normalizers[0])
        loss = mlm
        divisor = n_masked if normalizers is None else normalizers[0].double()
        counts = {"mlm_correct": correct, "mlm_count": n_masked, "mlm_nll_sum": mlm.detach().double() * divisor}
        if out.rop_logits is not None:
            if normalizers is None:
                loss = loss + rop_loss(out.rop_logits, batch.labels)
            else:
                total = F.cross_entropy(out.rop_logits.float(), batch.labels, reduction="sum")
                loss = loss + total / normalizers[1].clamp_min(1.0)
            counts["rop_correct"] = (out.rop_logits.detach().argmax(-1) == batch.labels).sum()
            counts["rop_count"] = batch.labels.numel()
        return loss, counts

    def __call__(self, model: torch.nn.Module, batch: PairBatch):
        keys = (self.epoch, self.step) if self.rank is None else (self.epoch, self.step, self.rank)
        masked, labels = self.mask(batch, *keys)
        self.step += 1
        positions = masked_positions(labels)
        normalizers = None
        if self.rank is not None:  # every masked token and every pair weighs the same on any rank
            local = torch.tensor([positions.numel(), batch.labels.numel()], dtype=torch.float32)
            normalizers = loss_normalizer(local, self.device)
        return self.outputs(model, batch, masked, labels, normalizers, positions)


class Pretraining(NamedTuple):
    model: TWilBertForPretraining  # the plain model (the trainer may hold it wrapped in DDP)
    trainer: Trainer
    objective: PretrainObjective


def build_pretraining(
    cfg: Config, vocab_size: int, device: torch.device, tracker: Optional[Tracker] = None,
    ctx: Optional[DistContext] = None,
) -> Pretraining:
    """Model (from ``path_initial_weights`` when set), optimizer, schedule, loop and objective;
    the model wrapped in DDP when ``ctx`` spans several ranks."""
    tcfg = cfg.training
    ctx = ctx or DistContext(device=device)
    model = build_pretraining_model(cfg, vocab_size)
    if tcfg.path_initial_weights:
        load_initial_weights(model, Path(tcfg.path_initial_weights))
    model.to(device)
    if ctx.is_distributed:
        torch.manual_seed(cfg.seed + ctx.rank)  # dropout differs per rank; DDP broadcasts rank 0's weights
    value_lr = cfg.model.pkm_params.value_lr if cfg.model.pkm else None
    optimizer = build_optimizer(tcfg.optimizer, param_groups(model, tcfg.lr, tcfg.weight_decay, value_lr),
                                tcfg.lr, tcfg.weight_decay)
    scheduler = build_scheduler(optimizer, tcfg.noam_annealing, cfg.model.hidden_size, tcfg.warmup_steps)
    trained = wrap_ddp(model, ctx)
    if tcfg.compile:  # the compiled graph wraps DDP's module, so DDP's bucketed all-reduce stays in charge
        trained = torch.compile(trained)
    trainer = Trainer(trained, optimizer, scheduler, accum_iters=tcfg.accum_iters,
                      max_grad_norm=tcfg.max_grad_norm, precision=tcfg.precision, device=device, tracker=tracker,
                      log_every=tcfg.log_every, prefix="pretrain")
    objective = PretrainObjective(cfg.model.masked_lm, cfg.seed, vocab_size, device,
                                  rank=ctx.rank if ctx.is_distributed else None)
    return Pretraining(model, trainer, objective)


# --------------------------------------------------------------------------------------------
# Held-out evaluation: MLM accuracy, perplexity, ROP accuracy, pseudo-log-likelihood
# --------------------------------------------------------------------------------------------


def summarize(sums: dict[str, float], prefix: str) -> dict[str, float]:
    """Counts -> accuracies and perplexity."""
    out = {}
    if sums.get("mlm_count"):
        out[f"{prefix}_mlm_accuracy"] = sums["mlm_correct"] / sums["mlm_count"]
        mean_nll = sums["mlm_nll_sum"] / sums["mlm_count"]
        out[f"{prefix}_mlm_loss"] = mean_nll
        out[f"{prefix}_perplexity"] = math.exp(min(mean_nll, 50.0))
    if sums.get("rop_count"):
        out[f"{prefix}_rop_accuracy"] = sums["rop_correct"] / sums["rop_count"]
    if "loss" in sums:
        out[f"{prefix}_loss"] = sums["loss"]
    return out


@torch.no_grad()
def evaluate_heldout(model, objective: PretrainObjective, data: dict, batch_size: int) -> dict[str, float]:
    """Held-out MLM accuracy, perplexity and ROP accuracy (TWilBert's ``rop_evaluation``) under fixed masks."""
    model.eval()
    sums: dict[str, object] = {}  # device tensors or host numbers, read once at the end
    for i, batch in enumerate(iterate_batches(data, batch_size, objective.seed, 0, shuffle=False)):
        masked, labels = objective.mask(batch, EVAL_STREAM, i)
        _, counts = objective.outputs(model, batch, masked, labels)
        for k, v in counts.items():
            sums[k] = sums.get(k, 0) + v
    return summarize(read_counts(sums), "heldout")


def read_counts(sums: dict[str, object]) -> dict[str, float]:
    """Counts as floats, the device tensors among them read in one transfer."""
    on_device = [k for k, v in sums.items() if isinstance(v, torch.Tensor)]
    values = torch.stack([sums[k].double() for k in on_device]).tolist() if on_device else []
    return {k: values[on_device.index(k)] if k in on_device else float(v) for k, v in sums.items()}


def single_mask_variants(batch: PairBatch) -> tuple[PairBatch, torch.Tensor, torch.Tensor]:
    """Every copy of the batch's rows with exactly one maskable token replaced by [MASK].

    Returns the variants (K rows), their MLM labels (K, T) (the hidden id at the masked position,
    -100 elsewhere) and the source row of each variant (K,).
    """
    row, pos = (~batch.special_mask).nonzero(as_tuple=True)  # (K,) each, row-major
    k = torch.arange(row.numel())
    ids = batch.input_ids[row]  # (K, T)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[k, pos] = ids[k, pos]
    ids[k, pos] = MASK_ID
    variants = PairBatch(ids, batch.segment_ids[row], batch.attention_mask[row], batch.special_mask[row],
                         batch.labels[row], padded=batch.padded)
    return variants, labels, row


@torch.no_grad()
def pseudo_log_likelihood(
    model, data: dict, n_examples: int, device: torch.device, precision: str = "fp32", chunk: int = PLL_CHUNK
) -> dict[str, float]:
    """TWilBert's ``lm_evaluation`` on up to ``n_examples`` held-out rows in their original order.

    Each real token t is masked in turn and scored by log P(x_t | x without t); ``heldout_pll`` is
    the mean over examples of the per-token mean (nats, <= 0; TWilBert's P(X)), and
    ``heldout_pseudo_perplexity`` is exp(-total log-likelihood / total tokens). All single-mask
    variants of a group of rows are built at once and run ``chunk`` at a time.
    """
    if n_examples <= 0:
        return {}
    examples = as_examples(data)
    rows = examples.originals(n_examples)  # ROP label 1: each pair in its original order
    model.eval()
    per_example, total_ll, total_tokens = [], 0.0, 0
    group = max(1, chunk // int(examples.take(rows)["length"].max())) if len(rows) else 1  # ~chunk variants
    for begin in range(0, len(rows), group):
        idx = rows[begin : begin + group]
        batch = batch_of(examples, idx)
        variants, labels, owner = single_mask_variants(batch)
        sums = torch.zeros(len(idx), dtype=torch.float64)
        for lo in range(0, owner.numel(), chunk):
            part = slice(lo, lo + chunk)
            v = PairBatch(*(t[part] for t in variants.tensors()), padded=variants.padded).to(device)
            with autocast(precision, device):
                out = model(v.input_ids, v.segment_ids, v.attention_mask, labels[part].to(device), padded=v.padded,
                            mlm_positions=masked_positions(labels[part]).to(device))
            logp = F.log_softmax(out.mlm_logits.float(), dim=-1).gather(1, out.mlm_targets[:, None])[:, 0]  # (k,)
            sums.index_add_(0, owner[part], logp.double().cpu())
        counts = torch.bincount(owner, minlength=len(idx)).double()
        scored = counts > 0
        per_example.extend((sums[scored] / counts[scored]).tolist())
        total_ll += float(sums.sum())
        total_tokens += int(counts.sum())
    if not total_tokens:
        return {}
    return {
        "heldout_pll": float(np.mean(per_example)),
        "heldout_pseudo_perplexity": math.exp(min(-total_ll / total_tokens, 50.0)),
    }


def heldout_metrics(model, objective: PretrainObjective, data: dict, batch_size: int, pll_examples: int,
                    device: torch.device, precision: str = "fp32") -> dict[str, float]:
    """Everything reported on the held-out pairs: MLM accuracy, perplexity, ROP accuracy, PLL."""
    return {**evaluate_heldout(model, objective, data, batch_size),
            **pseudo_log_likelihood(model, data, pll_examples, device, precision)}


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def pretrain_fingerprint(cfg: Config, pairs_dir: Path, vocab_dir: Path) -> dict[str, str]:
    """What makes two pretraining runs the same run: config, input data, and the code that trains.

    The pairs count through their manifest, which holds every shard's sha256: a restart reads no shard.
    """
    raw = {"seed": cfg.seed, "model": to_dict(cfg.model), "training": to_dict(cfg.training),
           "representation": to_dict(cfg.representation)}
    inputs = [pairs_dir / MANIFEST, vocab_dir]
    if cfg.training.path_initial_weights:
        inputs.append(Path(cfg.training.path_initial_weights))
    return {"config": config_fingerprint(raw, include=FINGERPRINT_KEYS), "inputs": files_digest(inputs),
            "code": files_digest(package_paths(*FINGERPRINT_CODE))}


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
    return load_shards(pairs_dir / "train"), load_shards(pairs_dir / "heldout")


def pretrain(cfg: Config, pairs_dir: Path, vocab_dir: Path, out_dir: Path, checkpoint_dir: Path,
             tracker: Optional[Tracker] = None, ctx: Optional[DistContext] = None,
             curves_dir: Optional[Path] = None) -> dict[str, float]:
    """Pretrain on ``pairs_dir``; write the best epoch's model (safetensors + JSON + vocab) to ``out_dir``.

    Training checkpoints go to ``checkpoint_dir/train_state`` (every ``training.checkpoint_every``
    micro-steps and each epoch end) and a rerun resumes the newest valid one of the same run. Each
    epoch's model is also saved to ``checkpoint_dir/last``, the best so far (held-out MLM loss plus
    ROP error) to ``checkpoint_dir/best``. Under torchrun (``ctx``) only rank 0 writes. With
    ``curves_dir``, the curves per logged step and per epoch go there (``train.curves``).
    """
    tcfg = cfg.training
    ctx = ctx or DistContext(device=resolve_device(tcfg.device))
    device = ctx.device
    seed_everything(cfg.seed, device)
    configure_matmul(device, tcfg.tf32)
    pairs_dir, vocab_dir, out_dir, checkpoint_dir = map(Path, (pairs_dir, vocab_dir, out_dir, checkpoint_dir))
    tokenizer = Tokenizer(vocab_dir)
    vocab_size = tokenizer.vocab_size
    train_data, heldout_data = open_pretrain_data(pairs_dir, cfg.representation.max_len, vocab_size)
    curves = CurveRecorder(tracker, prefix="pretrain")
    model, trainer, objective = build_pretraining(cfg, vocab_size, device, curves, ctx)
    curves.running = lambda: summarize(trainer.state.sums, "running")  # MLM/ROP accuracy over the epoch so far
    n_params = count_parameters(model)
    if ctx.is_main:
        log.info("pretrain: %s preset, %d parameters, device %s, %d process(es)", cfg.model.name, n_params, device,
                 ctx.world_size)

    card = ModelCard.pretrained(cfg.model, vocab_size, cfg.representation.max_len)
    best = BestEpoch(lower_is_better=True)
    parts = pretrain_fingerprint(cfg, pairs_dir, vocab_dir)
    trainer.checkpointing = Checkpointing(checkpoint_dir / TRAIN_STATE_DIR, run_fingerprint(parts),
                                          tcfg.checkpoint_every, parts=parts,
                                          state=lambda: {**best.to_state(), "curves": curves.state()},
                                          tensors=best.tensors)
    restored = trainer.resume()
    if restored:
        best.restore(restored)
        curves.restore(restored.get("curves"))
    clock = EpochClock(tcfg.epochs, first_epoch=trainer.state.epoch)
    n_train = len(train_data)
    for epoch in range(trainer.state.epoch, tcfg.epochs):
        start = trainer.state.batch_in_epoch
        objective.epoch, objective.step = epoch, start  # masks are keyed by (epoch, step): the stream continues
        batches = iterate_rank_batches(train_data, tcfg.batch_size, cfg.seed, epoch, ctx, start=start)
        sums = trainer.train_epoch(prefetch(batches, PREFETCH_BATCHES), objective,
                                   total=n_rank_batches(n_train, tcfg.batch_size, ctx.world_size))
        # Every rank scores the whole held-out set: the same numbers, so the same best-epoch decision.
        metrics = {
            **summarize(sums, "train"),
            **heldout_metrics(model, objective, heldout_data, tcfg.batch_size, tcfg.pll_examples, device,
                              tcfg.precision),
            "epoch": epoch + 1,
        }
        score = metrics.get("heldout_mlm_loss", math.inf) + (1.0 - metrics.get("heldout_rop_accuracy", 1.0))
        improved = best.update(score, epoch + 1, metrics, model)
        if ctx.is_main:
            curves.add_epoch(epoch + 1, trainer.state.optimizer_steps, metrics)
            log.info("%s", clock.line("pretrain", epoch + 1, metrics, EPOCH_LINE_KEYS))
            if tracker:
                tracker.log_metrics(metrics, step=trainer.state.optimizer_steps)
            save_pretrained(checkpoint_dir / "last", model, card.replace(epoch=epoch + 1, metrics=metrics))
            if improved:
                save_pretrained(checkpoint_dir / "best", model, card.replace(epoch=epoch + 1, metrics=metrics))
        trainer.save_checkpoint()
    if best.weights is None:
        raise ValueError(f"pretrain: no epoch trained (training.epochs={tcfg.epochs})")
    if ctx.is_main:
        publish_best(model, best, card, tokenizer, checkpoint_dir / "best", out_dir)
        if curves_dir is not None:
            curves.write(curves_dir)
    distributed.barrier()
    return {**best.metrics, "parameters": n_params}


def publish_best(model: TWilBertForPretraining, best: BestEpoch, card: ModelCard, tokenizer: Tokenizer,
                 best_dir: Path, out_dir: Path) -> None:
    """The stage's output: the best epoch's weights (as the checkpoint recorded them) with the vocabulary."""
    model.load_state_dict(best.weights)
    save_pretrained(best_dir, model, card.replace(epoch=best.epoch, metrics=best.metrics))
    staged = out_dir.with_name(f".{out_dir.name}.tmp")
    if staged.exists():
        shutil.rmtree(staged)
    shutil.copytree(best_dir, staged)
    tokenizer.copy_to(staged)
    write_manifest(staged)  # the vocabulary files are part of the model: seal them too
    aside = out_dir.with_name(f".{out_dir.name}.previous")
    shutil.rmtree(aside, ignore_errors=True)  # left by a crash between the two renames
    replace_dir(staged, out_dir, aside)  # never a moment without a complete models/pretrained
    shutil.rmtree(aside, ignore_errors=True)
