"""Which attention kernel a batch actually runs, asked of PyTorch's profiler rather than guessed.

``F.scaled_dot_product_attention`` picks its kernel per call from the inputs: on a GPU the flash kernel
takes bf16/fp16 without a mask, the memory-efficient (or cuDNN) one also takes an additive mask and
fp32, and the math fallback is three plain ops. TWilBert's layers pass no mask when the batch has no
padding (``PairBatch.padded``, known on the host), so an unpadded bf16 batch can run flash, and a
padded one the memory-efficient kernel with the padding bias. On a CPU in bf16 the layers use two
matmuls instead (``encoder.explicit_attention``). ``attention_backend`` runs one attention call of a
model's first layer at the given shape and reports the kernel the profiler saw.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from twilbert.model.encoder import TWilBertAttention

# aten op -> the name we report, in the order they are looked for
KERNELS = {
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash_cpu",
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_efficient_attention": "efficient",
    "aten::_scaled_dot_product_fused_attention_overrideable": "fused",
    "aten::_scaled_dot_product_attention_math": "math",
}
FUSED = ("flash", "cudnn", "efficient", "fused", "flash_cpu")  # anything but the math fallback


def first_attention(model: nn.Module) -> TWilBertAttention:
    for module in model.modules():
        if isinstance(module, TWilBertAttention):
            return module
    raise ValueError(f"{type(model).__name__} has no TWilBert attention layer")


def attention_backend(model: nn.Module, batch_size: int, seq_len: int, padded: bool,
                      precision: str = "fp32", device: Optional[torch.device] = None, train: bool = True) -> str:
    """The kernel one attention call of ``model`` runs at (batch_size, seq_len): a name of ``KERNELS``,
    or ``explicit`` (our two-matmul path). ``padded``: whether the batch has padding (half the rows are
    then cut short). ``train``: with the layer's dropout, as in training."""
    layer = first_attention(model)
    device = device or next(layer.parameters()).device
    hidden = layer.query.in_features
    x = torch.randn(batch_size, seq_len, hidden, device=device)
    mask = None
    if padded:
        mask = torch.ones(batch_size, seq_len, dtype=torch.bool, device=device)
        mask[: max(1, batch_size // 2), seq_len // 2:] = False
    was_training = layer.training
    layer.train(train)
    dtype = torch.bfloat16 if precision == "bf16" else None
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                layer(x, mask)
    finally:
        layer.train(was_training)
    seen = {event.name for event in prof.events()}
    for op, name in KERNELS.items():
        if op in seen:
            return name
    return "explicit"
