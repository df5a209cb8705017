"""The GPU path checked against the CPU one (marker ``gpu``; skipped without CUDA). Run by
scripts/device_check.sh on a machine with a GPU.

- forward and backward of the pretraining model on CUDA equal the CPU's: within fp32 rounding with
  TF32 off, and within bf16 rounding under autocast;
- the attention kernel SDPA picks is a fused one (flash or cuDNN without padding in bf16), never math;
- training steps ask the device for nothing but the once-per-window read (``set_sync_debug_mode``);
- a pretraining run killed on CUDA and rerun ends where an uninterrupted run ends (CUDA kernels are not
  bit-deterministic here: atomics in the embedding backward; the tolerance is stated below);
- one NCCL DDP rank trains the same step as the plain model;
- predict on CUDA gives the CPU's labels.
"""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pytest
import torch

from twilbert.config import compose, load_config
from twilbert.data.batch import make_batch, pack_pairs
from twilbert.data.special import N_SPECIAL
from twilbert.model.kernels import FUSED, attention_backend
from twilbert.train.loop import Trainer
from twilbert.train.pretrain import PretrainObjective, build_pretraining, build_pretraining_model

from helpers import REPO, free_port

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/device_check.sh)")]

CUDA = torch.device("cuda")
CPU = torch.device("cpu")
# Resumed against uninterrupted on CUDA: the same steps, but atomics reorder float sums (embedding and
# index backward), so weights agree to about fp32 rounding amplified by a few Adam steps.
RESUME_RTOL, RESUME_ATOL = 1e-3, 1e-5


