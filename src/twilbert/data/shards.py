"""The on-disk format of the ROP pair shards, and their memory-mapped reader.

A pairs directory (the `pairs` stage's output)::

    manifest.json                  max_len, vocab_size, dtype, seed, the counts, and every shard of both splits;
                                   with a Hugging Face checkpoint's tokenizer, its ``template`` of special ids
    train/manifest.json            the train split's part of it: a split directory stands alone
    train/shard-00000.tokens.npy   (T,) uint16 (int32 past 65,536 pieces): each pair's a then b, no specials
    train/shard-00000.index.npy    (n, 3) uint32: where the pair starts in tokens, len(a), len(b)
    train/shard-00000.words.npy    with a Hugging Face checkpoint's tokenizer only (manifest ``word_starts``):
                                   (ceil(T / 8),) uint8, bit t (little-endian within a byte) set when token t
                                   starts a word (its tokenizer's word ids; each segment's first token does)
    heldout/...                    the same for the held-out split

Shard k holds the usable pairs of corpus rows [k * shard_size, (k+1) * shard_size) that fell in its
split, so the stage can resume after its last completed shard. Each pair is stored once, truncated to
max_len per segment and unpadded; its swapped negative is made when a batch is read: example 2i is
pair i in its order (ROP label 1), example 2i+1 the same pair swapped (label 0), as TWilBert's
70M pairs are its 140M examples. ``.npy`` files, so ``numpy.load(mmap_mode='r')`` maps them without
reading them, and memory does not grow with the corpus.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from twilbert.data.special import CLS_ID, PAD_ID, SEP_ID
from twilbert.errors import TwilbertError
from twilbert.io_utils import atomic_write, sha256_file

FORMAT = "twilbert-pairs/2"


class PairsDataError(TwilbertError, ValueError):
    """The pairs on disk, or the corpus they come from, cannot be used; the message says what to do."""
MANIFEST = "manifest.json"
SPLITS = ("train", "heldout")
INDEX_DTYPE = np.uint32  # start, len_a, len_b: a shard holds fewer than 2**32 tokens (checked on write)
MAX_OPEN_SHARDS = 128  # memory maps kept open at once (two file descriptors each)


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest integer type holding every piece id: uint16 up to 65,536 pieces, else int32."""
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.int32)


def shard_name(k: int) -> str:
    return f"shard-{k:05d}"


def _write_npy(fh, pieces: Sequence[np.ndarray]) -> str:
    """The concatenation of ``pieces`` along their first axis as ``np.save`` writes it (the same bytes),
    written piece by piece without building it: a shard never exists twice in memory. Returns its sha256."""
    dtype, row_shape = pieces[0].dtype, pieces[0].shape[1:]
    if any(piece.dtype != dtype or piece.shape[1:] != row_shape for piece in pieces):
        raise ValueError("shard pieces must share their dtype and all but their first dimension")
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                 "shape": (sum(len(piece) for piece in pieces), *row_shape)})
    digest = hashlib.sha256(header.getvalue())
    fh.write(header.getvalue())
    for piece in filter(len, pieces):  # an empty view cannot be cast to bytes, and adds none
        data = memoryview(np.ascontiguousarray(piece)).cast("B")
        digest.update(data)
        fh.write(data)
    return digest.hexdigest()


