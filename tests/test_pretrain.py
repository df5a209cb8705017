"""Pretraining: the loss falls, MLM-only mode, accumulation, Noam per optimizer step, PLL, continuing."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import REPO, make_tweets
from twilbert.config import VocabConfig, compose, load_config
from twilbert.data.batch import batch_of, make_batch, pack_pairs
from twilbert.data.pairs import build_pair_shards, load_shards
from twilbert.data.special import MASK_ID, N_SPECIAL
from twilbert.data.tokenizer import Tokenizer, train_vocab
from twilbert.model.io import load_pretrained_state
from twilbert.train.heldout import pseudo_log_likelihood
from twilbert.train.pretrain import build_pretraining, pretrain
from twilbert.train.pretrain_run import resolve_pretrain_run


class RecordingTracker:
    """Stands in for MLflow: keeps the per-epoch metrics the stage logs."""

    def __init__(self):
        self.epochs = []

    def log_metrics(self, metrics, step=None):
        if "epoch" in metrics:
            self.epochs.append(dict(metrics))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    train_vocab([t for t, _ in make_tweets(200)], root / "vocab", VocabConfig(vocab_size=120))
    tokenizer = Tokenizer(root / "vocab")
    build_pair_shards([(t, None) for t, _ in make_tweets(160, seed=1)], tokenizer, root / "pairs", max_len=12,
                      heldout_fraction=0.1, shard_size=1000, seed=0)
    return root


def configure(raw, **training):
    raw = {**raw, "training": {**raw["training"], **training}}
    return load_config(raw)


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory):
    """Three epochs of the real stage function on the tiny corpus."""
    raw = compose(["model=tiny", "representation.max_len=12", "training.batch_size=16", "training.epochs=3",
                   "training.lr=0.003", "training.pll_examples=8"], REPO / "conf")
    out = tmp_path_factory.mktemp("run")
    tracker = RecordingTracker()
    cfg = configure(raw)
    metrics = pretrain(resolve_pretrain_run(cfg), corpus / "pairs", corpus / "vocab", out / "model", out / "checkpoints", tracker,
                       curves_dir=out / "curves")
    vocab = Tokenizer(corpus / "vocab").vocab_size
    return dict(raw=raw, cfg=cfg, metrics=metrics, epochs=tracker.epochs, out=out, vocab=vocab)


def test_pretraining_lowers_the_mlm_loss_across_epochs(run):
    losses = [e["train_mlm_loss"] for e in run["epochs"]]
    assert len(losses) == 3
    assert losses[-1] < losses[0] - 0.1, losses
    assert run["epochs"][-1]["heldout_mlm_loss"] < run["epochs"][0]["heldout_mlm_loss"]


def test_the_curves_per_epoch_and_per_logged_step_are_written_for_dvc_plots(run):
    import csv

    with open(run["out"] / "curves" / "epochs.csv", newline="") as fh:
        epochs = list(csv.DictReader(fh))
    assert [int(r["epoch"]) for r in epochs] == [1, 2, 3]
    assert float(epochs[-1]["train_mlm_loss"]) == pytest.approx(run["epochs"][-1]["train_mlm_loss"])
    for key in ("train_loss", "heldout_mlm_loss", "heldout_mlm_accuracy", "heldout_rop_accuracy", "train_rop_accuracy"):
        assert key in epochs[0]
    with open(run["out"] / "curves" / "steps.csv", newline="") as fh:
        steps = list(csv.DictReader(fh))
    log_every = run["cfg"].training.log_every
    assert steps and all(int(r["step"]) % log_every == 0 for r in steps)
    assert [int(r["step"]) for r in steps] == sorted(int(r["step"]) for r in steps)
    assert all(0.0 <= float(r["running_mlm_accuracy"]) <= 1.0 and 0.0 <= float(r["running_rop_accuracy"]) <= 1.0
               for r in steps if r["running_mlm_accuracy"])
    assert all(math.isfinite(float(r["loss"])) for r in steps)


def test_last_and_best_checkpoints_and_the_best_model_are_written(run):
    out = run["out"]
    best_epoch = run["metrics"]["epoch"]
    card, _ = load_pretrained_state(out / "checkpoints" / "best")
    assert card.epoch == best_epoch
    assert load_pretrained_state(out / "checkpoints" / "last")[0].epoch == 3
    assert {"model.safetensors", "config.json", "spm.model", "meta.json"} <= {p.name for p in (out / "model").iterdir()}


def test_pretrain_metrics_hold_heldout_accuracy_perplexity_rop_and_a_finite_pll(run):
    m = run["metrics"]
    for key in ("heldout_mlm_accuracy", "heldout_perplexity", "heldout_rop_accuracy", "heldout_pll",
                "heldout_pseudo_perplexity"):
        assert math.isfinite(m[key]), key
    assert m["heldout_pll"] < 0 and m["heldout_pseudo_perplexity"] > 1
    assert math.isclose(m["heldout_perplexity"], math.exp(m["heldout_mlm_loss"]))


def test_mlm_only_pretraining_when_rop_is_disabled(run, corpus, tmp_path):
    raw = {**run["raw"], "model": {**run["raw"]["model"], "rop": {**run["raw"]["model"]["rop"], "enabled": False}}}
    cfg = configure(raw, epochs=1)
    metrics = pretrain(resolve_pretrain_run(cfg), corpus / "pairs", corpus / "vocab", tmp_path / "model", tmp_path / "ck")
    assert not [k for k in metrics if "rop" in k]
    assert math.isfinite(metrics["heldout_mlm_accuracy"]) and math.isfinite(metrics["heldout_pll"])
    card, state = load_pretrained_state(tmp_path / "model")
    assert card.model.rop.enabled is False
    assert not [k for k in state if k.startswith("rop_classifier")]


def full_rows(n, vocab, max_len, seed):
    """n rows of equal, unpadded length: every row gets the same number of masked tokens."""
    rng = np.random.default_rng(seed)
    a = rng.integers(N_SPECIAL, vocab, (n, max_len)).tolist()
    b = rng.integers(N_SPECIAL, vocab, (n, max_len)).tolist()
    packed = pack_pairs(a, b, max_len)
    return packed["input_ids"], packed["len_a"], packed["length"], rng.integers(0, 2, n)


def test_gradient_accumulation_over_k_batches_equals_one_batch_k_times_larger_under_sgd(run):
    raw = {**run["raw"], "model": {**run["raw"]["model"], "input_dropout": 0.0, "output_dropout": 0.0,
                                   "masked_lm": {**run["raw"]["model"]["masked_lm"], "type": "word"}}}
    k, b, vocab = 2, 4, run["vocab"]
    rows = full_rows(k * b, vocab, 12, seed=3)
    big = make_batch(*rows)
    small = [make_batch(*(r[i * b : (i + 1) * b] for r in rows)) for i in range(k)]

    params = []
    for accum, batches in ((k, small), (1, [big])):
        cfg = configure(raw, optimizer="sgd", lr=0.5, weight_decay=0.0, accum_iters=accum, max_grad_norm=None)
        model, trainer, objective = build_pretraining(resolve_pretrain_run(cfg), vocab, torch.device("cpu"))
        masked, labels = objective.mask(big, 0, 0)  # one draw for all rows: both runs see the same masks
        parts = iter([(masked, labels)] if accum == 1 else
                     [(masked[i * b : (i + 1) * b], labels[i * b : (i + 1) * b]) for i in range(k)])
        trainer.train_epoch(batches, lambda m, batch, objective=objective, parts=parts:
                            objective.outputs(m, batch, *next(parts)))
        assert trainer.state.optimizer_steps == 1
        params.append(dict(model.named_parameters()))
    accumulated, single = params
    assert (labels != -100).sum(1).unique().numel() == 1  # every row, hence every micro-batch, masks as many
    for name, p in single.items():
        torch.testing.assert_close(accumulated[name], p, rtol=1e-5, atol=1e-6, msg=name)
    start = build_pretraining(resolve_pretrain_run(configure(raw)), vocab, torch.device("cpu")).model
    assert not torch.equal(start.twilbert.encoder.layers[0].ffn.weight, single["twilbert.encoder.layers.0.ffn.weight"])


def test_noam_schedule_advances_once_per_optimizer_step_not_per_micro_batch(run):
    cfg = configure(run["raw"], noam_annealing=True, warmup_steps=3, accum_iters=2, max_grad_norm=None)
    model, trainer, objective = build_pretraining(resolve_pretrain_run(cfg), run["vocab"], torch.device("cpu"))
    used = []
    trainer.optimizer.register_step_pre_hook(lambda opt, args, kwargs: used.append(opt.param_groups[0]["lr"]))
    rows = full_rows(12, run["vocab"], 8, seed=0)
    batches = [make_batch(*(r[i * 2 : (i + 1) * 2] for r in rows)) for i in range(6)]
    trainer.train_epoch(batches, objective)
    # H = 64, warmup 3: lr_t = 64^-0.5 * min(t^-0.5, t * 3^-1.5)
    assert trainer.state.optimizer_steps == 3 and trainer.state.micro_steps == 6
    np.testing.assert_allclose(used, [0.0240563, 0.0481125, 0.0721688], rtol=1e-5)


def test_pll_equals_masking_each_token_in_turn_one_forward_at_a_time(run, corpus):
    cfg = run["cfg"]
    model, _, _ = build_pretraining(resolve_pretrain_run(cfg), run["vocab"], torch.device("cpu"))
    model.eval()
    data = load_shards(corpus / "pairs" / "heldout")
    rows = data.originals(3)
    got = pseudo_log_likelihood(model, data, 3, torch.device("cpu"), chunk=7)  # chunks cut across rows

    per_example, total, count = [], 0.0, 0
    with torch.no_grad():
        for r in rows:
            batch = batch_of(data, [r])
            ids = batch.input_ids[0]
            lls = []
            for t in (~batch.special_mask[0]).nonzero().flatten().tolist():
                masked = ids.clone()
                masked[t] = MASK_ID
                labels = torch.full_like(ids, -100)
                labels[t] = ids[t]
                out = model(masked[None], batch.segment_ids, batch.attention_mask, labels[None])
                lls.append(F.log_softmax(out.mlm_logits, -1)[0, ids[t]].item())
            per_example.append(np.mean(lls))
            total, count = total + sum(lls), count + len(lls)
    assert got["heldout_pll"] == pytest.approx(np.mean(per_example), abs=1e-5)
    assert got["heldout_pseudo_perplexity"] == pytest.approx(math.exp(-total / count), rel=1e-5)


def test_path_initial_weights_continues_from_the_saved_weights(run):
    saved = load_pretrained_state(run["out"] / "model")[1]
    fresh = build_pretraining(resolve_pretrain_run(run["cfg"]), run["vocab"], torch.device("cpu")).model.state_dict()
    cfg = configure(run["raw"], path_initial_weights=str(run["out"] / "model"))
    model = build_pretraining(resolve_pretrain_run(cfg), run["vocab"], torch.device("cpu")).model
    state = model.state_dict()
    assert state.keys() == saved.keys()
    for name, tensor in saved.items():
        assert torch.equal(state[name], tensor), name
    assert not torch.equal(fresh["twilbert.encoder.layers.0.ffn.weight"], saved["twilbert.encoder.layers.0.ffn.weight"])


def test_continued_pretraining_starts_from_the_saved_model_metrics(run, corpus, tmp_path):
    """One more epoch at a negligible learning rate ends where the saved model was."""
    cfg = configure(run["raw"], path_initial_weights=str(run["out"] / "model"), epochs=1, lr=1e-9)
    metrics = pretrain(resolve_pretrain_run(cfg), corpus / "pairs", corpus / "vocab", tmp_path / "model", tmp_path / "ck")
    best = run["metrics"]
    assert metrics["heldout_mlm_loss"] == pytest.approx(best["heldout_mlm_loss"], abs=1e-4)
    assert metrics["heldout_pll"] == pytest.approx(best["heldout_pll"], abs=1e-4)


def run_quick_benchmark(bf16: str) -> tuple[str, dict]:
    """The throughput benchmark at its smoke-run sizes: (stdout, the figures of its JSON line)."""
    cmd = [sys.executable, "benchmarks/pretrain_throughput.py", "--quick", "--steps", "1", "--batch", "4",
           "--bf16", bf16]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, json.loads(done.stdout.strip().splitlines()[-1])


def test_throughput_benchmark_quick_mode_ends_with_the_json_line():
    # --bf16 on: at these sizes even emulated bf16 (a CPU without bf16 instructions) takes seconds
    _, figures = run_quick_benchmark("on")
    assert isinstance(figures.pop("native_bf16"), bool)
    speeds = {"hf_fp32_tok_s", "ours_fp32_tok_s", "hf_bf16_tok_s", "ours_bf16_tok_s", "ours_pkm_fp32_tok_s",
              "ours_pkm_bf16_tok_s", "ratio_fp32", "ratio_bf16", "mfu_fp32", "mfu_bf16"}
    assert speeds <= set(figures)  # beside them: the host, its load, the matmul peaks and kernels used
    assert all(figures[k] > 0 for k in speeds)


def test_throughput_benchmark_without_bf16_reports_nulls_and_says_why():
    stdout, figures = run_quick_benchmark("off")
    assert "bf16 skipped" in stdout
    assert all(figures[k] is None for k in figures if "bf16" in k and k != "native_bf16")
    assert figures["ratio_fp32"] > 0 and figures["mfu_fp32"] > 0


def test_real_lengths_benchmark_times_grouped_and_random_batches_and_ends_with_the_json_line(corpus):
    cmd = [sys.executable, "benchmarks/pretrain_throughput.py", "--quick", "--steps", "1", "--rounds", "1",
           "--real-lengths", str(corpus / "pairs"), "--batches", "4", "8"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    for key in ("real_tok_per_s_ours", "real_tok_per_s_ours_random", "real_tok_per_s_hf", "real_tok_per_s_hf_grouped"):
        assert figures[key] > 0 and figures["by_batch"]["8"][key] > 0
    assert 0 <= figures["padding_share_ours"] < figures["padding_share_random"]


def test_pretraining_reads_memory_mapped_shards_and_never_materializes_them(corpus, run, tmp_path, monkeypatch):
    """Every shard the stage opens is np.load'ed with mmap_mode='r' and held as np.memmap."""
    from twilbert.data import shards as shards_module

    loads, opened = [], []
    real_load, real_init = np.load, shards_module.PairShards.__init__

    def spying_load(path, *args, **kwargs):
        loads.append((str(path), kwargs.get("mmap_mode")))
        return real_load(path, *args, **kwargs)

    def recording_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        opened.append(self)

    monkeypatch.setattr(np, "load", spying_load)
    monkeypatch.setattr(shards_module.PairShards, "__init__", recording_init)
    cfg = configure(run["raw"], epochs=1, pll_examples=2)
    pretrain(resolve_pretrain_run(cfg), corpus / "pairs", corpus / "vocab", tmp_path / "model", tmp_path / "ck")

    shard_loads = [(p, mode) for p, mode in loads if p.endswith(".npy")]
    assert shard_loads and all(mode == "r" for _, mode in shard_loads), shard_loads
    assert {Path(p).parent.name for p, _ in shard_loads} == {"train", "heldout"}
    assert len(opened) == 2
    held = [a for shards in opened for a in shards.open_arrays()]
    assert held and all(isinstance(a, np.memmap) for a in held)


