"""A Hugging Face masked-LM checkpoint under twilbert's pretraining objective (``training.init_from: hf``).

:class:`HFForPretraining` takes the batch ``TWilBertForPretraining`` takes and returns the same
``PretrainOutput``, so the training loop, the masked-LM loss that never builds the (N, V) logits, the
held-out metrics, checkpoints and resume all serve both. The checkpoint's own modules compute
everything HF's forward computes, in its order:

- positions are left to the checkpoint: RoBERTa and XLM-R count them from ``padding_idx + 1`` and skip
  padding, which only their own embeddings know (a position id passed from outside would be wrong);
- segment ids reach only a checkpoint with two token types (RoBERTa has one: type 1 would index past it);
- the MLM head runs on the masked positions only: its transform, then its decoder (tied to the word
  embeddings where the checkpoint ties them) inside the loss.

An optional reply-order head (``training.rop``) reads the final [CLS] (``<s>``) state; it is not part
of the Hugging Face folder the stage writes, but of ``rop_head.safetensors`` beside it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from twilbert.config import RopConfig
from twilbert.errors import TwilbertError
from twilbert.model.heads import PretrainOutput, TWilBertROPHead, masked_positions
from twilbert.model.hf_quiet import load_summary

log = logging.getLogger(__name__)

PathLike = Union[str, Path]
CARD_NAME = "twilbert.json"  # the project's card in a Hugging Face folder (its config.json is HF's)
ROP_FILE = "rop_head.safetensors"  # the reply-order head, which no Hugging Face class holds
CARD_FORMAT = "twilbert-hf-pretrained/1"


def is_hf_pretrained(directory: PathLike) -> bool:
    """Whether ``directory`` is the output of continued pretraining (a Hugging Face folder)."""
    return (Path(directory) / CARD_NAME).is_file()


class HFModelError(TwilbertError, ValueError):
    """The checkpoint cannot be continued; the message says why and what to do."""


def load_masked_lm(path: PathLike, key: str = "training.hf_path") -> nn.Module:
    """``AutoModelForMaskedLM`` from a local folder, in float32 (whatever dtype it was saved in); never the network.
    The folder is checked whole first (data.hf_checkpoint): config, tokenizer files, every weight's name and shape."""
    from twilbert.data.hf_checkpoint import MASKED_LM, load_hf_checkpoint

    checkpoint = load_hf_checkpoint(path, key, MASKED_LM)
    log.info("%s", load_summary(f"{key} {path}", type(checkpoint.model).__name__, checkpoint.info))
    return checkpoint.model


def _mlm_head_name(mlm: nn.Module) -> str:
    """The module whose forward ends in ``self.decoder(x)`` with the output embeddings as decoder."""
    decoder = mlm.get_output_embeddings()
    for name, module in mlm.named_modules():
        if name and getattr(module, "decoder", None) is decoder and decoder is not None:
            return name
    raise HFModelError(f"{type(mlm).__name__}: its masked-LM head has no `decoder` layer (BERT, RoBERTa/XLM-R and "
                       "ALBERT heads have one); this family is not supported for continued pretraining")


class HFForPretraining(nn.Module):
    """``mlm`` (an ``AutoModelForMaskedLM``) + an optional ROP head, with ``TWilBertForPretraining``'s interface."""

    def __init__(self, mlm: nn.Module, rop: bool = True):
        super().__init__()
        config = mlm.config
        self.mlm = mlm
        self.use_segments = (getattr(config, "type_vocab_size", None) or 1) > 1
        self.head_name = _mlm_head_name(mlm)
        hidden = config.hidden_size
        self.rop_classifier = (
            TWilBertROPHead(hidden, RopConfig(enabled=True, n_hidden=1, hidden_size=hidden),
                            getattr(config, "initializer_range", 0.02)) if rop else None
        )

    @property
    def config(self) -> Any:
        return self.mlm.config

    def encode(self, input_ids: torch.Tensor, segment_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Final hidden states (B, T, H), as the checkpoint's own forward computes them."""
        extra = {"token_type_ids": segment_ids} if self.use_segments else {}
        out = self.mlm.base_model(input_ids=input_ids, attention_mask=attention_mask.long(), **extra)
        return out.last_hidden_state

    def transform(self, hidden: torch.Tensor) -> torch.Tensor:
        """The MLM head up to its decoder: (N, H) -> (N, E). The head's own forward with its decoder
        set aside, so any head that ends in ``decoder`` (dense, activation, LayerNorm) is followed exactly."""
        head = self.mlm.get_submodule(self.head_name)
        decoder = head.decoder
        head.decoder = nn.Identity()
        try:
            return head(hidden)
        finally:
            head.decoder = decoder

    def decoder(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        out = self.mlm.get_output_embeddings()
        return out.weight, out.bias

    def logits(self, input_ids: torch.Tensor, segment_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """MLM logits at every position (B, T, V): for comparing with the checkpoint's own forward."""
        weight, bias = self.decoder()
        return nn.functional.linear(self.transform(self.encode(input_ids, segment_ids, attention_mask)), weight, bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        segment_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        mlm_labels: torch.Tensor,
        padded: Optional[bool] = None,
        mlm_positions: Optional[torch.Tensor] = None,
    ) -> PretrainOutput:
        """As ``TWilBertForPretraining.forward``; ``padded`` is unused (the checkpoint masks padding itself)."""
        hidden = self.encode(input_ids, segment_ids, attention_mask)  # (B, T, H)
        masked_hidden, targets = masked_positions(hidden, mlm_labels, mlm_positions)  # (N, H), (N,)
        weight, bias = self.decoder()
        if bias is None:
            bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
        rop_logits = self.rop_classifier(hidden[:, 0]) if self.rop_classifier is not None else None
        return PretrainOutput(self.transform(masked_hidden), targets, rop_logits, weight, bias)


def check_tied(mlm: nn.Module, where: str) -> None:
    """A checkpoint that ties its decoder to its word embeddings must still share one tensor."""
    if not getattr(mlm.config, "tie_word_embeddings", False):
        return
    out, inp = mlm.get_output_embeddings(), mlm.get_input_embeddings()
    if out is not None and out.weight.data_ptr() != inp.weight.data_ptr():
        raise HFModelError(f"{where}: the decoder is no longer tied to the word embeddings")


def load_hf_pretraining(directory: PathLike) -> tuple[HFForPretraining, dict]:
    """The model continued pretraining wrote to ``directory`` (its ROP head included), in eval mode, and its card."""
    import json

    from twilbert.model.io import read_weights
    from twilbert.model.manifest import verify_model_dir

    directory = Path(directory)
    verify_model_dir(directory)
    card = json.loads((directory / CARD_NAME).read_text(encoding="utf-8"))
    model = HFForPretraining(load_masked_lm(directory, key="model"), rop=bool(card.get("rop")))
    if model.rop_classifier is not None:
        model.rop_classifier.load_state_dict(read_weights(directory / ROP_FILE))
    return model.eval(), card
