"""``pretrain_throughput.py --numerics``: what ``runtime.portable_numerics`` costs, and what the stage's
own workers (``runtime.workers``, issue 33) win back. Ours in fp32 (the script's sizes and ``--batch``
as one global batch), each side in fresh processes (the pins are read when torch loads), the sides'
order alternating between rounds:

- ``workers``: the NEW portable default: ``min(cores, K)`` DDP workers of one intra-op thread each
  under the AVX2 pins, started by ``pipeline.workers.run_workers``, the function the training stages
  launch themselves with (torch's elastic agent, as ``torchrun --standalone``); each rank steps on its
  slice of the global batch, as ``distributed.iterate_rank_batches`` cuts it, DDP averaging the
  gradients. K is ``training.micro_batches`` of conf/ (1 where the key does not exist), or
  ``--micro-batches``; ``--workers`` forces the count. Startup is not timed (see the stage's log line
  ``N workers ready ... s after their launch``);
- ``portable_1``: the OLD portable default: one process, one thread, the AVX2 pins;
- ``fastest``: the host's fastest: one process, torch's default threads (one per core), no pins
  (``runtime.portable_numerics: false``);
- ``best_isa_1``: the host's best ISA at one thread, no pins: beside ``portable_1`` it prices the ISA
  pins alone, at equal threads.

Ratios (medians of per-round ratios): ``workers/fastest``, ``portable_1/fastest``,
``workers/portable_1`` (what the workers win back) and ``isa_pin_price`` = ``portable_1/best_isa_1``.
Prints the host line (CPU model, its ISA flags, torch's best capability, cores, load average), the
rounds, the ratios and one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

SIDES = ("workers", "portable_1", "fastest", "best_isa_1")
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

    training = load_config(compose_plain([], REPO / "conf")).training
    return getattr(training, "micro_batches", None) or 1


def child_env(side: str) -> dict[str, str]:
    from twilbert.numerics import PINNED_BY_LAUNCHER, PORTABLE_ENV

    base = {k: v for k, v in os.environ.items()
            if k not in {*PORTABLE_ENV, PINNED_BY_LAUNCHER, "OMP_NUM_THREADS", "MKL_NUM_THREADS"}}
    if side in ("workers", "portable_1"):
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
            cmd = [*base_cmd, "--numerics-workers", str(workers if side == "workers" else 1)]
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
              "workers_to_portable_1": ratio("workers", "portable_1"), "isa_pin_price": ratio("portable_1", "best_isa_1")}
    for side in SIDES:
        print(f"{side}: {medians[side]:.1f} tok/s ({seen[side]['world_size']} process(es) x {seen[side]['threads']} "
              f"thread(s), ATen {seen[side]['capability']})")
    print(f"portable/fastest: new (workers) {ratios['workers_to_fastest']:.3f}, old (1 process) "
          f"{ratios['portable_1_to_fastest']:.3f}; workers/old portable {ratios['workers_to_portable_1']:.3f}; "
          f"ISA pin price at 1 thread (AVX2 / {seen['best_isa_1']['capability']}) {ratios['isa_pin_price']:.3f}; "
          f"load average at the end {os.getloadavg()[0]:.2f}")
    print(json.dumps({
        **{f"{s}_tok_s": round(medians[s], 1) for s in SIDES},
        **{k: round(v, 3) for k, v in ratios.items()},
        "workers": workers, "micro_batches": k, "cores": cores,
        "threads": {s: seen[s]["threads"] for s in SIDES},
        "capability": {s: seen[s]["capability"] for s in SIDES},
        "rounds": rates, "cpu": model, "isa_flags": flags, "host": platform.node(), "batch": args.batch,
        "load_average_start": round(load_start, 2), "load_average_end": round(os.getloadavg()[0], 2),
    }))


def child(args: argparse.Namespace) -> None:
    """One side in this process's environment: ``--numerics-workers`` ranks (launched here, as the
    stage launches its own), or this process alone; rank 0 prints tok/s of the global batch."""
    from twilbert.pipeline.workers import run_workers, under_torchrun

    if args.numerics_workers > 1 and not under_torchrun():
        threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
        raise SystemExit(run_workers(args.numerics_workers, threads))
    import numpy as np
    import torch
    from pretrain_throughput import FULL, QUICK, pretraining_config, random_batch, seconds

    from twilbert.pipeline.runtime import apply_threads
    from twilbert.train.distributed import barrier, destroy_distributed, init_distributed
    from twilbert.train.pretrain import build_pretraining
    from twilbert.train.pretrain_run import resolve_pretrain_run

    pinned = "ATEN_CPU_CAPABILITY" in os.environ
    apply_threads(None, portable=pinned)  # what a stage sets: 1 thread when portable
    sizes = QUICK if args.quick else FULL
    vocab, seq = sizes["vocab"], 2 * sizes["max_len"] + 3
    ctx = init_distributed("cpu")
    try:
        whole = random_batch(vocab, args.batch, sizes["max_len"])
        rows = np.array_split(np.arange(args.batch), ctx.world_size)[ctx.rank]  # this rank's slice
        picked = {f.name: getattr(whole, f.name)[torch.as_tensor(rows)] for f in dataclasses.fields(whole)
                  if isinstance(getattr(whole, f.name), torch.Tensor)}
        batch = dataclasses.replace(whole, **picked)
        cfg = pretraining_config(sizes, len(rows), "fp32", pkm=False, act=args.act)
        _, trainer, objective = build_pretraining(resolve_pretrain_run(cfg), vocab, torch.device("cpu"), ctx=ctx)

        def step() -> None:
            trainer.train_step(batch, objective)

        for _ in range(args.warmup):
            step()
        barrier()
        elapsed = seconds(step, args.steps) * args.steps
        barrier()
        if ctx.is_main:
            print(json.dumps({"tok_s": args.batch * seq * args.steps / elapsed, "threads": torch.get_num_threads(),
                              "world_size": ctx.world_size, "capability": torch.backends.cpu.get_cpu_capability()}),
                  flush=True)
    finally:
        destroy_distributed()
