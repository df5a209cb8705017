"""The model card: what a model directory's ``config.json`` says about its model, as one typed record.

Pretrain writes the encoder part (``model``, ``vocab_size``, ``max_positions``, ``max_len``); finetune
adds the classifier part (``backbone``, ``head``, ``task``, ``max_len_test``, ``finetuning``...).
Every reader loads it with :func:`read_card` (strict, like the config: an unknown or mistyped key
is an error naming the file and the key) and every writer goes through :meth:`ModelCard.to_json`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence, Union

from twilbert.config import ConfigError, FinetuningConfig, ModelConfig, PreprocessConfig, TaskConfig, from_dict, to_dict
from twilbert.errors import TwilbertError

CONFIG_NAME = "config.json"
BACKBONES = ("twilbert", "hf", "baseline")
REQUIRED_KEYS = ("model", "vocab_size", "max_positions")


class CheckpointError(TwilbertError, RuntimeError):
    """A model directory is unreadable or does not fit the model; the message names the file or parameter."""


class CardError(CheckpointError, ValueError):
    """A config.json is unreadable or does not match the model card; the message names the file and key."""


def row_width(max_len: int, n_segments: int) -> int:
    """Tokens in a packed row of ``n_segments`` texts of ``max_len`` tokens: ``[CLS] a [SEP] (b [SEP])``."""
    return n_segments * (max_len + 1) + 1


def max_text_len(max_positions: int, n_segments: int) -> int:
    """The longest text (in tokens) whose packed row of ``n_segments`` texts fits ``max_positions``."""
    return (max_positions - 1 - n_segments) // n_segments


def pretraining_positions(max_len: int) -> int:
    """Positions of a pretrained model: a reply pair, ``2 * max_len + 3``."""
    return row_width(max_len, 2)


def n_outputs(task: TaskConfig) -> int:
    """Outputs of the task's head: one value for regression, else one score per category."""
    return 1 if task.task.regression else len(task.task.categories)


@dataclass
class HeadConfig:
    """The classification head a finetuned model was built with (``finetuning``'s head keys)."""

    collapse_mode: Literal["avg", "cls"] = "avg"
    use_special_tokens: bool = True
    dropout: float = 0.1
    n_hidden: int = 0
    hidden_size: int = 256

    @classmethod
    def of(cls, ft: FinetuningConfig) -> "HeadConfig":
        return cls(**{f.name: getattr(ft, f.name) for f in dataclasses.fields(cls)})


@dataclass
class KFoldSummary:
    """A k-fold output's record: the folds' scores, and the fold models ``predict`` blends."""

    k: int
    fold_scores: list[float]
    mean_fold_score: float
    best_epochs: list[Optional[int]]  # None for the baseline, which has no epochs
    on: Literal["train", "train+dev"]
    members: list[str]  # fold model directories, relative to the output
    selected_fold: int  # the fold whose model is the directory's own


