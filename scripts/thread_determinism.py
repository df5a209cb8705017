"""Is a pinned intra-op thread count bit-exact on a busy machine? (issue 33, item 4)

Portable numerics (``twilbert.numerics``) run one torch thread because, with 2, a bit-exact resume
test differed under load and passed alone. This probe finds out why, the machine loaded on purpose
(``--load`` busy-loop processes that it starts and stops itself):

- ``train``: ``--runs`` fresh processes per variant (a thread count, optionally with extra variables),
  interleaved, each the real pretraining step (``build_pretraining``: tiny preset, dropout, Adam,
  clipping, dynamic masking, length-grouped global batches of ``training.micro_batches`` micro-batches,
  all in this one process, read ahead on the prefetch thread) for one epoch
  of synthetic pairs (the default pipeline's sizes); prints the sha256 of the final weights per variant.
- ``ops``: each op of that step (MKL sgemm in linear and its gradients, bmm, softmax, layer norm,
  GELU, embedding backward, cross entropy, reductions, grad-norm clipping, AdamW's foreach update),
  at the model's shapes and at shapes large enough for ATen to split them over threads, repeated
  ``--reps`` times in one process: how many distinct results each gives.
- ``history``: the test that failed, at the commit before the switch to 1 thread, run as a
  pytest-xdist worker, alone, and alone with ``OMP_NUM_THREADS=1`` (about 6 min).

The portable pins (``PORTABLE_ENV``) are in the children's environment before torch loads. Usage:

    .venv/bin/python scripts/thread_determinism.py                  # train + ops, ~6 min on 2 loaded cores
    .venv/bin/python scripts/thread_determinism.py --part history --load 0
    .venv/bin/python scripts/thread_determinism.py --part train --variants 2 2:MKL_CBWR=AVX2,STRICT

Exits 1 when a variant or an op gave more than one result (history: when the failure does not follow
the test process's thread count).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from twilbert.numerics import PINNED_BY_LAUNCHER, PORTABLE_ENV  # noqa: E402  (no torch import)

VOCAB, WIDTH, ROWS, BATCH, SEED = 1000, 32, 384, 32, 1234  # the default pipeline's sizes: 12 steps


def digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Children: one thread count per process, set before any op runs
# --------------------------------------------------------------------------------------------


def child_setup(threads: int):
    import torch

    torch.set_num_threads(threads)
    return torch


def child_train(threads: int) -> dict:
    torch = child_setup(threads)
    import numpy as np

    from twilbert.config import compose, load_config
    from twilbert.data.batch import pack_pairs
    from twilbert.data.prefetch import prefetch
    from twilbert.data.special import N_SPECIAL
    from twilbert.train.distributed import DistContext, iterate_micro_batches
    from twilbert.train.loop import seed_everything
    from twilbert.train.pretrain import PREFETCH_BATCHES, build_pretraining
    from twilbert.train.pretrain_run import resolve_pretrain_run

    run = resolve_pretrain_run(load_config(compose(["model=tiny", f"representation.max_len={WIDTH}"],
                                                   REPO / "conf")))
    seed_everything(run.seed, torch.device("cpu"))
    rng = np.random.default_rng(0)
    a = [rng.integers(N_SPECIAL, VOCAB, rng.integers(2, WIDTH // 2)).tolist() for _ in range(ROWS)]
    b = [rng.integers(N_SPECIAL, VOCAB, rng.integers(2, WIDTH // 2)).tolist() for _ in range(ROWS)]
    data = pack_pairs(a, b, WIDTH)
    data["labels"] = rng.integers(0, 2, ROWS)
    model, trainer, objective = build_pretraining(run, VOCAB, torch.device("cpu"))
    start = time.perf_counter()
    # the pretrain stage's own batches in one process: every micro-batch of each global batch
    batches = prefetch(iterate_micro_batches(data, BATCH, run.training.micro_batches, SEED, 0, DistContext(),
                                             length_grouping=True), PREFETCH_BATCHES)
    totals = trainer.train_epoch(batches, objective)
    seconds = time.perf_counter() - start
    return {"weights": digest(model.state_dict().values()), "loss": totals["loss"], "seconds": seconds,
            "torch_threads": torch.get_num_threads()}


def op_suite(torch):
    """name -> a function returning the tensors to compare (outputs and gradients), fixed inputs."""
    F = torch.nn.functional
    g = torch.Generator().manual_seed(0)

    def randn(*shape, grad=False):
        return torch.randn(*shape, generator=g).requires_grad_(grad)

    suite = {}
    for tag, sizes in {"tiny": (BATCH * WIDTH, 64, 128, VOCAB), "large": (4096, 128, 512, 4000)}.items():
        suite.update({f"{name} [{tag}]": fn for name, fn in shaped_ops(torch, F, randn, g, *sizes).items()})
    return suite


def shaped_ops(torch, F, randn, g, rows: int, width: int, wide: int, vocab: int) -> dict:
    """The ops at one set of sizes: ``rows`` tokens, model ``width``, FFN ``wide``, ``vocab`` logits."""
    x, w, bias = randn(rows, width, grad=True), randn(wide, width, grad=True), randn(wide, grad=True)
    gout = randn(rows, wide)

    def linear():
        x.grad = w.grad = bias.grad = None
        y = F.linear(x, w, bias)
        y.backward(gout)
        return y, x.grad, w.grad, bias.grad  # w.grad: a sum over the rows (sgemm's K = rows)

    heads, seq = 2, WIDTH
    q, k = randn(rows // seq * heads, seq, width // heads, grad=True), randn(rows // seq * heads, seq, width // heads)

    def attention():
        q.grad = None
        s = torch.softmax(torch.bmm(q, k.transpose(1, 2)) / 8.0, -1)
        s.backward(torch.ones_like(s) * 0.5 + s.detach())
        return s, q.grad

    h, ln_w, ln_b = randn(rows, width, grad=True), randn(width, grad=True), randn(width, grad=True)
    gout_ln = randn(rows, width)

    def layer_norm():
        h.grad = ln_w.grad = ln_b.grad = None
        y = F.layer_norm(h, (width,), ln_w, ln_b, 1e-12)
        y.backward(gout_ln)
        return y, h.grad, ln_w.grad, ln_b.grad  # the weight gradients sum over the rows

    u = randn(rows, wide, grad=True)

    def gelu():
        u.grad = None
        y = F.gelu(u)
        y.backward(gout)
        return y, u.grad

    table = randn(vocab, width // 2, grad=True)
    ids = torch.randint(0, vocab, (rows,), generator=g)
    gout_emb = randn(rows, width // 2)

    def embedding():
        table.grad = None
        F.embedding(ids, table).backward(gout_emb)
        return (table.grad,)  # rows of repeated ids summed

    logits, labels = randn(rows, vocab, grad=True), torch.randint(0, vocab, (rows,), generator=g)

    def cross_entropy():
        logits.grad = None
        loss = F.cross_entropy(logits, labels, ignore_index=-100)
        loss.backward()
        return loss, logits.grad

    big = randn(rows * wide)

    def reductions():
        return big.sum(), big.mean(), (big * big).sum(), big.view(rows, wide).sum(0), torch.linalg.vector_norm(big)

    params = [randn(wide, width) for _ in range(6)]
    grads = [randn(wide, width) for _ in range(6)]

    def clip_and_adam():
        ps = [p.clone().requires_grad_(True) for p in params]
        for p, gr in zip(ps, grads):
            p.grad = gr.clone()
        norm = torch.nn.utils.clip_grad_norm_(ps, 1.0)
        opt = torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, foreach=True)
        for _ in range(3):
            opt.step()
        return [norm, *ps]

    return {"linear (MKL sgemm) fwd+bwd": linear, "bmm + softmax fwd+bwd": attention,
            "layer_norm fwd+bwd": layer_norm, "gelu fwd+bwd": gelu, "embedding bwd": embedding,
            "cross_entropy fwd+bwd": cross_entropy, "sum/mean/norm reductions": reductions,
            "clip_grad_norm + AdamW foreach": clip_and_adam}


def child_ops(threads: int, reps: int) -> dict:
    torch = child_setup(threads)
    out = {}
    for name, fn in op_suite(torch).items():
        seen: dict[str, int] = {}
        for _ in range(reps):
            key = digest(fn())
            seen[key] = seen.get(key, 0) + 1
        out[name] = sorted(seen.values(), reverse=True)
    return {"ops": out, "torch_threads": torch.get_num_threads()}


# --------------------------------------------------------------------------------------------
# Parent: load, children, summary
# --------------------------------------------------------------------------------------------


def run_child(args: list[str], env: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child_env() -> dict[str, str]:
    """This environment with the portable pins; the thread count is the child's ``torch.set_num_threads``."""
    env = {**os.environ, **PORTABLE_ENV, PINNED_BY_LAUNCHER: "1", "PYTHONHASHSEED": "0"}
    env.pop("OMP_NUM_THREADS", None)
    return env


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def parse_variant(spec: str) -> tuple[int, dict[str, str]]:
    """``2`` or ``2:OMP_WAIT_POLICY=PASSIVE,...``: a thread count and extra environment variables."""
    threads, _, extra = spec.partition(":")
    pairs: list[str] = []
    for item in filter(None, extra.split(",")):
        if "=" in item or not pairs:
            pairs.append(item)
        else:  # a value with a comma: MKL_CBWR=AVX2,STRICT
            pairs[-1] += "," + item
    return int(threads), dict(item.split("=", 1) for item in pairs)


