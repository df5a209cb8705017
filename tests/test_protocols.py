"""Honest by default: a task without a test file selects on a dev split carved from train and reports
its dev file as test; TWilBert's dev-as-test stays available, marked."""

import json
from collections import Counter

import numpy as np
import pytest

from finetune_data import first, make_config, make_pretrained, write_rows, write_task
from helpers import REPO
from twilbert.config import ConfigError, compose
from twilbert.data.tasks import load_task
from twilbert.train.finetune.stage_work import finetune_task


@pytest.fixture(scope="module")
def raw():
    return compose(["model=tiny"], REPO / "conf")


def ids(examples) -> list:
    return list(examples.ids)


def test_default_carves_a_seeded_stratified_dev_from_train_and_tests_on_the_dev_file(tmp_path, raw):
    cfg = make_config(raw, {"t": write_task(tmp_path / "data", sizes=(80, 16, 0), test=False)})
    task = first(cfg)
    assert cfg.finetuning.no_test_protocol == "carve_dev"
    data = load_task(task, seed=1)
    given_dev = [f"2-{i}" for i in range(16)]
    assert data.protocol == "carve_dev" and not data.test_is_dev and data.dev_from_train
    assert ids(data.test) == given_dev  # the dev file, untouched, is the test
    assert len(data.dev) == 12 and len(data.train) == 68  # ceil(0.15 * 80) held out
    assert not set(ids(data.dev)) & set(ids(data.train)) and not set(ids(data.dev)) & set(given_dev)
    train_counts, dev_counts = Counter(data.train.labels + data.dev.labels), Counter(data.dev.labels)
    for label, n in train_counts.items():  # stratified: each class's share within one example
        assert abs(dev_counts[label] - n * 12 / 80) <= 1, (label, dev_counts, train_counts)
    assert ids(load_task(task, seed=1).dev) == ids(data.dev)
    assert ids(load_task(task, seed=2).dev) != ids(data.dev)


def test_dev_as_test_keeps_twilberts_protocol(tmp_path, raw):
    cfg = make_config(raw, {"t": write_task(tmp_path / "data", test=False)}, no_test_protocol="dev_as_test")
    data = load_task(first(cfg), seed=1, no_test_protocol="dev_as_test")
    assert data.protocol == "dev_as_test" and data.test_is_dev and data.test is data.dev
    assert len(data.train) == 48 and not data.dev_from_train


def test_a_task_with_a_test_file_is_not_affected_by_the_protocol(tmp_path, raw):
    cfg = make_config(raw, {"t": write_task(tmp_path / "data")})
    for protocol in ("carve_dev", "dev_as_test"):
        data = load_task(first(cfg), seed=1, no_test_protocol=protocol)
        assert data.protocol == "test_file" and (len(data.train), len(data.dev), len(data.test)) == (48, 16, 16)


def test_no_dev_and_no_test_file_carves_both_disjoint(tmp_path, raw):
    cfg = make_config(raw, {"t": write_task(tmp_path / "data", sizes=(100, 0, 0), dev=False, test=False)})
    data = load_task(first(cfg), seed=1)
    assert data.protocol == "carve_dev" and data.test_from_train and not data.test_is_dev
    parts = [set(ids(data.train)), set(ids(data.dev)), set(ids(data.test))]
    assert sum(map(len, parts)) == 100 and len(set.union(*parts)) == 100
    assert (len(data.test), len(data.dev)) == (15, 13)


def test_unknown_protocol_is_a_config_error(tmp_path, raw):
    with pytest.raises(ConfigError, match="no_test_protocol"):
        make_config(raw, {"t": write_task(tmp_path / "data")}, no_test_protocol="peek")


def test_multi_label_falls_back_to_each_examples_rarest_label(tmp_path, raw):
    # 5 labels: nearly every label set is unique, so stratifying on sets is impossible.
    rng = np.random.default_rng(0)
    flags = rng.random((90, 5)) < 0.5
    flags[:6] = [[i == j for j in range(5)] for i in (4, 4, 4, 4, 4, 4)]  # label 4: rare, 6 examples alone
    flags[6:, 4] = False
    rows = [[f"r{i}", f"texto {i}", "|".join(str(int(f)) for f in row)] for i, row in enumerate(flags)]
    write_rows(tmp_path / "data" / "train.tsv", ["ID", "TEXT", "CLASS"], rows)
    write_rows(tmp_path / "data" / "dev.tsv", ["ID", "TEXT", "CLASS"], rows[:10])
    task = {"dataset": {"data_dir": str(tmp_path / "data"), "train_file": "train.tsv", "dev_file": "dev.tsv",
                        "test_file": None},
            "task": {"multi_label": True, "categories": {c: i for i, c in enumerate("abcde")},
                     "eval_metric": "jaccard"}}
    data = load_task(first(make_config(raw, {"m": task})), seed=3)
    held = np.asarray(data.dev.labels)
    assert len(held) == 14 and held.sum(axis=0).min() >= 1  # every label, the rare one too, in the carved dev
    assert 0 < held[:, 4].sum() <= 2  # its share: 6 * 14/90 ~ 1


def test_regression_is_stratified_on_quantile_bins(tmp_path, raw):
    rows = [[f"r{i}", f"texto {i}", f"{v:.3f}"] for i, v in enumerate(np.linspace(0, 1, 100))]
    write_rows(tmp_path / "data" / "train.tsv", ["ID", "TEXT", "CLASS"], rows)
    write_rows(tmp_path / "data" / "dev.tsv", ["ID", "TEXT", "CLASS"], rows[:10])
    task = {"dataset": {"data_dir": str(tmp_path / "data"), "train_file": "train.tsv", "dev_file": "dev.tsv",
                        "test_file": None}, "task": {"regression": True, "eval_metric": "pearson"}}
    data = load_task(first(make_config(raw, {"r": task})), seed=3)
    held = np.sort(np.asarray(data.dev.labels))
    assert len(held) == 15
    deciles = np.searchsorted(np.linspace(0, 1, 11)[1:-1], held, side="right")
    assert set(deciles) == set(range(10))  # every decile of the target is represented


@pytest.mark.reliability
def test_finetune_selects_on_the_carved_dev_and_reports_the_dev_file_as_test(tmp_path, raw):
    pretrained = make_pretrained(tmp_path / "pretrained")
    task = write_task(tmp_path / "data", sizes=(60, 20, 0), test=False)
    runs = {}
    for protocol in ("carve_dev", "dev_as_test"):
        cfg = make_config(raw, {"t": task}, epochs=2, no_test_protocol=protocol, baseline_row=True)
        runs[protocol] = finetune_task(cfg, first(cfg), pretrained, tmp_path / protocol / "model",
                                       tmp_path / protocol / "results")
    honest, optimistic = runs["carve_dev"], runs["dev_as_test"]
    assert honest["protocol"] == "carve_dev" and not honest["test_is_dev"]
    assert (honest["n_train"], honest["n_dev"], honest["n_test"]) == (51, 9, 20)
    assert honest["test"] != honest["dev"]
    assert optimistic["protocol"] == "dev_as_test" and optimistic["test_is_dev"]
    assert (optimistic["n_train"], optimistic["n_dev"], optimistic["n_test"]) == (60, 20, 20)
    assert optimistic["test"] == optimistic["dev"]
    baseline = json.loads((tmp_path / "carve_dev" / "results" / "baseline.json").read_text())
    assert baseline["protocol"] == "carve_dev" and baseline["n_test"] == 20
