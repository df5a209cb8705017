"""The Python API: `load_classifier(dir).predict(texts)`, and the light import path it shares with predict."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from helpers import CATEGORIES, EMOTIONS, LONG, build_finetuned, parse_tsv
from twilbert import Prediction, load_classifier
from twilbert.cli import main

TEXTS = ["hola que tal", "", "😂🙏", "odio el tráfico de la ciudad", LONG]


@pytest.fixture(scope="module")
def single_dir(tmp_path_factory, vocab_dir):
    return build_finetuned(tmp_path_factory.mktemp("single") / "model", vocab_dir)


def test_predict_gives_labels_and_probabilities_that_the_cli_prints(single_dir, capsys):
    clf = load_classifier(single_dir)
    assert clf.labels == list(CATEGORIES) and clf.problem_type == "single_label_classification"
    predictions = clf.predict(TEXTS)
    assert len(predictions) == len(TEXTS) and all(isinstance(p, Prediction) for p in predictions)
    for p in predictions:
        assert set(p.probs) == set(CATEGORIES) and sum(p.probs.values()) == pytest.approx(1.0, abs=1e-5)
        assert p.label == max(p.probs, key=p.probs.get)
    assert main(["predict", "--model", str(single_dir), *TEXTS]) == 0
    header, rows = parse_tsv(capsys.readouterr().out)
    assert [r[2] for r in rows] == [p.label for p in predictions]
    cli_probs = np.array([[float(v) for v in r[3:]] for r in rows])
    api_probs = [[p.probs[column[len("prob_"):]] for column in header[3:]] for p in predictions]
    np.testing.assert_allclose(cli_probs, api_probs, atol=1e-6)  # the CLI rounds to 6 decimals


def test_one_text_gives_one_prediction_and_order_is_kept(single_dir):
    clf = load_classifier(single_dir, batch_size=2)
    each = [clf.predict(t) for t in TEXTS]
    assert all(isinstance(p, Prediction) for p in each)
    for together in (clf.predict(TEXTS), clf.predict(TEXTS[::-1])[::-1]):
        for a, b in zip(each, together):
            assert a.label == b.label and a.probs == pytest.approx(b.probs, abs=1e-6)


def test_multi_label_predictions_are_the_labels_over_the_threshold(tmp_path, vocab_dir):
    clf = load_classifier(build_finetuned(tmp_path / "multi", vocab_dir, kind="multi_label"))
    assert clf.problem_type == "multi_label_classification"
    for p in clf.predict(TEXTS):
        assert set(p.probs) == set(EMOTIONS)
        assert p.label == [e for e in EMOTIONS if p.probs[e] >= 0.5]


def test_regression_predictions_are_values_without_probabilities(tmp_path, vocab_dir):
    clf = load_classifier(build_finetuned(tmp_path / "reg", vocab_dir, kind="regression"))
    predictions = clf.predict(TEXTS)
    assert clf.problem_type == "regression" and clf.labels == []
    assert all(isinstance(p.label, float) and p.probs == {} for p in predictions)
    np.testing.assert_allclose([p.label for p in predictions], clf.scores(TEXTS), atol=1e-6)


def test_a_two_text_model_takes_aux(tmp_path, vocab_dir):
    clf = load_classifier(build_finetuned(tmp_path / "aux", vocab_dir, aux_header="CONTEXT"))
    assert clf.aux_header == "CONTEXT"
    assert len(clf.predict(["hola", "adiós"], aux=["contexto", ""])) == 2
    with pytest.raises(ValueError, match="two texts"):
        clf.predict(["hola"])


def test_the_predict_path_imports_neither_mlflow_nor_dvc_nor_scikit_learn(single_dir):
    """Start-up time: `twilbert predict` imports torch and its own modules, not the pipeline's tools."""
    probe = (
        "import sys; from twilbert.cli import main; import twilbert; twilbert.load_classifier; "
        f"assert main(['predict', '--model', {str(single_dir)!r}, 'hola']) == 0; "
        "print(sorted(m for m in ('mlflow', 'dvc', 'sklearn', 'scipy', 'transformers', 'hydra') if m in sys.modules),"
        " file=sys.stderr)"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "[]"
