"""The GPU path's checks (marker ``gpu``), run on every device present: the CPU always, CUDA when
there is one. scripts/device_check.sh runs them on a lent GPU machine; on the CPU the same bodies
run in bf16, so a bf16 bug is found here and not on the lent machine's one try.

- forward and backward of the pretraining model equal the CPU's fp32: within fp32 rounding on CUDA
  with TF32 off, and within bf16 rounding under autocast (on the CPU: bf16 against fp32);
- bf16 pretraining with the held-out pseudo-log-likelihood on, and bf16 finetuning, train on the device;
- predict on the device gives the CPU's labels, and bf16 autocast nearly all of them;
- CUDA only: the attention kernel SDPA picks is a fused one (flash or cuDNN without padding in bf16),
  never math; training steps ask the device for nothing but the once-per-window read
  (``set_sync_debug_mode``); a pretraining run killed on CUDA and rerun ends where an uninterrupted
  run ends (CUDA kernels are not bit-deterministic: the tolerance is stated below; tests/test_resume.py
  checks the CPU's bit-exact resume); pretraining on 1 and on 2 workers of the GPU writes the same
  bytes wherever one worker repeats its own bytes (tests/test_worker_invariance.py: the CPU).
"""

from __future__ import annotations

import copy
import json
import math
import warnings

import numpy as np
import pytest
import torch

from helpers import REPO
from twilbert.config import load_config
from twilbert.config.plain_compose import compose_plain
from twilbert.data.batch import make_batch, pack_pairs
from twilbert.data.special import N_SPECIAL
from twilbert.model.kernels import FUSED, attention_backend
from twilbert.train.pretrain import PretrainObjective, build_pretraining, build_pretraining_model
from twilbert.train.pretrain_run import resolve_pretrain_run

pytestmark = pytest.mark.gpu

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", *(["cuda"] if HAS_CUDA else [])]
cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (scripts/device_check.sh)")
CUDA = torch.device("cuda")
CPU = torch.device("cpu")
# Resumed against uninterrupted on CUDA: the same steps, but atomics reorder float sums (embedding and
# index backward), so weights agree to about fp32 rounding amplified by a few Adam steps.
RESUME_RTOL, RESUME_ATOL = 1e-3, 1e-5
# Gradient error against the CPU's fp32, as a share of the model's largest gradient. Not per tensor:
# bf16 keeps 8 bits of mantissa (rounding 2**-8 ~ 4e-3 per op), and its errors come from activations
# every tensor's gradient shares, so they scale with the model's gradients, not with each tensor's.
# A tensor whose gradient nearly cancels has a huge error relative to itself while being as right as
# any: the ROP head's is 4.4e-4 in fp32 and exactly 0 in bf16 (relative error 0.48), and attention
# key biases get ~1e-12 (zero in exact arithmetic: softmax ignores a shift), so per-tensor cosine
# similarity is noise there too. Measured on the CPU in bf16: at most 8.4e-3; fp32 on CUDA: ~1e-6.
GRAD_TOL = {"fp32": 1e-4, "bf16": 3e-2}
LOSS_RTOL = {"fp32": 1e-4, "bf16": 3e-2}


def small_config(*overrides: str, device: str = "cuda"):
    # composed in pure Python: the lent GPU machine has no Hydra
    return load_config(compose_plain(["model=tiny", "representation.max_len=16", "model.input_dropout=0.0",
                                      "model.output_dropout=0.0", f"training.device={device}", *overrides],
                                     REPO / "conf"))


def batch_of(vocab: int, rows: int, max_len: int, padded: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, max_len + 1, rows) if padded else np.full(rows, max_len)
    a = [rng.integers(N_SPECIAL, vocab, k).tolist() for k in lengths]
    b = [rng.integers(N_SPECIAL, vocab, k).tolist() for k in lengths[::-1]]
    packed = pack_pairs(a, b, max_len)
    return make_batch(packed["input_ids"], packed["len_a"], packed["length"], rng.integers(0, 2, rows))


