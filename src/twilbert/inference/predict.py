"""Label new tweets with a finetuned model directory, streaming: read, tokenize, batch by length, write.

Input is read in chunks of ``inputs.CHUNK_SIZE`` lines, so memory stays flat however long it is. Within a
chunk the texts are tokenized together, sorted by length and batched (each batch pads only to its
own longest row), and the scores are put back in input order. Every input line gets exactly one
output line: a blank line, or one that preprocessing empties (only emoji, only a URL), is labelled
as the model's placeholder text (``preprocess.empty_text``, ``[vacío]`` by default), and a text
longer than the model's ``max_len_test`` tokens is truncated to it.

Any finetune stage output works: a TWilBert or Hugging Face encoder under the classification head,
or the TF-IDF baseline (the model card's ``backbone``); a k-fold directory blends its folds' models.
"""

from __future__ import annotations

import itertools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch

from twilbert.config import ConfigError, TaskConfig
from twilbert.data.packers import TWilBertPacker
from twilbert.data.preprocess import Preprocessor
from twilbert.data.tokenizer import META_FILE, MODEL_FILE, Tokenizer
from twilbert.device import resolve_device
from twilbert.evaluation.scoring import decide, predict_scores
from twilbert.inference.inputs import Chunk, PredictError
from twilbert.model.backbone import HF_DIR
from twilbert.model.card import CONFIG_NAME, CheckpointError, ModelCard, read_model_dir
from twilbert.model.finetuned import load_classifier_module
from twilbert.model.hf import label_names, problem_type
from twilbert.model.io import WEIGHTS_NAME

log = logging.getLogger(__name__)

FORMATS = ("tsv", "jsonl")
BACKBONES = ("twilbert", "hf", "baseline")
# What each kind of model directory holds besides config.json ("hf/": the HF config and tokenizer).
# The baseline's are twilbert.model.baseline's FEATURES_FILE and WEIGHTS_FILE, spelled out: importing that
# module imports scikit-learn, which `predict` of a neural model never needs (start-up time).
MODEL_FILES = {
    "twilbert": (WEIGHTS_NAME, MODEL_FILE, META_FILE),
    "hf": (WEIGHTS_NAME, HF_DIR + "/"),
    "baseline": ("features.json", "weights.npz"),
}


# --------------------------------------------------------------------------------------------
# Model directories
# --------------------------------------------------------------------------------------------


def read_model_config(directory: Union[str, Path], backbones: Sequence[str] = BACKBONES,
                      command: str = "predict") -> ModelCard:
    """The model card (config.json) of a model directory, after checking that every file its backbone needs is there."""
    return read_model_dir(Path(directory), {kind: MODEL_FILES[kind] for kind in backbones}, command, PredictError)
@dataclass
class Member:
    """One model of a directory: a neural classifier with its packer, or the TF-IDF baseline (packer None)."""

    directory: Path
    model: Any
    packer: Any

    @property
    def preprocess(self) -> Preprocessor:
        return (self.packer or self.model).preprocess

    def encode(self, texts: Sequence[str], aux: Optional[Sequence[str]], max_len: int) -> dict[str, np.ndarray]:
        return self.packer.pack(texts, aux, max_len)

    def scores(self, texts: Sequence[str], aux: Optional[Sequence[str]], task: TaskConfig, max_len: int,
               batch_size: int, device: torch.device, precision: str) -> np.ndarray:
        if self.packer is None:
            return self.model.predict_scores(texts, aux)
        data = self.encode(texts, aux, max_len)
        data["labels"] = np.zeros(len(texts), dtype=np.int64)  # the shared batching carries targets; none here
        return predict_scores(self.model, data, task, batch_size, device, precision, self.packer)


