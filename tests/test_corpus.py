import collections
import hashlib
import io
import json
import tarfile

import pytest

from twilbert.config import DataConfig
from twilbert.data.corpus import (
    DataStageError,
    fetch_evomsa_sdist,
    read_evomsa_tweets,
    read_pretrain_corpus,
    run_data_stage,
    stratified_split,
)
from twilbert.data.formats import read_table

from conftest import make_tweets


def fake_sdist(path, tweets, version="2.0.14"):
    """An sdist-shaped tarball holding only EvoMSA's tweets.json."""
    payload = "\n".join(json.dumps({"text": t, "klass": k, "q_voc_ratio": 0.5}) for t, k in tweets).encode()
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(f"evomsa-{version}/EvoMSA/tests/tweets.json")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def cached_sdist(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    (cache / "twilbert").mkdir(parents=True)
    tweets = make_tweets(200) + [("con\ttab y\nsalto", "P")]
    digest = fake_sdist(cache / "twilbert" / "evomsa-2.0.14.tar.gz", tweets)
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    return DataConfig(evomsa_sha256=digest), tweets


def test_tabs_and_newlines_inside_tweets_become_spaces(cached_sdist, tmp_path):
    cfg, _ = cached_sdist
    tweets = read_evomsa_tweets(fetch_evomsa_sdist(cfg), cfg.evomsa_version)
    assert tweets[-1].text == "con tab y salto"
    assert len(tweets) == 201


def test_split_is_stratified_seeded_and_loses_no_tweet(cached_sdist):
    cfg, _ = cached_sdist
    tweets = read_evomsa_tweets(fetch_evomsa_sdist(cfg), cfg.evomsa_version)
    train, dev, test = stratified_split(tweets, [0.7, 0.15, 0.15], seed=7)
    again = stratified_split(tweets, [0.7, 0.15, 0.15], seed=7)
    assert [t.id for t in train] == [t.id for t in again[0]]
    assert sorted(t.id for t in train + dev + test) == sorted(t.id for t in tweets)
    share = lambda part: collections.Counter(t.label for t in part)["N"] / len(part)  # noqa: E731
    assert abs(share(train) - share(test)) < 0.05


def test_data_stage_writes_task_split_and_train_only_pretraining_corpus(cached_sdist, tmp_path):
    cfg, _ = cached_sdist
    summary = run_data_stage(cfg, seed=1, out=tmp_path / "data")
    train = read_table(tmp_path / "data/default/train.tsv", ["ID", "TEXT", "CLASS"])
    test = read_table(tmp_path / "data/default/test.tsv", ["ID", "TEXT", "CLASS"])
    corpus = read_pretrain_corpus(tmp_path / "data/pretrain/corpus.jsonl")
    assert summary["pretrain_texts"] == len(corpus) == len(train)
    assert set(a for a, _ in corpus).isdisjoint(set(test.get("TEXT")) - set(train.get("TEXT")))


def test_checksum_mismatch_is_refused(cached_sdist, monkeypatch):
    cfg, _ = cached_sdist
    cfg.evomsa_sha256 = "0" * 64
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    with pytest.raises(DataStageError, match="could not download|sha256"):
        fetch_evomsa_sdist(cfg)


def test_offline_download_failure_says_how_to_use_local_files(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    with pytest.raises(DataStageError, match="data.source=pairs_file"):
        fetch_evomsa_sdist(DataConfig())


def test_user_pair_corpus_becomes_the_pretraining_corpus(tmp_path):
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("1\thola que tal\t2\tmuy bien\n3\todio el lunes\t4\tyo también\n", encoding="utf-8")
    cfg = DataConfig(source="pairs_file", pairs_file=str(pairs), pairs_header=False)
    summary = run_data_stage(cfg, seed=1, out=tmp_path / "data")
    assert summary["pretrain_pairs_with_reply"] == 2
    assert read_pretrain_corpus(tmp_path / "data/pretrain/corpus.jsonl")[1] == ("odio el lunes", "yo también")


@pytest.mark.network
def test_real_evomsa_download_matches_the_pinned_checksum(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cfg = DataConfig()
    tweets = read_evomsa_tweets(fetch_evomsa_sdist(cfg), cfg.evomsa_version)
    assert len(tweets) == 1000
    assert {t.label for t in tweets} == {"P", "N", "NEU", "NONE"}