@pytest.fixture(autouse=True)
def exact_fp32():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def loss_and_grads(model, objective, batch, precision: str):
    model.zero_grad(set_to_none=True)
    device = next(model.parameters()).device
    objective.device = device
    masked, labels = objective.mask(batch, 0, 0)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss, _ = objective.outputs(model, batch, masked, labels)
    loss.backward()
    grads = {n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads


# the CPU in fp32 is the reference, so the CPU's own case is bf16
COMPARED = [("cpu", "bf16"), *([("cuda", "fp32"), ("cuda", "bf16")] if HAS_CUDA else [])]


@pytest.mark.parametrize("device,precision", COMPARED)
@pytest.mark.parametrize("padded", [False, True])
def test_forward_and_backward_match_the_cpu_in_fp32(device, precision, padded):
    cfg = small_config(device=device)
    vocab = 200
    reference = build_pretraining_model(resolve_pretrain_run(cfg), vocab).train()
    model = copy.deepcopy(reference).to(device)
    objective = PretrainObjective(cfg.model.masked_lm, cfg.seed, vocab, CPU)
    batch = batch_of(vocab, 16, 16, padded)
    assert batch.padded == padded

    ref_loss, ref_grads = loss_and_grads(reference, objective, batch, "fp32")
    loss, grads = loss_and_grads(model, objective, batch, precision)

    assert loss == pytest.approx(ref_loss, rel=LOSS_RTOL[precision])
    assert ref_grads.keys() == grads.keys()
    largest = max(float(g.abs().max()) for g in ref_grads.values())
    errors = {name: float((grads[name] - g).abs().max()) / largest for name, g in ref_grads.items()}
    worst = max(errors, key=errors.get)
    assert errors[worst] < GRAD_TOL[precision], (
        f"{worst}: gradient error {errors[worst]:.2e} of the largest gradient ({device} {precision}, padded={padded})")


@cuda_only
def test_attention_runs_a_fused_kernel_on_cuda():
    model = build_pretraining_model(resolve_pretrain_run(small_config("model.n_heads=2")), 200).to(CUDA)
    unpadded_bf16 = attention_backend(model, 32, 64, padded=False, precision="bf16")
    padded_bf16 = attention_backend(model, 32, 64, padded=True, precision="bf16")
    padded_fp32 = attention_backend(model, 32, 64, padded=True, precision="fp32")
    print(f"attention kernels: unpadded bf16 {unpadded_bf16}, padded bf16 {padded_bf16}, padded fp32 {padded_fp32}")
    assert unpadded_bf16 in ("flash", "cudnn"), unpadded_bf16
    assert padded_bf16 in FUSED and padded_fp32 in FUSED, (padded_bf16, padded_fp32)


@cuda_only
def test_training_steps_on_cuda_sync_once_per_logging_window():
    cfg = small_config("training.log_every=5", "training.precision=bf16", "training.batch_size=16")
    _, trainer, objective = build_pretraining(resolve_pretrain_run(cfg), 200, CUDA)
    batches = [batch_of(200, 16, 16, padded=i % 2 == 1, seed=i) for i in range(20)]
    trainer.train_epoch(batches[:2], objective)  # warm-up: the allocator, cuBLAS handles, the first window
    trainer.state.epoch = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.train_epoch(batches, objective)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    print(f"{len(syncs)} synchronizing calls in 20 steps (4 logging windows): {syncs[:8]}")
    assert len(syncs) <= 4 + 1, syncs  # one read per window (+ the epoch's end)


@cuda_only
def test_pretraining_killed_on_cuda_resumes_to_the_uninterrupted_result(tmp_path):
    from helpers import PRETRAIN, killed, make_pretrain_inputs, ok, pretrain_args, run_stage, write_params

    inputs = make_pretrain_inputs(tmp_path / "inputs")
    work = tmp_path / "work"
    write_params(work, [o for o in PRETRAIN if not o.startswith("training.device")] + ["training.device=cuda"])
    reference, out = tmp_path / "reference", tmp_path / "interrupted"
    ok(run_stage("pretrain.py", pretrain_args(inputs, reference), work))
    killed(run_stage("pretrain.py", pretrain_args(inputs, out), work, kill_at=10))  # due at 9, saved at the window end
    resumed = ok(run_stage("pretrain.py", pretrain_args(inputs, out), work))
    assert "resuming at epoch 1, batch 10" in resumed.stderr

    from safetensors.torch import load_file

    left = load_file(str(reference / "model" / "model.safetensors"))
    right = load_file(str(out / "model" / "model.safetensors"))
    exact = all(torch.equal(left[k], right[k]) for k in left)
    worst = max(((left[k] - right[k]).abs().max().item(), k) for k in left)
    print(f"resume on CUDA: bit-exact {exact}; largest weight difference {worst[0]:.2e} ({worst[1]})")
    for name, tensor in left.items():
        torch.testing.assert_close(right[name], tensor, rtol=RESUME_RTOL, atol=RESUME_ATOL, msg=name)
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (reference, out))
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], float):
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-4), key


