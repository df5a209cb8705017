"""Reply-order prediction (ROP) pairs: tokenized from the corpus into shards, read back as batches.

Each (tweet, reply) pair yields a positive in its order (label 1) and a negative with the two
swapped (label 0), as TWilBert does; the shards store each pair once and the negative is made when
a batch is read (``shards.PairShards``). A text with no reply is split into two contiguous segments
at a seeded token boundary (ALBERT's sentence-order prediction), so the same objective trains.
Masking is not done here: it is dynamic, drawn at train time.

The build streams the corpus in chunks through ``workers`` tokenizer processes and writes each shard
of ``shard_size`` corpus rows as soon as it is complete. Whatever depends on chance is a pure
function of (seed, corpus row): whether a row is held out, where a text is cut. So the shards are
the same bytes whatever the number of workers or the chunking, and a killed run resumes after its
last completed shard.
"""

from __future__ import annotations

import gc
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import shutil
import signal
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

from twilbert.data.shards import (
    FORMAT,
    MANIFEST,
    SPLITS,
    PairsDataError,
    PairShards,
    concat_ranges,
    read_manifest,
    token_dtype,
    write_json,
    write_shard,
)
from twilbert.data.tokenizer import Tokenizer
from twilbert.io_utils import publish_built, sha256_file

log = logging.getLogger(__name__)

CHUNK_ROWS = 2048  # corpus rows per tokenizer task
JOURNAL = "journal.json"  # the completed shards of an unfinished build, in its staging directory
# Test hook: SIGKILL the pairs build right after shard k is journaled (tests/test_pairs.py). Never set it otherwise.
KILL_HOOK_ENV = "TWILBERT_TEST_KILL_AFTER_PAIRS_SHARD"

# --------------------------------------------------------------------------------------------
# Chance as a function of (seed, row): held-out split and the cut of a text without reply
# --------------------------------------------------------------------------------------------

_HELDOUT_STREAM, _CUT_STREAM = 0, 1


def row_hash(seed: int, rows: np.ndarray, stream: int) -> np.ndarray:
    """64 well-mixed bits per corpus row (splitmix64 of the row keyed by (seed, stream)), vectorized."""
    key = np.random.SeedSequence([seed, stream]).generate_state(1, np.uint64)[0]
    with np.errstate(over="ignore"):  # the arithmetic is modulo 2**64 on purpose
        z = np.asarray(rows, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) + key
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def heldout_rows(seed: int, rows: np.ndarray, fraction: float) -> np.ndarray:
    """Whether each corpus row belongs to the held-out split: a seeded coin of probability ``fraction``."""
    uniform = (row_hash(seed, rows, _HELDOUT_STREAM) >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return uniform < fraction


def sop_cuts(seed: int, rows: np.ndarray, n_tokens: np.ndarray) -> np.ndarray:
    """Where a text of ``n_tokens`` (>= 2) is cut into two non-empty segments: in 1 .. n_tokens - 1."""
    span = np.maximum(np.asarray(n_tokens, dtype=np.int64) - 1, 1).astype(np.uint64)
    return (row_hash(seed, rows, _CUT_STREAM) % span).astype(np.int64) + 1


def _flat(ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    return np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum())), lengths


@dataclass(frozen=True)
class PairParams:
    max_len: int
    heldout_fraction: float
    seed: int
    dtype: str
    word_starts: bool = False  # a checkpoint's tokenizer: keep each token's word start (whole-word masking)


