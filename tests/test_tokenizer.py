import collections
import functools

import pytest

from helpers import make_tweets
from twilbert.config import VocabConfig
from twilbert.data import tokenizer
from twilbert.data.special import CLS_ID, MASK_ID, SEP_ID, SPECIAL_TOKENS
from twilbert.data.tokenizer import Tokenizer, sample_texts, train_vocab, within_characters


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("v") / "vocab"
    train_vocab([t for t, _ in make_tweets(200)], out, VocabConfig(vocab_size=100))
    return out


def test_special_tokens_sit_at_fixed_ids(vocab_dir):
    tok = Tokenizer(vocab_dir)
    assert [tok.sp.id_to_piece(i) for i in range(5)] == list(SPECIAL_TOKENS)
    assert tok.meta["special_tokens"]["[MASK]"] == MASK_ID


def test_vocab_directory_records_its_real_size(vocab_dir):
    tok = Tokenizer(vocab_dir)
    assert tok.meta["vocab_size"] == tok.vocab_size > 5


def test_special_token_text_in_a_tweet_is_not_a_control_token(vocab_dir):
    ids = Tokenizer(vocab_dir).encode(["hola [MASK] que tal"])[0]
    assert CLS_ID not in ids and SEP_ID not in ids


def test_vocab_training_is_deterministic(tmp_path):
    texts = [t for t, _ in make_tweets(150, seed=3)]
    a = train_vocab(texts, tmp_path / "a", VocabConfig(vocab_size=80))
    b = train_vocab(texts, tmp_path / "b", VocabConfig(vocab_size=80))
    pieces = lambda d: [(t.sp.id_to_piece(i), t.sp.get_score(i)) for t in [Tokenizer(d)] for i in range(t.vocab_size)]  # noqa: E731
    assert pieces(a) == pieces(b)


def test_empty_corpus_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        train_vocab([], tmp_path / "v", VocabConfig(vocab_size=50))
    assert not (tmp_path / "v").exists()


def test_missing_vocab_directory_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="spm.model"):
        Tokenizer(tmp_path)


def test_vocab_files_are_byte_identical_when_trained_in_different_directories(tmp_path):
    texts = [t for t, _ in make_tweets(300, seed=4)]
    cfg = VocabConfig(vocab_size=90, max_sentences=200)
    a = train_vocab(iter(texts), tmp_path / "one" / "vocab", cfg, seed=7)
    b = train_vocab(iter(texts), tmp_path / "two" / "deeper" / "vocab", cfg, seed=7)
    for name in ("spm.model", "meta.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert str(tmp_path).encode() not in (a / "spm.model").read_bytes()
    assert sorted(p.name for p in a.iterdir()) == ["meta.json", "spm.model"]


def test_vocab_trains_on_a_seeded_sample_of_at_most_max_sentences(tmp_path):
    texts = [t for t, _ in make_tweets(400, seed=5)]
    cfg = VocabConfig(vocab_size=80, max_sentences=150)
    meta = Tokenizer(train_vocab(texts, tmp_path / "v", cfg, seed=1)).meta
    assert (meta["n_training_texts"], meta["n_corpus_texts"], meta["sample_seed"]) == (150, 400, 1)
    assert meta["vocab"]["max_sentences"] == 150
    other = train_vocab(texts, tmp_path / "w", cfg, seed=2)
    assert (tmp_path / "v/spm.model").read_bytes() != (other / "spm.model").read_bytes()


def test_vocab_sample_is_cut_to_its_character_budget_for_sentencepieces_suffix_array(tmp_path, monkeypatch):
    texts = [t for t, _ in make_tweets(400, seed=5)]
    cfg = VocabConfig(vocab_size=80, max_sentences=300)
    whole = Tokenizer(train_vocab(texts, tmp_path / "whole", cfg, seed=1)).meta
    monkeypatch.setattr(tokenizer, "SAMPLE_MAX_CHARS", 6000)
    seen = []
    monkeypatch.setattr(tokenizer.spm.SentencePieceTrainer, "train",
                        functools.partial(_recording_train, tokenizer.spm.SentencePieceTrainer.train, seen))
    cut = Tokenizer(train_vocab(texts, tmp_path / "cut", cfg, seed=1)).meta
    assert whole["n_training_texts"] == 300 and 0 < cut["n_training_texts"] < 300
    assert cut["n_training_texts"] == len(seen) and sum(map(len, seen)) <= 6000
    again = train_vocab(texts, tmp_path / "again", cfg, seed=1)
    assert (again / "spm.model").read_bytes() == (tmp_path / "cut" / "spm.model").read_bytes()


def _recording_train(train, seen, sentence_iterator, **kwargs):
    sentences = list(sentence_iterator)
    seen.extend(sentences)
    return train(sentence_iterator=iter(sentences), **kwargs)


def test_character_budget_keeps_a_sample_that_fits_as_it_is_and_cuts_a_seeded_uniform_subset():
    lines = ["ab", "cd", "ef"]
    assert within_characters(list(lines), 6, seed=0) == lines
    counts = collections.Counter()
    for seed in range(300):
        kept = within_characters(list("abcdefghij"), 3, seed)
        assert len(kept) == 3 and kept == within_characters(list("abcdefghij"), 3, seed)
        counts.update(kept)
    assert all(60 < counts[x] < 120 for x in "abcdefghij"), counts  # each kept with probability 3/10


def test_reservoir_sample_is_seeded_and_uniform():
    assert sample_texts(iter("abcdefghij"), 3, seed=1) == sample_texts("abcdefghij", 3, seed=1)
    assert sample_texts("abc", 5, seed=1) == (["a", "b", "c"], 3)
    counts = collections.Counter()
    for seed in range(2000):
        sample, n = sample_texts(range(20), 5, seed)
        assert n == 20 and len(set(sample)) == 5
        counts.update(sample)
    # each item is kept with probability 5/20: 500 of 2000 draws, sd ~19
    assert all(abs(counts[i] - 500) < 100 for i in range(20)), counts


def test_retraining_replaces_the_vocab_directory_whole(tmp_path):
    out = tmp_path / "vocab"
    train_vocab([t for t, _ in make_tweets(150, seed=1)], out, VocabConfig(vocab_size=60))
    (out / "stale.txt").write_text("from an old run")
    train_vocab([t for t, _ in make_tweets(150, seed=2)], out, VocabConfig(vocab_size=70))
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "spm.model"]
    assert Tokenizer(out).meta["requested_vocab_size"] == 70
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vocab"]  # no temp or old directory left
