"""Encoders a classifier can sit on: TWilBert's own, or a local Hugging Face checkpoint.

Both turn texts into the same packed arrays (``input_ids``, ``len_a``, ``length``: one
``[CLS] a [SEP] b [SEP]`` row per example, in the tokenizer's own template) and both classifiers
take the same batch (``input_ids``, ``segment_ids``, ``attention_mask``, ``special_mask``), so one
finetuning loop, one set of heads, losses and metrics serves them. A finetuned model directory says
which it holds in its model card's ``backbone``; :func:`load_classifier` reads either.

transformers is imported lazily: only the ``hf`` backbone needs it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from twilbert.data.pairs import PairBatch, make_batch
from twilbert.data.preprocess import PreprocessConfig, Preprocessor
from twilbert.data.tokenizer import Tokenizer, pack_pairs
from twilbert.model.heads import ClassificationHead, TWilBertForClassification
from twilbert.model.card import HeadConfig, ModelCard
from twilbert.model.io import load_into, load_pretrained_state, save_pretrained
from twilbert.model.manifest import write_manifest

log = logging.getLogger(__name__)

HF_DIR = "hf"  # sub-directory of a finetuned HF classifier: the HF config and tokenizer files
PathLike = Union[str, Path]


# --------------------------------------------------------------------------------------------
# Packers: texts -> packed rows
# --------------------------------------------------------------------------------------------


class TWilBertPacker:
    """SentencePiece (with the vocabulary's preprocessing) and TWilBert's fixed special ids."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.preprocess = tokenizer.preprocess

    def pack(self, texts: Sequence[str], aux_texts: Optional[Sequence[str]], max_len: int) -> dict[str, np.ndarray]:
        a = self.tokenizer.encode(texts)
        b = self.tokenizer.encode(aux_texts) if aux_texts is not None else None
        return pack_pairs(a, b, max_len)

    def batch(self, input_ids, len_a, length, labels) -> PairBatch:
        return make_batch(input_ids, len_a, length, labels)


class HFPacker:
    """A Hugging Face tokenizer's template (BERT ``[CLS] a [SEP] b [SEP]``, RoBERTa
    ``<s> a </s></s> b </s>``...), found by encoding a probe, and its special-token ids."""

    def __init__(self, tokenizer: Any, preprocess: Preprocessor, max_positions: Optional[int] = None):
        self.tokenizer, self.preprocess, self.max_positions = tokenizer, preprocess, max_positions
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.single = self._template(pair=False)  # (prefix, suffix)
        self.pair = self._template(pair=True)  # (prefix, middle, suffix)
        # the ids the template adds (not [UNK]/[MASK]): what use_special_tokens false leaves out of avg
        added = {i for part in (*self.single, *self.pair) for i in part} | {self.pad_id}
        self.special_ids = torch.tensor(sorted(added), dtype=torch.long)

    def _ids(self, texts: Sequence[str]) -> list[list[int]]:
        return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]

    def _template(self, pair: bool) -> tuple[list[int], ...]:
        a, b = self._ids(["hola"])[0], self._ids(["adiós"])[0]
        full = self.tokenizer("hola", "adiós")["input_ids"] if pair else self.tokenizer("hola")["input_ids"]
        i = _find(full, a, 0)
        j = _find(full, b, i + len(a)) if pair else i + len(a)
        if i < 0 or j < 0:
            raise ValueError(f"cannot find how {type(self.tokenizer).__name__} places special tokens around a text")
        if not pair:
            return full[:i], full[i + len(a) :]
        return full[:i], full[i + len(a) : j], full[j + len(b) :]

    def pack(self, texts: Sequence[str], aux_texts: Optional[Sequence[str]], max_len: int) -> dict[str, np.ndarray]:
        """Like :func:`pack_pairs`: each text cut to ``max_len`` tokens, then the template around them."""
        a = self._ids([self.preprocess(t) for t in texts])
        b = self._ids([self.preprocess(t) for t in aux_texts]) if aux_texts is not None else None
        fixed = sum(map(len, self.pair if b is not None else self.single))
        width = fixed + max_len * (2 if b is not None else 1)
        if self.max_positions is not None and width > self.max_positions:
            raise ValueError(
                f"representation.max_len {max_len} gives rows of {width} tokens, more than the {self.max_positions} "
                "positions of the Hugging Face model; lower representation.max_len"
            )
        n = len(a)
        ids = np.full((n, width), self.pad_id, dtype=np.int64)
        len_a, length = np.zeros(n, dtype=np.int32), np.zeros(n, dtype=np.int32)
        for i in range(n):
            ta = a[i][:max_len]
            if b is None:
                prefix, suffix = self.single
                row = [*prefix, *ta, *suffix]
            else:
                prefix, middle, suffix = self.pair
                row = [*prefix, *ta, *middle, *b[i][:max_len], *suffix]
            ids[i, : len(row)] = row
            len_a[i], length[i] = len(ta), len(row)
        return {"input_ids": ids, "len_a": len_a, "length": length}

    def batch(self, input_ids, len_a, length, labels) -> PairBatch:
        """:func:`make_batch`, with segments and special tokens placed by this tokenizer's template."""
        batch = make_batch(input_ids, len_a, length, labels)
        pos = torch.arange(batch.input_ids.shape[1]).unsqueeze(0)  # (1, T)
        b_start = torch.from_numpy(len_a).long().unsqueeze(1) + len(self.pair[0]) + len(self.pair[1])  # (B, 1)
        segment = ((pos >= b_start) & batch.attention_mask).long()
        special = torch.isin(batch.input_ids, self.special_ids) | ~batch.attention_mask
        return replace(batch, segment_ids=segment, special_mask=special)


