"""Training checkpoints: everything needed to continue a run as if it had never stopped.

``<dir>/step-XXXXXXXX`` (micro-steps) holds the weights and tensor groups as safetensors, optimizer and
scheduler state dicts (read with ``weights_only=True``), ``trainer.json`` (counters, data position, config
fingerprint, RNG states) and ``checksums.json``; saves publish atomically (``io_utils.publish_dir``).
Resume takes the newest checkpoint that verifies. The writer lock is in ``writer_lock``.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from twilbert.io_utils import CHECKSUMS_NAME, clean_leftovers, publish_dir, verify_checksums
from twilbert.model.io import CheckpointError, load_into, read_weights, save_weights
from twilbert.train import distributed
from twilbert.train.rng_state import capture_rng_state, restore_rng_state

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
GRADIENTS_FILE = "gradients.safetensors"
TRAINER_FILE = "trainer.json"
CHECKSUMS_FILE = CHECKSUMS_NAME
REQUIRED_FILES = (MODEL_FILE, OPTIMIZER_FILE, TRAINER_FILE)
TENSORS_KEY = "tensors"  # the key under which loading returns the caller's tensor groups
RESERVED_GROUPS = ("model", "optimizer", "scheduler", "gradients", "trainer", "checksums")

# What trainer.json must say about where training stands (the caller may add any JSON-able keys).
STATE_KEYS = ("epoch", "batch_in_epoch", "optimizer_steps", "micro_steps", "accum_position")


_STEP_DIR = re.compile(r"^step-(\d{8,})$")
_GROUP_NAME = re.compile(r"[a-z][a-z0-9_]*")


class TrainingCheckpointError(CheckpointError):
    """A training checkpoint is incomplete, corrupted, or refused; the message names the file."""


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------


def checkpoint_name(micro_steps: int) -> str:
    return f"step-{int(micro_steps):08d}"


def save_training_checkpoint(
    directory: PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Optional[Any],
    state: Mapping[str, Any],
    config_fingerprint: str,
    keep: int = 2,
    tensors: Optional[Mapping[str, Mapping[str, torch.Tensor]]] = None,
) -> Path:
    """Write ``<directory>/step-<micro_steps>`` atomically and prune all but the newest ``keep``.

    ``state`` holds :data:`STATE_KEYS` plus any JSON-able keys of the caller (epoch sums, best score).
    ``tensors`` maps a group name to tensors saved as ``<name>.safetensors`` (e.g. ``best``: the best
    epoch's weights); loading returns them under ``state["tensors"]``.
    Under torchrun every rank calls this and only rank 0 writes (with its RNG state: every micro-batch
    reseeds from its position, so no rank's stream needs continuing), between two barriers (no rank
    runs ahead of, or reads, a half-written checkpoint).
    Checkpoints newer than the one written belong to an abandoned timeline (resume passed them
    over as corrupted) and are removed with the pruning.
    """
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise ValueError(f"training state lacks {missing}; it needs {list(STATE_KEYS)}")
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    if TENSORS_KEY in state:
        raise ValueError(f"state key {TENSORS_KEY!r} is reserved for the tensor groups; pass them as tensors=")
    tensors = dict(tensors or {})
    bad = [name for name in tensors if not _valid_group(name)]
    if bad:
        raise ValueError(f"tensor group names {bad} are reserved or not lower_snake_case")
    trainer = {
        "format": FORMAT_VERSION,
        "config_fingerprint": config_fingerprint,
        "world_size": distributed.world_size(),
        "state": dict(state),
        "tensor_groups": sorted(tensors),
        "rng": [capture_rng_state()],
    }
    try:
        trainer_text = json.dumps(trainer)  # fails on unserialisable state before touching disk
    except TypeError as err:
        raise ValueError(f"training state must hold JSON values (int, float, str, lists, dicts): {err}") from None
    gradients = None
    if state["accum_position"]:
        if distributed.world_size() > 1:
            raise ValueError("under torchrun, save checkpoints at accumulation boundaries (accum_position 0): "
                             "inside a window each rank holds only its own micro-batches' gradients")
        gradients = {name: p.grad.detach().cpu().contiguous()
                     for name, p in distributed.unwrap(model).named_parameters() if p.grad is not None}
    directory = Path(directory)
    final = directory / checkpoint_name(state["micro_steps"])
    distributed.barrier()
    if distributed.rank() == 0:
        _write(directory, final, model, optimizer, scheduler, gradients, tensors, trainer_text)
        _prune(directory, keep, int(state["micro_steps"]))
    distributed.barrier()
    return final


def _valid_group(name: Any) -> bool:
    """A tensor group name that can only name a file of its own (no path, no clash with ours)."""
    return isinstance(name, str) and bool(_GROUP_NAME.fullmatch(name)) and name not in RESERVED_GROUPS


def _write(directory: Path, final: Path, model: nn.Module, optimizer, scheduler, gradients, tensors,
           trainer_text: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    clean_leftovers(directory, "step-*")  # what an interrupted save of another step left
    with publish_dir(final, checksums=True) as tmp:
        save_weights(distributed.unwrap(model).state_dict(), tmp / MODEL_FILE)  # tied tensors once
        _torch_save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        if scheduler is not None:
            _torch_save(scheduler.state_dict(), tmp / SCHEDULER_FILE)
        if gradients is not None:
            save_file(gradients, str(tmp / GRADIENTS_FILE))
        for name, group in tensors.items():
            plain = {k: v.detach().cpu().contiguous() for k, v in group.items()}
            save_file(plain, str(tmp / f"{name}.safetensors"))
        (tmp / TRAINER_FILE).write_text(trainer_text, encoding="utf-8")
    log.debug("saved training checkpoint %s", final)


def _torch_save(obj: Any, path: Path) -> None:
    # Through a Python file: torch.save given a path writes in C++ and turns a full disk into
    # "RuntimeError: unexpected pos". Given a file object, the write's OSError (ENOSPC) is raised,
    # though closing the zip writer may wrap it in a RuntimeError: the OSError is what happened.
    with open(path, "wb") as fh:
        try:
            torch.save(obj, fh)
        except RuntimeError as err:
            cause = err.__context__
            while cause is not None and not isinstance(cause, OSError):
                cause = cause.__context__
            if cause is None:
                raise
            raise cause from None


def _prune(directory: Path, keep: int, current: int) -> None:
    steps = sorted(list_checkpoints(directory), key=_step_of, reverse=True)
    newer = [p for p in steps if _step_of(p) > current]
    older = [p for p in steps if _step_of(p) <= current]
    for path in newer + older[keep:]:
        shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Finding and verifying
# --------------------------------------------------------------------------------------------


def _step_of(path: Path) -> int:
    return int(path.name.split("-", 1)[1].split(".", 1)[0])


def list_checkpoints(directory: PathLike) -> list[Path]:
    """Complete checkpoint directories (``step-XXXXXXXX``), oldest first; not verified."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if _STEP_DIR.match(p.name) and p.is_dir()]
    return sorted(found, key=_step_of)


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TrainingCheckpointError(f"{file}: missing (an incomplete checkpoint)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TrainingCheckpointError(f"{file}: corrupted, not valid JSON ({err})") from None


def verify_checkpoint(path: PathLike) -> None:
    """Raise TrainingCheckpointError unless every file listed in checksums.json is present and intact."""
    verify_checksums(path, TrainingCheckpointError, "truncated or corrupted on disk", required=REQUIRED_FILES)


def latest_valid_checkpoint(directory: PathLike) -> Optional[Path]:
    """The newest checkpoint of ``directory`` whose checksums verify; each one skipped is logged by name."""
    for path in reversed(list_checkpoints(directory)):
        try:
            verify_checkpoint(path)
        except TrainingCheckpointError as err:
            log.warning("skipping training checkpoint %s: %s; falling back to the previous one", path, err)
            continue
        return path
    return None


def read_trainer_state(path: PathLike) -> dict:
    """The parsed ``trainer.json`` of a checkpoint (format, fingerprint, state, RNG states)."""
    file = Path(path) / TRAINER_FILE
    trainer = _read_json(file)
    if not isinstance(trainer, dict) or trainer.get("format") != FORMAT_VERSION:
        raise TrainingCheckpointError(f"{file}: not a format-{FORMAT_VERSION} trainer state")
    missing = [k for k in STATE_KEYS if k not in trainer.get("state", {})]
    if missing or not isinstance(trainer.get("rng"), list) or not trainer["rng"]:
        raise TrainingCheckpointError(f"{file}: incomplete (state lacks {missing} or no RNG states)")
    groups = trainer.setdefault("tensor_groups", [])
    if not isinstance(groups, list) or not all(_valid_group(g) for g in groups):
        raise TrainingCheckpointError(f"{file}: corrupted tensor_groups {groups!r}")
    return trainer


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _load_state_dict(file: Path) -> dict:
    """torch.load with weights_only=True: tensors, numbers, strings and containers; no code runs."""
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise TrainingCheckpointError(f"{file}: missing") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TrainingCheckpointError(
            f"{file}: refused (not a plain state dict that weights_only=True can load; "
            f"possibly tampered with): {first}"
        ) from None
    if not isinstance(obj, dict):
        raise TrainingCheckpointError(f"{file}: expected a state dict, got {type(obj).__name__}")
    return obj


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file), device="cpu")
    except FileNotFoundError:
        raise TrainingCheckpointError(f"{file}: missing") from None
    except (SafetensorError, OSError, ValueError) as err:
        raise TrainingCheckpointError(f"{file}: corrupt or not a safetensors file ({err})") from None


