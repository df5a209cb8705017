"""safetensors files written byte for byte the same for the same tensors and metadata.

The safetensors library keeps ``__metadata__`` in a Rust HashMap, so its key order (and the file's
bytes) changes from one process to the next (safetensors issue #584): DVC would see a new
``model.safetensors`` after every identical run. This writer lays the file out itself, following
the format (an 8-byte little-endian header length, a JSON header padded with spaces to a multiple
of 8, then the raw little-endian tensor bytes): metadata keys sorted, tensors ordered by element
size (largest first, so every tensor starts aligned) then name. The files are read back with the
safetensors library as usual.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from typing import Mapping, Optional, Union

import torch

PathLike = Union[str, "os.PathLike[str]"]

# torch dtype -> the format's dtype names
DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


def header_bytes(tensors: Mapping[str, torch.Tensor], metadata: Optional[Mapping[str, str]] = None) -> tuple[bytes, list[str]]:
    """The length-prefixed, padded JSON header and the tensor names in file order."""
    if metadata is not None:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise ValueError(f"safetensors metadata must map str to str; not so for {bad}")
    names = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header: dict = {}
    if metadata:
        header["__metadata__"] = {k: metadata[k] for k in sorted(metadata)}
    offset = 0
    for name in names:
        t = tensors[name]
        if t.dtype not in DTYPES:
            raise ValueError(f"tensor {name!r}: dtype {t.dtype} cannot be stored in safetensors")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, names


def save_file(tensors: Mapping[str, torch.Tensor], path: PathLike,
              metadata: Optional[Mapping[str, str]] = None) -> None:
    """Write ``tensors`` (no two sharing memory) to ``path``; same input, same bytes, in any process."""
    if sys.byteorder != "little":  # the format stores little-endian; never met on our platforms
        raise RuntimeError("safetensors_writer: big-endian hosts are not supported")
    header, names = header_bytes(tensors, metadata)
    with open(path, "wb") as fh:
        fh.write(header)
        for name in names:
            t = tensors[name].detach().cpu().contiguous()
            fh.write(t.reshape(-1).view(torch.uint8).numpy().data)
