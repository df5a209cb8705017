"""One training loop for pretraining and finetuning: accumulation, bf16 autocast, clipping, logging,
training checkpoints with exact resume, and DDP gradient sync.

A step never waits for the device: the loss and counts of each micro-step stay where they were
computed and are read in one transfer per logging window (``log_every`` optimizer steps), before each
checkpoint and at the epoch's end (``Trainer.flush``), where the non-finite-loss guard runs too. On a
GPU the host thus queues the next steps while the device computes.

What differs between the two is one object handed to ``Trainer.fit``, a ``TrainingTask``: its
batches, its loss, its evaluation, its log line, its per-epoch hook and its own checkpointed state.
``fit`` owns the epochs: resume, evaluation, the best epoch, patience, the epoch's log line and its
checkpoint. The loop owns where training stands (``LoopState``); a checkpoint of it, plus the
weights, optimizer, scheduler and RNG states (``train.checkpoint``), is everything needed to
continue as if never stopped. Checkpoints fall only at the end of an accumulation window, so none
holds half-accumulated gradients.
"""

from __future__ import annotations

import logging
import math
import os
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Optional, Protocol, Sequence

import numpy as np
import torch
from tqdm import tqdm

from twilbert.device import autocast
from twilbert.errors import TwilbertError
from twilbert.progress import EpochClock
from twilbert.tracking.runs import Tracker
from twilbert.train import distributed
from twilbert.train.best_epoch import BestEpoch
from twilbert.train.checkpoint import TENSORS_KEY, resume_training, save_training_checkpoint

log = logging.getLogger(__name__)
CPU = torch.device("cpu")  # the default device of a Trainer

# A loss function gets (model, batch) and returns the loss of the micro-batch and summable counts
# (e.g. {"mlm_correct": tensor(12), "mlm_count": 40}) that the loop aggregates over the epoch. A count
# may be a device tensor: the loop reads those once per logging window, never per step.
LossFn = Callable[[torch.nn.Module, object], tuple[torch.Tensor, dict[str, object]]]
# The epoch's sums so far -> metrics logged with each logged step (e.g. the running MLM accuracy).
Running = Callable[[Mapping[str, float]], Mapping[str, float]]


class TrainingTask(Protocol):
    """What one kind of training (pretraining, finetuning) hands to ``Trainer.fit``.

    Every rank calls every method at the same points, so all ranks take the same decisions.
    """

    def batches(self, epoch: int, skip: int) -> Iterable:
        """Epoch ``epoch``'s (from 0) micro-batches, without its first ``skip`` (where a checkpoint stopped)."""

    def loss(self, model: torch.nn.Module, batch: object) -> tuple[torch.Tensor, dict[str, object]]:
        """The micro-batch's loss and its summable counts (a ``LossFn``)."""

    def evaluate(self, epoch: int, sums: dict[str, float]) -> tuple[float, dict]:
        """(score, metrics) of epoch ``epoch`` (from 0) given its training sums; the score picks the best epoch."""

    def shown(self, metrics: dict) -> Mapping[str, float]:
        """What the epoch's log line shows of ``metrics`` (every metric still goes to the tracker)."""

    def on_epoch(self, epoch: int, metrics: dict, improved: bool) -> None:
        """After epoch ``epoch`` (from 1) was scored and the best epoch updated, before its checkpoint."""

    def state(self) -> dict:
        """The task's own JSON keys for the checkpoint (history, curves...); none may be the loop's."""

    def load_state(self, state: dict) -> None:
        """Resume: the keys ``state()`` saved, as the checkpoint holds them."""


class NonFiniteLossError(TwilbertError, RuntimeError):
    """The loss became NaN or infinite; training stopped before any checkpoint took the corrupted weights."""


@dataclass
class _Trained:
    """A trained micro-step whose loss and counts may still live on the device (read at the next flush)."""

    position: tuple[int, int, int, int]  # epoch, batch (1-based), micro-step (1-based), optimizer steps before it
    loss: torch.Tensor  # () detached
    counts: dict[str, object]


def seed_everything(seed: int, device: torch.device) -> None:
    """Seed python, numpy and torch; on CPU also ask torch for deterministic kernels.

    On GPUs determinism is not switched on (it needs CUBLAS_WORKSPACE_CONFIG and costs speed):
    see "What is deterministic" in docs/reliability.md.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
        # Filling every torch.empty with NaN is a debugging aid, not needed for determinism; it costs time.
        torch.utils.deterministic.fill_uninitialized_memory = False


def progress(iterable: Iterable, total: Optional[int], desc: str):
    quiet = bool(os.environ.get("CI")) or not sys.stderr.isatty() or distributed.rank() != 0
    return tqdm(iterable, total=total, desc=desc, disable=quiet, leave=False, dynamic_ncols=True)


def with_last(items: Iterable) -> Iterator[tuple[object, bool]]:
    """(item, is_last) pairs: the loop must know the epoch's last micro-batch before running it."""
    iterator = iter(items)
    try:
        current = next(iterator)
    except StopIteration:
        return
    for following in iterator:
        yield current, False
        current = following
    yield current, True


