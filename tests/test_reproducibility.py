"""Same config, same seed: two full pretrain + finetune runs give identical weights and metrics (CPU)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from finetune_data import write_task
from helpers import PRETRAIN, REPO, assert_same_weights, make_pretrain_inputs
from twilbert.config import compose, load_config
from twilbert.train.finetune.stage_work import finetune_task
from twilbert.train.pretrain import pretrain
from twilbert.train.pretrain_run import resolve_pretrain_run

pytestmark = pytest.mark.reliability


def full_run(inputs, task, out):
    """pretrain -> finetune, as the stages chain them, into ``out``."""
    raw = compose(PRETRAIN, REPO / "conf")  # dropout 0.1 in the encoder: the torch RNG matters
    raw["tasks"] = {"t": task}
    raw["finetuning"].update(epochs=2, batch_size=16, dropout=0.1, device="cpu", baseline_row=False)
    cfg = load_config(raw)
    pretrain_metrics = pretrain(resolve_pretrain_run(cfg),
                                inputs / "pairs", inputs / "vocab", out / "pretrained", out / "ck" / "pretrain")
    finetune_metrics = finetune_task(cfg, cfg.tasks["t"], out / "pretrained", out / "finetuned", out / "results",
                                     checkpoint_dir=out / "ck" / "finetune")
    return pretrain_metrics, finetune_metrics


def test_two_runs_with_the_same_seed_give_identical_weights_and_metrics(tmp_path):
    inputs = make_pretrain_inputs(tmp_path / "inputs")
    task = write_task(tmp_path / "task")
    first = full_run(inputs, task, tmp_path / "first")
    # Whatever ran before in the process (here: draws from every global RNG) must not matter.
    random.random(), np.random.rand(3), torch.rand(3)
    second = full_run(inputs, task, tmp_path / "second")

    assert first == second
    for model in ("pretrained", "finetuned"):
        assert_same_weights(tmp_path / "first" / model / "model.safetensors",
                            tmp_path / "second" / model / "model.safetensors")
    for name in ("metrics.json", "epochs.csv"):
        first_file, second_file = (tmp_path / run / "results" / name for run in ("first", "second"))
        assert first_file.read_text() == second_file.read_text(), name
    # and the seed matters: the metrics are not identical by accident
    raw = compose([*PRETRAIN, "seed=7"], REPO / "conf")
    other = pretrain(resolve_pretrain_run(load_config(raw)),
                     inputs / "pairs", inputs / "vocab", tmp_path / "other", tmp_path / "ck-other")
    assert other["heldout_mlm_loss"] != first[0]["heldout_mlm_loss"]