@pytest.mark.reliability
def test_without_a_held_out_score_the_last_epoch_is_published_and_the_rule_is_logged(corpus, tmp_path, caplog):
    # 10 rows, a batch of 64, no held-out pair (a corpus too small for pairs.heldout_fraction): no epoch has
    # a held-out score
    build_pair_shards([(t, None) for t, _ in make_tweets(10, seed=4)], Tokenizer(corpus / "vocab"), tmp_path / "pairs",
                      max_len=12, heldout_fraction=0.0, shard_size=1000, seed=0)
    raw = compose(["model=tiny", "representation.max_len=12", "training.batch_size=64", "training.epochs=3",
                   "training.lr=0.003", "training.pll_examples=0", "training.device=cpu"], REPO / "conf")
    with caplog.at_level("INFO"):
        metrics = pretrain(resolve_pretrain_run(load_config(raw)),
                           tmp_path / "pairs", corpus / "vocab", tmp_path / "model", tmp_path / "ck")
    assert "heldout_mlm_loss" not in metrics
    assert metrics["epoch"] == 3  # not epoch 1, which an unset score would leave standing
    assert "selection rule: last epoch" in caplog.text
    _, published = load_pretrained_state(tmp_path / "model")
    _, last = load_pretrained_state(tmp_path / "ck" / "last")
    assert published.keys() == last.keys() and all(torch.equal(published[k], last[k]) for k in published)
