"""Heads on top of the encoder: MLM (``predictions``), reply order prediction (``rop_classifier``),
classification, and the two full models that carry them."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from twilbert.config import ModelConfig, RopConfig
from twilbert.data.special import CLS_ID, IGNORE_INDEX, SEP_ID  # constants only: model/ reads no data
from twilbert.model.encoder import ACTIVATIONS, TWilBertModel, init_weights


class TWilBertMLMHead(nn.Module):
    """ALBERT's ``predictions``: dense H->E, activation, LayerNorm, decoder E->V tied to the word embeddings."""

    def __init__(self, cfg: ModelConfig, word_embeddings: nn.Embedding):
        super().__init__()
        vocab_size, dim = word_embeddings.weight.shape  # dim is E, or H when not factorized
        self.dense = nn.Linear(cfg.hidden_size, dim)
        self.activation = ACTIVATIONS[cfg.hidden_act]
        self.LayerNorm = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.apply(lambda m: init_weights(m, cfg.initializer_range))
        # Tied after init so the shared matrix keeps the embeddings' initialisation.
        self.decoder = nn.Linear(dim, vocab_size, bias=False)
        self.decoder.weight = word_embeddings.weight
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def transform(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (N, H) -> (N, E): everything before the decoder."""
        return self.LayerNorm(self.activation(self.dense(hidden)))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (N, H) of the masked positions only -> logits (N, V)."""
        return F.linear(self.transform(hidden), self.decoder.weight, self.bias)  # (N, V)


class TWilBertROPHead(nn.Module):
    """``rop_classifier`` on the [CLS] state: n_hidden x (Linear, tanh), then Linear -> 2.

    Label 1 = original order, 0 = swapped (ALBERT's SOP is the other way round). tanh rather than
    TWilBert's gelu+LayerNorm so that one hidden layer of width H is exactly ALBERT/BERT's
    pooler + SOP/NSP classifier, which makes the head exportable to Hugging Face.
    """

    def __init__(self, hidden_size: int, rop: RopConfig, initializer_range: float):
        super().__init__()
        widths = [hidden_size] + [rop.hidden_size] * rop.n_hidden
        self.hidden = nn.ModuleList([nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:])])
        self.classifier = nn.Linear(widths[-1], 2)
        self.apply(lambda m: init_weights(m, initializer_range))

    def forward(self, cls_hidden: torch.Tensor) -> torch.Tensor:
        """cls_hidden (B, H) -> logits (B, 2)."""
        h = cls_hidden
        for layer in self.hidden:
            h = torch.tanh(layer(h))
        return self.classifier(h)


