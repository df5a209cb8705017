"""Typed configuration: one dataclass per section of params.yaml, validated once on load.

Key names follow TWilBert's JSON configs (``n_encoders``, ``cross_sharing``, ``pkm_params``,
``masked_lm``, ``rop``...). Every error names the dotted key that is wrong.
"""

from __future__ import annotations

import dataclasses
import os
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """A config value is unknown, mistyped or inconsistent; the message names the key."""


# Limits a value is checked against on load, before any work.
MAX_LEN_LIMIT = 512  # tokens per text: a 280-character tweet, with room for emoji names and subword splits
MAX_VOCAB_SIZE = 1_000_000  # SentencePiece pieces (XLM-R has 250k); an embedding table beyond is a mistake
OPTIMIZERS = ("adam", "adam_accumulated", "lamb", "lamb_accumulated")  # besides any torch.optim class name
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class PkmConfig:
    """Product Key Memory (Lample et al. 2019), TWilBert's ``pkm_params``."""

    factorize_embeddings: bool = False
    value_size: Optional[int] = None  # E of the value table when factorized (default k_dim // 4)
    k_dim: int = 512
    memory_size: int = 256
    n_heads: int = 4
    knn: int = 32
    in_layers: list[int] = field(default_factory=list)
    input_dropout: float = 0.0
    output_dropout: float = 0.0
    batch_norm: bool = True
    value_lr: float = 1e-3  # XLM: the sparse value table learns best at its own, higher rate

    def validate(self, where: str) -> None:
        _positive(self, where, "k_dim", "memory_size", "n_heads", "knn", "value_size", "value_lr")
        if self.k_dim % 2:
            raise ConfigError(f"{where}.k_dim must be even (it is split in two halves), got {self.k_dim}")
        if self.knn > self.memory_size:
            raise ConfigError(f"{where}.knn ({self.knn}) must be <= {where}.memory_size ({self.memory_size})")
        _probability(self, where, "input_dropout", "output_dropout")


@dataclass
class MaskProbs:
    mask: float = 0.8
    random: float = 0.1
    keep: float = 0.1


@dataclass
class MaskedLMConfig:
    type: Literal["word", "span"] = "word"
    max_span: int = 3
    budget: float = 0.15
    probs: MaskProbs = field(default_factory=MaskProbs)

    def validate(self, where: str) -> None:
        _positive(self, where, "max_span")
        if not 0.0 < self.budget < 1.0:
            raise ConfigError(f"{where}.budget must be in (0, 1), got {self.budget}")
        total = self.probs.mask + self.probs.random + self.probs.keep
        if abs(total - 1.0) > 1e-6 or min(self.probs.mask, self.probs.random, self.probs.keep) < 0:
            raise ConfigError(f"{where}.probs mask+random+keep must be non-negative and sum to 1, got {total}")


@dataclass
class RopConfig:
    enabled: bool = True
    n_hidden: int = 1
    hidden_size: int = 512

    def validate(self, where: str) -> None:
        _non_negative(self, where, "n_hidden")
        _positive(self, where, "hidden_size")


