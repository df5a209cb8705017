"""Pretraining training-step throughput (tokens/s): the pretrain stage's step vs Hugging Face
``AlbertForPreTraining``, in fp32 and under bf16 autocast, plus ours with product-key memory.

One step = forward, backward, gradient clipping (max norm 1, both sides) and optimizer step on one
batch of ``--batch`` rows of ``[CLS] a [SEP] b [SEP]`` (2*64+3 = 131 tokens, no padding).

- ours: the stage's own code, not a copy. ``build_pretraining`` (what ``pretrain()`` calls) builds
  ``TWilBertForPretraining``, ``build_optimizer('adam', param_groups(...))`` (AdamW), the schedule,
  the ``Trainer`` and the ``PretrainObjective``; a step is ``trainer.train_step(batch, objective)``,
  which draws the dynamic mask (``mask_tokens``, span masking, budget 0.15), runs the model (MLM
  projection only at the masked positions), ``mlm_loss`` + ``rop_loss``, backward and the
  optimizer step. The config is ``conf/`` composed with ``model=base`` and the sizes below.
- HF: ``AlbertForPreTraining`` at the same sizes, fed the same masked inputs and labels (drawn once
  by the same ``mask_tokens``); it scores the full vocabulary at every position, as HF does. Its
  optimizer is what HF's ``Trainer`` uses by default with torch >= 2.8: ``torch.optim.AdamW(fused=True)``.
- Sizes: V=30000, E=128, H=768, A=12, L=6 all-shared, intermediate 3072, both sides with
  ``gelu_new`` (ALBERT's default activation; ``--act gelu`` for the exact GELU of our presets) and
  dropout 0 (ALBERT v2's default). PKM: the base preset's memory (k_dim 512, 256^2 slots, 4 heads,
  knn 32) in layer 4.

Each ratio is the median over ``--rounds`` rounds of (ours tok/s / HF tok/s), each round timing
``--steps`` steps of each side, the order alternating between rounds; tok/s figures are medians.

FLOPs are counted explicitly (matmuls only; a training step is 3x the forward): per token and
layer 8*H*A*d_k (Q, K, V, output) + 4*T*A*d_k (scores, weighted sum) + 4*H*I (FFN), plus 2*E*H for
the embedding projection, plus 2*H*E + 2*E*V per masked token for the MLM head and the ROP head per
row. ``mfu_bf16`` = ours' achieved FLOP/s under bf16 / the FLOP/s of a 4096^3 bf16 matmul (median
of 10), measured after each bf16 round because a shared host's speed drifts; the median over rounds.
``mfu_fp32`` is the same in fp32.

bf16 is timed only on a CPU with bf16 matrix instructions (AVX512-BF16 or AMX, what oneDNN
reports): elsewhere PyTorch emulates bf16 matmuls ~100x slower than fp32 (measured on the AVX2-only
EPYC this project's CI has run on) and a step would take an hour. Then the bf16 figures are null
and the script says why; ``--bf16 on`` times them anyway.

    python benchmarks/pretrain_throughput.py                 # the full comparison (minutes)
    python benchmarks/pretrain_throughput.py --steps 3 --rounds 5 --batch 32
    python benchmarks/pretrain_throughput.py --quick         # small sizes, a smoke run of seconds
    python benchmarks/pretrain_throughput.py --numerics      # the cost of runtime.portable_numerics
    python benchmarks/pretrain_throughput.py --init hf       # continued pretraining of a BERT-base checkpoint

``--real-lengths [PAIRS_DIR]`` times the job rather than the kernel: rows of tweet lengths, each batch
padded to its longest row. The lengths are those of a pairs folder (its train split; real token
ids), or by default a generated tweet-like distribution like the default corpus's pairs (two
log-normal segments of ~11 pieces cut at 32, plus 3 specials: ~25 tokens a row). Four sides,
alternating, at each of ``--batches`` (32 and 128): ours on length-grouped batches (the pretrain
stage's own iterator, ``training.length_grouping: true``), ours on random batches (``false``), HF
``AlbertForPreTraining`` on the same random batches padded to their longest row (what
``DataCollatorForLanguageModeling`` does), and HF on the grouped batches. ``real_tok_per_s`` counts
non-pad tokens only; ``padding_share`` is the pad share of the epoch's batches. Each side steps
through its own epoch of batches, ``--steps`` per round at the first batch size (proportionally fewer
at larger ones). Ends with a JSON line holding
real_tok_per_s_ours, real_tok_per_s_ours_random, real_tok_per_s_hf, real_tok_per_s_hf_grouped,
padding_share_ours, padding_share_random and the ratios (of the first batch size, and per size under
``by_batch``).

``--numerics`` times ours in fp32 in fresh processes, alternating (``benchmarks/numerics_throughput.py``):
the portable default run as ``min(cores, K)`` one-thread workers launched as the training stages
launch them (``runtime.workers``), each stepping on its block of the global batch's K micro-batches,
the old portable default (one process, one thread, K=1), one process of one thread over K
micro-batches, the host's fastest (one process, all cores' threads, no pins;
``runtime.portable_numerics: false``) and the host's best ISA at one thread (the price of the AVX2
pins alone). It prints the host line, the ratios and one JSON line.

Prints the figures, then one JSON line with hf_fp32_tok_s, ours_fp32_tok_s, hf_bf16_tok_s,
ours_bf16_tok_s, ours_pkm_fp32_tok_s, ours_pkm_bf16_tok_s, ratio_fp32, ratio_bf16, mfu_fp32,
mfu_bf16 (null where bf16 was not timed) and native_bf16.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from twilbert.config import Config, load_config

try:
    from twilbert.config.plain_compose import compose_plain
except ImportError:  # an A/B against code older than the plain composer (Hydra composes the same dict)
    from twilbert.config import compose as compose_plain
from twilbert.data.batch import PackedRows, PairBatch, make_batch, pack_pairs
from twilbert.data.special import N_SPECIAL
from twilbert.device import configure_matmul, native_bf16
from twilbert.train.pretrain import PretrainObjective, build_pretraining
from twilbert.train.pretrain_run import resolve_pretrain_run

REPO = Path(__file__).resolve().parents[1]
FULL = dict(vocab=30000, embedding_size=128, hidden_size=768, n_heads=12, n_encoders=6, intermediate_size=3072,
            max_len=64, pkm=dict(k_dim=512, memory_size=256, n_heads=4, knn=32, in_layers=[4]), matmul=4096)
QUICK = dict(vocab=1000, embedding_size=16, hidden_size=32, n_heads=2, n_encoders=2, intermediate_size=64,
             max_len=8, pkm=dict(k_dim=16, memory_size=16, n_heads=2, knn=4, in_layers=[1]), matmul=256)


def pretraining_config(sizes: dict, batch: int, precision: str, pkm: bool, act: str = "gelu_new",
                       device: str = "cpu", compiled: bool = False) -> Config:
    """conf/ with model=base, resized for the benchmark: what the pretrain stage would read.

    Composed in pure Python (a lent GPU machine has no Hydra); tests/test_plain_compose.py checks
    these overrides compose as Hydra composes them.
    """
    return load_config(compose_plain(pretraining_overrides(sizes, batch, precision, pkm, act, device, compiled),
                                     REPO / "conf"))


def pretraining_overrides(sizes: dict, batch: int, precision: str, pkm: bool, act: str = "gelu_new",
                          device: str = "cpu", compiled: bool = False) -> list[str]:
    overrides = [
        "model=base", f"model.embedding_size={sizes['embedding_size']}", f"model.hidden_size={sizes['hidden_size']}",
        f"model.n_heads={sizes['n_heads']}", f"model.n_encoders={sizes['n_encoders']}",
        f"model.intermediate_size={sizes['intermediate_size']}", f"model.hidden_act={act}",
        "model.input_dropout=0.0", "model.output_dropout=0.0", f"model.pkm={str(pkm).lower()}",
        f"representation.max_len={sizes['max_len']}", f"training.batch_size={batch}",
        f"training.precision={precision}", f"training.device={device}",
    ]
    if compiled:  # only named when asked: the key is newer than some of the code this script is pointed at (A/B)
        overrides.append("training.compile=true")
    return overrides + [f"model.pkm_params.{k}={v}" for k, v in sizes["pkm"].items()]


def random_batch(vocab: int, batch: int, max_len: int, seed: int = 0) -> PairBatch:
    """Full-length rows [CLS] a [SEP] b [SEP] of random ids, packed by the data stage's own code."""
    rng = np.random.default_rng(seed)
    a = rng.integers(N_SPECIAL, vocab, (batch, max_len)).tolist()
    b = rng.integers(N_SPECIAL, vocab, (batch, max_len)).tolist()
    packed = pack_pairs(a, b, max_len)
    return make_batch(packed["input_ids"], packed["len_a"], packed["length"], rng.integers(0, 2, batch))


