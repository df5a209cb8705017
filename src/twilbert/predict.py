"""Label new tweets with a finetuned model directory, streaming: read, tokenize, batch by length, write.

Input is read in chunks of ``CHUNK_SIZE`` lines, so memory stays flat however long it is. Within a
chunk the texts are tokenized together, sorted by length and batched (each batch pads only to its
own longest row), and the scores are put back in input order. Every input line gets exactly one
output line: a blank line, or one that preprocessing empties (only emoji, only a URL), is labelled
as the model's placeholder text (``preprocess.empty_text``, ``[vacío]`` by default), and a text
longer than the model's ``max_len_test`` tokens is truncated to it.

Any finetune stage output works: a TWilBert or Hugging Face encoder under the classification head,
or the TF-IDF baseline (the model card's ``backbone``); a k-fold directory blends its folds' models.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterable, Iterator, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch

from twilbert.config import ConfigError, TaskConfig
from twilbert.data.preprocess import Preprocessor
from twilbert.data.tokenizer import CLS_ID, META_FILE, MODEL_FILE, PAD_ID, SEP_ID, Tokenizer
from twilbert.model.backbone import HF_DIR, TWilBertPacker, load_classifier
from twilbert.model.card import CONFIG_NAME, CheckpointError, ModelCard, read_card
from twilbert.model.io import WEIGHTS_NAME
from twilbert.train.loop import resolve_device
from twilbert.train.scoring import decide, predict_scores

log = logging.getLogger(__name__)

CHUNK_SIZE = 10_000  # lines read, scored and written at a time
FORMATS = ("tsv", "jsonl")
BACKBONES = ("twilbert", "hf", "baseline")
# What each kind of model directory holds besides config.json ("hf/": the HF config and tokenizer).
# The baseline's are twilbert.baseline's FEATURES_FILE and WEIGHTS_FILE, spelled out: importing that
# module imports scikit-learn, which `predict` of a neural model never needs (start-up time).
MODEL_FILES = {
    "twilbert": (WEIGHTS_NAME, MODEL_FILE, META_FILE),
    "hf": (WEIGHTS_NAME, HF_DIR + "/"),
    "baseline": ("features.json", "weights.npz"),
}
PROBLEM_TYPES = ("single_label_classification", "multi_label_classification", "regression")  # HF's names


class PredictError(ValueError):
    """A model directory or an input cannot be used; the one-line message names the file and the fix."""


# --------------------------------------------------------------------------------------------
# Model directories
# --------------------------------------------------------------------------------------------


def read_model_config(directory: Union[str, Path], backbones: Sequence[str] = BACKBONES,
                      command: str = "predict") -> ModelCard:
    """The model card (config.json) of a model directory, after checking that every file its backbone needs is there."""
    directory = Path(directory)
    if not directory.is_dir():
        raise PredictError(f"{directory}: model directory not found")
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise PredictError(f"{directory}: missing {CONFIG_NAME}; a twilbert model directory holds {CONFIG_NAME}, "
                           f"{', '.join(MODEL_FILES['twilbert'])} (written by the pretrain and finetune stages)")
    try:
        card = read_card(path)
    except CheckpointError as err:
        raise PredictError(str(err)) from None
    backbone = card.kind
    if backbone not in backbones:
        raise PredictError(f"{path}: backbone {backbone!r} is not supported by {command} yet "
                           f"(supported: {', '.join(backbones)})")
    files = MODEL_FILES[backbone]
    missing = [name for name in files if not (directory / name).exists()]
    if missing:
        raise PredictError(f"{directory}: missing {', '.join(missing)}; a {backbone} model directory holds "
                           f"{CONFIG_NAME}, {', '.join(files)}")
    return card


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
        if isinstance(self.packer, TWilBertPacker):  # the same rows, packed without a loop over texts
            tokenizer = self.packer.tokenizer
            return pack_texts(tokenizer.encode(texts), tokenizer.encode(aux) if aux is not None else None, max_len)
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
        return sorted(self.task.task.categories, key=self.task.task.categories.get)

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
        spec = self.task.task
        return PROBLEM_TYPES[2] if spec.regression else PROBLEM_TYPES[1] if spec.multi_label else PROBLEM_TYPES[0]

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
        from twilbert.baseline import load_baseline  # scikit-learn: only for baseline directories

        try:
            model, _ = load_baseline(directory)
        except (OSError, ValueError, KeyError) as err:
            raise PredictError(f"{directory}: unreadable baseline model ({err})") from None
        return Member(directory, model, None)
    try:
        model, packer, _ = load_classifier(directory)
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
# Packing token ids into rows
# --------------------------------------------------------------------------------------------


def _place(ids: np.ndarray, seqs: Sequence[Sequence[int]], max_len: int, start: Union[int, np.ndarray]) -> np.ndarray:
    """Write ``seqs[i][:max_len]`` into row i of ``ids`` from column ``start`` (or ``start[i]``).

    Returns the kept lengths.
    """
    lengths = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
    flat = np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int32, count=int(lengths.sum()))
    row = np.repeat(np.arange(len(seqs)), lengths)  # (total,) the text each token belongs to
    col = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)  # (total,) position in its text
    keep = col < max_len
    offset = start if np.isscalar(start) else start[row[keep]]
    ids[row[keep], col[keep] + offset] = flat[keep]
    return np.minimum(lengths, max_len).astype(np.int32)


def pack_texts(
    a: Sequence[Sequence[int]], b: Optional[Sequence[Sequence[int]]], max_len: int
) -> dict[str, np.ndarray]:
    """``tokenizer.pack_pairs`` without a Python loop over rows: the same arrays, built by numpy scatters."""
    n = len(a)
    width = 2 * max_len + 3 if b is not None else max_len + 2
    ids = np.full((n, width), PAD_ID, dtype=np.int32)  # (N, T)
    rows = np.arange(n)
    ids[:, 0] = CLS_ID
    len_a = _place(ids, a, max_len, 1)
    length = len_a + 2
    ids[rows, length - 1] = SEP_ID
    if b is not None:
        len_b = _place(ids, b, max_len, length)
        length = length + len_b + 1
        ids[rows, length - 1] = SEP_ID
    return {"input_ids": ids, "len_a": len_a, "length": length.astype(np.int32)}


# --------------------------------------------------------------------------------------------
# Input: lines and TSV rows, in chunks
# --------------------------------------------------------------------------------------------


class Chunk(NamedTuple):
    ids: list  # 1-based line (or argument) numbers, or the values of the TSV's ID column
    texts: list[str]
    aux: Optional[list[str]]  # second texts (segment B), when the model takes them


def open_input(path: str) -> IO[bytes]:
    """A file, or stdin for ``-``, as bytes: :func:`iter_lines` decodes it line by line (and says where it cannot)."""
    if path == "-":
        try:  # closefd=False: closing the input must not close the process's stdin
            return open(sys.stdin.fileno(), "rb", closefd=False)
        except (AttributeError, OSError, ValueError):  # a replaced sys.stdin (tests) has no file descriptor
            return getattr(sys.stdin, "buffer", None) or io.BytesIO(sys.stdin.read().encode("utf-8"))
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise PredictError(f"{path}: input file not found") from None
    except IsADirectoryError:
        raise PredictError(f"{path}: is a directory, expected a text file") from None
    except OSError as err:
        raise PredictError(f"{path}: cannot read the input ({err.strerror})") from None


MAX_SHOWN = 5  # line numbers quoted in a warning


def iter_lines(handle: Iterable[Union[bytes, str]], name: str = "input") -> Iterator[str]:
    """Lines without their ``\\n`` / ``\\r\\n`` ending, split on ``\\n`` only; blank lines are kept.

    Bytes are decoded as UTF-8 (a leading BOM dropped). A line that is not valid UTF-8 is still
    labelled, its undecodable bytes read as U+FFFD, and a warning names those lines; lines with NUL
    bytes get a warning that the input looks binary.
    """
    bad: list[int] = []
    binary: list[int] = []
    n_bad = n_binary = 0
    for number, raw in enumerate(handle, 1):
        if isinstance(raw, bytes):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if b"\0" in raw:
                n_binary += 1
                if len(binary) < MAX_SHOWN:
                    binary.append(number)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                n_bad += 1
                if len(bad) < MAX_SHOWN:
                    bad.append(number)
                line = raw.decode("utf-8", errors="replace")
        else:
            line = raw
        if line.endswith("\n"):
            line = line[:-1]
        yield line[:-1] if line.endswith("\r") else line
    if n_binary:
        log.warning("%s looks like a binary file, not text: %d lines hold NUL bytes (lines %s); every line was "
                    "labelled as text anyway", name, n_binary, _shown(binary, n_binary))
    if n_bad:
        log.warning("%s: %d lines are not valid UTF-8 (lines %s); their undecodable bytes were read as U+FFFD. "
                    "Convert the input to UTF-8 (e.g. iconv -f latin1 -t utf-8)", name, n_bad, _shown(bad, n_bad))


def _shown(numbers: list[int], total: int) -> str:
    return ", ".join(map(str, numbers)) + (", ..." if total > len(numbers) else "")


def text_rows(lines: Iterable[str]) -> Iterator[tuple[int, str, None]]:
    """One text per line, numbered from 1."""
    for number, line in enumerate(lines, 1):
        yield number, line, None


def tsv_rows(lines: Iterable[str], name: str, column: str, id_column: Optional[str] = None,
             aux_column: Optional[str] = None,
             allow_empty: bool = False) -> Iterator[tuple[Union[int, str], str, Optional[str]]]:
    """(id, text, aux) per data row of a tab-separated file with a header line.

    The id is the ``id_column`` value (default: ``ID`` when the header has it), else the line number.
    A row with too few fields still gets a prediction (missing fields read as empty) and is reported.
    ``allow_empty``: a file without even a header line has no rows, rather than being an error.
    """
    lines = iter(lines)
    header = next(lines, None)
    if header is None:
        if allow_empty:
            return
        raise PredictError(f"{name}: empty input; expected a header line with a {column!r} column")
    cols = [c.strip() for c in header.split("\t")]

    def index(col: Optional[str], what: str) -> Optional[int]:
        if col is None:
            return None
        if col not in cols:
            shown = ", ".join(repr(c) for c in cols[:12])
            raise PredictError(f"{name}:1: no {col!r} column in the header ({shown}); {what}")
        return cols.index(col)

    i_text = index(column, "set --column to the text column")
    i_id = index(id_column, "set --id-column to one of them") if id_column else (
        cols.index("ID") if "ID" in cols else None)
    i_aux = index(aux_column, "the model was trained with this second text; add it or pass --aux-input")
    width = len(cols)
    bad: list[int] = []
    n_bad = 0
    for number, line in enumerate(lines, 2):
        fields = line.split("\t")
        if len(fields) != width:
            n_bad += 1
            if len(bad) < MAX_SHOWN:
                bad.append(number)
            fields += [""] * (width - len(fields))
        row_id = fields[i_id] if i_id is not None else number
        yield row_id, fields[i_text], (None if i_aux is None else fields[i_aux])
    if n_bad:
        log.warning("%s: %d rows have a field count other than the header's %d (lines %s); missing fields "
                    "were read as empty", name, n_bad, len(cols), _shown(bad, n_bad))


def with_aux(rows: Iterable[tuple], aux_lines: Iterable[str], name: str, aux_name: str) -> Iterator[tuple]:
    """Pair each row with the line of the same number in the aux file; the counts must agree."""
    aux_lines = iter(aux_lines)
    n = 0
    for n, (row_id, text, _) in enumerate(rows, 1):
        aux = next(aux_lines, None)
        if aux is None:
            raise PredictError(f"{aux_name}: {n - 1} lines, fewer than the input {name}; "
                               "give one second text per input line")
        yield row_id, text, aux
    if next(aux_lines, None) is not None:
        raise PredictError(f"{aux_name}: more lines than the {n} of the input {name}; "
                           "give one second text per input line")


def chunked(rows: Iterable[tuple], name: str, size: int = CHUNK_SIZE, allow_empty: bool = False) -> Iterator[Chunk]:
    """Chunks of at most ``size`` rows; an input without a single row is an error unless ``allow_empty``."""
    if size < 1:
        raise ValueError(f"chunk size must be >= 1, got {size}")
    n = 0
    rows = iter(rows)
    while True:
        block = list(itertools.islice(rows, size))
        if not block:
            break
        n += len(block)
        ids, texts, aux = (list(col) for col in zip(*block))
        yield Chunk(ids, texts, None if aux[0] is None else aux)
    if n == 0 and not allow_empty:
        raise PredictError(f"{name}: empty input; nothing to label (give TEXT arguments, a non-empty file or stdin)")


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
