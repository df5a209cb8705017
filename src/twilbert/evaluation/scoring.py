"""Scores and decisions of a classifier on packed rows: what training's dev monitor and `predict` share.

Outside ``train`` so that the prediction path imports torch and numpy only, not the training stack
(scikit-learn and scipy come in only when ``evaluate_scores`` is called).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from twilbert.config import TaskConfig
from twilbert.data.batch import make_batch
from twilbert.device import autocast
from twilbert.model.card import n_outputs

Split = dict[str, np.ndarray]  # prepared split: packed rows or texts, plus "labels"


def decide(scores: np.ndarray, task: TaskConfig) -> np.ndarray:
    """Class indices (N,), 0/1 flags (N, C) over the threshold for multi-label, or the values (N,)."""
    if task.task.regression:
        return scores
    if task.task.multi_label:
        return (scores >= task.task.threshold).astype(np.int64)
    return scores.argmax(-1)


def evaluate_scores(task: TaskConfig, labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """The task's metrics (its official one under ``official``) of ``scores`` against ``labels``."""
    from twilbert.evaluation.metrics import evaluate_predictions  # scikit-learn and scipy: only when evaluating

    return evaluate_predictions(task.task, labels, decide(scores, task), scores)


def predict_scores(model, data: Split, task: TaskConfig, batch_size: int, device: torch.device,
                   precision: str = "fp32", packer: Any = None) -> np.ndarray:
    """Probabilities (softmax / sigmoid) or regression values, in input order.

    Rows are batched by length so each batch pads only to its own longest row (and a batch of equal
    lengths runs attention unmasked); the scores stay on the device until all batches are queued,
    then come back in one transfer.
    """
    to_batch = packer.batch if packer is not None else make_batch
    model.eval()
    order = np.argsort(data["length"], kind="stable")
    out = []
    with torch.no_grad():
        for begin in range(0, len(order), batch_size):
            idx = order[begin : begin + batch_size]
            batch = to_batch(data["input_ids"][idx], data["len_a"][idx], data["length"][idx], data["labels"][idx])
            batch = batch.to(device)
            with autocast(precision, device):
                logits = model(batch.input_ids, batch.segment_ids, batch.attention_mask, batch.special_mask,
                               padded=batch.padded)
            logits = logits.float()
            if task.task.regression:
                scores = logits.squeeze(-1)
            elif task.task.multi_label:
                scores = torch.sigmoid(logits)
            else:
                scores = torch.softmax(logits, dim=-1)
            out.append(scores)
    scores = torch.cat(out).cpu().numpy() if out else np.zeros((0, n_outputs(task)), dtype=np.float32)
    result = np.empty_like(scores)
    result[order] = scores
    return result
