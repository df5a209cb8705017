"""Model directories: ``model.safetensors`` + ``config.json``, written atomically, read without pickle.

config.json is the model card (:mod:`twilbert.model.card`): the model config under ``"model"`` with
``"vocab_size"``, ``"max_positions"`` and, for a finetuned model, its classifier's keys.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import NamedTuple, Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from twilbert.io_utils import CHECKSUMS_NAME, link_or_copy, publish_dir
from twilbert.model.card import CONFIG_NAME, CheckpointError, ModelCard, read_card  # noqa: F401 (re-exported)
from twilbert.model import manifest

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
# A weights file's only safetensors metadata key: JSON {alias name: stored name} of the tied tensors.
# One key, because safetensors keeps metadata in a hash map: with two, their order (and the file's
# bytes) would change from one process to the next (safetensors #584), and DVC would see a new file.
TIED_KEY = "twilbert_tied"
PREFIX = "twilbert."  # the encoder's attribute in the full models

PathLike = Union[str, os.PathLike]


class LoadReport(NamedTuple):
    missing: list[str]  # model parameters the checkpoint did not provide
    unexpected: list[str]  # checkpoint tensors the model has no place for


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------


def untie(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Keep one copy of each tensor; tied names (e.g. the MLM decoder) become aliases.

    safetensors refuses tensors that share storage, and storing a tied matrix twice would both
    waste space and lose the tie.
    """
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages: set[int] = set()
    for name, t in state_dict.items():
        t = t.detach()
        view = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and view in seen:
            aliases[name] = seen[view]
            continue
        seen[view] = name
        ptr = t.untyped_storage().data_ptr()
        # Different views of one storage cannot be aliased by name: store them as separate copies.
        t = t.cpu().contiguous().clone() if t.numel() and ptr in storages else t.cpu().contiguous()
        storages.add(ptr)
        tensors[name] = t
    return tensors, aliases


def save_weights(state_dict: dict[str, torch.Tensor], path: PathLike) -> dict[str, str]:
    """Write a state dict to a safetensors file, each tied tensor once; returns the aliases."""
    tensors, aliases = untie(state_dict)
    save_file(tensors, str(path), metadata={TIED_KEY: json.dumps(aliases, sort_keys=True)})
    return aliases


def read_weights(path: PathLike, error: type[Exception] = CheckpointError) -> dict[str, torch.Tensor]:
    """The state dict of a :func:`save_weights` file, tied names restored; ``error`` names the file."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            state = {name: f.get_tensor(name) for name in f.keys()}
        aliases = json.loads(metadata.get(TIED_KEY, "{}"))
    except FileNotFoundError:
        raise error(f"{path}: missing") from None
    except (SafetensorError, OSError, ValueError) as err:
        raise error(f"{path}: corrupt or not a safetensors file ({err}); rerun the stage that wrote it "
                    "(pickle files are never loaded)") from None
    if not isinstance(aliases, dict):
        raise error(f"{path}: {TIED_KEY} metadata is not a JSON object")
    for alias, stored in aliases.items():
        if stored not in state:
            raise error(f"{path}: tied tensor {alias!r} points at missing {stored!r}")
        state[alias] = state[stored]
    return state


def _carry_extras(old: Path, new: Path) -> None:
    """Files other callers put in an existing model directory survive a re-save."""
    for entry in old.iterdir():
        if entry.name in (WEIGHTS_NAME, CONFIG_NAME, CHECKSUMS_NAME):
            continue
        target = new / entry.name
        if entry.is_dir():
            shutil.copytree(entry, target, copy_function=link_or_copy)
        else:
            link_or_copy(entry, target)


def save_pretrained(directory: PathLike, model: nn.Module, card: Union[ModelCard, dict]) -> Path:
    """Write ``model.safetensors``, ``config.json`` (the model card; a dict is loaded as one, strictly)
    and ``checksums.json`` to ``directory`` atomically.

    Published with ``io_utils.publish_dir``: a crash leaves the previous complete directory or the
    new one, never a mix. Files other callers added to an existing directory are kept. A caller
    that adds files afterwards (e.g. the vocabulary) reseals it with ``manifest.write_manifest``.
    """
    directory = Path(directory)
    if not isinstance(card, ModelCard):
        card = ModelCard.from_dict(card, f"model card for {directory / CONFIG_NAME}")
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"{directory}: exists and is not a directory")
    config_text = card.to_json()  # fails on unserialisable values before touching disk
    with publish_dir(directory, checksums=True) as staged:  # names the directory when the disk is full
        aliases = save_weights(model.state_dict(), staged / WEIGHTS_NAME)
        (staged / CONFIG_NAME).write_text(config_text, encoding="utf-8")
        if directory.exists():
            _carry_extras(directory, staged)
    logger.debug("saved %s (%d tied tensors)", directory, len(aliases))
    return directory


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_pretrained_state(
    directory: PathLike, verify: Optional[bool] = None
) -> tuple[ModelCard, dict[str, torch.Tensor]]:
    """Read (model card, state_dict) from a model directory: safetensors and JSON only, never pickle.

    The directory's ``checksums.json`` is verified first (``manifest.verify_model_dir``; ``verify``
    None follows ``--no-verify`` / ``TWILBERT_NO_VERIFY``).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: model directory not found")
    config_path = directory / CONFIG_NAME
    weights_path = directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            hint = " (pickle checkpoints such as pytorch_model.bin are never loaded)" if path == weights_path else ""
            raise FileNotFoundError(f"{path}: missing; a model directory holds {CONFIG_NAME} and {WEIGHTS_NAME}{hint}")
    manifest.verify_model_dir(directory, verify)

    card = read_card(config_path)

    state = read_weights(weights_path)
    return card, state


