"""Continued pretraining of a local Hugging Face checkpoint on the pair shards (``training.init_from: hf``).

The same stage, loop and objective as twilbert's own pretraining (``train.pretrain``): dynamic
masking keyed by (seed, epoch, global batch, micro-batch), training checkpoints every
``training.checkpoint_every`` micro-steps and a bit-exact resume, the same bytes on any number of
torchrun workers, bf16, the held-out metrics and the best epoch. What differs:
the model is :class:`~twilbert.model.hf_pretraining.HFForPretraining` around ``AutoModelForMaskedLM``,
masks use the checkpoint's own mask and special ids (``data/vocab/meta.json``, written by the vocab
stage), and the output is a Hugging Face folder: ``save_pretrained`` + the tokenizer, the project's
card (``twilbert.json``) and ``checksums.json``. ``AutoModelForMaskedLM`` loads it, and the finetune
stage reads it as a ``hf`` backbone with no extra step.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional, Sequence

import torch

from twilbert.codebase import code_digest
from twilbert.config import ConfigError, to_dict
from twilbert.data.hf_vocab import HFVocab, check_positions, is_hf_vocab
from twilbert.data.shards import MANIFEST
from twilbert.device import configure_matmul, resolve_device
from twilbert.io_utils import publish_dir
from twilbert.model import count_parameters
from twilbert.model.hf_pretraining import (
    CARD_FORMAT,
    CARD_NAME,
    ROP_FILE,
    HFForPretraining,
    HFModelError,
    check_tied,
    load_masked_lm,
)
from twilbert.model.hf_quiet import quiet_transformers
from twilbert.model.io import save_weights
from twilbert.tracking.runs import Tracker
from twilbert.train import distributed
from twilbert.train.curves import CurveRecorder
from twilbert.train.distributed import DistContext, check_workers
from twilbert.train.fingerprint import config_fingerprint, files_digest
from twilbert.train.loop import Callback, Checkpointing, Trainer, seed_everything
from twilbert.train.objective import PretrainObjective
from twilbert.train.optim import build_optimizer, build_scheduler, param_groups
from twilbert.train.pretrain import (
    FINGERPRINT_KEYS,
    Pretraining,
    PretrainingTask,
    open_pretrain_data,
    pretrain_checkpointing,
    run_epochs,
    running_metrics,
)
from twilbert.train.pretrain_run import PretrainRun

log = logging.getLogger(__name__)


def build_continued(run: PretrainRun, vocab: HFVocab, device: torch.device, tracker: Optional[Tracker] = None,
                    ctx: Optional[DistContext] = None, checkpointing: Optional[Checkpointing] = None,
                    callbacks: Sequence[Callback] = ()) -> Pretraining:
    """The checkpoint under the pretraining objective, its optimizer, schedule, loop and masks."""
    tcfg = run.training
    ctx = ctx or DistContext(device=device)
    check_workers(tcfg.micro_batches, ctx.world_size, "training.micro_batches")
    torch.manual_seed(run.seed)  # heads the checkpoint lacks (ROP, a missing decoder bias) start seeded
    mlm = load_masked_lm(tcfg.hf_path)
    if vocab.vocab_size > mlm.config.vocab_size:
        raise HFModelError(f"training.hf_path {tcfg.hf_path}: {mlm.config.vocab_size} embedding rows for a tokenizer "
                           f"of {vocab.vocab_size} ids ({vocab.vocab_dir}); rerun the vocab stage")
    model = HFForPretraining(mlm, rop=tcfg.rop).to(device)
    optimizer = build_optimizer(tcfg.optimizer, param_groups(model, tcfg.lr, tcfg.weight_decay), tcfg.lr,
                                tcfg.weight_decay)
    scheduler = build_scheduler(optimizer, tcfg.noam_annealing, mlm.config.hidden_size, tcfg.warmup_steps)
    trained = torch.compile(model) if tcfg.compile else model
    trainer = Trainer(trained, optimizer, scheduler, accum_iters=tcfg.accum_iters, max_grad_norm=tcfg.max_grad_norm,
                      precision=tcfg.precision, device=device, tracker=tracker, log_every=tcfg.log_every,
                      prefix="pretrain", checkpointing=checkpointing, callbacks=callbacks, running=running_metrics,
                      seed=run.seed)
    objective = PretrainObjective(run.model.masked_lm, run.seed, vocab.vocab_size, device,
                                  mask_id=vocab.mask_id, n_special=vocab.n_special)
    return Pretraining(model, trainer, objective)


def continued_fingerprint(run: PretrainRun, pairs_dir: Path, vocab_dir: Path) -> dict[str, str]:
    """As ``pretrain_fingerprint``, the checkpoint's files included."""
    inputs = [pairs_dir / MANIFEST, vocab_dir, Path(run.training.hf_path)]
    return {"config": config_fingerprint(run.params(), include=FINGERPRINT_KEYS), "inputs": files_digest(inputs),
            "code": code_digest(__name__)}