def load_training_checkpoint(
    path: PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Optional[Any] = None,
    restore_rng: bool = True,
    verify: bool = True,
) -> dict:
    """Restore model, optimizer, scheduler, accumulated gradients and the RNG states (rank 0's, on every rank); return ``state``.

    Every file is read and checked before anything is modified, so a refused checkpoint leaves the
    model and optimizer as they were.
    """
    path = Path(path)
    if verify:
        verify_checkpoint(path)
    trainer = read_trainer_state(path)
    tensors = read_weights(path / MODEL_FILE, TrainingCheckpointError)
    optimizer_state = _load_state_dict(path / OPTIMIZER_FILE)
    scheduler_state = None
    if scheduler is not None:
        scheduler_state = _load_state_dict(path / SCHEDULER_FILE)
    gradients = None
    if trainer["state"]["accum_position"]:
        gradients = _read_tensors(path / GRADIENTS_FILE)
    groups = {name: _read_tensors(path / f"{name}.safetensors") for name in trainer["tensor_groups"]}

    plain = distributed.unwrap(model)
    try:
        load_into(plain, tensors, strict=True)
    except CheckpointError as err:
        raise TrainingCheckpointError(f"{path / MODEL_FILE}: {err}") from None
    try:
        optimizer.load_state_dict(optimizer_state)
    except (ValueError, KeyError) as err:
        raise TrainingCheckpointError(f"{path / OPTIMIZER_FILE}: does not fit the optimizer ({err})") from None
    if scheduler is not None:
        scheduler.load_state_dict(scheduler_state)
    optimizer.zero_grad(set_to_none=True)
    if gradients is not None:
        for name, p in plain.named_parameters():
            if name in gradients:
                p.grad = gradients[name].to(device=p.device, dtype=p.dtype)
    if restore_rng:
        # Rank 0's state (older checkpoints: one per rank). Training reseeds every micro-batch from its
        # position, so resuming on another number of workers continues exactly.
        restore_rng_state(trainer["rng"][0])
    log.info("resumed from %s (epoch %d, batch %d, optimizer step %d)", path, trainer["state"]["epoch"],
             trainer["state"]["batch_in_epoch"], trainer["state"]["optimizer_steps"])
    state = dict(trainer["state"])
    if groups:
        state[TENSORS_KEY] = groups
    return state


