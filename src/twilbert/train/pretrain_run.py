"""One pretraining run, resolved once at the stage's entry (``PretrainRun``): the seed, the model,
the training loop (``training.init_from`` scratch or hf, with its ``hf_path``), the length and the
runtime, the config sections pretraining reads and nothing else.

What trains, the MLflow params and the checkpoint identity all come from this one object
(``PretrainRun.params``), and dvc.yaml's ``pretrain`` params are its keys (tests/test_resolved_run.py),
so a setting the run reads is one DVC tracks; below the stage's entry no ``Config`` travels, only the run.
The vocabulary and the pairs come in as files (the stage's deps, and the identity's ``inputs``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from twilbert.config import Config, ModelConfig, RuntimeConfig, TrainingConfig, to_dict

# The run's keys as dotted config keys: dvc.yaml's `pretrain` params, and what the identity hashes
# (runtime: the kernels and thread count make the last bits, src/twilbert/numerics.py).
KEYS = ("seed", "model", "training", "representation.max_len", "runtime")


@dataclass(frozen=True)
class PretrainRun:
    seed: int
    model: ModelConfig
    training: TrainingConfig  # init_from scratch or hf (continued pretraining of hf_path)
    max_len: int  # representation.max_len: tokens per text, 2*max_len+3 positions
    runtime: RuntimeConfig

    @property
    def continued(self) -> bool:
        """``training.init_from: hf``: continued pretraining of ``training.hf_path`` (train/continued.py)."""
        return self.training.init_from == "hf"

    @property
    def hf_path(self) -> Optional[str]:
        return self.training.hf_path

    def params(self) -> dict:
        """What trains, as one tree: the MLflow params, and the config part of the run's identity."""
        return {"seed": self.seed, "model": to_dict(self.model), "training": to_dict(self.training),
                "representation": {"max_len": self.max_len}, "runtime": to_dict(self.runtime)}


def resolve_pretrain_run(cfg: Config) -> PretrainRun:
    """The pretraining run of ``cfg``: the sections it reads, taken once."""
    return PretrainRun(cfg.seed, cfg.model, cfg.training, cfg.representation.max_len, cfg.runtime)
