"""Packers: texts -> packed rows, with TWilBert's SentencePiece or a Hugging Face tokenizer.

Both give the same arrays (``input_ids``, ``len_a``, ``length``: one row per example, in the
tokenizer's own template, packed by :func:`twilbert.data.batch.pack_pairs`) and the same batch
(:func:`twilbert.data.batch.make_batch`), so one finetuning loop and one set of heads serve both.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from twilbert.data.batch import TWILBERT, PairBatch, Template, make_batch, pack_pairs
from twilbert.data.preprocess import Preprocessor
from twilbert.data.tokenizer import Tokenizer


class TWilBertPacker:
    """SentencePiece (with the vocabulary's preprocessing) and TWilBert's fixed special ids."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.preprocess = tokenizer.preprocess

    def encode(self, texts: Sequence[str], aux_texts: Optional[Sequence[str]]) -> tuple[list, Optional[list]]:
        """The token ids of each text (and second text), untruncated."""
        return self.tokenizer.encode(texts), self.tokenizer.encode(aux_texts) if aux_texts is not None else None

    def pack(self, texts: Sequence[str], aux_texts: Optional[Sequence[str]], max_len: int,
             encoded: Optional[tuple[list, Optional[list]]] = None) -> dict[str, np.ndarray]:
        """``encoded``: :meth:`encode`'s result, when the caller has it already."""
        return pack_pairs(*(encoded or self.encode(texts, aux_texts)), max_len)

    def batch(self, input_ids, len_a, length, labels) -> PairBatch:
        return make_batch(input_ids, len_a, length, labels, TWILBERT)


class HFPacker:
    """A Hugging Face tokenizer's template (BERT ``[CLS] a [SEP] b [SEP]``, RoBERTa
    ``<s> a </s></s> b </s>``...), found by encoding a probe, and its special-token ids."""

    def __init__(self, tokenizer: Any, preprocess: Preprocessor, max_positions: Optional[int] = None):
        self.tokenizer, self.preprocess, self.max_positions = tokenizer, preprocess, max_positions
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        # the ids the template adds (not [UNK]/[MASK]) are what use_special_tokens false leaves out of avg
        self.template = Template(single=self._template(pair=False), pair=self._template(pair=True), pad_id=pad_id)

    @property
    def pad_id(self) -> int:
        return self.template.pad_id

    @property
    def single(self) -> tuple[tuple[int, ...], ...]:
        """(prefix, suffix) around one text."""
        return self.template.single

    @property
    def pair(self) -> tuple[tuple[int, ...], ...]:
        """(prefix, middle, suffix) around two texts."""
        return self.template.pair

    def _ids(self, texts: Sequence[str]) -> list[list[int]]:
        # verbose=False: no "Token indices sequence length is longer than ..." warning for a text over the
        # model's length: it is cut to max_len when packed, and the finetune log counts those texts itself
        return self.tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]

    def _template(self, pair: bool) -> tuple[tuple[int, ...], ...]:
        a, b = self._ids(["hola"])[0], self._ids(["adiós"])[0]
        full = self.tokenizer("hola", "adiós")["input_ids"] if pair else self.tokenizer("hola")["input_ids"]
        i = _find(full, a, 0)
        j = _find(full, b, i + len(a)) if pair else i + len(a)
        if i < 0 or j < 0:
            raise ValueError(f"cannot find how {type(self.tokenizer).__name__} places special tokens around a text")
        if not pair:
            return tuple(full[:i]), tuple(full[i + len(a) :])
        return tuple(full[:i]), tuple(full[i + len(a) : j]), tuple(full[j + len(b) :])

    def encode(self, texts: Sequence[str], aux_texts: Optional[Sequence[str]]) -> tuple[list, Optional[list]]:
        """The token ids of each preprocessed text (and second text), untruncated, without the template."""
        a = self._ids([self.preprocess(t) for t in texts])
        return a, self._ids([self.preprocess(t) for t in aux_texts]) if aux_texts is not None else None

    def pack(self, texts: Sequence[str], aux_texts: Optional[Sequence[str]], max_len: int,
             encoded: Optional[tuple[list, Optional[list]]] = None) -> dict[str, np.ndarray]:
        """:func:`pack_pairs` in this tokenizer's template, after checking that the rows fit the model.
        ``encoded``: :meth:`encode`'s result, when the caller has it already."""
        a, b = encoded or self.encode(texts, aux_texts)
        width = self.template.width(max_len, b is not None)
        if self.max_positions is not None and width > self.max_positions:
            raise ValueError(
                f"representation.max_len {max_len} gives rows of {width} tokens, more than the {self.max_positions} "
                "positions of the Hugging Face model; lower representation.max_len"
            )
        return pack_pairs(a, b, max_len, self.template)

    def batch(self, input_ids, len_a, length, labels) -> PairBatch:
        """:func:`make_batch`, with segments and special tokens placed by this tokenizer's template."""
        return make_batch(input_ids, len_a, length, labels, self.template)


def _find(seq: list[int], sub: list[int], start: int) -> int:
    for i in range(start, len(seq) - len(sub) + 1):
        if seq[i : i + len(sub)] == sub:
            return i
    return -1


def hf_max_positions(backbone: Any) -> Optional[int]:
    """Usable positions of a Hugging Face backbone: RoBERTa-style embeddings start counting after the padding index."""
    n = getattr(backbone.config, "max_position_embeddings", None)
    if n is None:
        return None
    padding_idx = getattr(getattr(backbone, "embeddings", None), "padding_idx", None)
    return n - (padding_idx + 1) if padding_idx is not None else n
