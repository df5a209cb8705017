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

A finetuned ``TWilBertForClassification`` becomes ``AlbertForSequenceClassification`` /
``BertForSequenceClassification`` (with ``id2label``, ``label2id``, ``problem_type``) when its head
reads the [CLS] state straight into the output layer (``collapse_mode: cls``, ``n_hidden: 0``; see
:func:`to_hf_classifier` for why that is exact). Any other head (the default average over the tokens,
gelu hidden layers) has no HF class: it becomes ``TWilBert{Albert,Bert}ForSequenceClassification``
of :mod:`twilbert.model.hf_head`, a file the export carries (HF's custom-code mechanism).

transformers is imported here only: it is a test/benchmark dependency, not a runtime one.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

from twilbert.config import ModelConfig, TaskSpec
from twilbert.data.special import CLS_ID, PAD_ID, SEP_ID
from twilbert.data.tokenizer import META_FILE, MODEL_FILE
from twilbert.errors import TwilbertError, library_os_errors
from twilbert.io_utils import publish_dir
from twilbert.model.card import max_text_len, read_model_dir
from twilbert.model.encoder import N_SEGMENTS, TWilBertModel
from twilbert.model.heads import TWilBertForClassification, TWilBertForPretraining
from twilbert.model.hf_notes import CLASSIFIER_NOTE, CUSTOM_HEAD_NOTE, POOLER_HEAD_NOTE, TOKENIZER_NOTE, tokenizer_config
from twilbert.model.hf_quiet import quiet_transformers
from twilbert.model.io import WEIGHTS_NAME, load_into, load_pretrained_state
from twilbert.model.manifest import verification_enabled

logger = logging.getLogger(__name__)


class ExportError(TwilbertError, ValueError):
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

    _load_exact(hf, state)
    return hf.eval()


# --------------------------------------------------------------------------------------------
# Finetuned classifiers
# --------------------------------------------------------------------------------------------

PROBLEM_TYPES = ("single_label_classification", "multi_label_classification", "regression")
# The pooler's input scale: |s * x| <= 2**-12, where tanh(y) = y * (1 - y**2 / 3) rounds to y in float32.
POOLER_INPUT_BOUND = 2.0**-12


AUTO_CLASS = "AutoModelForSequenceClassification"  # what a custom head's auto_map entry names


def has_pooler_head(model: TWilBertForClassification) -> bool:
    """Whether Hugging Face's own ``*ForSequenceClassification`` computes the head: [CLS] -> linear."""
    return model.classifier.collapse_mode == "cls" and len(model.classifier.hidden) == 0


def _pooler_scale(model: TWilBertForClassification) -> float:
    """A power of two s with |s * h| <= POOLER_INPUT_BOUND for every possible final hidden state h.

    The encoder ends in a LayerNorm: its normalized values lie within sqrt(H - 1), so every output
    component is at most |gamma| * sqrt(H - 1) + |beta|. A power of two keeps s * x and W / s exact.
    """
    norms = [m for name, m in model.twilbert.named_modules() if name.endswith("full_layer_layer_norm")]
    hidden = model.cfg.hidden_size
    with torch.no_grad():
        bound = max(float((n.weight.abs() * math.sqrt(max(hidden - 1, 1)) + n.bias.abs()).max()) for n in norms)
    return 2.0 ** math.floor(math.log2(POOLER_INPUT_BOUND / max(bound, 1e-30)))


def to_hf_classifier(
    model: TWilBertForClassification, cfg: ModelConfig, vocab_size: int, max_positions: int, labels: list[str],
    problem_type: str,
) -> nn.Module:
    """A Hugging Face classifier (eval mode) computing ``model``'s logits: HF's own class when
    :func:`has_pooler_head`, else :mod:`twilbert.model.hf_head`'s class (its ``config.twilbert_head``).

    HF's head is ``classifier(dropout(tanh(pooler(h_cls))))``; ours (cls, no hidden layer) is
    ``out(h_cls)``. With the pooler ``s * I`` (bias 0) and the classifier ``W_out / s``, HF computes
    ``W_out tanh(s h) / s + b``, which equals ``W_out h + b`` to float32 rounding, because
    :func:`_pooler_scale` keeps ``|s h|`` where tanh is the identity in float32. The price is a
    pooler far from a trained one: further finetuning of the export starts from that scaling.
    ``labels``: the class names in output order (``["value"]`` for regression).
    """
    import transformers

    if problem_type not in PROBLEM_TYPES:
        raise ValueError(f"problem_type must be one of {PROBLEM_TYPES}, got {problem_type!r}")
    n_out = model.classifier.out.out_features
    if len(labels) != n_out:
        raise ExportError(f"{len(labels)} labels for a head with {n_out} outputs")
    config = hf_config(cfg, vocab_size, max_positions)
    config.num_labels = n_out
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: i for i, label in enumerate(labels)}
    config.problem_type = problem_type
    dropout = model.classifier.dropout.p
    albert = _is_albert(cfg)
    if albert:
        config.classifier_dropout_prob = dropout
    else:
        config.classifier_dropout = dropout
    family = "Albert" if albert else "Bert"
    prefix = "albert." if albert else "bert."
    if not has_pooler_head(model):
        return _to_custom_classifier(model, cfg, config, family, prefix)
    hf = getattr(transformers, f"{family}ForSequenceClassification")(config)

    pooler = "albert.pooler." if albert else "bert.pooler.dense."
    scale = _pooler_scale(model)
    out = model.classifier.out
    state = {prefix + k: v for k, v in _encoder_state(model.twilbert, cfg, albert).items()}
    state.update({
        f"{pooler}weight": torch.eye(cfg.hidden_size) * scale,
        f"{pooler}bias": torch.zeros(cfg.hidden_size),
        "classifier.weight": out.weight / scale,
        "classifier.bias": out.bias,
    })
    _load_exact(hf, state)
    return hf.eval()


