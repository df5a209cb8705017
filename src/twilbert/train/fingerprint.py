"""Run fingerprints: what makes two runs the same run (config, inputs, code), so that resume
continues only the same run."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

PathLike = Union[str, "os.PathLike[str]"]

HASH_WHOLE_FILE_UP_TO = 64 << 20  # larger inputs are fingerprinted by size, head and tail
HASH_HEAD_TAIL = 4 << 20

# The only config keys left out of a run's identity: none of them can change a byte the stage writes
# (models, metrics, curves), so a rerun after changing one may continue the run's checkpoints. Every
# other key is identity: ``epochs`` and ``patience`` too (a checkpoint at or past a lowered end, or an
# early stop it would not have taken, cannot be continued into the new run), ``log_every`` (the step
# curves), ``device`` (the bits differ across device types) and ``runtime.threads`` (a thread count
# changes the sums' bits). tests/test_rerun_is_fresh.py walks every key of the stages and checks that a
# rerun writes a fresh run's bytes. Keys match as dotted suffixes, so ``finetuning.checkpoint_every``
# also covers a task's own ``tasks.<name>.finetuning.checkpoint_every``.
OUTPUT_NEUTRAL_KEYS = {
    "tracking": "where MLflow logs to; nothing a stage writes reads it",
    "training.checkpoint_every": "when training checkpoints are saved; a save reads the window's losses in step "
                                 "order and leaves the weights, optimizer, RNG and batch order as they were",
    "finetuning.checkpoint_every": "when training checkpoints are saved, as training.checkpoint_every",
    "finetuning.baseline_model": "the baseline row has no checkpoint: it is refitted on every run, after the model",
    "finetuning.baseline_c": "the baseline row is refitted on every run, as for finetuning.baseline_model",
    "finetuning.baseline_row": "the baseline row is refitted on every run, as for finetuning.baseline_model",
    "runtime.workers": "how many processes share each global batch's micro-batches; the bytes are the same for "
                       "any count (tests/test_worker_invariance.py), so a run saved on 2 workers resumes on 1 or 3",
}


def config_fingerprint(
    raw_config: Mapping[str, Any],
    include: Optional[Iterable[str]] = None,
    ignore: Iterable[str] = tuple(OUTPUT_NEUTRAL_KEYS),
) -> str:
    """sha256 of the config's canonical JSON, without the keys that cannot change the outputs.

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


def run_fingerprint(parts: Mapping[str, str]) -> str:
    """One fingerprint of a run from named parts (e.g. config, inputs, code digests)."""
    return hashlib.sha256(json.dumps(dict(parts), sort_keys=True).encode("utf-8")).hexdigest()
