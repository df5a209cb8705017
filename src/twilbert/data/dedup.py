"""Exact-duplicate removal for tweet dumps (retweets, copy-pastes): rows match when their texts do after
casefolding, collapsing whitespace, placeholders for @users and URLs, and dropping a leading ``RT @user:``.
Only an 8-byte BLAKE2b digest of that key is kept, in an open-addressing table of uint64 slots (linear
probing, at most 70% full). Memory is bounded whatever the corpus (:class:`Deduplicator`): the table has a
fixed size (128 MB, the first ~11.7M distinct rows); once it is full it only answers for those rows, and
the later rows' digests go to DuckDB, which spills past its memory limit and names their later copies
when the stream ends; those lines are then cut from the written file. Two rows share a digest with
probability ~n²/2⁶⁵ (3·10⁻⁴ for 10⁸ rows): one row dropped by mistake."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np

DIGEST_BYTES = 8
MAX_LOAD = 0.7
GROW_BLOCK = 1 << 16  # slots rehashed at a time when the table doubles
MEMORY_SLOTS = 1 << 24  # the Deduplicator's table: 128 MB, allocated once (pages are touched as it fills)
COMPACT_BLOCK = 1 << 23  # bytes read at a time while later copies are cut from the written file
# Simpler than the preprocessing's entity patterns (twilbert.data.preprocess), and several times
# faster: a duplicate needs the same text around its entities, not exact entity boundaries.
_URL = re.compile(r"(?:https?://|www\.)\S*")
_USER = re.compile(r"@\w+")
_RETWEET = re.compile(r"^rt @user:? ?")


def normalized(text: str) -> str:
    """The form of a text that duplicates share: ``RT @Ana: Hola  https://t.co/x`` -> ``hola url``."""
    text = " ".join(text.casefold().split())
    if "://" in text or "www." in text:  # the cheap test first: most tweets hold no URL
        text = _URL.sub("url", text)
    if "@" in text:
        text = _USER.sub("@user", text)
    return _RETWEET.sub("", text) if text.startswith("rt @") else text


def row_digests(rows: Sequence[tuple[str, Optional[str]]]) -> np.ndarray:
    """One uint64 digest per ``(text, reply or None)`` row; never 0 (the table's empty slot)."""
    blob = bytearray()
    for a, b in rows:
        key = normalized(a) if b is None else f"{normalized(a)}\n{normalized(b)}"  # '\n' never survives normalizing
        blob += hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=DIGEST_BYTES).digest()
    digests = np.frombuffer(bytes(blob), dtype="<u8").astype(np.uint64)
    digests[digests == 0] = 1
    return digests


class DigestSet:
    """A growing set of nonzero uint64 digests; :meth:`add` inserts a batch with numpy, not per row."""

    def __init__(self, capacity: int = 1 << 16):
        self.slots = np.zeros(1 << max(4, (capacity - 1).bit_length()), dtype=np.uint64)
        self.count = 0

    def __len__(self) -> int:
        return self.count

    @property
    def nbytes(self) -> int:
        return self.slots.nbytes

    def add(self, digests: np.ndarray) -> np.ndarray:
        """Insert ``digests``; True where a digest is new: not in the set, nor earlier in the batch."""
        digests = np.asarray(digests, dtype=np.uint64)
        unique, first = np.unique(digests, return_index=True)
        while self.count + len(unique) > MAX_LOAD * len(self.slots):
            self._grow()
        inserted = self._insert(unique)
        self.count += int(inserted.sum())
        new = np.zeros(len(digests), dtype=bool)
        new[first[inserted]] = True
        return new

    def contains(self, digests: np.ndarray) -> np.ndarray:
        """True where a digest is in the set; the set is left as it is."""
        keys = np.asarray(digests, dtype=np.uint64)
        mask = np.uint64(len(self.slots) - 1)
        pos = (keys & mask).astype(np.int64)
        found = np.zeros(len(keys), dtype=bool)
        pending = np.arange(len(keys))
        while pending.size:
            held = self.slots[pos[pending]]
            hit = held == keys[pending]
            found[pending[hit]] = True
            pending = pending[~hit & (held != 0)]  # an empty slot ends the probe: not there
            pos[pending] = (pos[pending] + 1) & int(mask)
        return found

    def _insert(self, keys: np.ndarray) -> np.ndarray:
        """Linear probing for distinct ``keys`` at once; True where a key was not there and is now."""
        slots = self.slots
        mask = np.uint64(len(slots) - 1)
        pos = (keys & mask).astype(np.int64)
        inserted = np.zeros(len(keys), dtype=bool)
        pending = np.arange(len(keys))
        while pending.size:
            at = pos[pending]
            held = slots[at]
            done = held == keys[pending]  # already in the set
            empty = np.flatnonzero(held == 0)
            # Several keys may reach the same empty slot: the first takes it, the others probe on.
            _, winners = np.unique(at[empty], return_index=True)
            won = empty[winners]
            slots[at[won]] = keys[pending[won]]
            inserted[pending[won]] = True
            done[won] = True
            pending = pending[~done]
            pos[pending] = (pos[pending] + 1) & int(mask)
        return inserted

    def _grow(self) -> None:
        # Rehashed a block at a time: beside the old and new tables, memory holds one block's keys.
        old = self.slots
        self.slots = np.zeros(2 * len(old), dtype=np.uint64)
        for start in range(0, len(old), GROW_BLOCK):
            block = old[start : start + GROW_BLOCK]
            self._insert(block[block != 0])