@dataclass
class ModelConfig:
    """The TWilBert encoder and its pretraining heads (TWilBert's ``model`` section)."""

    name: str = "tiny"
    factorize_embeddings: bool = True
    cross_sharing: bool = True
    embedding_size: int = 128
    hidden_size: int = 768
    n_encoders: int = 12
    n_heads: int = 12
    attention_size: Optional[int] = None  # d_k per head; None means hidden_size // n_heads
    intermediate_size: Optional[int] = None  # feed-forward width; None means 4 * hidden_size
    hidden_act: Literal["gelu", "gelu_new", "relu"] = "gelu"
    input_dropout: float = 0.0
    output_dropout: float = 0.0
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pkm: bool = False
    pkm_params: PkmConfig = field(default_factory=PkmConfig)
    masked_lm: MaskedLMConfig = field(default_factory=MaskedLMConfig)
    rop: RopConfig = field(default_factory=RopConfig)

    @property
    def head_size(self) -> int:
        return self.attention_size or self.hidden_size // self.n_heads

    @property
    def ffn_size(self) -> int:
        return self.intermediate_size or 4 * self.hidden_size

    def validate(self, where: str = "model") -> None:
        _nonempty(self, where, "name")
        _positive(self, where, "embedding_size", "hidden_size", "n_encoders", "n_heads", "attention_size",
                  "intermediate_size", "initializer_range", "layer_norm_eps")
        if self.attention_size is None and self.hidden_size % self.n_heads:
            raise ConfigError(
                f"{where}.n_heads ({self.n_heads}) must divide {where}.hidden_size ({self.hidden_size}) "
                f"unless {where}.attention_size is set"
            )
        if not self.factorize_embeddings and self.embedding_size != self.hidden_size:
            raise ConfigError(
                f"{where}.embedding_size ({self.embedding_size}) must equal {where}.hidden_size "
                f"({self.hidden_size}) when {where}.factorize_embeddings is false"
            )
        _probability(self, where, "input_dropout", "output_dropout")
        self.pkm_params.validate(f"{where}.pkm_params")  # checked even when off: a preset may switch it on
        if self.pkm:
            bad = [i for i in self.pkm_params.in_layers if not 0 <= i < self.n_encoders]
            if bad:
                raise ConfigError(
                    f"{where}.pkm_params.in_layers {bad} out of range for n_encoders={self.n_encoders}"
                )
        self.masked_lm.validate(f"{where}.masked_lm")
        self.rop.validate(f"{where}.rop")


@dataclass
class RepresentationConfig:
    max_len: int = 64  # tokens per text; the input is [CLS] a [SEP] b [SEP] (2*max_len+3)
    max_len_test: Optional[int] = None

    @property
    def test_len(self) -> int:
        """Tokens per text at evaluation and prediction (``max_len_test``, else ``max_len``)."""
        return self.max_len_test or self.max_len

    def validate(self, where: str = "representation") -> None:
        _positive(self, where, "max_len", "max_len_test")
        if self.max_len > MAX_LEN_LIMIT:
            raise ConfigError(
                f"{where}.max_len must be <= {MAX_LEN_LIMIT} tokens per text (a tweet is at most 280 characters; "
                f"the model gets 2*max_len+3 positions), got {self.max_len}"
            )
        if self.max_len_test is not None and self.max_len_test > self.max_len:
            raise ConfigError(
                f"{where}.max_len_test ({self.max_len_test}) must be <= {where}.max_len ({self.max_len})"
            )


