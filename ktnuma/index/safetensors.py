"""safetensors: parse the 8-byte header length + JSON header ourselves, without reading tensor data.

Every way a file can be malformed is its own named error carrying the numbers.
"""
from __future__ import annotations

import os
import struct
from typing import Any

from ktnuma.errors import FormatError, HeaderOutOfBounds, HeaderTooLarge, InvalidHeaderJSON, OffsetsOutOfBounds, OverlappingTensors, ShapeMismatch, TruncatedFile, UnknownDtype, UnsafeShardPath
from ktnuma.index.model import TensorExtent
from ktnuma.index.dtypes import SAFETENSORS_DTYPES

HEADER_CAP = 100 * 1024 * 1024  # bytes; the safetensors library's own limit
INDEX_NAME = "model.safetensors.index.json"


def read_header(path: str) -> tuple[dict[str, Any], int, int]:
    """Return (header dict, data section start, file size). Reads only the header (regular files
    only: a FIFO is refused without blocking; JSON bounded, duplicate keys refused)."""
    import stat

    from ktnuma.index import bounded

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except PermissionError as e:
        raise FormatError(path, f"cannot read: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise FormatError(path, "is a directory, not a safetensors file")
        if not stat.S_ISREG(st.st_mode):
            raise FormatError(path, "not a regular file")
        size = st.st_size
        if size < 8:
            raise TruncatedFile(path, f"file is {size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
        if n > HEADER_CAP:
            raise HeaderTooLarge(path, f"header length {n} exceeds the {HEADER_CAP}-byte cap")
        if 8 + n > size:
            raise HeaderOutOfBounds(path, f"header length {n} runs past the end of the {size}-byte file")
        raw = os.pread(fd, n, 8)
    finally:
        os.close(fd)
    if len(raw) != n:
        raise TruncatedFile(path, f"read {len(raw)} of {n} header bytes")
    try:
        header = bounded.loads(raw)
    except bounded.JSONLimit as e:
        raise InvalidHeaderJSON(path, f"header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise InvalidHeaderJSON(path, f"header is a JSON {type(header).__name__}, not an object")
    return header, 8 + n, size


def _entry(path: str, name: str, spec: Any) -> tuple[str, tuple[int, ...], int, int]:
    if not isinstance(spec, dict):
        raise InvalidHeaderJSON(path, "entry is not an object", name)
    dtype, shape, offs = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise UnknownDtype(path, f"unknown dtype {dtype!r}", name)
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise InvalidHeaderJSON(path, f"shape {shape!r} is not a list of non-negative integers", name)
    if (
        not isinstance(offs, list)
        or len(offs) != 2
        or not all(type(o) is int and o >= 0 for o in offs)
    ):
        raise InvalidHeaderJSON(path, f"data_offsets {offs!r} is not [begin, end]", name)
    begin, end = offs
    if end < begin:
        raise OffsetsOutOfBounds(path, f"data_offsets [{begin}, {end}] end before begin", name)
    return dtype, tuple(shape), begin, end


def read_file(path: str, file_index: int) -> tuple[list[TensorExtent], dict[str, str]]:
    """All tensors of one safetensors file as extents with absolute offsets, plus __metadata__."""
    header, data_start, size = read_header(path)
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise InvalidHeaderJSON(path, "__metadata__ is not an object")
    data_len = size - data_start
    extents: list[TensorExtent] = []
    for name, spec in header.items():
        dtype, shape, begin, end = _entry(path, name, spec)
        if end > data_len:
            raise OffsetsOutOfBounds(
                path, f"data_offsets [{begin}, {end}] run past the {data_len}-byte data section", name
            )
        d = SAFETENSORS_DTYPES[dtype]
        count = 1
        for dim in shape:
            count *= dim
        if count * d.itemsize != end - begin:
            raise ShapeMismatch(
                path,
                f"shape {list(shape)} x {d.itemsize} bytes ({dtype}) = {count * d.itemsize} bytes, "
                f"but data_offsets span {end - begin}",
                name,
            )
        extents.append(TensorExtent(name, file_index, data_start + begin, end - begin, d.name, shape))
    ordered = sorted((e for e in extents if e.nbytes), key=lambda e: e.offset)
    for a, b in zip(ordered, ordered[1:]):
        if b.offset < a.offset + a.nbytes:
            raise OverlappingTensors(
                path,
                f"bytes [{a.offset - data_start}, {a.offset - data_start + a.nbytes}) overlap "
                f"{b.name!r} at {b.offset - data_start}",
                a.name,
            )
    return extents, {str(k): str(v) for k, v in meta.items()}


def shard_paths(root: str) -> list[str]:
    """The safetensors files of a model directory, honouring model.safetensors.index.json."""
    index_path = os.path.join(root, INDEX_NAME)
    if os.path.exists(index_path):
        from ktnuma.index import bounded

        try:
            index = bounded.read(index_path, limit=HEADER_CAP)
        except (OSError, ValueError) as e:
            raise InvalidHeaderJSON(index_path, f"index is not valid JSON ({e})") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise InvalidHeaderJSON(index_path, "index has no weight_map object")
        names: list[str] = []
        for tensor, shard in weight_map.items():
            if not isinstance(shard, str):
                raise InvalidHeaderJSON(index_path, f"shard {shard!r} is not a file name", tensor)
            parts = shard.replace("\\", "/").split("/")
            if os.path.isabs(shard) or ".." in parts or not shard:
                raise UnsafeShardPath(
                    index_path, f"shard path {shard!r} is absolute or leaves the model directory", tensor
                )
            if shard not in names:
                names.append(shard)
        paths = [os.path.join(root, n) for n in sorted(names)]
        for p in paths:
            if not os.path.exists(p):
                raise FormatError(index_path, f"names shard {os.path.basename(p)!r}, which does not exist")
        return paths
    return sorted(
        os.path.join(root, n) for n in os.listdir(root) if n.endswith(".safetensors")
    )
