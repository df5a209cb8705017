"""Training checkpoints: everything needed to continue a run as if it had never stopped.

A checkpoint is a directory ``<dir>/step-XXXXXXXX`` (the micro-step count: unique even inside an
accumulation window) holding

- ``model.safetensors``: the weights (tied tensors stored once, their aliases in the metadata);
- ``optimizer.pt`` / ``scheduler.pt``: ``state_dict()`` written by ``torch.save`` and read back only
  with ``torch.load(weights_only=True)``: tensors and plain numbers, never arbitrary pickles;
- ``gradients.safetensors``: the accumulated gradients, only when saved inside an accumulation window;
- ``<name>.safetensors``: any further tensor groups of the caller (e.g. ``best``, the weights of the
  best epoch so far, so that early stopping and model selection survive a restart);
- ``trainer.json``: counters, data position, config fingerprint, and every RNG state (python,
  numpy, torch CPU and CUDA; one set per rank) as plain ints and lists;
- ``checksums.json``: the sha256 of each of those files.

Writes go to ``step-XXXXXXXX.tmp``, are fsynced, then renamed; older checkpoints are pruned only
once the new one is complete. On resume the newest checkpoint whose checksums verify is used; a
truncated or corrupted one is reported by name and the previous one is taken instead.

The MLM masks and the batch order are pure functions of (seed, epoch, step) (``pretrain.step_seed``,
``batch.epoch_order``), so the data stream needs only its position, not a generator state.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Union

try:
    import fcntl
except ImportError:  # not POSIX: the lock falls back to checking the PID in the file
    fcntl = None  # type: ignore[assignment]

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from twilbert import distributed
from twilbert.errors import naming
from twilbert.io_utils import _fsync_dir as _fsync  # best-effort fsync of a file or directory
from twilbert.model.io import CheckpointError, load_into, untie
from twilbert.model.safetensors_writer import save_file

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
GRADIENTS_FILE = "gradients.safetensors"
TRAINER_FILE = "trainer.json"
CHECKSUMS_FILE = "checksums.json"
REQUIRED_FILES = (MODEL_FILE, OPTIMIZER_FILE, TRAINER_FILE)
TENSORS_KEY = "tensors"  # the key under which loading returns the caller's tensor groups
RESERVED_GROUPS = ("model", "optimizer", "scheduler", "gradients", "trainer", "checksums")
HASH_WHOLE_FILE_UP_TO = 64 << 20  # larger inputs are fingerprinted by size, head and tail
HASH_HEAD_TAIL = 4 << 20

# What trainer.json must say about where training stands (the caller may add any JSON-able keys).
STATE_KEYS = ("epoch", "batch_in_epoch", "optimizer_steps", "micro_steps", "accum_position")

# Config keys that do not change the training trajectory: a run may continue after they change.
# ``epochs`` only moves the end (the batch order and learning-rate schedule depend on the epoch and
# step, not on the total), ``device`` lets a run move to another machine (not bit-exact across
# device types). Keys match as dotted suffixes, so ``finetuning.epochs`` also covers a task's own
# ``tasks.<name>.finetuning.epochs``.
NON_TRAJECTORY_KEYS = (
    "tracking",
    "training.epochs",
    "training.log_every",
    "training.device",
    "training.checkpoint_every",
    "finetuning.epochs",
    "finetuning.patience",
    "finetuning.pred_batch_size",
    "finetuning.device",
    "finetuning.checkpoint_every",
    "finetuning.baseline_model",  # the baseline row is refitted each time; it has no trajectory
    "finetuning.baseline_c",
    "finetuning.baseline_row",
)

_STEP_DIR = re.compile(r"^step-(\d{8,})$")
_GROUP_NAME = re.compile(r"[a-z][a-z0-9_]*")
_LEFTOVER = re.compile(r"^step-(\d{8,})\.(tmp|old)$")


class TrainingCheckpointError(CheckpointError):
    """A training checkpoint is incomplete, corrupted, or refused; the message names the file."""


class CheckpointLockError(TrainingCheckpointError):
    """Another live process writes training checkpoints to the same directory."""


# --------------------------------------------------------------------------------------------
# One writer per checkpoint directory
# --------------------------------------------------------------------------------------------

LOCK_FILE = "writer.lock"


@contextmanager
def checkpoint_lock(directory: PathLike, enabled: bool = True) -> Iterator[Optional[Path]]:
    """Hold ``<directory>/writer.lock`` (the owner's PID) while this process writes there.

    A second writer is refused with CheckpointLockError naming the owner's PID. The lock is an
    ``flock`` on the file, which the kernel drops when its owner dies however it dies, so a lock
    file left by a killed run (its PID gone) is simply taken over. The file is removed on release:
    DVC hashes the directory. Without ``fcntl`` (Windows) the PID in the file is checked instead.
    """
    if not enabled:
        yield None
        return
    directory = Path(directory)
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    try:
        fd = _acquire_lock(path)
    except BaseException:
        if created:
            _remove_if_empty(directory)
        raise
    try:
        yield path
    finally:
        try:
            os.unlink(path)  # while still holding it: a waiting writer re-checks the inode
        except FileNotFoundError:
            pass
        os.close(fd)
        if created:  # a run that failed before its first checkpoint leaves nothing behind
            _remove_if_empty(directory)


def _remove_if_empty(directory: Path) -> None:
    try:
        directory.rmdir()
    except OSError:
        pass


def _acquire_lock(path: Path) -> int:
    for _ in range(100):  # retried only when the file is replaced between open() and flock()
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            owner = _read_pid(fd)
            if not _try_flock(fd) or (fcntl is None and owner not in (None, os.getpid()) and _pid_alive(owner)):
                raise CheckpointLockError(
                    f"{path.parent}: another process (PID {owner if owner is not None else '?'}) is writing training "
                    f"checkpoints here; wait for it to finish or stop it (kill {owner}), then rerun"
                )
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if not same:  # its owner removed it as we opened it: lock the new one
                os.close(fd)
                continue
            if owner is not None and owner != os.getpid():
                log.warning("%s: taking over the lock of PID %d, which is gone", path, owner)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            os.fsync(fd)
            return fd
        except BaseException:
            try:
                os.close(fd)
            except OSError:
                pass
            raise
    raise CheckpointLockError(f"{path}: could not take the lock (the file keeps being replaced)")


def _try_flock(fd: int) -> bool:
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _read_pid(fd: int) -> Optional[int]:
    text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------------------------
# Config fingerprint
# --------------------------------------------------------------------------------------------


def config_fingerprint(
    raw_config: Mapping[str, Any],
    include: Optional[Iterable[str]] = None,
    ignore: Iterable[str] = NON_TRAJECTORY_KEYS,
) -> str:
    """sha256 of the config's canonical JSON, without the keys that do not affect the trajectory.

    ``include`` (dotted keys, as a DVC stage's ``params``) restricts it to what the stage reads, e.g.
    ``("seed", "model", "training", "representation.max_len")`` for pretraining.
    """
    tree: Any = dict(raw_config)
    if include is not None:
        tree = {}
        for key in include:
            value = _lookup(raw_config, key)
            if value is not _MISSING:
                tree[key] = value
    pruned = _prune_keys(tree, tuple(ignore), "")
    text = json.dumps(pruned, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


_MISSING = object()


def _lookup(tree: Mapping[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _prune_keys(node: Any, ignore: tuple[str, ...], prefix: str) -> Any:
    if not isinstance(node, Mapping):
        return node
    out = {}
    for key, value in node.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if any(path == k or path.endswith("." + k) for k in ignore):
            continue
        out[str(key)] = _prune_keys(value, ignore, path)
    return out


def files_digest(paths: Iterable[PathLike]) -> str:
    """sha256 over the files under ``paths`` (files or directories): relative names, sizes, contents.

    Files larger than 64 MiB (pair shards of a large corpus) contribute their size and their first
    and last 4 MiB, so fingerprinting stays quick; a change inside such a file that keeps its size
    and both ends goes unnoticed. Missing paths count as absent, ``__pycache__`` is skipped.
    """
    digest = hashlib.sha256()
    for root in (Path(p) for p in paths):  # in the caller's order: names, not locations, are hashed
        if root.is_dir():
            files = sorted(f for f in root.rglob("*") if f.is_file() and "__pycache__" not in f.parts)
        else:
            files = [root] if root.is_file() else []
        digest.update(f"{root.name}:{len(files)}\n".encode())
        for file in files:
            size = file.stat().st_size
            digest.update(f"{file.relative_to(root.parent).as_posix()}:{size}\n".encode())
            with open(file, "rb") as fh:
                if size <= HASH_WHOLE_FILE_UP_TO:
                    while block := fh.read(1 << 20):
                        digest.update(block)
                else:
                    digest.update(fh.read(HASH_HEAD_TAIL))
                    fh.seek(size - HASH_HEAD_TAIL)
                    digest.update(fh.read(HASH_HEAD_TAIL))
    return digest.hexdigest()


def package_paths(*relative: str) -> list[Path]:
    """Paths inside the installed ``twilbert`` package (the code a run's fingerprint covers)."""
    root = Path(__file__).resolve().parents[1]
    return [root / r for r in relative]


def run_fingerprint(parts: Mapping[str, str]) -> str:
    """One fingerprint of a run from named parts (e.g. config, inputs, code digests)."""
    return hashlib.sha256(json.dumps(dict(parts), sort_keys=True).encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------
# RNG states as plain JSON
# --------------------------------------------------------------------------------------------


def capture_rng_state() -> dict:
    """This process's python, numpy, torch CPU (and CUDA) RNG states as ints and lists."""
    version, internal, gauss_next = random.getstate()
    np_state = np.random.get_state(legacy=False)
    cuda = []
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "state": {"key": np_state["state"]["key"].tolist(), "pos": int(np_state["state"]["pos"])},
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state().tolist(),
        "cuda": cuda,
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state({
        "bit_generator": npy["bit_generator"],
        "state": {"key": np.asarray(npy["state"]["key"], dtype=np.uint32), "pos": npy["state"]["pos"]},
        "has_gauss": npy["has_gauss"],
        "gauss": npy["gauss"],
    })
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in cuda])
        else:
            log.warning("checkpoint holds %d CUDA RNG states, this node has %d GPUs: CUDA RNGs not restored",
                        len(cuda), torch.cuda.device_count())


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
    Under DDP every rank calls this; each rank's RNG state is gathered, and only rank 0 writes,
    between two barriers (no rank runs ahead of, or reads, a half-written checkpoint).
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
        "rng": distributed.all_gather_object(capture_rng_state()),
    }
    try:
        trainer_text = json.dumps(trainer)  # fails on unserialisable state before touching disk
    except TypeError as err:
        raise ValueError(f"training state must hold JSON values (int, float, str, lists, dicts): {err}") from None
    gradients = None
    if state["accum_position"]:
        if distributed.world_size() > 1:
            raise ValueError("under DDP, save checkpoints at accumulation boundaries (accum_position 0): "
                             "inside a window each rank's gradients are still unsynchronized")
        gradients = {name: p.grad.detach().cpu().contiguous()
                     for name, p in distributed.unwrap(model).named_parameters() if p.grad is not None}
    directory = Path(directory)
    final = directory / checkpoint_name(state["micro_steps"])
    distributed.barrier()
    if distributed.rank() == 0:
        with naming(final):  # a full disk met by write() names no file: name the checkpoint
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
    _clean_leftovers(directory)
    tmp = final.with_name(final.name + ".tmp")
    tmp.mkdir()
    try:
        # Tied tensors are stored once; each alias is a metadata key naming the tensor kept.
        weights, aliases = untie(distributed.unwrap(model).state_dict())
        save_file(weights, tmp / MODEL_FILE, metadata={"format": "pt", **aliases})
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        if scheduler is not None:
            torch.save(scheduler.state_dict(), tmp / SCHEDULER_FILE)
        if gradients is not None:
            save_file(gradients, str(tmp / GRADIENTS_FILE), metadata={"format": "pt"})
        for name, group in tensors.items():
            plain = {k: v.detach().cpu().contiguous() for k, v in group.items()}
            save_file(plain, str(tmp / f"{name}.safetensors"), metadata={"format": "pt"})
        (tmp / TRAINER_FILE).write_text(trainer_text, encoding="utf-8")
        sums = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
        (tmp / CHECKSUMS_FILE).write_text(json.dumps(sums, indent=2), encoding="utf-8")
        for path in tmp.iterdir():
            _fsync(path)
        _fsync(tmp)
        if final.exists():  # the same step saved twice: swap, keeping the old one until the new is in place
            old = final.with_name(final.name + ".old")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        _fsync(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.debug("saved training checkpoint %s", final)


def _clean_leftovers(directory: Path) -> None:
    """Remove what an interrupted save left: ``.tmp`` directories, and ``.old`` ones already replaced."""
    for entry in directory.iterdir():
        match = _LEFTOVER.match(entry.name)
        if not match or not entry.is_dir():
            continue
        kept = directory / f"step-{match.group(1)}"
        if match.group(2) == "old" and not kept.exists():
            os.replace(entry, kept)  # the crash fell between the two renames: the old one is the good one
            continue
        log.info("removing %s, left by an interrupted save", entry)
        shutil.rmtree(entry, ignore_errors=True)


def _prune(directory: Path, keep: int, current: int) -> None:
    steps = sorted(list_checkpoints(directory), key=_step_of, reverse=True)
    newer = [p for p in steps if _step_of(p) > current]
    older = [p for p in steps if _step_of(p) <= current]
    for path in newer + older[keep:]:
        shutil.rmtree(path, ignore_errors=True)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


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
    path = Path(path)
    sums_path = path / CHECKSUMS_FILE
    sums = _read_json(sums_path)
    if not isinstance(sums, dict) or not all(isinstance(v, str) for v in sums.values()):
        raise TrainingCheckpointError(f"{sums_path}: corrupted (expected a JSON object of sha256 strings)")
    unlisted = [name for name in REQUIRED_FILES if name not in sums]
    if unlisted:
        raise TrainingCheckpointError(f"{sums_path}: does not list {unlisted}")
    for name, expected in sums.items():
        file = path / name
        if "/" in name or "\\" in name or name.startswith("."):
            raise TrainingCheckpointError(f"{sums_path}: unexpected entry {name!r}")
        if not file.is_file():
            raise TrainingCheckpointError(f"{file}: missing")
        actual = sha256_file(file)
        if actual != expected:
            raise TrainingCheckpointError(
                f"{file}: checksum mismatch (sha256 {actual[:12]}..., expected {expected[:12]}...): "
                "truncated or corrupted on disk"
            )


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


def _read_tensors(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except FileNotFoundError:
        raise TrainingCheckpointError(f"{file}: missing") from None
    except (SafetensorError, OSError, ValueError) as err:
        raise TrainingCheckpointError(f"{file}: corrupt or not a safetensors file ({err})") from None
    return tensors, metadata


def load_training_checkpoint(
    path: PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Optional[Any] = None,
    restore_rng: bool = True,
    verify: bool = True,
) -> dict:
    """Restore model, optimizer, scheduler, accumulated gradients and this rank's RNG states; return ``state``.

    Every file is read and checked before anything is modified, so a refused checkpoint leaves the
    model and optimizer as they were.
    """
    path = Path(path)
    if verify:
        verify_checkpoint(path)
    trainer = read_trainer_state(path)
    tensors, metadata = _read_tensors(path / MODEL_FILE)
    optimizer_state = _load_state_dict(path / OPTIMIZER_FILE)
    scheduler_state = None
    if scheduler is not None:
        scheduler_state = _load_state_dict(path / SCHEDULER_FILE)
    gradients = None
    if trainer["state"]["accum_position"]:
        gradients, _ = _read_tensors(path / GRADIENTS_FILE)
    groups = {name: _read_tensors(path / f"{name}.safetensors")[0] for name in trainer["tensor_groups"]}

    # Tied tensors were stored once; the metadata maps each dropped alias -> the kept name.
    for alias, kept in metadata.items():
        if alias not in tensors and kept in tensors:
            tensors[alias] = tensors[kept]
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
        states = trainer["rng"]
        me, n = distributed.rank(), distributed.world_size()
        if len(states) != n:
            log.warning("%s was saved by %d rank(s), resuming on %d: RNG streams are not continued exactly",
                        path, len(states), n)
        restore_rng_state(states[me % len(states)])
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
    (only the latest superseded run is kept). Under DDP rank 0 chooses and every rank loads the same
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
    root = directory / "superseded"
    target = root / fingerprint[:16]
    if root.is_dir():  # bounded disk: only the latest superseded run is kept
        for old in root.iterdir():
            if old != target:
                shutil.rmtree(old, ignore_errors=True)
    target.mkdir(parents=True, exist_ok=True)
    for path in list_checkpoints(directory):
        if (target / path.name).exists():
            shutil.rmtree(target / path.name)
        os.replace(path, target / path.name)
    log.warning(
        "%s changed since the checkpoints in %s were written: not the same run, starting fresh; "
        "the old checkpoints were moved to %s", what, directory, target,
    )
