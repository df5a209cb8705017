"""``pretrain_throughput.py --numerics``: what ``runtime.portable_numerics`` costs, and what the stage's
own workers (``runtime.workers``, issue 33) win back. Ours in fp32 (the script's sizes and ``--batch``
as one global batch), each side in fresh processes (the pins are read when torch loads), the sides'
order alternating between rounds:

- ``workers``: the NEW portable default: ``min(cores, K)`` workers of one intra-op thread each under
  the AVX2 pins, started by ``pipeline.workers.run_workers``, the function the training stages launch
  themselves with (torch's elastic agent, as ``torchrun --standalone``). The global batch is cut into K
  micro-batches and each worker steps on its block of them (``distributed.worker_block``) as a
  ``GlobalBatch`` share, ``training.micro_batches=K``: the stage's own step, gradients combined in tree
  order (``train.grad_tree``). K is ``training.micro_batches`` of conf/, or ``--micro-batches``;
  ``--workers`` forces the count. Startup is not timed (see the stage's log line ``N workers ready ...
  s after their launch``);
- ``portable_1``: the OLD portable default: one process, one thread, the AVX2 pins, K=1 (a plain batch);
- ``portable_k_1``: one process, one thread, the AVX2 pins, K micro-batches: beside ``portable_1`` it
  prices the micro-batches alone, beside ``workers`` the parallelism alone;
- ``fastest``: the host's fastest: one process, torch's default threads (one per core), no pins
  (``runtime.portable_numerics: false``), K=1;
- ``best_isa_1``: the host's best ISA at one thread, no pins, K=1: beside ``portable_1`` it prices the
  ISA pins alone, at equal threads.

Ratios (medians of per-round ratios): ``workers/fastest``, ``portable_1/fastest``,
``workers/portable_1`` (what the workers win back), ``micro_batch_price`` = ``portable_k_1/portable_1``,
``workers_to_portable_k_1`` and ``isa_pin_price`` = ``portable_1/best_isa_1``. Each timed run is
``--steps`` global batches and the loop's ``flush`` (the losses read and gathered once).
Prints the host line (CPU model, its ISA flags, torch's best capability, cores, load average), the
rounds, the ratios and one JSON line.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

SIDES = ("workers", "portable_1", "portable_k_1", "fastest", "best_isa_1")
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")


def cpu_model() -> tuple[str, list[str]]:
    """The CPU's model name and which of ``ISA_FLAGS`` it has (from /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), []
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    return fields.get("model name", platform.machine()), [f for f in ISA_FLAGS if f in flags]


def micro_batches(args: argparse.Namespace) -> int:
    if args.micro_batches:
        return args.micro_batches
    from pretrain_throughput import REPO, compose_plain

    from twilbert.config import load_config

    return load_config(compose_plain([], REPO / "conf")).training.micro_batches


def child_env(side: str) -> dict[str, str]:
    from twilbert.numerics import PINNED_BY_LAUNCHER, PORTABLE_ENV

    base = {k: v for k, v in os.environ.items()
            if k not in {*PORTABLE_ENV, PINNED_BY_LAUNCHER, "OMP_NUM_THREADS", "MKL_NUM_THREADS"}}
    if side in ("workers", "portable_1", "portable_k_1"):
        return {**base, **PORTABLE_ENV, PINNED_BY_LAUNCHER: "1", "OMP_NUM_THREADS": "1"}
    if side == "best_isa_1":
        return {**base, "OMP_NUM_THREADS": "1"}
    return base


def run(args: argparse.Namespace) -> None:
    """The parent: alternating rounds of the four sides, each in fresh processes."""
    from twilbert.pipeline.workers import available_cores

    cores = available_cores()
    k = micro_batches(args)
    workers = args.workers or max(1, min(cores, k))
    model, flags = cpu_model()
    load_start = os.getloadavg()[0]
    print(f"host: {platform.node()}: {model}; ISA flags {' '.join(flags) or 'none of ' + ' '.join(ISA_FLAGS)}; "
          f"{cores} core(s) for this job; load average {load_start:.2f}", flush=True)
    print(f"workers side: {workers} worker(s) = {'--workers' if args.workers else f'min({cores} cores, K={k})'}; "
          f"batch {args.batch} global; {args.rounds} rounds x {args.steps} steps", flush=True)
    base_cmd = [sys.executable, str(Path(__file__).with_name("pretrain_throughput.py")), "--numerics-child",
                "--steps", str(args.steps), "--batch", str(args.batch), "--act", args.act, "--warmup", str(args.warmup),
                *(["--quick"] if args.quick else [])]
    rates: dict[str, list[float]] = {s: [] for s in SIDES}
    seen: dict[str, dict] = {}
    for r in range(args.rounds):
        order = SIDES if r % 2 == 0 else SIDES[::-1]
        for side in order:
            cmd = [*base_cmd, "--numerics-workers", str(workers if side == "workers" else 1),
                   "--numerics-micro", str(k if side in ("workers", "portable_k_1") else 1)]
            proc = subprocess.run(cmd, env=child_env(side), capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{side}: the child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
            seen[side] = json.loads(proc.stdout.strip().splitlines()[-1])
            rates[side].append(seen[side]["tok_s"])
        print(f"round {r + 1}: " + ", ".join(f"{s} {rates[s][-1]:.1f}" for s in SIDES) + " tok/s", flush=True)

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(rates[a], rates[b]))

    medians = {s: statistics.median(rates[s]) for s in SIDES}
    ratios = {"workers_to_fastest": ratio("workers", "fastest"), "portable_1_to_fastest": ratio("portable_1", "fastest"),
              "workers_to_portable_1": ratio("workers", "portable_1"),
              "micro_batch_price": ratio("portable_k_1", "portable_1"),
              "workers_to_portable_k_1": ratio("workers", "portable_k_1"),
              "isa_pin_price": ratio("portable_1", "best_isa_1")}
    for side in SIDES:
        print(f"{side}: {medians[side]:.1f} tok/s ({seen[side]['world_size']} process(es) x {seen[side]['threads']} "
              f"thread(s), K={seen[side]['micro_batches']}, ATen {seen[side]['capability']})")
    print(f"portable/fastest: new (workers) {ratios['workers_to_fastest']:.3f}, old (1 process) "
          f"{ratios['portable_1_to_fastest']:.3f}; workers/old portable {ratios['workers_to_portable_1']:.3f}; "
          f"K micro-batches/1 at 1 thread {ratios['micro_batch_price']:.3f}; "
          f"workers/1 process of K micro-batches {ratios['workers_to_portable_k_1']:.3f}; "
          f"ISA pin price at 1 thread (AVX2 / {seen['best_isa_1']['capability']}) {ratios['isa_pin_price']:.3f}; "
          f"load average at the end {os.getloadavg()[0]:.2f}")
    print(json.dumps({
        **{f"{s}_tok_s": round(medians[s], 1) for s in SIDES},
        **{k: round(v, 3) for k, v in ratios.items()},
        "workers": workers, "micro_batches": k, "cores": cores,
        "threads": {s: seen[s]["threads"] for s in SIDES},
        "capability": {s: seen[s]["capability"] for s in SIDES},
        "side_micro_batches": {s: seen[s]["micro_batches"] for s in SIDES},
        "rounds": rates, "cpu": model, "isa_flags": flags, "host": platform.node(), "batch": args.batch,
        "load_average_start": round(load_start, 2), "load_average_end": round(os.getloadavg()[0], 2),
    }))


