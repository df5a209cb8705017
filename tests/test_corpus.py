import collections
import gzip
import json

import pytest

from helpers import fake_sdist, make_tweets
from twilbert.config import DataConfig
from twilbert.data.corpus import (
    DataStageError,
    fetch_evomsa_sdist,
    read_evomsa_tweets,
    read_pretrain_corpus,
    run_data_stage,
    stratified_split,
)
from twilbert.data.formats import DataFormatError, read_table


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


# --------------------------------------------------------------------------------------------
# The user's corpus at scale: plain text, gz, several files, duplicates, bad rows
# --------------------------------------------------------------------------------------------


def write_gz(path, text: str):
    path.write_bytes(gzip.compress(text.encode("utf-8")))
    return path


def test_plain_text_gz_and_several_files_become_rows_without_replies(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_gz(corpus / "2019.txt.gz", "hola que tal\nodio el lunes\n")
    (corpus / "2020.txt").write_text("vamos al partido\testa noche\n", encoding="utf-8")
    cfg = DataConfig(source="text_file", text_file=str(corpus / "20*"), corpus_dir=str(corpus))
    summary = run_data_stage(cfg, seed=1, out=tmp_path / "data")
    assert read_pretrain_corpus(tmp_path / "data/pretrain/corpus.jsonl") == [
        ("hola que tal", None), ("odio el lunes", None), ("vamos al partido\testa noche", None)]
    assert summary["files"] == 2 and summary["untracked_files"] == 0 and summary["pretrain_pairs_with_reply"] == 0
    assert json.loads((tmp_path / "data/pretrain/summary.json").read_text()) == summary


def test_pair_files_in_a_list_keep_their_replies(tmp_path):
    a = write_gz(tmp_path / "a.tsv.gz", "ORIG_ID\tORIG_TEXT\tREPLY_ID\tREPLY_TEXT\n1\thola\t2\tque tal\n")
    b = tmp_path / "b.tsv"
    b.write_text("ORIG_ID\tORIG_TEXT\tREPLY_ID\tREPLY_TEXT\n3\todio\t4\tyo también\n", encoding="utf-8")
    cfg = DataConfig(source="pairs_file", pairs_file=[str(a), str(b)], corpus_dir=str(tmp_path))
    run_data_stage(cfg, seed=1, out=tmp_path / "data")
    assert read_pretrain_corpus(tmp_path / "data/pretrain/corpus.jsonl") == [("hola", "que tal"), ("odio", "yo también")]


def test_duplicates_after_normalizing_are_removed_and_counted(tmp_path):
    texts = ["Hola mundo https://t.co/a", "RT @ana: hola  mundo https://t.co/b", "hola mundo", "HOLA MUNDO url",
             "otro tuit @pepe", "otro tuit @juan", "distinto"]
    path = tmp_path / "t.txt"
    path.write_text("\n".join(texts) + "\n", encoding="utf-8")
    cfg = DataConfig(source="text_file", text_file=str(path), corpus_dir=str(tmp_path))
    summary = run_data_stage(cfg, seed=1, out=tmp_path / "data")
    kept = [a for a, _ in read_pretrain_corpus(tmp_path / "data/pretrain/corpus.jsonl")]
    assert kept == ["Hola mundo https://t.co/a", "hola mundo", "otro tuit @pepe", "distinto"]  # first one kept, as written
    assert (summary["rows_read"], summary["duplicates_removed"], summary["pretrain_texts"]) == (7, 3, 4)
    cfg.dedup = False
    assert run_data_stage(cfg, seed=1, out=tmp_path / "all")["duplicates_removed"] == 0
    assert len(read_pretrain_corpus(tmp_path / "all/pretrain/corpus.jsonl")) == 7


def test_dedup_spans_files_and_chunks(tmp_path, monkeypatch):
    import twilbert.data.corpus as corpus_module

    monkeypatch.setattr(corpus_module, "CHUNK_ROWS", 7)
    (tmp_path / "a.txt").write_text("".join(f"tuit {i % 40}\n" for i in range(100)), encoding="utf-8")
    (tmp_path / "b.txt").write_text("".join(f"tuit {i}\n" for i in range(30, 60)), encoding="utf-8")
    cfg = DataConfig(source="text_file", text_file=str(tmp_path / "*.txt"), corpus_dir=str(tmp_path))
    summary = run_data_stage(cfg, seed=1, out=tmp_path / "data")
    kept = [a for a, _ in read_pretrain_corpus(tmp_path / "data/pretrain/corpus.jsonl")]
    assert kept == [f"tuit {i}" for i in range(60)]
    assert summary["duplicates_removed"] == 130 - 60


def test_bad_rows_within_max_bad_rows_are_skipped_counted_and_listed(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text("1\thola\t2\tque tal\n3\tsolo tres\t4\n5\tbien\t6\t\n7\ta\t8\tb\n", encoding="utf-8")
    cfg = DataConfig(source="pairs_file", pairs_file=str(path), pairs_header=False, max_bad_rows=2,
                     corpus_dir=str(tmp_path))
    summary = run_data_stage(cfg, seed=1, out=tmp_path / "data")
    assert summary["bad_rows_skipped"] == 2 and summary["pretrain_texts"] == 2
    assert summary["bad_rows"] == [f"{path}:2: expected 4 fields, found 3 (a field may contain a line break, or "
                                   "the delimiter is not '\\t')", f"{path}:3: empty 'REPLY_TEXT' field"]


def test_a_bad_row_without_budget_fails_with_file_and_line_and_writes_no_corpus(tmp_path):
    path = tmp_path / "t.txt.gz"
    path.write_bytes(gzip.compress(b"uno\ndos\nmal \xff\ntres\n"))
    cfg = DataConfig(source="text_file", text_file=str(path), corpus_dir=str(tmp_path))
    with pytest.raises(DataFormatError, match=rf"^{path}:3: invalid UTF-8"):
        run_data_stage(cfg, seed=1, out=tmp_path / "data")
    assert not (tmp_path / "data/pretrain/corpus.jsonl").exists()
    assert not list((tmp_path / "data/pretrain").iterdir())  # no temp file left either


def test_blank_lines_of_a_text_corpus_are_skipped_and_reported_in_the_summary(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("uno\n\ndos\n\n\ntres\n", encoding="utf-8")
    cfg = DataConfig(source="text_file", text_file=str(path), corpus_dir=str(tmp_path))
    summary = run_data_stage(cfg, seed=1, out=tmp_path / "data")
    assert summary["blank_lines_skipped"] == 3 and summary["pretrain_texts"] == 3
    assert summary["bad_rows_skipped"] == 0
    written = json.loads((tmp_path / "data/pretrain/summary.json").read_text(encoding="utf-8"))
    assert written["blank_lines_skipped"] == 3


def test_a_corpus_of_only_skipped_rows_is_an_error_that_keeps_the_previous_output(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("hola\n", encoding="utf-8")
    cfg = DataConfig(source="text_file", text_file=str(path), max_bad_rows=5, corpus_dir=str(tmp_path))
    run_data_stage(cfg, seed=1, out=tmp_path / "data")
    before = (tmp_path / "data/pretrain/corpus.jsonl").read_bytes()
    path.write_bytes(b"\xff\n \xfe\n")
    with pytest.raises(DataStageError, match=r"data\.text_file \(1 file\(s\)\): no well-formed rows"):
        run_data_stage(cfg, seed=1, out=tmp_path / "data")
    assert (tmp_path / "data/pretrain/corpus.jsonl").read_bytes() == before


def test_corpus_files_outside_corpus_dir_are_read_with_a_warning(tmp_path, caplog):
    path = tmp_path / "t.txt"
    path.write_text("hola\n", encoding="utf-8")
    cfg = DataConfig(source="text_file", text_file=str(path), corpus_dir=str(tmp_path / "corpus"))
    with caplog.at_level("WARNING"):
        summary = run_data_stage(cfg, seed=1, out=tmp_path / "data")
    assert summary["untracked_files"] == 1 and summary["pretrain_texts"] == 1
    assert "DVC does not track them" in caplog.text and str(path) in caplog.text


def test_vocab_trains_on_a_streamed_plain_text_corpus(tmp_path):
    from twilbert.config import VocabConfig
    from twilbert.data.corpus import iter_corpus_texts
    from twilbert.data.tokenizer import Tokenizer, train_vocab

    write_gz(tmp_path / "a.txt.gz", "".join(t + "\n" for t, _ in make_tweets(150, seed=1)))
    write_gz(tmp_path / "b.txt.gz", "".join(t + "\n" for t, _ in make_tweets(150, seed=2)))
    cfg = DataConfig(source="text_file", text_file=str(tmp_path / "*.txt.gz"), corpus_dir=str(tmp_path))
    summary = run_data_stage(cfg, seed=1, out=tmp_path / "data")
    corpus = tmp_path / "data/pretrain/corpus.jsonl"
    train_vocab(iter_corpus_texts(corpus), tmp_path / "vocab", VocabConfig(vocab_size=80, max_sentences=100), seed=1)
    tok = Tokenizer(tmp_path / "vocab")
    assert tok.meta["n_corpus_texts"] == summary["pretrain_texts"] and tok.meta["n_training_texts"] == 100
    assert all(tok.encode(["hola que tal"]))


@pytest.mark.parametrize("line, problem", [
    ('{"a": "hola", "b": null} {"a": "x"}', "Extra data"),
    ('{"a": "hola"}', "'b'"),
    ('["hola", null]', "list indices"),
    ('{"a": 3, "b": null}', '"a" must be a string'),
    ('{"a": "hola", "b": ["x"]}', '"b" a string or null'),
    ('{"a": "hola", "b": "adi', "Invalid control character"),  # the newline inside the string
])
def test_a_damaged_corpus_file_fails_naming_file_line_and_problem(tmp_path, line, problem):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"a": "bien", "b": null}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataStageError, match=rf"corpus\.jsonl:2: not a pretraining corpus row \(.*{problem}"):
        read_pretrain_corpus(corpus)


def test_corpus_rows_are_read_as_written_with_or_without_a_final_newline(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    rows = [("hola \"tú\" \\ ñ 😂", None), ("a", "b"), (" espacios ", "\u2028")]
    corpus.write_text("\n".join(json.dumps({"a": a, "b": b}, ensure_ascii=False) for a, b in rows), encoding="utf-8")
    assert read_pretrain_corpus(corpus) == rows
    corpus.write_text("".join(json.dumps({"a": a, "b": b}) + "\n" for a, b in rows) + "  \n", encoding="utf-8")
    with pytest.raises(DataStageError, match="corpus.jsonl:4"):
        read_pretrain_corpus(corpus)