def resume_training(
    directory: PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Optional[Any],
    config_fingerprint: str,
    parts: Optional[Mapping[str, str]] = None,
) -> Optional[dict]:
    """Continue from the newest usable checkpoint of ``directory``: its ``state``, or None to start fresh.

    Corrupted or refused checkpoints are reported and passed over for the previous one. When the
    newest checkpoint was written under another config (fingerprint), the run starts fresh and says
    so (naming which of ``parts`` changed, when the caller saved them as ``state["fingerprint_parts"]``);
    the stale checkpoints move to ``<directory>/superseded/<fingerprint>/`` rather than being deleted
    (only the latest superseded run is kept). Under torchrun rank 0 chooses and every rank loads the same
    checkpoint (a shared filesystem).
    """
    directory = Path(directory)
    state, choice = None, None
    if distributed.rank() == 0:
        state, choice = _resume_first_usable(directory, model, optimizer, scheduler, config_fingerprint, parts)
    choice = distributed.broadcast_object(choice)
    if choice is not None and distributed.rank() != 0:
        state = load_training_checkpoint(directory / choice, model, optimizer, scheduler)
    return state


def _resume_first_usable(
    directory: Path, model, optimizer, scheduler, fingerprint: str, parts: Optional[Mapping[str, str]]
) -> tuple[Optional[dict], Optional[str]]:
    for path in reversed(list_checkpoints(directory)):
        try:
            verify_checkpoint(path)
            trainer = read_trainer_state(path)
            saved = trainer["config_fingerprint"]
            if saved != fingerprint:
                _supersede(directory, saved, _changed_parts(trainer["state"].get("fingerprint_parts"), parts))
                return None, None
            # Loading checks what checksums cannot (a consistent but refused file) before changing anything.
            return load_training_checkpoint(path, model, optimizer, scheduler, verify=False), path.name
        except TrainingCheckpointError as err:
            log.warning("skipping training checkpoint %s: %s; falling back to the previous one", path, err)
    return None, None


