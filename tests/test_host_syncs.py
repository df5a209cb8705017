"""Training never waits for the device step by step: losses, accuracies and counts stay on the device
and are read once per logging window (``training.log_every`` optimizer steps) and at the epoch's end.

The calls that make the host wait for a GPU (``Tensor.item``, ``.tolist``, ``__bool__``, ``.cpu``, and
``float()``/``int()`` of a tensor) are wrapped to record each one made on behalf of
twilbert's code (the nearest caller outside torch is under src/twilbert). On the CPU these calls
cost nothing, but each one would stall a GPU; the same count holds there.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import twilbert
from finetune_data import first, make_config, make_pretrained, write_task
from helpers import REPO
from twilbert.config import compose, load_config
from twilbert.data.batch import make_batch, pack_pairs
from twilbert.data.special import N_SPECIAL
from twilbert.data.tasks import load_task
from twilbert.train.finetune.learners import twilbert_learner
from twilbert.train.finetune.resolved import resolve_finetune_run
from twilbert.train.pretrain import build_pretraining
from twilbert.train.pretrain_run import resolve_pretrain_run

SRC = str(Path(twilbert.__file__).parent)
TORCH = str(Path(torch.__file__).parent)
SYNCS = ("item", "tolist", "__bool__", "cpu", "__float__", "__int__")  # .numpy() needs .cpu() first on a GPU
STEPS = 20


class SyncRecorder:
    """Every sync twilbert asks for: (what, where, inside ``Trainer.train_epoch``, optimizer steps then)."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[str, str, bool, int]] = []
        for name in SYNCS:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, getattr(torch.Tensor, name)))

    def _wrap(self, name, original):
        recorder = self

        def wrapped(tensor, *args, **kwargs):
            recorder._record(name)
            return original(tensor, *args, **kwargs)

        return wrapped

    def _record(self, name: str) -> None:
        frame = sys._getframe(2)
        while frame is not None and frame.f_code.co_filename.startswith(TORCH):
            frame = frame.f_back  # torch asked on our behalf: the caller is the one to blame
        if frame is None or not frame.f_code.co_filename.startswith(SRC):
            return
        where = f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno} {frame.f_code.co_name}"
        trainer = None
        f = frame
        while f is not None:
            if f.f_code.co_name == "train_epoch" and f.f_code.co_filename.endswith("loop.py"):
                trainer = f.f_locals["self"]
                break
            f = f.f_back
        steps = trainer.state.optimizer_steps if trainer is not None else -1
        self.calls.append((name, where, trainer is not None, steps))

    def in_loop(self) -> list[tuple[str, str, bool, int]]:
        return [c for c in self.calls if c[2]]


def pretraining_batches(vocab: int, n: int, batch: int, max_len: int):
    """Rows of random ids, half the batches padded (rows of different lengths), half not."""
    rng = np.random.default_rng(0)
    for i in range(n):
        lengths = rng.integers(2, max_len + 1, batch) if i % 2 else np.full(batch, max_len)
        a = [rng.integers(N_SPECIAL, vocab, k).tolist() for k in lengths]
        b = [rng.integers(N_SPECIAL, vocab, k).tolist() for k in lengths[::-1]]
        packed = pack_pairs(a, b, max_len)
        yield make_batch(packed["input_ids"], packed["len_a"], packed["length"], rng.integers(0, 2, batch))


