"""One finetuning run, resolved once at the stage's entry (``FinetuneRun``): the task's overrides
applied, the backbone read from the pretrained directory (``training.init_from: hf`` makes it a
Hugging Face one), the seeds and the lengths.

What trains, the MLflow params and the checkpoint identity all come from this one object
(``FinetuneRun.params``), so the tracking store can never show a setting other than the one that
trained; below the stage's entry no ``Config`` travels, only the run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from twilbert.config import (
    Config,
    FinetuningConfig,
    PreprocessConfig,
    RepresentationConfig,
    RuntimeConfig,
    TaskConfig,
    to_dict,
)


@dataclass(frozen=True)
class FinetuneRun:
    task: TaskConfig
    ft: FinetuningConfig  # `finetuning` with the task's overrides, the backbone resolved
    split_seed: int  # `seed`: every run of a task is scored on the same splits
    run_seed: int  # the run (finetuning.seeds): it trains with split_seed + run_seed
    representation: RepresentationConfig
    preprocess: PreprocessConfig
    runtime: RuntimeConfig
    pretrained_dir: Path

    @property
    def seed(self) -> int:
        """The training seed (config/runs.py)."""
        return self.split_seed + self.run_seed

    @property
    def max_len(self) -> int:
        return self.representation.max_len

    @property
    def test_len(self) -> int:
        return self.representation.test_len

    def params(self) -> dict:
        """What trains, as one tree: the MLflow params, and the config part of the run's identity."""
        return {"seed": self.split_seed, "run_seed": self.run_seed, "finetuning": to_dict(self.ft),
                "representation": to_dict(self.representation), "preprocess": to_dict(self.preprocess),
                "runtime": to_dict(self.runtime),
                "task": {"name": self.task.name, "dataset": to_dict(self.task.dataset), "task": to_dict(self.task.task)}}


def resolve_finetune_run(cfg: Config, task: TaskConfig, pretrained_dir: Path, run_seed: int = 0,
                         resolve_backbone: bool = True) -> FinetuneRun:
    """The run ``run_seed`` of ``task``; ``resolve_backbone``: read a continued-pretraining output as a
    Hugging Face backbone (``hf_pretrained_backbone``; the baseline stage reads the setting as written)."""
    ft = task.finetuning_config(cfg.finetuning)
    if resolve_backbone:
        ft = hf_pretrained_backbone(ft, Path(pretrained_dir))
    return FinetuneRun(task, ft, cfg.seed, run_seed, cfg.representation, cfg.preprocess, cfg.runtime,
                       Path(pretrained_dir))


def hf_pretrained_backbone(ft: FinetuningConfig, pretrained_dir: Path) -> FinetuningConfig:
    """``ft``, reading ``pretrained_dir`` as a Hugging Face backbone when continued pretraining wrote it
    (``training.init_from: hf``): the default backbone then needs no setting of its own."""
    from twilbert.model.hf_pretraining import is_hf_pretrained
    from twilbert.model.manifest import verify_model_dir

    if ft.backbone != "twilbert" or not is_hf_pretrained(pretrained_dir):
        return ft
    verify_model_dir(pretrained_dir)  # as a twilbert directory is verified before use
    return dataclasses.replace(ft, backbone="hf", hf_path=str(pretrained_dir))
