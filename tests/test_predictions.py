"""predictions.tsv: its format, its read-back, and the finetune run that writes it."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from finetune_data import first, make_config, make_pretrained, write_task
from helpers import REPO
from twilbert.config import TaskSpec, compose
from twilbert.data.tasks import load_task
from twilbert.evaluation.predictions import (
    Predictions,
    PredictionsFileError,
    aligned,
    format_predictions,
    parse_predictions,
    read_predictions,
    write_predictions,
)
from twilbert.reports.results import read_metrics
from twilbert.train.finetune.stage_work import baseline_task, finetune_task

SINGLE = TaskSpec(categories={"P": 0, "N": 1, "NEU": 2})
MULTI = TaskSpec(multi_label=True, categories={"joy": 0, "anger": 1, "fear": 2}, eval_metric="jaccard")
REGRESSION = TaskSpec(regression=True, eval_metric="pearson")


@pytest.fixture(scope="module")
def raw():
    return compose(["model=tiny"], REPO / "conf")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    return make_pretrained(tmp_path_factory.mktemp("pre") / "pretrained")


def test_single_label_lines_name_the_categories(tmp_path):
    preds = Predictions(["a1", "b2", "c3"], np.array([0, 1, 2]), np.array([2, 1, 0]), SINGLE)
    assert format_predictions(preds) == "id\tgold\tpred\na1\tP\tNEU\nb2\tN\tN\nc3\tNEU\tP\n"
    write_predictions(tmp_path / "predictions.tsv", preds)
    back = read_predictions(tmp_path / "predictions.tsv", SINGLE)
    assert back.ids == preds.ids and back.gold.tolist() == [0, 1, 2] and back.pred.tolist() == [2, 1, 0]


def test_multi_label_lines_join_the_names_and_leave_none_empty(tmp_path):
    gold = np.array([[1, 0, 1], [0, 0, 0], [0, 1, 0]])
    pred = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 0]])
    preds = Predictions(["1", "2", "3"], gold, pred, MULTI)
    assert format_predictions(preds) == "id\tgold\tpred\n1\tjoy|fear\tjoy\n2\t\tanger|fear\n3\tanger\t\n"
    write_predictions(tmp_path / "p.tsv", preds)
    back = read_predictions(tmp_path / "p.tsv", MULTI)
    assert np.array_equal(back.gold, gold) and np.array_equal(back.pred, pred)
    assert back.scores() == preds.scores()


def test_regression_values_read_back_exactly(tmp_path):
    gold = np.array([0.1, 2.0 / 3.0, -1e-300])
    pred = np.array([np.float32(0.3), 1e17, 5.0], dtype=np.float64)
    write_predictions(tmp_path / "p.tsv", Predictions(["x", "y", "z"], gold, pred, REGRESSION))
    back = read_predictions(tmp_path / "p.tsv", REGRESSION)
    assert back.gold.tolist() == gold.tolist() and back.pred.tolist() == pred.tolist()


@pytest.mark.parametrize("text, message", [
    ("id\tlabel\tpred\n", r"p\.tsv:1: expected the header"),
    ("", r"p\.tsv:1: expected the header 'id\\tgold\\tpred', got an empty file"),
    ("id\tgold\tpred\na\tP\tN\nb\tP\n", r"p\.tsv:3: expected 3 tab-separated fields"),
    ("id\tgold\tpred\na\tP\tMAYBE\n", r"p\.tsv:2: pred 'MAYBE' is not a category of the task \(P, N, NEU\)"),
])
def test_a_malformed_file_is_named_with_its_line(tmp_path, text, message):
    (tmp_path / "p.tsv").write_text(text)
    with pytest.raises(PredictionsFileError, match=message):
        read_predictions(tmp_path / "p.tsv", SINGLE)


def test_a_regression_value_that_is_not_a_number_is_named_with_its_line():
    with pytest.raises(PredictionsFileError, match=r"run\.tsv:3: gold 'n/a' is not a number"):
        parse_predictions("id\tgold\tpred\na\t1.0\t2.0\nb\tn/a\t1.0\n", REGRESSION, "run.tsv")


def test_runs_on_other_examples_or_other_gold_are_not_aligned():
    one = Predictions(["a", "b"], np.array([0, 1]), np.array([0, 0]), SINGLE)
    other_ids = Predictions(["a", "c"], np.array([0, 1]), np.array([1, 1]), SINGLE)
    other_gold = Predictions(["a", "b"], np.array([0, 2]), np.array([1, 1]), SINGLE)
    gold, preds = aligned([one, Predictions(["a", "b"], np.array([0, 1]), np.array([1, 1]), SINGLE)])
    assert gold.tolist() == [0, 1] and [p.tolist() for p in preds] == [[0, 0], [1, 1]]
    with pytest.raises(PredictionsFileError, match=r"B and A are not on the same test examples .*missing \['b'\]"):
        aligned([one, other_ids], ["A", "B"])
    with pytest.raises(PredictionsFileError, match=r"disagree on the gold label of test id 'b'"):
        aligned([one, other_gold], ["A", "B"])


# --------------------------------------------------------------------------------------------
# The finetune run writes it
# --------------------------------------------------------------------------------------------


def _finetune(tmp_path, cfg, pretrained):
    task = first(cfg)
    metrics = finetune_task(cfg, task, pretrained, tmp_path / "model", tmp_path / "results")
    return task, metrics, read_predictions(tmp_path / "results" / "predictions.tsv", task.task)


def _test_file(path):
    with open(path, encoding="utf-8") as fh:
        return [(row["ID"], row["CLASS"]) for row in csv.DictReader(fh, delimiter="\t")]


def test_the_finetune_run_writes_each_test_example_and_its_scores_match_the_metrics(tmp_path, raw, pretrained):
    cfg = make_config(raw, {"t": write_task(tmp_path / "data")}, epochs=1)
    task, metrics, preds = _finetune(tmp_path, cfg, pretrained)
    lines = (tmp_path / "results" / "predictions.tsv").read_text().splitlines()
    written = [tuple(line.split("\t")[:2]) for line in lines[1:]]
    assert written == _test_file(tmp_path / "data" / "test.tsv")  # each test id with its gold label, in order
    assert preds.scores() == metrics["test"]  # every metric recomputed from the file equals the run's
    assert json.loads((tmp_path / "results" / "metrics.json").read_text())["test"] == metrics["test"]


@pytest.mark.parametrize("kind", ["multi", "regression"])
def test_multi_label_and_regression_runs_write_predictions_that_score_as_reported(tmp_path, raw, pretrained, kind):
    cfg = make_config(raw, {"t": write_task(tmp_path / "data", kind)}, epochs=1)
    _, metrics, preds = _finetune(tmp_path, cfg, pretrained)
    assert len(preds.ids) == metrics["n_test"] == 16
    assert preds.scores() == pytest.approx(metrics["test"], abs=1e-12)


def test_a_kfold_run_writes_the_blended_test_prediction(tmp_path, raw, pretrained):
    cfg = make_config(raw, {"t": write_task(tmp_path / "data")}, backbone="baseline", kfold=3)
    _, metrics, preds = _finetune(tmp_path, cfg, pretrained)
    assert "kfold" in metrics and len(preds.ids) == 16
    assert preds.scores() == metrics["test"]


def test_without_a_test_file_the_dev_file_reported_as_test_is_written(tmp_path, raw, pretrained):
    cfg = make_config(raw, {"t": write_task(tmp_path / "data", test=False)}, backbone="baseline",
                      no_test_protocol="dev_as_test")
    _, metrics, preds = _finetune(tmp_path, cfg, pretrained)
    assert metrics["test_is_dev"]
    assert preds.ids == [i for i, _ in _test_file(tmp_path / "data" / "dev.tsv")]
    assert preds.scores() == metrics["test"]


def test_the_baseline_row_on_its_own_writes_its_metrics_and_predictions(tmp_path, raw, pretrained):
    cfg = make_config(raw, {"t": write_task(tmp_path / "data")}, baseline_row=True)
    task = first(cfg)
    metrics = baseline_task(cfg, task, pretrained, tmp_path / "model", tmp_path / "baseline")
    assert metrics["model"] == "baseline"
    assert json.loads((tmp_path / "baseline" / "metrics.json").read_text()) == metrics
    preds = read_predictions(tmp_path / "baseline" / "predictions.tsv", task.task)
    assert preds.ids == load_task(task, cfg.seed).test.ids and preds.scores() == metrics["test"]
    assert not (tmp_path / "baseline" / "epochs.csv").exists()


def test_the_baseline_row_from_the_vocabulary_is_the_row_from_the_pretrained_model_carrying_it(tmp_path, raw,
                                                                                               pretrained):
    # the baseline stage reads data/vocab, the finetuning runs models/pretrained: same texts, same row
    cfg = make_config(raw, {"t": write_task(tmp_path / "data")}, baseline_row=True)
    vocab = pretrained.parent / f"{pretrained.name}-vocab"
    for name, source in (("vocab", vocab), ("model", pretrained)):
        baseline_task(cfg, first(cfg), source, tmp_path / name / "model", tmp_path / name / "baseline")
    for file in ("metrics.json", "predictions.tsv"):
        assert (tmp_path / "vocab" / "baseline" / file).read_bytes() == (tmp_path / "model" / "baseline" / file).read_bytes()


def test_without_a_baseline_row_the_baseline_folder_holds_the_skipped_note_and_no_prediction(tmp_path, raw, pretrained):
    cfg = make_config(raw, {"t": write_task(tmp_path / "data")}, baseline_row=False)
    (tmp_path / "baseline").mkdir()
    (tmp_path / "baseline" / "predictions.tsv").write_text("id\tgold\tpred\nx\tN\tP\n")  # from an earlier run
    assert baseline_task(cfg, first(cfg), pretrained, tmp_path / "model", tmp_path / "baseline") is None
    note = json.loads((tmp_path / "baseline" / "metrics.json").read_text())
    assert note["skipped"] == "finetuning.baseline_row is false"
    # every output of the DVC stage exists (DVC requires it), and the stale row is gone
    assert (tmp_path / "baseline" / "predictions.tsv").read_text() == "id\tgold\tpred\n"
    assert json.loads((tmp_path / "model" / "skipped.json").read_text()) == note
    assert read_metrics(tmp_path / "baseline" / "metrics.json") is None  # the tables leave it out
