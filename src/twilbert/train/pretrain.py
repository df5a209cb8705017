"""Pretraining: masked LM (dynamic masking) + reply-order prediction on the pair shards."""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from twilbert.config import Config
from twilbert.data.masking import mask_tokens
from twilbert.data.pairs import PairBatch, iterate_batches, load_shards, n_batches
from twilbert.data.tokenizer import MASK_ID, N_SPECIAL, Tokenizer
from twilbert.model import TWilBertForPretraining, count_parameters
from twilbert.model.io import load_into, load_pretrained_state, save_pretrained
from twilbert.track import Tracker
from twilbert.train.loop import Trainer, resolve_device
from twilbert.train.losses import mlm_loss, rop_loss
from twilbert.train.optim import build_optimizer, build_scheduler, param_groups

log = logging.getLogger(__name__)

EVAL_STREAM = 2**31 - 1  # the "epoch" key of held-out masks: fixed, and never a training epoch


def step_seed(seed: int, *keys: int) -> int:
    """A seed that is a pure function of (seed, epoch, step): masks replay exactly on resume."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0])


def model_config_dict(cfg: Config, vocab_size: int) -> dict:
    return {
        "model": asdict(cfg.model),
        "vocab_size": vocab_size,
        "max_positions": 2 * cfg.representation.max_len + 3,
        "max_len": cfg.representation.max_len,
    }


def build_pretraining_model(cfg: Config, vocab_size: int) -> TWilBertForPretraining:
    torch.manual_seed(cfg.seed)
    return TWilBertForPretraining(cfg.model, vocab_size, 2 * cfg.representation.max_len + 3)


class PretrainObjective:
    """MLM + ROP loss of one batch; masks drawn from a generator seeded by (seed, epoch, step)."""

    def __init__(self, cfg: Config, vocab_size: int, device: torch.device):
        self.cfg, self.vocab_size, self.device = cfg, vocab_size, device
        self.epoch, self.step = 0, 0

    def mask(self, batch: PairBatch, *keys: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(step_seed(self.cfg.seed, *keys))
        return mask_tokens(
            batch.input_ids, batch.special_mask, self.cfg.model.masked_lm, self.vocab_size,
            MASK_ID, N_SPECIAL, generator,
        )

    def outputs(self, model: torch.nn.Module, batch: PairBatch, masked: torch.Tensor, labels: torch.Tensor):
        batch = batch.to(self.device)
        out = model(masked.to(self.device), batch.segment_ids, batch.attention_mask, labels.to(self.device))
        mlm = mlm_loss(out.mlm_logits.float(), out.mlm_targets)
        loss = mlm
        counts = {
            "mlm_correct": (out.mlm_logits.argmax(-1) == out.mlm_targets).sum().item(),
            "mlm_count": out.mlm_targets.numel(),
            "mlm_nll_sum": mlm.item() * out.mlm_targets.numel(),
        }
        if out.rop_logits is not None:
            rop = rop_loss(out.rop_logits.float(), batch.labels)
            loss = loss + rop
            counts["rop_correct"] = (out.rop_logits.argmax(-1) == batch.labels).sum().item()
            counts["rop_count"] = batch.labels.numel()
        return loss, counts

    def __call__(self, model: torch.nn.Module, batch: PairBatch):
        masked, labels = self.mask(batch, self.epoch, self.step)
        self.step += 1
        return self.outputs(model, batch, masked, labels)


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
    """Held-out MLM accuracy, perplexity and ROP accuracy under fixed (seeded) masks."""
    model.eval()
    sums: dict[str, float] = {}
    for i, batch in enumerate(iterate_batches(data, batch_size, objective.cfg.seed, 0, shuffle=False)):
        masked, labels = objective.mask(batch, EVAL_STREAM, i)
        _, counts = objective.outputs(model, batch, masked, labels)
        for k, v in counts.items():
            sums[k] = sums.get(k, 0.0) + v
    return summarize(sums, "heldout")


def pretrain(cfg: Config, pairs_dir: Path, vocab_dir: Path, out_dir: Path, checkpoint_dir: Path,
             tracker: Optional[Tracker] = None) -> dict[str, float]:
    """Pretrain on ``pairs_dir``; write the best epoch's model (safetensors + JSON + vocab) to ``out_dir``."""
    tcfg = cfg.training
    device = resolve_device(tcfg.device)
    tokenizer = Tokenizer(vocab_dir)
    meta = json.loads((Path(pairs_dir) / "meta.json").read_text())
    if meta["max_len"] != cfg.representation.max_len:
        raise ValueError(
            f"{pairs_dir}/meta.json: pairs were packed with max_len={meta['max_len']} but "
            f"representation.max_len={cfg.representation.max_len}; rerun the pairs stage"
        )
    train_data = load_shards(Path(pairs_dir) / "train")
    heldout_data = load_shards(Path(pairs_dir) / "heldout")
    vocab_size = tokenizer.vocab_size
    model = build_pretraining_model(cfg, vocab_size)
    if tcfg.path_initial_weights:
        _, state = load_pretrained_state(Path(tcfg.path_initial_weights))
        load_into(model, state, strict=False)
        log.info("pretrain: continuing from %s", tcfg.path_initial_weights)
    model.to(device)
    n_params = count_parameters(model)
    log.info("pretrain: %s preset, %d parameters, device %s", cfg.model.name, n_params, device)

    value_lr = cfg.model.pkm_params.value_lr if cfg.model.pkm else None
    optimizer = build_optimizer(tcfg.optimizer, param_groups(model, tcfg.lr, tcfg.weight_decay, value_lr),
                                tcfg.lr, tcfg.weight_decay)
    scheduler = build_scheduler(optimizer, tcfg.noam_annealing, cfg.model.hidden_size, tcfg.warmup_steps)
    trainer = Trainer(model, optimizer, scheduler, accum_iters=tcfg.accum_iters, max_grad_norm=tcfg.max_grad_norm,
                      precision=tcfg.precision, device=device, tracker=tracker, log_every=tcfg.log_every,
                      prefix="pretrain")
    objective = PretrainObjective(cfg, vocab_size, device)
    config = model_config_dict(cfg, vocab_size)
    best, best_metrics = math.inf, {}
    checkpoint_dir = Path(checkpoint_dir)
    for epoch in range(tcfg.epochs):
        objective.epoch, objective.step = epoch, 0
        sums = trainer.train_epoch(
            iterate_batches(train_data, tcfg.batch_size, cfg.seed, epoch), objective,
            total=n_batches(train_data, tcfg.batch_size),
        )
        metrics = {**summarize(sums, "train"), **evaluate_heldout(model, objective, heldout_data, tcfg.batch_size)}
        metrics["epoch"] = epoch + 1
        log.info("pretrain epoch %d: %s", epoch + 1, {k: round(v, 4) for k, v in metrics.items()})
        if tracker:
            tracker.log_metrics(metrics, step=trainer.state.optimizer_steps)
        save_pretrained(checkpoint_dir / "last", model, {**config, "epoch": epoch + 1, "metrics": metrics})
        score = metrics.get("heldout_mlm_loss", math.inf) + (1.0 - metrics.get("heldout_rop_accuracy", 1.0))
        if score < best:
            best, best_metrics = score, metrics
            save_pretrained(checkpoint_dir / "best", model, {**config, "epoch": epoch + 1, "metrics": metrics})
    # The stage's output is the best epoch's model, with its vocabulary embedded.
    staged = Path(out_dir).with_name(f".{Path(out_dir).name}.tmp")
    if staged.exists():
        shutil.rmtree(staged)
    shutil.copytree(checkpoint_dir / "best", staged)
    tokenizer.copy_to(staged)
    if Path(out_dir).exists():
        shutil.rmtree(out_dir)
    staged.rename(out_dir)
    result = {**{k: v for k, v in best_metrics.items()}, "parameters": n_params}
    return result