def global_batch_parts(vocab: int, batch: int, max_len: int, n_micro: int, rank: int, n_workers: int) -> list:
    """This worker's block of the global batch's K micro-batches, ``(k, PairBatch)``: the rows of
    ``pretrain_throughput.random_batch`` (same ids, same ROP labels), cut as the stage cuts a global batch."""
    import numpy as np

    from twilbert.data.batch import make_batch, pack_pairs
    from twilbert.data.special import N_SPECIAL
    from twilbert.train.distributed import worker_block

    rng = np.random.default_rng(0)
    a = rng.integers(N_SPECIAL, vocab, (batch, max_len)).tolist()
    b = rng.integers(N_SPECIAL, vocab, (batch, max_len)).tolist()
    packed = pack_pairs(a, b, max_len)
    labels = rng.integers(0, 2, batch)
    parts = np.array_split(np.arange(batch), n_micro)
    lo, hi = worker_block(n_micro, n_workers, rank)
    return [(k, make_batch(*(packed[key][parts[k]] for key in ("input_ids", "len_a", "length")), labels[parts[k]]))
            for k in range(lo, hi)]


def child(args: argparse.Namespace) -> None:
    """One side in this process's environment: ``--numerics-workers`` ranks (launched here, as the
    stage launches its own), or this process alone, each stepping on its share of a global batch of
    ``--numerics-micro`` micro-batches (K=1: the plain batch); rank 0 prints tok/s of the global batch."""
    from twilbert.pipeline.workers import run_workers, under_torchrun

    if args.numerics_workers > 1 and not under_torchrun():
        threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
        raise SystemExit(run_workers(args.numerics_workers, threads))
    import torch
    from pretrain_throughput import FULL, QUICK, REPO, compose_plain, pretraining_overrides, random_batch, seconds

    from twilbert.config import load_config
    from twilbert.pipeline.runtime import apply_threads
    from twilbert.train.distributed import GlobalBatch, barrier, destroy_distributed, init_distributed
    from twilbert.train.pretrain import build_pretraining
    from twilbert.train.pretrain_run import resolve_pretrain_run

    pinned = "ATEN_CPU_CAPABILITY" in os.environ
    apply_threads(None, portable=pinned)  # what a stage sets: 1 thread when portable
    sizes = QUICK if args.quick else FULL
    vocab, seq, k = sizes["vocab"], 2 * sizes["max_len"] + 3, args.numerics_micro
    ctx = init_distributed("cpu")
    try:
        overrides = pretraining_overrides(sizes, args.batch, "fp32", pkm=False, act=args.act)
        cfg = load_config(compose_plain([*overrides, f"training.micro_batches={k}"], REPO / "conf"))
        _, trainer, objective = build_pretraining(resolve_pretrain_run(cfg), vocab, torch.device("cpu"), ctx=ctx)
        if k == 1 and not ctx.is_distributed:  # the old step: one plain batch
            whole = random_batch(vocab, args.batch, sizes["max_len"])
            batches = iter(lambda: whole, None)
        else:
            share = global_batch_parts(vocab, args.batch, sizes["max_len"], k, ctx.rank, ctx.world_size)
            batches = (GlobalBatch(s, k, share) for s in itertools.count())

        def step() -> None:
            trainer.train_step(next(batches), objective)

        def run_steps(n: int) -> None:
            for _ in range(n):
                step()
            trainer.flush()  # the window's losses read (and gathered over workers) as the loop reads them

        run_steps(args.warmup)
        barrier()
        elapsed = seconds(lambda: run_steps(args.steps), 1)
        barrier()
        if ctx.is_main:
            print(json.dumps({"tok_s": args.batch * seq * args.steps / elapsed, "threads": torch.get_num_threads(),
                              "world_size": ctx.world_size, "micro_batches": k,
                              "capability": torch.backends.cpu.get_cpu_capability()}), flush=True)
    finally:
        destroy_distributed()
