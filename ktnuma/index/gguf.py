"""GGUF: metadata and tensor records via the `gguf` package, parsed once (in the coordinator).

Workers never import this module: they get plain (file, offset, length) work from the plan.
"""
from __future__ import annotations

import os
from typing import Any

from ktnuma.errors import BadMagic, FormatError, TruncatedFile, UnknownDtype
from ktnuma.index.model import TensorExtent
from ktnuma.index.dtypes import GGML_BY_ID, ggml_nbytes, gguf_dtype

GGUF_MAGIC = b"GGUF"


def _scalar_fields(reader: Any) -> dict[str, Any]:
    """Scalar and string metadata only (arrays such as the vocabulary are skipped: costly)."""
    from gguf import GGUFValueType

    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if not field.types or field.types[0] == GGUFValueType.ARRAY:
            continue
        value = field.parts[field.data[0]]
        if field.types[0] == GGUFValueType.STRING:
            out[key] = bytes(value).decode("utf-8", errors="replace")
        else:
            out[key] = value.tolist()[0] if hasattr(value, "tolist") else value
    return out


def read_file(path: str, file_index: int) -> tuple[list[TensorExtent], dict[str, Any]]:
    """All tensors of one GGUF file (absolute offsets, PyTorch-order shapes) and its scalar metadata."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
            size = os.fstat(f.fileno()).st_size
    except PermissionError as e:
        raise FormatError(path, f"cannot read: {e.strerror}") from None
    if magic != GGUF_MAGIC:
        raise BadMagic(path, f"bad magic {magic!r}, expected {GGUF_MAGIC!r}")
    # Unknown tensor types make the gguf package raise while parsing; check them first ourselves.
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError, OverflowError, KeyError, TypeError) as e:
        # the gguf package's messages name no tensor: find the culprit with our own header walk
        culprit = _diagnose(path, size)
        if culprit is not None:
            raise culprit from None
        msg = str(e)
        if isinstance(e, ValueError) and "GGMLQuantizationType" in msg:
            raise UnknownDtype(path, f"unknown GGML tensor type ({msg})") from None
        if isinstance(e, ValueError):
            raise FormatError(path, f"unreadable GGUF ({msg})") from None
        raise TruncatedFile(path, f"GGUF header is cut short or corrupt ({type(e).__name__}: {e})") from None
    extents: list[TensorExtent] = []
    for t in reader.tensors:
        gt = GGML_BY_ID.get(int(t.tensor_type))
        if gt is None:
            raise UnknownDtype(path, f"unknown GGML type id {int(t.tensor_type)}", t.name)
        shape = tuple(int(d) for d in reversed(list(t.shape)))
        n = 1
        for d in shape:
            n *= d
        if shape and shape[-1] % gt.block:
            raise FormatError(path, f"row length {shape[-1]} is not a multiple of the {gt.name} block {gt.block}", t.name)
        nbytes = ggml_nbytes(gt, n)
        start = int(t.data_offset)
        if start + nbytes > size:
            raise TruncatedFile(
                path, f"tensor data [{start}, {start + nbytes}) runs past the end of the {size}-byte file", t.name
            )
        extents.append(TensorExtent(t.name, file_index, start, nbytes, gguf_dtype(gt), shape))
    meta = _scalar_fields(reader)
    del reader  # drop the whole-file mapping now
    return extents, meta


# GGUF value types -> struct format of a scalar (8 = string, 9 = array)
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def _diagnose(path: str, size: int) -> FormatError | None:
    """Walk a GGUF (v2/v3) header ourselves after the gguf package failed on it: the first tensor
    with an unknown type or with data past the end of the file, as an error naming it; None if
    the walk finds nothing (or cannot get that far)."""
    import struct

    try:
        with open(path, "rb") as f:
            head = f.read(min(size, 64 << 20))
    except OSError:
        return None
    pos = 0

    def take(fmt: str):
        nonlocal pos
        v = struct.unpack_from(fmt, head, pos)[0]
        pos += struct.calcsize(fmt)
        return v

    def string() -> bytes:
        nonlocal pos
        n = take("<Q")
        if pos + n > len(head):
            raise IndexError("string past the end")
        pos += n
        return head[pos - n:pos]

    def value(t: int):
        if t in _GGUF_SCALARS:
            return take(_GGUF_SCALARS[t])
        if t == 8:
            return string()
        if t == 9:
            et, n = take("<I"), take("<Q")
            for _ in range(n):
                value(et)
            return None
        raise ValueError(f"unknown metadata value type {t}")

    try:
        pos = 4
        if take("<I") < 2:
            return None
        n_tensors, n_kv = take("<Q"), take("<Q")
        align = 32
        for _ in range(n_kv):
            key = string()
            v = value(take("<I"))
            if key == b"general.alignment" and isinstance(v, int) and v > 0:
                align = v
        infos = []
        for _ in range(n_tensors):
            name = string().decode("utf-8", "replace")
            dims = [take("<Q") for _ in range(take("<I"))]
            infos.append((name, dims, take("<I"), take("<Q")))
        data_start = -(-pos // align) * align
    except (struct.error, IndexError, ValueError, OverflowError):
        return None
    for name, dims, t, off in infos:
        gt = GGML_BY_ID.get(t)
        if gt is None:
            return UnknownDtype(path, f"unknown GGML type id {t}", name)
        n = 1
        for d in dims:
            n *= d
        end = data_start + off + ggml_nbytes(gt, n)
        if end > size:
            return TruncatedFile(path, f"tensor data [{data_start + off}, {end}) runs past the end of the "
                                       f"{size}-byte file", name)
    return None
