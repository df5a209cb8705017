"""Product-key memory (Lample et al. 2019), in the manner of XLM's ``HashingMemory``.

A memory of ``memory_size**2`` value slots addressed by a product of two small key sets: each
query half is scored against ``memory_size`` sub-keys, and only the ``knn x knn`` combinations of
the best sub-keys are re-scored. Reading is an ``nn.EmbeddingBag`` over the ``knn`` chosen slots
per head, so the cost never depends on the number of slots.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from twilbert.config import PkmConfig


def value_dim(params: PkmConfig, output_dim: int) -> int:
    """Width of the value table: ``output_dim``, or ``value_size`` (default ``k_dim // 4``) when factorized."""
    if not params.factorize_embeddings:
        return output_dim
    return params.value_size or max(1, params.k_dim // 4)


class ProductKeyMemory(nn.Module):
    """Sparse key-value memory read by product keys; maps (..., input_dim) to (..., output_dim)."""

    def __init__(self, input_dim: int, output_dim: int, params: PkmConfig):
        super().__init__()
        self.input_dim = input_dim
        self.output_dim = output_dim
        self.k_dim = params.k_dim
        self.memory_size = params.memory_size  # sub-keys per half; slots = memory_size**2
        self.heads = params.n_heads
        self.knn = params.knn
        self.v_dim = value_dim(params, output_dim)

        self.query_proj = nn.Linear(input_dim, self.heads * self.k_dim)
        # Batch norm keeps the query scale comparable to the uniform keys, which XLM found is what
        # stops a few slots from winning every lookup (better key usage).
        self.query_batchnorm = nn.BatchNorm1d(self.heads * self.k_dim) if params.batch_norm else None
        self.keys = nn.Parameter(torch.empty(self.heads, 2, self.memory_size, self.k_dim // 2))
        self.values = nn.EmbeddingBag(self.memory_size**2, self.v_dim, mode="sum")
        self.value_proj = nn.Linear(self.v_dim, output_dim) if params.factorize_embeddings else None
        self.input_dropout = nn.Dropout(params.input_dropout)
        self.output_dropout = nn.Dropout(params.output_dropout)
        self.reset_memory()

    def reset_memory(self) -> None:
        """XLM's init for keys and values; the model-wide truncated normal would make them far too small."""
        bound = 1.0 / math.sqrt(self.k_dim // 2)
        nn.init.uniform_(self.keys, -bound, bound)
        # Output is a convex combination per head, so v_dim**-0.5 gives unit-scale outputs.
        nn.init.normal_(self.values.weight, mean=0.0, std=self.v_dim**-0.5)

    def get_indices(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``knn`` slots per head: query (N, heads, k_dim) -> scores, indices (N, heads, knn)."""
        half = self.k_dim // 2
        q1, q2 = query[..., :half], query[..., half:]  # (N, heads, half) each
        # score each half against its own sub-keys
        scores1 = torch.einsum("nhd,hkd->nhk", q1, self.keys[:, 0])  # (N, heads, memory_size)
        scores2 = torch.einsum("nhd,hkd->nhk", q2, self.keys[:, 1])  # (N, heads, memory_size)
        scores1, indices1 = scores1.topk(self.knn, dim=-1)  # (N, heads, knn)
        scores2, indices2 = scores2.topk(self.knn, dim=-1)  # (N, heads, knn)
        # the best full keys lie among the knn x knn combinations of the best sub-keys
        all_scores = scores1.unsqueeze(-1) + scores2.unsqueeze(-2)  # (N, heads, knn, knn)
        all_indices = indices1.unsqueeze(-1) * self.memory_size + indices2.unsqueeze(-2)  # (N, heads, knn, knn)
        all_scores = all_scores.flatten(-2)  # (N, heads, knn*knn)
        all_indices = all_indices.flatten(-2)  # (N, heads, knn*knn)
        # re-score the candidates and keep the best knn
        scores, best = all_scores.topk(self.knn, dim=-1)  # (N, heads, knn)
        indices = all_indices.gather(-1, best)  # (N, heads, knn), in [0, memory_size**2)
        return scores, indices

    def forward(self, x: torch.Tensor, token_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Read the memory for every token of x (..., input_dim); tokens off ``token_mask`` read zeros."""
        prefix = x.shape[:-1]
        flat = x.reshape(-1, self.input_dim)  # (M, input_dim)
        if token_mask is not None:
            # Padding never reaches the memory: it would skew the batch-norm statistics and waste lookups.
            keep = token_mask.reshape(-1)  # (M,)
            flat = flat[keep]  # (N, input_dim)

        # query
        flat = self.input_dropout(flat)
        query = self.query_proj(flat)  # (N, heads*k_dim)
        # BatchNorm1d cannot take batch statistics of fewer than two rows (e.g. one real token).
        if self.query_batchnorm is not None and (query.shape[0] > 1 or not self.training):
            query = self.query_batchnorm(query)
        query = query.view(-1, self.heads, self.k_dim)  # (N, heads, k_dim)

        # indices
        scores, indices = self.get_indices(query)  # (N, heads, knn) each

        # re-scoring: softmax over the kept slots of each head, in fp32 for stability under bf16
        weights = F.softmax(scores.float(), dim=-1).type_as(scores)  # (N, heads, knn)

        # weighted sum: one bag of heads*knn slots per token, so the heads are summed too
        indices = indices.reshape(-1, self.heads * self.knn)  # (N, heads*knn)
        weights = weights.reshape(-1, self.heads * self.knn)  # (N, heads*knn)
        out = self.values(indices, per_sample_weights=weights.to(self.values.weight.dtype))  # (N, v_dim)
        if self.value_proj is not None:
            out = self.value_proj(out)  # (N, output_dim)
        out = self.output_dropout(out)

        if token_mask is not None:
            full = out.new_zeros(keep.shape[0], self.output_dim)  # (M, output_dim)
            full[keep] = out
            out = full
        return out.view(*prefix, self.output_dim)  # (..., output_dim)
