"""``Trainer.fit``: the one epoch loop of pretraining and finetuning, driven by a ``TrainingTask``. The
best epoch and its weights, patience, resume from a training checkpoint (a stopped run stays stopped),
checkpoints only at the end of an accumulation window, and the callbacks that tests pass in instead
of hooks inside the loop."""

from __future__ import annotations

import json
from typing import Optional

import pytest
import torch

from twilbert.train.best_epoch import BestEpoch
from twilbert.train.grad_tree import put_grads
from twilbert.train.loop import Callback, Checkpointing, Trainer

N, BATCH = 24, 4  # 6 micro-steps an epoch
X = torch.randn(N, 3, generator=torch.Generator().manual_seed(0))
Y = X @ torch.tensor([1.0, -2.0, 0.5]) + 0.1


def batches(epoch: int, start: int):
    """A pure function of (epoch, first batch), as the stages' batch sources are."""
    order = torch.randperm(N, generator=torch.Generator().manual_seed(epoch))
    for b in range(start, N // BATCH):
        idx = order[b * BATCH : (b + 1) * BATCH]
        yield X[idx], Y[idx]


def loss_fn(model, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(model(x).squeeze(-1), y), {"rows": len(y)}


def make_trainer(checkpoints=None, every: int = 0, callbacks=(), lr: float = 0.05, accum_iters: int = 2) -> Trainer:
    torch.manual_seed(1)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    ck = Checkpointing(checkpoints, "run", every) if checkpoints is not None else None
    return Trainer(model, optimizer, None, accum_iters=accum_iters, checkpointing=ck, callbacks=callbacks)


class Scripted:
    """A TrainingTask whose evaluate() returns scripted scores; records each epoch's weights and on_epoch
    calls, and checkpoints the epochs it saw."""

    def __init__(self, trainer: Trainer, scores: Optional[list[float]] = None):
        self.trainer, self.scores = trainer, scores
        self.weights: dict[int, torch.Tensor] = {}
        self.epochs: list[tuple[int, bool]] = []
        self.restored: Optional[dict] = None

    def batches(self, epoch: int, skip: int):
        return batches(epoch, skip)

    def loss(self, model, batch):
        return loss_fn(model, batch)

    def shown(self, metrics: dict) -> dict:
        return {"dev_mse": metrics["dev_mse"]}

    def state(self) -> dict:
        return {"seen": [list(e) for e in self.epochs]}

    def load_state(self, state: dict) -> None:
        self.restored = state

    def evaluate(self, epoch: int, sums: dict) -> tuple[float, dict]:
        assert sums["rows"] == N
        with torch.no_grad():
            dev = float(torch.nn.functional.mse_loss(self.trainer.model(X).squeeze(-1), Y))
        self.weights[epoch + 1] = self.trainer.model.weight.detach().clone()
        score = self.scores[epoch] if self.scores is not None else -dev
        return score, {"epoch": epoch + 1, "dev_mse": dev}

    def on_epoch(self, epoch: int, metrics: dict, improved: bool) -> None:
        self.epochs.append((epoch, improved))


def fit(trainer: Trainer, run: Scripted, epochs: int = 6, patience: Optional[int] = None) -> BestEpoch:
    return trainer.fit(run, epochs, BestEpoch(lower_is_better=False), patience=patience)


def test_fit_stops_after_patience_epochs_without_a_better_score_and_keeps_the_best_epochs_weights():
    trainer = make_trainer()
    run = Scripted(trainer, scores=[1.0, 3.0, 2.0, 2.5, 9.0, 9.0])
    best = fit(trainer, run, patience=2)
    assert run.epochs == [(1, True), (2, True), (3, False), (4, False)]  # epochs 5 and 6 never run
    assert trainer.state.epoch == 4
    assert (best.epoch, best.score, best.since) == (2, 3.0, 2)
    assert best.metrics["epoch"] == 2
    assert torch.equal(best.weights["weight"], run.weights[2])


def test_fit_without_patience_runs_every_epoch_and_a_nan_first_score_still_counts():
    trainer = make_trainer()
    run = Scripted(trainer, scores=[float("nan"), float("nan"), float("nan")])
    best = fit(trainer, run, epochs=3)
    assert [e for e, _ in run.epochs] == [1, 2, 3]
    assert best.epoch == 1 and best.weights is not None


class StopAt(Callback):
    """Stands in for the stage's SIGKILL: the run ends right after the checkpoint of ``micro_step``."""

    def __init__(self, micro_step: int):
        self.micro_step, self.seen = micro_step, []

    def on_checkpoint(self, trainer: Trainer, path) -> None:
        self.seen.append((trainer.state.micro_steps, path.name))
        if trainer.state.micro_steps == self.micro_step:
            raise KeyboardInterrupt


def test_callbacks_see_every_checkpoint_and_a_run_stopped_inside_an_epoch_resumes_to_the_same_end(tmp_path):
    reference = make_trainer()
    ref_run = Scripted(reference)
    ref_best = fit(reference, ref_run, epochs=4, patience=1)

    stop = StopAt(micro_step=10)  # epoch 2, batch 4
    interrupted = make_trainer(tmp_path, every=3, callbacks=[stop])
    with pytest.raises(KeyboardInterrupt):
        fit(interrupted, Scripted(interrupted), epochs=4, patience=1)
    # due at 3 and 9, inside windows of 2: saved at their ends; 6 twice (due, and the epoch's end)
    assert stop.seen == [(4, "step-00000004"), (6, "step-00000006"), (6, "step-00000006"), (10, "step-00000010")]

    resumed = make_trainer(tmp_path, every=3)
    run = Scripted(resumed)
    best = fit(resumed, run, epochs=4, patience=1)
    assert run.restored == {"seen": [[1, True]]}  # the task's own keys, and only those
    assert run.epochs == ref_run.epochs[1:]  # epoch 1 came from the checkpoint, with its best
    assert (best.epoch, best.score, best.metrics) == (ref_best.epoch, ref_best.score, ref_best.metrics)
    assert torch.equal(best.weights["weight"], ref_best.weights["weight"])
    assert torch.equal(resumed.model.weight, reference.model.weight)


def test_a_resumed_run_that_had_stopped_early_stays_stopped(tmp_path):
    first = make_trainer(tmp_path)
    first_run = Scripted(first, scores=[2.0, 1.0, 1.0, 5.0])
    done = fit(first, first_run, epochs=4, patience=2)
    assert [e for e, _ in first_run.epochs] == [1, 2, 3]

    again = make_trainer(tmp_path)
    run = Scripted(again, scores=[2.0, 1.0, 1.0, 5.0])
    best = fit(again, run, epochs=4, patience=2)
    assert run.epochs == [] and again.state.epoch == 3
    assert (best.epoch, best.since) == (done.epoch, 2) == (1, 2)
    assert torch.equal(best.weights["weight"], first_run.weights[1])


class Saved(Callback):
    """What each checkpoint holds about the accumulation window it was saved in."""

    def __init__(self):
        self.seen = []

    def on_checkpoint(self, trainer: Trainer, path) -> None:
        state = json.loads((path / "trainer.json").read_text())["state"]
        self.seen.append((state["micro_steps"], state["accum_position"], (path / "gradients.safetensors").exists()))


def test_checkpoints_fall_only_at_the_end_of_an_accumulation_window(tmp_path):
    saved = Saved()
    trainer = make_trainer(tmp_path, every=2, callbacks=[saved], accum_iters=3)  # windows of micro-steps 1-3, 4-6
    fit(trainer, Scripted(trainer), epochs=2)
    # due every 2 micro-steps: those due inside a window (2, 4, 8, 10) wait for its end; 6 and 12 also end an epoch
    assert [m for m, _, _ in saved.seen] == [3, 6, 6, 9, 12, 12]
    assert all(pending == 0 and not gradients for _, pending, gradients in saved.seen), saved.seen

    trainer.train_step(next(batches(2, 0)), loss_fn)  # one micro-batch into a window
    with pytest.raises(RuntimeError, match="inside an accumulation window"):
        trainer.save_checkpoint()


def test_a_task_may_not_checkpoint_under_the_loops_keys(tmp_path):
    trainer = make_trainer(tmp_path, every=0)
    run = Scripted(trainer)
    run.state = lambda: {"epoch": 7}
    with pytest.raises(ValueError, match=r"the loop's keys \['epoch'\]"):
        fit(trainer, run, epochs=1)


def test_a_checkpoint_that_an_older_version_saved_inside_a_window_still_resumes_to_the_same_end(tmp_path):
    from twilbert.train.checkpoint import save_training_checkpoint

    reference = make_trainer()
    ref_run = Scripted(reference)
    ref_best = fit(reference, ref_run, epochs=2)

    # What older versions saved on one process: micro-step 3, one micro-batch into a window of 2.
    old = make_trainer()
    for batch in list(batches(0, 0))[:3]:
        old.train_step(batch, loss_fn)
    old.flush()
    put_grads(old._trainable, old._grad)  # where older versions held the window's gradients
    s = old.state
    state = {"epoch": s.epoch, "batch_in_epoch": s.batch_in_epoch, "optimizer_steps": s.optimizer_steps,
             "micro_steps": s.micro_steps, "accum_position": 1, "loss_sum": s.loss_sum, "sums": dict(s.sums),
             "fingerprint_parts": None, **BestEpoch(lower_is_better=False).to_state(), "seen": []}
    path = save_training_checkpoint(tmp_path, old.model, old.optimizer, None, state, "run")
    assert (path / "gradients.safetensors").is_file()

    resumed = make_trainer(tmp_path)
    run = Scripted(resumed)
    best = fit(resumed, run, epochs=2)
    assert run.epochs == ref_run.epochs and run.restored == {"seen": []}
    assert (best.epoch, best.score, best.metrics) == (ref_best.epoch, ref_best.score, ref_best.metrics)
    assert torch.equal(resumed.model.weight, reference.model.weight)
    assert torch.equal(resumed.model.bias, reference.model.bias)
