"""Which torch device a config's ``device`` setting names: ``auto`` is the GPU when there is one."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_device(name: str, local_rank: int) -> torch.device:
    """:func:`resolve_device`, with a bare ``cuda`` made this process's GPU (``cuda:<local_rank>``) under torchrun."""
    target = resolve_device(name)
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", local_rank)
    return target