def _to_custom_classifier(model: TWilBertForClassification, cfg: ModelConfig, config: Any, family: str,
                          prefix: str) -> nn.Module:
    """``model`` as :mod:`twilbert.model.hf_head`'s class: the encoder under HF's names, the head as it is."""
    from twilbert.model import hf_head

    head = model.classifier
    config.twilbert_head = {
        "collapse_mode": head.collapse_mode, "use_special_tokens": head.use_special_tokens,
        "special_ids": [CLS_ID, SEP_ID], "n_hidden": len(head.hidden),
        "hidden_size": head.hidden[0].out_features if len(head.hidden) else cfg.hidden_size,
        "dropout": head.dropout.p,
    }
    name = f"TWilBert{family}ForSequenceClassification"
    config.auto_map = {AUTO_CLASS: f"{hf_head.MODULE_NAME}.{name}"}
    hf = getattr(hf_head, name)(config)
    state = {prefix + k: v for k, v in _encoder_state(model.twilbert, cfg, family == "Albert").items()}
    state.update({f"classifier.{k}": v for k, v in head.state_dict().items()})
    _load_exact(hf, state)
    return hf.eval()


def _load_exact(hf: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load ``state`` into ``hf``, every parameter accounted for."""
    expected = set(hf.state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ExportError(f"weight mapping incomplete: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    hf.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True)


def save_hf(
    directory: Union[str, Path],
    model: Union[TWilBertForPretraining, TWilBertModel],
    cfg: ModelConfig,
    vocab_size: int,
    max_positions: int,
) -> nn.Module:
    """Export with ``to_hf`` and write it with ``save_pretrained``; returns the HF model."""
    hf = to_hf(model, cfg, vocab_size, max_positions)
    with quiet_transformers():
        hf.save_pretrained(str(directory))
    logger.info("exported %s to %s", type(hf).__name__, directory)
    return hf


# --------------------------------------------------------------------------------------------
# Model directories (`twilbert export-hf`)
# --------------------------------------------------------------------------------------------

EXPORT_FILES = (WEIGHTS_NAME, MODEL_FILE, META_FILE)  # a twilbert directory's weights and vocabulary


def problem_type(spec: TaskSpec) -> str:
    """Hugging Face's name of a task's kind (``config.problem_type``)."""
    return PROBLEM_TYPES[2] if spec.regression else PROBLEM_TYPES[1] if spec.multi_label else PROBLEM_TYPES[0]


def label_names(spec: TaskSpec) -> list[str]:
    """The task's category names in output order (empty for regression)."""
    return sorted(spec.categories, key=spec.categories.get)


def export_hf_dir(model_dir: Path, out_dir: Path, encoder_only: bool = False) -> str:
    """Write a twilbert model directory as a Hugging Face one (plus tokenizer files); returns the HF class name.

    A pretrained model becomes ``*ForPreTraining``/``*ForMaskedLM``; a finetuned one
    ``*ForSequenceClassification`` (or, with ``encoder_only``, its encoder alone).
    """
    from twilbert.model.finetuned import load_classifier_module  # packers and tokenizers: only for a classifier

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    card = read_model_dir(model_dir, {"twilbert": EXPORT_FILES}, "export-hf", ExportError)
    cfg, vocab_size, max_positions = card.model_config, card.vocab_size, card.max_positions
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ExportError(f"{out_dir}: exists and is not an empty directory; remove it or choose another --out")
    classifier_note = ""
    if card.is_finetuned and not encoder_only:
        classifier, _, _ = load_classifier_module(model_dir)  # the directory's own (selected fold's) model
        if card.kfold_members:
            logger.warning("export-hf: %s is a k-fold model; the export is its selected fold's model, while "
                        "`twilbert predict` averages the %d folds", model_dir, len(card.kfold_members))
        spec = card.task.task
        hf = to_hf_classifier(classifier, cfg, vocab_size, max_positions, label_names(spec) or ["value"],
                              problem_type(spec))
        head_note = POOLER_HEAD_NOTE if has_pooler_head(classifier) else CUSTOM_HEAD_NOTE.format(
            head=_describe_head(hf.config.twilbert_head), hf_class=type(hf).__name__,
            module=hf.config.auto_map[AUTO_CLASS].split(".")[0])
        classifier_note = CLASSIFIER_NOTE.format(problem_type=problem_type(spec), threshold=spec.threshold,
                                                 max_len_test=card.text_len(), head_note=head_note)
    else:
        _, state = load_pretrained_state(model_dir)
        pretraining = any(k.startswith("predictions.") for k in state)
        model = (TWilBertForPretraining if pretraining else TWilBertModel)(cfg, vocab_size, max_positions)
        load_into(model, state, strict=True)
        hf = None
    # A source loaded without verification (--no-verify) may hold changed weights: sealing them
    # with a fresh checksums.json would vouch for what nobody checked, so the export gets none.
    verified = verification_enabled()
    if not verified:
        logger.warning("export-hf: %s was not verified (--no-verify), so %s gets no checksums.json", model_dir, out_dir)
    with publish_dir(out_dir, checksums=verified) as tmp, library_os_errors(out_dir):
        if hf is None:
            hf = save_hf(tmp, model, cfg, vocab_size, max_positions)
        else:
            with quiet_transformers():
                hf.save_pretrained(str(tmp))
        if getattr(hf.config, "auto_map", None):  # the custom head's code, beside the weights it runs
            from twilbert.model import hf_head

            shutil.copyfile(hf_head.__file__, tmp / f"{hf_head.MODULE_NAME}.py")
        shutil.copyfile(model_dir / MODEL_FILE, tmp / "spiece.model")  # the name Hugging Face's ALBERT looks for
        shutil.copyfile(model_dir / MODEL_FILE, tmp / MODEL_FILE)
        shutil.copyfile(model_dir / META_FILE, tmp / META_FILE)
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(max_positions), indent=2) + "\n")
        note = TOKENIZER_NOTE.format(source=model_dir, hf_class=type(hf).__name__, max_positions=max_positions,
                                     max_single=max_text_len(max_positions, 1), classifier_note=classifier_note)
        (tmp / "TOKENIZER.md").write_text(note, encoding="utf-8")
    return type(hf).__name__


def _describe_head(head: dict) -> str:
    pool = ("the average over the tokens" + ("" if head["use_special_tokens"] else " but [CLS]/[SEP]")
            if head["collapse_mode"] == "avg" else "the [CLS] state")
    return f"{pool} -> {head['n_hidden']} gelu layer(s) -> linear"
