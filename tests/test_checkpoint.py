"""Training checkpoints: exact resume, corruption detected and passed over, atomic saves, no pickles run."""

from __future__ import annotations

import json
import logging
import random

import numpy as np
import pytest
import torch

import twilbert.train.checkpoint as ckpt
from twilbert.config import ModelConfig
from twilbert.io_utils import sha256_file
from twilbert.model import TWilBertForPretraining
from twilbert.train.checkpoint import (
    TrainingCheckpointError,
    latest_valid_checkpoint,
    list_checkpoints,
    load_training_checkpoint,
    resume_training,
    save_training_checkpoint,
)
from twilbert.train.fingerprint import config_fingerprint
from twilbert.train.losses import mlm_loss, rop_loss
from twilbert.train.optim import build_optimizer, build_scheduler, param_groups

pytestmark = pytest.mark.reliability

VOCAB, MAX_POS = 40, 16
FINGERPRINT = "f" * 64


def build(optimizer: str = "adam", seed: int = 0):
    torch.manual_seed(seed)
    cfg = ModelConfig(embedding_size=8, hidden_size=16, n_encoders=2, n_heads=2, intermediate_size=32,
                      input_dropout=0.1, output_dropout=0.1)  # dropout: resume must continue the torch RNG
    cfg.validate()
    model = TWilBertForPretraining(cfg, VOCAB, MAX_POS)
    opt = build_optimizer(optimizer, param_groups(model, 1e-2, 0.01), 1e-2, 0.01)
    sched = build_scheduler(opt, True, cfg.hidden_size, warmup_steps=3)
    return model, opt, sched


def batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(5, VOCAB, (4, 10), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, 2::3] = ids[:, 2::3]
    return ids, labels, torch.randint(0, 2, (4,), generator=g)


def forward_backward(model, step: int) -> None:
    ids, labels, rop = batch(step)
    out = model(ids, torch.zeros_like(ids), torch.ones_like(ids, dtype=torch.bool), labels)
    (mlm_loss(out.mlm_logits, out.mlm_targets) + rop_loss(out.rop_logits, rop)).backward()


def train(model, opt, sched, steps) -> None:
    model.train()
    for step in steps:
        forward_backward(model, step)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)


def state_at(micro_steps: int, accum_position: int = 0) -> dict:
    return {"epoch": 0, "batch_in_epoch": micro_steps, "optimizer_steps": micro_steps,
            "micro_steps": micro_steps, "accum_position": accum_position, "loss_sum": 1.5}


def draws() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def save(tmp_path, model, opt, sched, step: int, **kw):
    return save_training_checkpoint(tmp_path, model, opt, sched, state_at(step), FINGERPRINT, **kw)