@dataclass
class FinetunedModel:
    """A finetune stage output ready to label texts: its model(s), task definition and text length.

    A k-fold directory holds one model per fold; by default their scores are averaged (blended), as
    the stage blends them for its test metrics.
    """

    members: list[Member]
    task: TaskConfig
    max_len: int
    device: torch.device
    backbone: str = "twilbert"

    @property
    def labels(self) -> list[str]:
        """Category names in output order (empty for regression)."""
        return label_names(self.task.task)

    @property
    def aux_header(self) -> Optional[str]:
        """Name of the second text the model was trained with (segment B), or None."""
        return self.task.dataset.aux_header

    @property
    def placeholder(self) -> str:
        return self.members[0].preprocess.cfg.empty_text

    @property
    def problem_type(self) -> str:
        """Hugging Face's name of the task kind: single_label_classification, multi_label_classification, regression."""
        return problem_type(self.task.task)

    def decide(self, scores: np.ndarray) -> list:
        """Per row of ``scores``: the label, the list of labels over the threshold (multi-label), or the value."""
        if self.task.task.regression:
            return scores.astype(np.float64).tolist()
        decisions = decide(scores, self.task)
        labels = np.array(self.labels, dtype=object)
        if not self.task.task.multi_label:
            return labels[decisions].tolist()
        return [labels[row].tolist() for row in decisions.astype(bool)]

    def scores(self, texts: Sequence[str], aux: Optional[Sequence[str]] = None, batch_size: int = 64,
               precision: str = "fp32") -> np.ndarray:
        """Probabilities (N, C) (softmax, or sigmoid for multi-label) or regression values (N,), in input order."""
        if (aux is None) != (self.aux_header is None):
            raise ValueError(f"this model takes {'two texts' if self.aux_header else 'one text'} per example")
        each = [m.scores(texts, aux, self.task, self.max_len, batch_size, self.device, precision) for m in self.members]
        return each[0] if len(each) == 1 else np.mean(each, axis=0)


def load_finetuned(directory: Union[str, Path], device: str = "cpu", blend: bool = True) -> FinetunedModel:
    """Load a finetune stage output (safetensors, JSON and .npz only) for prediction.

    ``blend``: a k-fold directory predicts with every fold's model, averaged; else with its selected fold's.
    """
    directory = Path(directory)
    card = read_model_config(directory)
    path = directory / CONFIG_NAME
    backbone = card.kind
    needed = ("task",) if backbone == "baseline" else ("task", "head")
    absent = [key for key in needed if getattr(card, key) is None]
    if absent:
        raise PredictError(
            f"{path}: no {' or '.join(map(repr, absent))} key, so {directory} is not a finetuned model; "
            "predict needs a finetune stage output (`twilbert embeddings` works with pretrained models too)"
        )
    target = resolve_device(device)
    member_dirs = [directory]
    if blend and card.kfold_members:
        member_dirs = [directory / member for member in card.kfold_members]
    members = [load_member(d, target) for d in member_dirs]
    return FinetunedModel(members, card.task, card.text_len(), target, backbone)


def load_member(directory: Path, device: torch.device) -> Member:
    """One model directory's classifier (twilbert, hf) or baseline, checked against its own files."""
    card = read_model_config(directory)
    backbone = card.kind
    if backbone == "baseline":
        from twilbert.model.baseline import load_baseline  # scikit-learn: only for baseline directories

        try:
            model, _ = load_baseline(directory)
        except (OSError, ValueError, KeyError) as err:
            raise PredictError(f"{directory}: unreadable baseline model ({err})") from None
        return Member(directory, model, None)
    try:
        model, packer, _ = load_classifier_module(directory)
    except CheckpointError:
        raise  # already names the file and the parameter
    except (ConfigError, KeyError) as err:
        raise PredictError(f"{directory / CONFIG_NAME}: not a finetuned {backbone} model ({err})") from None
    except ImportError as err:
        raise PredictError(f"{directory}: a {backbone} model needs the transformers package ({err})") from None
    except (OSError, RuntimeError) as err:  # e.g. sentencepiece on a corrupt spm.model
        raise PredictError(f"{directory}: unreadable model files ({err})") from None
    if isinstance(packer, TWilBertPacker):
        check_vocab_fits(directory, packer.tokenizer, card.vocab_size)
    return Member(directory, model.to(device).eval(), packer)


