"""The Python API: ``load_classifier(directory).predict(texts)``, in the manner of pysentimiento's analyzers::

    from twilbert import load_classifier
    clf = load_classifier("models/finetuned/tass_default")
    clf.predict("odio los lunes")      # Prediction(label='N', probs={'N': ..., 'NEU': ..., 'NONE': ..., 'P': ...})
    clf.predict(["hola", "qué asco"])  # a list of Predictions, in input order

It runs the same path as ``twilbert predict`` (the command is built on it): the model's own tweet
preprocessing, truncation to its ``max_len_test`` and, for a k-fold directory, the average of its folds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterable, Optional, Sequence, Union, overload

import numpy as np

from twilbert.inference.inputs import Chunk
from twilbert.inference.predict import FinetunedModel, load_finetuned, predict_stream

Label = Union[str, list[str], float]


@dataclass(frozen=True)
class Prediction:
    """One text's prediction.

    ``label``: the class (single-label), the classes over the threshold (multi-label), or the value
    (regression). ``probs``: every class's probability (softmax, or sigmoid for multi-label); empty
    for regression.
    """

    label: Label
    probs: dict[str, float] = field(default_factory=dict)


class Classifier:
    """A finetuned model ready to label texts; see :func:`load_classifier`."""

    def __init__(self, model: FinetunedModel, batch_size: int = 64, precision: str = "fp32"):
        self.model = model
        self.batch_size, self.precision = batch_size, precision

    @property
    def labels(self) -> list[str]:
        """Class names in the model's output order (empty for regression)."""
        return self.model.labels

    @property
    def problem_type(self) -> str:
        """single_label_classification, multi_label_classification or regression."""
        return self.model.problem_type

    @property
    def aux_header(self) -> Optional[str]:
        """The second text the model was trained with (pass it as ``aux``), or None."""
        return self.model.aux_header

    def write(self, chunks: Iterable[Chunk], out: IO[str], fmt: str = "tsv", with_text: bool = True,
              header: bool = True) -> int:
        """Label ``chunks`` (``twilbert.inference.inputs``) and write one TSV or JSON line each to ``out``, as
        ``twilbert predict`` does; returns the number of lines written (header excluded)."""
        return predict_stream(self.model, chunks, out, fmt, with_text, header, self.batch_size, self.precision)

    def scores(self, texts: Sequence[str], aux: Optional[Sequence[str]] = None) -> np.ndarray:
        """Probabilities (N, C), or values (N,) for regression, in input order."""
        return self.model.scores(list(texts), None if aux is None else list(aux), self.batch_size, self.precision)

    @overload
    def predict(self, texts: str, aux: Optional[str] = None) -> Prediction: ...

    @overload
    def predict(self, texts: Sequence[str], aux: Optional[Sequence[str]] = None) -> list[Prediction]: ...

    def predict(self, texts, aux=None):
        """The prediction of one text, or a list of them (in input order) for a sequence of texts."""
        if isinstance(texts, str):
            return self.predict([texts], None if aux is None else [aux])[0]
        scores = self.scores(texts, aux)
        decided = self.model.decide(scores)
        if self.problem_type == "regression":
            return [Prediction(value) for value in decided]
        rows = scores.astype(np.float64).tolist()
        return [Prediction(label, dict(zip(self.labels, row))) for label, row in zip(decided, rows)]


def load_classifier(directory: Union[str, Path], device: str = "cpu", blend: bool = True, batch_size: int = 64,
                    precision: str = "fp32") -> Classifier:
    """A finetune stage output (``models/finetuned/<task>``, or its ``baseline/``) as a :class:`Classifier`.

    ``device``: cpu, cuda, cuda:N or auto. ``blend``: a k-fold directory averages its folds' probabilities
    (else it uses the selected fold's model). Reads safetensors, JSON and .npz only.
    """
    return Classifier(load_finetuned(directory, device, blend), batch_size, precision)