def probe_train(variants: list[str], runs: int, env: dict) -> bool:
    """``runs`` fresh training processes per variant, interleaved so that each sees the same load."""
    results: dict[str, list[dict]] = {v: [] for v in variants}
    for _ in range(runs):
        for spec in variants:
            threads, extra = parse_variant(spec)
            results[spec].append(run_child(["--child", "train", "--threads", str(threads)], {**env, **extra}))
    unstable = False
    for spec, rs in results.items():
        hashes = sorted({r["weights"] for r in rs})
        secs = sorted(r["seconds"] for r in rs)
        unstable |= len(hashes) > 1
        print(f"train [{spec} thread(s)]: {len(rs)} runs -> {len(hashes)} distinct weight hash(es) {hashes}; "
              f"epoch {secs[len(secs) // 2]:.2f} s median ({secs[0]:.2f}-{secs[-1]:.2f})")
    return unstable


def probe_ops(threads_list: list[int], reps: int, env: dict) -> bool:
    unstable = False
    for threads in threads_list:
        result = run_child(["--child", "ops", "--threads", str(threads), "--reps", str(reps)], env)
        varying = {k: v for k, v in result["ops"].items() if len(v) > 1}
        unstable |= bool(varying)
        print(f"ops, {threads} thread(s), {reps} reps each: "
              f"{len(result['ops']) - len(varying)}/{len(result['ops'])} ops bit-stable (load {loadavg()})")
        for name, counts in varying.items():
            print(f"  VARIES {name}: results seen {counts} times")
    return unstable


