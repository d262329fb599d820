"""GGUF: metadata and tensor records via the `gguf` package, parsed once (in the coordinator).

Workers never import this module: they get plain (file, offset, length) work from the plan.
"""
from __future__ import annotations

import os
from typing import Any

from ktnuma.errors import BadMagic, FormatError, HeaderOutOfBounds, OverlappingTensors, TruncatedFile, UnknownDtype
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
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO must not block
    except PermissionError as e:
        raise FormatError(path, f"cannot read: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FormatError(path, "not a regular file")
        size = st.st_size
        magic = os.pread(fd, 4, 0)
        if magic != GGUF_MAGIC:
            raise BadMagic(path, f"bad magic {magic!r}, expected {GGUF_MAGIC!r}")
        _check_bounds(path, fd, size)  # before the gguf package loops over counts read from the file
    finally:
        os.close(fd)
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
    ordered = sorted((e for e in extents if e.nbytes), key=lambda e: e.offset)
    for a, b in zip(ordered, ordered[1:]):
        if b.offset < a.offset + a.nbytes:
            raise OverlappingTensors(path, f"data [{a.offset}, {a.offset + a.nbytes}) overlaps {b.name!r} "
                                           f"at {b.offset}", a.name)
    return extents, meta


GGML_MAX_DIMS = 4


def _check_bounds(path: str, fd: int, size: int) -> None:
    """Walk the GGUF header's counts and lengths against the file size before anything loops over
    them: a metadata array, string, key count or tensor count that cannot fit in the rest of the
    file is HeaderOutOfBounds (a 2^60-element array claim is refused at once, not iterated)."""
    import mmap
    import struct

    if size < 24:
        raise TruncatedFile(path, f"file is {size} bytes, shorter than the 24-byte GGUF header")
    mm = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    pos = 4

    def take(fmt: str) -> int:
        nonlocal pos
        n = struct.calcsize(fmt)
        if pos + n > size:
            raise TruncatedFile(path, f"GGUF header is cut short at byte {pos} of {size}")
        v = struct.unpack_from(fmt, mm, pos)[0]
        pos += n
        return v

    def skip(n: int, what: str) -> None:
        nonlocal pos
        if n > size - pos:
            raise HeaderOutOfBounds(path, f"{what} claims {n} bytes at byte {pos}, past the end of the "
                                          f"{size}-byte file")
        pos += n

    def count(n: int, least: int, what: str) -> int:
        if n * least > size - pos:
            raise HeaderOutOfBounds(path, f"{what} claims {n} entries (at least {n * least} bytes) at byte "
                                          f"{pos}, past the end of the {size}-byte file")
        return n

    def value(t: int, depth: int = 0) -> None:
        if t in _GGUF_SCALARS:
            skip(struct.calcsize(_GGUF_SCALARS[t]), "a metadata value")
        elif t == 8:
            skip(take("<Q"), "a metadata string")
        elif t == 9 and depth == 0:
            et, n = take("<I"), take("<Q")
            if et in _GGUF_SCALARS:
                skip(count(n, struct.calcsize(_GGUF_SCALARS[et]), "a metadata array") *
                     struct.calcsize(_GGUF_SCALARS[et]), "a metadata array")
            elif et in (8, 9):
                for _ in range(count(n, 8 if et == 8 else 12, "a metadata array")):
                    value(et, depth + 1)
            else:
                raise FormatError(path, f"unknown metadata array element type {et} at byte {pos}")
        else:
            raise FormatError(path, f"unknown metadata value type {t} at byte {pos}")

    try:
        version = take("<I")
        if version < 2:
            return  # GGUF v1: the gguf package refuses it with its own message
        n_tensors, n_kv = take("<Q"), take("<Q")
        count(n_kv, 8 + 8 + 4, "the metadata key count")
        for _ in range(n_kv):
            skip(take("<Q"), "a metadata key")
            value(take("<I"))
        count(n_tensors, 8 + 4 + 4 + 8, "the tensor count")
        for _ in range(n_tensors):
            skip(take("<Q"), "a tensor name")
            nd = take("<I")
            if nd > GGML_MAX_DIMS:
                raise FormatError(path, f"a tensor at byte {pos} has {nd} dims (GGUF allows {GGML_MAX_DIMS})")
            skip(8 * nd + 4 + 8, "a tensor record")
    finally:
        mm.close()


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
