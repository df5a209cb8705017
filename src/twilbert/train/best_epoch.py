"""The best epoch so far, by a score, with its metrics and weights (``BestEpoch``): model selection
and early stopping for ``Trainer.fit``, carried by the training checkpoints across a restart."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from twilbert.train import distributed
from twilbert.train.checkpoint import TENSORS_KEY


def cpu_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of the plain model's state dict (DDP and compile wrappers removed)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in distributed.unwrap(model).state_dict().items()}


@dataclass
class BestEpoch:
    """The best epoch so far by a score (``lower`` or higher is better), with its metrics and weights.

    Checkpoints carry it (``to_state`` / ``tensors``), so model selection and early stopping
    continue across a restart. The first scored epoch always counts, even with a NaN score.
    """

    lower_is_better: bool = True
    score: float = math.nan
    epoch: int = 0
    metrics: dict = field(default_factory=dict)
    weights: Optional[dict[str, torch.Tensor]] = None
    since: int = 0  # epochs since the best one (early-stopping patience)

    def update(self, score: float, epoch: int, metrics: dict, model: torch.nn.Module) -> bool:
        improved = self.weights is None or (score < self.score if self.lower_is_better else score > self.score)
        if improved:
            self.score, self.epoch, self.metrics, self.since = score, epoch, metrics, 0
            self.weights = cpu_copy(model)
        else:
            self.since += 1
        return improved

    def to_state(self) -> dict:
        return {"best": {"score": self.score, "epoch": self.epoch, "metrics": self.metrics, "since": self.since}}

    def tensors(self) -> dict:
        return {} if self.weights is None else {"best": self.weights}

    def restore(self, state: dict) -> None:
        best = state["best"]
        self.score, self.epoch, self.metrics, self.since = best["score"], best["epoch"], best["metrics"], best["since"]
        self.weights = state.get(TENSORS_KEY, {}).get("best")
