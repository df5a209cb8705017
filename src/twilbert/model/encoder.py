"""The TWilBert encoder: embeddings, attention, layer, (shared) layer stack, then the model.

Part names follow ALBERT (``embeddings``, ``embedding_hidden_mapping_in``, ``encoder``,
``attention``, ``ffn``/``ffn_output``, ``full_layer_layer_norm``) so an ALBERT reader finds them
and the weights map onto Hugging Face's layout (see ``hf.py``). Post-LN, as in BERT/ALBERT.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from twilbert.config import ModelConfig
from twilbert.model.pkm import ProductKeyMemory

N_SEGMENTS = 2  # [CLS] a [SEP] is segment 0, b [SEP] is segment 1

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class TWilBertEmbeddings(nn.Module):
    """Word + position + segment embeddings, LayerNorm, dropout; width E when factorized, else H."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, max_positions: int):
        super().__init__()
        dim = cfg.embedding_size if cfg.factorize_embeddings else cfg.hidden_size
        self.word_embeddings = nn.Embedding(vocab_size, dim)
        self.position_embeddings = nn.Embedding(max_positions, dim)
        self.token_type_embeddings = nn.Embedding(N_SEGMENTS, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.input_dropout)

    def forward(self, input_ids: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # (T,)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(segment_ids)  # (B, T, E)
        x = x + self.position_embeddings(positions)  # (B, T, E)
        return self.dropout(self.LayerNorm(x))


def padding_bias(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention bias (B, 1, 1, T): 0 on real keys, the dtype's finite minimum on padding.

    Not a boolean mask: a row whose keys are all padding then gets uniform weights instead of NaN,
    in fp32 and bf16 alike.
    """
    bias = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
    return bias.masked_fill(~attention_mask, torch.finfo(dtype).min)[:, None, None, :]


def explicit_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor], dropout_p: float
) -> torch.Tensor:
    """softmax(q k^T / sqrt(hs) + bias) v as two matmuls: q, k, v (B, nh, T, hs) -> (B, nh, T, hs)."""
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2))  # (B, nh, T, T)
    if bias is not None:
        scores = scores + bias
    probs = scores.softmax(-1)  # (B, nh, T, T)
    if dropout_p:
        probs = F.dropout(probs, dropout_p)
    return torch.matmul(probs, v)


class TWilBertAttention(nn.Module):
    """Multi-head self-attention with n_heads x head_size inner width, residual and post-LayerNorm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_size = cfg.head_size
        inner = cfg.n_heads * cfg.head_size  # may differ from H when attention_size is set
        self.query = nn.Linear(cfg.hidden_size, inner)
        self.key = nn.Linear(cfg.hidden_size, inner)
        self.value = nn.Linear(cfg.hidden_size, inner)
        self.dense = nn.Linear(inner, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.output_dropout)

    def forward(self, x: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """x (B, T, H), attention_mask (B, T) bool, True on real tokens (None: no padding) -> (B, T, H)."""
        B, T, _ = x.shape
        q = self.query(x).view(B, T, self.n_heads, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        k = self.key(x).view(B, T, self.n_heads, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        v = self.value(x).view(B, T, self.n_heads, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        bias = None if attention_mask is None else padding_bias(attention_mask, q.dtype)  # (B, 1, 1, T)
        dropout_p = self.dropout.p if self.training else 0.0
        if q.dtype == torch.bfloat16 and q.device.type == "cpu":
            # PyTorch's CPU flash kernel is slow in bf16 (its backward above all); plain bf16 matmuls
            # run on the matrix units: a whole pretraining step was ~20% faster (benchmarks/).
            ctx = explicit_attention(q, k, v, bias, dropout_p)  # (B, nh, T, hs)
        else:
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)  # (B, nh, T, hs)
        ctx = ctx.transpose(1, 2).reshape(B, T, self.n_heads * self.head_size)  # (B, T, nh*hs)
        return self.LayerNorm(x + self.dropout(self.dense(ctx)))


class TWilBertLayer(nn.Module):
    """Attention then the position-wise block (FFN, or a product-key memory in its place), post-LN."""

    def __init__(self, cfg: ModelConfig, with_ffn: bool = True):
        super().__init__()
        self.attention = TWilBertAttention(cfg)
        # A layer whose FFN slot is always taken by a memory gets no FFN: unused weights would
        # only cost memory and trip DDP's unused-parameter check.
        self.ffn = nn.Linear(cfg.hidden_size, cfg.ffn_size) if with_ffn else None
        self.ffn_output = nn.Linear(cfg.ffn_size, cfg.hidden_size) if with_ffn else None
        self.activation = ACTIVATIONS[cfg.hidden_act]
        self.dropout = nn.Dropout(cfg.output_dropout)
        self.full_layer_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(
        self, x: torch.Tensor, attention_mask: Optional[torch.Tensor], memory: Optional[ProductKeyMemory] = None
    ) -> torch.Tensor:
        """x (B, T, H) -> (B, T, H); ``memory`` replaces the FFN in this application (XLM)."""
        x = self.attention(x, attention_mask)
        if memory is None:
            out = self.ffn_output(self.activation(self.ffn(x)))  # (B, T, H)
        else:
            out = memory(x, attention_mask)  # (B, T, H)
        return self.full_layer_layer_norm(x + self.dropout(out))


class TWilBertTransformer(nn.Module):
    """``n_encoders`` layer applications: one shared layer (ALBERT all-shared) or one layer each.

    ``layers`` holds one module when ``cross_sharing`` and ``n_encoders`` otherwise. Memories live
    in ``memories[str(i)]``, one per layer index in ``pkm_params.in_layers``, never shared: under
    cross-sharing only the attention/FFN weights are shared.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_encoders = cfg.n_encoders
        self.cross_sharing = cfg.cross_sharing
        memory_layers = sorted(set(cfg.pkm_params.in_layers)) if cfg.pkm else []
        if cfg.cross_sharing:
            needs_ffn = len(memory_layers) < cfg.n_encoders
            self.layers = nn.ModuleList([TWilBertLayer(cfg, with_ffn=needs_ffn)])
        else:
            self.layers = nn.ModuleList(
                [TWilBertLayer(cfg, with_ffn=i not in memory_layers) for i in range(cfg.n_encoders)]
            )
        self.memories = nn.ModuleDict(
            {str(i): ProductKeyMemory(cfg.hidden_size, cfg.hidden_size, cfg.pkm_params) for i in memory_layers}
        )

    def layer_at(self, i: int) -> TWilBertLayer:
        """The layer module applied at depth i (the same object for every i when shared)."""
        return self.layers[0 if self.cross_sharing else i]

    def forward(self, x: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """x (B, T, H), attention_mask (B, T) bool or None (no padding) -> (B, T, H)."""
        for i in range(self.n_encoders):
            memory = self.memories[str(i)] if str(i) in self.memories else None
            x = self.layer_at(i)(x, attention_mask, memory)
        return x


def init_weights(module: nn.Module, std: float) -> None:
    """Truncated normal (+-2 std) for Linear/Embedding weights, zero biases, unit LayerNorm.

    ``nn.EmbeddingBag`` and raw parameters (the memory's values and keys) keep their own init.
    """
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.trunc_normal_(module.weight, mean=0.0, std=std, a=-2 * std, b=2 * std)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class TWilBertModel(nn.Module):
    """The encoder: (input_ids, segment_ids, attention_mask) of shape (B, T) -> hidden states (B, T, H)."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, max_positions: int):
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.max_positions = max_positions
        self.embeddings = TWilBertEmbeddings(cfg, vocab_size, max_positions)
        self.embedding_hidden_mapping_in = (
            nn.Linear(cfg.embedding_size, cfg.hidden_size) if cfg.factorize_embeddings else nn.Identity()
        )
        self.encoder = TWilBertTransformer(cfg)
        self.apply(lambda m: init_weights(m, cfg.initializer_range))

    def forward(
        self,
        input_ids: torch.Tensor,
        segment_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        padded: Optional[bool] = None,
    ) -> torch.Tensor:
        """input_ids/segment_ids (B, T) long, attention_mask (B, T) bool (None: all real) -> (B, T, H).

        ``padded``: whether any row of the batch is padded, as the batch builder knows it on the host
        (``PairBatch.padded``). Without padding attention runs unmasked (SDPA's flash kernel on a GPU)
        and memories skip the gather. None: the mask is inspected, which waits for the device.
        """
        T = input_ids.shape[1]
        if T > self.max_positions:
            raise ValueError(
                f"input length {T} exceeds max_positions={self.max_positions} of this model; "
                "truncate the input or build the model with more positions"
            )
        if attention_mask is not None:
            attention_mask = attention_mask.bool()
            if padded is None:
                padded = not bool(attention_mask.all())  # a host sync: the training loops pass ``padded``
            if not padded:
                attention_mask = None
        x = self.embeddings(input_ids, segment_ids)  # (B, T, E)
        x = self.embedding_hidden_mapping_in(x)  # (B, T, H)
        return self.encoder(x, attention_mask)  # (B, T, H)
