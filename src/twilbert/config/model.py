"""The TWilBert encoder and its pretraining heads: ``model`` and its sub-sections (TWilBert's key names:
``n_encoders``, ``cross_sharing``, ``pkm_params``, ``masked_lm``, ``rop``...)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from twilbert.config.strict import ConfigError, check_non_negative, check_nonempty, check_positive, check_probability


@dataclass
class PkmConfig:
    """Product Key Memory (Lample et al. 2019), TWilBert's ``pkm_params``."""

    factorize_embeddings: bool = False
    value_size: Optional[int] = None  # E of the value table when factorized (default k_dim // 4)
    k_dim: int = 512
    memory_size: int = 256
    n_heads: int = 4
    knn: int = 32
    in_layers: list[int] = field(default_factory=list)
    input_dropout: float = 0.0
    output_dropout: float = 0.0
    batch_norm: bool = True
    value_lr: float = 1e-3  # XLM: the sparse value table learns best at its own, higher rate

    def validate(self, where: str) -> None:
        check_positive(self, where, "k_dim", "memory_size", "n_heads", "knn", "value_size", "value_lr")
        if self.k_dim % 2:
            raise ConfigError(f"{where}.k_dim must be even (it is split in two halves), got {self.k_dim}")
        if self.knn > self.memory_size:
            raise ConfigError(f"{where}.knn ({self.knn}) must be <= {where}.memory_size ({self.memory_size})")
        check_probability(self, where, "input_dropout", "output_dropout")


@dataclass
class MaskProbs:
    mask: float = 0.8
    random: float = 0.1
    keep: float = 0.1


@dataclass
class MaskedLMConfig:
    type: Literal["word", "span"] = "word"
    max_span: int = 3
    budget: float = 0.15
    probs: MaskProbs = field(default_factory=MaskProbs)

    def validate(self, where: str) -> None:
        check_positive(self, where, "max_span")
        if not 0.0 < self.budget < 1.0:
            raise ConfigError(f"{where}.budget must be in (0, 1), got {self.budget}")
        total = self.probs.mask + self.probs.random + self.probs.keep
        if abs(total - 1.0) > 1e-6 or min(self.probs.mask, self.probs.random, self.probs.keep) < 0:
            raise ConfigError(f"{where}.probs mask+random+keep must be non-negative and sum to 1, got {total}")


@dataclass
class RopConfig:
    enabled: bool = True
    n_hidden: int = 1
    hidden_size: int = 512

    def validate(self, where: str) -> None:
        check_non_negative(self, where, "n_hidden")
        check_positive(self, where, "hidden_size")


@dataclass
class ModelConfig:
    """The TWilBert encoder and its pretraining heads (TWilBert's ``model`` section)."""

    name: str = "tiny"
    factorize_embeddings: bool = True
    cross_sharing: bool = True
    embedding_size: int = 128
    hidden_size: int = 768
    n_encoders: int = 12
    n_heads: int = 12
    attention_size: Optional[int] = None  # d_k per head; None means hidden_size // n_heads
    intermediate_size: Optional[int] = None  # feed-forward width; None means 4 * hidden_size
    hidden_act: Literal["gelu", "gelu_new", "relu"] = "gelu"
    input_dropout: float = 0.0
    output_dropout: float = 0.0
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pkm: bool = False
    pkm_params: PkmConfig = field(default_factory=PkmConfig)
    masked_lm: MaskedLMConfig = field(default_factory=MaskedLMConfig)
    rop: RopConfig = field(default_factory=RopConfig)

    @property
    def head_size(self) -> int:
        return self.attention_size or self.hidden_size // self.n_heads

    @property
    def ffn_size(self) -> int:
        return self.intermediate_size or 4 * self.hidden_size

    def validate(self, where: str = "model") -> None:
        check_nonempty(self, where, "name")
        check_positive(self, where, "embedding_size", "hidden_size", "n_encoders", "n_heads", "attention_size",
                  "intermediate_size", "initializer_range", "layer_norm_eps")
        if self.attention_size is None and self.hidden_size % self.n_heads:
            raise ConfigError(
                f"{where}.n_heads ({self.n_heads}) must divide {where}.hidden_size ({self.hidden_size}) "
                f"unless {where}.attention_size is set"
            )
        if not self.factorize_embeddings and self.embedding_size != self.hidden_size:
            raise ConfigError(
                f"{where}.embedding_size ({self.embedding_size}) must equal {where}.hidden_size "
                f"({self.hidden_size}) when {where}.factorize_embeddings is false"
            )
        check_probability(self, where, "input_dropout", "output_dropout")
        self.pkm_params.validate(f"{where}.pkm_params")  # checked even when off: a preset may switch it on
        if self.pkm:
            bad = [i for i in self.pkm_params.in_layers if not 0 <= i < self.n_encoders]
            if bad:
                raise ConfigError(
                    f"{where}.pkm_params.in_layers {bad} out of range for n_encoders={self.n_encoders}"
                )
        self.masked_lm.validate(f"{where}.masked_lm")
        self.rop.validate(f"{where}.rop")