def pack_bits(flags: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The concatenation of the bool pieces ``flags`` as little-endian bits, 8 to a byte (the last byte
    zero-padded), packed piece by piece: the flags are never concatenated."""
    out, carry = [], np.zeros(0, dtype=bool)
    for piece in flags:
        bits = np.concatenate([carry, np.asarray(piece, dtype=bool)])
        whole = len(bits) - len(bits) % 8
        out.append(np.packbits(bits[:whole], bitorder="little"))
        carry = bits[whole:]
    out.append(np.packbits(carry, bitorder="little"))
    return out


def read_bits(packed: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Bits ``positions`` of a :func:`pack_bits` array, as bools."""
    positions = np.asarray(positions, dtype=np.int64)
    return ((np.asarray(packed[positions >> 3]) >> (positions & 7).astype(np.uint8)) & 1).astype(bool)


def write_shard(directory: Path, k: int, tokens: Sequence[np.ndarray], index: Sequence[np.ndarray],
                words: Optional[Sequence[np.ndarray]] = None) -> dict:
    """Write shard ``k`` of one split (each file atomically) from consecutive pieces of its tokens and
    of its (n, 3) index, and with ``words`` (bool pieces like the tokens') its word starts as bits;
    its manifest entry with the checksums."""
    n_tokens, n_rows = sum(len(t) for t in tokens), sum(len(i) for i in index)
    if n_tokens > np.iinfo(INDEX_DTYPE).max:
        raise PairsDataError(f"{directory}/{shard_name(k)}: {n_tokens} tokens exceed a shard's uint32 index; "
                             "lower pairs.shard_size")
    directory.mkdir(parents=True, exist_ok=True)
    entry = {"name": shard_name(k), "rows": n_rows, "tokens": n_tokens, "sha256": {}}
    index = [np.asarray(i, dtype=INDEX_DTYPE).reshape(-1, 3) for i in index] or [np.zeros((0, 3), INDEX_DTYPE)]
    entry["sample_sha256"] = {}
    parts = [("tokens", list(tokens)), ("index", index)]
    if words is not None:
        parts.append(("words", pack_bits(words)))
    for part, pieces in parts:
        path = directory / f"{entry['name']}.{part}.npy"
        with atomic_write(path, "wb") as fh:
            entry["sha256"][part] = _write_npy(fh, pieces)
        entry["sample_sha256"][part] = sampled_sha256(path)
    return entry


def write_json(path: Path, obj: dict) -> None:
    with atomic_write(path) as fh:
        fh.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_manifest(directory: Path) -> dict:
    """The manifest of a pairs directory or of one split directory; a clear error for the old format."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        old = list(directory.glob("shard-*.npz")) or list(directory.glob("*/shard-*.npz"))
        hint = ("it holds shards of an older twilbert (.npz); rerun the pairs stage (`dvc repro pairs`)" if old
                else "run the pairs stage first")
        raise FileNotFoundError(f"{path}: missing; {hint}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:  # truncated or overwritten
        what = f"line {err.lineno}: not valid JSON ({err.msg})" if isinstance(err, json.JSONDecodeError) else str(err)
        raise PairsDataError(f"{path}: {what}; rerun the pairs stage") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise PairsDataError(f"{path}: format {found!r}, expected {FORMAT!r}; rerun the pairs stage")
    return manifest


# --------------------------------------------------------------------------------------------
# Verifying shards against their manifest: cheaply at every pretraining start, fully on demand
# --------------------------------------------------------------------------------------------

SAMPLE_BLOCK = 4096  # bytes
SAMPLE_BLOCKS = 16  # evenly spaced blocks, the first and last included: 64 KiB read per file
STRUCTURE_SAMPLES = 8  # index rows (and their tokens) checked per shard by the quick check
VERIFY_CHUNK = 1 << 22  # index rows or tokens read at a time by the full check
FIX = "rerun the pairs stage (`dvc repro pairs`, or `python stages/pairs.py` after removing {where})"


def sampled_sha256(path: Path) -> str:
    """sha256 of SAMPLE_BLOCKS evenly spaced blocks of the file (all of it when that is less):
    a flipped byte in a small file, or in a sampled block of a large one, changes it."""
    size = Path(path).stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        if size <= SAMPLE_BLOCK * SAMPLE_BLOCKS:
            digest.update(fh.read())
        else:
            for i in range(SAMPLE_BLOCKS):
                fh.seek((size - SAMPLE_BLOCK) * i // (SAMPLE_BLOCKS - 1))
                digest.update(fh.read(SAMPLE_BLOCK))
    return digest.hexdigest()


def verify_pairs(pairs_dir: Path, vocab_size: Optional[int] = None, full: bool = False) -> int:
    """Check every shard of both splits against the manifests; raise PairsDataError naming the first
    damaged shard, else return the number of shards checked.

    Always: the split manifests agree with ``manifest.json``, every file has the size its ``.npy``
    header and the manifest imply, and its sampled checksum matches; in a few index rows per shard,
    each pair follows the previous one, ends inside the tokens, and its tokens are below the vocabulary
    size. ``full``: every byte's sha256 and every index row and token (reads the whole directory).
    """
    pairs_dir = Path(pairs_dir)
    top = read_manifest(pairs_dir)
    vocab_size = top["vocab_size"] if vocab_size is None else vocab_size
    checked = 0
    for split in SPLITS:
        directory = pairs_dir / split
        manifest = read_manifest(directory)
        if manifest.get("shards") != top["splits"][split]["shards"]:
            raise PairsDataError(f"{directory / MANIFEST}: its shards differ from those {pairs_dir / MANIFEST} lists "
                                 f"(edited by hand?); " + FIX.format(where=pairs_dir))
        for entry in manifest["shards"]:
            _check_shard(directory, entry, np.dtype(manifest["dtype"]), vocab_size, int(manifest["max_len"]), full,
                         FIX.format(where=pairs_dir), bool(manifest.get("word_starts")))
            checked += 1
    return checked


def _npy_shape(path: Path, dtype: np.dtype, fix: str) -> tuple[tuple, int]:
    """The array shape in ``path``'s header and the header's length; damage there is a PairsDataError."""
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, stored = read_header(fh)
            offset = fh.tell()
    except FileNotFoundError:
        raise PairsDataError(f"{path}: missing, but listed in {MANIFEST}; {fix}") from None
    except (ValueError, SyntaxError, EOFError) as err:
        raise PairsDataError(f"{path}: damaged .npy header ({err}); {fix}") from None
    if stored != dtype or fortran:
        raise PairsDataError(f"{path}: holds {stored} (fortran order {fortran}), {MANIFEST} says {dtype}; {fix}")
    return shape, offset


def _check_shard(directory: Path, entry: dict, dtype: np.dtype, vocab_size: int, max_len: int, full: bool,
                 fix: str, words: bool = False) -> None:
    name = entry["name"]
    expected = {"tokens": ((entry["tokens"],), dtype), "index": ((entry["rows"], 3), np.dtype(INDEX_DTYPE))}
    if words:
        expected["words"] = (((entry["tokens"] + 7) // 8,), np.dtype(np.uint8))
        if "words" not in entry["sha256"]:
            raise PairsDataError(f"{directory / MANIFEST}: {name} lists no word starts, but the manifest says its "
                                 f"shards have them; {fix}")
    for part, (shape, part_dtype) in expected.items():
        path = directory / f"{name}.{part}.npy"
        found, offset = _npy_shape(path, part_dtype, fix)
        if tuple(found) != shape:
            raise PairsDataError(f"{path}: holds an array of shape {tuple(found)}, {MANIFEST} says {shape}; {fix}")
        size = path.stat().st_size
        if size != offset + int(np.prod(shape)) * part_dtype.itemsize:
            raise PairsDataError(f"{path}: {size} bytes, not the {offset + int(np.prod(shape)) * part_dtype.itemsize} "
                                 f"its header and {MANIFEST} imply (truncated or extended); {fix}")
        if full:
            if sha256_file(path) != entry["sha256"][part]:
                raise PairsDataError(f"{path}: sha256 differs from {MANIFEST} (corrupt or changed); {fix}")
        elif part in entry.get("sample_sha256", {}) and sampled_sha256(path) != entry["sample_sha256"][part]:
            raise PairsDataError(f"{path}: sampled checksum differs from {MANIFEST} (corrupt or changed); {fix}")
    if entry["rows"]:
        _check_structure(directory, entry, vocab_size, max_len, full, fix, words)


def _check_structure(directory: Path, entry: dict, vocab_size: int, max_len: int, full: bool, fix: str,
                     words: bool = False) -> None:
    """Pairs lie one after the other from token 0 to the last, each segment 1..max_len tokens long,
    every token id below ``vocab_size``, and (``words``) each segment starts a word: on every row
    (``full``) or on sampled rows."""
    name = entry["name"]
    tokens = np.load(directory / f"{name}.tokens.npy", mmap_mode="r", allow_pickle=False)
    index = np.load(directory / f"{name}.index.npy", mmap_mode="r", allow_pickle=False)
    starts = np.load(directory / f"{name}.words.npy", mmap_mode="r", allow_pickle=False) if words else None
    rows = len(index)
    if full:
        spans = [(b, min(b + VERIFY_CHUNK, rows)) for b in range(0, rows, VERIFY_CHUNK)]
    else:  # a few short runs of consecutive rows, the first and the last included
        picks = np.unique(np.linspace(0, rows - 1, num=min(rows, STRUCTURE_SAMPLES)).astype(np.int64))
        spans = [(int(r), min(int(r) + 2, rows)) for r in picks]
    previous_end = 0  # the full check reads chunk after chunk: each starts where the last ended
    for begin, end in spans:
        start, la, lb = np.asarray(index[begin:end], dtype=np.int64).T
        ends = start + la + lb
        problem = None
        if (begin == 0 or full) and start[0] != previous_end:
            problem = f"the pair starts at token {start[0]}, not {previous_end} where the previous one ends"
        elif (la < 1).any() or (lb < 1).any() or (la > max_len).any() or (lb > max_len).any():
            problem = f"a segment length outside 1..{max_len}"
        elif (start[1:] != ends[:-1]).any():
            problem = "a pair does not start where the previous one ends"
        elif end == rows and ends[-1] != len(tokens):
            problem = f"the last pair ends at token {ends[-1]}, the shard holds {len(tokens)}"
        elif ends.max() > len(tokens):
            problem = f"a pair ends at token {ends.max()}, past the shard's {len(tokens)}"
        if problem:
            raise PairsDataError(f"{directory / name}.index.npy: rows {begin}..{end - 1}: {problem}; {fix}")
        if starts is not None and not read_bits(starts, np.concatenate([start, start + la])).all():
            raise PairsDataError(f"{directory / name}.words.npy: rows {begin}..{end - 1}: a segment's first token "
                                 f"is not marked as a word start; {fix}")
        if full:
            previous_end = int(ends[-1])
            continue
        ids = tokens[concat_ranges(start, la + lb)]
        if len(ids) and int(ids.max()) >= vocab_size:
            raise PairsDataError(f"{directory / name}.tokens.npy: token id {int(ids.max())} is not below the "
                                 f"vocabulary size {vocab_size}; {fix}")
    if full:
        for begin in range(0, len(tokens), VERIFY_CHUNK):
            top = int(np.max(tokens[begin:begin + VERIFY_CHUNK]))
            if top >= vocab_size:
                raise PairsDataError(f"{directory / name}.tokens.npy: token id {top} is not below the vocabulary "
                                     f"size {vocab_size}; {fix}")


def verify_shards(directory: Path) -> list[str]:
    """Shards of a split directory whose files do not match the manifest's sha256 (reads every byte)."""
    manifest = read_manifest(directory)
    bad = []
    for entry in manifest["shards"]:
        for part, digest in entry["sha256"].items():
            path = Path(directory) / f"{entry['name']}.{part}.npy"
            if sha256_file(path) != digest:
                bad.append(path.name)
    return bad


def concat_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(s, s + n)`` for each (s, n), without a Python loop."""
    total = int(lengths.sum())
    within = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.repeat(starts.astype(np.int64), lengths) + within


class PairShards:
    """The examples of one split, read from memory-mapped shards; nothing is loaded up front.

    ``len()`` is the number of examples (two per pair); ``take(idx)`` packs the examples ``idx``
    into ``[CLS] a [SEP] b [SEP]`` rows (:data:`PACKED_KEYS`), the negatives swapped on the fly.
    Shards are opened on first use and at most :data:`MAX_OPEN_SHARDS` stay open.
    """

    def __init__(self, directory: Path, manifest: Optional[dict] = None):
        self.directory = Path(directory)
        self.manifest = manifest or read_manifest(self.directory)
        self.shards = [s for s in self.manifest["shards"] if s["rows"]]
        # a stat per file: a truncated or missing shard fails now, not mid-epoch
        # a checkpoint's tokenizer: the word starts whole-word masking reads (the ``words`` files)
        self.word_starts = bool(self.manifest.get("word_starts"))
        self._parts = ("tokens", "index", "words") if self.word_starts else ("tokens", "index")
        for entry in self.shards:
            sizes = {"tokens": (entry["tokens"], np.dtype(self.manifest["dtype"]).itemsize),
                     "index": (entry["rows"], 12), "words": ((entry["tokens"] + 7) // 8, 1)}
            for part in self._parts:
                path = self.directory / f"{entry['name']}.{part}.npy"
                count, width = sizes[part]
                if not path.is_file() or path.stat().st_size < count * width:
                    raise PairsDataError(f"{path}: missing or shorter than the {count} entries {MANIFEST} lists; "
                                     "rerun the pairs stage")
        rows = np.array([s["rows"] for s in self.shards], dtype=np.int64)
        self._first = np.concatenate([[0], np.cumsum(rows)])  # (n_shards + 1,) first pair of each shard
        self.pairs = int(self._first[-1])
        self.max_len = int(self.manifest["max_len"])
        # The special ids around a pair: twilbert's [CLS] a [SEP] b [SEP], or a checkpoint's (its manifest's template)
        saved = self.manifest.get("template")
        self.prefix, self.middle, self.suffix = (tuple(saved["pair"][0]), tuple(saved["pair"][1]), tuple(
            saved["pair"][2])) if saved else ((CLS_ID,), (SEP_ID,), (SEP_ID,))
        self.pad_id = int(saved["pad_id"]) if saved else PAD_ID
        self._specials = len(self.prefix) + len(self.middle) + len(self.suffix)  # a packed row's ids beyond its pieces
        self._open: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()  # batches are read on a prefetch thread

    def __len__(self) -> int:
        return 2 * self.pairs

    def arrays(self, s: int) -> tuple[np.ndarray, ...]:
        """(tokens, index[, words]) of shard ``s``, memory-mapped (read-only)."""
        with self._lock:
            if s in self._open:
                self._open.move_to_end(s)
                return self._open[s]
            name = self.shards[s]["name"]
            maps = tuple(np.load(self.directory / f"{name}.{part}.npy", mmap_mode="r", allow_pickle=False)
                         for part in self._parts)
            self._open[s] = maps
            if len(self._open) > MAX_OPEN_SHARDS:
                self._open.popitem(last=False)
            return maps

    def open_arrays(self) -> list[np.ndarray]:
        """Every array currently held (for tests: they must all be memory maps)."""
        with self._lock:
            return [a for maps in self._open.values() for a in maps]

    def originals(self, n: int) -> np.ndarray:
        """The first ``n`` examples in their original order (label 1): one per pair."""
        return np.arange(0, 2 * min(n, self.pairs), 2, dtype=np.int64)

    def lengths(self, idx: np.ndarray) -> np.ndarray:
        """Row lengths (tokens, specials included) of examples ``idx``, from the index alone: a pair and
        its swapped negative have the same length."""
        pair = np.asarray(idx, dtype=np.int64) >> 1
        shard = np.searchsorted(self._first, pair, side="right") - 1
        out = np.zeros(len(pair), dtype=np.int64)
        for s in np.unique(shard):
            rows = np.flatnonzero(shard == s)
            index = self.arrays(int(s))[1]
            segments = np.asarray(index[pair[rows] - self._first[s], 1:], dtype=np.int64)  # (k, 2) len(a), len(b)
            out[rows] = segments.sum(axis=1) + self._specials
        return out

    @property
    def template(self):
        """The ``data.batch.Template`` these rows are packed in (``make_batch`` places segments with it)."""
        from twilbert.data.batch import Template  # torch: not for the data stages

        return Template(single=(self.prefix, self.suffix), pair=(self.prefix, self.middle, self.suffix),
                        pad_id=self.pad_id)

    def take(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """Packed rows of examples ``idx``: input_ids (B, W) with W the longest row, len_a, length, labels,
        and with word starts in the shards ``word_start`` (B, W) bool (False on specials and padding)."""
        idx = np.asarray(idx, dtype=np.int64)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"{self.directory}: example index outside 0..{len(self) - 1}")
        pair, swapped = idx >> 1, (idx & 1).astype(bool)
        shard = np.searchsorted(self._first, pair, side="right") - 1
        first_len = np.zeros(len(idx), dtype=np.int64)
        second_len = np.zeros(len(idx), dtype=np.int64)
        groups = []
        for s in np.unique(shard):
            rows = np.flatnonzero(shard == s)
            tokens, index, *words = self.arrays(int(s))
            start, la, lb = np.asarray(index[pair[rows] - self._first[s]], dtype=np.int64).T
            sw = swapped[rows]
            # a positive reads (a, b); a negative (b, a): the same bytes, the other order
            s1, l1 = np.where(sw, start + la, start), np.where(sw, lb, la)
            s2, l2 = np.where(sw, start, start + la), np.where(sw, la, lb)
            first_len[rows], second_len[rows] = l1, l2
            groups.append((rows, tokens, words[0] if words else None, s1, l1, s2, l2))
        n_p, n_m, n_s = len(self.prefix), len(self.middle), len(self.suffix)
        length = first_len + second_len + n_p + n_m + n_s
        ids = np.full((len(idx), int(length.max()) if len(idx) else 0), self.pad_id, dtype=np.int64)
        every = np.arange(len(idx))
        for part, start in ((self.prefix, 0), (self.middle, first_len + n_p), (self.suffix, length - n_s)):
            for k, token in enumerate(part):
                ids[every, start + k] = token
        word_start = np.zeros(ids.shape, dtype=bool) if self.word_starts else None
        for rows, tokens, words, s1, l1, s2, l2 in groups:
            for starts, lens, offset in ((s1, l1, n_p), (s2, l2, l1 + n_p + n_m)):
                where = np.repeat(rows, lens)
                col = concat_ranges(np.broadcast_to(offset, lens.shape), lens)
                source = concat_ranges(starts, lens)
                ids[where, col] = tokens[source]
                if words is not None:
                    word_start[where, col] = read_bits(words, source)
        out = {"input_ids": ids, "len_a": first_len, "length": length, "labels": (~swapped).astype(np.int64)}
        if word_start is not None:
            out["word_start"] = word_start
        return out
