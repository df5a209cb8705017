"""Typed configuration: one dataclass per section of params.yaml, validated once on load.

Key names follow TWilBert's JSON configs. Every error names the dotted key that is wrong.
Sections live by concern (``model``, ``data``, ``training``); ``strict`` holds the loader.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from twilbert.config.data import (
    MAX_LEN_LIMIT,
    MAX_VOCAB_SIZE,
    DataConfig,
    PairsConfig,
    PreprocessConfig,
    RepresentationConfig,
    VocabConfig,
)
from twilbert.config.model import MaskedLMConfig, MaskProbs, ModelConfig, PkmConfig, RopConfig
from twilbert.config.strict import ConfigError, check_non_negative, dig, from_dict, to_dict
from twilbert.config.training import (
    DEVICE_PATTERN,
    OPTIMIZERS,
    FinetuningConfig,
    TaskConfig,
    TaskDataset,
    TaskSpec,
    TrainingConfig,
)

log = logging.getLogger(__name__)

__all__ = [
    "MAX_LEN_LIMIT", "MAX_VOCAB_SIZE", "OPTIMIZERS", "DEVICE_PATTERN", "ConfigError", "from_dict", "to_dict",
    "load_config", "compose", "Config", "PkmConfig", "MaskProbs", "MaskedLMConfig", "RopConfig", "ModelConfig",
    "RepresentationConfig", "DataConfig", "VocabConfig", "PairsConfig", "PreprocessConfig", "TrainingConfig",
    "FinetuningConfig", "TaskDataset", "TaskSpec", "TaskConfig", "TrackingConfig", "RuntimeConfig",
]


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

    threads: Optional[int] = None  # torch intra-op threads; null or 0: 1 when portable, else the cores shared among DVC jobs
    # The same bytes on any x86-64 CPU with AVX2: pinned kernels and thread count (twilbert.numerics).
    portable_numerics: bool = True
    # Training worker processes (torchrun ranks, one per core): null or 0: min(cores, micro_batches) when portable on the
    # CPU, else 1; 1: one in-process worker; N: N workers (pipeline/workers.py)
    workers: Optional[int] = None

    def validate(self, where: str = "runtime") -> None:
        check_non_negative(self, where, "threads")
        check_non_negative(self, where, "workers")


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
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    # Derived from tasks x finetuning.seeds for dvc.yaml's `finetune` stages (config/runs.py); `make check-params`
    # finds it stale, the stages never read it
    finetune_runs: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> "Config":
        self.preprocess.validate("preprocess")
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


PARAMS_HINT = "; `make params` writes params.yaml again from conf/"


def read_yaml(path: Union[str, Path], hint: str = PARAMS_HINT) -> Any:
    """A YAML file (params.yaml) parsed, or one line naming ``file:line:column`` and the problem, then ``hint``."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err}){hint}") from None
    except yaml.YAMLError as err:
        raise yaml_error(err, path, hint) from None


def yaml_error(err: "yaml.YAMLError", path: Union[str, Path, None] = None, hint: str = "") -> ConfigError:
    """PyYAML's multi-line report as one line: ``file:line:column: invalid YAML (problem)``."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    where = str(path) if path is not None else (getattr(mark, "name", None) or "YAML")
    if mark is not None:
        where += f":{mark.line + 1}:{mark.column + 1}"
    problem = getattr(err, "problem", None) or getattr(err, "context", None) or str(err).splitlines()[0]
    return ConfigError(f"{where}: invalid YAML ({problem}){hint}")


def load_config(params: Union[str, Path, dict]) -> Config:
    """Load and validate the whole config from a params.yaml path or an already-parsed dict."""
    if isinstance(params, (str, Path)):
        path = Path(params)
        if not path.is_file():
            raise ConfigError(f"{path}: params file not found")
        data = read_yaml(path)
    else:
        data = params
    _log_default_headers(data)
    return from_dict(Config, data).validate()


# A task file whose columns are named otherwise would fail only at its header check, far from the config.
NAMED_COLUMNS = ("text_header", "class_header")


def _log_default_headers(data: Any) -> None:
    """Say which column names a task takes by default (``TEXT``, ``CLASS``) because its YAML omits them."""
    tasks = data.get("tasks") if isinstance(data, dict) else None
    for name, task in (tasks or {}).items() if isinstance(tasks, dict) else ():
        dataset = task.get("dataset") if isinstance(task, dict) else None
        dataset = dataset if isinstance(dataset, dict) else {}
        taken = [f"{key}={getattr(TaskDataset, key)!r}" for key in NAMED_COLUMNS if key not in dataset]
        if taken:
            log.warning("tasks.%s.dataset: no %s given; taking the default%s %s", name,
                        " or ".join(k.split("=")[0] for k in taken), "s" if len(taken) > 1 else "", ", ".join(taken))


def compose(overrides: Optional[list[str]] = None, config_dir: Union[str, Path] = "conf") -> dict:
    """Compose ``conf/`` with Hydra overrides into the plain dict DVC writes to params.yaml."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from twilbert.config.runs import register_resolver

    register_resolver()
    overrides = list(overrides or [])
    try:
        with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base=None):
            cfg = hydra_compose(config_name="config", overrides=overrides)
        return OmegaConf.to_container(cfg, resolve=True)
    except yaml.YAMLError as err:  # a conf/ file Hydra could not parse: its own error, unwrapped
        raise yaml_error(err) from None
    except (HydraException, OmegaConfBaseException) as err:
        refusal = _config_error_in(err)
        if refusal is not None:  # our resolver's refusal (finetuning.seeds) names its key: OmegaConf's frame adds nothing
            raise refusal from None
        unknown = re.match(r"Could not override '([^']+)'", str(err))
        if unknown:  # the same message as an unknown key in params.yaml (under DVC)
            key = unknown.group(1)
            section = dig(compose([], config_dir), key.rsplit(".", 1)[0]) if "." in key else None
            known = f" (known: {', '.join(sorted(section))})" if isinstance(section, dict) else ""
            raise ConfigError(f"unknown config key(s): {key}{known}") from None
        raise ConfigError(f"config overrides {' '.join(overrides)}: {_one_line(str(err))}") from None


def _config_error_in(err: BaseException) -> Optional[ConfigError]:
    """The ConfigError a resolver raised, which OmegaConf wraps (twice) in InterpolationResolutionError."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, ConfigError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _one_line(message: str) -> str:
    """Hydra's multi-line message in one line, without its search-path dump and doc links."""
    message = message.split("Config search path", 1)[0]
    lines = [line.strip() for line in message.splitlines() if line.strip() and not line.strip().startswith("See http")]
    return "; ".join(lines).replace(":;", ":")
