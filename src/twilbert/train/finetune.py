"""Finetuning one task: a classification head on the pretrained encoder, best epoch on dev, test once."""

from __future__ import annotations

import copy
import csv
import json
import logging
import math
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from twilbert.config import Config, FinetuningConfig, ModelConfig, TaskConfig, from_dict
from twilbert.data.formats import TaskExamples
from twilbert.data.pairs import iterate_batches, make_batch
from twilbert.data.tasks import TaskData, load_task
from twilbert.data.tokenizer import Tokenizer, pack_pairs
from twilbert.io_utils import atomic_write
from twilbert.model import TWilBertForClassification
from twilbert.model.io import load_pretrained_state, save_pretrained
from twilbert.track import Tracker
from twilbert.train.loop import Trainer, autocast, resolve_device
from twilbert.train.losses import build_loss, class_weights_tensor
from twilbert.train.metrics import evaluate_predictions, official_metric_name
from twilbert.train.optim import build_optimizer, build_scheduler, param_groups

log = logging.getLogger(__name__)


def n_outputs(task: TaskConfig) -> int:
    return 1 if task.task.regression else len(task.task.categories)


def resolve_loss(name: str, task: TaskConfig) -> str:
    """``auto``: cross-entropy for single-label, BCE for multi-label, MSE for regression."""
    if name != "auto":
        return name
    if task.task.regression:
        return "mse"
    return "binary_crossentropy" if task.task.multi_label else "categorical_crossentropy"


def encode_examples(tokenizer: Tokenizer, ex: TaskExamples, max_len: int, task: TaskConfig) -> dict[str, np.ndarray]:
    """Pack ``[CLS] text [SEP] (aux [SEP])`` rows with their targets."""
    a = tokenizer.encode(ex.texts)
    b = tokenizer.encode(ex.aux_texts) if ex.aux_texts is not None else None
    packed = pack_pairs(a, b, max_len)
    if task.task.regression or task.task.multi_label:
        packed["labels"] = np.asarray(ex.labels, dtype=np.float32)
    else:
        packed["labels"] = np.asarray(ex.labels, dtype=np.int64)
    return packed


def build_classifier(encoder_config: dict, ft: FinetuningConfig, task: TaskConfig) -> TWilBertForClassification:
    model_cfg = from_dict(ModelConfig, encoder_config["model"], "model")
    return TWilBertForClassification(
        model_cfg, encoder_config["vocab_size"], encoder_config["max_positions"], n_outputs(task),
        ft.collapse_mode, ft.use_special_tokens, ft.dropout, ft.n_hidden, ft.hidden_size,
    )


def load_encoder_weights(model: TWilBertForClassification, pretrained_dir: Path) -> dict:
    """Copy the pretrained encoder (``twilbert.*``) into the classifier; heads stay freshly initialised."""
    config, state = load_pretrained_state(pretrained_dir)
    encoder_state = {k: v for k, v in state.items() if k.startswith("twilbert.")}
    missing, unexpected = model.load_state_dict(encoder_state, strict=False)
    missing = [k for k in missing if k.startswith("twilbert.")]
    if missing:
        raise ValueError(f"{pretrained_dir}: pretrained weights lack encoder parameters {missing[:5]}")
    return config


def predict_scores(model, data: dict[str, np.ndarray], task: TaskConfig, batch_size: int,
                   device: torch.device, precision: str = "fp32") -> np.ndarray:
    """Probabilities (softmax / sigmoid) or regression values, in input order.

    Rows are batched by length so each batch pads only to its own longest row.
    """
    model.eval()
    order = np.argsort(data["length"], kind="stable")
    out = []
    with torch.no_grad():
        for begin in range(0, len(order), batch_size):
            idx = order[begin : begin + batch_size]
            batch = make_batch(data["input_ids"][idx], data["len_a"][idx], data["length"][idx], data["labels"][idx])
            batch = batch.to(device)
            with autocast(precision, device):
                logits = model(batch.input_ids, batch.segment_ids, batch.attention_mask, batch.special_mask)
            logits = logits.float()
            if task.task.regression:
                scores = logits.squeeze(-1)
            elif task.task.multi_label:
                scores = torch.sigmoid(logits)
            else:
                scores = torch.softmax(logits, dim=-1)
            out.append(scores.cpu().numpy())
    scores = np.concatenate(out) if out else np.zeros((0, n_outputs(task)), dtype=np.float32)
    result = np.empty_like(scores)
    result[order] = scores
    return result


def decide(scores: np.ndarray, task: TaskConfig) -> np.ndarray:
    if task.task.regression:
        return scores
    if task.task.multi_label:
        return (scores >= task.task.threshold).astype(np.int64)
    return scores.argmax(-1)


def score_split(model, data, task: TaskConfig, ft: FinetuningConfig, device) -> dict[str, float]:
    scores = predict_scores(model, data, task, ft.pred_batch_size, device, ft.precision)
    return evaluate_predictions(task.task, data["labels"], decide(scores, task), scores)


