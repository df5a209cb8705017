"""The fixed pairwise tree that sums a global batch's micro-batch gradients: its order, the maximal
nodes each worker sums, the streaming recursion, and the root being the same bits for any number of
workers (in one process, and across real gloo processes)."""

from __future__ import annotations

import json
import weakref

import pytest
import torch
import torch.multiprocessing as mp

from helpers import free_port, join_gloo_group
from twilbert.train.distributed import destroy_distributed, worker_block
from twilbert.train.grad_tree import assemble, combine, maximal_nodes, node_sum, put_grads, take_grads

SIZE = 257


def leaves(n: int, seed: int = 0) -> list[torch.Tensor]:
    """Gradients whose magnitudes span many decades: their sum depends on the order of the additions."""
    g = torch.Generator().manual_seed(seed)
    scale = 10.0 ** torch.randint(-8, 8, (n, SIZE), generator=g).float()
    return list(torch.randn(n, SIZE, generator=g) * scale)


def fresh(grads: list[torch.Tensor], calls: list[int]):
    def leaf(k: int) -> torch.Tensor:
        calls.append(k)
        return grads[k].clone()

    return leaf


def test_the_tree_adds_halves_split_at_the_middle():
    g = leaves(5)
    expected = (g[0] + g[1]) + (g[2] + (g[3] + g[4]))  # [0,5) -> [0,2) + [2,5); [2,5) -> [2,3) + [3,5)
    assert torch.equal(node_sum(0, 5, fresh(g, [])), expected)
    sequential = g[0] + g[1] + g[2] + g[3] + g[4]
    assert not torch.equal(expected, sequential)  # the order shows in the bits: the test can tell


@pytest.mark.parametrize("n_micro", [1, 2, 3, 5, 8, 13])
def test_every_worker_count_assembles_the_root_of_one_worker_bit_for_bit(n_micro):
    g = leaves(n_micro, seed=n_micro)
    root = node_sum(0, n_micro, fresh(g, []))
    for workers in range(1, n_micro + 1):
        sums, covered = {}, []
        for rank in range(workers):
            block = worker_block(n_micro, workers, rank)
            calls: list[int] = []
            for lo, hi in maximal_nodes(block, n_micro):
                sums[(lo, hi)] = node_sum(lo, hi, fresh(g, calls))
            assert calls == list(range(*block))  # each of its micro-batches once, in order
            covered += calls
        assert covered == list(range(n_micro))
        assert torch.equal(assemble(0, n_micro, sums), root), workers


def test_worker_blocks_are_contiguous_and_as_even_as_possible():
    assert [worker_block(7, 3, r) for r in range(3)] == [(0, 3), (3, 5), (5, 7)]
    assert maximal_nodes((3, 5), 7) == [(3, 5)]  # [0,7) -> [0,3) + [3,7); [3,7) -> [3,5) + [5,7)
    assert [worker_block(8, 3, r) for r in range(3)] == [(0, 3), (3, 6), (6, 8)]
    assert maximal_nodes((3, 6), 8) == [(3, 4), (4, 6)]  # [0,8) -> [0,4) + [4,8) -> ... [2,4) -> [3,4)
    assert maximal_nodes((0, 7), 7) == [(0, 7)]
    with pytest.raises(ValueError, match="every worker needs at least one"):
        worker_block(2, 3, 0)


def test_the_streaming_sum_holds_one_buffer_per_tree_level_not_one_per_micro_batch():
    alive: set[int] = set()
    peak = [0]

    def leaf(k: int) -> torch.Tensor:
        t = torch.zeros(4)
        alive.add(id(t))
        weakref.finalize(t, alive.discard, id(t))
        peak[0] = max(peak[0], len(alive))
        return t

    node_sum(0, 64, leaf)
    assert peak[0] <= 7  # log2(64) + 1 partial sums at most; 64 would mean every leaf kept


def test_gradients_go_flat_and_back_with_zeros_where_a_parameter_got_none():
    a, b = torch.nn.Parameter(torch.ones(2, 3)), torch.nn.Parameter(torch.ones(4))
    a.grad = torch.arange(6.0).reshape(2, 3)
    flat = take_grads([a, b], torch.device("cpu"))
    assert flat.tolist() == [0, 1, 2, 3, 4, 5, 0, 0, 0, 0] and a.grad is None and b.grad is None
    put_grads([a, b], flat * 2)
    assert a.grad.shape == (2, 3) and a.grad[1, 2] == 10 and b.grad.tolist() == [0, 0, 0, 0]


def _worker(rank: int, workers: int, port: int, n_micro: int, out: str) -> None:
    join_gloo_group(rank, workers, port)
    try:
        g = leaves(n_micro, seed=3)
        calls: list[int] = []
        root = combine(n_micro, fresh(g, calls), SIZE, torch.device("cpu"))
        with open(f"{out}/root-{rank}.json", "w") as fh:
            json.dump({"root": root.tolist(), "calls": calls}, fh)
    finally:
        destroy_distributed()


def test_three_gloo_workers_combine_seven_micro_batches_to_the_single_process_root(tmp_path):
    n_micro, workers = 7, 3
    mp.spawn(_worker, args=(workers, free_port(), n_micro, str(tmp_path)), nprocs=workers, join=True)
    root = node_sum(0, n_micro, fresh(leaves(n_micro, seed=3), []))
    reports = [json.loads((tmp_path / f"root-{r}.json").read_text()) for r in range(workers)]
    assert [r["calls"] for r in reports] == [[0, 1, 2], [3, 4], [5, 6]]
    for report in reports:
        assert torch.equal(torch.tensor(report["root"]), root)