class ClassificationHead(nn.Module):
    """Pool the sequence ('avg' over real tokens or 'cls'), dropout, n_hidden x (Linear, gelu, dropout), Linear."""

    def __init__(
        self,
        hidden_size: int,
        n_outputs: int,
        collapse_mode: str = "avg",
        use_special_tokens: bool = True,
        dropout: float = 0.1,
        n_hidden: int = 0,
        hidden_size_head: int = 256,
        initializer_range: float = 0.02,
    ):
        super().__init__()
        if collapse_mode not in ("avg", "cls"):
            raise ValueError(f"finetuning.collapse_mode must be 'avg' or 'cls', got {collapse_mode!r}")
        self.collapse_mode = collapse_mode
        self.use_special_tokens = use_special_tokens
        self.dropout = nn.Dropout(dropout)
        widths = [hidden_size] + [hidden_size_head] * n_hidden
        self.hidden = nn.ModuleList([nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:])])
        self.out = nn.Linear(widths[-1], n_outputs)
        self.apply(lambda m: init_weights(m, initializer_range))

    def pool(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, special_mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """hidden (B, T, H) -> (B, H): the [CLS] state, or the mean over the tokens that count."""
        if self.collapse_mode == "cls":
            return hidden[:, 0]
        keep = attention_mask.bool()  # (B, T)
        if not self.use_special_tokens:
            if special_mask is None:
                raise ValueError("special_mask is required when use_special_tokens is False")
            keep = keep & ~special_mask.bool()
        weights = keep.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
        # clamp: a text of only special tokens pools to zeros instead of NaN
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)  # (B, H)

    def forward(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, special_mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """hidden (B, T, H) -> logits (B, n_outputs)."""
        h = self.dropout(self.pool(hidden, attention_mask, special_mask))
        for layer in self.hidden:
            h = self.dropout(F.gelu(layer(h)))
        return self.out(h)


class PretrainOutput(NamedTuple):
    mlm_states: torch.Tensor  # (N, E) the MLM head's states before the decoder, at the N positions with a label
    mlm_targets: torch.Tensor  # (N,) the labels of those positions
    rop_logits: Optional[torch.Tensor]  # (B, 2), None when ROP is off
    decoder_weight: torch.Tensor  # (V, E) the MLM decoder, tied to the word embeddings
    decoder_bias: torch.Tensor  # (V,)

    @property
    def mlm_logits(self) -> torch.Tensor:
        """(N, V). Training never builds them: ``losses.linear_mlm_loss`` takes the states and the decoder."""
        return F.linear(self.mlm_states, self.decoder_weight, self.decoder_bias)


class TWilBertForPretraining(nn.Module):
    """Encoder + MLM head + ROP head (ALBERT's ``AlbertForPreTraining`` layout)."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, max_positions: int):
        super().__init__()
        self.cfg = cfg
        self.twilbert = TWilBertModel(cfg, vocab_size, max_positions)
        self.predictions = TWilBertMLMHead(cfg, self.twilbert.embeddings.word_embeddings)
        self.rop_classifier = (
            TWilBertROPHead(cfg.hidden_size, cfg.rop, cfg.initializer_range) if cfg.rop.enabled else None
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        segment_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        mlm_labels: torch.Tensor,
        padded: Optional[bool] = None,
        mlm_positions: Optional[torch.Tensor] = None,
    ) -> PretrainOutput:
        """mlm_labels (B, T): target id at masked positions, -100 elsewhere.

        ``mlm_positions`` (N,): the flat indices (row * T + column) of those positions, when the caller
        knows them (the masks are drawn on the host): a boolean selection on the device would wait
        for it to count them. ``padded``: see ``TWilBertModel.forward``.
        """
        hidden = self.twilbert(input_ids, segment_ids, attention_mask, padded)  # (B, T, H)
        # The V-projection dominates the head's cost, so it runs on the ~15% masked positions only,
        # and in the loss (or ``mlm_logits``), not here.
        masked_hidden, targets = masked_positions(hidden, mlm_labels, mlm_positions)  # (N, H), (N,)
        mlm_states = self.predictions.transform(masked_hidden)  # (N, E)
        rop_logits = self.rop_classifier(hidden[:, 0]) if self.rop_classifier is not None else None
        return PretrainOutput(mlm_states, targets, rop_logits, self.predictions.decoder.weight, self.predictions.bias)


def masked_positions(hidden: torch.Tensor, mlm_labels: torch.Tensor,
                     mlm_positions: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The hidden states (N, H) and target ids (N,) at the masked positions: those the flat indices
    ``mlm_positions`` name (row * T + column, known on the host), else where ``mlm_labels`` (B, T) is set."""
    if mlm_positions is None:
        selected = mlm_labels != IGNORE_INDEX  # (B, T)
        return hidden[selected], mlm_labels[selected]
    return hidden.flatten(0, 1).index_select(0, mlm_positions), mlm_labels.flatten().index_select(0, mlm_positions)


class TWilBertForClassification(nn.Module):
    """Encoder + ``ClassificationHead`` for finetuning."""

    def __init__(
        self,
        cfg: ModelConfig,
        vocab_size: int,
        max_positions: int,
        n_outputs: int,
        collapse_mode: str = "avg",
        use_special_tokens: bool = True,
        dropout: float = 0.1,
        n_hidden: int = 0,
        head_hidden_size: int = 256,
    ):
        super().__init__()
        self.cfg = cfg
        self.twilbert = TWilBertModel(cfg, vocab_size, max_positions)
        self.classifier = ClassificationHead(
            cfg.hidden_size,
            n_outputs,
            collapse_mode,
            use_special_tokens,
            dropout,
            n_hidden,
            head_hidden_size,
            cfg.initializer_range,
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        segment_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        special_mask: Optional[torch.Tensor] = None,
        padded: Optional[bool] = None,
    ) -> torch.Tensor:
        """-> logits (B, n_outputs); special_mask defaults to the [CLS]/[SEP] positions of input_ids.
        ``padded``: see ``TWilBertModel.forward``."""
        if special_mask is None:
            special_mask = (input_ids == CLS_ID) | (input_ids == SEP_ID)
        hidden = self.twilbert(input_ids, segment_ids, attention_mask, padded)  # (B, T, H)
        return self.classifier(hidden, attention_mask, special_mask)


def count_parameters(module: nn.Module) -> int:
    """Number of distinct parameter elements: shared and tied parameters count once."""
    # parameters() yields each Parameter object once, however many modules hold it.
    return sum(p.numel() for p in module.parameters())
