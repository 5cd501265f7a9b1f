"""Read a flat element range of one tensor from a Hugging Face safetensors checkpoint with plain file reads (no
mmap, so only the bytes asked for reach this process). Partitioned loading under ZeRO-3 uses it: each rank reads
only its own slice of every tensor. Pure torch and the safetensors file format; no DeepSpeed here.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes lie: the file, the byte offset of its first element, dtype and shape."""

    path: Path
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def _header(path: Path) -> dict[str, TensorEntry]:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    entries = {}
    for name, info in header.items():
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: tensor {name} has dtype {info['dtype']}, not one of {list(_DTYPES)}")
        entries[name] = TensorEntry(path, 8 + length + info["data_offsets"][0], _DTYPES[info["dtype"]],
                                    tuple(info["shape"]))
    return entries


def tensor_index(source: str | Path) -> dict[str, TensorEntry]:
    """Every tensor of a safetensors file, or of all ``*.safetensors`` files of a folder (sharded checkpoints)."""
    source = Path(source)
    files = sorted(source.glob("*.safetensors")) if source.is_dir() else [source]
    if not files:
        raise FileNotFoundError(f"{source}: no *.safetensors files")
    index: dict[str, TensorEntry] = {}
    for path in files:
        index.update(_header(path))
    return index


def read_range(entry: TensorEntry, start: int, end: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Elements [start, end) of the tensor flattened in row-major order, as a 1-D tensor: read straight into
    ``out`` (contiguous, of the entry's dtype) when given, so the bytes are never held twice."""
    if not 0 <= start <= end <= entry.numel:
        raise IndexError(f"range [{start}, {end}) outside a tensor of {entry.numel} elements")
    if out is None:
        out = torch.empty(end - start, dtype=entry.dtype)
    elif out.dtype != entry.dtype or out.numel() != end - start or not out.is_contiguous():
        raise ValueError(f"out: {out.dtype} x {out.numel()}, expected contiguous {entry.dtype} x {end - start}")
    if end == start:
        return out
    size = out.element_size()
    with open(entry.path, "rb") as f:
        f.seek(entry.offset + start * size)
        got = f.readinto(memoryview(out.view(torch.uint8).numpy()))
    if got != (end - start) * size:
        raise OSError(f"{entry.path}: truncated file")
    return out