def fixed_masks(cfg: Config, vocab: int, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The masked ids and MLM labels our objective draws for ``batch`` at a fixed (epoch, step) key."""
    return PretrainObjective(cfg.model.masked_lm, cfg.seed, vocab, torch.device("cpu")).mask(batch, 0, 0)


def ours_step(cfg: Config, vocab: int, batch: PairBatch) -> Callable[[], None]:
    """One step of the pretrain stage's training loop on ``batch`` (a host batch: each step copies it to
    the device, as the stage does)."""
    _, trainer, objective = build_pretraining(resolve_pretrain_run(cfg), vocab, torch.device(cfg.training.device))
    return lambda: trainer.train_step(batch, objective)


def hf_albert(cfg: Config, vocab: int, positions: int) -> torch.nn.Module:
    """``AlbertForPreTraining`` of our config's sizes (no dropout), in training mode on ``DEVICE``."""
    from transformers import AlbertConfig, AlbertForPreTraining

    m = cfg.model
    return AlbertForPreTraining(AlbertConfig(
        vocab_size=vocab, embedding_size=m.embedding_size, hidden_size=m.hidden_size,
        num_attention_heads=m.n_heads, num_hidden_layers=m.n_encoders, num_hidden_groups=1, inner_group_num=1,
        intermediate_size=m.ffn_size, hidden_act=m.hidden_act, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, classifier_dropout_prob=0.0,
        max_position_embeddings=positions, layer_norm_eps=m.layer_norm_eps,
    )).train().to(DEVICE)


