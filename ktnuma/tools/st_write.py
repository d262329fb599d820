"""A tiny safetensors writer (numpy only), used by `ktnuma.synth`.

File layout: 8-byte little-endian header length N, N bytes of JSON (padded with spaces so that N is a
multiple of 8), then the data section. Tensors are laid out densely in the order given; each tensor's
data comes from a callable so that a big file is produced one tensor at a time. Because the writer
only handles raw bytes, it writes every dtype (BF16, F8_E4M3, F8_E8M0, ...) that numpy cannot name.
"""
from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from math import prod
from pathlib import Path

from ktnuma.index.dtypes import SAFETENSORS_DTYPES

# bytes-like: bytes, bytearray, memoryview or a C-contiguous numpy array
Producer = Callable[[], object]


@dataclass(frozen=True)
class StTensor:
    """One tensor to write: safetensors dtype name (e.g. "BF16"), shape, and a data producer."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    data: Producer

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * SAFETENSORS_DTYPES[self.dtype].itemsize


def header_bytes(tensors: Sequence[StTensor], metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length prefix plus the space-padded JSON header for `tensors` in this order."""
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for t in tensors:
        if t.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{t.name}: unknown safetensors dtype {t.dtype!r}")
        if t.name in header:
            raise ValueError(f"{t.name}: duplicate tensor name")
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _as_bytes(name: str, data: object, nbytes: int) -> memoryview:
    view = memoryview(data).cast("B")  # type: ignore[arg-type]
    if view.nbytes != nbytes:
        raise ValueError(f"{name}: producer gave {view.nbytes} bytes, expected {nbytes} bytes")
    return view


def write_safetensors(path: str | os.PathLike[str], tensors: Sequence[StTensor],
                      metadata: dict[str, str] | None = None) -> int:
    """Write `tensors` to `path`; returns the file size in bytes. On error no file is left."""
    head = header_bytes(tensors, metadata)
    try:
        with open(path, "wb") as f:
            f.write(head)
            for t in tensors:
                f.write(_as_bytes(t.name, t.data(), t.nbytes))
            return f.tell()
    except BaseException:
        Path(path).unlink(missing_ok=True)
        raise
