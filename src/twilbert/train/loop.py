"""One training loop for pretraining and finetuning: micro-batches summed in a fixed order, accumulation,
bf16 autocast, clipping, logging, training checkpoints with exact resume.

A step of the loop trains one global batch of K micro-batches (``distributed.GlobalBatch``): every
random draw of micro-batch k (masks, dropout) is keyed by (seed, epoch, global batch, k), its loss is
normalized by counts of the whole global batch, and the K gradients are summed in one fixed tree
order (``train.grad_tree``) however many workers computed them. Every worker then holds the same
gradient and takes the same optimizer step (no DDP wrapper), so weights, logged losses and metrics
are the same bytes for any number of workers of one device type, and a run resumes on any of them.

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
holds half-accumulated gradients. "Micro-steps" in the state and checkpoint names count global batches.
"""

from __future__ import annotations

import logging
import math
import os
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

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
from twilbert.train.distributed import GlobalBatch
from twilbert.train.grad_tree import combine, flat_size, put_grads, take_grads
from twilbert.train.micro import LossFn, MicroLoss, Running, TrainingTask, gather_micro_values, global_totals
from twilbert.train.rng_state import step_seed

log = logging.getLogger(__name__)
CPU = torch.device("cpu")  # the default device of a Trainer

DROPOUT_STREAM = 1  # the last key of a micro-batch's dropout seed; masks use the key without it


class NonFiniteLossError(TwilbertError, RuntimeError):
    """The loss became NaN or infinite; training stopped before any checkpoint took the corrupted weights."""


