"""What the training loop is handed (``TrainingTask``; its loss, a ``LossFn`` or a ``MicroLoss`` whose
micro-batch losses are normalized by the whole global batch), the global batch's denominators summed over
workers in micro-batch order, and the logged per-micro-batch values gathered from every worker.

Each value gathered here is held by exactly one worker and the others contribute zeros, so the
all-reduce sum adds zeros only and is exact; the sums over micro-batches then run in index order on
every worker. The result is the same bits for any number of workers.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Protocol, Sequence

import numpy as np
import torch

from twilbert.train import distributed

# A loss function gets (model, batch) and returns the loss of the micro-batch and summable counts
# (e.g. {"mlm_correct": tensor(12), "mlm_count": 40}) that the loop aggregates over the epoch. A count
# may be a device tensor: the loop reads those once per logging window, never per step. A plain LossFn
# serves global batches of one micro-batch; a ``MicroLoss`` normalizes by the whole global batch.
LossFn = Callable[[torch.nn.Module, object], tuple[torch.Tensor, dict[str, object]]]


class TrainingTask(Protocol):
    """What one kind of training (pretraining, finetuning) hands to ``Trainer.fit``.

    Every rank calls every method at the same points, so all ranks take the same decisions.
    """

    def batches(self, epoch: int, skip: int) -> Iterable:
        """Epoch ``epoch``'s (from 0) global batches (this worker's ``GlobalBatch`` share, or plain batches
        of one micro-batch), without its first ``skip`` (where a checkpoint stopped)."""

    loss: "MicroLoss | LossFn"  # the micro-batch's loss and its summable counts

    def evaluate(self, epoch: int, sums: dict[str, float]) -> tuple[float, dict]:
        """(score, metrics) of epoch ``epoch`` (from 0) given its training sums; the score picks the best epoch."""

    def shown(self, metrics: dict) -> Mapping[str, float]:
        """What the epoch's log line shows of ``metrics`` (every metric still goes to the tracker)."""

    def on_epoch(self, epoch: int, metrics: dict, improved: bool) -> None:
        """After epoch ``epoch`` (from 1) was scored and the best epoch updated, before its checkpoint."""

    def state(self) -> dict:
        """The task's own JSON keys for the checkpoint (history, curves...); none may be the loop's."""

    def load_state(self, state: dict) -> None:
        """Resume: the keys ``state()`` saved, as the checkpoint holds them."""


class MicroLoss(Protocol):
    """A loss whose micro-batch values add up to the global batch's loss.

    ``prepare(batch, keys)``: host work before the forward (e.g. masks keyed by ``keys`` = (epoch, global
    batch, micro-batch)) and the micro-batch's ``normalizers`` denominators (host floats, e.g. masked
    tokens). ``micro_loss(model, prepared, totals)``: the micro-batch's summed loss divided by ``totals``,
    the denominators of the whole global batch (a device tensor, summed in micro-batch order), and its
    counts.
    """

    normalizers: int

    def prepare(self, batch: object, keys: tuple[int, ...]) -> tuple[object, Sequence[float]]: ...

    def micro_loss(self, model: torch.nn.Module, prepared: object,
                   totals: torch.Tensor) -> tuple[torch.Tensor, dict[str, object]]: ...
# The epoch's sums so far -> metrics logged with each logged step (e.g. the running MLM accuracy).
Running = Callable[[Mapping[str, float]], Mapping[str, float]]


def global_totals(n_micro: int, denominators: dict[int, Sequence[float]], width: int,
                  device: torch.device) -> torch.Tensor:
    """The denominators (width,) of the whole global batch, summed in micro-batch order on ``device``;
    ``denominators``: this worker's micro-batches k -> their own (host floats)."""
    table = torch.zeros(n_micro, width, dtype=torch.float64)  # (K, width); row k: micro-batch k's
    for k, values in denominators.items():
        table[k] = torch.tensor(values, dtype=torch.float64)
    table = table.to(device, non_blocking=True)
    if distributed.world_size() > 1:
        distributed.all_reduce_sum(table)
    total = table[0].clone()
    for k in range(1, n_micro):
        total += table[k]
    return total


def gather_micro_values(steps: Sequence[tuple[dict[int, torch.Tensor], dict[int, dict[str, object]]]], n_micro: int,
                        keys: Sequence[str], device: torch.device) -> tuple[list[str], list[list[list[float]]]]:
    """For each step, (losses, counts) of this worker's micro-batches k, the values of every worker: the
    count keys of all workers, and ``[step][k] = [loss, *counts in keys order]`` (zeros for an empty
    micro-batch), read from the device in one transfer."""
    if distributed.world_size() > 1:  # a worker whose micro-batches were all empty knows no key
        keys = sorted({key for ks in distributed.all_gather_object(list(keys)) for key in ks})
    width = 1 + len(keys)
    host = np.zeros((len(steps), n_micro, width))  # (steps, K, loss + counts)
    on_device, where = [], []
    for i, (losses, counts) in enumerate(steps):
        for k, loss in losses.items():
            on_device.append(loss.to(torch.float64).reshape(()))
            where.append((i * n_micro + k) * width)
            for j, key in enumerate(keys, 1):
                value = counts[k].get(key, 0.0)
                if isinstance(value, torch.Tensor):
                    on_device.append(value.to(torch.float64).reshape(()))
                    where.append((i * n_micro + k) * width + j)
                else:
                    host[i, k, j] = float(value)
    table = torch.from_numpy(host).to(device)
    if on_device:
        table.view(-1)[torch.tensor(where, device=device)] = torch.stack([v.to(device) for v in on_device])
    if distributed.world_size() > 1:
        distributed.all_reduce_sum(table)
    return list(keys), table.tolist()