def test_pretraining_reads_the_device_once_per_logging_window(monkeypatch):
    cfg = load_config(compose(["model=tiny", "representation.max_len=8", "training.log_every=5",
                               "training.device=cpu", "training.batch_size=4"], REPO / "conf"))
    _, trainer, objective = build_pretraining(resolve_pretrain_run(cfg), 60, torch.device("cpu"))
    batches = list(pretraining_batches(60, STEPS, 4, 8))
    assert {b.padded for b in batches} == {True, False}

    recorder = SyncRecorder(monkeypatch)
    sums = trainer.train_epoch(batches, objective)

    # one read at the end of each window of 5 optimizer steps, none per step; the epoch's end has
    # nothing left to read (its last step closed a window)
    assert [c[3] for c in recorder.in_loop()] == [5, 10, 15, 20], recorder.calls
    # flush's one read: the window's values of every micro-batch (train/micro.py), gathered from every worker
    assert all(c[1].startswith("micro.py") and "gather_micro_values" in c[1] for c in recorder.calls), recorder.calls
    assert len(recorder.calls) == 4
    # ... and what was read adds up: every step's counts, the epoch's mean loss
    assert trainer.state.optimizer_steps == STEPS and sums["rop_count"] == 4 * STEPS
    assert 0 < sums["mlm_correct"] <= sums["mlm_count"] and np.isfinite(sums["loss"])


def test_a_window_left_open_at_the_epoch_end_is_read_once_there(monkeypatch):
    cfg = load_config(compose(["model=tiny", "representation.max_len=8", "training.log_every=8",
                               "training.device=cpu", "training.batch_size=4"], REPO / "conf"))
    _, trainer, objective = build_pretraining(resolve_pretrain_run(cfg), 60, torch.device("cpu"))
    recorder = SyncRecorder(monkeypatch)
    trainer.train_epoch(list(pretraining_batches(60, STEPS, 4, 8)), objective)
    assert [c[3] for c in recorder.in_loop()] == [8, 16, 20], recorder.calls  # windows, then the epoch's end


def test_finetuning_reads_the_device_once_per_logging_window(tmp_path, monkeypatch):
    pretrained = make_pretrained(tmp_path / "pretrained")
    task = write_task(tmp_path / "task", sizes=(4 * STEPS, 16, 16))
    cfg = make_config(compose(["model=tiny"], REPO / "conf"), {"t": task}, epochs=1, batch_size=4)
    spec = first(cfg)
    learner = twilbert_learner(resolve_finetune_run(cfg, spec, pretrained), None)
    splits = load_task(spec, cfg.seed)
    train, dev = learner.prepare(splits.train, 12), learner.prepare(splits.dev, 12)

    recorder = SyncRecorder(monkeypatch)
    fitted = learner.fit(train, dev)

    assert fitted.history[0]["epoch"] == 1 and np.isfinite(fitted.history[0]["train_loss"])
    # the finetuning loop logs every 10 optimizer steps: two windows in 20 steps
    assert [c[3] for c in recorder.in_loop()] == [10, 20], recorder.calls
    # after the epoch (building the model before it does not count): the dev scores, in one transfer
    start = recorder.calls.index(recorder.in_loop()[0])
    after = [c for c in recorder.calls[start:] if not c[2]]
    assert len(after) <= 1, after


def test_a_non_finite_loss_stops_training_within_its_window_naming_its_step_before_a_checkpoint(tmp_path):
    from twilbert.train.checkpoint import latest_valid_checkpoint
    from twilbert.train.loop import Checkpointing, NonFiniteLossError

    cfg = load_config(compose(["model=tiny", "representation.max_len=8", "training.log_every=5",
                               "training.device=cpu", "training.batch_size=4"], REPO / "conf"))
    _, trainer, objective = build_pretraining(resolve_pretrain_run(cfg), 60, torch.device("cpu"))
    trainer.checkpointing = Checkpointing(tmp_path / "train_state", "run", every=4)
    calls = []

    def poisoned(model, batch):
        calls.append(1)
        loss, counts = objective(model, batch)
        return (loss * float("nan") if len(calls) == 6 else loss), counts

    where = r"epoch 1, batch 6 \(micro-batch 0, micro-step 6, optimizer step 5\)"
    with pytest.raises(NonFiniteLossError, match=rf"loss is nan at {where}"):
        trainer.train_epoch(list(pretraining_batches(60, STEPS, 4, 8)), poisoned)
    # read at the checkpoint of micro-step 8 (before the window's end at 10), which was not written
    assert len(calls) == 8
    assert latest_valid_checkpoint(tmp_path / "train_state").name == "step-00000004"