@dataclass
class LoopState:
    """Where training stands; with the weights, optimizer and RNG states, all a checkpoint needs."""

    epoch: int = 0  # epochs completed
    batch_in_epoch: int = 0  # micro-batches of the current epoch already trained
    optimizer_steps: int = 0
    micro_steps: int = 0
    loss_sum: float = 0.0  # the current epoch's running sums: its metrics survive a restart
    sums: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Checkpointing:
    """Where and how often the loop saves training checkpoints."""

    directory: Path
    fingerprint: str  # the run's identity: a checkpoint of another fingerprint is never resumed
    # micro-steps between checkpoints; 0: epoch ends only. A checkpoint due inside an accumulation
    # window is saved at the window's end: no checkpoint holds half-accumulated gradients.
    every: int = 0
    keep: int = 2
    parts: Optional[dict[str, str]] = None  # what the fingerprint hashes; a change is reported by name


# The loop's keys in a checkpoint's state; a task's own keys (``TrainingTask.state``) are the rest.
LOOP_KEYS = ("epoch", "batch_in_epoch", "optimizer_steps", "micro_steps", "accum_position", "loss_sum", "sums",
             "fingerprint_parts", "best", TENSORS_KEY)


class Callback:
    """A hook into the loop that a caller passes in (tests' fault injection: ``twilbert.pipeline.stage``)."""

    def on_checkpoint(self, trainer: "Trainer", path: Optional[Path]) -> None:
        """Called on every rank right after a training checkpoint is saved."""