# The commit before portable numerics went to 1 thread: PORTABLE_THREADS = 2, and the pretraining resume
# test's last rerun ran inside the pytest process, whose thread count conftest.py set to 1 only in a
# pytest-xdist worker (`make test`), leaving torch's default (one per core: 2 here) in a lone run.
HISTORY_COMMIT = "6f78427^"
HISTORY_TEST = ("tests/test_resume.py::"
                "test_pretrain_killed_inside_a_window_resumes_bit_for_bit_and_passes_over_a_truncated_checkpoint")


def probe_history() -> bool:
    """The failing test at ``HISTORY_COMMIT``, as an xdist worker, alone, and alone with 1 OpenMP thread."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="twilbert-history-") as tmp:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", HISTORY_COMMIT], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        base = {k: v for k, v in os.environ.items() if k not in ("PYTEST_XDIST_WORKER", "OMP_NUM_THREADS")}
        base["PYTHONPATH"] = f"{tmp}/src"  # that commit's package, ahead of the editable install
        cases = {"as a pytest-xdist worker (`make test`)": {"PYTEST_XDIST_WORKER": "gw0"},
                 "alone": {}, "alone, OMP_NUM_THREADS=1": {"OMP_NUM_THREADS": "1"}}
        outcome = {}
        for name, extra in cases.items():
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:xdist", "-p", "no:cacheprovider", "-q",
                                   "-x", HISTORY_TEST], cwd=tmp, env={**base, **extra}, capture_output=True, text=True,
                                  timeout=900)
            failed = [line.strip() for line in proc.stdout.splitlines() if line.strip().startswith("E ")][:1]
            outcome[name] = proc.returncode == 0
            print(f"history {HISTORY_COMMIT}, {name}: {'passed' if proc.returncode == 0 else 'FAILED'} "
                  f"in {time.perf_counter() - start:.0f} s (load {loadavg()}) {' '.join(failed)}")
    # the explanation holds when only the runs whose pytest process had 1 thread failed
    return outcome != {"as a pytest-xdist worker (`make test`)": False, "alone": True,
                       "alone, OMP_NUM_THREADS=1": False}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["train", "ops", "all", "history"], default="all",
                        help="all: train and ops; history: the resume test that failed (about 6 min)")
    parser.add_argument("--variants", nargs="+", default=["1", "2", "2:OMP_WAIT_POLICY=PASSIVE"],
                        help="training variants: THREADS[:KEY=VALUE,...]")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts of the ops part")
    parser.add_argument("--runs", type=int, default=4, help="training processes per variant")
    parser.add_argument("--reps", type=int, default=20, help="repetitions of each op")
    parser.add_argument("--load", type=int, default=2, help="busy-loop processes started for the probe")
    parser.add_argument("--child", choices=["train", "ops"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = child_train(args.threads[0]) if args.child == "train" else child_ops(args.threads[0], args.reps)
        print(json.dumps(result))
        return 0

    env = child_env()
    print(f"host {platform.node()}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
          f"{' '.join(f'{k}={v}' for k, v in PORTABLE_ENV.items())}")
    print(f"load average before: {loadavg()}; starting {args.load} busy loop(s)")
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.load)]
    unstable = False
    try:
        time.sleep(1.0 if hogs else 0.0)
        if args.part == "history":
            unstable |= probe_history()
        if args.part in ("train", "all"):
            unstable |= probe_train(args.variants, args.runs, env)
        if args.part in ("ops", "all"):
            unstable |= probe_ops(args.threads, args.reps, env)
    finally:
        for hog in hogs:
            hog.terminate()
        for hog in hogs:
            hog.wait()
    print(f"load average after: {loadavg()}")
    return 1 if unstable else 0


if __name__ == "__main__":
    sys.exit(main())