class Deduplicator:
    """Which rows of a stream come first with their digest, in bounded memory: :meth:`add` answers for
    a batch of rows in stream order, True for each row to write now. The first ``0.7 * slots`` distinct
    digests fill a fixed :class:`DigestSet`; after that it only drops rows it holds, and the others are
    written and noted (their line in the output, digest and whether they have a reply) in a DuckDB
    table, from which :meth:`later_copies` names the lines to cut once the stream ends. The rows kept
    are exactly those a set of every digest would keep."""

    def __init__(self, workdir: Path, slots: Optional[int] = None, memory_limit: str = "768MB"):
        self.seen = DigestSet(capacity=slots or MEMORY_SLOTS)
        self.room = int(MAX_LOAD * len(self.seen.slots))
        self.workdir, self.memory_limit = Path(workdir), memory_limit
        self.lines = 0  # rows answered True so far: the next kept row's line in the output
        self.first_spilled_line: Optional[int] = None
        self._tmp: Optional[tempfile.TemporaryDirectory] = None
        self._con = None

    def add(self, digests: np.ndarray, replies: np.ndarray) -> np.ndarray:
        digests = np.asarray(digests, dtype=np.uint64)
        if self._con is None and self.seen.count + len(np.unique(digests)) <= self.room:
            keep = self.seen.add(digests)
        else:
            keep = ~self.seen.contains(digests)
            self._note(digests[keep], np.asarray(replies, dtype=bool)[keep])
        self.lines += int(keep.sum())
        return keep

    def _note(self, digests: np.ndarray, replies: np.ndarray) -> None:
        import pandas as pd  # imported here: most corpora never fill the table

        if self._con is None:
            import duckdb

            self._tmp = tempfile.TemporaryDirectory(prefix=".dedup-", dir=self.workdir)
            self._con = duckdb.connect(":memory:", config={
                "threads": os.cpu_count() or 1, "memory_limit": self.memory_limit,
                "temp_directory": str(Path(self._tmp.name) / "spill"), "preserve_insertion_order": False,
            })
            self._con.execute("SET enable_progress_bar = false")
            self._con.execute("CREATE TABLE noted (line UBIGINT, h UBIGINT, reply BOOLEAN)")
            self.first_spilled_line = self.lines
        lines = np.arange(self.lines, self.lines + len(digests), dtype=np.uint64)
        self._con.append("noted", pd.DataFrame({"line": lines, "h": digests, "reply": replies}))

    @property
    def spilled(self) -> bool:
        return self._con is not None

    def later_copies(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Batches of (lines, has reply), in line order: the noted rows whose digest an earlier noted row has."""
        if self._con is None:
            return
        result = self._con.execute(
            "WITH firsts AS (SELECT h, min(line) AS first FROM noted GROUP BY h HAVING count(*) > 1) "
            "SELECT line, reply FROM noted JOIN firsts USING (h) WHERE line > first ORDER BY line"
        )
        while len(batch := result.fetch_df_chunk(64)):
            yield batch["line"].to_numpy(np.int64), batch["reply"].to_numpy(bool)

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> "Deduplicator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def cut_lines(fd: int, offset: int, first_line: int, cuts: Iterable[np.ndarray]) -> None:
    """Remove lines, in place, from the file open as ``fd`` (read and write): ``cuts`` are batches of
    line numbers in increasing order, counted from ``first_line``, the line that starts at byte
    ``offset``. Kept bytes move towards the start, never onto a byte not yet read; the file is then
    truncated. A few MB of the file are held at a time."""
    cuts = iter(cuts)
    pending, exhausted = np.zeros(0, dtype=np.int64), False
    read_at = write_at = offset
    line, carry = first_line, b""
    while block := os.pread(fd, COMPACT_BLOCK, read_at):
        read_at += len(block)
        data = carry + block
        ends = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 10)  # one row a line, JSON escapes "\n"
        n = len(ends)
        while not exhausted and (not len(pending) or pending[-1] < line + n):
            more = next(cuts, None)
            exhausted = more is None
            if more is not None:
                pending = np.concatenate((pending, more))
        k = int(np.searchsorted(pending, line + n))
        cut, pending = pending[:k] - line, pending[k:]
        if not k and write_at == read_at - len(data):  # nothing cut yet: the bytes are in place already
            write_at += int(ends[-1]) + 1 if n else 0
            line += n
            carry = data[int(ends[-1]) + 1 :] if n else data
            continue
        pieces, start = [], 0
        for c in cut.tolist():  # the bytes between two cut lines go in one piece
            pieces.append(data[start : (ends[c - 1] + 1 if c else 0)])
            start = int(ends[c]) + 1
        pieces.append(data[start : (int(ends[-1]) + 1 if n else 0)])
        out = memoryview(b"".join(pieces))
        while out:
            written = os.pwrite(fd, out, write_at)
            write_at, out = write_at + written, out[written:]
        line += n
        carry = data[int(ends[-1]) + 1 :] if n else data
    if carry or len(pending):
        raise ValueError(f"cut_lines: {len(carry)} bytes after the last newline, {len(pending)} cuts past the end")
    os.ftruncate(fd, write_at)
