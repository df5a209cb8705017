"""Exact-duplicate removal in bounded memory: a fixed digest table, DuckDB past it, late copies cut
from the written file; the same rows kept as a set of every digest would keep."""

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import twilbert.data.corpus as corpus_module
import twilbert.data.dedup as dedup_module
from twilbert.config import DataConfig
from twilbert.data.corpus import run_data_stage
from twilbert.data.dedup import DIGEST_BYTES, Deduplicator, cut_lines


def _deduplicate(batches, slots, tmp_path):
    """Rows kept (stream order) by a Deduplicator of ``slots`` slots, its later copies cut."""
    kept, replies = [], []
    with Deduplicator(tmp_path, slots=slots) as dedup:
        for batch in batches:
            digests = np.array(batch, dtype=np.uint64)
            keep = dedup.add(digests, digests % 2 == 0)
            kept += [int(x) for x in digests[keep]]
            replies += [x % 2 == 0 for x in kept[len(replies):]]
        cut = {int(line): bool(reply) for lines, flags in dedup.later_copies() for line, reply in zip(lines, flags)}
        table_bytes, spilled = dedup.seen.nbytes, dedup.spilled
    assert all(replies[line] == reply for line, reply in cut.items())  # the flag noted is the row's
    return [x for line, x in enumerate(kept) if line not in cut], table_bytes, spilled


@settings(max_examples=40, deadline=None)
@given(batches=st.lists(st.lists(st.integers(1, 300), max_size=120), max_size=10))
def test_deduplicator_past_its_tables_room_keeps_the_first_of_each_digest(batches, tmp_path_factory):
    firsts = list(dict.fromkeys(x for batch in batches for x in batch))
    kept, table_bytes, spilled = _deduplicate(batches, 16, tmp_path_factory.mktemp("d"))
    assert kept == firsts
    assert table_bytes == 16 * DIGEST_BYTES  # allocated once, never grown, whatever the stream's length
    assert spilled == (len(firsts) > 11)  # the table takes 70% of 16 slots


def test_deduplicator_table_stays_at_its_fixed_size_for_a_stream_many_times_larger(tmp_path):
    rng = np.random.default_rng(0)
    batches = [rng.integers(1, 2**63, 1000).tolist() + rng.integers(1, 500, 200).tolist() for _ in range(20)]
    kept, table_bytes, spilled = _deduplicate(batches, 256, tmp_path)
    assert kept == list(dict.fromkeys(x for b in batches for x in b)) and spilled
    assert table_bytes == 256 * DIGEST_BYTES
    assert list(tmp_path.iterdir()) == []  # DuckDB's spill folder goes with the Deduplicator


@pytest.mark.parametrize("cuts", [[0, 1, 5, 6, 7, 20, 39], [25, 26, 38], []])
def test_cut_lines_removes_the_named_lines_in_place_across_blocks(tmp_path, monkeypatch, cuts):
    monkeypatch.setattr(dedup_module, "COMPACT_BLOCK", 7)
    lines = [f"línea {i}{'x' * (i % 5)}\n".encode() for i in range(40)]
    path = tmp_path / "f"
    path.write_bytes(b"head\n" + b"".join(lines))
    fd = os.open(path, os.O_RDWR)
    try:
        batches = [np.array([100 + c for c in cuts[:2]], dtype=np.int64), np.array([100 + c for c in cuts[2:]])]
        cut_lines(fd, 5, 100, iter(batches))
    finally:
        os.close(fd)
    assert path.read_bytes() == b"head\n" + b"".join(x for i, x in enumerate(lines) if i not in cuts)


def test_data_stage_past_the_digest_tables_room_writes_the_same_corpus_and_summary(tmp_path, monkeypatch):
    rows = [f"{i}\ttuit {i % 53} @u{i}\t{i + 1}\t{'' if i % 3 else 'ok'}{i % 7}\n" for i in range(400)]
    (tmp_path / "p.tsv").write_text("".join(rows), encoding="utf-8")
    cfg = DataConfig(source="pairs_file", pairs_file=str(tmp_path / "p.tsv"), pairs_header=False,
                     corpus_dir=str(tmp_path))
    whole = run_data_stage(cfg, seed=1, out=tmp_path / "whole")
    monkeypatch.setattr(dedup_module, "MEMORY_SLOTS", 16)
    monkeypatch.setattr(corpus_module, "CHUNK_ROWS", 9)
    bounded = run_data_stage(cfg, seed=1, out=tmp_path / "bounded")
    corpus = "pretrain/corpus.jsonl"
    assert (tmp_path / "bounded" / corpus).read_bytes() == (tmp_path / "whole" / corpus).read_bytes()
    assert bounded == whole and 0 < whole["duplicates_removed"] < 400 - 11
    assert sorted(p.name for p in (tmp_path / "bounded/pretrain").iterdir()) == ["corpus.jsonl", "summary.json"]