def check_vocab_fits(directory: Path, tokenizer: Tokenizer, vocab_size: int) -> None:
    """A swapped spm.model would index past the embedding table; say so before it does."""
    if tokenizer.vocab_size > vocab_size:
        raise PredictError(
            f"{directory / MODEL_FILE}: {tokenizer.vocab_size} pieces but the model has {vocab_size} embeddings; "
            "this spm.model does not belong to the model"
        )


# --------------------------------------------------------------------------------------------
# Output: TSV with a header line, or JSON lines
# --------------------------------------------------------------------------------------------

_TSV_UNSAFE = str.maketrans({"\t": " ", "\n": " ", "\r": " "})


class PredictionWriter:
    """Formats predictions: id, text (optional), label(s) or value, and the score of every class."""

    def __init__(self, fm: FinetunedModel, fmt: str = "tsv", with_text: bool = True):
        if fmt not in FORMATS:
            raise ValueError(f"output format must be one of {FORMATS}, got {fmt!r}")
        self.fm = fm
        self.fmt, self.with_text = fmt, with_text
        self.labels = fm.labels
        spec = fm.task.task
        self.kind = "regression" if spec.regression else "multi_label" if spec.multi_label else "single_label"

    def header(self) -> str:
        cols = ["id"] + (["text"] if self.with_text else [])
        if self.kind == "regression":
            cols.append("value")
        else:
            cols.append("labels" if self.kind == "multi_label" else "label")
            cols += [f"prob_{label}".translate(_TSV_UNSAFE) for label in self.labels]
        return "\t".join(cols) + "\n"

    def lines(self, chunk: Chunk, scores: np.ndarray) -> Iterator[str]:
        decided = self.fm.decide(scores)
        probs = None if self.kind == "regression" else np.round(scores.astype(np.float64), 6).tolist()
        texts = chunk.texts if self.with_text else itertools.repeat(None)
        if self.fmt == "jsonl":
            key = {"regression": "value", "multi_label": "labels", "single_label": "label"}[self.kind]
            for i, (row_id, text, out) in enumerate(zip(chunk.ids, texts, decided)):
                record = {"id": row_id}
                if self.with_text:
                    record["text"] = text
                record[key] = round(out, 6) if self.kind == "regression" else out
                if probs is not None:
                    record["probs"] = dict(zip(self.labels, probs[i]))
                yield json.dumps(record, ensure_ascii=False) + "\n"
            return
        n_fields = 2 + self.with_text
        template = "\t".join(["{}"] * n_fields) + ("" if probs is None else "\t{:.6f}" * len(self.labels)) + "\n"
        for i, (row_id, text, out) in enumerate(zip(chunk.ids, texts, decided)):
            head = [str(row_id).translate(_TSV_UNSAFE)]
            if self.with_text:
                head.append(text.translate(_TSV_UNSAFE))
            if self.kind == "regression":
                head.append(f"{out:.6f}")
            else:
                head.append("|".join(out) if self.kind == "multi_label" else out)
            yield template.format(*head, *(probs[i] if probs is not None else ()))


# --------------------------------------------------------------------------------------------
# The whole path
# --------------------------------------------------------------------------------------------


def predict_stream(fm: FinetunedModel, chunks: Iterable[Chunk], out: IO[str], fmt: str = "tsv",
                   with_text: bool = True, header: bool = True, batch_size: int = 64,
                   precision: str = "fp32") -> int:
    """Score and write every chunk as it comes; returns the number of lines written (header excluded)."""
    writer = PredictionWriter(fm, fmt, with_text)
    n = n_blank = 0
    for k, chunk in enumerate(chunks):
        if k == 0 and header and fmt == "tsv":
            out.write(writer.header())
        scores = fm.scores(chunk.texts, chunk.aux, batch_size, precision)
        out.writelines(writer.lines(chunk, scores))
        n += len(chunk.texts)
        n_blank += sum(not t.strip() for t in chunk.texts)
        log.debug("predicted %d texts", n)
    if n_blank:
        log.info("%d blank input lines labelled as the placeholder text %r", n_blank, fm.placeholder)
    return n
