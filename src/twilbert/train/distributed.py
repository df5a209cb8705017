"""torchrun helpers: the process group torchrun describes, collectives, and each worker's micro-batches.
Nothing here spawns processes, and without torchrun's variables every helper is a no-op on one rank-0
process, so training calls them unconditionally.

Every worker computes the same epoch order. Global batch s is ``batch_size`` consecutive examples of
it (or the s-th length-grouped batch: ``data.grouping``), whatever the number of workers; it is cut
into ``n_micro`` micro-batches by ``np.array_split`` of its example indices, and worker r of W computes
the contiguous block ``np.array_split(range(n_micro), W)[r]`` of them (``worker_block``).
A micro-batch is thus the same tensors wherever it runs; ``train.grad_tree`` sums their gradients in a
fixed order.
"""

from __future__ import annotations

import logging
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Iterator, Optional, Union

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from twilbert.config import ConfigError
from twilbert.data.batch import Examples, as_examples, batch_indices, batch_of, epoch_order
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
    available (several workers share a GPU when there are more workers than GPUs), else the CPU. The
    backend is NCCL when each worker has a GPU of its own, else gloo (NCCL refuses two ranks on one
    GPU; collectives of CUDA tensors then pass through host memory). Without torchrun's
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
    own_gpu = False
    if target.type == "cuda":
        gpus = torch.cuda.device_count()
        if target.index is not None and target.index >= gpus:
            target = torch.device("cuda", target.index % gpus)
        own_gpu = int(env.get("LOCAL_WORLD_SIZE", n)) <= gpus
        torch.cuda.set_device(target)  # NCCL collectives and barriers use the current device
    if not is_initialized():
        backend = "nccl" if own_gpu else "gloo"
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


def _through_host(tensor: torch.Tensor) -> bool:
    """gloo's collectives take host tensors: a CUDA tensor goes through host memory (same bits)."""
    return tensor.is_cuda and dist.get_backend() == "gloo"


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks, in place; returns it."""
    if is_initialized():
        if _through_host(tensor):
            host = tensor.cpu()
            dist.all_reduce(host, op=dist.ReduceOp.SUM)
            tensor.copy_(host)
        else:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    """``[tensor of rank 0, tensor of rank 1, ...]``, on ``tensor``'s device (``[tensor]`` on one process)."""
    if not is_initialized():
        return [tensor]
    sent = tensor.cpu() if _through_host(tensor) else tensor
    received = [torch.empty_like(sent) for _ in range(dist.get_world_size())]
    dist.all_gather(received, sent)
    return [r.to(tensor.device) for r in received]


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


def broadcast_weights(model: nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (they are built identically; this makes it certain)."""
    if is_initialized():
        for tensor in [*model.parameters(), *model.buffers()]:
            if _through_host(tensor):
                host = tensor.data.cpu()
                dist.broadcast(host, src=0)
                tensor.data.copy_(host)
            else:
                dist.broadcast(tensor.data, src=0)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP and ``torch.compile`` wrappers (what checkpoints store)."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


# --------------------------------------------------------------------------------------------
# Each rank's share of the batch order
# --------------------------------------------------------------------------------------------


@dataclass
class GlobalBatch:
    """Global batch ``index`` of an epoch as one worker holds it: its micro-batches ``(k, batch)`` of the
    worker's block, in increasing k, out of ``n_micro``."""

    index: int
    n_micro: int
    micro: list[tuple[int, Any]]


def worker_block(n_micro: int, n_workers: int, rank: int) -> tuple[int, int]:
    """The micro-batch indices [lo, hi) worker ``rank`` computes: contiguous blocks, as even as possible."""
    if not 1 <= n_workers <= n_micro:
        raise ValueError(f"{n_workers} workers for {n_micro} micro-batches: every worker needs at least one")
    sizes = [len(part) for part in np.array_split(np.arange(n_micro), n_workers)]
    lo = sum(sizes[:rank])
    return lo, lo + sizes[rank]


def check_workers(n_micro: int, n_workers: int, key: str) -> None:
    """Every worker needs at least one micro-batch of each global batch."""
    if n_workers > n_micro:
        raise ConfigError(f"{key}={n_micro} is less than the {n_workers} workers launched; set {key} >= "
                          f"{n_workers} or launch at most {n_micro} workers")


def n_global_batches(n_examples: int, batch_size: int) -> int:
    """Global batches per epoch: the same for any number of workers."""
    return math.ceil(n_examples / batch_size)


def micro_batch_indices(
    n_examples: int, batch_size: int, n_micro: int, seed: int, epoch: int, rank: int, n_ranks: int,
    shuffle: bool = True, start: int = 0, lengths: Optional[Lengths] = None,
) -> Iterator[tuple[int, list[tuple[int, np.ndarray]]]]:
    """(s, [(k, example indices of micro-batch k) for k in this rank's block]) of global batches s from
    ``start`` on (resume). A global batch of fewer than ``n_micro`` examples leaves its last micro-batches
    empty (they add nothing)."""
    lo, hi = worker_block(n_micro, n_ranks, rank)
    order = epoch_order(n_examples, seed, epoch, shuffle)
    for s, chunk in enumerate(batch_indices(order, batch_size, seed, epoch, shuffle, start, lengths), start):
        parts = np.array_split(chunk, n_micro)
        yield s, [(k, np.sort(parts[k])) for k in range(lo, hi)]


def iterate_micro_batches(
    data: Union[Examples, dict], batch_size: int, n_micro: int, seed: int, epoch: int, ctx: DistContext,
    shuffle: bool = True, start: int = 0, length_grouping: bool = False,
) -> Iterator[GlobalBatch]:
    """This worker's share of each global batch of the shared order (``batch_of`` each micro-batch; an
    empty one is None). On memory-mapped shards a worker reads only the examples of its own micro-batches
    (and, with ``length_grouping``, the lengths of the window being cut, from the shards' index)."""
    examples = as_examples(data)
    lengths = examples.lengths if length_grouping else None
    for s, parts in micro_batch_indices(len(examples), batch_size, n_micro, seed, epoch, ctx.rank, ctx.world_size,
                                        shuffle, start, lengths):
        yield GlobalBatch(s, n_micro, [(k, batch_of(examples, idx) if len(idx) else None) for k, idx in parts])


@contextmanager
def distributed_context(device: str = "auto") -> Iterator[DistContext]:
    """``init_distributed`` for the duration of a stage, the process group torn down afterwards."""
    ctx = init_distributed(device)
    try:
        yield ctx
    finally:
        destroy_distributed()