class _Tripwire:
    """Unpickling this creates a file: proof that a pickle was executed."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def reseal(path) -> None:
    """Rewrite checksums.json to match tampered files, as an attacker with write access could."""
    sums = {p.name: sha256_file(p) for p in sorted(path.iterdir()) if p.name != ckpt.CHECKSUMS_FILE}
    (path / ckpt.CHECKSUMS_FILE).write_text(json.dumps(sums))


# --------------------------------------------------------------------------------------------
# Exact resume
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["adam", "lamb"])
def test_resume_continues_bit_for_bit_like_an_uninterrupted_run(tmp_path, optimizer):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    model, opt, sched = build(optimizer)
    train(model, opt, sched, range(3))
    save(tmp_path, model, opt, sched, 3)
    expected_draws = draws()
    train(model, opt, sched, range(3, 5))
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    random.seed(2), np.random.seed(2), torch.manual_seed(2)  # a fresh process: other RNG states, other init
    model2, opt2, sched2 = build(optimizer, seed=7)
    state = load_training_checkpoint(latest_valid_checkpoint(tmp_path), model2, opt2, sched2)
    assert state == state_at(3)
    assert draws() == expected_draws
    train(model2, opt2, sched2, range(3, 5))
    for name, tensor in model2.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    assert sched2.last_epoch == sched.last_epoch == 5


def test_optimizer_and_scheduler_files_load_under_weights_only(tmp_path):
    for optimizer in ("adam", "lamb"):
        model, opt, sched = build(optimizer)
        train(model, opt, sched, range(2))
        path = save(tmp_path / optimizer, model, opt, sched, 2)
        assert torch.load(path / "optimizer.pt", weights_only=True)["state"]
        assert torch.load(path / "scheduler.pt", weights_only=True)["last_epoch"] == 2
        trainer = json.loads((path / "trainer.json").read_text())
        assert trainer["config_fingerprint"] == FINGERPRINT
        assert len(trainer["rng"][0]["python"]["state"]) == 625
        assert all(isinstance(x, int) for x in trainer["rng"][0]["numpy"]["state"]["key"])


def test_a_checkpoint_inside_an_accumulation_window_restores_the_pending_gradients(tmp_path):
    model, opt, sched = build()
    forward_backward(model, 0)  # one micro-batch of a window of two
    state = state_at(1, accum_position=1)
    save_training_checkpoint(tmp_path, model, opt, sched, state, FINGERPRINT)
    forward_backward(model, 1)
    opt.step()
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    model2, opt2, sched2 = build(seed=5)
    assert load_training_checkpoint(tmp_path / "step-00000001", model2, opt2, sched2)["accum_position"] == 1
    forward_backward(model2, 1)
    opt2.step()
    for name, tensor in model2.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


# --------------------------------------------------------------------------------------------
# Corruption, tampering
# --------------------------------------------------------------------------------------------


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", [
    ("model.safetensors", _flip_byte),
    ("optimizer.pt", _truncate),
    ("trainer.json", lambda p: p.unlink()),
    ("checksums.json", _truncate),
])
def test_a_corrupted_newest_checkpoint_is_reported_and_the_previous_one_used(tmp_path, caplog, damage):
    model, opt, sched = build()
    train(model, opt, sched, range(1))
    save(tmp_path, model, opt, sched, 1)
    train(model, opt, sched, range(1, 2))
    newest = save(tmp_path, model, opt, sched, 2)
    name, hurt = damage
    hurt(newest / name)

    with caplog.at_level(logging.WARNING):
        assert latest_valid_checkpoint(tmp_path) == tmp_path / "step-00000001"
    assert "step-00000002" in caplog.text and name in caplog.text
    with pytest.raises(TrainingCheckpointError, match=name.replace(".", r"\.")):
        load_training_checkpoint(newest, *build()[:2])

    model2, opt2, sched2 = build(seed=3)
    assert resume_training(tmp_path, model2, opt2, sched2, FINGERPRINT)["micro_steps"] == 1


def test_a_planted_pickle_optimizer_is_refused_and_never_executed(tmp_path, caplog):
    tripwire = tmp_path / "pickle-was-executed"
    model, opt, sched = build()
    train(model, opt, sched, range(1))
    save(tmp_path / "ckpts", model, opt, sched, 1)
    train(model, opt, sched, range(1, 2))
    newest = save(tmp_path / "ckpts", model, opt, sched, 2)
    torch.save(_Tripwire(tripwire), newest / "optimizer.pt")  # the format torch.save writes, payload inside
    reseal(newest)  # checksums match: only weights_only stands between the file and the payload

    model2, opt2, sched2 = build(seed=3)
    before = {k: v.clone() for k, v in model2.state_dict().items()}
    with pytest.raises(TrainingCheckpointError, match=r"optimizer\.pt: refused"):
        load_training_checkpoint(newest, model2, opt2, sched2)
    assert not tripwire.exists()
    assert all(torch.equal(v, before[k]) for k, v in model2.state_dict().items())  # nothing half-loaded

    with caplog.at_level(logging.WARNING):
        state = resume_training(tmp_path / "ckpts", model2, opt2, sched2, FINGERPRINT)
    assert state["micro_steps"] == 1 and "optimizer.pt: refused" in caplog.text
    assert not tripwire.exists()


# --------------------------------------------------------------------------------------------
# Atomicity, pruning, leftovers
# --------------------------------------------------------------------------------------------


def test_a_failure_mid_save_keeps_the_previous_checkpoint_and_no_temp_directory(tmp_path, monkeypatch):
    model, opt, sched = build()
    save(tmp_path, model, opt, sched, 1)
    real_save = torch.save

    def crash(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save(tmp_path, model, opt, sched, 2)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000001"]
    assert latest_valid_checkpoint(tmp_path) == tmp_path / "step-00000001"


def test_leftovers_of_a_killed_save_are_cleaned_by_the_next_save(tmp_path):
    model, opt, sched = build()
    save(tmp_path, model, opt, sched, 1)
    half = tmp_path / ".step-00000002.publish-x1y2z3" / "step-00000002"  # SIGKILL mid-write: no clean-up
    half.mkdir(parents=True)
    (half / "model.safetensors").write_bytes(b"half")
    assert latest_valid_checkpoint(tmp_path) == tmp_path / "step-00000001"
    save(tmp_path, model, opt, sched, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001", "step-00000003"]


def test_a_kill_between_the_two_renames_of_a_resave_keeps_the_old_checkpoint(tmp_path):
    model, opt, sched = build()
    save(tmp_path, model, opt, sched, 1)
    work = tmp_path / ".step-00000001.publish-x1y2z3"  # killed mid-swap where renameat2 is missing
    work.mkdir()
    (tmp_path / "step-00000001").rename(work / "previous")
    save(tmp_path, model, opt, sched, 2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000001", "step-00000002"]


def test_pruning_keeps_the_newest_and_drops_an_abandoned_timeline(tmp_path):
    model, opt, sched = build()
    for step in (1, 2, 3, 9):
        save(tmp_path, model, opt, sched, step, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000003", "step-00000009"]
    save(tmp_path, model, opt, sched, 4, keep=2)  # resumed from 3 (9 was unusable): 9 is not this run's future
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000003", "step-00000004"]


# --------------------------------------------------------------------------------------------
# Config fingerprint
# --------------------------------------------------------------------------------------------


def test_fingerprint_ignores_only_the_keys_that_cannot_change_an_output():
    raw = {"seed": 1, "training": {"lr": 0.1, "epochs": 3, "log_every": 10, "device": "cpu", "checkpoint_every": 5},
           "tracking": {"uri": None}, "finetuning": {"patience": 3, "baseline_c": 1.0},
           "tasks": {"t": {"finetuning": {"epochs": 2, "lr": 0.1, "checkpoint_every": 0}}}}
    base = config_fingerprint(raw)
    same = json.loads(json.dumps(raw))
    same["training"]["checkpoint_every"] = 7
    same["tracking"]["uri"] = "http://elsewhere"
    same["finetuning"]["baseline_c"] = 2.0
    same["tasks"]["t"]["finetuning"]["checkpoint_every"] = 9
    assert config_fingerprint(same) == base
    # lowering the end or the patience, the step curves, the device: each is another run
    for section, key, value in (("training", "epochs", 1), ("training", "log_every", 1), ("training", "device", "cuda"),
                                ("finetuning", "patience", 1), ("training", "lr", 0.2)):
        changed = json.loads(json.dumps(raw))
        changed[section][key] = value
        assert config_fingerprint(changed) != base, key
    changed = json.loads(json.dumps(raw))
    changed["tasks"]["t"]["finetuning"]["epochs"] = 1
    assert config_fingerprint(changed) != base


def test_fingerprint_include_reads_only_the_stage_params():
    raw = {"seed": 1, "training": {"lr": 0.1}, "representation": {"max_len": 8, "max_len_test": 4},
           "finetuning": {"lr": 1.0}}
    include = ("seed", "training", "representation.max_len")
    other = {**raw, "finetuning": {"lr": 2.0}, "representation": {"max_len": 8, "max_len_test": 2}}
    assert config_fingerprint(raw, include) == config_fingerprint(other, include)
    assert config_fingerprint(raw, include) != config_fingerprint({**raw, "seed": 2}, include)


def test_a_changed_config_starts_fresh_says_so_and_keeps_the_old_checkpoints(tmp_path, caplog):
    model, opt, sched = build()
    save(tmp_path, model, opt, sched, 4)
    with caplog.at_level(logging.INFO):
        assert resume_training(tmp_path, *build(seed=2), "0" * 64) is None
    assert "config changed" in caplog.text and "starting fresh" in caplog.text
    assert all(r.levelno == logging.INFO for r in caplog.records if "starting fresh" in r.message)  # the normal path
    assert list_checkpoints(tmp_path) == []
    assert (tmp_path / "superseded" / FINGERPRINT[:16] / "step-00000004" / "model.safetensors").is_file()


def test_an_empty_directory_starts_fresh(tmp_path):
    assert resume_training(tmp_path / "none", *build(), FINGERPRINT) is None


def _disk_use(path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_disk_use_stays_bounded_across_experiments_that_change_the_config(tmp_path, caplog):
    # three experiments in a row, each with a changed config: each starts fresh and leaves its checkpoints
    sizes = []
    model, opt, sched = build()
    save(tmp_path, model, opt, sched, 4)
    for experiment in range(1, 4):
        new = f"{experiment}" * 64
        with caplog.at_level(logging.INFO):
            assert resume_training(tmp_path, *build(seed=experiment), new) is None
        model, opt, sched = build(seed=experiment)
        save_training_checkpoint(tmp_path, model, opt, sched, state_at(4), new)
        sizes.append(_disk_use(tmp_path))
        assert len(list((tmp_path / "superseded").iterdir())) == 1  # only the latest replaced run
    assert max(sizes) <= 1.05 * sizes[0]  # the third experiment takes no more disk than the first
    assert "the one before" in caplog.text and "was deleted" in caplog.text