def tokenize_chunk(tokenizer: Tokenizer, first_row: int, rows: list[tuple[str, Optional[str]]],
                   params: PairParams) -> dict:
    """The pairs of corpus rows ``first_row, first_row + 1, ...``: per split, the flat tokens of each
    pair's a then b (each cut to max_len) and its (start, len_a, len_b), and with ``params.word_starts``
    whether each token starts a word (each segment's first token does); plus the chunk's counts."""
    n = len(rows)
    row_ids = np.arange(first_row, first_row + n, dtype=np.int64)
    has_reply = np.fromiter((b is not None for _, b in rows), dtype=bool, count=n)
    texts, replies = [a for a, _ in rows], [b for _, b in rows if b is not None]
    if params.word_starts:
        (text_ids, text_words), (reply_ids, reply_words) = tokenizer.encode_words(texts), tokenizer.encode_words(replies)
        words_source = np.concatenate([text_words, reply_words])  # (tokens,) bool, as source below
    else:
        text_ids, reply_ids = tokenizer.encode(texts), tokenizer.encode(replies)
    text, text_len = _flat(text_ids)
    reply, reply_len = _flat(reply_ids)
    source = np.concatenate([text, reply])  # replies follow the texts
    text_start = np.cumsum(text_len) - text_len
    reply_start = np.zeros(n, dtype=np.int64)
    reply_start[has_reply] = len(text) + np.cumsum(reply_len) - reply_len
    full_reply_len = np.zeros(n, dtype=np.int64)
    full_reply_len[has_reply] = reply_len

    cut = sop_cuts(params.seed, row_ids, text_len)
    usable = has_reply | (text_len >= 2)  # one token without a reply cannot be put in two orders
    a_start = text_start
    a_len = np.where(has_reply, text_len, cut)
    b_start = np.where(has_reply, reply_start, text_start + cut)
    b_len = np.where(has_reply, full_reply_len, text_len - cut)
    a_len, b_len = np.minimum(a_len, params.max_len), np.minimum(b_len, params.max_len)

    heldout = heldout_rows(params.seed, row_ids, params.heldout_fraction)
    out = {"rows": n, "skipped_short": int((~usable).sum()), "corpus_tokens": int(text_len.sum() + reply_len.sum())}
    for split, member in (("train", usable & ~heldout), ("heldout", usable & heldout)):
        la, lb = a_len[member], b_len[member]
        starts = np.stack([a_start[member], b_start[member]], 1).ravel()  # a0 b0 a1 b1 ...
        lens = np.stack([la, lb], 1).ravel()
        taken = concat_ranges(starts, lens)
        tokens = source[taken].astype(params.dtype)
        index = np.stack([np.cumsum(la + lb) - (la + lb), la, lb], 1)
        out[split] = (tokens, index)
        if params.word_starts:
            words = words_source[taken]
            words[np.cumsum(lens) - lens] = True  # a segment cut inside a word (SOP cut, max_len) starts one
            out[split] = (tokens, index, words)
    return out


_worker_tokenizer: Optional[Tokenizer] = None


def _init_worker(vocab_dir: str) -> None:
    global _worker_tokenizer
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the parent, which ends the pool
    from twilbert.data.hf_vocab import open_vocab  # twilbert's SentencePiece or a checkpoint's tokenizer

    _worker_tokenizer = open_vocab(Path(vocab_dir), num_threads=1)  # the workers are the parallelism


def _tokenize_in_worker(first_row: int, rows: list, params: PairParams) -> dict:
    return tokenize_chunk(_worker_tokenizer, first_row, rows, params)


def resolve_workers(workers: Optional[int]) -> int:
    """``pairs.workers``: None or 0 means one per core this process may run on."""
    if workers:
        return workers
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


# --------------------------------------------------------------------------------------------
# Building the shards: streamed, parallel, resumable, published atomically
# --------------------------------------------------------------------------------------------


def _chunks(rows: Iterator, first_shard: int, shard_size: int, chunk_rows: int):
    """(shard, first row, rows, last chunk of its shard?) from shard ``first_shard`` on."""
    shard, row = first_shard, first_shard * shard_size
    while True:
        left, pending = shard_size, None
        while left:
            part = list(itertools.islice(rows, min(chunk_rows, left)))
            if not part:
                break
            if pending:
                yield (*pending, False)
            pending = (shard, row, part)
            row, left = row + len(part), left - len(part)
        if pending is None:
            return
        yield (*pending, True)
        if left:
            return
        shard += 1


class _ShardBuffer:
    """The pairs of the shard being filled, per split, until its last chunk is in."""

    def __init__(self):
        self.parts = {split: [] for split in SPLITS}
        self.counts = {"rows": 0, "skipped_short": 0, "corpus_tokens": 0}

    def add(self, result: dict) -> None:
        for split in SPLITS:
            self.parts[split].append(result[split])
        for key in self.counts:
            self.counts[key] += result[key]

    def pieces(self, split: str) -> tuple:
        """The chunks' tokens and their index rows, whose starts now count from the shard's first token,
        and their word starts when kept: written one after the other, never concatenated (a shard is
        not held twice)."""
        tokens = [part[0] for part in self.parts[split]]
        offsets = np.cumsum([0] + [len(t) for t in tokens[:-1]])
        index = [part[1] + np.array([o, 0, 0]) for part, o in zip(self.parts[split], offsets)]
        if self.parts[split] and len(self.parts[split][0]) == 3:
            return tokens, index, [part[2] for part in self.parts[split]]
        return tokens, index


