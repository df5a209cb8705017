"""One training loop for pretraining and finetuning: accumulation, bf16 autocast, clipping, logging.

What differs between the two is the batch source and the loss function handed in.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch
from tqdm import tqdm

from twilbert.track import Tracker

log = logging.getLogger(__name__)

# A loss function gets (model, batch) and returns the loss of the micro-batch and summable counts
# (e.g. {"mlm_correct": 12, "mlm_count": 40}) that the loop aggregates over the epoch.
LossFn = Callable[[torch.nn.Module, object], tuple[torch.Tensor, dict[str, float]]]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped before the weights were corrupted."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast(precision: str, device: torch.device):
    """bf16 autocast on CPU or GPU when asked for; fp32 otherwise."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def progress(iterable: Iterable, total: Optional[int], desc: str):
    quiet = bool(os.environ.get("CI")) or not sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, disable=quiet, leave=False, dynamic_ncols=True)


@dataclass
class LoopState:
    """Counters that survive across epochs (and, with checkpoints, across restarts)."""

    epoch: int = 0
    optimizer_steps: int = 0
    micro_steps: int = 0
    history: list = field(default_factory=list)


class Trainer:
    """Runs epochs of micro-batches with gradient accumulation over ``accum_iters`` of them."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Optional[torch.optim.lr_scheduler.LRScheduler],
        *,
        accum_iters: int = 1,
        max_grad_norm: Optional[float] = None,
        precision: str = "fp32",
        device: torch.device = torch.device("cpu"),
        tracker: Optional[Tracker] = None,
        log_every: int = 10,
        prefix: str = "train",
    ):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.accum_iters, self.max_grad_norm = accum_iters, max_grad_norm
        self.precision, self.device = precision, device
        self.tracker, self.log_every, self.prefix = tracker, log_every, prefix
        self.state = LoopState()
        self._pending = 0  # micro-batches whose gradients await the next optimizer step
        self._trainable = [p for p in model.parameters() if p.requires_grad]

    def train_step(self, batch: object, loss_fn: LossFn) -> tuple[float, dict[str, float]]:
        """One micro-batch: forward under autocast, backward, and the optimizer step once
        ``accum_iters`` micro-batches have accumulated. Returns the micro-batch loss and its counts."""
        self.model.train()
        with autocast(self.precision, self.device):
            loss, counts = loss_fn(self.model, batch)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"{self.prefix}: loss is {loss.item()} at epoch {self.state.epoch + 1}, "
                f"optimizer step {self.state.optimizer_steps}; stopping before the weights are "
                "corrupted (the last saved checkpoint is intact). Lower the learning rate or "
                "use fp32."
            )
        (loss / self.accum_iters).backward()
        self._pending += 1
        self.state.micro_steps += 1
        value = float(loss.detach())
        if self._pending == self.accum_iters:
            self._optimizer_step(value)
        return value, counts

    def train_epoch(self, batches: Iterable, loss_fn: LossFn, total: Optional[int] = None) -> dict[str, float]:
        """One pass over ``batches``; returns the epoch's mean loss and summed counts.

        A last, incomplete accumulation window still gets its optimizer step.
        """
        sums: dict[str, float] = {}
        loss_sum, n_micro = 0.0, 0
        for batch in progress(batches, total, f"{self.prefix} epoch {self.state.epoch + 1}"):
            loss, counts = self.train_step(batch, loss_fn)
            loss_sum += loss
            n_micro += 1
            for key, value in counts.items():
                sums[key] = sums.get(key, 0.0) + float(value)
        if self._pending:
            self._optimizer_step(loss_sum / max(n_micro, 1))
        self.state.epoch += 1
        return {"loss": loss_sum / max(n_micro, 1), **sums}

    def _optimizer_step(self, last_loss: float) -> None:
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self._trainable, self.max_grad_norm)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._pending = 0
        self.state.optimizer_steps += 1
        if self.tracker and self.state.optimizer_steps % self.log_every == 0:
            lr = self.optimizer.param_groups[0]["lr"]
            self.tracker.log_metrics(
                {f"{self.prefix}_loss": last_loss, f"{self.prefix}_lr": lr}, step=self.state.optimizer_steps
            )
