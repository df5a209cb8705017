"""The user's corpus files: paths, globs and lists, and the budget of malformed rows."""

import gzip
import logging

import pytest

from twilbert.config import ConfigError, DataConfig, load_config
from twilbert.data.formats import DataFormatError
from twilbert.data.sources import (
    BadRowBudget,
    BlankLines,
    CorpusError,
    iter_corpus_rows,
    resolve_corpus_files,
    untracked_files,
)


def text_cfg(spec, **kw) -> DataConfig:
    return DataConfig(source="text_file", text_file=spec, **kw)


def rows(cfg: DataConfig, budget: BadRowBudget | None = None):
    return list(iter_corpus_rows(cfg, resolve_corpus_files(cfg), budget or BadRowBudget(cfg.max_bad_rows)))


def test_a_list_is_read_in_order_and_each_glob_sorted(tmp_path):
    for name in ("b.txt", "a.txt", "c.txt.gz"):
        data = f"tuit de {name}\n".encode()
        (tmp_path / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    cfg = text_cfg([str(tmp_path / "c.txt.gz"), str(tmp_path / "*.txt")])
    assert [f.name for f in resolve_corpus_files(cfg)] == ["c.txt.gz", "a.txt", "b.txt"]
    assert rows(cfg) == [("tuit de c.txt.gz", None), ("tuit de a.txt", None), ("tuit de b.txt", None)]


def test_a_file_matched_twice_is_read_once(tmp_path, caplog):
    (tmp_path / "a.txt").write_text("hola\n")
    with caplog.at_level(logging.WARNING):
        files = resolve_corpus_files(text_cfg([str(tmp_path / "a.txt"), str(tmp_path / "*.txt")]))
    assert len(files) == 1 and "listed twice" in caplog.text


def test_a_glob_matching_nothing_names_the_key(tmp_path):
    with pytest.raises(CorpusError, match=r"data\.text_file: .*\*\.txt.* matches no file"):
        resolve_corpus_files(text_cfg(str(tmp_path / "*.txt")))


def test_a_missing_file_is_reported_before_anything_is_read(tmp_path):
    (tmp_path / "a.txt").write_text("hola\n")
    with pytest.raises(DataFormatError, match="nope.txt: file not found"):
        resolve_corpus_files(text_cfg([str(tmp_path / "a.txt"), str(tmp_path / "nope.txt")]))


def test_files_outside_the_corpus_dir_are_flagged_untracked(tmp_path):
    inside, outside = tmp_path / "corpus" / "a.txt", tmp_path / "elsewhere" / "b.txt"
    assert untracked_files([inside, outside], str(tmp_path / "corpus")) == [outside]
    assert untracked_files([tmp_path / "corpus2" / "c.txt"], str(tmp_path / "corpus")) != []


def test_bad_rows_within_the_budget_are_logged_with_file_and_line_and_skipped(tmp_path, caplog):
    a, b = tmp_path / "a.tsv", tmp_path / "b.tsv"
    a.write_text("1\thola\t2\tque tal\n3\tsolo tres\t4\n")
    b.write_bytes(b"5\tmal \xff\t6\tok\n7\tbien\t8\tbien\n")
    cfg = DataConfig(source="pairs_file", pairs_file=[str(a), str(b)], pairs_header=False, max_bad_rows=2)
    budget = BadRowBudget(cfg.max_bad_rows)
    with caplog.at_level(logging.WARNING):
        assert rows(cfg, budget) == [("hola", "que tal"), ("bien", "bien")]
    assert budget.skipped == 2
    assert budget.listed[0].startswith(f"{a}:2: expected 4 fields, found 3")
    assert budget.listed[1].startswith(f"{b}:1: invalid UTF-8")
    assert f"{a}:2:" in caplog.text and f"{b}:1:" in caplog.text and "max_bad_rows=2" in caplog.text


def test_one_bad_row_past_the_budget_fails_with_its_file_line_and_the_budget(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"uno\nmal \xff\ndos\npeor \xfe\ntres\n")
    with pytest.raises(CorpusError) as info:
        rows(text_cfg(str(path), max_bad_rows=1))
    message = str(info.value)
    assert f"{path}:2: invalid UTF-8" in message and f"{path}:4: invalid UTF-8" in message
    assert "data.max_bad_rows=1" in message


def test_without_a_budget_a_bad_row_raises_the_readers_own_error(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"uno\nmal \xff\ndos\n")
    with pytest.raises(DataFormatError) as info:
        rows(text_cfg(str(path)))
    assert str(info.value).startswith(f"{path}:2: invalid UTF-8")


def test_blank_lines_of_a_text_corpus_are_counted_and_skipped_not_malformed(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("uno\n\ndos\n   \n\ntres\n")
    blank = BlankLines()
    budget = BadRowBudget(0)
    assert list(iter_corpus_rows(text_cfg(str(path)), [path], budget, blank)) == [
        ("uno", None), ("dos", None), ("tres", None)]
    assert blank.count == 3 and budget.skipped == 0


def test_config_checks_the_corpus_keys(tiny_raw):
    for data, key in (({"source": "text_file"}, "data.text_file"), ({"max_bad_rows": -1}, "data.max_bad_rows"),
                      ({"source": "pairs_file", "pairs_file": []}, "data.pairs_file"), ({"corpus_dir": ""}, "data.corpus_dir"),
                      ({"corpus_dir": "./data"}, "data.corpus_dir")):
        raw = {**tiny_raw, "data": {**tiny_raw["data"], **data}}
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(raw)
    raw = {**tiny_raw, "data": {**tiny_raw["data"], "source": "pairs_file", "pairs_file": ["a.tsv", "b/*.gz"]}}
    assert load_config(raw).data.corpus_files() == ["a.tsv", "b/*.gz"]