def open_vocab_for(run: PretrainRun, vocab_dir: Path) -> HFVocab:
    """``data/vocab`` as the vocab stage took it from ``training.hf_path``; refused when it is another."""
    if not is_hf_vocab(vocab_dir):
        raise ConfigError(f"{vocab_dir}: a SentencePiece vocabulary, but training.init_from is 'hf'; rerun the vocab "
                          "stage (`dvc repro vocab`) so that it takes the checkpoint's tokenizer")
    vocab = HFVocab(vocab_dir)
    source = vocab.meta.get("source", {}).get("hf_path")
    if source != run.training.hf_path:
        raise ConfigError(f"{vocab_dir}: the tokenizer of {source!r}, but training.hf_path is "
                          f"{run.training.hf_path!r}; rerun the vocab stage")
    check_positions(vocab.meta, run.max_len, f"training.hf_path {run.training.hf_path}")
    return vocab


def card(run: PretrainRun, vocab: HFVocab, model: HFForPretraining, epoch: int, metrics: dict) -> dict:
    return {"format": CARD_FORMAT, "backbone": "hf", "init_from": "hf", "hf_path": run.training.hf_path,
            "model_type": vocab.meta.get("model_type"), "vocab_size": vocab.vocab_size,
            "max_positions": vocab.meta.get("max_positions"), "max_len": run.max_len,
            "rop": model.rop_classifier is not None, "masked_lm": to_dict(run.model.masked_lm), "epoch": epoch,
            "metrics": metrics,
            "preprocess": vocab.meta.get("preprocess", {})}


def save_hf_pretrained(directory: Path, model: HFForPretraining, vocab: HFVocab, card_data: dict,
                       checksums: bool = True) -> Path:
    """A Hugging Face folder (published atomically): ``save_pretrained``, the tokenizer with its
    ``meta.json``, the ROP head when there is one, ``twilbert.json`` and ``checksums.json``."""
    with publish_dir(directory, checksums=checksums) as staged:
        with quiet_transformers():  # no "Writing model shards" bar at each best epoch
            model.mlm.save_pretrained(staged)
        vocab.copy_to(staged)
        if model.rop_classifier is not None:
            save_weights({k: v.detach().cpu() for k, v in model.rop_classifier.state_dict().items()},
                         staged / ROP_FILE)
        (staged / CARD_NAME).write_text(json.dumps(card_data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return Path(directory)


def continued_pretrain(run: PretrainRun, pairs_dir: Path, vocab_dir: Path, out_dir: Path, checkpoint_dir: Path,
                       tracker: Optional[Tracker] = None, ctx: Optional[DistContext] = None,
                       curves_dir: Optional[Path] = None, callbacks: Sequence[Callback] = ()) -> dict[str, float]:
    """``train.pretrain.pretrain`` for ``training.init_from: hf``: the best epoch as a Hugging Face folder
    in ``out_dir``."""
    tcfg = run.training
    ctx = ctx or DistContext(device=resolve_device(tcfg.device))
    device = ctx.device
    seed_everything(run.seed, device)
    configure_matmul(device, tcfg.tf32)
    pairs_dir, vocab_dir, out_dir, checkpoint_dir = map(Path, (pairs_dir, vocab_dir, out_dir, checkpoint_dir))
    vocab = open_vocab_for(run, vocab_dir)
    train_data, heldout_data = open_pretrain_data(pairs_dir, run.max_len, vocab.vocab_size)
    curves = CurveRecorder(tracker, prefix="pretrain")
    checkpointing = pretrain_checkpointing(run, checkpoint_dir, continued_fingerprint(run, pairs_dir, vocab_dir))
    model, trainer, objective = build_continued(run, vocab, device, curves, ctx, checkpointing, callbacks)
    n_params = count_parameters(model)
    if ctx.is_main:
        log.info("pretrain: continuing %s (%s, %d parameters), device %s, %d process(es)", tcfg.hf_path,
                 vocab.meta.get("model_type"), n_params, device, ctx.world_size)
    def save_epoch(epoch: int, metrics: dict, improved: bool) -> None:
        save_hf_pretrained(checkpoint_dir / "last", model, vocab, card(run, vocab, model, epoch, metrics))

    best = run_epochs(PretrainingTask(run, ctx, model, trainer, objective, train_data, heldout_data, curves, tracker,
                                      save_epoch))
    if ctx.is_main:
        model.load_state_dict(best.weights)
        check_tied(model.mlm, str(out_dir))
        save_hf_pretrained(out_dir, model, vocab, card(run, vocab, model, best.epoch, best.metrics))
        if curves_dir is not None:
            curves.write(curves_dir)
    distributed.barrier()
    return {**best.metrics, "parameters": n_params}
