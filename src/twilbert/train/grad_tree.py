"""Gradients of a global batch's K micro-batches summed in one fixed order, whatever number of workers
computes them.

The micro-batches 0..K-1 are the leaves of a fixed pairwise tree: node [lo, hi) is node [lo, mid) plus
node [mid, hi), ``mid = (lo + hi) // 2``. Worker r of W holds the contiguous block
``np.array_split(range(K), W)[r]`` (``distributed.worker_block``) and sums the maximal tree nodes
inside it (``node_sum``: a streaming recursion that holds one buffer per tree level, never K gradients).
The workers exchange those node sums (one all_gather of a padded flat fp32 tensor; how many nodes each
worker has is a pure function of K and W) and every worker assembles the root in tree order
(``assemble``). A floating-point addition of the same two operands gives the same bits, so the root
does not depend on W: one worker computes the same additions through ``node_sum(0, K)``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from twilbert.train import distributed
from twilbert.train.distributed import worker_block

Node = tuple[int, int]  # [lo, hi): the micro-batches lo..hi-1


def split(lo: int, hi: int) -> int:
    """The fixed split point of node [lo, hi) (hi - lo >= 2)."""
    return (lo + hi) // 2


def maximal_nodes(block: Node, n_micro: int) -> list[Node]:
    """The largest tree nodes inside ``block``, left to right: together they cover it exactly once."""
    first, last = block
    nodes: list[Node] = []

    def visit(lo: int, hi: int) -> None:
        if hi <= first or lo >= last:
            return
        if first <= lo and hi <= last:
            nodes.append((lo, hi))
            return
        mid = split(lo, hi)
        visit(lo, mid)
        visit(mid, hi)

    visit(0, n_micro)
    return nodes


def node_sum(lo: int, hi: int, leaf: Callable[[int], torch.Tensor]) -> torch.Tensor:
    """The sum of leaves lo..hi-1 in tree order; ``leaf(k)`` computes micro-batch k's flat gradient into a
    fresh tensor (called once per k, in increasing k). At most one partial sum per tree level is alive."""
    if hi - lo == 1:
        return leaf(lo)
    left = node_sum(lo, split(lo, hi), leaf)
    left += node_sum(split(lo, hi), hi, leaf)  # left is this call's own buffer
    return left


def assemble(lo: int, hi: int, sums: dict[Node, torch.Tensor]) -> torch.Tensor:
    """Node [lo, hi) from the node sums ``sums`` (a cover of it by tree nodes), in tree order."""
    if (lo, hi) in sums:
        return sums[(lo, hi)]
    mid = split(lo, hi)
    return assemble(lo, mid, sums) + assemble(mid, hi, sums)


def combine(n_micro: int, leaf: Callable[[int], torch.Tensor], size: int, device: torch.device) -> torch.Tensor:
    """The root of the tree over ``n_micro`` micro-batches, the same bits on every worker and for any
    number of workers. ``leaf(k)``: micro-batch k's flat gradient (``size`` fp32 values on ``device``),
    called for this worker's block only."""
    rank, n_workers = distributed.rank(), distributed.world_size()
    if n_workers == 1:
        return node_sum(0, n_micro, leaf)
    mine = [node_sum(lo, hi, leaf) for lo, hi in maximal_nodes(worker_block(n_micro, n_workers, rank), n_micro)]
    layout = [maximal_nodes(worker_block(n_micro, n_workers, r), n_micro) for r in range(n_workers)]
    width = max(len(nodes) for nodes in layout)
    sent = torch.zeros(width, size, dtype=torch.float32, device=device)  # (nodes, P), padded with zeros
    for i, node in enumerate(mine):
        sent[i] = node
    received = distributed.all_gather(sent)
    sums = {node: received[r][i] for r, nodes in enumerate(layout) for i, node in enumerate(nodes)}
    return assemble(0, n_micro, sums)


# --------------------------------------------------------------------------------------------
# Parameters <-> one flat gradient
# --------------------------------------------------------------------------------------------


def flat_size(params: Sequence[torch.nn.Parameter]) -> int:
    return sum(p.numel() for p in params)


def take_grads(params: Sequence[torch.nn.Parameter], device: torch.device) -> torch.Tensor:
    """The parameters' gradients as one fresh flat fp32 tensor (zeros where a parameter got none), and
    the gradients cleared for the next micro-batch."""
    flat = torch.zeros(flat_size(params), dtype=torch.float32, device=device)
    offset = 0
    for p in params:
        n = p.numel()
        if p.grad is not None:
            flat[offset:offset + n].copy_(p.grad.reshape(-1))
            p.grad = None
        offset += n
    return flat


def put_grads(params: Sequence[torch.nn.Parameter], flat: torch.Tensor) -> None:
    """Each parameter's gradient set to its slice of ``flat`` (a view: no copy)."""
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
        offset += n
