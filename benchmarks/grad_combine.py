"""What world-size-invariant training costs on the CPU (gloo): the gradient exchange, and whole steps.

``--part combine``: W gloo processes exchange a flat fp32 gradient of P values. ``all_gather`` of
the node sums (``train.grad_tree.combine``: each worker sends its padded node sums, every worker
receives W of them and adds them in tree order) against a plain ``all_reduce`` of the same P values
(what DDP does, in an order that depends on W). Per worker, the all_gather receives (W - 1) * nodes * P
values where a ring all_reduce moves about 2 * (W - 1) / W * P: the gap grows with W and with the
nodes per worker (1 when K is a multiple of W and a power of two; up to ~2 log2(K/W) otherwise).

``--part steps``: tokens/s of the pretrain stage's own step (``Trainer.train_step`` on this worker's
``GlobalBatch`` share, one intra-op thread per worker) for each K of ``--micro``, with W workers;
rounds alternate between the K values and the figures are medians.

    python benchmarks/grad_combine.py --part combine --workers 2
    python benchmarks/grad_combine.py --part steps --workers 2 --micro 2 4 --rounds 5

Each part prints its figures and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
SIZES = (45_782, 1_000_000, 12_000_000)  # the tiny preset's parameters; 1M; ALBERT-base-sized


def _join(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _combine_worker(rank: int, world: int, port: int, repeats: int, micro: int, out: str) -> None:
    from twilbert.train.distributed import worker_block
    from twilbert.train.grad_tree import combine, maximal_nodes

    _join(rank, world, port)
    try:
        result = {}
        for size in SIZES:
            grads = [torch.randn(size) for _ in range(micro)]
            timings = {"all_gather_tree": [], "all_gather": [], "all_reduce": []}
            for _ in range(repeats):
                dist.barrier()
                start = time.perf_counter()
                combine(micro, lambda k, grads=grads: grads[k].clone(), size, torch.device("cpu"))
                timings["all_gather_tree"].append(time.perf_counter() - start)
                flat = grads[0].clone()
                received = [torch.empty_like(flat) for _ in range(world)]
                dist.barrier()
                start = time.perf_counter()
                dist.all_gather(received, flat)
                timings["all_gather"].append(time.perf_counter() - start)
                dist.barrier()
                start = time.perf_counter()
                dist.all_reduce(flat)
                timings["all_reduce"].append(time.perf_counter() - start)
            nodes = max(len(maximal_nodes(worker_block(micro, world, r), micro)) for r in range(world))
            result[size] = {k: statistics.median(v) * 1e3 for k, v in timings.items()} | {"nodes": nodes}
        if rank == 0:
            Path(out).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def part_combine(workers: int, micro: int, repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/combine.json"
        mp.spawn(_combine_worker, args=(workers, _free_port(), repeats, micro, out), nprocs=workers, join=True)
        result = json.loads(Path(out).read_text())
    print(f"gradient exchange, {workers} gloo workers, K={micro} (medians of {repeats}; the tree also adds and "
          "copies the node sums):")
    for size, row in result.items():
        print(f"  P={int(size):>10,}: combine (leaf copies, tree adds, all_gather) {row['all_gather_tree']:8.2f} ms; "
              f"all_gather alone {row['all_gather']:8.2f} ms; all_reduce {row['all_reduce']:8.2f} ms "
              f"({row['nodes']} node(s) per worker)")
    return result


def _steps_worker(rank: int, world: int, port: int, micro_values: list[int], batch: int, steps: int, rounds: int,
                  out: str) -> None:
    import numpy as np

    from twilbert.config import compose, load_config
    from twilbert.data.batch import make_batch, pack_pairs
    from twilbert.data.special import N_SPECIAL
    from twilbert.train.distributed import DistContext, GlobalBatch, worker_block
    from twilbert.train.pretrain import build_pretraining
    from twilbert.train.pretrain_run import resolve_pretrain_run

    _join(rank, world, port)
    try:
        vocab, width = 1000, 32
        rng = np.random.default_rng(0)
        rows = [rng.integers(N_SPECIAL, vocab, width).tolist() for _ in range(batch)]
        packed = pack_pairs(rows, rows[::-1], width)
        tokens = int(packed["length"].sum())
        ctx = DistContext(rank, world)
        setups = {}
        for micro in micro_values:
            cfg = load_config(compose(["model=tiny", f"representation.max_len={width}", "training.device=cpu",
                                       f"training.batch_size={batch}", f"training.micro_batches={micro}"],
                                      REPO / "conf"))
            _, trainer, objective = build_pretraining(resolve_pretrain_run(cfg), vocab, torch.device("cpu"), ctx=ctx)
            lo, hi = worker_block(micro, world, rank)
            parts = np.array_split(np.arange(batch), micro)
            share = [(k, make_batch(*(packed[key][parts[k]] for key in ("input_ids", "len_a", "length")),
                                    np.ones(len(parts[k]), dtype=np.int64))) for k in range(lo, hi)]
            setups[micro] = (trainer, objective, share)
        tok_s: dict[int, list[float]] = {m: [] for m in micro_values}
        for r in range(rounds):
            order = micro_values if r % 2 == 0 else micro_values[::-1]
            for micro in order:
                trainer, objective, share = setups[micro]
                dist.barrier()
                start = time.perf_counter()
                for s in range(steps):
                    trainer.train_step(GlobalBatch(s, micro, share), objective)
                trainer.flush()
                tok_s[micro].append(tokens * steps / (time.perf_counter() - start))
        if rank == 0:
            Path(out).write_text(json.dumps({m: statistics.median(v) for m, v in tok_s.items()}))
    finally:
        dist.destroy_process_group()


def part_steps(workers: int, micro_values: list[int], batch: int, steps: int, rounds: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/steps.json"
        mp.spawn(_steps_worker, args=(workers, _free_port(), micro_values, batch, steps, rounds, out),
                 nprocs=workers, join=True)
        result = json.loads(Path(out).read_text())
    load = os.getloadavg()
    print(f"tiny preset, batch {batch} x 67 tokens, {workers} worker(s) x 1 thread, {steps} steps x {rounds} "
          f"alternating rounds (load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}):")
    for micro, value in result.items():
        print(f"  K={micro}: {value:10.0f} tok/s (median)")
    return {"tok_s": result, "loadavg": load}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("combine", "steps"), default="combine")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--micro", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    if args.part == "combine":
        result = {"combine": part_combine(args.workers, max(args.micro), args.repeats)}
    else:
        result = {"steps": part_steps(args.workers, args.micro, args.batch, args.steps, args.rounds)}
    print(json.dumps({"workers": args.workers, **result}))


if __name__ == "__main__":
    main()
