"""A safetensors writer that holds one tensor at a time (``safetensors.torch.save_file`` needs them all).

The format (https://github.com/huggingface/safetensors#format): an 8-byte little-endian header size N,
then N bytes of JSON, ``{"__metadata__": {str: str}, name: {"dtype": "F32", "shape": [...],
"data_offsets": [begin, end]}, ...}`` padded with spaces to a multiple of 8, then every tensor's
bytes (C order, little-endian), back to back in the order of their offsets (relative to the end
of the header). ``write_safetensors`` lays the tensors out as ``save_file`` does (by descending
dtype in safetensors' order, then by name), so for the same tensors and metadata both write the
same file (``save_file`` orders the metadata keys as a hash map does: only with at most one
metadata key are the bytes identical, the content always is).
"""

from __future__ import annotations

import json
import math
import struct
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

# the dtypes written, in the order of safetensors' ``Dtype`` enum (files list the largest first)
_NAMES = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.int16: "I16",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int32: "I32",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int64: "I64",
}
_RANK = {dtype: rank for rank, dtype in enumerate(_NAMES)}


@dataclass(frozen=True)
class DeferredTensor:
    """A tensor produced only when its turn to be written comes (``read()``), then freed.

    ``read()`` may return another dtype or device: it is converted to ``dtype`` on the CPU.
    """

    dtype: torch.dtype
    shape: tuple[int, ...]
    read: Callable[[], torch.Tensor]


def write_safetensors(
    path: str | Path,
    tensors: Mapping[str, torch.Tensor | DeferredTensor],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``tensors`` (and the ``metadata`` strings) as a safetensors file, one tensor in memory at a time.

    Plain tensors are written as they are (CPU, contiguous copies made one at a time); a
    ``DeferredTensor`` is read when written. Memory: the header + the largest tensor.
    """
    if sys.byteorder != "little":
        raise RuntimeError("write_safetensors: a big-endian machine would need byte-swapping")
    specs = {name: _spec(name, value) for name, value in tensors.items()}
    order = sorted(specs, key=lambda name: (-_RANK[specs[name][0]], name))
    header: dict = {}
    if metadata is not None:
        for key, value in metadata.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise TypeError(f"write_safetensors: metadata must map str to str, got {key!r}: {value!r}")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name in order:
        dtype, shape = specs[name]
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(raw)))
        file.write(raw)
        for name in order:
            tensor = _materialise(name, tensors[name], *specs[name])
            file.write(tensor.reshape(-1).view(torch.uint8).numpy())
            del tensor


def _spec(name: str, value: torch.Tensor | DeferredTensor) -> tuple[torch.dtype, tuple[int, ...]]:
    dtype, shape = value.dtype, tuple(int(n) for n in value.shape)
    if dtype not in _NAMES:
        raise TypeError(f"write_safetensors: {name!r} has dtype {dtype}, not one safetensors stores here")
    return dtype, shape


def _materialise(name: str, value, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    tensor = value.read() if isinstance(value, DeferredTensor) else value
    tensor = tensor.detach().to("cpu", dtype).contiguous()
    if tuple(tensor.shape) != shape:
        raise ValueError(f"write_safetensors: {name!r} has shape {tuple(tensor.shape)}, announced {shape}")
    return tensor
