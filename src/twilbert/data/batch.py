"""Rows and batches: the one packer of ``[CLS] a [SEP] b [SEP]`` rows (special ids: ``data/special.py``), and batching.

Every path that turns token ids into model inputs goes through here: the pairs stage's examples,
finetuning and prediction (TWilBert's SentencePiece or a Hugging Face tokenizer, whose template is
a :class:`Template`), embeddings. Nothing here reads files: shards and in-memory rows share the
``take(idx)`` interface of :class:`PackedRows`.
"""

from __future__ import annotations

import functools
import itertools
import math
import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Optional, Sequence, Union

import numpy as np
import torch

from twilbert.data.grouping import Lengths, grouped_batches
from twilbert.data.special import CLS_ID, PAD_ID, SEP_ID

if TYPE_CHECKING:
    from twilbert.data.shards import PairShards

PACKED_KEYS = ("input_ids", "len_a", "length", "labels")  # what make_batch takes, in its order


# --------------------------------------------------------------------------------------------
# Packing token ids into rows
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Template:
    """The special ids a tokenizer puts around one text (``single``: prefix, suffix) or two
    (``pair``: prefix, middle, suffix), and its padding id."""

    single: tuple[tuple[int, ...], tuple[int, ...]]
    pair: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]
    pad_id: int

    @property
    def special_ids(self) -> tuple[int, ...]:
        """Every id the template adds, padding included: what ``special_mask`` marks."""
        return tuple(sorted({i for part in (*self.single, *self.pair) for i in part} | {self.pad_id}))

    def width(self, max_len: int, pair: bool) -> int:
        """Tokens in a row whose text(s) hold ``max_len`` tokens each."""
        return sum(map(len, self.pair if pair else self.single)) + max_len * (2 if pair else 1)


TWILBERT = Template(single=((CLS_ID,), (SEP_ID,)), pair=((CLS_ID,), (SEP_ID,), (SEP_ID,)), pad_id=PAD_ID)


def _place(ids: np.ndarray, seqs: Sequence[Sequence[int]], max_len: int, start: Union[int, np.ndarray]) -> np.ndarray:
    """Write ``seqs[i][:max_len]`` into row i of ``ids`` from column ``start`` (or ``start[i]``).

    Returns the kept lengths.
    """
    lengths = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
    flat = np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int32, count=int(lengths.sum()))
    row = np.repeat(np.arange(len(seqs)), lengths)  # (total,) the text each token belongs to
    col = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)  # (total,) position in its text
    keep = col < max_len
    offset = start if np.isscalar(start) else start[row[keep]]
    ids[row[keep], col[keep] + offset] = flat[keep]
    return np.minimum(lengths, max_len).astype(np.int32)


def _put(ids: np.ndarray, rows: np.ndarray, start: np.ndarray, part: Sequence[int]) -> np.ndarray:
    """Write the template ``part`` into every row from column ``start[i]``; returns the column after it."""
    for k, token in enumerate(part):
        ids[rows, start + k] = token
    return start + len(part)


def pack_pairs(
    a: Sequence[Sequence[int]], b: Optional[Sequence[Sequence[int]]], max_len: int, template: Template = TWILBERT
) -> dict[str, np.ndarray]:
    """Pack texts into ``[CLS] a [SEP] b [SEP]`` rows (or ``template``'s), each text cut to ``max_len`` tokens.

    Returns ``input_ids`` (N, T) with T = ``template.width`` (2*max_len+3 for TWilBert's pairs,
    max_len+2 without b), ``len_a`` (N,) the length of a after truncation, and ``length`` (N,) the
    number of real tokens in the row. Built by numpy scatters, without a Python loop over rows.
    """
    n = len(a)
    ids = np.full((n, template.width(max_len, b is not None)), template.pad_id, dtype=np.int32)  # (N, T)
    rows = np.arange(n)
    prefix, *rest = template.pair if b is not None else template.single
    end = _put(ids, rows, np.zeros(n, dtype=np.int64), prefix)
    len_a = _place(ids, a, max_len, end)
    end = _put(ids, rows, end + len_a, rest[0])
    if b is not None:
        end = _put(ids, rows, end + _place(ids, b, max_len, end), rest[1])
    return {"input_ids": ids, "len_a": len_a, "length": end.astype(np.int32)}


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


@dataclass
class PairBatch:
    input_ids: torch.Tensor  # (B, T) long
    segment_ids: torch.Tensor  # (B, T) long
    attention_mask: torch.Tensor  # (B, T) bool, True on real tokens
    special_mask: torch.Tensor  # (B, T) bool, True on [CLS]/[SEP]/[PAD]: never masked
    labels: torch.Tensor  # (B,) ROP label (1 = original order), or a finetuning task's targets
    # Whether any row is padded, known on the host from the lengths (``make_batch``): the model then
    # skips the attention mask without asking the device (a sync). None: not known, the model checks.
    padded: Optional[bool] = None
    # (B, T) bool, True on the first piece of each word (a Hugging Face tokenizer's word ids, kept in
    # the shards), False on specials and padding: word masking then masks whole words. None: per token.
    word_start: Optional[torch.Tensor] = None

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.input_ids, self.segment_ids, self.attention_mask, self.special_mask, self.labels

    def pin_memory(self) -> "PairBatch":
        """A copy in page-locked memory, so that ``to(cuda)`` is an asynchronous copy."""
        return PairBatch(*(t.pin_memory() for t in self.tensors()), padded=self.padded,
                         word_start=None if self.word_start is None else self.word_start.pin_memory())

    def to(self, device: torch.device) -> "PairBatch":
        """On ``device``; on CUDA copied from pinned memory without blocking the host."""
        device = torch.device(device)
        source = self.pin_memory() if device.type == "cuda" and not self.input_ids.is_pinned() else self
        words = None if source.word_start is None else source.word_start.to(device, non_blocking=True)
        return PairBatch(*(t.to(device, non_blocking=True) for t in source.tensors()), padded=self.padded,
                         word_start=words)


