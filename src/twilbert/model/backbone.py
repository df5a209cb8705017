"""A local Hugging Face checkpoint as the encoder under TWilBert's classification head.

The classifier takes the same batch as TWilBert's (``input_ids``, ``segment_ids``,
``attention_mask``, ``special_mask``), so one finetuning loop, one set of heads, losses and metrics
serves both. A finetuned model directory says which it holds in its model card's ``backbone``.

transformers is imported lazily: only the ``hf`` backbone needs it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from twilbert.model.card import HeadConfig, ModelCard
from twilbert.model.heads import ClassificationHead, TWilBertForClassification
from twilbert.model.hf_quiet import load_summary
from twilbert.model.io import save_pretrained
from twilbert.model.manifest import write_manifest

log = logging.getLogger(__name__)

HF_DIR = "hf"  # sub-directory of a finetuned HF classifier: the HF config and tokenizer files
PathLike = Union[str, Path]


class HFClassifier(nn.Module):
    """A Hugging Face encoder (``AutoModel``) under the same ``ClassificationHead`` as TWilBert's."""

    def __init__(
        self,
        backbone: nn.Module,
        n_outputs: int,
        collapse_mode: str = "avg",
        use_special_tokens: bool = True,
        dropout: float = 0.1,
        n_hidden: int = 0,
        head_hidden_size: int = 256,
    ):
        super().__init__()
        config = backbone.config
        self.backbone = backbone
        # RoBERTa-style checkpoints have a single segment embedding: segment ids would index past it
        self.use_segments = getattr(config, "type_vocab_size", 1) > 1
        self.classifier = ClassificationHead(
            config.hidden_size, n_outputs, collapse_mode, use_special_tokens, dropout, n_hidden, head_hidden_size,
            getattr(config, "initializer_range", 0.02),
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        segment_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        special_mask: Optional[torch.Tensor] = None,
        padded: Optional[bool] = None,
    ) -> torch.Tensor:
        """(B, T) inputs -> logits (B, n_outputs); ``padded`` is TWilBert's hint, unused here (HF masks itself)."""
        out = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask.long(),
            token_type_ids=segment_ids if self.use_segments else None,
        )
        return self.classifier(out.last_hidden_state, attention_mask, special_mask)  # (B, T, H) -> (B, C)


def load_hf_backbone(path: PathLike) -> tuple[nn.Module, Any]:
    """(AutoModel, AutoTokenizer) from a local ``save_pretrained`` directory; never the network. The folder is
    checked whole first (data.hf_checkpoint): config, tokenizer files, every encoder weight's name and shape."""
    from twilbert.data.hf_checkpoint import ENCODER, load_hf_checkpoint

    checkpoint = load_hf_checkpoint(path, "finetuning.hf_path", ENCODER)
    log.info("%s", load_summary(f"finetuning.hf_path {path}", type(checkpoint.model).__name__, checkpoint.info))
    return checkpoint.model, checkpoint.tokenizer


def save_hf_classifier(directory: PathLike, model: HFClassifier, packer: Any, extra: dict) -> Path:
    """safetensors + ``config.json`` (HF config under ``"model"``), HF config and tokenizer in ``hf/``.

    ``packer``: the ``data.packers.HFPacker`` the model was trained with (tokenizer, preprocessing, positions);
    ``extra``: the finetuned card's keys (head, task, max_len_test, finetuning, best_epoch...).
    """
    directory = Path(directory)
    card = ModelCard(
        model=json.loads(model.backbone.config.to_json_string()),
        vocab_size=int(model.backbone.config.vocab_size),
        max_positions=packer.max_positions,
        backbone="hf",
        hf_dir=HF_DIR,
        preprocess=packer.preprocess.cfg,
        **extra,
    )
    save_pretrained(directory, model, card)
    model.backbone.config.save_pretrained(directory / HF_DIR)
    packer.tokenizer.save_pretrained(directory / HF_DIR)
    write_manifest(directory)  # hf/ included
    return directory


def twilbert_classifier(card: ModelCard, head: HeadConfig, n_outputs: int) -> TWilBertForClassification:
    """A TWilBert encoder of the card's shape under a fresh ``head`` with ``n_outputs`` outputs."""
    return TWilBertForClassification(
        card.model_config, card.vocab_size, card.max_positions, n_outputs,
        head.collapse_mode, head.use_special_tokens, head.dropout, head.n_hidden, head.hidden_size,
    )


def hf_classifier(encoder: nn.Module, head: HeadConfig, n_outputs: int) -> HFClassifier:
    return HFClassifier(encoder, n_outputs, head.collapse_mode, head.use_special_tokens, head.dropout, head.n_hidden,
                        head.hidden_size)