def hf_trainer_step(model: torch.nn.Module, cfg: Config) -> Callable[[dict], None]:
    """HF Trainer's default step on ``model``, one batch of inputs (on the device) at a time: AdamW
    (fused), bf16 autocast under ``training.precision: bf16``, gradient clipping."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.training.lr, weight_decay=cfg.training.weight_decay,
                                  fused=True)
    device_type = next(model.parameters()).device.type
    bf16 = cfg.training.precision == "bf16"

    def step(inputs: dict) -> None:
        with torch.autocast(device_type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.training.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def hf_step(cfg: Config, vocab: int, batch: PairBatch) -> Callable[[], None]:
    """One step of AlbertForPreTraining with HF Trainer's default optimizer, on the same masked batch
    (its inputs on the device once: HF gets no copy per step)."""
    step = hf_trainer_step(hf_albert(cfg, vocab, batch.input_ids.shape[1]), cfg)
    inputs = hf_inputs(cfg, vocab, batch, 0)
    return lambda: step(inputs)


DEVICE = torch.device("cpu")  # set by main(): where the steps and the matmul probes run


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def seconds(step: Callable[[], None], n: int) -> float:
    synchronize()
    start = time.perf_counter()
    for _ in range(n):
        step()
    synchronize()  # a GPU step returns once queued: wait for all of them
    return (time.perf_counter() - start) / n


def compare(name: str, ours: Callable, hf: Callable, tokens: int, steps: int, rounds: int,
            probe: Optional[Callable[[], float]] = None, labels: tuple[str, str] = ("ours", "HF"),
            warmup: int = 1) -> dict:
    """Alternating timed rounds of both sides; medians of tok/s and of the per-round ratio.

    ``probe`` (e.g. a matmul's FLOP/s) is measured once per round, beside the steps it is compared with.
    """
    for _ in range(warmup):  # allocator, kernels, optimizer state; compilation
        ours(), hf()
    ours_tok, hf_tok, probes = [], [], []
    for r in range(rounds):
        sides = [(labels[0], ours, ours_tok), (labels[1], hf, hf_tok)]
        for label, step, out in sides if r % 2 == 0 else sides[::-1]:
            out.append(tokens / seconds(step, steps))
            print(f"  {name} round {r + 1} {label:4s}: {out[-1]:8.1f} tok/s", flush=True)
        if probe is not None:
            probes.append(probe())
    ratios = [o / h for o, h in zip(ours_tok, hf_tok)]
    result = dict(ours=statistics.median(ours_tok), hf=statistics.median(hf_tok), ratio=statistics.median(ratios),
                  ours_rounds=ours_tok, probes=probes)
    print(f"{name}: {labels[0]} {result['ours']:.1f} tok/s, {labels[1]} {result['hf']:.1f} tok/s, "
          f"ratio {result['ratio']:.2f}x (per round {', '.join(f'{x:.2f}' for x in ratios)})", flush=True)
    return result


def single(name: str, step: Callable, tokens: int, steps: int, rounds: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        step()
    rates = [tokens / seconds(step, steps) for _ in range(rounds)]
    print(f"{name}: ours {statistics.median(rates):.1f} tok/s (rounds {', '.join(f'{x:.1f}' for x in rates)})",
          flush=True)
    return statistics.median(rates)


def matmul_flops_shape(rows: int, inner: int, cols: int, dtype: torch.dtype, repeats: int = 10) -> float:
    """FLOP/s of a (rows x inner) @ (inner x cols) matmul in ``dtype`` (median of ``repeats``)."""
    a = torch.randn(rows, inner, dtype=dtype, device=DEVICE)
    b = torch.randn(inner, cols, dtype=dtype, device=DEVICE)
    for _ in range(3):
        a @ b
    times = []
    inner_repeats = 20 if DEVICE.type == "cuda" else 1  # a GPU matmul is too short to time alone
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        for _ in range(inner_repeats):
            a @ b
        synchronize()
        times.append((time.perf_counter() - start) / inner_repeats)
    return 2 * rows * inner * cols / statistics.median(times)


def matmul_flops(n: int, dtype: torch.dtype) -> float:
    """FLOP/s of an n x n x n matmul: the reference of ``mfu_fp32`` and ``mfu_bf16``."""
    return matmul_flops_shape(n, n, n, dtype)


def linear_layers_flops(cfg: Config, n_tokens: int, dtype: torch.dtype) -> float:
    """FLOP/s of the encoder's own linear-layer matmuls alone (forward and both backward products),
    time-weighted: the rate a step made only of those matmuls would reach."""
    m = cfg.model
    inner = m.n_heads * m.head_size
    flops = seconds_total = 0.0
    for fan_in, fan_out, count in ((m.hidden_size, inner, 3), (inner, m.hidden_size, 1),
                                   (m.hidden_size, m.ffn_size, 1), (m.ffn_size, m.hidden_size, 1)):
        # forward x W^T, input gradient g W, weight gradient g^T x
        for shape in ((n_tokens, fan_in, fan_out), (n_tokens, fan_out, fan_in), (fan_out, n_tokens, fan_in)):
            rows, inner_dim, cols = shape
            rate = matmul_flops_shape(rows, inner_dim, cols, dtype, repeats=5)
            flops += count * 2 * rows * inner_dim * cols
            seconds_total += count * 2 * rows * inner_dim * cols / rate
    return flops / seconds_total


def train_flops(cfg: Config, vocab: int, batch: int, seq: int, n_masked: int) -> float:
    """Matmul FLOPs of one training step of our PKM-free model (forward x 3); see the module docstring."""
    m = cfg.model
    inner = m.n_heads * m.head_size
    per_token = 2 * m.embedding_size * m.hidden_size * m.factorize_embeddings
    per_token += m.n_encoders * (8 * m.hidden_size * inner + 4 * seq * inner + 4 * m.hidden_size * m.ffn_size)
    per_masked = 2 * m.hidden_size * m.embedding_size + 2 * m.embedding_size * vocab
    widths = [m.hidden_size] + [m.rop.hidden_size] * m.rop.n_hidden + [2]
    per_row = sum(2 * a * b for a, b in zip(widths[:-1], widths[1:])) if m.rop.enabled else 0
    return 3.0 * (per_token * batch * seq + per_masked * n_masked + per_row * batch)


REAL_EXAMPLES = 20_000  # generated examples: hundreds of batches, many grouping windows
REAL_MAX_LEN = 32  # pieces per segment in the generated rows: the default pipeline's representation.max_len


def tweet_like_rows(n: int, vocab: int, seed: int = 0) -> PackedRows:
    """``n`` examples of random ids whose lengths are shaped like the default corpus's pairs: two
    log-normal segments (median ~8, mean ~11 pieces) cut at REAL_MAX_LEN, plus 3 specials."""
    rng = np.random.default_rng(seed)
    segments = np.clip(np.rint(np.exp(rng.normal(2.05, 0.98, (n, 2)))), 1, REAL_MAX_LEN).astype(np.int64)
    a = [rng.integers(N_SPECIAL, vocab, k).tolist() for k in segments[:, 0]]
    b = [rng.integers(N_SPECIAL, vocab, k).tolist() for k in segments[:, 1]]
    packed = pack_pairs(a, b, REAL_MAX_LEN)
    packed["labels"] = rng.integers(0, 2, n)
    return PackedRows(packed)


def real_examples(pairs: str, vocab: int) -> tuple[object, str]:
    """The examples whose lengths are timed, and what they are."""
    if not pairs:
        rows = tweet_like_rows(REAL_EXAMPLES, vocab)
        return rows, f"generated tweet-like lengths ({len(rows)} examples)"
    from twilbert.data.pairs import load_shards

    directory = Path(pairs) / "train" if (Path(pairs) / "train").is_dir() else Path(pairs)
    data = load_shards(directory)
    return data, f"the lengths of {directory} ({len(data)} examples, max_len {data.max_len})"


def padding_of(batches: list[PairBatch]) -> float:
    real = sum(int(b.attention_mask.sum()) for b in batches)
    return 1.0 - real / sum(b.attention_mask.numel() for b in batches)


def ours_stepper(cfg: Config, vocab: int) -> Callable[[PairBatch], None]:
    """The pretrain stage's training step, one batch at a time."""
    _, trainer, objective = build_pretraining(resolve_pretrain_run(cfg), vocab, torch.device(cfg.training.device))
    return lambda batch: trainer.train_step(batch, objective)


def hf_stepper(cfg: Config, vocab: int, positions: int) -> Callable[[dict], None]:
    """AlbertForPreTraining with HF Trainer's default optimizer, one prepared batch (``hf_inputs``) at a time."""
    return hf_trainer_step(hf_albert(cfg, vocab, positions), cfg)


def hf_inputs(cfg: Config, vocab: int, batch: PairBatch, key: int) -> dict:
    """HF's inputs for ``batch``: our objective's masks (drawn before timing), ALBERT's SOP label (0 = in order)."""
    masked, labels = PretrainObjective(cfg.model.masked_lm, cfg.seed, vocab, torch.device("cpu")).mask(batch, 0, key)
    inputs = dict(input_ids=masked, attention_mask=batch.attention_mask.long(), token_type_ids=batch.segment_ids,
                  labels=labels, sentence_order_label=1 - batch.labels)
    return {k: v.to(DEVICE) for k, v in inputs.items()}


def real_lengths(args: argparse.Namespace) -> None:
    """``--real-lengths``: real (non-pad) tokens per second on tweet-length batches; see the module docstring."""
    from twilbert.data.batch import iterate_batches

    sizes = QUICK if args.quick else FULL
    vocab = sizes["vocab"]
    examples, what = real_examples(args.real_lengths, vocab)
    # positions for the longest row (--quick's sizes are shorter than tweets)
    sizes = {**sizes, "max_len": max(sizes["max_len"], getattr(examples, "max_len", REAL_MAX_LEN))}
    cfg = pretraining_config(sizes, args.batches[0], "fp32", pkm=False, act=args.act, device=args.device)
    print(f"machine: {platform.node()}: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; load average {os.getloadavg()[0]:.2f}")
    print(f"rows: {what}; sizes: V={vocab} E={sizes['embedding_size']} H={sizes['hidden_size']} "
          f"A={sizes['n_heads']} L={sizes['n_encoders']} I={sizes['intermediate_size']}, {args.act}; "
          f"{args.steps} steps (at batch {args.batches[0]}) x {args.rounds} rounds per side", flush=True)
    ours, hf = ours_stepper(cfg, vocab), hf_stepper(cfg, vocab, 2 * sizes["max_len"] + 3)
    by_batch = {}
    for size in args.batches:
        epochs = {grouped: list(iterate_batches(examples, size, cfg.seed, 0, length_grouping=grouped))
                  for grouped in (True, False)}
        shares = {grouped: padding_of(batches) for grouped, batches in epochs.items()}
        sides = [("ours", True), ("ours_random", False), ("hf_random", False), ("hf_grouped", True)]
        rates: dict[str, list[float]] = {name: [] for name, _ in sides}

        def run(name: str, grouped: bool, picks: list[int], epochs: dict = epochs) -> float:
            """Real tokens per second over the batches ``picks`` of the side's epoch."""
            real = sum(int(epochs[grouped][i].attention_mask.sum()) for i in picks)
            if name.startswith("hf"):  # HF is fed masks drawn before the clock starts
                inputs = [hf_inputs(cfg, vocab, epochs[grouped][i], i) for i in picks]
                step, items = hf, inputs
            else:
                step, items = ours, [epochs[grouped][i] for i in picks]
            synchronize()
            start = time.perf_counter()
            for item in items:
                step(item)
            synchronize()
            return real / (time.perf_counter() - start)

        for name, grouped in sides:  # warm-up: allocator, kernels, optimizer state
            run(name, grouped, [0])
        steps = max(1, round(args.steps * args.batches[0] / size))  # about the same tokens per round at each size
        for r in range(args.rounds):
            for name, grouped in sides if r % 2 == 0 else sides[::-1]:
                picks = [(r * steps + k) % len(epochs[grouped]) for k in range(steps)]
                rates[name].append(run(name, grouped, picks))
            print(f"  batch {size} round {r + 1}: " + ", ".join(f"{n} {v[-1]:.1f}" for n, v in rates.items())
                  + f" real tok/s; load {os.getloadavg()[0]:.2f}", flush=True)
        med = {name: statistics.median(v) for name, v in rates.items()}
        figures = {f"real_tok_per_s_{name if name != 'hf_random' else 'hf'}": round(v, 1) for name, v in med.items()}
        figures.update(padding_share_ours=round(shares[True], 4), padding_share_random=round(shares[False], 4),
                       ratio_ours_to_ours_random=round(med["ours"] / med["ours_random"], 3),
                       ratio_ours_to_hf=round(med["ours"] / med["hf_random"], 3),
                       ratio_ours_random_to_hf=round(med["ours_random"] / med["hf_random"], 3),
                       rounds={name: [round(x, 1) for x in v] for name, v in rates.items()})
        by_batch[size] = figures
        print(f"batch {size}: padding share grouped {shares[True]:.1%}, random {shares[False]:.1%}; real tok/s "
              f"ours grouped {med['ours']:.1f}, ours random {med['ours_random']:.1f}, HF random "
              f"{med['hf_random']:.1f}, HF grouped {med['hf_grouped']:.1f}; ours grouped / ours random "
              f"{figures['ratio_ours_to_ours_random']:.2f}x, / HF random {figures['ratio_ours_to_hf']:.2f}x", flush=True)
        gc.collect()
    first = by_batch[args.batches[0]]
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    print(json.dumps({**{k: v for k, v in first.items() if k != "rounds"}, "batch": args.batches[0],
                      "by_batch": by_batch, "rows": what, "host": platform.node(), "device": args.device,
                      "threads": torch.get_num_threads(), "load_average_end": round(os.getloadavg()[0], 2)}))


def main() -> None:
    global DEVICE
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per side and round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per comparison (>= 3)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run of a few seconds")
    parser.add_argument("--act", choices=("gelu_new", "gelu"), default="gelu_new",
                        help="activation of both sides: ALBERT's gelu_new (default) or exact gelu (our presets')")
    parser.add_argument("--bf16", choices=("auto", "on", "off"), default="auto",
                        help="time bf16 autocast: auto = only on a device with bf16 matrix instructions (a GPU "
                             "from Ampere on; a CPU with AVX512-BF16 or AMX); elsewhere PyTorch emulates bf16 "
                             "~100x slower than fp32")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--tf32", action="store_true", help="CUDA: fp32 matmuls on TF32 tensor cores (both sides)")
    parser.add_argument("--compile", choices=("off", "on", "ab"), default="off",
                        help="on: ours with training.compile; ab: ours compiled against ours eager (no HF)")
    parser.add_argument("--no-pkm", action="store_true", help="skip the product-key-memory figure")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps of each side first (more for compile)")
    parser.add_argument("--numerics", action="store_true", help="the cost of runtime.portable_numerics (see above)")
    parser.add_argument("--numerics-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--numerics-workers", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--numerics-micro", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, help="--numerics: the workers side's process count (default "
                        "min(cores, K))")
    parser.add_argument("--micro-batches", type=int, help="--numerics: K (default: training.micro_batches of conf/)")
    parser.add_argument("--real-lengths", nargs="?", const="", default=None, metavar="PAIRS_DIR",
                        help="real tokens/s on tweet-length batches, grouped and random (see above); with a pairs "
                             "folder, its lengths, else generated tweet-like ones")
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 128], help="--real-lengths: batch sizes")
    parser.add_argument("--init", choices=("scratch", "hf"), default="scratch",
                        help="hf: continued pretraining of a BERT-base checkpoint against a Trainer/run_mlm-style "
                             "step (benchmarks/continued_throughput.py)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.init == "hf":
        import continued_throughput  # beside this script

        return continued_throughput.run(args)
    if args.numerics or args.numerics_child:
        import numerics_throughput  # beside this script

        return numerics_throughput.child(args) if args.numerics_child else numerics_throughput.run(args)
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this torch sees no CUDA device")
    if args.real_lengths is not None:
        return real_lengths(args)
    if args.tf32:
        configure_matmul(DEVICE, True)
    sizes = QUICK if args.quick else FULL
    vocab, seq = sizes["vocab"], 2 * sizes["max_len"] + 3
    tokens = args.batch * seq
    batch = random_batch(vocab, args.batch, sizes["max_len"])
    host = platform.node()
    if DEVICE.type == "cuda":
        where = f"GPU {torch.cuda.get_device_name(DEVICE)}"
    else:
        where = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads"
    print(f"machine: {host}: {where}, torch {torch.__version__}; load average {os.getloadavg()[0]:.2f}")
    print(f"sizes: V={vocab} E={sizes['embedding_size']} H={sizes['hidden_size']} A={sizes['n_heads']} "
          f"L={sizes['n_encoders']} I={sizes['intermediate_size']} T={seq} B={args.batch}, {args.act}; "
          f"{args.steps} steps x {args.rounds} rounds; compile {args.compile}, tf32 {args.tf32}", flush=True)

    cfg = pretraining_config(sizes, args.batch, "fp32", pkm=False, act=args.act)
    n_masked = int((fixed_masks(cfg, vocab, batch)[1] != -100).sum())  # the same count every step
    flops = train_flops(cfg, vocab, args.batch, seq, n_masked)
    native = native_bf16(DEVICE)
    precisions = ["fp32"]
    if args.bf16 == "on" or (args.bf16 == "auto" and native):
        precisions.append("bf16")
    elif args.bf16 == "off":
        print("bf16 skipped (--bf16 off)", flush=True)
    else:
        fp32_rate, bf16_rate = (matmul_flops(512, dtype) for dtype in (torch.float32, torch.bfloat16))
        print(f"bf16 skipped: this {args.device} has no bf16 matrix instructions; a 512^3 matmul runs at "
              f"{bf16_rate / 1e9:.1f} GFLOP/s in bf16 against {fp32_rate / 1e9:.1f} in fp32, so a bf16 step would "
              f"time PyTorch's emulation, not the model. --bf16 on runs it anyway.", flush=True)

    def build(precision: str, pkm: bool = False, compiled: bool = args.compile == "on") -> Config:
        return pretraining_config(sizes, args.batch, precision, pkm=pkm, act=args.act, device=args.device,
                                  compiled=compiled)

    results = {}  # precision -> compare()'s figures, plus "pkm" (tok/s) and "mfu"
    peaks = {}  # precision -> the median matmul FLOP/s of its rounds
    for precision in precisions:
        dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        cfg = build(precision)
        matmul = functools.partial(matmul_flops, sizes["matmul"], dtype)
        if args.compile == "ab":
            rounds = results[precision] = compare(
                precision, ours_step(build(precision, compiled=True), vocab, batch), ours_step(cfg, vocab, batch),
                tokens, args.steps, args.rounds, matmul, labels=("compiled", "eager"), warmup=args.warmup)
        else:
            rounds = results[precision] = compare(precision, ours_step(cfg, vocab, batch), hf_step(cfg, vocab, batch),
                                                  tokens, args.steps, args.rounds, matmul, warmup=args.warmup)
        gc.collect()
        if not args.no_pkm:
            rounds["pkm"] = single(f"{precision} + PKM", ours_step(build(precision, pkm=True), vocab, batch), tokens,
                                   args.steps, args.rounds, warmup=args.warmup)
            gc.collect()
        # MFU per round, against the matmul measured right after that round (the host's speed drifts)
        mfus = [flops * tok_s / tokens / peak for tok_s, peak in zip(rounds["ours_rounds"], rounds["probes"])]
        rounds["mfu"] = statistics.median(mfus)
        peaks[precision] = statistics.median(rounds["probes"])
        print(f"{precision}: model FLOPs per step {flops / 1e9:.1f} GFLOP ({n_masked} masked tokens); ours achieves "
              f"{', '.join(f'{flops * t / tokens / 1e9:.0f}' for t in rounds['ours_rounds'])} GFLOP/s per round; "
              f"{precision} {sizes['matmul']}^3 matmul: {', '.join(f'{p / 1e9:.0f}' for p in rounds['probes'])} "
              f"GFLOP/s; mfu per round {', '.join(f'{m:.2f}' for m in mfus)}")
        ceiling = linear_layers_flops(cfg, tokens, dtype)
        print(f"{precision} matmuls of the encoder's linear layers alone (their own shapes): {ceiling / 1e9:.0f} "
              f"GFLOP/s; ours {precision} reaches {flops * rounds['ours'] / tokens / ceiling:.2f} of that", flush=True)
    if DEVICE.type == "cuda":
        from twilbert.model.kernels import attention_backend
        from twilbert.train.pretrain import build_pretraining_model

        model = build_pretraining_model(resolve_pretrain_run(build("bf16")), vocab).to(DEVICE)
        kernels = {f"{p}_{'padded' if padded else 'unpadded'}": attention_backend(model, args.batch, seq, padded, p)
                   for p in precisions for padded in (False, True)}
        print(f"attention kernels (SDPA, training mode): {kernels}", flush=True)
        print(f"peak memory allocated: {torch.cuda.max_memory_allocated(DEVICE) / 2**30:.1f} GiB", flush=True)
    else:
        kernels = None
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")

    def figure(precision: str, name: str, digits: int = 1) -> Optional[float]:
        return round(results[precision][name], digits) if precision in results and name in results[precision] else None

    other = "eager" if args.compile == "ab" else "hf"  # what "ours" is compared with
    print(json.dumps({
        f"{other}_fp32_tok_s": figure("fp32", "hf"),
        "ours_fp32_tok_s": figure("fp32", "ours"),
        f"{other}_bf16_tok_s": figure("bf16", "hf"),
        "ours_bf16_tok_s": figure("bf16", "ours"),
        "ours_pkm_fp32_tok_s": figure("fp32", "pkm"),
        "ours_pkm_bf16_tok_s": figure("bf16", "pkm"),
        "ratio_fp32": figure("fp32", "ratio", 3),
        "ratio_bf16": figure("bf16", "ratio", 3),
        "mfu_fp32": figure("fp32", "mfu", 3),
        "mfu_bf16": figure("bf16", "mfu", 3),
        "matmul_fp32_tflops": round(peaks["fp32"] / 1e12, 2) if "fp32" in peaks else None,
        "matmul_bf16_tflops": round(peaks["bf16"] / 1e12, 2) if "bf16" in peaks else None,
        "native_bf16": native,
        "device": args.device,
        "device_name": where,
        "host": host,
        "batch": args.batch,
        "compile": args.compile,
        "tf32": args.tf32,
        "attention_kernels": kernels,
        "load_average_end": round(os.getloadavg()[0], 2),
    }))


OUT_OF_MEMORY = 3  # exit status when the batch does not fit the GPU (scripts/device_check.sh tries a smaller one)

if __name__ == "__main__":
    try:
        main()
    except torch.cuda.OutOfMemoryError as err:
        print(f"out of memory: {str(err).splitlines()[0]}", flush=True)
        raise SystemExit(OUT_OF_MEMORY) from None
