import json

import numpy as np
import pytest
import torch

from twilbert.config import VocabConfig
from twilbert.data.pairs import build_pair_shards, iterate_batches, load_shards, make_batch, segment_pairs
from twilbert.data.tokenizer import CLS_ID, PAD_ID, SEP_ID, Tokenizer, pack_pairs, train_vocab

from conftest import make_tweets


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    out = tmp_path_factory.mktemp("v") / "vocab"
    train_vocab([t for t, _ in make_tweets(200)], out, VocabConfig(vocab_size=100))
    return Tokenizer(out)


def test_single_texts_are_split_into_two_contiguous_segments():
    rng = np.random.default_rng(0)
    a, b, skipped = segment_pairs([[1, 2, 3, 4, 5]], [None], rng)
    assert skipped == 0 and a[0] + b[0] == [1, 2, 3, 4, 5] and a[0] and b[0]


def test_replies_are_kept_as_the_second_segment_and_short_texts_are_counted():
    a, b, skipped = segment_pairs([[1, 2], [9]], [[7, 8], None], np.random.default_rng(0))
    assert (a, b, skipped) == ([[1, 2]], [[7, 8]], 1)


def test_every_pair_yields_a_positive_and_its_swapped_negative(tokenizer, tmp_path):
    corpus = [("hola que tal", "muy bien gracias"), ("odio el lunes", "yo también")]
    summary = build_pair_shards(corpus, tokenizer, tmp_path / "pairs", max_len=8, heldout_fraction=0.0,
                                shard_size=3, seed=1)
    data = load_shards(tmp_path / "pairs" / "train")
    assert summary["train_examples"] == 4 and summary["train_shards"] == 2
    assert sorted(data["labels"].tolist()) == [0, 0, 1, 1]
    pos = data["input_ids"][data["labels"] == 1]
    neg = data["input_ids"][data["labels"] == 0]
    first = tokenizer.encode(["hola que tal"])[0]
    assert any(row[1 : 1 + len(first)].tolist() == first for row in pos)
    assert not any(row[1 : 1 + len(first)].tolist() == first for row in neg)
    meta = json.loads((tmp_path / "pairs" / "meta.json").read_text())
    assert meta["max_len"] == 8


def test_heldout_pairs_are_disjoint_from_training_pairs(tokenizer, tmp_path):
    corpus = [(t, None) for t, _ in make_tweets(60)]
    summary = build_pair_shards(corpus, tokenizer, tmp_path / "p", max_len=16, heldout_fraction=0.1,
                                shard_size=1000, seed=0)
    assert summary["heldout_examples"] == 2 * 6
    assert summary["train_examples"] + summary["heldout_examples"] == 2 * (60 - summary["skipped_short"])


def test_batches_carry_segments_padding_and_special_masks():
    packed = pack_pairs([[10, 11], [12]], [[20], [21, 22, 23]], max_len=4)
    batch = make_batch(packed["input_ids"], packed["len_a"], packed["length"], np.array([1, 0]))
    # row 0: [CLS] 10 11 [SEP] 20 [SEP] -> width trimmed to the longest row (7)
    assert batch.input_ids.shape == (2, 7)
    assert batch.segment_ids[0].tolist() == [0, 0, 0, 0, 1, 1, 0]
    assert batch.attention_mask[0].tolist() == [True] * 6 + [False]
    assert batch.special_mask[0].tolist() == [True, False, False, True, False, True, True]
    assert batch.labels.dtype == torch.long


def test_batch_order_is_a_pure_function_of_seed_and_epoch():
    data = pack_pairs([[i + 5] for i in range(10)], [[7]] * 10, max_len=2)
    data["labels"] = np.arange(10)
    first = [b.labels.tolist() for b in iterate_batches(data, 3, seed=5, epoch=2)]
    again = [b.labels.tolist() for b in iterate_batches(data, 3, seed=5, epoch=2)]
    other = [b.labels.tolist() for b in iterate_batches(data, 3, seed=5, epoch=3)]
    resumed = [b.labels.tolist() for b in iterate_batches(data, 3, seed=5, epoch=2, start=2)]
    assert first == again and first != other and resumed == first[2:]
    assert sorted(sum(first, [])) == list(range(10))