def _find(seq: list[int], sub: list[int], start: int) -> int:
    for i in range(start, len(seq) - len(sub) + 1):
        if seq[i : i + len(sub)] == sub:
            return i
    return -1


# --------------------------------------------------------------------------------------------
# The Hugging Face classifier
# --------------------------------------------------------------------------------------------


class HFClassifier(nn.Module):
    """A Hugging Face encoder (``AutoModel``) under the same ``ClassificationHead`` as TWilBert's."""

    def __init__(
        self,
        backbone: nn.Module,
        n_outputs: int,
        collapse_mode: str = "avg",
        use_special_tokens: bool = True,
        dropout: float = 0.1,
        n_hidden: int = 0,
        head_hidden_size: int = 256,
    ):
        super().__init__()
        config = backbone.config
        self.backbone = backbone
        # RoBERTa-style checkpoints have a single segment embedding: segment ids would index past it
        self.use_segments = getattr(config, "type_vocab_size", 1) > 1
        self.classifier = ClassificationHead(
            config.hidden_size, n_outputs, collapse_mode, use_special_tokens, dropout, n_hidden, head_hidden_size,
            getattr(config, "initializer_range", 0.02),
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        segment_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        special_mask: Optional[torch.Tensor] = None,
        padded: Optional[bool] = None,
    ) -> torch.Tensor:
        """(B, T) inputs -> logits (B, n_outputs); ``padded`` is TWilBert's hint, unused here (HF masks itself)."""
        out = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask.long(),
            token_type_ids=segment_ids if self.use_segments else None,
        )
        return self.classifier(out.last_hidden_state, attention_mask, special_mask)  # (B, T, H) -> (B, C)


def hf_max_positions(backbone: nn.Module) -> Optional[int]:
    """Usable positions: RoBERTa-style embeddings start counting after the padding index."""
    n = getattr(backbone.config, "max_position_embeddings", None)
    if n is None:
        return None
    padding_idx = getattr(getattr(backbone, "embeddings", None), "padding_idx", None)
    return n - (padding_idx + 1) if padding_idx is not None else n


def load_hf_backbone(path: PathLike) -> tuple[nn.Module, Any]:
    """(AutoModel, AutoTokenizer) from a local ``save_pretrained`` directory; never the network."""
    from transformers import AutoModel, AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"finetuning.hf_path {str(path)!r}: not a directory; point it at a local Hugging Face checkpoint "
            "saved with save_pretrained (config.json, model.safetensors and the tokenizer files)"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True, use_safetensors=True)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"finetuning.hf_path {str(path)!r}: not a loadable Hugging Face checkpoint ({err}). Weights must be "
            "safetensors: load a pickle checkpoint once with transformers and save_pretrained it again"
        ) from None
    return model, tokenizer


def hf_packer(backbone: nn.Module, tokenizer: Any, preprocess: Preprocessor) -> HFPacker:
    return HFPacker(tokenizer, preprocess, hf_max_positions(backbone))