def small_config(*overrides: str):
    return load_config(compose(["model=tiny", "representation.max_len=16", "model.input_dropout=0.0",
                                "model.output_dropout=0.0", "training.device=cuda", *overrides], REPO / "conf"))


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
    return float(loss), {n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("precision,rtol", [("fp32", 1e-4), ("bf16", 3e-2)])
@pytest.mark.parametrize("padded", [False, True])
def test_forward_and_backward_on_cuda_match_the_cpu(precision, rtol, padded):
    cfg = small_config()
    vocab = 200
    cpu_model = build_pretraining_model(cfg, vocab).train()
    cuda_model = copy.deepcopy(cpu_model).to(CUDA)
    objective = PretrainObjective(cfg.model.masked_lm, cfg.seed, vocab, CPU)
    batch = batch_of(vocab, 16, 16, padded)
    assert batch.padded == padded

    cpu_loss, cpu_grads = loss_and_grads(cpu_model, objective, batch, "fp32")
    cuda_loss, cuda_grads = loss_and_grads(cuda_model, objective, batch, precision)

    assert cuda_loss == pytest.approx(cpu_loss, rel=rtol)
    assert cpu_grads.keys() == cuda_grads.keys()
    for name, g in cpu_grads.items():
        scale = g.abs().max().clamp_min(1e-6)
        err = (cuda_grads[name] - g).abs().max() / scale
        assert err < rtol * 10, f"{name}: relative gradient error {err:.2e} ({precision}, padded={padded})"


def test_attention_runs_a_fused_kernel_on_cuda():
    model = build_pretraining_model(small_config("model.n_heads=2"), 200).to(CUDA)
    unpadded_bf16 = attention_backend(model, 32, 64, padded=False, precision="bf16")
    padded_bf16 = attention_backend(model, 32, 64, padded=True, precision="bf16")
    padded_fp32 = attention_backend(model, 32, 64, padded=True, precision="fp32")
    print(f"attention kernels: unpadded bf16 {unpadded_bf16}, padded bf16 {padded_bf16}, padded fp32 {padded_fp32}")
    assert unpadded_bf16 in ("flash", "cudnn"), unpadded_bf16
    assert padded_bf16 in FUSED and padded_fp32 in FUSED, (padded_bf16, padded_fp32)


def test_training_steps_on_cuda_sync_once_per_logging_window():
    cfg = small_config("training.log_every=5", "training.precision=bf16", "training.batch_size=16")
    _, trainer, objective = build_pretraining(cfg, 200, CUDA)
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


def test_pretraining_killed_on_cuda_resumes_to_the_uninterrupted_result(tmp_path):
    from helpers import PRETRAIN, killed, make_pretrain_inputs, ok, pretrain_args, run_stage, write_params

    inputs = make_pretrain_inputs(tmp_path / "inputs")
    work = tmp_path / "work"
    write_params(work, [o for o in PRETRAIN if not o.startswith("training.device")] + ["training.device=cuda"])
    reference, out = tmp_path / "reference", tmp_path / "interrupted"
    ok(run_stage("pretrain.py", pretrain_args(inputs, reference), work))
    killed(run_stage("pretrain.py", pretrain_args(inputs, out), work, kill_at=9))
    resumed = ok(run_stage("pretrain.py", pretrain_args(inputs, out), work))
    assert "resuming at epoch 1, batch 9" in resumed.stderr

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


def test_one_nccl_rank_trains_the_same_step_as_the_plain_model(monkeypatch):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    cfg = small_config()
    plain, plain_trainer, objective = build_pretraining(cfg, 200, CUDA)
    twin = copy.deepcopy(plain)
    batch = batch_of(200, 16, 16, padded=True)
    plain_trainer.train_step(batch, objective)

    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(twin, device_ids=[CUDA.index or 0])
        from twilbert.train.optim import build_optimizer, param_groups

        optimizer = build_optimizer("adam", param_groups(twin, cfg.training.lr, cfg.training.weight_decay),
                                    cfg.training.lr, cfg.training.weight_decay)
        trainer = Trainer(ddp, optimizer, None, max_grad_norm=cfg.training.max_grad_norm, device=CUDA)
        ranked = PretrainObjective(cfg.model.masked_lm, cfg.seed, 200, CUDA, rank=0)
        # rank 0 of one draws the masks of (epoch, step, rank): the plain run drew (epoch, step)
        ranked.mask = lambda b, *keys: objective.mask(b, *keys[:2])
        trainer.train_step(batch, ranked)
        trainer.flush()
    finally:
        dist.destroy_process_group()
    for (name, p), q in zip(plain.named_parameters(), twin.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)


def test_predict_on_cuda_gives_the_cpu_labels(tmp_path):
    from finetune_data import make_config, make_pretrained, write_task
    from twilbert.predict import load_finetuned
    from twilbert.train.finetune_stage import finetune_task

    pretrained = make_pretrained(tmp_path / "pretrained")
    cfg = make_config(compose(["model=tiny"], REPO / "conf"), {"t": write_task(tmp_path / "task")}, epochs=2)
    finetune_task(cfg, cfg.tasks["t"], pretrained, tmp_path / "model", tmp_path / "results")
    texts = [f"hola {'feliz ' * (i % 5)}odio el tráfico {i}" for i in range(300)]
    on_cpu = load_finetuned(tmp_path / "model", device="cpu").scores(texts, batch_size=32)
    on_cuda = load_finetuned(tmp_path / "model", device="cuda").scores(texts, batch_size=32)
    np.testing.assert_allclose(on_cuda, on_cpu, rtol=1e-4, atol=1e-5)
    top2 = np.sort(on_cpu, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-4  # a near-tie may fall either way on any two devices
    assert (on_cuda.argmax(1) == on_cpu.argmax(1))[clear].all()
    bf16 = load_finetuned(tmp_path / "model", device="cuda").scores(texts, batch_size=32, precision="bf16")
    agree = float((bf16.argmax(1) == on_cpu.argmax(1)).mean())
    print(f"predict: CUDA fp32 labels equal the CPU's; bf16 autocast agrees on {agree:.3f} of the texts")
    assert agree >= 0.9
