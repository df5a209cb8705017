"""Pretraining, finetuning and the finetuning tasks (``training``, ``finetuning``, ``tasks``)."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from twilbert.config.strict import (
    ConfigError,
    check_delimiter,
    check_non_negative,
    check_nonempty,
    check_positive,
    check_probability,
    from_dict,
)

OPTIMIZERS = ("adam", "adam_accumulated", "lamb", "lamb_accumulated")  # besides any torch.optim class name
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


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
    # K: each global batch of batch_size examples is cut into K micro-batches, whatever the number of
    # workers (1..K) computing them; part of the run's identity (their gradients sum in a fixed order)
    micro_batches: int = 2
    max_grad_norm: Optional[float] = 1.0
    precision: Literal["fp32", "bf16"] = "fp32"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    path_initial_weights: Optional[str] = None  # a model directory to continue pretraining from
    log_every: int = 10
    pll_examples: int = 16  # held-out examples scored by pseudo-log-likelihood each epoch (0: off)
    checkpoint_every: int = 1000  # micro-steps between training checkpoints (0: only at epoch ends)
    tf32: bool = False  # CUDA only: fp32 matmuls on TF32 tensor cores (Ampere or newer)
    compile: bool = False  # torch.compile the model (not faster on the CPUs measured: README "On a GPU")
    length_grouping: bool = True  # batches of rows of similar length (data/grouping.py); false: random batches
    # Continued pretraining of a local Hugging Face checkpoint (README "Start from an existing checkpoint"):
    # scratch trains twilbert's own encoder; hf starts from hf_path, with its own tokenizer (stage vocab).
    init_from: Literal["scratch", "hf"] = "scratch"
    hf_path: Optional[str] = None  # a local save_pretrained directory that AutoModelForMaskedLM loads
    rop: bool = True  # init_from hf: a reply-order head on the [CLS] state beside MLM (scratch: model.rop.enabled)

    def validate(self, where: str = "training") -> None:
        check_positive(self, where, "batch_size", "epochs", "accum_iters", "micro_batches", "warmup_steps",
                       "log_every", "lr", "max_grad_norm")
        check_non_negative(self, where, "weight_decay", "pll_examples", "checkpoint_every")
        check_micro_batches(self, where)
        check_optimizer(self, where)
        check_device(self, where)
        if self.path_initial_weights is not None:
            check_nonempty(self, where, "path_initial_weights")
        check_nonempty(self, where, "hf_path")
        if self.init_from == "hf":
            if not self.hf_path:
                raise ConfigError(f"{where}.hf_path must name a local Hugging Face checkpoint directory when "
                                  f"{where}.init_from is 'hf'")
            if self.path_initial_weights:
                raise ConfigError(f"{where}.path_initial_weights continues twilbert's own weights; with "
                                  f"{where}.init_from 'hf' the weights come from {where}.hf_path: set one of them")
        elif not self.rop:
            raise ConfigError(f"{where}.rop applies to init_from 'hf'; for twilbert's own encoder set model.rop.enabled")


@dataclass
class FinetuningConfig:
    """Finetuning loop and head (TWilBert's ``finetuning`` section); a task may override any key."""

    # Runs per task: a count N (seeds 0..N-1) or a list of seeds; run s trains with seed + s (config/runs.py)
    seeds: Union[int, list[int]] = 3
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
    micro_batches: int = 2  # K micro-batches per global batch, as training.micro_batches
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
    length_grouping: bool = False  # training batches of rows of similar length (data/grouping.py)

    def validate(self, where: str = "finetuning") -> None:
        from twilbert.config.runs import expand_seeds

        expand_seeds(self.seeds, f"{where}.seeds")
        check_positive(self, where, "batch_size", "pred_batch_size", "epochs", "patience", "accum_iters",
                  "micro_batches", "warmup_steps", "hidden_size", "baseline_c", "lr", "max_grad_norm")
        check_non_negative(self, where, "weight_decay", "n_hidden", "checkpoint_every")
        check_probability(self, where, "dropout")
        check_micro_batches(self, where)
        check_optimizer(self, where)
        check_device(self, where)
        check_loss_name(self, where)
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


def check_micro_batches(cfg: Any, where: str) -> None:
    if cfg.micro_batches > cfg.batch_size:
        raise ConfigError(f"{where}.micro_batches ({cfg.micro_batches}) exceeds {where}.batch_size ({cfg.batch_size}): "
                          "each micro-batch needs at least one example")


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
        check_nonempty(self, where, "data_dir", "train_file", "dev_file", "test_file", "id_header", "text_header",
                  "class_header", "aux_header")
        check_delimiter(self, where, "delimiter")
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
        if "seeds" in self.finetuning:  # the runs are DVC stages, made from the global count
            raise ConfigError(f"{where}.seeds: the number of runs is global; set finetuning.seeds instead")
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
        check_loss_fits_task(ft, spec, f"{where}.finetuning.loss")


def check_device(obj: Any, where: str) -> None:
    if not DEVICE_PATTERN.fullmatch(obj.device):
        raise ConfigError(f"{where}.device must be auto, cpu, mps, cuda or cuda:N, got {obj.device!r}")


def torch_optimizer_names() -> list[str]:
    """The ``torch.optim`` optimizers, lowercased, as ``train.optim.build_optimizer`` accepts them."""
    import torch.optim  # torch is imported only when a name outside OPTIMIZERS is given

    return sorted(name.lower() for name, obj in vars(torch.optim).items()
                  if isinstance(obj, type) and issubclass(obj, torch.optim.Optimizer)
                  and obj is not torch.optim.Optimizer)


def check_optimizer(obj: Any, where: str) -> None:
    if obj.optimizer.lower() in OPTIMIZERS:
        return
    known = torch_optimizer_names()
    if obj.optimizer.lower() not in known:
        raise ConfigError(f"{where}.optimizer {obj.optimizer!r} is not an optimizer; choose one of: "
                          f"{', '.join(dict.fromkeys([*OPTIMIZERS, *known]))}")


# Finetuning losses by TWilBert name (built by train/losses.py), and what each needs of the task:
# plain data, so that config validates a name without importing training code.
SOFT_METRIC_LOSSES = ("macro_f1", "f1_macro", "micro_f1", "binary_f1", "macro_precision", "macro_recall",
                      "micro_precision", "micro_recall", "jaccard_acc")
LOSS_ALIASES = {"categorical_crossentropy": "cross_entropy", "binary_crossentropy": "bce"}
LOSS_NAMES = ("categorical_crossentropy", "cross_entropy", "binary_crossentropy", "bce", "mse", "rmse",
              *SOFT_METRIC_LOSSES)
REGRESSION_LOSSES = ("mse", "rmse")


def canonical_loss(name: str) -> str:
    """The loss a TWilBert name stands for (aliases resolved); ValueError for an unknown name."""
    key = LOSS_ALIASES.get(name.lower(), name.lower())
    if key not in LOSS_NAMES:
        raise ValueError(f"unknown loss {name!r}; choose one of: {', '.join(LOSS_NAMES)}")
    return key


def loss_misfit(name: str, spec: "TaskSpec") -> Optional[str]:
    """Why loss ``name`` does not suit the task ``spec`` (regression, multi-label...), or None."""
    key = canonical_loss(name)
    if key in REGRESSION_LOSSES:
        return None if spec.regression else f"loss {name!r} needs a regression task (task.regression: true)"
    if spec.regression:
        return f"loss {name!r} is for classification; use 'mse' or 'rmse' for regression"
    if key == "cross_entropy" and spec.multi_label:
        return f"loss {name!r} is single-label; use 'binary_crossentropy' for multi-label"
    if key == "binary_f1" and (spec.multi_label or len(spec.categories) != 2):
        return f"loss {name!r} needs a single-label task with 2 categories, got {spec.categories}"
    return None


def check_loss_name(obj: Any, where: str) -> None:
    if obj.loss != "auto" and obj.loss.lower() not in LOSS_NAMES:
        raise ConfigError(f"{where}.loss {obj.loss!r} is not a loss; choose auto or one of: {', '.join(LOSS_NAMES)}")


def check_loss_fits_task(ft: FinetuningConfig, spec: TaskSpec, where: str) -> None:
    """A named loss must suit the task's kind (regression, multi-label, binary...)."""
    if ft.loss == "auto":
        return
    try:
        misfit = loss_misfit(ft.loss, spec)
    except ValueError as err:
        raise ConfigError(f"{where} ({ft.loss!r}): {err}") from None
    if misfit:
        raise ConfigError(f"{where} ({ft.loss!r}): {misfit}")
