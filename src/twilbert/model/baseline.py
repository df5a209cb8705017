"""The baseline row: TF-IDF word (1-2) and character (2-5, within word boundaries) n-grams under a
linear model, on the neural models' preprocessed text: LinearSVC (``svm``) or LogisticRegression
(``logreg``), one per label for multi-label tasks, Ridge for regression. Scores come out as the neural
models' do (softmax of the margins, a sigmoid per label, raw values), so thresholds, blending and
metrics are shared. Saved as JSON and ``.npz`` arrays read with ``allow_pickle=False``: no pickle."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import scipy.sparse as sp
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.multiclass import OneVsRestClassifier
from sklearn.svm import LinearSVC

from twilbert.config import PreprocessConfig, TaskSpec
from twilbert.data.preprocess import Preprocessor
from twilbert.io_utils import save_npz
from twilbert.model.card import CONFIG_NAME, ModelCard, read_card
from twilbert.model.manifest import verify_model_dir, write_manifest

log = logging.getLogger(__name__)

WORD_NGRAMS = (1, 2)
CHAR_NGRAMS = (2, 5)
TOKEN_PATTERN = r"[#@]?\w+|[^\w\s]"  # words, #hashtags, @users, and each emoji or punctuation mark
AUX_JOINER = " | "  # a multiple-input task's two texts, as one document
FEATURES_FILE = "features.json"
WEIGHTS_FILE = "weights.npz"
ABSENT_LOGIT = -1e4  # a class never seen in training is never predicted
CONSTANT_LOGIT = 30.0  # a label constant in training (multi-label) is predicted as that constant

PathLike = Union[str, Path]


def _vectorizers(word_vocab: Optional[list[str]] = None, char_vocab: Optional[list[str]] = None):
    common = dict(sublinear_tf=True, lowercase=True, dtype=np.float32)
    word = TfidfVectorizer(analyzer="word", ngram_range=WORD_NGRAMS, token_pattern=TOKEN_PATTERN,
                           vocabulary=word_vocab, **common)
    char = TfidfVectorizer(analyzer="char_wb", ngram_range=CHAR_NGRAMS, vocabulary=char_vocab, **common)
    return word, char


def _vocabulary(vectorizer: TfidfVectorizer) -> list[str]:
    terms = [""] * len(vectorizer.vocabulary_)
    for term, index in vectorizer.vocabulary_.items():
        terms[index] = term
    return terms


@dataclass
class TfidfBaseline:
    word: TfidfVectorizer
    char: TfidfVectorizer
    coef: np.ndarray  # (K, F) one row per class / label (K = 1 for regression)
    intercept: np.ndarray  # (K,)
    link: str  # softmax | sigmoid | identity
    preprocess: Preprocessor

    def documents(self, texts: Sequence[str], aux_texts: Optional[Sequence[str]] = None) -> list[str]:
        docs = [self.preprocess(t) for t in texts]
        if aux_texts is not None:
            docs = [d + AUX_JOINER + self.preprocess(a) for d, a in zip(docs, aux_texts)]
        return docs

    def features(self, texts: Sequence[str], aux_texts: Optional[Sequence[str]] = None) -> sp.csr_matrix:
        docs = self.documents(texts, aux_texts)
        return sp.hstack([self.word.transform(docs), self.char.transform(docs)]).tocsr()  # (N, F)

    def predict_scores(self, texts: Sequence[str], aux_texts: Optional[Sequence[str]] = None) -> np.ndarray:
        """Probabilities (N, C), or values (N,) for regression, in input order."""
        z = self.features(texts, aux_texts) @ self.coef.T.astype(np.float64) + self.intercept  # (N, K)
        z = np.asarray(z)
        if self.link == "identity":
            return z[:, 0].astype(np.float32)
        if self.link == "sigmoid":
            return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)

    @property
    def n_features(self) -> int:
        return self.coef.shape[1]


def fit_baseline(
    texts: Sequence[str],
    aux_texts: Optional[Sequence[str]],
    labels: np.ndarray,
    spec: TaskSpec,
    model: str = "svm",
    c: float = 1.0,
    seed: int = 0,
    preprocess: Optional[Preprocessor] = None,
    class_weights: Optional[np.ndarray] = None,
) -> TfidfBaseline:
    """Fit the vectorizers and the linear model on one training split."""
    word, char = _vectorizers()
    baseline = TfidfBaseline(word, char, np.zeros((0, 0)), np.zeros(0), "softmax", preprocess or Preprocessor())
    docs = baseline.documents(texts, aux_texts)
    X = sp.hstack([word.fit_transform(docs), char.fit_transform(docs)]).tocsr()  # (N, F)
    labels = np.asarray(labels)
    if spec.regression:
        reg = Ridge(alpha=1.0 / c).fit(X, labels.astype(np.float64))
        baseline.coef, baseline.intercept = np.atleast_2d(reg.coef_), np.atleast_1d(reg.intercept_)
        baseline.link = "identity"
        return baseline
    if spec.multi_label:
        ovr = OneVsRestClassifier(_linear(model, c, seed, None)).fit(X, labels.astype(np.int64))
        baseline.coef, baseline.intercept = _stack_binary(ovr.estimators_, X.shape[1])
        baseline.link = "sigmoid"
        return baseline
    y = labels.astype(np.int64)
    n_classes = len(spec.categories)
    present = np.unique(y)
    if len(present) < 2:
        # Nothing to separate: the baseline is the constant predictor of the only class seen
        # (what a majority baseline is), rather than a failure that would sink the task's run.
        log.warning("baseline: the training split has a single class %s; predicting it always", present.tolist())
        baseline.coef = np.zeros((n_classes, X.shape[1]), dtype=np.float32)
        baseline.intercept = np.full(n_classes, ABSENT_LOGIT)
        baseline.intercept[present[0]] = 0.0
        return baseline
    weights = None if class_weights is None else {int(i): float(class_weights[i]) for i in present}
    clf = _linear(model, c, seed, weights).fit(X, y)
    coef, intercept = np.atleast_2d(clf.coef_), np.atleast_1d(clf.intercept_)
    if len(clf.classes_) == 2:  # one margin d for the second class: softmax([0, d]) = [1 - σ(d), σ(d)]
        coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.array([0.0, intercept[0]])
    full_coef = np.zeros((n_classes, X.shape[1]), dtype=np.float32)
    full_intercept = np.full(n_classes, ABSENT_LOGIT)
    full_coef[clf.classes_], full_intercept[clf.classes_] = coef, intercept
    baseline.coef, baseline.intercept = full_coef, full_intercept
    return baseline


def _linear(model: str, c: float, seed: int, class_weight: Optional[dict]):
    if model == "svm":
        return LinearSVC(C=c, class_weight=class_weight, random_state=seed)
    if model == "logreg":
        return LogisticRegression(C=c, class_weight=class_weight, max_iter=1000, random_state=seed)
    raise ValueError(f"finetuning.baseline_model must be 'svm' or 'logreg', got {model!r}")


def _stack_binary(estimators: list, n_features: int) -> tuple[np.ndarray, np.ndarray]:
    """One-vs-rest rows; a label constant in training becomes a constant logit."""
    coef = np.zeros((len(estimators), n_features), dtype=np.float32)
    intercept = np.zeros(len(estimators))
    for i, est in enumerate(estimators):
        if hasattr(est, "coef_"):
            coef[i], intercept[i] = est.coef_.reshape(-1), float(np.ravel(est.intercept_)[0])
        else:  # sklearn's constant predictor: the label was always (or never) on
            intercept[i] = CONSTANT_LOGIT if int(np.ravel(est.y_)[0]) == 1 else -CONSTANT_LOGIT
    return coef, intercept


# --------------------------------------------------------------------------------------------
# Saving and loading, without pickle
# --------------------------------------------------------------------------------------------


def baseline_description(model: str, c: float, link: str) -> dict:
    return {"baseline_model": model, "c": c, "link": link, "word_ngrams": list(WORD_NGRAMS),
            "char_ngrams": list(CHAR_NGRAMS), "token_pattern": TOKEN_PATTERN}


def save_baseline(directory: PathLike, baseline: TfidfBaseline, model: str, c: float, extra: dict) -> Path:
    """``config.json`` (``"backbone": "baseline"``), ``features.json`` and ``weights.npz``.

    ``extra``: the finetuned card's keys (task, max_len_test, finetuning, best_epoch...)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    card = ModelCard(model=baseline_description(model, c, baseline.link), vocab_size=baseline.n_features,
                     max_positions=None, backbone="baseline", preprocess=baseline.preprocess.cfg, **extra)
    (directory / FEATURES_FILE).write_text(
        json.dumps({"word": _vocabulary(baseline.word), "char": _vocabulary(baseline.char)}, ensure_ascii=False),
        encoding="utf-8",
    )
    save_npz(directory / WEIGHTS_FILE, word_idf=baseline.word.idf_, char_idf=baseline.char.idf_,
             coef=baseline.coef.astype(np.float32), intercept=baseline.intercept.astype(np.float64))
    card.write(directory / CONFIG_NAME)
    write_manifest(directory)
    return directory


def load_baseline(directory: PathLike) -> tuple[TfidfBaseline, ModelCard]:
    """(baseline, model card) from :func:`save_baseline` output."""
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: missing; is {directory} a baseline model directory?")
    verify_model_dir(directory)
    card = read_card(config_path)
    if card.backbone != "baseline":
        raise ValueError(f"{config_path}: backbone is {card.backbone!r}, not 'baseline'")
    vocab = json.loads((directory / FEATURES_FILE).read_text(encoding="utf-8"))
    word, char = _vectorizers(vocab["word"], vocab["char"])
    with np.load(directory / WEIGHTS_FILE, allow_pickle=False) as z:
        word.idf_, char.idf_ = z["word_idf"], z["char_idf"]
        coef, intercept = z["coef"], z["intercept"]
    preprocess = Preprocessor(card.preprocess or PreprocessConfig())
    return TfidfBaseline(word, char, coef, intercept, card.model["link"], preprocess), card
