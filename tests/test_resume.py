"""Exact resume: a stage killed with SIGKILL mid-epoch, right after a checkpoint (which falls at the end
of an accumulation window), then rerun with the same command, ends with the weights and metrics of a
run that was never interrupted (CPU, bit for bit).

The kill comes from the loop's test hook ``TWILBERT_TEST_KILL_AT_MICRO_STEP=k``: the process sends
itself SIGKILL right after saving the checkpoint of micro-step k, as an OOM kill or a lost node
would stop it (no handler, no cleanup). The stage-running helpers are in helpers.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import pytest
import torch

from finetune_data import make_finetune_inputs
from helpers import (
    MAX_LEN,
    PRETRAIN,
    REPO,
    assert_same_weights,
    finetune_args,
    killed,
    make_pretrain_inputs,
    ok,
    pretrain_args,
    run_stage,
    run_states,
    steps,
    write_params,
)
from twilbert.config import compose
from twilbert.train.pretrain_run import resolve_pretrain_run

pytestmark = pytest.mark.reliability

# 48 training rows, batch 8: 6 micro-steps an epoch; early stopping with patience 2 over up to 5 epochs.
FINETUNE = {"epochs": 5, "patience": 2, "batch_size": 8, "accum_iters": 2, "checkpoint_every": 3, "lr": 3e-2,
            "dropout": 0.1, "device": "cpu", "baseline_row": False}


def trainer_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "trainer.json").read_text())["state"]


@pytest.fixture(scope="module")
def pretrain_inputs(tmp_path_factory):
    return make_pretrain_inputs(tmp_path_factory.mktemp("pretrain-inputs"))


# --------------------------------------------------------------------------------------------
# Pretraining
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_pretrain_killed_mid_epoch_resumes_bit_for_bit_and_passes_over_a_truncated_checkpoint(
        pretrain_inputs, tmp_path):
    work = tmp_path / "work"
    # length-grouped batches are the default: the resumed epoch must rebuild its window's batch order
    assert write_params(work, PRETRAIN)["training"]["length_grouping"] is True
    reference = tmp_path / "reference"
    ok(run_stage("pretrain.py", pretrain_args(pretrain_inputs, reference), work))

    out = tmp_path / "interrupted"
    args = pretrain_args(pretrain_inputs, out)
    # Checkpoints are due every 3 micro-steps; one due inside a window of 2 waits for its end: the one
    # due at micro-step 9 is saved at 10 (epoch 1, masks continued at step 11).
    killed(run_stage("pretrain.py", args, work, kill_at=10))
    states = run_states(out / "checkpoints")
    assert steps(states) == ["step-00000006", "step-00000010"]
    state = trainer_state(states / "step-00000010")
    assert (state["epoch"], state["batch_in_epoch"], state["accum_position"]) == (0, 10, 0)
    assert not (states / "step-00000010" / "gradients.safetensors").exists()
    assert not (out / "model").exists()

    resumed = ok(run_stage("pretrain.py", args, work))  # the same command
    assert "resuming at epoch 1, batch 10" in resumed.stderr
    assert_same_weights(reference / "model" / "model.safetensors", out / "model" / "model.safetensors")
    assert json.loads((reference / "metrics.json").read_text()) == json.loads((out / "metrics.json").read_text())

    # The run's last checkpoints are micro-steps 24 (epoch 2, batch 10) and 28 (the end; due at 27).
    # Truncate 28: rerun, the stage reports it, resumes 24, and ends at the same weights once more.
    # (As a stage, not in this process: 4 micro-steps retrained need the stage's pinned numerics.)
    assert steps(states) == ["step-00000024", "step-00000028"]
    assert all(trainer_state(states / s)["accum_position"] == 0 for s in steps(states))
    newest = states / "step-00000028" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    shutil.rmtree(out / "model")
    (out / "metrics.json").unlink()  # both rewritten by the rerun
    again = ok(run_stage("pretrain.py", args, work))
    assert "step-00000028" in again.stderr and "model.safetensors: sha256 differs" in again.stderr
    assert "resuming at epoch 2, batch 10" in again.stderr
    assert_same_weights(reference / "model" / "model.safetensors", out / "model" / "model.safetensors")
    # the best epoch is the second, resumed mid-epoch: its train_* sums began in the checkpoint
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads((reference / "metrics.json").read_text()) and metrics["epoch"] == 2


def test_pretrain_rerun_with_a_changed_config_starts_fresh_in_a_run_folder_of_its_own_and_says_so(
        pretrain_inputs, tmp_path, caplog):
    from twilbert.config import load_config
    from twilbert.train.pretrain import pretrain

    raw = compose([*PRETRAIN, "training.epochs=1", "training.checkpoint_every=0", "training.pll_examples=0"],
                  REPO / "conf")
    out = tmp_path / "out"
    pretrain(resolve_pretrain_run(load_config(raw)),
             pretrain_inputs / "pairs", pretrain_inputs / "vocab", out / "model", out / "ck")
    assert steps(run_states(out / "ck")) == ["step-00000014"]

    raw["training"]["lr"] = raw["training"]["lr"] / 2
    with caplog.at_level("INFO"):
        pretrain(resolve_pretrain_run(load_config(raw)),
                 pretrain_inputs / "pairs", pretrain_inputs / "vocab", out / "model", out / "ck")
    assert "the config changed" in caplog.text and "starting fresh" in caplog.text
    runs = sorted((out / "ck").glob("run-*"))
    assert len(runs) == 2  # the first run's checkpoints are untouched: going back to it continues it
    assert all(trainer_state(run / "train_state" / "step-00000014")["epoch"] == 1 for run in runs)


# --------------------------------------------------------------------------------------------
# Finetuning
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_finetune_killed_mid_epoch_resumes_bit_for_bit_with_its_best_epoch_and_patience(tmp_path):
    pretrained, task = make_finetune_inputs(tmp_path)
    work = tmp_path / "work"
    write_params(work, ["model=tiny", f"representation.max_len={MAX_LEN}"], tasks={"t": task}, finetuning=FINETUNE)
    ok(run_stage("finetune.py", finetune_args(tmp_path, tmp_path / "reference"), work))
    reference = json.loads((tmp_path / "reference" / "results" / "metrics.json").read_text())

    out = tmp_path / "interrupted"
    # Micro-step 16: epoch 3, batch 4 (due at 15, saved at its window's end); epochs 1-2 (and their
    # best) are behind it.
    killed(run_stage("finetune.py", finetune_args(tmp_path, out), work, kill_at=16))
    state = trainer_state(run_states(out / "checkpoints") / "step-00000016")
    assert (state["epoch"], state["batch_in_epoch"], state["accum_position"]) == (2, 4, 0)
    assert len(state["history"]) == 2 and state["best"]["epoch"] in (1, 2)
    resumed = ok(run_stage("finetune.py", finetune_args(tmp_path, out), work))
    assert "resuming at epoch 3, batch 4" in resumed.stderr

    assert_same_weights(tmp_path / "reference" / "model" / "model.safetensors", out / "model" / "model.safetensors")
    for name in ("metrics.json", "epochs.csv"):
        assert (tmp_path / "reference" / "results" / name).read_text() == (out / "results" / name).read_text(), name
    # the reference stopped early after the kill point, so the restored patience counter mattered
    assert reference["epochs_run"] < FINETUNE["epochs"] and reference["epochs_run"] >= 3, reference


@pytest.mark.slow
def test_finetune_killed_while_writing_a_checkpoint_replays_from_the_previous_one_bit_for_bit(tmp_path):
    """The kill lands between two durable checkpoints (here: while the newer one was being written,
    so it is truncated): the work after the older one is lost and replayed exactly, mid-epoch."""
    pretrained, task = make_finetune_inputs(tmp_path)
    work = tmp_path / "work"
    # checkpoint_every does not change the trajectory, so the reference needs no checkpoints at all.
    write_params(work, ["model=tiny", f"representation.max_len={MAX_LEN}"], tasks={"t": task},
                 finetuning={**FINETUNE, "checkpoint_every": 1})
    ok(run_stage("finetune.py", finetune_args(tmp_path, tmp_path / "reference")[:-2], work))

    out = tmp_path / "interrupted"
    # Micro-step 10: epoch 2, batch 4 of 6; checkpoints fall at the ends of windows of 2, and those of
    # micro-steps 8 and 10 are kept.
    killed(run_stage("finetune.py", finetune_args(tmp_path, out), work, kill_at=10))
    states = run_states(out / "checkpoints")
    assert steps(states) == ["step-00000008", "step-00000010"]
    assert trainer_state(states / "step-00000008")["accum_position"] == 0
    weights = states / "step-00000010" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])  # the write the kill cut short
    resumed = ok(run_stage("finetune.py", finetune_args(tmp_path, out), work))
    assert "step-00000010" in resumed.stderr and "sha256 differs" in resumed.stderr
    assert "resuming at epoch 2, batch 2" in resumed.stderr

    assert_same_weights(tmp_path / "reference" / "model" / "model.safetensors", out / "model" / "model.safetensors")
    for name in ("metrics.json", "epochs.csv"):
        assert (tmp_path / "reference" / "results" / name).read_text() == (out / "results" / name).read_text(), name


@pytest.mark.slow
def test_kfold_finetune_killed_inside_a_fold_resumes_that_fold_and_the_next_bit_for_bit(tmp_path):
    pretrained, task = make_finetune_inputs(tmp_path)
    work = tmp_path / "work"
    write_params(work, ["model=tiny", f"representation.max_len={MAX_LEN}"], tasks={"t": task},
                 finetuning={**FINETUNE, "kfold": 2, "epochs": 3, "checkpoint_every": 1})
    ok(run_stage("finetune.py", finetune_args(tmp_path, tmp_path / "reference"), work))

    out = tmp_path / "interrupted"
    # 24 rows per fold, batch 8: 3 micro-steps an epoch; micro-step 5 (a window's end) is inside fold 0's
    # second epoch.
    killed(run_stage("finetune.py", finetune_args(tmp_path, out), work, kill_at=5))
    folds = run_states(out / "checkpoints", "")
    assert steps(folds / "fold-0") and not (folds / "fold-1").exists()
    ok(run_stage("finetune.py", finetune_args(tmp_path, out), work))

    for fold in ("folds/0/", "folds/1/", ""):
        assert_same_weights(tmp_path / "reference" / "model" / f"{fold}model.safetensors",
                            out / "model" / f"{fold}model.safetensors")
    for name in ("metrics.json", "epochs.csv"):
        assert (tmp_path / "reference" / "results" / name).read_text() == (out / "results" / name).read_text(), name
    from twilbert.model.manifest import verify_model_dir

    verify_model_dir(out / "model")  # sealed after the resume, every fold included
    sums = [json.loads((d / "model" / "checksums.json").read_text()) for d in (tmp_path / "reference", out)]
    assert sums[0] == sums[1]  # every file of the resumed model directory is byte-identical


# --------------------------------------------------------------------------------------------
# What the loop adds to a checkpoint: tensor groups, and which part of a run changed
# --------------------------------------------------------------------------------------------


def _linear_checkpoint(directory: Path, parts: dict, best: Optional[dict] = None) -> Path:
    from twilbert.train.checkpoint import save_training_checkpoint
    from twilbert.train.fingerprint import run_fingerprint

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    state = {"epoch": 1, "batch_in_epoch": 0, "optimizer_steps": 2, "micro_steps": 2, "accum_position": 0,
             "fingerprint_parts": parts}
    return save_training_checkpoint(directory, model, torch.optim.SGD(model.parameters(), lr=0.1), None, state,
                                     run_fingerprint(parts), tensors={"best": best} if best else None)


def test_the_best_weights_travel_in_the_checkpoint_under_its_checksums(tmp_path, caplog):
    from twilbert.train.checkpoint import latest_valid_checkpoint, load_training_checkpoint

    best = {"weight": torch.arange(6.0).reshape(2, 3), "bias": torch.tensor([1.0, -1.0])}
    parts = {"config": "a", "inputs": "b", "code": "c"}
    _linear_checkpoint(tmp_path / "older", parts)
    path = _linear_checkpoint(tmp_path, parts, best)
    model = torch.nn.Linear(3, 2)
    state = load_training_checkpoint(path, model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert state["tensors"]["best"].keys() == best.keys()
    assert all(torch.equal(state["tensors"]["best"][k], v) for k, v in best.items())

    data = bytearray((path / "best.safetensors").read_bytes())
    data[-1] ^= 1
    (path / "best.safetensors").write_bytes(bytes(data))
    with caplog.at_level("WARNING"):
        assert latest_valid_checkpoint(tmp_path) is None
    assert "best.safetensors: sha256 differs" in caplog.text


def test_starting_fresh_names_the_part_of_the_run_that_changed(tmp_path, caplog):
    from twilbert.train.checkpoint import resume_training
    from twilbert.train.fingerprint import run_fingerprint

    saved = {"config": "a", "inputs": "b", "code": "c"}
    _linear_checkpoint(tmp_path, saved)
    now = {**saved, "code": "c2"}
    model = torch.nn.Linear(3, 2)
    with caplog.at_level("INFO"):
        assert resume_training(tmp_path, model, torch.optim.SGD(model.parameters(), lr=0.1), None,
                               run_fingerprint(now), now) is None
    assert "the code changed" in caplog.text and "starting fresh" in caplog.text


def test_an_input_digest_follows_content_not_location(tmp_path):
    import shutil

    from twilbert.train.fingerprint import files_digest

    pairs = tmp_path / "a" / "pairs"
    pairs.mkdir(parents=True)
    (pairs / "shard-00000.npz").write_bytes(b"\x00" * 100)
    (pairs / "meta.json").write_text("{}")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert files_digest([tmp_path / "a" / "pairs"]) == files_digest([tmp_path / "b" / "pairs"])
    (tmp_path / "b" / "pairs" / "shard-00000.npz").write_bytes(b"\x00" * 99 + b"\x01")
    assert files_digest([tmp_path / "a" / "pairs"]) != files_digest([tmp_path / "b" / "pairs"])