class Trainer:
    """Runs epochs of micro-batches with gradient accumulation over ``accum_iters`` of them.

    ``model`` may be wrapped in DDP (``distributed.wrap_ddp``): gradients are then all-reduced only
    on the last micro-batch of each accumulation window. Checkpoints wait for a window boundary.
    ``running(sums)``: metrics of the epoch so far logged with each logged step (with ``tracker``).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Optional[torch.optim.lr_scheduler.LRScheduler],
        *,
        accum_iters: int = 1,
        max_grad_norm: Optional[float] = None,
        precision: str = "fp32",
        device: torch.device = CPU,
        tracker: Optional[Tracker] = None,
        log_every: int = 10,
        prefix: str = "train",
        checkpointing: Optional[Checkpointing] = None,
        callbacks: Sequence[Callback] = (),
        running: Optional[Running] = None,
    ):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.accum_iters, self.max_grad_norm = accum_iters, max_grad_norm
        self.precision, self.device = precision, device
        self.tracker, self.log_every, self.prefix, self.running = tracker, log_every, prefix, running
        self.checkpointing, self.callbacks = checkpointing, tuple(callbacks)
        self.state = LoopState()
        self.best: Optional[BestEpoch] = None  # fit's; checkpoints carry it
        self.task: Optional[TrainingTask] = None  # fit's; checkpoints carry its state
        self._pending = 0  # micro-batches whose gradients await the next optimizer step
        self._save_due = False  # a periodic checkpoint waits for the end of an accumulation window
        self._trainable = [p for p in model.parameters() if p.requires_grad]
        self._window: list[_Trained] = []  # micro-steps not yet read from the device (see ``flush``)
        self._last_loss: Optional[float] = None  # the newest loss read, for the tracker

    # ---- checkpoints

    def resume(self) -> Optional[dict]:
        """Continue from the newest valid checkpoint of this run; its state (the caller's keys and
        tensor groups included), or None when training starts fresh."""
        ck = self.checkpointing
        if ck is None:
            return None
        state = resume_training(ck.directory, self.model, self.optimizer, self.scheduler, ck.fingerprint, ck.parts)
        if state is None:
            return None
        self.state = LoopState(state["epoch"], state["batch_in_epoch"], state["optimizer_steps"],
                               state["micro_steps"], state["loss_sum"], dict(state["sums"]))
        # Checkpoints of older versions could fall inside a window; their gradients were restored with the weights.
        self._pending = state["accum_position"]
        self._window = []
        log.info("%s: resuming at epoch %d, batch %d (micro-step %d, optimizer step %d)", self.prefix,
                 self.state.epoch + 1, self.state.batch_in_epoch, self.state.micro_steps, self.state.optimizer_steps)
        return state

    def save_checkpoint(self) -> Optional[Path]:
        """Save where training stands now (every rank calls it; rank 0 writes). No-op without checkpointing.

        Only at the end of an accumulation window: a checkpoint never holds half-accumulated gradients.
        """
        ck = self.checkpointing
        if ck is None:
            return None
        if self._pending:
            raise RuntimeError(f"{self.prefix}: a checkpoint was asked for inside an accumulation window "
                               f"({self._pending} of {self.accum_iters} micro-batches accumulated); save at its end")
        self.flush()  # the state must hold every trained step, and corrupted weights are never saved
        s = self.state
        state = {"epoch": s.epoch, "batch_in_epoch": s.batch_in_epoch, "optimizer_steps": s.optimizer_steps,
                 "micro_steps": s.micro_steps, "accum_position": 0, "loss_sum": s.loss_sum,
                 "sums": dict(s.sums), "fingerprint_parts": ck.parts,
                 **(self.best.to_state() if self.best is not None else {}), **self._task_state()}
        tensors = self.best.tensors() if self.best is not None else {}
        path = save_training_checkpoint(ck.directory, self.model, self.optimizer, self.scheduler, state,
                                        ck.fingerprint, keep=ck.keep, tensors=tensors)
        self._save_due = False
        for callback in self.callbacks:
            callback.on_checkpoint(self, path)
        return path

    def _task_state(self) -> dict:
        if self.task is None:
            return {}
        state = self.task.state()
        clash = sorted(set(state) & set(LOOP_KEYS))
        if clash:
            raise ValueError(f"{self.prefix}: the task's checkpoint state may not use the loop's keys {clash}")
        return state

    def _maybe_checkpoint(self) -> None:
        ck = self.checkpointing
        if ck is None or not ck.every:
            return
        if self.state.micro_steps % ck.every == 0:
            self._save_due = True
        # At the window's end only: under DDP each rank's gradients inside a window are its own, and on
        # one process a checkpoint would have to carry them.
        if self._save_due and self._pending == 0:
            self.save_checkpoint()

    # ---- training

    def fit(self, task: TrainingTask, epochs: int, best: BestEpoch, *, patience: Optional[int] = None,
            total: Optional[int] = None, tag: Optional[str] = None) -> BestEpoch:
        """Train ``task`` up to ``epochs`` epochs, each evaluated and checkpointed at its end; returns ``best``.

        A checkpoint of this run is resumed first (``best`` and the task's state restored). With
        ``patience``, training stops after that many epochs without a better score, and a resumed run
        that had stopped (or finished) stays stopped. ``total``: batches an epoch (progress only);
        ``tag``: the epoch log line's name (the trainer's prefix by default).
        """
        self.best, self.task = best, task
        restored = self.resume()
        if restored:
            best.restore(restored)
            task.load_state({k: v for k, v in restored.items() if k not in LOOP_KEYS})
        tag = tag or self.prefix
        main = distributed.rank() == 0
        clock = EpochClock(epochs, first_epoch=self.state.epoch)
        while self.state.epoch < epochs and not self._out_of_patience(patience):
            epoch = self.state.epoch
            sums = self.train_epoch(task.batches(epoch, self.state.batch_in_epoch), task.loss, total=total)
            score, metrics = task.evaluate(epoch, sums)  # every rank evaluates: the same numbers, the same decision
            improved = best.update(score, epoch + 1, metrics, self.model)  # NaN-safe: epoch 1 always counts
            if main:
                log.info("%s", clock.line(tag, epoch + 1, task.shown(metrics)))
            task.on_epoch(epoch + 1, metrics, improved)
            if main and not improved and self._out_of_patience(patience):
                log.info("%s: early stop after epoch %d (best epoch %d)", tag, epoch + 1, best.epoch)
            self.save_checkpoint()
        return best

    def _out_of_patience(self, patience: Optional[int]) -> bool:
        best = self.best
        return patience is not None and best is not None and best.weights is not None and best.since >= patience

    def train_step(self, batch: object, loss_fn: LossFn, sync: bool = False) -> tuple[torch.Tensor, dict[str, object]]:
        """One micro-batch: forward under autocast, backward, and the optimizer step once
        ``accum_iters`` micro-batches have accumulated, or at once when ``sync`` (the epoch's last
        micro-batch). Returns the micro-batch loss (detached, on the device) and its counts.

        Nothing here waits for the device: the loss and counts join the current logging window and
        are read by ``flush`` (every ``log_every`` optimizer steps, at checkpoints and epoch ends).
        """
        self.model.train()
        s = self.state
        step_now = sync or self._pending + 1 == self.accum_iters
        with distributed.no_sync_unless(self.model, step_now):
            with autocast(self.precision, self.device):
                loss, counts = loss_fn(self.model, batch)
            (loss / self.accum_iters).backward()
        loss = loss.detach()
        self._window.append(_Trained((s.epoch + 1, s.batch_in_epoch + 1, s.micro_steps + 1, s.optimizer_steps),
                                     loss, counts))
        self._pending += 1
        s.micro_steps += 1
        s.batch_in_epoch += 1
        if step_now:
            self._optimizer_step()
        return loss, counts

    def train_epoch(self, batches: Iterable, loss_fn: LossFn, total: Optional[int] = None) -> dict[str, float]:
        """The rest of the current epoch; returns its mean loss and summed counts (over ranks under DDP).

        ``batches`` must start at ``state.batch_in_epoch`` (0, or where a resumed checkpoint
        stopped); ``total`` is the epoch's number of batches (progress only). A last, incomplete
        accumulation window still gets its optimizer step.
        """
        s = self.state
        remaining = None if total is None else total - s.batch_in_epoch
        for batch, last in with_last(progress(batches, remaining, f"{self.prefix} epoch {s.epoch + 1}")):
            self.train_step(batch, loss_fn, sync=last)
            self._maybe_checkpoint()
        if self._pending:  # only when no batch was left to carry the step
            self._optimizer_step()
        self.flush()
        result = self._epoch_totals()
        s.epoch += 1
        s.batch_in_epoch, s.loss_sum, s.sums = 0, 0.0, {}
        self._save_due = False
        return result

    def flush(self) -> None:
        """Read the trained micro-steps' losses and counts from the device in one transfer (the one host
        sync of a logging window), add them to the epoch's sums in step order, and stop at the first
        non-finite loss (on any rank), naming its step. Every rank calls it at the same points."""
        window, self._window = self._window, []
        if not window:
            return
        losses = torch.stack([t.loss.to(torch.float64) for t in window])  # (n,)
        bad = (~torch.isfinite(losses)).to(torch.float64)  # (n,)
        if distributed.world_size() > 1:  # every rank stops at the same step, none waits on a collective
            bad = distributed.all_reduce_sum(bad)
        on_device = [v for t in window for v in t.counts.values() if isinstance(v, torch.Tensor)]
        parts = [losses, bad]
        if on_device:
            parts.append(torch.stack([v.to(losses.device, torch.float64).reshape(()) for v in on_device]))
        values = torch.cat(parts).tolist()
        n = len(window)
        device_counts = iter(values[2 * n:])
        s = self.state
        for trained, loss, flag in zip(window, values[:n], values[n:2 * n]):
            if flag:
                self._raise_non_finite(trained.position, loss)
            s.loss_sum += loss
            for key, value in trained.counts.items():
                value = next(device_counts) if isinstance(value, torch.Tensor) else float(value)
                s.sums[key] = s.sums.get(key, 0.0) + value
        self._last_loss = values[n - 1]

    def _epoch_totals(self) -> dict[str, float]:
        s = self.state
        if distributed.world_size() == 1:
            return {"loss": s.loss_sum / max(s.batch_in_epoch, 1), **s.sums}
        keys = sorted(s.sums)
        totals = torch.tensor([s.loss_sum, s.batch_in_epoch, *(s.sums[k] for k in keys)], dtype=torch.float64,
                              device=self.device)
        totals = distributed.all_reduce_sum(totals).tolist()
        return {"loss": totals[0] / max(totals[1], 1), **dict(zip(keys, totals[2:]))}

    def _raise_non_finite(self, position: tuple[int, int, int, int], loss: float) -> None:
        epoch, batch, micro_step, optimizer_steps = position
        where = f"epoch {epoch}, batch {batch} (micro-step {micro_step}, optimizer step {optimizer_steps})"
        what = f"loss is {loss}" if not math.isfinite(loss) else "the loss is not finite on another rank"
        kept = (f"the last checkpoint in {self.checkpointing.directory} is intact" if self.checkpointing
                else "no checkpoint is written by this loop")
        raise NonFiniteLossError(
            f"{self.prefix}: {what} at {where}; stopped within its logging window, before any checkpoint took "
            f"the corrupted weights ({kept}). Lower the learning rate, set a max_grad_norm, or use fp32 precision."
        )

    def _optimizer_step(self) -> None:
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self._trainable, self.max_grad_norm)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._pending = 0
        self.state.optimizer_steps += 1
        if self.state.optimizer_steps % self.log_every == 0:  # the end of a logging window
            self.flush()
            if self.tracker and self._last_loss is not None:
                lr = self.optimizer.param_groups[0]["lr"]
                running = self.running(self.state.sums) if self.running else {}
                self.tracker.log_metrics({f"{self.prefix}_loss": self._last_loss, f"{self.prefix}_lr": lr,
                                          **{f"{self.prefix}_{k}": float(v) for k, v in running.items()}},
                                         step=self.state.optimizer_steps)