def save_hf_classifier(directory: PathLike, model: HFClassifier, packer: HFPacker, extra: dict) -> Path:
    """safetensors + ``config.json`` (HF config under ``"model"``), HF config and tokenizer in ``hf/``.

    ``extra``: the finetuned card's keys (head, task, max_len_test, finetuning, best_epoch...)."""
    directory = Path(directory)
    card = ModelCard(
        model=json.loads(model.backbone.config.to_json_string()),
        vocab_size=int(model.backbone.config.vocab_size),
        max_positions=packer.max_positions,
        backbone="hf",
        hf_dir=HF_DIR,
        preprocess=packer.preprocess.cfg,
        **extra,
    )
    save_pretrained(directory, model, card)
    model.backbone.config.save_pretrained(directory / HF_DIR)
    packer.tokenizer.save_pretrained(directory / HF_DIR)
    write_manifest(directory)  # hf/ included
    return directory


# --------------------------------------------------------------------------------------------
# Reloading any finetuned classifier
# --------------------------------------------------------------------------------------------


def twilbert_classifier(card: ModelCard, head: HeadConfig, n_outputs: int) -> TWilBertForClassification:
    """A TWilBert encoder of the card's shape under a fresh ``head`` with ``n_outputs`` outputs."""
    return TWilBertForClassification(
        card.model_config, card.vocab_size, card.max_positions, n_outputs,
        head.collapse_mode, head.use_special_tokens, head.dropout, head.n_hidden, head.hidden_size,
    )


def hf_classifier(encoder: nn.Module, head: HeadConfig, n_outputs: int) -> HFClassifier:
    return HFClassifier(encoder, n_outputs, head.collapse_mode, head.use_special_tokens, head.dropout, head.n_hidden,
                        head.hidden_size)


def load_classifier(directory: PathLike) -> tuple[nn.Module, Union[TWilBertPacker, HFPacker], ModelCard]:
    """(classifier in eval mode, its packer, model card) of a twilbert or hf finetuned model directory."""
    directory = Path(directory)
    card, state = load_pretrained_state(directory)
    head, n_out = card.require("head"), card.n_outputs
    if card.kind == "twilbert":
        model: nn.Module = twilbert_classifier(card, head, n_out)
        packer: Union[TWilBertPacker, HFPacker] = TWilBertPacker(Tokenizer(directory))
    elif card.kind == "hf":
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        hf_dir = directory / (card.hf_dir or HF_DIR)
        encoder = AutoModel.from_config(AutoConfig.from_pretrained(hf_dir, local_files_only=True))
        model = hf_classifier(encoder, head, n_out)
        tokenizer = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
        packer = HFPacker(tokenizer, Preprocessor(card.preprocess or PreprocessConfig()), card.max_positions)
    else:
        raise ValueError(f"{directory}: backbone {card.kind!r} is not a neural classifier "
                         "(load it with twilbert.baseline)")
    load_into(model, state, strict=True)
    return model.eval(), packer, card


# --------------------------------------------------------------------------------------------
# Which parameters train
# --------------------------------------------------------------------------------------------


def encoder_of(model: nn.Module) -> nn.Module:
    """The pretrained part of a classifier (what ``finetune_all: false`` freezes)."""
    return model.backbone if isinstance(model, HFClassifier) else model.twilbert


def modules_at_depth(model: nn.Module) -> list[list[nn.Module]]:
    """For each layer depth, bottom first, the modules applied there.

    Under TWilBert's cross-sharing every depth holds the same layer object (plus its own PKM
    memory, if any), so training the top k depths trains the shared layer for k >= 1.
    """
    if isinstance(model, HFClassifier):
        layers = getattr(getattr(model.backbone, "encoder", None), "layer", None)
        if not isinstance(layers, nn.ModuleList):
            raise ValueError(
                f"finetuning.trainable_layers: cannot find the layer stack of {type(model.backbone).__name__} "
                "(expected encoder.layer); use finetune_all instead"
            )
        return [[layer] for layer in layers]
    stack = model.twilbert.encoder
    return [
        [stack.layer_at(i), *([stack.memories[str(i)]] if str(i) in stack.memories else [])]
        for i in range(stack.n_encoders)
    ]


def set_trainable(model: nn.Module, finetune_all: bool, trainable_layers: Optional[int]) -> None:
    """Freeze the encoder (``finetune_all`` false), or all but its top ``trainable_layers`` depths."""
    encoder = encoder_of(model)
    if not finetune_all:
        encoder.requires_grad_(False)
        return
    if trainable_layers is None:
        return
    depths = modules_at_depth(model)
    encoder.requires_grad_(False)
    for modules in depths[len(depths) - min(trainable_layers, len(depths)) :]:
        for module in modules:
            module.requires_grad_(True)
