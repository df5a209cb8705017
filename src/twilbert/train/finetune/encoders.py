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

from twilbert.config import ConfigError, FinetuningConfig, TaskConfig
from twilbert.data.packers import TWilBertPacker
from twilbert.data.preprocess import Preprocessor
from twilbert.data.tokenizer import Tokenizer
from twilbert.evaluation.scoring import n_outputs
from twilbert.model import TWilBertForClassification
from twilbert.model.backbone import hf_classifier, load_hf_backbone, save_hf_classifier, twilbert_classifier
from twilbert.model.card import CONFIG_NAME, HeadConfig, ModelCard, read_card, row_width
from twilbert.model.finetuned import hf_packer
from twilbert.model.io import CheckpointError, load_pretrained_state, save_pretrained
from twilbert.model.manifest import verify_model_dir


def load_encoder_weights(model: TWilBertForClassification, pretrained_dir: Path,
                         verify: Optional[bool] = None) -> ModelCard:
    """Copy the pretrained encoder (``twilbert.*``) into the classifier; heads stay freshly initialised."""
    card, state = load_pretrained_state(pretrained_dir, verify)
    encoder_state = {k: v for k, v in state.items() if k.startswith("twilbert.")}
    missing, unexpected = model.load_state_dict(encoder_state, strict=False)
    missing = [k for k in missing if k.startswith("twilbert.")]
    if missing:
        raise CheckpointError(f"{pretrained_dir}: pretrained weights lack encoder parameters {missing[:5]}")
    return card


def check_max_len(max_len: int, task: TaskConfig, card: ModelCard, pretrained_dir: Path) -> None:
    """The packed rows (``[CLS] a [SEP] (b [SEP])``) of ``representation.max_len`` must fit the pretrained
    model's positions (``max_len_test`` is at most ``max_len``, checked on load)."""
    segments = 2 if task.dataset.aux_header else 1
    if not card.fits(max_len, segments):
        raise ConfigError(
            f"representation.max_len={max_len} gives rows of {row_width(max_len, segments)} tokens for task "
            f"{task.name!r}, more than the {card.max_positions} positions of {pretrained_dir}; lower "
            "representation.max_len or pretrain with a larger one"
        )


@dataclass
class TWilBertBackbone:
    """A pretrained TWilBert directory (``models/pretrained``): its encoder, vocabulary and config."""

    kind: ClassVar[str] = "twilbert"
    pretrained_dir: Path
    encoder_card: ModelCard  # the directory's config.json
    tokenizer: Tokenizer
    ft: FinetuningConfig
    task: TaskConfig
    packer: TWilBertPacker = field(init=False)

    def __post_init__(self) -> None:
        self.packer = TWilBertPacker(self.tokenizer)

    @classmethod
    def load(cls, max_len: int, task: TaskConfig, ft: FinetuningConfig, pretrained_dir: Path) -> "TWilBertBackbone":
        verify_model_dir(pretrained_dir)  # once, before any work; each fold's model then loads unverified
        tokenizer = Tokenizer(pretrained_dir)
        encoder_card = read_card(pretrained_dir / CONFIG_NAME)
        check_max_len(max_len, task, encoder_card, pretrained_dir)
        return cls(Path(pretrained_dir), encoder_card, tokenizer, ft, task)

    @property
    def name(self) -> str:
        return self.encoder_card.model_config.name

    @property
    def hidden_size(self) -> int:  # for Noam
        return self.encoder_card.model_config.hidden_size

    @property
    def preprocess(self) -> Preprocessor:
        return self.tokenizer.preprocess

    def build(self) -> nn.Module:
        """A fresh classifier holding the pretrained encoder weights."""
        model = twilbert_classifier(self.encoder_card, HeadConfig.of(self.ft), n_outputs(self.task))
        load_encoder_weights(model, self.pretrained_dir, verify=False)
        return model

    def save(self, model: nn.Module, directory: Path, extra: dict) -> None:
        save_pretrained(directory, model, self.encoder_card.replace(backbone="twilbert", **extra))
        self.tokenizer.copy_to(directory)


@dataclass
class HFBackbone:
    """A local Hugging Face checkpoint (``finetuning.hf_path``) and its own tokenizer."""

    kind: ClassVar[str] = "hf"
    encoder: Any
    packer: Any  # model.backbone.hf_packer's
    ft: FinetuningConfig
    task: TaskConfig

    @classmethod
    def load(cls, preprocess: Preprocessor, task: TaskConfig, ft: FinetuningConfig) -> "HFBackbone":
        encoder, tokenizer = load_hf_backbone(ft.hf_path)
        return cls(encoder, hf_packer(encoder, tokenizer, preprocess), ft, task)

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
        return hf_classifier(copy.deepcopy(self.encoder), HeadConfig.of(self.ft), n_outputs(self.task))

    def save(self, model: nn.Module, directory: Path, extra: dict) -> None:
        save_hf_classifier(directory, model, self.packer, extra)


Backbone = Union[TWilBertBackbone, HFBackbone]
