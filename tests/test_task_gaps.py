"""Task files that read but say less than they seem: ids repeated within a split or shared by two
(possible leakage) are warned about with their counts, in the log and in each run's metrics.json;
a text of NUL bytes alone is refused at its line."""

from __future__ import annotations

import json
import logging

import pytest

from finetune_data import first, make_config, write_rows, write_task
from helpers import REPO, fake_sdist, make_tweets
from twilbert.config import TaskDataset, compose, load_config
from twilbert.data.corpus import read_evomsa_tweets, stratified_split, write_task_split
from twilbert.data.formats import DataFormatError
from twilbert.data.tasks import load_task, read_task_split
from twilbert.train.finetune.stage_work import finetune_task

pytestmark = pytest.mark.reliability

LABELS = {"P": 0, "N": 1, "NEU": 2, "NONE": 3}


@pytest.fixture(scope="module")
def raw():
    return compose(["model=tiny"], REPO / "conf")


def rewrite_ids(path, ids: dict[int, str]) -> None:
    """Give data rows ``i`` (0-based) of a task file the id ``ids[i]``."""
    header, *rows = path.read_text(encoding="utf-8").splitlines()
    rows = [[*r.split("\t")] for r in rows]
    for i, new in ids.items():
        rows[i][0] = new
    write_rows(path, header.split("\t"), rows)


@pytest.mark.parametrize("text", ["\x00", "\x00\x00\x00\x00", "\x00\x01\x7f", "\u200b\x00"])
def test_a_task_text_of_nul_bytes_alone_is_refused_at_its_file_and_line(tmp_path, text):
    path = tmp_path / "train.tsv"
    write_rows(path, ["ID", "TEXT", "CLASS"], [["1", "hola", "P"], ["2", text, "N"], ["3", "a\x00b", "P"]])
    with pytest.raises(DataFormatError) as err:
        read_task_split(path, TaskDataset(), LABELS)
    assert str(err.value) == f"{path}:3: 'TEXT' field has no printable character (only NULs, controls or format " \
                             "marks; a binary file?)"  # line 4, a NUL inside a real text, reads


def test_a_second_text_of_nul_bytes_alone_is_refused_too(tmp_path):
    path = tmp_path / "train.tsv"
    write_rows(path, ["ID", "TEXT", "CONTEXT", "CLASS"], [["1", "hola", "\x00\x00", "P"]])
    with pytest.raises(DataFormatError, match=r"train\.tsv:2: 'CONTEXT' field has no printable character"):
        read_task_split(path, TaskDataset(aux_header="CONTEXT"), LABELS)


def test_ids_repeated_within_a_split_and_shared_across_splits_are_warned_with_counts(tmp_path, raw, caplog):
    task = write_task(tmp_path)
    rewrite_ids(tmp_path / "train.tsv", {0: "a", 1: "a", 2: "a", 3: "b", 4: "b", 5: "t1", 6: "t2", 7: "d1"})
    rewrite_ids(tmp_path / "test.tsv", {0: "t1", 1: " t2 "})  # ids compare without surrounding blanks
    rewrite_ids(tmp_path / "dev.tsv", {0: "d1", 1: "t1"})
    cfg = make_config(raw, {"t": task})
    with caplog.at_level(logging.WARNING, logger="twilbert.data.tasks"):
        splits = load_task(first(cfg), cfg.seed)
    assert splits.id_warnings == [
        "duplicate ids in train: 2 id(s) on 5 rows (e.g. 'a', 'b')",
        "ids shared by train and dev: 2 (possible leakage; e.g. 'd1', 't1')",
        "ids shared by train and test: 2 (possible leakage; e.g. 't1', 't2')",
        "ids shared by dev and test: 1 (possible leakage; e.g. 't1')",
    ]
    logged = [r.getMessage() for r in caplog.records if r.name == "twilbert.data.tasks"]
    assert logged == [f"task t: {w}" for w in splits.id_warnings]


def test_a_dev_file_used_as_test_is_checked_under_its_own_name(tmp_path, raw):
    task = write_task(tmp_path, test=False)  # carve_dev: the dev file is the test, dev carved from train
    rewrite_ids(tmp_path / "dev.tsv", {0: "1-0"})  # train's first id
    cfg = make_config(raw, {"t": task})
    assert load_task(first(cfg), cfg.seed).id_warnings == [
        "ids shared by train and dev: 1 (possible leakage; e.g. '1-0')"]


def test_the_id_warnings_reach_every_runs_metrics_json(tmp_path, raw):
    task = write_task(tmp_path / "data")
    rewrite_ids(tmp_path / "data" / "test.tsv", {0: "1-0", 1: "1-1", 2: "1-2"})
    cfg = make_config(raw, {"t": task}, backbone="baseline", baseline_row=True, baseline_model="logreg")
    finetune_task(cfg, first(cfg), tmp_path / "absent", tmp_path / "model", tmp_path / "results")
    metrics = json.loads((tmp_path / "results" / "metrics.json").read_text())
    assert "ids shared by train and test: 3 (possible leakage; e.g. '1-0', '1-1', '1-2')" in metrics["warnings"]


def test_a_task_without_id_gaps_gets_no_warnings_key(tmp_path, raw):
    cfg = make_config(raw, {"t": write_task(tmp_path / "data")}, backbone="baseline", baseline_model="logreg")
    finetune_task(cfg, first(cfg), tmp_path / "absent", tmp_path / "model", tmp_path / "results")
    assert "warnings" not in json.loads((tmp_path / "results" / "metrics.json").read_text())


def test_the_default_task_the_data_stage_writes_has_unique_disjoint_ids(tmp_path, raw):
    """The default pipeline's task gets no id warning, so its metrics.json bytes stay as they were."""
    fake_sdist(tmp_path / "evomsa.tar.gz", make_tweets(240, seed=5) + make_tweets(40, seed=5))  # repeated texts
    (tmp_path / "default").mkdir()
    tweets = read_evomsa_tweets(tmp_path / "evomsa.tar.gz", "2.0.14")
    for name, part in zip(("train", "dev", "test"), stratified_split(tweets, raw["data"]["split"], 0)):
        write_task_split(tmp_path / "default" / f"{name}.tsv", part)
    tass = raw["tasks"]["tass_default"]
    cfg = load_config({**raw, "tasks": {"tass_default": {
        **tass, "dataset": {**tass["dataset"], "data_dir": str(tmp_path / "default")}}}})
    assert load_task(first(cfg), cfg.seed).id_warnings == []