@cuda_only
def test_pretraining_on_one_and_two_workers_of_one_gpu_writes_the_same_bytes(tmp_path):
    """World-size invariance on CUDA (tests/test_worker_invariance.py on the CPU): 1 worker, then 2
    workers sharing the GPU (gloo, as NCCL refuses two ranks on one GPU), the same model and metrics."""
    import sys

    from helpers import MAX_LEN, make_pretrain_inputs, ok, pretrain_args, run_stage, write_params

    inputs = make_pretrain_inputs(tmp_path / "inputs")
    work = tmp_path / "work"
    write_params(work, ["model=tiny", f"representation.max_len={MAX_LEN}", "training.batch_size=8",
                        "training.micro_batches=2", "training.epochs=1", "training.accum_iters=2",
                        "training.pll_examples=2", "training.device=cuda"])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    outputs = {}
    for name, launcher in (("one", None), ("one again", None), ("two", torchrun)):
        out = tmp_path / name.replace(" ", "_")
        proc = ok(run_stage("pretrain.py", pretrain_args(inputs, out), work, launcher=launcher))
        assert f"{2 if launcher else 1} process(es)" in proc.stderr
        outputs[name] = out
    files = ("model/model.safetensors", "metrics.json")
    repeatable = all((outputs["one"] / f).read_bytes() == (outputs["one again"] / f).read_bytes() for f in files)
    same = {f: (outputs["one"] / f).read_bytes() == (outputs["two"] / f).read_bytes() for f in files}
    print(f"CUDA: one worker repeats its bytes: {repeatable}; 1 vs 2 workers byte-identical: {same}")
    if repeatable:  # the kernels are deterministic here: so is the worker count
        assert all(same.values()), same
    from safetensors.torch import load_file

    left, right = (load_file(str(outputs[n] / files[0])) for n in ("one", "two"))
    for key, tensor in left.items():
        torch.testing.assert_close(right[key], tensor, rtol=RESUME_RTOL, atol=RESUME_ATOL, msg=key)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_pretraining_with_the_pseudo_log_likelihood_on_trains_on_the_device(device, tmp_path):
    from helpers import MAX_LEN, make_pretrain_inputs
    from twilbert.data.pairs import load_shards
    from twilbert.reports.inspection import load_pretraining_model
    from twilbert.train.heldout import pseudo_log_likelihood
    from twilbert.train.pretrain import pretrain

    inputs = make_pretrain_inputs(tmp_path / "inputs")
    cfg = small_config(f"representation.max_len={MAX_LEN}", "training.precision=bf16", "training.pll_examples=4",
                       "training.epochs=1", "training.batch_size=16", device=device)
    metrics = pretrain(resolve_pretrain_run(cfg),
                       inputs / "pairs", inputs / "vocab", tmp_path / "model", tmp_path / "checkpoints")

    for key in ("heldout_mlm_loss", "heldout_rop_accuracy", "heldout_pll", "heldout_pseudo_perplexity"):
        assert math.isfinite(metrics[key]), (key, metrics)
    assert metrics["heldout_pll"] < 0 and metrics["heldout_pseudo_perplexity"] > 1
    # the bf16 PLL scores the saved model as fp32 does, within bf16 rounding of the log-probabilities
    model, _ = load_pretraining_model(tmp_path / "model")
    model.to(device)
    data = load_shards(inputs / "pairs" / "heldout")
    fp32 = pseudo_log_likelihood(model, data, 4, torch.device(device), "fp32")
    bf16 = pseudo_log_likelihood(model, data, 4, torch.device(device), "bf16")
    assert bf16["heldout_pll"] == pytest.approx(fp32["heldout_pll"], abs=0.05)


@pytest.fixture(scope="module", params=DEVICES)
def finetuned_bf16(request, tmp_path_factory):
    """A tiny model finetuned in bf16 on the device, with its metrics."""
    from finetune_data import make_config, make_pretrained, write_task
    from twilbert.train.finetune.stage_work import finetune_task

    root = tmp_path_factory.mktemp(f"finetune-{request.param}")
    pretrained = make_pretrained(root / "pretrained")
    cfg = make_config(compose_plain(["model=tiny"], REPO / "conf"), {"t": write_task(root / "task")}, epochs=2,
                      precision="bf16", device=request.param)
    metrics = finetune_task(cfg, cfg.tasks["t"], pretrained, root / "model", root / "results")
    return {"device": request.param, "model": root / "model", "pretrained": pretrained, "metrics": metrics}


def test_bf16_finetuning_trains_on_the_device(finetuned_bf16):
    from safetensors.torch import load_file

    metrics = finetuned_bf16["metrics"]
    assert 0.0 <= metrics["test"]["official"] <= 1.0 and math.isfinite(metrics["dev"]["official"]), metrics
    tuned = load_file(str(finetuned_bf16["model"] / "model.safetensors"))
    start = load_file(str(finetuned_bf16["pretrained"] / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in tuned.values())
    moved = [k for k in start if k in tuned and not torch.equal(tuned[k], start[k])]
    assert moved, "no encoder weight changed: the bf16 steps did not train"


def test_predict_on_the_device_gives_the_cpu_labels(finetuned_bf16):
    from twilbert.inference.predict import load_finetuned

    model, device = finetuned_bf16["model"], finetuned_bf16["device"]
    texts = [f"hola {'feliz ' * (i % 5)}odio el tráfico {i}" for i in range(300)]
    on_cpu = load_finetuned(model, device="cpu").scores(texts, batch_size=32)
    on_device = load_finetuned(model, device=device).scores(texts, batch_size=32)
    np.testing.assert_allclose(on_device, on_cpu, rtol=1e-4, atol=1e-5)
    top2 = np.sort(on_cpu, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-4  # a near-tie may fall either way on any two devices
    assert (on_device.argmax(1) == on_cpu.argmax(1))[clear].all()
    bf16 = load_finetuned(model, device=device).scores(texts, batch_size=32, precision="bf16")
    agree = float((bf16.argmax(1) == on_cpu.argmax(1)).mean())
    print(f"predict: {device} fp32 labels equal the CPU's; bf16 autocast agrees on {agree:.3f} of the texts")
    assert agree >= 0.9