def _vocab_digest(tokenizer: Tokenizer) -> str:
    h = hashlib.sha256()
    for name in getattr(tokenizer, "files", ("spm.model", "meta.json")):  # a checkpoint's tokenizer lists its own
        h.update((tokenizer.vocab_dir / name).read_bytes())
    return h.hexdigest()


def build_pair_shards(
    corpus: Iterable[tuple[str, Optional[str]]],
    tokenizer: Tokenizer,
    out_dir: Path,
    max_len: int,
    heldout_fraction: float,
    shard_size: int,
    seed: int,
    workers: int = 1,
    source_id: Optional[str] = None,
    chunk_rows: int = CHUNK_ROWS,
) -> dict:
    """Tokenize the corpus rows into ROP pair shards under ``out_dir``, published atomically.

    ``corpus`` is streamed; ``workers`` processes tokenize chunks of ``chunk_rows`` rows (1: in this
    process). Shards are staged in ``.<out_dir>.partial`` beside ``out_dir`` and journaled one by
    one; a rerun with the same inputs (``source_id`` names the corpus version, e.g. path, size and
    mtime; None never resumes) continues after the last journaled shard. Returns the summary that
    ``manifest.json`` holds.
    """
    out_dir = Path(out_dir)
    dtype = token_dtype(tokenizer.vocab_size)
    template = getattr(tokenizer, "template_json", None)  # a checkpoint's special ids (shards.PairShards packs with them)
    params = PairParams(max_len, heldout_fraction, seed, dtype.name, word_starts=template is not None)
    identity = {"format": FORMAT, "max_len": max_len, "heldout_fraction": heldout_fraction,
                "shard_size": shard_size, "seed": seed, "vocab": _vocab_digest(tokenizer), "source": source_id}
    if template is not None:
        identity["template"] = template
        identity["word_starts"] = True  # twilbert's own shards: no key, their bytes as before
    staging = out_dir.parent / f".{out_dir.name}.partial"
    done = _resume(staging, identity)
    shards: list[dict] = done["shards"]
    if shards:
        log.info("pairs: resuming after shard %d of an earlier run (%s)", len(shards) - 1, staging)
    rows = iter(corpus)
    for _ in itertools.islice(rows, len(shards) * shard_size):  # rows of completed shards: already written
        pass

    chunks = _chunks(rows, len(shards), shard_size, chunk_rows)
    buffer = _ShardBuffer()

    def consume(shard: int, result: dict, last: bool) -> None:
        nonlocal buffer
        buffer.add(result)
        if not last:
            return
        entry = {"shard": shard, **buffer.counts}
        for split in SPLITS:
            entry[split] = write_shard(staging / split, shard, *buffer.pieces(split))
        shards.append(entry)
        write_json(staging / JOURNAL, {"identity": identity, "shards": shards})
        log.info("pairs: shard %d: %d rows -> %d train, %d held-out pairs", shard, entry["rows"],
                 entry["train"]["rows"], entry["heldout"]["rows"])
        buffer = _ShardBuffer()
        hook = os.environ.get(KILL_HOOK_ENV)
        if hook and int(hook) == shard:
            logging.shutdown()
            os.kill(os.getpid(), signal.SIGKILL)

    staging.mkdir(parents=True, exist_ok=True)
    # The objects the imports left (~250k when torch was among them) stay shared with the forked workers only
    # while no process writes their pages. A full collection writes the header of every object it
    # visits, and the chunks' survivors trigger one after a few hundred chunks, in each process: the
    # tree's memory then jumped by those pages, once per process (measured: +40% from 250k to 1M
    # rows). Frozen, the collector never visits them, and the memory stays flat.
    gc.freeze()
    try:
        if workers <= 1:
            for shard, first, part, last in chunks:
                consume(shard, tokenize_chunk(tokenizer, first, part, params), last)
        else:
            # fork: the workers need nothing of the parent but the vocabulary path; ordered results,
            # at most 2 chunks per worker in flight, so memory does not grow with the corpus.
            start = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            ctx = multiprocessing.get_context(start)
            with ctx.Pool(workers, initializer=_init_worker, initargs=(str(tokenizer.vocab_dir),)) as pool:
                in_flight: deque = deque()
                for shard, first, part, last in chunks:
                    in_flight.append((shard, last, pool.apply_async(_tokenize_in_worker, (first, part, params))))
                    if len(in_flight) >= 2 * workers:
                        shard_, last_, result = in_flight.popleft()
                        consume(shard_, result.get(), last_)
                while in_flight:
                    shard_, last_, result = in_flight.popleft()
                    consume(shard_, result.get(), last_)
    finally:
        gc.unfreeze()
    return _publish(staging, out_dir, shards, identity, tokenizer.vocab_size, dtype)