@dataclass
class ModelCard:
    """config.json. ``model`` is a ``ModelConfig`` for the twilbert backbone; for ``hf`` it is the
    Hugging Face config, for ``baseline`` the TF-IDF description (plain JSON, kept as read)."""

    model: Any
    vocab_size: int
    max_positions: Optional[int]  # None: the baseline, or an HF encoder without position embeddings
    max_len: Optional[int] = None  # representation.max_len of pretraining
    epoch: Optional[int] = None  # the pretraining epoch these weights are from
    metrics: Optional[dict[str, Any]] = None  # that epoch's held-out metrics, as logged
    backbone: Optional[str] = None  # twilbert | hf | baseline; None: twilbert (pretrain writes none)
    hf_dir: Optional[str] = None
    head: Optional[HeadConfig] = None
    preprocess: Optional[PreprocessConfig] = None
    task: Optional[TaskConfig] = None
    max_len_test: Optional[int] = None
    finetuning: Optional[FinetuningConfig] = None
    best_epoch: Optional[int] = None
    fold: Optional[int] = None
    kfold: Optional[KFoldSummary] = None

    source = CONFIG_NAME  # the file it was read from, for errors (an attribute, not a key)

    def __post_init__(self) -> None:
        if self.kind == "twilbert" and isinstance(self.model, dict):
            self.model = from_dict(ModelConfig, self.model, "model")
            self.model.validate("model")
        if self.kind == "twilbert" and self.max_positions is None:
            raise ConfigError("max_positions must be an integer for a twilbert model, got None")

    @classmethod
    def pretrained(cls, model: ModelConfig, vocab_size: int, max_len: int) -> "ModelCard":
        """The card of a model pretrained on reply pairs of ``max_len`` tokens per text."""
        return cls(model, vocab_size, pretraining_positions(max_len), max_len=max_len)

    # ---- derived values: computed here only ----

    @property
    def kind(self) -> str:
        return self.backbone or "twilbert"

    @property
    def is_finetuned(self) -> bool:
        return self.task is not None and (self.head is not None or self.kind == "baseline")

    @property
    def n_outputs(self) -> int:
        return n_outputs(self.require("task"))

    @property
    def n_segments(self) -> int:
        return 2 if self.task is not None and self.task.dataset.aux_header else 1

    @property
    def kfold_members(self) -> list[str]:
        return list(self.kfold.members) if self.kfold else []

    def text_len(self, n_segments: Optional[int] = None) -> int:
        """Tokens per text at prediction: the test length, cut so that the packed row fits the
        positions (twilbert); the HF stage already fitted it to its template; 0: the baseline does not truncate."""
        n_segments = self.n_segments if n_segments is None else n_segments
        if self.kind != "twilbert":
            return int(self.max_len_test or self.max_len or 0)
        declared = self.max_len_test or self.max_len or self.max_positions
        return max(1, min(declared, max_text_len(self.max_positions, n_segments)))

    def fits(self, max_len: int, n_segments: int) -> bool:
        return self.max_positions is None or row_width(max_len, n_segments) <= self.max_positions

    def require(self, key: str) -> Any:
        value = getattr(self, key)
        if value is None:
            raise CardError(f"{self.source}: no {key!r} key; this is not a finetuned model directory")
        return value

    @property
    def model_config(self) -> ModelConfig:
        if not isinstance(self.model, ModelConfig):
            raise CardError(f"{CONFIG_NAME}: backbone {self.kind!r} holds no twilbert model config")
        return self.model

    # ---- writing ----

    def replace(self, **fields: Any) -> "ModelCard":
        """This card with ``fields`` set (e.g. a pretrained card with a classifier's keys added)."""
        return dataclasses.replace(self, **fields)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object, in field order. Unset optional keys are left out, except those a finetune
        stage output has always spelled out as null (``max_positions``; ``head``/``best_epoch``)."""
        spelled_out = {"max_positions"} | ({"head", "best_epoch"} if self.finetuning is not None else set())
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None and f.name not in spelled_out:
                continue
            out[f.name] = to_dict(value)
        return out

    def to_json(self) -> str:
        """The exact bytes of config.json. The baseline's has always kept non-ASCII text as UTF-8."""
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=self.kind != "baseline") + "\n"

    def write(self, path: Union[str, Path]) -> None:
        """Write config.json at ``path`` (for directories not written by ``save_pretrained``)."""
        path = Path(path)
        text = self.to_json()
        if path.exists():  # maybe a hard link shared with another directory: write a fresh file
            path.unlink()
        path.write_text(text, encoding="utf-8")

    # ---- reading ----

    @classmethod
    def from_dict(cls, data: Any, where: str = CONFIG_NAME) -> "ModelCard":
        """Strict load: a missing, unknown or mistyped key raises CardError naming ``where`` and the key."""
        if not isinstance(data, dict):
            raise CardError(f"{where}: expected a JSON object, got {type(data).__name__}")
        missing = [k for k in REQUIRED_KEYS if k not in data]
        if missing:
            raise CardError(f"{where}: missing key(s) {missing}")
        try:
            card = from_dict(cls, data)
            if card.preprocess is not None:
                card.preprocess.validate("preprocess")
        except ConfigError as err:
            raise CardError(f"{where}: {err}") from None
        except TypeError as err:  # a section without one of its required keys
            raise CardError(f"{where}: {err}") from None
        card.source = where
        return card


def read_card(path: Union[str, Path]) -> ModelCard:
    """The model card in ``path`` (a config.json, or a model directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / CONFIG_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CardError(f"{path}: not valid JSON ({err})") from None
    return ModelCard.from_dict(data, str(path))


def read_model_dir(directory: Path, files: Mapping[str, Sequence[str]], command: str,
                   error: type[Exception]) -> ModelCard:
    """The card of model directory ``directory``, after checking that its backbone is one of ``files``' keys
    and that every file that backbone needs is there; failures raise ``error`` naming ``command``."""
    if not directory.is_dir():
        raise error(f"{directory}: model directory not found")
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise error(f"{directory}: missing {CONFIG_NAME}; a twilbert model directory holds {CONFIG_NAME}, "
                    f"{', '.join(files.get('twilbert', ()))} (written by the pretrain and finetune stages)")
    try:
        card = read_card(path)
    except CheckpointError as err:
        raise error(str(err)) from None
    if card.kind not in files:
        raise error(f"{path}: backbone {card.kind!r} is not supported by {command} yet (supported: {', '.join(files)})")
    missing = [name for name in files[card.kind] if not (directory / name).exists()]
    if missing:
        raise error(f"{directory}: missing {', '.join(missing)}; a {card.kind} model directory holds "
                    f"{CONFIG_NAME}, {', '.join(files[card.kind])}")
    return card
