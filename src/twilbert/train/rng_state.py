"""Every RNG state of a process (python, numpy, torch CPU and CUDA) as plain JSON ints and lists."""

from __future__ import annotations

import logging
import random
from typing import Any, Mapping

import numpy as np
import torch

log = logging.getLogger(__name__)


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


def step_seed(seed: int, *keys: int) -> int:
    """A seed that is a pure function of (seed, keys...), e.g. (epoch, global batch, micro-batch): masks
    and dropout replay exactly on resume, on any number of workers."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0])