def _resume(staging: Path, identity: dict) -> dict:
    """The journal of an unfinished build of the same inputs, or a fresh start (staging emptied)."""
    journal = staging / JOURNAL
    if identity["source"] is not None and journal.is_file():
        try:
            saved = json.loads(journal.read_text(encoding="utf-8"))
        except ValueError:
            saved = {}
        if saved.get("identity") == identity:
            return {"shards": _intact_prefix(staging, saved["shards"])}
        log.warning("pairs: %s belongs to a build of other inputs or settings; starting fresh", staging)
    if staging.exists():
        shutil.rmtree(staging)
    return {"shards": []}


def _intact_prefix(staging: Path, shards: list[dict]) -> list[dict]:
    """The journaled shards up to the first whose files no longer match their sha256 (every byte read:
    a resume must not publish a shard damaged while the build was stopped); that one is rebuilt."""
    for i, entry in enumerate(shards):
        for split in SPLITS:
            for part, digest in entry[split]["sha256"].items():
                path = staging / split / f"{entry[split]['name']}.{part}.npy"
                if not path.is_file() or sha256_file(path) != digest:
                    log.warning("pairs: %s differs from the journal (damaged while the build was stopped); "
                                "rebuilding from shard %d", path, i)
                    return shards[:i]
    return shards


def _publish(staging: Path, out_dir: Path, shards: list[dict], identity: dict, vocab_size: int,
             dtype: np.dtype) -> dict:
    totals = {key: sum(s[key] for s in shards) for key in ("rows", "skipped_short", "corpus_tokens")}
    common = {"format": FORMAT, "max_len": identity["max_len"], "vocab_size": vocab_size, "dtype": dtype.name,
              "seed": identity["seed"], "heldout_fraction": identity["heldout_fraction"],
              "shard_size": identity["shard_size"]}
    for key in ("template", "word_starts"):
        if key in identity:
            common[key] = identity[key]
    splits = {}
    for split in SPLITS:
        entries = [s[split] for s in shards]
        pairs = sum(e["rows"] for e in entries)
        splits[split] = {"pairs": pairs, "examples": 2 * pairs, "tokens": sum(e["tokens"] for e in entries),
                         "shards": entries}
    if splits["train"]["pairs"] == 0:
        raise PairsDataError("pairs: no training pairs (every text is shorter than two tokens, the corpus is empty, "
                         "or every pair fell in the held-out split: lower pairs.heldout_fraction)")
    if identity["heldout_fraction"] > 0 and splits["heldout"]["pairs"] == 0:
        log.warning("pairs: no pair fell in the held-out split (corpus too small for pairs.heldout_fraction=%s); "
                    "pretraining reports no held-out metrics", identity["heldout_fraction"])
    manifest = {**common, "corpus_rows": totals["rows"], "skipped_short": totals["skipped_short"],
                "corpus_tokens": totals["corpus_tokens"], "pairs": sum(s["pairs"] for s in splits.values()),
                "splits": splits}
    for split in SPLITS:
        (staging / split).mkdir(parents=True, exist_ok=True)
        write_json(staging / split / MANIFEST, {**common, "split": split, **splits[split]})
    write_json(staging / MANIFEST, manifest)
    (staging / JOURNAL).unlink()
    publish_built(staging, out_dir)  # never a moment without a complete data/pairs
    summary = {"pairs": manifest["pairs"], "skipped_short": totals["skipped_short"], "max_len": common["max_len"],
               "seed": common["seed"], "vocab_size": vocab_size, "dtype": dtype.name,
               "corpus_rows": totals["rows"], "corpus_tokens": totals["corpus_tokens"]}
    for split in SPLITS:
        summary[f"{split}_examples"] = splits[split]["examples"]
        summary[f"{split}_shards"] = len(splits[split]["shards"])
    log.info("pairs: %s", summary)
    return summary


# --------------------------------------------------------------------------------------------
# Reading the shards back (batching: data/batch.py)
# --------------------------------------------------------------------------------------------


def load_shards(directory: Path) -> PairShards:
    """The examples of one split directory (``data/pairs/train``), memory-mapped: nothing is read yet."""
    return PairShards(Path(directory), read_manifest(Path(directory)))