@dataclass
class DataConfig:
    """Where the pretraining corpus comes from (the ``data`` stage)."""

    # evomsa: the embedded default | pairs_file: TWilBert pair TSVs | text_file: one tweet per line
    source: Literal["evomsa", "pairs_file", "text_file"] = "evomsa"
    # A path, a glob or a list of them (read in order, each glob sorted); ``.gz`` files are gunzipped.
    pairs_file: Union[str, list[str], None] = None
    text_file: Union[str, list[str], None] = None
    pairs_header: bool = True  # False for headerless pair files (TWilBert's own dumps)
    delimiter: str = "\t"
    orig_text_header: str = "ORIG_TEXT"
    reply_text_header: str = "REPLY_TEXT"
    # The folder DVC tracks as the corpus (dvc.yaml's data stage depends on it): editing a file in it
    # reruns the pipeline. Corpus files outside it are read, with a warning that DVC cannot see them.
    corpus_dir: str = "corpus"
    dedup: bool = True  # drop exact duplicates (after normalizing case, spaces, @users, URLs, 'RT @x:')
    max_bad_rows: int = 0  # malformed rows reported and skipped before the stage fails instead
    evomsa_version: str = "2.0.14"
    evomsa_sha256: str = "948955df920578c668d1c19cf7051f2034a1c968ced6275284d9082b8c6cd8c4"
    split: list[float] = field(default_factory=lambda: [0.7, 0.15, 0.15])  # train/dev/test

    def corpus_files(self) -> list[str]:
        """The configured paths and globs of the selected source, unexpanded."""
        spec = {"pairs_file": self.pairs_file, "text_file": self.text_file}.get(self.source)
        return [] if spec is None else [spec] if isinstance(spec, str) else list(spec)

    def validate(self, where: str = "data") -> None:
        if self.source != "evomsa":
            key = f"{where}.{self.source}"
            if not self.corpus_files():
                raise ConfigError(f"{key} must be set when {where}.source is '{self.source}' (a path, glob or list)")
            if any(not p.strip() for p in self.corpus_files()):
                raise ConfigError(f"{key} holds an empty path")
        if not self.corpus_dir.strip():
            raise ConfigError(f"{where}.corpus_dir must be a folder (DVC tracks it as the corpus), got ''")
        if os.path.normpath(self.corpus_dir) in (".", "..", "data", "models", "results"):
            raise ConfigError(
                f"{where}.corpus_dir {self.corpus_dir!r} would hold the pipeline's own outputs or the whole "
                "repository; use a folder of its own such as 'corpus', or an absolute path"
            )
        _delimiter(self, where, "delimiter")
        _nonempty(self, where, "orig_text_header", "reply_text_header", "evomsa_version")
        if not re.fullmatch(r"[0-9a-f]{64}", self.evomsa_sha256):
            raise ConfigError(f"{where}.evomsa_sha256 must be 64 lowercase hex digits, got {self.evomsa_sha256!r}")
        if self.max_bad_rows < 0:
            raise ConfigError(f"{where}.max_bad_rows must be >= 0, got {self.max_bad_rows}")
        if len(self.split) != 3 or abs(sum(self.split) - 1.0) > 1e-6 or min(self.split) <= 0:
            raise ConfigError(f"{where}.split must be three positive fractions summing to 1, got {self.split}")


@dataclass
class VocabConfig:
    vocab_size: int = 8000
    model_type: Literal["unigram", "bpe"] = "unigram"
    character_coverage: float = 0.9995
    lowercase: bool = False
    # SentencePiece trains on a seeded uniform sample of at most this many texts: its memory grows
    # with the sample (about 18 bytes per character, ~2.2 GB for 500k texts of 250 characters),
    # never with the corpus.
    max_sentences: int = 500_000

    def validate(self, where: str = "vocab") -> None:
        if not 16 <= self.vocab_size <= MAX_VOCAB_SIZE:
            raise ConfigError(f"{where}.vocab_size must be in [16, {MAX_VOCAB_SIZE}], got {self.vocab_size}")
        if not 0.0 < self.character_coverage <= 1.0:
            raise ConfigError(f"{where}.character_coverage must be in (0, 1], got {self.character_coverage}")
        if self.max_sentences < 1:
            raise ConfigError(f"{where}.max_sentences must be >= 1, got {self.max_sentences}")


@dataclass
class PairsConfig:
    heldout_fraction: float = 0.05  # share of corpus rows kept aside for held-out MLM/ROP evaluation
    shard_size: int = 100_000  # corpus rows per shard: the unit a crashed pairs stage resumes from
    workers: Optional[int] = None  # tokenizer processes; None or 0: one per core

    def validate(self, where: str = "pairs") -> None:
        _positive(self, where, "shard_size")
        _probability(self, where, "heldout_fraction")
        if self.workers is not None and self.workers < 0:
            raise ConfigError(f"{where}.workers must be >= 0 (0 or null: one per core), got {self.workers}")


