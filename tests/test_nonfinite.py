"""A NaN or infinite loss stops training with a message naming where, before the weights are touched;
the last good checkpoint stays intact and loadable; the stage script says so in one line (exit 2)."""

from __future__ import annotations

import math

import pytest
import torch

import twilbert.train.finetune.learners as finetune
from finetune_data import make_finetune_inputs
from helpers import MAX_LEN, make_pretrain_inputs, pretrain_args, run_stage, run_states, write_params
from twilbert.config import load_config
from twilbert.data.tokenizer import Tokenizer
from twilbert.train.checkpoint import latest_valid_checkpoint, load_training_checkpoint
from twilbert.train.finetune.stage_work import finetune_task
from twilbert.train.loop import NonFiniteLossError
from twilbert.train.pretrain import build_pretraining
from twilbert.train.pretrain_run import resolve_pretrain_run

pytestmark = pytest.mark.reliability


def test_a_blown_up_pretraining_stops_in_one_line_and_keeps_its_last_checkpoint(tmp_path):
    inputs = make_pretrain_inputs(tmp_path / "inputs")
    work = tmp_path / "work"
    # Adam at lr 1e30 moves every weight by ~1e30 in the first step: the second loss is NaN.
    raw = write_params(work, ["model=tiny", f"representation.max_len={MAX_LEN}", "training.batch_size=8",
                              "training.epochs=1", "training.lr=1e30", "training.max_grad_norm=null",
                              "training.checkpoint_every=1", "training.pll_examples=0", "training.device=cpu",
                              "runtime.workers=1"])  # one process: auto workers print a line per rank (known gap, issue 33)
    out = tmp_path / "out"
    proc = run_stage("pretrain.py", pretrain_args(inputs, out), work)

    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "pretrain: loss is nan at epoch 1, batch 2 (micro-batch 0, micro-step 2, optimizer step 1)" in errors[0]
    assert "is intact" in errors[0] and "Lower the learning rate" in errors[0]
    assert not (out / "model").exists() and not (out / "metrics.json").exists()

    # The checkpoint of micro-step 1 (after the first, finite step) verifies and loads.
    path = latest_valid_checkpoint(run_states(out / "checkpoints"))
    assert path is not None and path.name == "step-00000001"
    model, trainer, _ = build_pretraining(resolve_pretrain_run(load_config(raw)),
                                          Tokenizer(inputs / "vocab").vocab_size, torch.device("cpu"))
    state = load_training_checkpoint(path, model, trainer.optimizer, trainer.scheduler)
    assert (state["micro_steps"], state["optimizer_steps"]) == (1, 1)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_nan_loss_in_finetuning_stops_names_epoch_and_batch_and_the_run_resumes_from_its_last_checkpoint(
        tmp_path, monkeypatch, caplog):
    inputs = tmp_path
    _, task = make_finetune_inputs(inputs)
    raw = write_params(tmp_path / "work", ["model=tiny", f"representation.max_len={MAX_LEN}"], tasks={"t": task},
                       finetuning={"epochs": 2, "batch_size": 16, "device": "cpu", "baseline_row": False})
    cfg = load_config(raw)
    calls = []
    real_loss = finetune.SummedLoss

    class Poisoned(real_loss):
        def numerator(self, logits, labels):
            calls.append(1)
            value = super().numerator(logits, labels)
            # 2 micro-batches a global batch, 3 global batches an epoch: epoch 2, batch 2, micro-batch 0
            return value * math.nan if len(calls) == 9 else value

    monkeypatch.setattr(finetune, "SummedLoss", Poisoned)
    out = tmp_path / "out"
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at epoch 2, batch 2 \(micro-batch 0, micro-step 5"):
        finetune_task(cfg, cfg.tasks["t"], inputs / "pretrained", out / "model", out / "results",
                      checkpoint_dir=out / "checkpoints")
    assert not (out / "model").exists() and not (out / "results").exists()
    assert latest_valid_checkpoint(run_states(out / "checkpoints")).name == "step-00000003"  # epoch 1's end

    monkeypatch.setattr(finetune, "SummedLoss", real_loss)  # the cause fixed, the same run goes on
    with caplog.at_level("INFO"):
        metrics = finetune_task(cfg, cfg.tasks["t"], inputs / "pretrained", out / "model", out / "results",
                                checkpoint_dir=out / "checkpoints")
    assert "resuming at epoch 2, batch 0" in caplog.text
    assert metrics["epochs_run"] == 2 and math.isfinite(metrics["test"]["official"])