def finetune_task(cfg: Config, task: TaskConfig, pretrained_dir: Path, model_out: Path, metrics_out: Path,
                  tracker: Optional[Tracker] = None) -> dict:
    """Finetune on ``task``, pick the best dev epoch (early stopping), evaluate it on test, write outputs."""
    ft = cfg.finetuning
    device = resolve_device(ft.device)
    pretrained_dir, model_out, metrics_out = Path(pretrained_dir), Path(model_out), Path(metrics_out)
    tokenizer = Tokenizer(pretrained_dir)
    splits: TaskData = load_task(task, cfg.seed)
    max_len = cfg.representation.max_len
    test_len = cfg.representation.max_len_test or max_len
    train = encode_examples(tokenizer, splits.train, max_len, task)
    dev = encode_examples(tokenizer, splits.dev, test_len, task)
    test = encode_examples(tokenizer, splits.test, test_len, task)

    torch.manual_seed(cfg.seed)
    encoder_config = json.loads((pretrained_dir / "config.json").read_text())
    model = build_classifier(encoder_config, ft, task)
    load_encoder_weights(model, pretrained_dir)
    if not ft.finetune_all:
        model.twilbert.requires_grad_(False)
    model.to(device)

    weights = class_weights_tensor(task.task, splits.train.labels)
    loss_name = resolve_loss(ft.loss, task)
    criterion = build_loss(loss_name, task.task, None if weights is None else weights.to(device))

    def loss_fn(m, batch):
        batch = batch.to(device)
        logits = m(batch.input_ids, batch.segment_ids, batch.attention_mask, batch.special_mask)
        return criterion(logits.float(), batch.labels), {}

    groups = param_groups(model, ft.lr, ft.weight_decay, None)
    groups = [g for g in ({**g, "params": [p for p in g["params"] if p.requires_grad]} for g in groups) if g["params"]]
    optimizer = build_optimizer(ft.optimizer, groups, ft.lr, ft.weight_decay)
    hidden = encoder_config["model"]["hidden_size"]
    scheduler = build_scheduler(optimizer, ft.noam_annealing, hidden, ft.warmup_steps)
    trainer = Trainer(model, optimizer, scheduler, accum_iters=ft.accum_iters, max_grad_norm=ft.max_grad_norm,
                      precision=ft.precision, device=device, tracker=tracker, log_every=10,
                      prefix=f"finetune_{task.name}")
    official = official_metric_name(task.task)
    best_score, best_epoch, best_state, since_best = -math.inf, 0, None, 0
    history = []
    for epoch in range(ft.epochs):
        n = len(train["labels"])
        sums = trainer.train_epoch(iterate_batches(train, ft.batch_size, cfg.seed, epoch), loss_fn,
                                   total=math.ceil(n / ft.batch_size))
        dev_metrics = score_split(model, dev, task, ft, device)
        row = {"epoch": epoch + 1, "train_loss": sums["loss"], **{f"dev_{k}": v for k, v in dev_metrics.items()}}
        history.append(row)
        if tracker:
            tracker.log_metrics(row, step=epoch + 1)
        log.info("%s epoch %d: loss %.4f dev %s %.4f", task.name, epoch + 1, sums["loss"], official, dev_metrics["official"])
        if dev_metrics["official"] > best_score:
            best_score, best_epoch, since_best = dev_metrics["official"], epoch + 1, 0
            best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
        else:
            since_best += 1
            if since_best >= ft.patience:
                log.info("%s: early stop after epoch %d (best epoch %d)", task.name, epoch + 1, best_epoch)
                break
    model.load_state_dict(best_state)
    dev_metrics = score_split(model, dev, task, ft, device)
    test_metrics = score_split(model, test, task, ft, device)
    metrics = {
        "task": task.name,
        "model": "twilbert",
        "official_metric": official,
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "dev_from_train": splits.dev_from_train,
        "test_is_dev": splits.test_is_dev,
        "n_train": len(train["labels"]),
        "n_dev": len(dev["labels"]),
        "n_test": len(test["labels"]),
        "dev": dev_metrics,
        "test": test_metrics,
    }
    if tracker:
        tracker.log_metrics({f"test_{k}": v for k, v in test_metrics.items()})
        tracker.log_metrics({f"best_dev_{k}": v for k, v in dev_metrics.items()})

    head = {k: getattr(ft, k) for k in ("collapse_mode", "use_special_tokens", "dropout", "n_hidden", "hidden_size")}
    save_pretrained(model_out, model, {**encoder_config, "head": head, "task": asdict(task),
                                       "max_len_test": test_len, "best_epoch": best_epoch})
    tokenizer.copy_to(model_out)
    metrics_out.mkdir(parents=True, exist_ok=True)
    with atomic_write(metrics_out / "metrics.json") as fh:
        json.dump(metrics, fh, indent=2)
    with atomic_write(metrics_out / "epochs.csv") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    return metrics