@dataclass
class _Trained:
    """A trained global batch whose losses and counts may still live on the device (read at the next flush)."""

    position: tuple[int, int, int, int]  # epoch, batch (1-based), micro-step (1-based), optimizer steps before it
    n_micro: int
    losses: dict[int, torch.Tensor]  # micro-batch k of this worker -> its loss, () detached
    counts: dict[int, dict[str, object]]


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
    """Runs epochs of global batches with gradient accumulation over ``accum_iters`` of them.

    Under torchrun every worker trains its block of each global batch's micro-batches and the
    gradients are combined in a fixed order (``grad_tree.combine``); ``model`` is the plain model (or
    its compiled form), never DDP. ``seed``: dropout of micro-batch k of global batch s in epoch e is
    seeded by (seed, e, s, k) (None: the process's own stream, for bare training steps).
    Checkpoints wait for a window boundary. ``running(sums)``: metrics of the epoch so far logged with
    each logged step (with ``tracker``).
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
        seed: Optional[int] = None,
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
        self.seed = seed
        self._trainable = [p for p in model.parameters() if p.requires_grad]
        self._size = flat_size(self._trainable)
        self._grad: Optional[torch.Tensor] = None  # the window's gradient so far, flat fp32
        distributed.broadcast_weights(model)  # built identically on every rank; this makes it certain
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
        if self._pending:  # the restored window's gradients, where the next global batches add theirs
            self._grad = take_grads(self._trainable, self.device)
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
        # At the window's end only: inside a window the combined gradient so far would have to travel
        # in the checkpoint.
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

    def train_step(self, batch: object, loss_fn: "MicroLoss | LossFn",
                   sync: bool = False) -> tuple[list[torch.Tensor], list[dict[str, object]]]:
        """One global batch (a ``GlobalBatch``, or a plain batch: one micro-batch on one process): each of
        this worker's micro-batches forward under autocast and backward, their gradients combined in tree
        order over all workers and added to the window's; the optimizer step once ``accum_iters`` global
        batches have accumulated, or at once when ``sync`` (the epoch's last). Returns this worker's
        micro-batch losses (detached, on the device) and counts.

        Nothing here reads the device: the losses and counts join the current logging window and are read
        by ``flush`` (every ``log_every`` optimizer steps, at checkpoints and epoch ends).
        """
        self.model.train()
        s = self.state
        if not isinstance(batch, GlobalBatch):
            if distributed.world_size() > 1:
                raise ValueError(f"{self.prefix}: under torchrun the loop trains GlobalBatch shares, not plain batches")
            batch = GlobalBatch(s.batch_in_epoch, 1, [(0, batch)])
        micro = hasattr(loss_fn, "prepare")
        if not micro and batch.n_micro > 1:
            raise ValueError(f"{self.prefix}: {batch.n_micro} micro-batches need a MicroLoss (global normalizers)")
        prepared, denominators = {}, {}
        for k, part in batch.micro:
            if part is None:  # an empty micro-batch of a short global batch adds nothing
                continue
            keys = (s.epoch, batch.index, k)
            prepared[k], denominators[k] = loss_fn.prepare(part, keys) if micro else (part, ())
        totals = global_totals(batch.n_micro, denominators, loss_fn.normalizers, self.device) if micro else None
        losses: dict[int, torch.Tensor] = {}
        counts: dict[int, dict[str, object]] = {}

        def leaf(k: int) -> torch.Tensor:
            if k in prepared:
                if self.seed is not None:
                    torch.manual_seed(step_seed(self.seed, s.epoch, batch.index, k, DROPOUT_STREAM))
                with autocast(self.precision, self.device):
                    if micro:
                        loss, counts[k] = loss_fn.micro_loss(self.model, prepared[k], totals)
                    else:
                        loss, counts[k] = loss_fn(self.model, prepared[k])
                (loss / self.accum_iters).backward()
                losses[k] = loss.detach()
            return take_grads(self._trainable, self.device)

        root = combine(batch.n_micro, leaf, self._size, self.device)
        if self._grad is None:
            self._grad = root
        else:
            self._grad += root  # the window's global batches in order, the same on every worker
        self._window.append(_Trained((s.epoch + 1, s.batch_in_epoch + 1, s.micro_steps + 1, s.optimizer_steps),
                                     batch.n_micro, losses, counts))
        self._pending += 1
        s.micro_steps += 1
        s.batch_in_epoch += 1
        if sync or self._pending == self.accum_iters:
            self._optimizer_step()
        return list(losses.values()), list(counts.values())

    def train_epoch(self, batches: Iterable, loss_fn: LossFn, total: Optional[int] = None) -> dict[str, float]:
        """The rest of the current epoch; returns its mean loss and summed counts (over all workers).

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
        """Read the trained global batches' losses and counts from the device in one transfer (the one
        host sync of a logging window), gathered from every worker, and add them to the epoch's sums:
        micro-batch values in micro-batch order, global batches in step order, so the sums are the same
        for any number of workers. Stops at the first non-finite loss, naming its step; every worker sees
        every loss, so all stop together. Every rank calls it at the same points."""
        window, self._window = self._window, []
        if not window:
            return
        keys = sorted({key for t in window for c in t.counts.values() for key in c})
        keys, values = gather_micro_values([(t.losses, t.counts) for t in window],
                                           max(t.n_micro for t in window), keys, self.device)
        s = self.state
        for trained, rows in zip(window, values):
            step_loss = 0.0
            for k, row in enumerate(rows):
                if not math.isfinite(row[0]):
                    self._raise_non_finite(trained.position, k, row[0])
                step_loss += row[0]
            s.loss_sum += step_loss
            for j, key in enumerate(keys, 1):
                total = 0.0
                for row in rows:
                    total += row[j]
                s.sums[key] = s.sums.get(key, 0.0) + total
            self._last_loss = step_loss

    def _epoch_totals(self) -> dict[str, float]:
        s = self.state  # every worker's flush summed every worker's values
        return {"loss": s.loss_sum / max(s.batch_in_epoch, 1), **s.sums}

    def _raise_non_finite(self, position: tuple[int, int, int, int], micro: int, loss: float) -> None:
        epoch, batch, micro_step, optimizer_steps = position
        where = (f"epoch {epoch}, batch {batch} (micro-batch {micro}, micro-step {micro_step}, "
                 f"optimizer step {optimizer_steps})")
        what = f"loss is {loss}"
        kept = (f"the last checkpoint in {self.checkpointing.directory} is intact" if self.checkpointing
                else "no checkpoint is written by this loop")
        raise NonFiniteLossError(
            f"{self.prefix}: {what} at {where}; stopped within its logging window, before any checkpoint took "
            f"the corrupted weights ({kept}). Lower the learning rate, set a max_grad_norm, or use fp32 precision."
        )

    def _optimizer_step(self) -> None:
        if self._grad is not None:
            put_grads(self._trainable, self._grad)
            self._grad = None
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
