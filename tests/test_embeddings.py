"""Sentence embeddings: one row per input line in input order, the head's pooling, .npy written atomically."""

import numpy as np
import pytest
import torch

from helpers import build_finetuned, build_pretrained, make_tweets
from twilbert.inference.embeddings import Embedder, load_encoder, write_embeddings
from twilbert.inference.inputs import PredictError

TEXTS = [t for t, _ in make_tweets(23, seed=7)] + ["", "😂", "odio el tráfico " * 300]


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory, vocab_dir):
    return build_pretrained(tmp_path_factory.mktemp("pretrained") / "model", vocab_dir)


@pytest.fixture(scope="module")
def finetuned_dir(tmp_path_factory, vocab_dir):
    return build_finetuned(tmp_path_factory.mktemp("finetuned") / "model", vocab_dir, collapse_mode="cls")


def write_lines(path, texts):
    path.write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    return path


def test_rows_follow_the_input_lines(tmp_path, pretrained_dir):
    src = write_lines(tmp_path / "in.txt", TEXTS)
    shape = write_embeddings(pretrained_dir, str(src), tmp_path / "x.npy", chunk_size=7, batch_size=4)
    x = np.load(tmp_path / "x.npy", allow_pickle=False)
    assert shape == x.shape == (len(TEXTS), 16) and x.dtype == np.float32
    encoder, tokenizer, _ = load_encoder(pretrained_dir)
    embedder = Embedder(encoder, tokenizer, max_len=16)
    one_by_one = np.concatenate([embedder.embed([t], batch_size=1) for t in TEXTS])
    np.testing.assert_allclose(x, one_by_one, atol=1e-5)
    reversed_src = write_lines(tmp_path / "rev.txt", TEXTS[::-1])
    write_embeddings(pretrained_dir, str(reversed_src), tmp_path / "rev.npy")
    np.testing.assert_allclose(np.load(tmp_path / "rev.npy"), x[::-1], atol=1e-5)
    assert len({tuple(np.round(row, 4)) for row in x}) == len(TEXTS)
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temp file


def test_avg_and_cls_differ_and_special_tokens_matter(tmp_path, pretrained_dir):
    src = write_lines(tmp_path / "in.txt", TEXTS[:10])
    out = {}
    for name, mode, special in [("avg", "avg", True), ("cls", "cls", True), ("avg_plain", "avg", False)]:
        write_embeddings(pretrained_dir, str(src), tmp_path / f"{name}.npy", mode, special)
        out[name] = np.load(tmp_path / f"{name}.npy")
    assert not np.allclose(out["avg"], out["cls"], atol=1e-3)
    assert not np.allclose(out["avg"], out["avg_plain"], atol=1e-3)
    encoder, tokenizer, _ = load_encoder(pretrained_dir)
    with torch.no_grad():  # cls is the encoder's state at [CLS]; avg the mean over the real tokens
        ids = torch.tensor([[3, *tokenizer.encode(TEXTS[:1])[0][:16], 4]])
        hidden = encoder(ids, torch.zeros_like(ids))[0]  # (T, H)
    np.testing.assert_allclose(out["cls"][0], hidden[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(out["avg"][0], hidden.mean(0).numpy(), atol=1e-5)
    np.testing.assert_allclose(out["avg_plain"][0], hidden[1:-1].mean(0).numpy(), atol=1e-5)


def test_finetuned_directory_works_and_defaults_to_its_head_pooling(tmp_path, finetuned_dir):
    src = write_lines(tmp_path / "in.txt", TEXTS[:5])
    write_embeddings(finetuned_dir, str(src), tmp_path / "default.npy")
    write_embeddings(finetuned_dir, str(src), tmp_path / "cls.npy", collapse_mode="cls")
    write_embeddings(finetuned_dir, str(src), tmp_path / "avg.npy", collapse_mode="avg")
    np.testing.assert_array_equal(np.load(tmp_path / "default.npy"), np.load(tmp_path / "cls.npy"))
    assert not np.allclose(np.load(tmp_path / "default.npy"), np.load(tmp_path / "avg.npy"))


def test_tsv_column_input(tmp_path, pretrained_dir):
    src = write_lines(tmp_path / "in.tsv", ["ID\tTEXT"] + [f"{i}\t{t}" for i, t in enumerate(TEXTS[:4])])
    plain = write_lines(tmp_path / "in.txt", TEXTS[:4])
    write_embeddings(pretrained_dir, str(src), tmp_path / "tsv.npy", column="TEXT")
    write_embeddings(pretrained_dir, str(plain), tmp_path / "txt.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "tsv.npy"), np.load(tmp_path / "txt.npy"))


def test_empty_input_and_stdin_are_refused_and_leave_no_file(tmp_path, pretrained_dir):
    empty = write_lines(tmp_path / "empty.txt", [])
    with pytest.raises(PredictError, match="empty.txt: empty input"):
        write_embeddings(pretrained_dir, str(empty), tmp_path / "x.npy")
    with pytest.raises(PredictError, match="not stdin"):
        write_embeddings(pretrained_dir, "-", tmp_path / "x.npy")
    assert not (tmp_path / "x.npy").exists()


def test_a_failed_run_keeps_the_previous_array(tmp_path, pretrained_dir):
    out = tmp_path / "x.npy"
    np.save(out, np.arange(3.0))
    with pytest.raises(PredictError):
        write_embeddings(pretrained_dir, str(tmp_path / "missing.txt"), out)
    np.testing.assert_array_equal(np.load(out), np.arange(3.0))
