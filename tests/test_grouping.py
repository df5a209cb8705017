"""Length-grouped batches (data/grouping.py): the same examples and batch sizes as random batches, an
order fixed by seed and epoch, and little padding on tweet-like lengths."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import make_tweets
from twilbert.config import VocabConfig
from twilbert.data.batch import batch_indices, epoch_order, iterate_batches
from twilbert.data.grouping import WINDOW_BATCHES, grouped_batches, padding_share
from twilbert.data.pairs import build_pair_shards, load_shards
from twilbert.data.tokenizer import Tokenizer, train_vocab
from twilbert.train.distributed import micro_batch_indices
from twilbert.train.finetune.learners import shuffled_batches

SEED = 3


def tweet_like_lengths(n: int, seed: int = 0, max_len: int = 32) -> np.ndarray:
    """Row lengths of ``n`` examples shaped like the default corpus's pairs: two segments of
    log-normal length (mean ~11 pieces, cut at max_len) plus 3 specials, each pair twice (it and its
    swapped negative), ~25 tokens a row."""
    rng = np.random.default_rng(seed)
    segments = np.clip(np.rint(np.exp(rng.normal(2.05, 0.98, (-(-n // 2), 2)))), 1, max_len).astype(np.int64)
    return np.repeat(segments.sum(axis=1) + 3, 2)[:n]


def grouped(lengths: np.ndarray, batch_size: int, seed: int = SEED, epoch: int = 0, start: int = 0) -> list:
    order = epoch_order(len(lengths), seed, epoch)
    return list(grouped_batches(order, lengths.__getitem__, batch_size, seed, epoch, start=start))


@pytest.mark.parametrize("n, batch_size", [(10_000, 32), (10_000, 128), (4_097, 32), (31, 32), (1, 8)])
def test_every_example_appears_exactly_once_per_epoch(n, batch_size):
    batches = grouped(tweet_like_lengths(n), batch_size)
    seen = np.concatenate(batches)
    assert len(seen) == n and np.array_equal(np.sort(seen), np.arange(n))


@pytest.mark.parametrize("n, batch_size", [(10_000, 32), (WINDOW_BATCHES * 32 * 3, 32), (4_097, 128)])
def test_batches_are_full_but_one_last_partial_batch(n, batch_size):
    sizes = [len(b) for b in grouped(tweet_like_lengths(n), batch_size)]
    assert len(sizes) == -(-n // batch_size)  # as many batches as random batching
    assert set(sizes[:-1]) == {batch_size}
    assert sizes[-1] == (n % batch_size or batch_size)


def test_the_order_depends_only_on_the_seed_and_the_epoch():
    lengths = tweet_like_lengths(10_000)
    first = grouped(lengths, 32, seed=SEED, epoch=2)
    assert all(np.array_equal(a, b) for a, b in zip(first, grouped(lengths.copy(), 32, seed=SEED, epoch=2)))
    for other in (grouped(lengths, 32, seed=SEED, epoch=3), grouped(lengths, 32, seed=SEED + 1, epoch=2)):
        assert not all(np.array_equal(a, b) for a, b in zip(first, other))
    # a resumed epoch rebuilds the same batches from the batch number alone, mid-window or at a window start
    for start in (1, 70, WINDOW_BATCHES, len(first) - 1):
        resumed = grouped(lengths, 32, seed=SEED, epoch=2, start=start)
        assert len(resumed) == len(first) - start
        assert all(np.array_equal(a, b) for a, b in zip(resumed, first[start:]))


def test_batch_lengths_do_not_follow_a_sorted_sweep_through_a_window():
    # sorting a window and keeping its batches in order would feed short rows, then long ones
    lengths = tweet_like_lengths(WINDOW_BATCHES * 32)
    longest = [int(lengths[b].max()) for b in grouped(lengths, 32)]
    assert longest != sorted(longest)
    assert np.corrcoef(np.arange(len(longest)), longest)[0, 1] < 0.5


@pytest.mark.parametrize("batch_size", [32, 128])
def test_grouped_batches_of_tweet_like_lengths_are_under_a_tenth_padding(batch_size):
    lengths = tweet_like_lengths(50_000)
    assert 23 < lengths.mean() < 27
    assert padding_share(lengths, grouped(lengths, batch_size)) < 0.10
    random = list(batch_indices(epoch_order(len(lengths), SEED, 0), batch_size, SEED, 0))
    assert padding_share(lengths, random) > 0.40  # what grouping removes


def test_two_workers_take_disjoint_micro_batches_that_cover_each_grouped_global_batch():
    lengths = tweet_like_lengths(5_003)
    shares = [list(micro_batch_indices(len(lengths), 32, 4, SEED, 1, r, 2, lengths=lengths.__getitem__))
              for r in (0, 1)]
    assert len(shares[0]) == len(shares[1])
    for whole, (_, a), (_, b) in zip(grouped(lengths, 32, epoch=1), *shares):
        assert [k for k, _ in a + b] == [0, 1, 2, 3]
        assert sorted(np.concatenate([idx for _, idx in a + b])) == sorted(whole)


def test_shard_lengths_are_the_lengths_of_the_rows_they_pack(tmp_path):
    train_vocab([t for t, _ in make_tweets(200)], tmp_path / "vocab", VocabConfig(vocab_size=100))
    corpus = [(t, None) for t, _ in make_tweets(90, seed=4)]
    build_pair_shards(corpus, Tokenizer(tmp_path / "vocab"), tmp_path / "pairs", max_len=8, heldout_fraction=0.0,
                      shard_size=25, seed=0)
    data = load_shards(tmp_path / "pairs" / "train")
    idx = np.random.default_rng(0).permutation(len(data))
    assert np.array_equal(data.lengths(idx), data.take(idx)["length"])
    batches = list(iterate_batches(data, 8, SEED, 0, length_grouping=True))
    assert sum(len(b.labels) for b in batches) == len(data)
    assert all(b.input_ids.shape[1] == int(b.attention_mask.sum(1).max()) for b in batches)  # trimmed to its longest


def test_finetuning_batches_can_be_grouped_and_still_hold_every_row_once():
    class Packer:
        def batch(self, input_ids, len_a, length, labels):
            return labels

    lengths = tweet_like_lengths(1_000)
    data = {"input_ids": np.zeros((1_000, 1)), "len_a": lengths, "length": lengths, "labels": np.arange(1_000)}
    def rows(**grouping) -> np.ndarray:
        return np.concatenate([part for batch in shuffled_batches(data, Packer(), 32, SEED, 0, n_micro=2, **grouping)
                               for _, part in batch.micro])

    grouped_rows = rows(length_grouping=True)
    assert np.array_equal(np.sort(grouped_rows), np.arange(1_000))
    plain = rows()
    assert not np.array_equal(grouped_rows, plain)