@dataclass
class TrainingConfig:
    """Pretraining loop (TWilBert's ``training`` section)."""

    batch_size: int = 32
    epochs: int = 10
    optimizer: str = "adam"  # adam | lamb | any torch.optim class name
    lr: float = 1e-3
    weight_decay: float = 0.01
    noam_annealing: bool = False
    warmup_steps: int = 8000
    accum_iters: int = 1
    max_grad_norm: Optional[float] = 1.0
    precision: Literal["fp32", "bf16"] = "fp32"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    path_initial_weights: Optional[str] = None  # a model directory to continue pretraining from
    log_every: int = 10
    pll_examples: int = 16  # held-out examples scored by pseudo-log-likelihood each epoch (0: off)
    checkpoint_every: int = 1000  # micro-steps between training checkpoints (0: only at epoch ends)
    tf32: bool = False  # CUDA only: fp32 matmuls on TF32 tensor cores (Ampere or newer)
    compile: bool = False  # torch.compile the model (not faster on the CPUs measured: README "On a GPU")

    def validate(self, where: str = "training") -> None:
        _positive(self, where, "batch_size", "epochs", "accum_iters", "warmup_steps", "log_every", "lr",
                  "max_grad_norm")
        _non_negative(self, where, "weight_decay", "pll_examples", "checkpoint_every")
        _optimizer(self, where)
        _device(self, where)
        if self.path_initial_weights is not None:
            _nonempty(self, where, "path_initial_weights")


@dataclass
class FinetuningConfig:
    """Finetuning loop and head (TWilBert's ``finetuning`` section); a task may override any key."""

    backbone: Literal["twilbert", "hf", "baseline"] = "twilbert"
    hf_path: Optional[str] = None  # local Hugging Face checkpoint directory when backbone is hf
    batch_size: int = 32
    pred_batch_size: int = 64
    epochs: int = 10
    patience: int = 3  # epochs without a better dev score before stopping
    finetune_all: bool = True  # false: the encoder is frozen, only the head trains
    trainable_layers: Optional[int] = None  # train only the top k encoder layers (null: all)
    collapse_mode: Literal["avg", "cls"] = "avg"
    use_special_tokens: bool = True
    loss: str = "auto"  # auto: cross-entropy, BCE (multi-label) or MSE (regression); or a TWilBert loss
    optimizer: str = "adam"
    lr: float = 1e-4
    weight_decay: float = 0.0
    noam_annealing: bool = False
    warmup_steps: int = 5
    accum_iters: int = 1
    max_grad_norm: Optional[float] = 1.0
    dropout: float = 0.1
    n_hidden: int = 0
    hidden_size: int = 256
    precision: Literal["fp32", "bf16"] = "fp32"
    device: str = "auto"
    kfold: int = 0  # 0: one model; k >= 2: one model per fold, test probabilities blended
    kfold_on: Literal["train", "train+dev"] = "train"
    baseline_model: Literal["svm", "logreg"] = "svm"
    baseline_c: float = 1.0  # inverse regularization of the baseline's linear model (Ridge: 1/alpha)
    baseline_row: bool = True  # also fit the TF-IDF baseline and write baseline.json beside metrics.json
    checkpoint_every: int = 0  # micro-steps between training checkpoints (0: only at epoch ends)
    tf32: bool = False  # CUDA only: fp32 matmuls on TF32 tensor cores (Ampere or newer)
    # A task without a test file: carve_dev selects on a dev split carved from train and reports the
    # dev file as test; dev_as_test selects on the dev file and reports it as test too (marked †).
    no_test_protocol: Literal["carve_dev", "dev_as_test"] = "carve_dev"

    def validate(self, where: str = "finetuning") -> None:
        _positive(self, where, "batch_size", "pred_batch_size", "epochs", "patience", "accum_iters",
                  "warmup_steps", "hidden_size", "baseline_c", "lr", "max_grad_norm")
        _non_negative(self, where, "weight_decay", "n_hidden", "checkpoint_every")
        _probability(self, where, "dropout")
        _optimizer(self, where)
        _device(self, where)
        _loss_name(self, where)
        if self.backbone == "hf" and not self.hf_path:
            raise ConfigError(f"{where}.hf_path must name a local Hugging Face checkpoint when {where}.backbone is 'hf'")
        if self.kfold < 0 or self.kfold == 1:
            raise ConfigError(f"{where}.kfold must be 0 (off) or >= 2 folds, got {self.kfold}")
        if self.trainable_layers is not None:
            if self.trainable_layers < 0:
                raise ConfigError(f"{where}.trainable_layers must be >= 0 or null, got {self.trainable_layers}")
            if not self.finetune_all:
                raise ConfigError(
                    f"{where}.trainable_layers ({self.trainable_layers}) contradicts {where}.finetune_all: false "
                    "(which freezes the whole encoder); set one of them"
                )


