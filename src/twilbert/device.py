"""Where a model runs: the device a config names, TF32 matmuls, and bf16 autocast.

Kept apart from ``train`` so that inference (``predict``, ``embeddings``) does not import the
training stack.
"""

from __future__ import annotations

import functools
import logging
from contextlib import nullcontext

import torch

log = logging.getLogger(__name__)


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


def configure_matmul(device: torch.device, tf32: bool) -> None:
    """On CUDA, let fp32 matmuls (and convolutions) run on TF32 tensor cores when ``tf32`` (Ampere or newer;
    ~10 mantissa bits in the products, fp32 accumulation). Process-wide; nothing changes on other devices."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32


@functools.lru_cache(maxsize=None)  # asked at every micro-step under bf16; the hardware does not change
def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 matmuls in hardware (CPU: AVX512-BF16 or AMX; GPU: Ampere or newer)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):  # a build without oneDNN: nothing to tell
            return True
    return True


@functools.lru_cache(maxsize=None)
def _warn_emulated_bf16(device_type: str) -> None:
    log.warning("precision=bf16, but this %s has no bf16 matrix instructions: PyTorch emulates them and a bf16 "
                "matmul runs ~100x slower than fp32 here (measured on an AVX2-only CPU). Use precision=fp32 "
                "on this machine.", device_type.upper())


def autocast(precision: str, device: torch.device):
    """bf16 autocast on CPU or GPU when asked for; fp32 otherwise."""
    if precision == "bf16":
        if not native_bf16(device):
            _warn_emulated_bf16(device.type)
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()
