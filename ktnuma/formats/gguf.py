"""GGUF: metadata and tensor records via the `gguf` package, parsed once (in the coordinator).

Workers never import this module: they get plain (file, offset, length) work from the plan.
"""
from __future__ import annotations

import os
from typing import Any

from ..errors import BadMagic, FormatError, TruncatedFile, UnknownDtype
from ..model import TensorExtent
from .dtypes import GGML_BY_ID, gguf_dtype

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
    except ValueError as e:
        msg = str(e)
        if "GGMLQuantizationType" in msg:
            raise UnknownDtype(path, f"unknown GGML tensor type ({msg})") from None
        raise FormatError(path, f"unreadable GGUF ({msg})") from None
    except (IndexError, OverflowError, KeyError, TypeError) as e:
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
        nbytes = n // gt.block * gt.type_size
        start = int(t.data_offset)
        if start + nbytes > size:
            raise TruncatedFile(
                path, f"tensor data [{start}, {start + nbytes}) runs past the end of the {size}-byte file", t.name
            )
        extents.append(TensorExtent(t.name, file_index, start, nbytes, gguf_dtype(gt), shape))
    meta = _scalar_fields(reader)
    del reader  # drop the whole-file mapping now
    return extents, meta
