"""The TF-IDF baseline: its scores, its pickle-free save, and the baseline row beside every model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.svm import LinearSVC

from finetune_data import first, make_config, make_pretrained, multi_label_rows, write_task
from helpers import REPO, make_tweets
from twilbert.config import TaskConfig, TaskSpec, compose
from twilbert.data.preprocess import Preprocessor
from twilbert.model.baseline import fit_baseline, load_baseline, save_baseline
from twilbert.train.finetune.stage_work import finetune_task

TWEETS = make_tweets(60, seed=4)
TEXTS = [t for t, _ in TWEETS]
NAMES = ("P", "N", "NEU", "NONE")
LABELS = np.array([NAMES.index(y) for _, y in TWEETS])
SPEC = TaskSpec(categories={n: i for i, n in enumerate(NAMES)})


@pytest.fixture(scope="module")
def raw():
    return compose(["model=tiny"], REPO / "conf")


@pytest.mark.parametrize("model", ["svm", "logreg"])
def test_scores_are_a_softmax_over_the_linear_models_margins(model):
    baseline = fit_baseline(TEXTS[:40], None, LABELS[:40], SPEC, model, seed=0)
    scores = baseline.predict_scores(TEXTS[40:])
    X_train, X_test = baseline.features(TEXTS[:40]), baseline.features(TEXTS[40:])
    if model == "logreg":  # logistic regression: exactly its probabilities
        clf = LogisticRegression(C=1.0, max_iter=1000, random_state=0).fit(X_train, LABELS[:40])
        np.testing.assert_allclose(scores, clf.predict_proba(X_test), atol=1e-5)
    else:
        clf = LinearSVC(C=1.0, random_state=0).fit(X_train, LABELS[:40])
        np.testing.assert_array_equal(scores.argmax(1), clf.predict(X_test))
    np.testing.assert_allclose(scores.sum(1), 1.0, rtol=1e-5)


def test_binary_logreg_scores_equal_its_probabilities():
    y = (LABELS[:40] == 0).astype(int)
    spec = TaskSpec(categories={"no": 0, "yes": 1})
    baseline = fit_baseline(TEXTS[:40], None, y, spec, "logreg", seed=0)
    clf = LogisticRegression(max_iter=1000, random_state=0).fit(baseline.features(TEXTS[:40]), y)
    np.testing.assert_allclose(baseline.predict_scores(TEXTS[40:]), clf.predict_proba(baseline.features(TEXTS[40:])),
                               atol=1e-5)


def test_class_absent_from_training_is_never_predicted():
    keep = LABELS[:40] != 3
    baseline = fit_baseline([t for t, k in zip(TEXTS, keep) if k], None, LABELS[:40][keep], SPEC, "svm")
    scores = baseline.predict_scores(TEXTS[40:])
    assert scores.shape == (20, 4) and (scores[:, 3] < 1e-6).all()


@pytest.mark.filterwarnings("ignore:Label not 3 is present")
def test_multi_label_baseline_scores_each_label_and_a_constant_label_stays_constant():
    rows = multi_label_rows(40, seed=1)
    texts = [r[1] for r in rows]
    flags = np.array([[int(f) for f in r[2].split("|")] + [0] for r in rows])  # a 4th label never on
    spec = TaskSpec(multi_label=True, categories={"a": 0, "b": 1, "c": 2, "never": 3})
    scores = fit_baseline(texts, None, flags, spec, "logreg").predict_scores(texts)
    assert scores.shape == (40, 4)
    assert (scores[:, 3] < 1e-6).all()
    assert ((scores[:, :3] >= 0.5) == flags[:, :3]).mean() > 0.8  # it fits its training data


def test_regression_baseline_is_a_ridge_on_the_same_features():
    y = np.array([t.count("feliz") + 0.5 for t in TEXTS])
    baseline = fit_baseline(TEXTS, None, y, TaskSpec(regression=True), c=10.0)
    pred = baseline.predict_scores(TEXTS)
    assert pred.shape == (60,) and np.corrcoef(pred, y)[0, 1] > 0.9


def test_saved_baseline_reloads_without_pickle_and_predicts_the_same(tmp_path):
    prep = Preprocessor()
    baseline = fit_baseline(TEXTS[:40], TEXTS[20:60], LABELS[:40], SPEC, "logreg", preprocess=prep)
    save_baseline(tmp_path / "b", baseline, "logreg", 1.0, {"task": TaskConfig(name="t")})
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["checksums.json", "config.json", "features.json",
                                                                 "weights.npz"]
    with np.load(tmp_path / "b" / "weights.npz", allow_pickle=False) as z:
        assert all(z[k].dtype != object for k in z.files)
    loaded, config = load_baseline(tmp_path / "b")
    assert config.backbone == "baseline" and config.model["baseline_model"] == "logreg"
    np.testing.assert_allclose(loaded.predict_scores(TEXTS[40:], TEXTS[:20]),
                               baseline.predict_scores(TEXTS[40:], TEXTS[:20]), rtol=1e-5, atol=1e-7)


def test_baseline_row_has_the_same_metrics_layout_as_the_model_it_sits_beside(tmp_path, raw):
    pretrained = make_pretrained(tmp_path / "pretrained")
    cfg = make_config(raw, {"t": write_task(tmp_path / "data", aux=True)}, epochs=1, baseline_row=True)
    finetune_task(cfg, first(cfg), pretrained, tmp_path / "model", tmp_path / "results")
    neural = json.loads((tmp_path / "results" / "metrics.json").read_text())
    baseline = json.loads((tmp_path / "results" / "baseline.json").read_text())
    assert (neural["model"], baseline["model"]) == ("twilbert", "baseline")
    assert set(baseline) == set(neural)
    assert set(baseline["dev"]) == set(neural["dev"]) and set(baseline["test"]) == set(neural["test"])
    assert baseline["official_metric"] == neural["official_metric"] and baseline["best_epoch"] is None
    assert baseline["test"]["official"] > 0.5  # the label cue words are easy for n-grams
    saved = json.loads((tmp_path / "model" / "baseline" / "config.json").read_text())
    assert saved["preprocess"] == json.loads((pretrained / "meta.json").read_text())["preprocess"]


def test_baseline_backbone_needs_no_pretrained_model(tmp_path, raw):
    cfg = make_config(raw, {"t": write_task(tmp_path / "data")}, backbone="baseline", baseline_row=True,
                      baseline_model="logreg")
    metrics = finetune_task(cfg, first(cfg), tmp_path / "absent", tmp_path / "model", tmp_path / "results")
    assert (metrics["model"], metrics["model_name"]) == ("baseline", "tfidf-logreg")
    note = json.loads((tmp_path / "results" / "baseline.json").read_text())
    assert "official_metric" not in note and "metrics.json" in note["skipped"]
    assert load_baseline(tmp_path / "model")[1].task.name == "t"


def test_baseline_row_off_leaves_a_note_without_scores(tmp_path, raw):
    cfg = make_config(raw, {"t": write_task(tmp_path / "data")}, backbone="baseline", baseline_row=False)
    finetune_task(cfg, first(cfg), tmp_path / "absent", tmp_path / "model", tmp_path / "results")
    note = json.loads((tmp_path / "results" / "baseline.json").read_text())
    assert note == {"task": "t", "model": "baseline", "skipped": "finetuning.baseline_row is false"}


def test_single_class_training_split_gives_a_constant_baseline_not_a_failure():
    spec = TaskSpec(categories={"0": 0, "1": 1})
    texts = [t for t, _ in make_tweets(12)]
    baseline = fit_baseline(texts, None, np.zeros(12, dtype=np.int64), spec)
    assert (baseline.predict_scores(texts[:4], None).argmax(-1) == 0).all()
