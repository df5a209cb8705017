"""Reply-order prediction (ROP) pair sampling, tokenized into shards that pretraining streams.

Each (tweet, reply) pair yields a positive in its order (label 1) and a negative with the two
swapped (label 0), as TWilBert does. A text with no reply is split into two contiguous segments at
a seeded random token boundary (ALBERT's sentence-order prediction), so the same objective trains.
Masking is not done here: it is dynamic, drawn at train time.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from twilbert.data.tokenizer import CLS_ID, PAD_ID, SEP_ID, Tokenizer, pack_pairs
from twilbert.io_utils import save_npz

log = logging.getLogger(__name__)

SHARD_KEYS = ("input_ids", "len_a", "length", "labels")  # labels: ROP, 1 = original order


def segment_pairs(
    token_ids: Sequence[Sequence[int]], replies: Sequence[Optional[Sequence[int]]], rng: np.random.Generator
) -> tuple[list[list[int]], list[list[int]], int]:
    """(a, b) token pairs: the reply when there is one, else a split of the text. Returns skipped count."""
    a_out, b_out, skipped = [], [], 0
    for ids, reply in zip(token_ids, replies):
        if reply is not None:
            if not ids or not reply:
                skipped += 1
                continue
            a_out.append(list(ids))
            b_out.append(list(reply))
            continue
        if len(ids) < 2:
            skipped += 1  # one token cannot be put in two orders
            continue
        cut = int(rng.integers(1, len(ids)))
        a_out.append(list(ids[:cut]))
        b_out.append(list(ids[cut:]))
    return a_out, b_out, skipped


def rop_examples(a: list[list[int]], b: list[list[int]], max_len: int) -> dict[str, np.ndarray]:
    """Positives (a, b, 1) interleaved with negatives (b, a, 0), packed to fixed width."""
    first = [x for pair in zip(a, b) for x in pair]
    second = [x for pair in zip(b, a) for x in pair]
    packed = pack_pairs(first, second, max_len)
    packed["labels"] = np.tile(np.array([1, 0], dtype=np.int64), len(a))
    return packed


def write_shards(out_dir: Path, examples: dict[str, np.ndarray], shard_size: int) -> int:
    out_dir.mkdir(parents=True, exist_ok=True)
    n = len(examples["labels"])
    n_shards = max(1, math.ceil(n / shard_size))
    for s in range(n_shards):
        part = {k: v[s * shard_size : (s + 1) * shard_size] for k, v in examples.items()}
        save_npz(out_dir / f"shard-{s:05d}.npz", **part)
    return n_shards


def build_pair_shards(
    corpus: Sequence[tuple[str, Optional[str]]],
    tokenizer: Tokenizer,
    out_dir: Path,
    max_len: int,
    heldout_fraction: float,
    shard_size: int,
    seed: int,
) -> dict:
    """Tokenize the corpus, sample ROP pairs, split off a held-out part, write shards atomically."""
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    texts = [a for a, _ in corpus]
    has_reply = [b is not None for _, b in corpus]
    tokens = tokenizer.encode(texts)
    reply_tokens = iter(tokenizer.encode([b for _, b in corpus if b is not None]))
    replies = [next(reply_tokens) if r else None for r in has_reply]
    a, b, skipped = segment_pairs(tokens, replies, rng)
    if not a:
        raise ValueError("pairs: no usable pairs (every text is shorter than two tokens)")
    order = rng.permutation(len(a))
    n_heldout = min(len(a) - 1, max(1, round(heldout_fraction * len(a)))) if heldout_fraction > 0 else 0
    parts = {"heldout": order[:n_heldout], "train": order[n_heldout:]}

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    summary = {"pairs": len(a), "skipped_short": skipped, "max_len": max_len, "seed": seed,
               "vocab_size": tokenizer.vocab_size}
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.") as tmp:
        staged = Path(tmp) / "pairs"
        for name, idx in parts.items():
            examples = rop_examples([a[i] for i in idx], [b[i] for i in idx], max_len)
            summary[f"{name}_examples"] = len(examples["labels"])
            summary[f"{name}_shards"] = write_shards(staged / name, examples, shard_size)
        (staged / "meta.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staged.rename(out_dir)
    log.info("pairs: %s", summary)
    return summary


# --------------------------------------------------------------------------------------------
# Reading shards back as batches
# --------------------------------------------------------------------------------------------


@dataclass
class PairBatch:
    input_ids: torch.Tensor  # (B, T) long
    segment_ids: torch.Tensor  # (B, T) long
    attention_mask: torch.Tensor  # (B, T) bool, True on real tokens
    special_mask: torch.Tensor  # (B, T) bool, True on [CLS]/[SEP]/[PAD]: never masked
    labels: torch.Tensor  # (B,) ROP label (1 = original order), or a finetuning task's targets

    def to(self, device: torch.device) -> "PairBatch":
        return PairBatch(*(t.to(device, non_blocking=True) for t in vars(self).values()))


def load_shards(directory: Path) -> dict[str, np.ndarray]:
    """All shards of one split, concatenated (``allow_pickle=False``: shards are plain arrays)."""
    files = sorted(Path(directory).glob("shard-*.npz"))
    if not files:
        raise FileNotFoundError(f"{directory}: no shard-*.npz files; run the pairs stage first")
    parts = []
    for f in files:
        with np.load(f, allow_pickle=False) as z:
            missing = [k for k in SHARD_KEYS if k not in z.files]
            if missing:
                raise ValueError(f"{f}: not a pairs shard (missing {missing})")
            parts.append({k: z[k] for k in SHARD_KEYS})
    return {k: np.concatenate([p[k] for p in parts]) for k in SHARD_KEYS}


def make_batch(input_ids: np.ndarray, len_a: np.ndarray, length: np.ndarray, labels: np.ndarray) -> PairBatch:
    """Tensors for one batch of packed rows, trimmed to its longest row (dynamic padding)."""
    width = int(length.max())
    ids = torch.from_numpy(np.ascontiguousarray(input_ids[:, :width])).long()
    pos = torch.arange(width).unsqueeze(0)  # (1, T)
    len_a_t = torch.from_numpy(len_a).long().unsqueeze(1)
    length_t = torch.from_numpy(length).long().unsqueeze(1)
    attention = pos < length_t
    segment = ((pos > len_a_t + 1) & attention).long()
    special = (ids == CLS_ID) | (ids == SEP_ID) | (ids == PAD_ID) | ~attention
    target = torch.from_numpy(np.ascontiguousarray(labels))
    if not target.is_floating_point():
        target = target.long()
    return PairBatch(ids, segment, attention, special, target)


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The example order of one epoch: a pure function of (seed, epoch), shared by every rank under DDP."""
    return np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)


def iterate_batches(
    data: dict[str, np.ndarray], batch_size: int, seed: int, epoch: int, shuffle: bool = True, start: int = 0
) -> Iterator[PairBatch]:
    """Batches in an order that is a pure function of (seed, epoch): resumable from batch ``start``."""
    n = len(data["labels"])
    order = epoch_order(n, seed, epoch, shuffle)
    for begin in range(start * batch_size, n, batch_size):
        idx = np.sort(order[begin : begin + batch_size])
        yield make_batch(*(data[k][idx] for k in SHARD_KEYS))


def n_batches(data: dict[str, np.ndarray], batch_size: int) -> int:
    return math.ceil(len(data["labels"]) / batch_size)