def _changed_parts(saved: Any, current: Optional[Mapping[str, str]]) -> str:
    """'the config', 'the inputs and the code'...: what differs between two fingerprint part maps."""
    if not isinstance(saved, Mapping) or not current:
        return "the config"
    changed = [name for name in sorted(set(saved) | set(current)) if saved.get(name) != current.get(name)]
    if not changed:
        return "the config"
    return " and ".join(f"the {name}" for name in changed)


def _supersede(directory: Path, fingerprint: str, what: str = "the config") -> None:
    """Move the checkpoints of another run aside to ``superseded/<fingerprint>``: only the latest
    superseded run is kept there, so disk use stays bounded however many experiments change the config."""
    root = directory / "superseded"
    target = root / fingerprint[:16]
    dropped = []
    if root.is_dir():
        for old in root.iterdir():
            if old != target:
                shutil.rmtree(old, ignore_errors=True)
                dropped.append(old.name)
    target.mkdir(parents=True, exist_ok=True)
    for path in list_checkpoints(directory):
        if (target / path.name).exists():
            shutil.rmtree(target / path.name)
        os.replace(path, target / path.name)
    # The normal path of an experiment that changes a param: an info line, not a warning.
    log.info(
        "%s changed since the checkpoints in %s were written: another run, starting fresh; its checkpoints "
        "were moved to %s (superseded/ keeps only the latest replaced run%s)", what, directory, target,
        f"; the one before, {', '.join(sorted(dropped))}, was deleted" if dropped else "",
    )
