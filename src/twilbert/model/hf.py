"""Export to Hugging Face transformers: ALBERT for factorized and/or shared models, BERT otherwise.

Which class:
- factorized or cross-sharing -> ALBERT (``num_hidden_groups`` 1 when shared, ``n_encoders`` when
  not; an unfactorized shared model gets an identity ``embedding_hidden_mapping_in``);
- neither -> BERT.
A ``TWilBertModel`` becomes ``AlbertModel``/``BertModel`` (no pooler). A ``TWilBertForPretraining``
becomes ``AlbertForPreTraining``/``BertForPreTraining`` when its ROP head is exactly the HF
pooler (Linear H->H, tanh) + SOP/NSP classifier, i.e. ``rop.n_hidden == 1`` and
``rop.hidden_size == hidden_size``; otherwise ``AlbertForMaskedLM``/``BertForMaskedLM`` (encoder +
MLM head only). HF's SOP/NSP label 0 is the original order, ours is 1, so the classifier rows
are swapped on export.

transformers is imported here only: it is a test/benchmark dependency, not a runtime one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

from twilbert.config import ModelConfig
from twilbert.model.encoder import N_SEGMENTS, TWilBertModel
from twilbert.model.heads import CLS_ID, SEP_ID, TWilBertForPretraining

logger = logging.getLogger(__name__)

PAD_ID = 0


class ExportError(ValueError):
    """The model has no Hugging Face counterpart; the message says which setting prevents it."""


def _check_exportable(cfg: ModelConfig) -> None:
    if cfg.pkm:
        raise ExportError("model.pkm is true: product-key memories have no Hugging Face counterpart")
    if cfg.n_heads * cfg.head_size != cfg.hidden_size:
        raise ExportError(
            f"model.attention_size ({cfg.head_size}) x model.n_heads ({cfg.n_heads}) != model.hidden_size "
            f"({cfg.hidden_size}): Hugging Face attention always has hidden_size // n_heads per head"
        )


def _is_albert(cfg: ModelConfig) -> bool:
    return cfg.factorize_embeddings or cfg.cross_sharing


def _rop_exportable(cfg: ModelConfig) -> bool:
    return cfg.rop.enabled and cfg.rop.n_hidden == 1 and cfg.rop.hidden_size == cfg.hidden_size


def hf_config(cfg: ModelConfig, vocab_size: int, max_positions: int) -> Any:
    """The ``AlbertConfig`` or ``BertConfig`` equivalent to ``cfg``."""
    from transformers import AlbertConfig, BertConfig

    _check_exportable(cfg)
    common = dict(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.n_encoders,
        num_attention_heads=cfg.n_heads,
        intermediate_size=cfg.ffn_size,
        hidden_act=cfg.hidden_act,
        hidden_dropout_prob=cfg.output_dropout,
        attention_probs_dropout_prob=cfg.output_dropout,
        max_position_embeddings=max_positions,
        type_vocab_size=N_SEGMENTS,
        initializer_range=cfg.initializer_range,
        layer_norm_eps=cfg.layer_norm_eps,
        pad_token_id=PAD_ID,
    )
    if _is_albert(cfg):
        return AlbertConfig(
            embedding_size=cfg.embedding_size if cfg.factorize_embeddings else cfg.hidden_size,
            num_hidden_groups=1 if cfg.cross_sharing else cfg.n_encoders,
            inner_group_num=1,
            classifier_dropout_prob=0.0,  # our ROP head has no dropout
            bos_token_id=CLS_ID,
            eos_token_id=SEP_ID,
            **common,
        )
    return BertConfig(**common)


def _encoder_state(encoder: TWilBertModel, cfg: ModelConfig, albert: bool) -> dict[str, torch.Tensor]:
    """Our encoder's weights under the HF base model's names (no ``albert.``/``bert.`` prefix)."""
    ours = encoder.state_dict()
    out = {f"embeddings.{k[len('embeddings.'):]}": v for k, v in ours.items() if k.startswith("embeddings.")}
    if albert:
        if cfg.factorize_embeddings:
            out["encoder.embedding_hidden_mapping_in.weight"] = ours["embedding_hidden_mapping_in.weight"]
            out["encoder.embedding_hidden_mapping_in.bias"] = ours["embedding_hidden_mapping_in.bias"]
        else:
            # ALBERT always projects E->H; with E == H an identity projection is exact.
            out["encoder.embedding_hidden_mapping_in.weight"] = torch.eye(cfg.hidden_size)
            out["encoder.embedding_hidden_mapping_in.bias"] = torch.zeros(cfg.hidden_size)
    for k, v in ours.items():
        if not k.startswith("encoder.layers."):
            continue
        index, name = k[len("encoder.layers.") :].split(".", 1)
        if albert:
            out[f"encoder.albert_layer_groups.{index}.albert_layers.0.{name}"] = v
        else:
            out[f"encoder.layer.{index}.{_BERT_LAYER_NAMES[name]}"] = v
    return out


_BERT_LAYER_NAMES = {
    f"{ours}.{p}": f"{theirs}.{p}"
    for ours, theirs in [
        ("attention.query", "attention.self.query"),
        ("attention.key", "attention.self.key"),
        ("attention.value", "attention.self.value"),
        ("attention.dense", "attention.output.dense"),
        ("attention.LayerNorm", "attention.output.LayerNorm"),
        ("ffn", "intermediate.dense"),
        ("ffn_output", "output.dense"),
        ("full_layer_layer_norm", "output.LayerNorm"),
    ]
    for p in ("weight", "bias")
}


def _mlm_state(model: TWilBertForPretraining, albert: bool) -> dict[str, torch.Tensor]:
    p = model.predictions
    head = "predictions." if albert else "cls.predictions."
    transform = head if albert else head + "transform."
    return {
        f"{transform}dense.weight": p.dense.weight,
        f"{transform}dense.bias": p.dense.bias,
        f"{transform}LayerNorm.weight": p.LayerNorm.weight,
        f"{transform}LayerNorm.bias": p.LayerNorm.bias,
        f"{head}bias": p.bias,
        f"{head}decoder.weight": p.decoder.weight,
        f"{head}decoder.bias": p.bias,
    }


def _rop_state(model: TWilBertForPretraining, albert: bool) -> dict[str, torch.Tensor]:
    rop = model.rop_classifier
    flip = [1, 0]  # ours: 1 = original order; HF SOP/NSP: 0 = original order
    pooler, classifier = ("albert.pooler.", "sop_classifier.classifier.") if albert else (
        "bert.pooler.dense.",
        "cls.seq_relationship.",
    )
    return {
        f"{pooler}weight": rop.hidden[0].weight,
        f"{pooler}bias": rop.hidden[0].bias,
        f"{classifier}weight": rop.classifier.weight[flip],
        f"{classifier}bias": rop.classifier.bias[flip],
    }


def to_hf(
    model: Union[TWilBertForPretraining, TWilBertModel], cfg: ModelConfig, vocab_size: int, max_positions: int
) -> nn.Module:
    """A Hugging Face model (in eval mode) holding ``model``'s weights; see the module docstring for which."""
    import transformers

    config = hf_config(cfg, vocab_size, max_positions)
    albert = _is_albert(cfg)
    family = "Albert" if albert else "Bert"
    prefix = "albert." if albert else "bert."

    if isinstance(model, TWilBertForPretraining):
        with_rop = _rop_exportable(cfg)
        if not with_rop:
            logger.warning(
                "ROP head not exported: Hugging Face's pooler + SOP/NSP head matches it only when "
                "rop.n_hidden == 1 and rop.hidden_size == hidden_size; exporting %sForMaskedLM",
                family,
            )
        cls = getattr(transformers, f"{family}ForPreTraining" if with_rop else f"{family}ForMaskedLM")
        hf = cls(config)
        state = {prefix + k: v for k, v in _encoder_state(model.twilbert, cfg, albert).items()}
        state.update(_mlm_state(model, albert))
        if with_rop:
            state.update(_rop_state(model, albert))
    elif isinstance(model, TWilBertModel):
        hf = getattr(transformers, f"{family}Model")(config, add_pooling_layer=False)
        state = _encoder_state(model, cfg, albert)
    else:
        raise TypeError(f"to_hf exports TWilBertModel or TWilBertForPretraining, got {type(model).__name__}")

    expected = set(hf.state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ExportError(f"weight mapping incomplete: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    hf.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True)
    return hf.eval()


def save_hf(
    directory: Union[str, Path],
    model: Union[TWilBertForPretraining, TWilBertModel],
    cfg: ModelConfig,
    vocab_size: int,
    max_positions: int,
) -> nn.Module:
    """Export with ``to_hf`` and write it with ``save_pretrained``; returns the HF model."""
    hf = to_hf(model, cfg, vocab_size, max_positions)
    hf.save_pretrained(str(directory))
    logger.info("exported %s to %s", type(hf).__name__, directory)
    return hf
