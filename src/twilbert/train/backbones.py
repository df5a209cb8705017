"""The encoders a classifier is finetuned on: a pretrained TWilBert directory, or a local Hugging
Face checkpoint. Each backbone builds fresh classifiers holding its pretrained weights, packs rows
the way its encoder reads them, and saves a fitted classifier as a model directory.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional, Union

from torch import nn

from twilbert.config import Config, ConfigError, FinetuningConfig, ModelConfig, TaskConfig, from_dict
from twilbert.data.preprocess import Preprocessor
from twilbert.data.tokenizer import Tokenizer
from twilbert.model import TWilBertForClassification
from twilbert.data.packers import TWilBertPacker
from twilbert.finetuned import hf_packer
from twilbert.model.backbone import HFClassifier, load_hf_backbone, save_hf_classifier
from twilbert.model.io import (
    CONFIG_NAME, CheckpointError, load_pretrained_state, model_config_from_dict, read_config_json, save_pretrained,
)
from twilbert.model.manifest import verify_model_dir
from twilbert.scoring import n_outputs


def build_classifier(encoder_config: dict, ft: FinetuningConfig, task: TaskConfig) -> TWilBertForClassification:
    model_cfg = from_dict(ModelConfig, encoder_config["model"], "model")
    return TWilBertForClassification(
        model_cfg, encoder_config["vocab_size"], encoder_config["max_positions"], n_outputs(task),
        ft.collapse_mode, ft.use_special_tokens, ft.dropout, ft.n_hidden, ft.hidden_size,
    )


def load_encoder_weights(model: TWilBertForClassification, pretrained_dir: Path,
                         verify: Optional[bool] = None) -> dict:
    """Copy the pretrained encoder (``twilbert.*``) into the classifier; heads stay freshly initialised."""
    config, state = load_pretrained_state(pretrained_dir, verify)
    encoder_state = {k: v for k, v in state.items() if k.startswith("twilbert.")}
    missing, unexpected = model.load_state_dict(encoder_state, strict=False)
    missing = [k for k in missing if k.startswith("twilbert.")]
    if missing:
        raise CheckpointError(f"{pretrained_dir}: pretrained weights lack encoder parameters {missing[:5]}")
    return config


def check_max_len(cfg: Config, task: TaskConfig, max_positions: int, pretrained_dir: Path) -> None:
    """The packed rows (``[CLS] a [SEP] (b [SEP])``) must fit the pretrained model's positions
    (``max_len_test`` is at most ``max_len``, checked on load)."""
    segments = 2 if task.dataset.aux_header else 1
    max_len = cfg.representation.max_len
    width = segments * (max_len + 1) + 1
    if width > max_positions:
        raise ConfigError(
            f"representation.max_len={max_len} gives rows of {width} tokens for task {task.name!r}, more than the "
            f"{max_positions} positions of {pretrained_dir}; lower representation.max_len or pretrain with a "
            "larger one"
        )


def head_config(ft: FinetuningConfig) -> dict:
    return {k: getattr(ft, k) for k in ("collapse_mode", "use_special_tokens", "dropout", "n_hidden", "hidden_size")}


@dataclass
class TWilBertBackbone:
    """A pretrained TWilBert directory (``models/pretrained``): its encoder, vocabulary and config."""

    kind: ClassVar[str] = "twilbert"
    find_unused_parameters: ClassVar[bool] = False
    pretrained_dir: Path
    encoder_config: dict  # the directory's config.json
    tokenizer: Tokenizer
    ft: FinetuningConfig
    task: TaskConfig
    packer: TWilBertPacker = field(init=False)

    def __post_init__(self) -> None:
        self.packer = TWilBertPacker(self.tokenizer)

    @classmethod
    def load(cls, cfg: Config, task: TaskConfig, ft: FinetuningConfig, pretrained_dir: Path) -> "TWilBertBackbone":
        verify_model_dir(pretrained_dir)  # once, before any work; each fold's model then loads unverified
        tokenizer = Tokenizer(pretrained_dir)
        encoder_config = read_config_json(pretrained_dir / CONFIG_NAME)
        _, _, max_positions = model_config_from_dict(encoder_config, str(pretrained_dir / CONFIG_NAME))
        check_max_len(cfg, task, max_positions, pretrained_dir)
        return cls(Path(pretrained_dir), encoder_config, tokenizer, ft, task)

    @property
    def name(self) -> str:
        return self.encoder_config["model"].get("name", "twilbert")

    @property
    def hidden_size(self) -> int:  # for Noam
        return self.encoder_config["model"]["hidden_size"]

    @property
    def preprocess(self) -> Preprocessor:
        return self.tokenizer.preprocess

    def build(self) -> nn.Module:
        """A fresh classifier holding the pretrained encoder weights."""
        model = build_classifier(self.encoder_config, self.ft, self.task)
        load_encoder_weights(model, self.pretrained_dir, verify=False)
        return model

    def save(self, model: nn.Module, directory: Path, extra: dict) -> None:
        save_pretrained(directory, model, {**self.encoder_config, "backbone": "twilbert", **extra})
        self.tokenizer.copy_to(directory)


@dataclass
class HFBackbone:
    """A local Hugging Face checkpoint (``finetuning.hf_path``) and its own tokenizer."""

    kind: ClassVar[str] = "hf"
    # Hugging Face encoders compute a pooler the head does not use: DDP must be told to expect it.
    find_unused_parameters: ClassVar[bool] = True
    encoder: Any
    packer: Any  # model.backbone.hf_packer's
    ft: FinetuningConfig
    task: TaskConfig

    @classmethod
    def load(cls, cfg: Config, task: TaskConfig, ft: FinetuningConfig) -> "HFBackbone":
        encoder, tokenizer = load_hf_backbone(ft.hf_path)
        return cls(encoder, hf_packer(encoder, tokenizer, Preprocessor(cfg.preprocess)), ft, task)

    @property
    def name(self) -> str:
        return Path(self.ft.hf_path).name

    @property
    def hidden_size(self) -> int:
        return self.encoder.config.hidden_size

    @property
    def preprocess(self) -> Preprocessor:
        return self.packer.preprocess

    def build(self) -> nn.Module:
        ft = self.ft
        return HFClassifier(copy.deepcopy(self.encoder), n_outputs(self.task), ft.collapse_mode, ft.use_special_tokens,
                            ft.dropout, ft.n_hidden, ft.hidden_size)

    def save(self, model: nn.Module, directory: Path, extra: dict) -> None:
        save_hf_classifier(directory, model, self.packer, extra)


Backbone = Union[TWilBertBackbone, HFBackbone]
