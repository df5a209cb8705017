import numpy as np
import pytest

from twilbert.config import VocabConfig
from twilbert.data.tokenizer import CLS_ID, MASK_ID, PAD_ID, SEP_ID, SPECIAL_TOKENS, Tokenizer, pack_pairs, train_vocab

from conftest import make_tweets


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


def test_pack_pairs_builds_cls_a_sep_b_sep_and_truncates_each_text():
    packed = pack_pairs([[10, 11, 12, 13]], [[20, 21]], max_len=3)
    assert packed["input_ids"].shape == (1, 2 * 3 + 3)
    assert packed["input_ids"][0].tolist() == [CLS_ID, 10, 11, 12, SEP_ID, 20, 21, SEP_ID, PAD_ID]
    assert packed["len_a"].tolist() == [3] and packed["length"].tolist() == [8]


def test_pack_single_texts_has_no_second_segment():
    packed = pack_pairs([[7], [7, 8]], None, max_len=4)
    assert packed["input_ids"].shape == (2, 6)
    assert np.array_equal(packed["length"], [3, 4])