class PackedRows:
    """In-memory packed rows (``pack_pairs`` output plus ``labels``) with the interface of ``PairShards``."""

    def __init__(self, data: dict[str, np.ndarray]):
        self.data = data

    def __len__(self) -> int:
        return len(self.data["labels"])

    def take(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        return {k: self.data[k][idx] for k in PACKED_KEYS}

    def lengths(self, idx: np.ndarray) -> np.ndarray:
        return np.asarray(self.data["length"])[idx]

    def originals(self, n: int) -> np.ndarray:
        rows = np.flatnonzero(self.data["labels"] == 1)  # ROP label 1: the pair in its original order
        return (rows if len(rows) else np.arange(len(self)))[:n]


Examples = Union["PairShards", PackedRows]


def as_examples(data: Union["PairShards", PackedRows, dict]) -> Examples:
    """Shards as they are; a dict of packed arrays wrapped in ``PackedRows``."""
    return PackedRows(data) if isinstance(data, dict) else data


def make_batch(input_ids: np.ndarray, len_a: np.ndarray, length: np.ndarray, labels: np.ndarray,
               template: Template = TWILBERT, word_start: Optional[np.ndarray] = None) -> PairBatch:
    """Tensors for one batch of packed rows, trimmed to its longest row (dynamic padding).

    Segment 1 starts after ``template``'s pair prefix, a and middle; ``special_mask`` marks the
    template's ids and the padding. ``word_start`` (N, >= T) bool: the rows' word starts, if known.
    """
    width = int(length.max())
    ids = torch.from_numpy(np.ascontiguousarray(input_ids[:, :width])).long()
    pos = torch.arange(width).unsqueeze(0)  # (1, T)
    len_a_t = torch.from_numpy(np.asarray(len_a)).long().unsqueeze(1)
    length_t = torch.from_numpy(np.asarray(length)).long().unsqueeze(1)
    attention = pos < length_t
    b_start = len(template.pair[0]) + len(template.pair[1])
    segment = ((pos >= len_a_t + b_start) & attention).long()
    special = functools.reduce(operator.or_, (ids == i for i in template.special_ids)) | ~attention
    target = torch.from_numpy(np.ascontiguousarray(labels))
    if not target.is_floating_point():
        target = target.long()
    words = None
    if word_start is not None:
        words = torch.from_numpy(np.ascontiguousarray(word_start[:, :width], dtype=bool)) & ~special
    return PairBatch(ids, segment, attention, special, target, padded=bool(length.min() < width), word_start=words)


def batch_of(data: Union[Examples, dict], idx: np.ndarray) -> PairBatch:
    """The batch of examples ``idx`` (shards or packed rows)."""
    examples = as_examples(data)
    rows = examples.take(idx)
    return make_batch(*(rows[k] for k in PACKED_KEYS), template=getattr(examples, "template", TWILBERT),
                      word_start=rows.get("word_start"))


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The example order of one epoch: a pure function of (seed, epoch), shared by every worker under torchrun.

    A full permutation, as uint32 (4 bytes per example) while the examples fit, else int64; the
    same order as ``default_rng([seed, epoch]).permutation(n)``.
    """
    dtype = np.uint32 if n <= np.iinfo(np.uint32).max else np.int64
    order = np.arange(n, dtype=dtype)
    if shuffle:
        np.random.default_rng([seed, epoch]).shuffle(order)
    return order


def batch_indices(order: np.ndarray, batch_size: int, seed: int, epoch: int, shuffle: bool = True, start: int = 0,
                  lengths: Optional[Lengths] = None) -> Iterator[np.ndarray]:
    """The example indices of each batch of the epoch order ``order``, from batch ``start`` on:
    consecutive slices, or with ``lengths`` (example indices -> row lengths) length-grouped
    (``data.grouping``)."""
    if lengths is not None:
        yield from grouped_batches(order, lengths, batch_size, seed, epoch, shuffle, start)
        return
    for begin in range(start * batch_size, len(order), batch_size):
        yield order[begin : begin + batch_size]


def iterate_batches(
    data: Union[Examples, dict], batch_size: int, seed: int, epoch: int, shuffle: bool = True, start: int = 0,
    length_grouping: bool = False,
) -> Iterator[PairBatch]:
    """Batches in an order that is a pure function of (seed, epoch): resumable from batch ``start``;
    with ``length_grouping``, of rows of similar length (``data.grouping``)."""
    examples = as_examples(data)
    order = epoch_order(len(examples), seed, epoch, shuffle)
    lengths = examples.lengths if length_grouping else None
    for idx in batch_indices(order, batch_size, seed, epoch, shuffle, start, lengths):
        yield batch_of(examples, np.sort(idx))


def n_batches(data: Union[Examples, dict], batch_size: int) -> int:
    return math.ceil(len(as_examples(data)) / batch_size)
