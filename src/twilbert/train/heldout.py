"""Held-out evaluation of a pretraining model: MLM accuracy, perplexity, ROP accuracy under fixed
masks, and the pseudo-log-likelihood (TWilBert's ``rop_evaluation`` and ``lm_evaluation``).

Used by pretraining after each epoch and by the ``inspect`` stage on a saved model.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from twilbert.data.batch import PairBatch, as_examples, batch_of, iterate_batches
from twilbert.data.special import IGNORE_INDEX, MASK_ID
from twilbert.device import autocast
from twilbert.train.objective import PretrainObjective, masked_positions

EVAL_STREAM = 2**31 - 1  # the "epoch" key of held-out masks: fixed, and never a training epoch
PLL_CHUNK = 256  # single-mask variants per forward pass of the pseudo-log-likelihood


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
    # Length-grouped: the sums do not depend on the order, and padding would be most of the work
    for i, batch in enumerate(iterate_batches(data, batch_size, objective.seed, 0, shuffle=False,
                                              length_grouping=True)):
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


def single_mask_variants(batch: PairBatch, mask_id: int = MASK_ID) -> tuple[PairBatch, torch.Tensor, torch.Tensor]:
    """Every copy of the batch's rows with exactly one maskable token replaced by [MASK].

    Returns the variants (K rows), their MLM labels (K, T) (the hidden id at the masked position,
    -100 elsewhere) and the source row of each variant (K,).
    """
    row, pos = (~batch.special_mask).nonzero(as_tuple=True)  # (K,) each, row-major
    k = torch.arange(row.numel())
    ids = batch.input_ids[row]  # (K, T)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[k, pos] = ids[k, pos]
    ids[k, pos] = mask_id
    variants = PairBatch(ids, batch.segment_ids[row], batch.attention_mask[row], batch.special_mask[row],
                         batch.labels[row], padded=batch.padded)
    return variants, labels, row


@torch.no_grad()
def pseudo_log_likelihood(
    model, data: dict, n_examples: int, device: torch.device, precision: str = "fp32", chunk: int = PLL_CHUNK,
    mask_id: int = MASK_ID,
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
        variants, labels, owner = single_mask_variants(batch, mask_id)
        sums = torch.zeros(len(idx), dtype=torch.float64)
        for lo in range(0, owner.numel(), chunk):
            part = slice(lo, lo + chunk)
            v = PairBatch(*(t[part] for t in variants.tensors()), padded=variants.padded).to(device)
            with autocast(precision, device):
                out = model(v.input_ids, v.segment_ids, v.attention_mask, labels[part].to(device), padded=v.padded,
                            mlm_positions=masked_positions(labels[part]).to(device))
                # inside the block: the decoder runs when mlm_logits is read, and in bf16 its states are
                # bf16 while its weights are fp32, which only autocast reconciles
                logits = out.mlm_logits.float()  # (k, V)
            logp = F.log_softmax(logits, dim=-1).gather(1, out.mlm_targets[:, None])[:, 0]  # (k,)
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
            **pseudo_log_likelihood(model, data, pll_examples, device, precision, mask_id=objective.mask_id)}
