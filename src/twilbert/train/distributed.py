"""torchrun / DDP helpers: the process group torchrun describes, gradient sync, each rank's share of the
data. Nothing here spawns processes, and without torchrun's variables every helper is a no-op on one
rank-0 process, so training calls them unconditionally. Every rank computes the same epoch order;
global batch s is ``order[s*b*W : (s+1)*b*W]`` (or the s-th length-grouped batch of W*b examples:
``data.grouping``) and rank r takes its r-th slice, so W ranks of batch b see, step for step, the
examples of one process with batch W*b."""

from __future__ import annotations

import logging
import math
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Iterator, Optional, Union

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from twilbert.data.batch import Examples, PairBatch, as_examples, batch_indices, batch_of, epoch_order
from twilbert.data.grouping import Lengths
from twilbert.device import pick_device

log = logging.getLogger(__name__)

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: its global rank, the number of processes, its GPU on the node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Rank 0: the only one that writes checkpoints, model directories and MLflow records."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistContext:
    """Join the process group described by torchrun's RANK, WORLD_SIZE, LOCAL_RANK (and MASTER_ADDR/PORT).

    ``device`` is the config's ``training.device``: ``auto`` picks ``cuda:<LOCAL_RANK>`` when CUDA is
    available, else the CPU. The backend is NCCL on CUDA and gloo on the CPU. Without torchrun's
    variables (or with WORLD_SIZE=1) no process group is created and a rank-0 context is returned.
    """
    env = os.environ
    n = int(env.get("WORLD_SIZE", "1") or 1)
    if n <= 1:
        return DistContext(device=pick_device(device, 0))
    missing = [v for v in TORCHRUN_VARS if v not in env]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE={n} but {', '.join(missing)} unset; launch with "
            "`torchrun --nproc_per_node N stages/<stage>.py ...`, which sets them"
        )
    global_rank, local_rank = int(env["RANK"]), int(env["LOCAL_RANK"])
    target = pick_device(device, local_rank)
    if target.type == "cuda":
        torch.cuda.set_device(target)  # NCCL collectives and barriers use the current device
    if not is_initialized():
        backend = "nccl" if target.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
        log.info("rank %d/%d joined the %s process group on %s", global_rank, n, backend, target)
    return DistContext(global_rank, n, local_rank, target)


def destroy_distributed() -> None:
    if is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# Collectives: no-ops on a single process
# --------------------------------------------------------------------------------------------


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks, in place; returns it."""
    if is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def loss_normalizer(local_count: Union[int, torch.Tensor], device: Optional[torch.device] = None) -> torch.Tensor:
    """The MLM loss normalizer of this rank: masked tokens summed over ranks, divided by the world size.

    DDP averages gradients over ranks, so a loss of ``sum_r / (N_total / W)`` on each rank yields the
    gradient of ``sum / N_total`` over the global batch: every masked token weighs the same whatever
    rank it landed on (a per-rank mean would overweight the tokens of sparsely masked shards).
    """
    count = torch.as_tensor(local_count, dtype=torch.float32, device=device).clone()
    return all_reduce_sum(count) / world_size()


def all_gather_object(obj: Any) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` on a single process)."""
    if not is_initialized():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (e.g. the checkpoint rank 0 chose to resume from)."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


def wrap_ddp(model: nn.Module, ctx: DistContext, **ddp_kwargs: Any) -> nn.Module:
    """``DistributedDataParallel(model)`` on several ranks; the model itself on one."""
    if not ctx.is_distributed:
        return model
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, **ddp_kwargs)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP and ``torch.compile`` wrappers (what checkpoints store)."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def no_sync_unless(model: nn.Module, sync: bool):
    """Skip DDP's gradient all-reduce on accumulation micro-steps; ``sync`` on the window's last one.

    Use around forward and backward: ``with no_sync_unless(model, pending + 1 == accum_iters): ...``.
    """
    if sync or not isinstance(model, DistributedDataParallel):
        return nullcontext()
    return model.no_sync()


# --------------------------------------------------------------------------------------------
# Each rank's share of the batch order
# --------------------------------------------------------------------------------------------


def n_rank_batches(n_examples: int, batch_size: int, n_ranks: int) -> int:
    """Batches per rank and epoch: the same on every rank (DDP needs equal step counts)."""
    return math.ceil(n_examples / (batch_size * n_ranks))


def rank_batch_indices(
    n_examples: int, batch_size: int, seed: int, epoch: int, rank: int, n_ranks: int,
    shuffle: bool = True, start: int = 0, lengths: Optional[Lengths] = None,
) -> Iterator[np.ndarray]:
    """Example indices of this rank's batches, from global batch ``start`` on (resume). Global batch s
    holds ``batch_size * n_ranks`` examples of the epoch order (consecutive, or with ``lengths``
    length-grouped: ``data.grouping``) in ``n_ranks`` contiguous, disjoint slices; a short last one is
    split as evenly as possible, padded from the start of the order (as torch's DistributedSampler
    does) when it has fewer examples than ranks, so every rank still steps."""
    if not 0 <= rank < n_ranks:
        raise ValueError(f"rank {rank} outside 0..{n_ranks - 1}")
    order = epoch_order(n_examples, seed, epoch, shuffle)
    for chunk in batch_indices(order, batch_size * n_ranks, seed, epoch, shuffle, start, lengths):
        if len(chunk) < n_ranks:
            chunk = np.concatenate([chunk, np.resize(order, n_ranks - len(chunk))])
        yield np.sort(np.array_split(chunk, n_ranks)[rank])


def iterate_rank_batches(
    data: Union[Examples, dict], batch_size: int, seed: int, epoch: int, ctx: DistContext,
    shuffle: bool = True, start: int = 0, length_grouping: bool = False,
) -> Iterator[PairBatch]:
    """The distributed counterpart of ``batch.iterate_batches``: this rank's batches of the shared order.

    On memory-mapped shards a rank reads only the examples of its own slices (and, with
    ``length_grouping``, the lengths of the window being cut, from the shards' index).
    """
    examples = as_examples(data)
    lengths = examples.lengths if length_grouping else None
    for idx in rank_batch_indices(len(examples), batch_size, seed, epoch, ctx.rank, ctx.world_size, shuffle, start,
                                  lengths):
        yield batch_of(examples, idx)


@contextmanager
def distributed_context(device: str = "auto") -> Iterator[DistContext]:
    """``init_distributed`` for the duration of a stage, the process group torn down afterwards."""
    ctx = init_distributed(device)
    try:
        yield ctx
    finally:
        destroy_distributed()