@dataclass
class TaskDataset:
    """Files of one finetuning task, TWilBert's ``dataset`` keys relative to ``data_dir``."""

    data_dir: str = "data/default"
    train_file: str = "train.tsv"
    dev_file: Optional[str] = "dev.tsv"
    test_file: Optional[str] = "test.tsv"
    id_header: str = "ID"
    text_header: str = "TEXT"
    class_header: str = "CLASS"
    aux_header: Optional[str] = None
    delimiter: str = "\t"
    dev_fraction: float = 0.15  # share of train held out as dev when the task ships no dev file

    def path(self, name: Optional[str]) -> Optional[Path]:
        return None if name is None else Path(self.data_dir) / name

    def validate(self, where: str) -> None:
        _nonempty(self, where, "data_dir", "train_file", "dev_file", "test_file", "id_header", "text_header",
                  "class_header", "aux_header")
        _delimiter(self, where, "delimiter")
        if not 0.0 < self.dev_fraction < 1.0:
            raise ConfigError(f"{where}.dev_fraction must be in (0, 1), got {self.dev_fraction}")


@dataclass
class TaskSpec:
    """TWilBert's ``task`` keys: labels and the official metric."""

    regression: bool = False
    multi_label: bool = False
    categories: dict[str, int] = field(default_factory=dict)
    class_weights: Optional[Union[str, dict[str, float]]] = None  # explicit, or "auto"
    eval_metric: Literal["f1", "accuracy", "precision", "recall", "pearson", "jaccard"] = "f1"
    average_metric: Optional[Literal["macro", "micro", "none"]] = "macro"
    class_metric: Optional[str] = None
    stance_f1: bool = False
    threshold: float = 0.5  # multi-label decision threshold on sigmoid outputs


@dataclass
class TaskConfig:
    name: str = ""
    dataset: TaskDataset = field(default_factory=TaskDataset)
    task: TaskSpec = field(default_factory=TaskSpec)
    finetuning: dict[str, Any] = field(default_factory=dict)  # this task's overrides of `finetuning`
    # Show this task's models among another task's rows in the results tables: the same benchmark
    # finetuned again with another backbone (e.g. a copy with `finetuning: {backbone: hf}`).
    compare_as: Optional[str] = None

    def finetuning_config(self, base: FinetuningConfig, where: Optional[str] = None) -> FinetuningConfig:
        """The global ``finetuning`` section with this task's overrides applied, validated."""
        where = where or (f"tasks.{self.name}.finetuning" if self.name else "finetuning")
        merged = from_dict(FinetuningConfig, {**dataclasses.asdict(base), **self.finetuning}, where)
        merged.validate(where)
        return merged

    def validate(self, where: str, base: Optional[FinetuningConfig] = None) -> None:
        spec = self.task
        if not spec.regression and not spec.categories:
            raise ConfigError(f"{where}.task.categories must list the labels of a classification task")
        indices = sorted(spec.categories.values())
        if indices != list(range(len(indices))):
            raise ConfigError(f"{where}.task.categories must map labels to 0..C-1, got {spec.categories}")
        if spec.class_metric is not None and spec.class_metric not in spec.categories:
            raise ConfigError(
                f"{where}.task.class_metric {spec.class_metric!r} is not one of the categories {list(spec.categories)}"
            )
        if spec.regression and spec.multi_label:
            raise ConfigError(f"{where}.task.regression and {where}.task.multi_label cannot both be true")
        if isinstance(spec.class_weights, str) and spec.class_weights != "auto":
            raise ConfigError(f"{where}.task.class_weights must be 'auto' or a mapping, got {spec.class_weights!r}")
        if isinstance(spec.class_weights, dict):
            unknown = sorted(set(spec.class_weights) - set(spec.categories))
            if unknown:
                raise ConfigError(f"{where}.task.class_weights names {unknown}, not categories {list(spec.categories)}")
            bad = {k: v for k, v in spec.class_weights.items() if not (math.isfinite(v) and v > 0)}
            if bad:
                raise ConfigError(f"{where}.task.class_weights must be finite and > 0, got {bad}")
        if not 0.0 < spec.threshold < 1.0:
            raise ConfigError(f"{where}.task.threshold must be in (0, 1), got {spec.threshold}")
        self.dataset.validate(f"{where}.dataset")
        ft = self.finetuning_config(base or FinetuningConfig(), f"{where}.finetuning")
        _loss_fits_task(ft, spec, f"{where}.finetuning.loss")


