import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import REPO, make_tweets
from twilbert.cli import dump_params
from twilbert.config import VocabConfig, compose
from twilbert.data.batch import iterate_batches, make_batch, pack_pairs
from twilbert.data.pairs import (
    KILL_HOOK_ENV,
    PairParams,
    build_pair_shards,
    heldout_rows,
    load_shards,
    sop_cuts,
    tokenize_chunk,
)
from twilbert.data.shards import token_dtype, verify_shards, write_shard
from twilbert.data.special import CLS_ID, PAD_ID, SEP_ID
from twilbert.data.tokenizer import Tokenizer, train_vocab


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    out = tmp_path_factory.mktemp("v") / "vocab"
    train_vocab([t for t, _ in make_tweets(200)], out, VocabConfig(vocab_size=100))
    return Tokenizer(out)


def mixed_corpus(n: int) -> list[tuple[str, object]]:
    """Texts with and without replies, and a few one-word texts that cannot be split."""
    tweets = [t for t, _ in make_tweets(n, seed=3)]
    return [(t, None) if i % 3 else (t, tweets[(i + 1) % n]) for i, t in enumerate(tweets)] + [("jaja", None)] * 3


def files(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_texts_without_reply_are_cut_inside_at_a_seeded_boundary():
    n_tokens = np.array([2, 3, 10, 50, 2])
    rows = np.arange(5)
    cuts = sop_cuts(7, rows, n_tokens)
    assert ((cuts >= 1) & (cuts <= n_tokens - 1)).all()
    assert (sop_cuts(7, rows, n_tokens) == cuts).all() and (sop_cuts(8, rows, n_tokens) != cuts).any()
    # a row's cut depends on its own index only, not on the rows processed with it
    assert sop_cuts(7, rows[3:], n_tokens[3:]).tolist() == cuts[3:].tolist()


def test_heldout_rows_are_a_seeded_coin_per_row_independent_of_the_chunk():
    rows = np.arange(20_000)
    held = heldout_rows(1, rows, 0.05)
    assert 0.04 < held.mean() < 0.06
    assert heldout_rows(1, rows[777:1234], 0.05).tolist() == held[777:1234].tolist()
    assert not heldout_rows(1, rows, 0.0).any()


def test_a_chunk_keeps_replies_as_second_segments_splits_texts_and_counts_short_ones(tokenizer):
    rows = [("hola que tal", "muy bien gracias"), ("odio el lunes de verdad", None), ("jaja", None)]
    out = tokenize_chunk(tokenizer, 0, rows, PairParams(max_len=64, heldout_fraction=0.0, seed=1, dtype="uint16"))
    assert out["skipped_short"] == 1 and out["rows"] == 3
    tokens, index = out["train"]
    assert tokens.dtype == np.uint16 and len(index) == 2
    first, reply, text = tokenizer.encode(["hola que tal", "muy bien gracias", "odio el lunes de verdad"])
    start, la, lb = index[0]
    assert tokens[start : start + la].tolist() == first and tokens[start + la : start + la + lb].tolist() == reply
    start, la, lb = index[1]
    assert la >= 1 and lb >= 1 and tokens[start : start + la + lb].tolist() == text  # contiguous halves
    assert out["corpus_tokens"] == len(first) + len(reply) + len(text) + len(tokenizer.encode(["jaja"])[0])


def test_every_pair_is_stored_once_and_read_as_a_positive_and_its_swapped_negative(tokenizer, tmp_path):
    corpus = [("hola que tal", "muy bien gracias"), ("odio el lunes", "yo también")]
    summary = build_pair_shards(corpus, tokenizer, tmp_path / "pairs", max_len=8, heldout_fraction=0.0,
                                shard_size=1, seed=1)
    assert summary["train_examples"] == 4 and summary["train_shards"] == 2 and summary["dtype"] == "uint16"
    data = load_shards(tmp_path / "pairs" / "train")
    assert data.pairs == 2 and len(data) == 4
    rows = data.take(np.arange(4))
    assert rows["labels"].tolist() == [1, 0, 1, 0]
    # the same rows as packing (a, b) and (b, a) to max_len: what the stage stored before, once per order
    a, b = tokenizer.encode(["hola que tal", "muy bien gracias"])
    packed = pack_pairs([a, b], [b, a], max_len=8)
    width = packed["length"].max()
    assert (rows["input_ids"][:2, :width] == packed["input_ids"][:, :width]).all()
    assert rows["len_a"][:2].tolist() == packed["len_a"].tolist()
    assert rows["length"][:2].tolist() == packed["length"].tolist()
    stored = sum(np.load(p).size for p in (tmp_path / "pairs" / "train").glob("*.tokens.npy"))
    assert stored == sum(min(len(t), 8) for t in tokenizer.encode([x for pair in corpus for x in pair]))
    manifest = json.loads((tmp_path / "pairs" / "manifest.json").read_text())
    assert (manifest["max_len"], manifest["dtype"], manifest["seed"]) == (8, "uint16", 1)
    assert manifest["vocab_size"] == tokenizer.vocab_size


def test_shards_are_npy_files_that_numpy_maps_and_the_manifest_checksums_match(tokenizer, tmp_path):
    build_pair_shards(mixed_corpus(60), tokenizer, tmp_path / "p", max_len=8, heldout_fraction=0.2,
                      shard_size=25, seed=0)
    for split in ("train", "heldout"):
        manifest = json.loads((tmp_path / "p" / split / "manifest.json").read_text())
        assert [s["name"] for s in manifest["shards"]] == [f"shard-{k:05d}" for k in range(3)]
        for entry in manifest["shards"]:
            index = np.load(tmp_path / "p" / split / f"{entry['name']}.index.npy", mmap_mode="r")
            assert isinstance(index, np.memmap) and index.shape == (entry["rows"], 3)
        assert verify_shards(tmp_path / "p" / split) == []
    shard = tmp_path / "p" / "train" / "shard-00001.tokens.npy"
    shard.write_bytes(shard.read_bytes()[:-1] + b"\xff")
    assert verify_shards(tmp_path / "p" / "train") == ["shard-00001.tokens.npy"]


def test_a_shard_written_from_pieces_is_byte_identical_to_numpy_saving_it_whole(tmp_path):
    rng = np.random.default_rng(0)
    tokens = [rng.integers(0, 900, n).astype(np.uint16) for n in (5, 0, 17, 3)]
    index = [rng.integers(0, 50, (n, 3)) for n in (2, 0, 4, 1)]
    entry = write_shard(tmp_path / "s", 7, tokens, index)
    for part, whole in (("tokens", np.concatenate(tokens)), ("index", np.concatenate(index).astype(np.uint32))):
        expected = tmp_path / f"{part}.npy"
        np.save(expected, whole)
        written = tmp_path / "s" / f"shard-00007.{part}.npy"
        assert written.read_bytes() == expected.read_bytes()
        assert entry["sha256"][part] == hashlib.sha256(expected.read_bytes()).hexdigest()
    assert (entry["rows"], entry["tokens"]) == (7, 25)
    write_shard(tmp_path / "e", 0, [np.zeros(0, np.uint16)], [])  # an empty split still writes valid files
    assert np.load(tmp_path / "e" / "shard-00000.index.npy").shape == (0, 3)


def test_token_type_is_the_smallest_that_holds_the_vocabulary():
    assert token_dtype(1000) == np.uint16 and token_dtype(65_536) == np.uint16
    assert token_dtype(65_537) == np.int32


def test_heldout_pairs_are_disjoint_from_training_pairs(tokenizer, tmp_path):
    corpus = [(t, None) for t, _ in make_tweets(60)]
    summary = build_pair_shards(corpus, tokenizer, tmp_path / "p", max_len=16, heldout_fraction=0.1,
                                shard_size=1000, seed=0)
    held = heldout_rows(0, np.arange(60), 0.1)
    assert summary["heldout_examples"] == 2 * held.sum() > 0
    assert summary["train_examples"] + summary["heldout_examples"] == 2 * (60 - summary["skipped_short"])
    def pairs_of(split):
        data = load_shards(tmp_path / "p" / split)
        rows = data.take(data.originals(data.pairs))
        return {tuple(r[:n]) for r, n in zip(rows["input_ids"], rows["length"])}

    assert not pairs_of("train") & pairs_of("heldout")


def test_shards_are_byte_identical_for_one_and_two_workers_and_any_chunking(tokenizer, tmp_path):
    corpus = mixed_corpus(300)
    args = dict(max_len=8, heldout_fraction=0.1, shard_size=70, seed=4)
    one = build_pair_shards(corpus, tokenizer, tmp_path / "one", workers=1, chunk_rows=64, **args)
    two = build_pair_shards(iter(corpus), tokenizer, tmp_path / "two", workers=2, chunk_rows=9, **args)
    assert one == two and one["skipped_short"] == 3
    assert files(tmp_path / "one") == files(tmp_path / "two")
    # twilbert's own vocabulary keeps no word starts: the shards' files and manifest are as before them
    assert not list((tmp_path / "one").rglob("*.words.npy"))
    assert "word_starts" not in json.loads((tmp_path / "one" / "manifest.json").read_text())
    assert not list(tmp_path.glob(".*partial"))  # the staging directories were published


def test_the_forked_workers_never_collect_the_objects_they_share_with_the_parent(tokenizer, tmp_path, monkeypatch):
    # A full collection writes every object it visits, which unshares the pages forked workers hold
    # in common with the parent: frozen, the imports' objects are never visited, so the tree's memory
    # stays flat however many chunks go through (the benchmark measures it; this pins the cause).
    import gc

    from twilbert.data import pairs

    seen = tmp_path / "frozen.txt"

    def tokenize_and_record(*args):
        with seen.open("a") as fh:
            fh.write(f"{os.getpid()} {gc.get_freeze_count()}\n")
        return tokenize_chunk(*args)

    monkeypatch.setattr(pairs, "tokenize_chunk", tokenize_and_record)  # inherited by the forked workers
    build_pair_shards(mixed_corpus(60), tokenizer, tmp_path / "p", max_len=8, heldout_fraction=0.1, shard_size=30,
                      seed=0, workers=2, chunk_rows=10)
    records = [line.split() for line in seen.read_text().splitlines()]
    assert len(records) == 7 and {pid for pid, _ in records} != {str(os.getpid())}
    assert all(int(frozen) > 1000 for _, frozen in records)
    assert gc.get_freeze_count() == 0  # unfrozen once the pool is gone: the caller's collector is as it was


def test_the_data_stages_never_import_torch():
    # torch's import is ~3 s of each stage process, and its objects are what every forked tokenizer
    # worker would share with the parent: the corpus, vocabulary and pairs paths need none of it.
    probe = ("import sys, runpy; sys.argv = ['stage', '--help']\n"
             "for stage in ('data', 'vocab', 'pairs'):\n"
             "    try: runpy.run_path(f'stages/{stage}.py', run_name='__main__')\n"
             "    except SystemExit: pass\n"
             "print(sorted(m for m in ('torch', 'sklearn', 'pandas', 'mlflow') if m in sys.modules), file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "[]"


def test_the_output_of_a_failed_build_is_never_half_written(tokenizer, tmp_path):
    def corpus():
        yield from mixed_corpus(40)
        raise ValueError("corpus.jsonl:44: not a pretraining corpus row")

    build_pair_shards(mixed_corpus(20), tokenizer, tmp_path / "p", max_len=8, heldout_fraction=0.1,
                      shard_size=10, seed=0)
    before = files(tmp_path / "p")
    with pytest.raises(ValueError, match="corpus.jsonl:44"):
        build_pair_shards(corpus(), tokenizer, tmp_path / "p", max_len=8, heldout_fraction=0.1, shard_size=10,
                          seed=0, workers=2)
    assert files(tmp_path / "p") == before


def run_pairs_stage(work: Path, kill_after=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "CI": "1"}
    env.pop(KILL_HOOK_ENV, None)
    if kill_after is not None:
        env[KILL_HOOK_ENV] = str(kill_after)
    cmd = [sys.executable, str(REPO / "stages" / "pairs.py"), "--corpus", "corpus.jsonl", "--vocab", "vocab",
           "--out", "pairs"]
    return subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=300)


def test_a_sigkilled_pairs_stage_resumes_and_ends_byte_identical_to_an_uninterrupted_run(tokenizer, tmp_path):
    raw = compose(["representation.max_len=8", "pairs.shard_size=40", "pairs.workers=2"], REPO / "conf")
    runs = {}
    for name in ("reference", "interrupted"):
        work = tmp_path / name
        work.mkdir()
        (work / "params.yaml").write_text(dump_params(raw), encoding="utf-8")
        (work / "vocab").symlink_to(tokenizer.vocab_dir)
        with (work / "corpus.jsonl").open("w", encoding="utf-8") as fh:
            for a, b in mixed_corpus(200):
                fh.write(json.dumps({"a": a, "b": b}, ensure_ascii=False) + "\n")
        runs[name] = work
    assert run_pairs_stage(runs["reference"]).returncode == 0

    work = runs["interrupted"]
    killed = run_pairs_stage(work, kill_after=2)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (work / "pairs").exists()
    journal = json.loads((work / ".pairs.partial" / "journal.json").read_text())
    assert [s["shard"] for s in journal["shards"]] == [0, 1, 2]
    resumed = run_pairs_stage(work)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming after shard 2" in resumed.stderr
    assert files(work / "pairs") == files(runs["reference"] / "pairs")
    assert not (work / ".pairs.partial").exists()


def test_batches_carry_segments_padding_and_special_masks():
    packed = pack_pairs([[10, 11], [12]], [[20], [21, 22, 23]], max_len=4)
    batch = make_batch(packed["input_ids"], packed["len_a"], packed["length"], np.array([1, 0]))
    # row 0: [CLS] 10 11 [SEP] 20 [SEP] -> width trimmed to the longest row (7)
    assert batch.input_ids.shape == (2, 7)
    assert batch.segment_ids[0].tolist() == [0, 0, 0, 0, 1, 1, 0]
    assert batch.attention_mask[0].tolist() == [True] * 6 + [False]
    assert batch.special_mask[0].tolist() == [True, False, False, True, False, True, True]
    assert batch.labels.dtype == torch.long
    assert (batch.input_ids[1, :7] == torch.tensor([CLS_ID, 12, SEP_ID, 21, 22, 23, SEP_ID])).all()
    assert batch.input_ids[0, 6] == PAD_ID


def test_batch_order_is_a_pure_function_of_seed_and_epoch():
    data = pack_pairs([[i + 5] for i in range(10)], [[7]] * 10, max_len=2)
    data["labels"] = np.arange(10)
    first = [b.labels.tolist() for b in iterate_batches(data, 3, seed=5, epoch=2)]
    again = [b.labels.tolist() for b in iterate_batches(data, 3, seed=5, epoch=2)]
    other = [b.labels.tolist() for b in iterate_batches(data, 3, seed=5, epoch=3)]
    resumed = [b.labels.tolist() for b in iterate_batches(data, 3, seed=5, epoch=2, start=2)]
    assert first == again and first != other and resumed == first[2:]
    assert sorted(sum(first, [])) == list(range(10))


def test_an_epoch_over_shards_sees_every_pair_once_in_each_order(tokenizer, tmp_path):
    build_pair_shards(mixed_corpus(50), tokenizer, tmp_path / "p", max_len=8, heldout_fraction=0.0,
                      shard_size=7, seed=0)
    data = load_shards(tmp_path / "p" / "train")

    def rows(ids, length, labels):
        return Counter((tuple(r[: int(n)].tolist()), int(y)) for r, n, y in zip(ids, length, labels))

    seen = sum((rows(b.input_ids, b.attention_mask.sum(1), b.labels) for b in iterate_batches(data, 6, 1, 0)),
               Counter())
    every = data.take(np.arange(len(data)))
    assert seen == rows(every["input_ids"], every["length"], every["labels"])
    for pos, neg, la in zip(every["input_ids"][::2], every["input_ids"][1::2], every["len_a"][::2]):
        n = int((pos != PAD_ID).sum())
        a, b = pos[1 : 1 + la], pos[2 + la : n - 1]
        assert neg[:n].tolist() == [CLS_ID, *b, SEP_ID, *a, SEP_ID]  # the negative: the same pair swapped