def _align_prefix(model_keys: set[str], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Let an encoder load from a full model's checkpoint and vice versa (``twilbert.`` prefix)."""
    model_prefixed = any(k.startswith(PREFIX) for k in model_keys)
    state_prefixed = any(k.startswith(PREFIX) for k in state)
    if state_prefixed and not model_prefixed:
        dropped = sorted(k for k in state if not k.startswith(PREFIX))
        if dropped:
            logger.info("loading the encoder only; ignoring %d head tensors", len(dropped))
        return {k[len(PREFIX) :]: v for k, v in state.items() if k.startswith(PREFIX)}
    if model_prefixed and not state_prefixed:
        return {PREFIX + k: v for k, v in state.items()}
    return state


def _mismatch_hint(name: str, theirs: tuple, ours: tuple) -> str:
    if len(theirs) == len(ours) and theirs[1:] == ours[1:]:
        if name.endswith(("word_embeddings.weight", "decoder.weight", "predictions.bias")):
            return "vocab size differs"
        if name.endswith("position_embeddings.weight"):
            return "max_positions differs"
    return "model config differs (compare the checkpoint's config.json with the model's)"


def load_into(model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True) -> LoadReport:
    """Copy ``state_dict`` into ``model``; shape mismatches always raise, naming each parameter.

    With ``strict`` missing or unexpected names raise too; otherwise they are reported and logged.
    """
    own = model.state_dict()
    state = _align_prefix(set(own), state_dict)
    mismatches = []
    for name, tensor in state.items():
        if name in own and own[name].shape != tensor.shape:
            theirs, ours = tuple(tensor.shape), tuple(own[name].shape)
            mismatches.append(f"{name}: checkpoint {theirs} vs model {ours} — {_mismatch_hint(name, theirs, ours)}")
    if mismatches:
        raise CheckpointError("checkpoint does not fit the model:\n  " + "\n  ".join(mismatches))

    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"checkpoint does not fit the model: missing {missing}, unexpected {unexpected} "
            "(pass strict=False to load a subset, e.g. an encoder under a new head)"
        )
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    if missing:
        logger.info("not in checkpoint, left as initialised: %s", missing)
    if unexpected:
        logger.info("in checkpoint, not used by the model: %s", unexpected)
    return LoadReport(missing, unexpected)