@dataclass
class TrackingConfig:
    uri: Optional[str] = None  # None: sqlite mlflow.db in the repo root (absolute URI)
    experiment: str = "twilbert"
    on_unreachable: Literal["fallback", "fail"] = "fallback"  # fallback: the local sqlite store, with a warning
    timeout: float = 5.0  # seconds: the reachability probe and each HTTP request to the store
    retries: int = 3  # per store call: HTTP retries, and retries on SQLite's 'database is locked'

    def __post_init__(self) -> None:
        # Checked on construction: the section is complete and self-contained.
        if self.timeout <= 0:
            raise ConfigError(f"tracking.timeout must be > 0 seconds, got {self.timeout}")
        if self.retries < 0:
            raise ConfigError(f"tracking.retries must be >= 0, got {self.retries}")
        if not self.experiment.strip():
            raise ConfigError("tracking.experiment must name an MLflow experiment, got an empty string")


@dataclass
class RuntimeConfig:
    """How the stages use this machine (not a DVC param): speed, and the last bits of float results."""

    threads: Optional[int] = None  # torch intra-op threads; null or 0: the cores shared among concurrent DVC jobs

    def validate(self, where: str = "runtime") -> None:
        _non_negative(self, where, "threads")


@dataclass
class Config:
    seed: int = 1234
    data: DataConfig = field(default_factory=DataConfig)
    vocab: VocabConfig = field(default_factory=VocabConfig)
    representation: RepresentationConfig = field(default_factory=RepresentationConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    finetuning: FinetuningConfig = field(default_factory=FinetuningConfig)
    tasks: dict[str, TaskConfig] = field(default_factory=dict)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    # Tweet normalization; a PreprocessConfig after validate() (defined beside the code it drives).
    preprocess: Any = None

    def validate(self) -> "Config":
        from twilbert.data.preprocess import PreprocessConfig

        if not isinstance(self.preprocess, PreprocessConfig):
            self.preprocess = PreprocessConfig.from_dict(self.preprocess, "preprocess")
        if not 0 <= self.seed < 2**32:  # numpy's seed range
            raise ConfigError(f"seed must be in [0, 2**32), got {self.seed}")
        self.data.validate()
        self.vocab.validate()
        self.representation.validate()
        self.pairs.validate()
        self.model.validate()
        self.training.validate()
        self.finetuning.validate()
        self.runtime.validate()
        for name, task in self.tasks.items():
            task.name = task.name or name
            task.validate(f"tasks.{name}", self.finetuning)
            if task.compare_as is not None and task.compare_as not in self.tasks:
                raise ConfigError(
                    f"tasks.{name}.compare_as {task.compare_as!r} is not a task in params (have: {sorted(self.tasks)})"
                )
        return self


# --------------------------------------------------------------------------------------------
# Loading: dict -> dataclasses, strictly
# --------------------------------------------------------------------------------------------

T = typing.TypeVar("T")


def from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """Build ``cls`` from a plain mapping, rejecting unknown keys and mistyped values."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        keys = ", ".join(_join(where, k) for k in unknown)
        raise ConfigError(f"unknown config key(s): {keys} (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(hints[k], v, _join(where, k)) for k, v in data.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[-1] if len(errors) == 1 else f"{where}: {value!r} matches none of {tp}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where} must be one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return [_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return {str(k): _coerce(args[1], v, _join(where, str(k))) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported config type {tp}")


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _positive(obj: Any, where: str, *names: str) -> None:
    """Each named value is > 0 (a None of an optional key is left alone)."""
    for name in names:
        value = getattr(obj, name)
        if value is not None and not value > 0:  # `not >` also refuses NaN
            raise ConfigError(f"{where}.{name} must be > 0, got {value}")


def _non_negative(obj: Any, where: str, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None and not value >= 0:
            raise ConfigError(f"{where}.{name} must be >= 0, got {value}")


def _nonempty(obj: Any, where: str, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None and not value.strip():
            raise ConfigError(f"{where}.{name} must not be empty")


def _delimiter(obj: Any, where: str, name: str) -> None:
    value = getattr(obj, name)
    if len(value) != 1 or value in "\r\n\"":
        raise ConfigError(f"{where}.{name} must be one character other than a quote or line break, got {value!r}")


def _device(obj: Any, where: str) -> None:
    if not DEVICE_PATTERN.fullmatch(obj.device):
        raise ConfigError(f"{where}.device must be auto, cpu, mps, cuda or cuda:N, got {obj.device!r}")


def _optimizer(obj: Any, where: str) -> None:
    if obj.optimizer.lower() in OPTIMIZERS:
        return
    from twilbert.train.optim import torch_optimizer_names  # torch is imported only for other names

    known = torch_optimizer_names()
    if obj.optimizer.lower() not in known:
        raise ConfigError(f"{where}.optimizer {obj.optimizer!r} is not an optimizer; choose one of: "
                          f"{', '.join(dict.fromkeys([*OPTIMIZERS, *known]))}")


def _loss_name(obj: Any, where: str) -> None:
    if obj.loss == "auto":
        return
    from twilbert.train.losses import LOSS_NAMES  # torch is imported only when a loss is named

    if obj.loss.lower() not in LOSS_NAMES:
        raise ConfigError(f"{where}.loss {obj.loss!r} is not a loss; choose auto or one of: {', '.join(LOSS_NAMES)}")


def _loss_fits_task(ft: "FinetuningConfig", spec: "TaskSpec", where: str) -> None:
    """A named loss must suit the task's kind (regression, multi-label, binary...)."""
    if ft.loss == "auto":
        return
    from twilbert.train.losses import build_loss

    try:
        build_loss(ft.loss, spec)
    except ValueError as err:
        raise ConfigError(f"{where} ({ft.loss!r}): {err}") from None


def _probability(obj: Any, where: str, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{where}.{name} must be in [0, 1), got {value}")


def to_dict(obj: Any) -> Any:
    """Dataclass tree -> plain dict (for JSON model configs and MLflow params)."""
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


def load_config(params: Union[str, Path, dict]) -> Config:
    """Load and validate the whole config from a params.yaml path or an already-parsed dict."""
    if isinstance(params, (str, Path)):
        path = Path(params)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: params file not found") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: invalid YAML: {err}") from None
    else:
        data = params
    return from_dict(Config, data).validate()


def compose(overrides: Optional[list[str]] = None, config_dir: Union[str, Path] = "conf") -> dict:
    """Compose ``conf/`` with Hydra overrides into the plain dict DVC writes to params.yaml."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    overrides = list(overrides or [])
    try:
        with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base=None):
            cfg = hydra_compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        unknown = re.match(r"Could not override '([^']+)'", str(err))
        if unknown:  # the same message as an unknown key in params.yaml (under DVC)
            key = unknown.group(1)
            section = _dig_section(compose([], config_dir), key.rsplit(".", 1)[0]) if "." in key else None
            known = f" (known: {', '.join(sorted(section))})" if isinstance(section, dict) else ""
            raise ConfigError(f"unknown config key(s): {key}{known}") from None
        raise ConfigError(f"config overrides {' '.join(overrides)}: {_one_line(str(err))}") from None
    return OmegaConf.to_container(cfg, resolve=True)


def _dig_section(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _one_line(message: str) -> str:
    """Hydra's multi-line message in one line, without its search-path dump and doc links."""
    message = message.split("Config search path", 1)[0]
    lines = [line.strip() for line in message.splitlines() if line.strip() and not line.strip().startswith("See http")]
    return "; ".join(lines).replace(":;", ":")
