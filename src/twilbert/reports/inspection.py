"""TWilBert's evaluation application ('Evaluación'): what a pretrained model does with held-out pairs.

For a few held-out pairs it shows the masked input, the MLM top predictions against the truth at
each masked position and the ROP decision with its probability; over the held-out split it reports
MLM accuracy, perplexity, pseudo-log-likelihood and ROP accuracy. Masks are the held-out masks of
the pretrain stage (same seed and batch size), so the metrics equal its best epoch's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from twilbert.data.batch import iterate_batches
from twilbert.data.pairs import load_shards
from twilbert.data.shards import PairsDataError
from twilbert.data.special import IGNORE_INDEX
from twilbert.data.tokenizer import Tokenizer
from twilbert.model import TWilBertForPretraining
from twilbert.model.card import ModelCard
from twilbert.model.hf_pretraining import is_hf_pretrained
from twilbert.model.io import load_into, load_pretrained_state
from twilbert.train.heldout import EVAL_STREAM, heldout_metrics
from twilbert.train.objective import PretrainObjective

log = logging.getLogger(__name__)

ORDER = {1: "original order", 0: "swapped"}  # ROP labels: 1 = the pair in its original order


@dataclass
class MaskedPosition:
    position: int
    seen: str  # the piece the model was given: [MASK], a random piece, or the original kept
    truth: str
    top: list[tuple[str, float]]  # (piece, probability), best first


@dataclass
class SampleReport:
    pieces: list[str]  # the input as the model saw it
    chosen: list[int]  # positions whose original token the model had to predict
    predictions: list[MaskedPosition]
    rop_truth: Optional[int]
    rop_prediction: Optional[int]
    rop_probability: Optional[float]  # probability of the predicted order


def load_pretraining_model(directory: Path) -> tuple[TWilBertForPretraining, ModelCard]:
    """The MLM + ROP model saved by the pretrain stage, in eval mode, with its model card."""
    card, state = load_pretrained_state(directory)
    model = TWilBertForPretraining(card.model_config, card.vocab_size, card.max_positions)
    load_into(model, state, strict=True)
    return model.eval(), card


@torch.no_grad()
def inspect_samples(model: TWilBertForPretraining, objective: PretrainObjective, data: dict, tokenizer: Tokenizer,
                    n_samples: int, batch_size: int, top_k: int = 3) -> list[SampleReport]:
    """The first ``n_samples`` held-out rows under the held-out masks of the first evaluation batch."""
    model.eval()
    batch = next(iterate_batches(data, batch_size, objective.seed, 0, shuffle=False))
    masked, labels = objective.mask(batch, EVAL_STREAM, 0)
    batch = batch.to(objective.device)
    out = model(masked.to(objective.device), batch.segment_ids, batch.attention_mask, labels.to(objective.device))
    probs = out.mlm_logits.float().softmax(-1)  # (N, V), rows in row-major order of the chosen positions
    top_p, top_ids = probs.topk(min(top_k, probs.shape[-1]), dim=-1)  # (N, k)
    rop = out.rop_logits.float().softmax(-1) if out.rop_logits is not None else None  # (B, 2)

    reports, offset = [], 0
    for row in range(batch.input_ids.shape[0]):
        length = int(batch.attention_mask[row].sum())
        chosen = (labels[row] != IGNORE_INDEX).nonzero().flatten().tolist()
        if row < n_samples:
            seen = tokenizer.decode_ids(masked[row, :length].tolist())
            predictions = [
                MaskedPosition(
                    position=pos,
                    seen=seen[pos],
                    truth=tokenizer.decode_ids([int(labels[row, pos])])[0],
                    top=list(zip(tokenizer.decode_ids(top_ids[offset + j].tolist()), top_p[offset + j].tolist())),
                )
                for j, pos in enumerate(chosen)
            ]
            decision = int(rop[row].argmax()) if rop is not None else None
            reports.append(SampleReport(
                pieces=seen, chosen=chosen, predictions=predictions,
                rop_truth=int(batch.labels[row]) if rop is not None else None,
                rop_prediction=decision,
                rop_probability=float(rop[row, decision]) if rop is not None else None,
            ))
        offset += len(chosen)
    return reports


def _md(text: str) -> str:
    """Escape a piece for Markdown text and table cells."""
    for char in "\\|`*_<>[]":
        text = text.replace(char, "\\" + char)
    return text


def render_markdown(samples: list[SampleReport], metrics: dict[str, float], title: str) -> str:
    """The report: metrics table, then per sample the masked input, the MLM table and the ROP decision."""
    names = {
        "heldout_mlm_accuracy": "MLM accuracy",
        "heldout_perplexity": "MLM perplexity",
        "heldout_pll": "pseudo-log-likelihood (mean log P per token)",
        "heldout_pseudo_perplexity": "pseudo-perplexity",
        "heldout_rop_accuracy": "ROP accuracy",
        "examples": "held-out examples",
    }
    names.update({f"before_{key}": f"{label}, the checkpoint before continued pretraining"
                  for key, label in list(names.items())[:4]})
    lines = [f"# {title}", "", "| held-out metric | value |", "|---|---|"]
    lines += [f"| {label} | {metrics[key]:.4g} |" for key, label in names.items() if key in metrics]
    for i, sample in enumerate(samples, 1):
        chosen = set(sample.chosen)
        text = " ".join(f"**{_md(p)}**" if j in chosen else _md(p) for j, p in enumerate(sample.pieces))
        lines += ["", f"## Sample {i}", "", f"Masked input (predicted positions in bold): {text}", ""]
        lines += ["| position | input | truth | top predictions | |", "|---|---|---|---|---|"]
        for m in sample.predictions:
            top = ", ".join(f"{_md(piece)} {p:.2f}" for piece, p in m.top)
            hit = "✓" if m.top and m.top[0][0] == m.truth else "✗"
            lines.append(f"| {m.position} | {_md(m.seen)} | {_md(m.truth)} | {top} | {hit} |")
        if sample.rop_prediction is None:
            lines += ["", "ROP: off (MLM-only model)"]
        else:
            hit = "✓" if sample.rop_prediction == sample.rop_truth else "✗"
            lines += ["", f"ROP: {ORDER[sample.rop_prediction]} (p={sample.rop_probability:.2f}); "
                          f"truth: {ORDER[sample.rop_truth]} {hit}"]
    return "\n".join(lines) + "\n"


def inspect_model(model_dir: Path, pairs_dir: Path, n_samples: int, seed: int, batch_size: int, pll_examples: int,
                  device: torch.device, precision: str = "fp32") -> tuple[str, dict[str, float]]:
    """(Markdown report, held-out metrics) of the model in ``model_dir`` on the pair shards in ``pairs_dir``."""
    data = load_shards(Path(pairs_dir))  # memory-mapped; only the rows scored are read
    if not len(data):
        raise PairsDataError(f"{pairs_dir}: the held-out split holds no pairs; raise pairs.heldout_fraction")
    before: dict[str, float] = {}
    if is_hf_pretrained(model_dir):  # continued pretraining (training.init_from hf): a Hugging Face folder
        model, tokenizer, objective, before = _hf_inspection(Path(model_dir), data, seed, batch_size, pll_examples,
                                                             device, precision)
    else:
        model, card = load_pretraining_model(Path(model_dir))
        model.to(device)
        tokenizer = Tokenizer(model_dir)  # the vocabulary embedded in the model directory
        objective = PretrainObjective(model.cfg.masked_lm, seed, card.vocab_size, device)
    metrics = heldout_metrics(model, objective, data, batch_size, pll_examples, device, precision)
    metrics["examples"] = len(data)
    metrics.update(before)
    samples = inspect_samples(model, objective, data, tokenizer, n_samples, batch_size)
    log.info("inspect: %s", {k: round(v, 4) for k, v in metrics.items()})
    return render_markdown(samples, metrics, f"Inspect: {model_dir} on {pairs_dir}"), metrics


def _hf_inspection(model_dir: Path, data, seed: int, batch_size: int, pll_examples: int, device: torch.device,
                   precision: str):
    """The continued model, its tokenizer and objective, and the held-out metrics of the checkpoint it
    started from (``before_*``, under the same masks) while that folder is still there."""
    from twilbert.config import MaskedLMConfig, from_dict
    from twilbert.data.hf_vocab import HFVocab
    from twilbert.model.hf_pretraining import HFForPretraining, load_hf_pretraining, load_masked_lm

    model, card = load_hf_pretraining(model_dir)
    tokenizer = HFVocab(model_dir)
    objective = PretrainObjective(from_dict(MaskedLMConfig, card.get("masked_lm", {}), "masked_lm"), seed,
                                  tokenizer.vocab_size, device, mask_id=tokenizer.mask_id,
                                  n_special=tokenizer.n_special)
    before: dict[str, float] = {}
    source = Path(card.get("hf_path") or "")
    if card.get("hf_path") and source.is_dir():
        start = HFForPretraining(load_masked_lm(source), rop=False).to(device)
        scored = heldout_metrics(start, objective, data, batch_size, pll_examples, device, precision)
        before = {f"before_{k}": v for k, v in scored.items()}
    else:
        log.warning("inspect: %s is gone; no held-out metrics of the checkpoint before continued pretraining",
                    card.get("hf_path"))
    return model.to(device), tokenizer, objective, before
