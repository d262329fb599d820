"""Plain single-process plan executor for tests: applies a Plan's read ops to bytearrays.

`execute(plan)` -> {(layer, node): bytearray of the segment}; bytes never written stay 0xEE
so a gap or a short write shows up. `reference_piece(index, group, k, slice)` is the
independent reference: the numpy slice of source piece k named by a record's `slice`,
after the group's conversion.
"""
from __future__ import annotations

import os
from contextlib import ExitStack

import numpy as np

from ktnuma.index.dtypes import CONVERSIONS, convert
from ktnuma.index.model import ModelIndex, PieceGroup
from ktnuma.plan.planner import ArrayPlan, Plan

FILL = 0xEE


def read_piece_op(fds: list[int], a: ArrayPlan, k: int) -> bytes:
    """Source bytes of piece k of `a`, gathered as its read op says (before conversion)."""
    fd, off = fds[a.files[k]], a.src_offsets[k]
    if a.rows == 1 or a.run == a.src_stride:
        data = os.pread(fd, a.rows * a.run, off)
        assert len(data) == a.rows * a.run, "short read"
        return data
    out = bytearray()
    for r in range(a.rows):
        chunk = os.pread(fd, a.run, off + r * a.src_stride)
        assert len(chunk) == a.run, "short read"
        out += chunk
    return bytes(out)


def execute(plan: Plan) -> dict[tuple[int, int], bytearray]:
    segs: dict[tuple[int, int], bytearray] = {}
    with ExitStack() as stack:
        fds = []
        for path in plan.files:
            fd = os.open(path, os.O_RDONLY)
            stack.callback(os.close, fd)
            fds.append(fd)
        for s in plan.segments:
            buf = bytearray([FILL]) * s.size
            mv = memoryview(buf)
            for a in s.arrays:
                for k in range(a.count):
                    src = read_piece_op(fds, a, k)
                    dst = mv[a.offset + k * a.stride : a.offset + (k + 1) * a.stride]
                    if a.conversion:
                        convert(a.conversion, src, dst)
                    else:
                        assert len(src) == len(dst)
                        dst[:] = src
            segs[(s.layer, s.node)] = buf
    return segs


def _piece_array(index: ModelIndex, g: PieceGroup, k: int) -> np.ndarray:
    """Piece k of g as a numpy array of opaque items: elements, or GGUF blocks along columns."""
    with open(index.files[g.files[k]].path, "rb") as f:
        f.seek(g.offsets[k])
        raw = f.read(g.nbytes)
    assert len(raw) == g.nbytes
    shape = g.shape if len(g.shape) > 1 else (g.shape[0],)
    if g.quantum > 1:
        rows, cols = shape
        return np.frombuffer(raw, dtype=f"V{g.quantum_bytes}").reshape(rows, cols // g.quantum)
    item = g.nbytes // int(np.prod(shape))
    return np.frombuffer(raw, dtype=f"V{item}").reshape(shape)


def reference_piece(index: ModelIndex, g: PieceGroup, k: int, slc: tuple[int, int, int] | None) -> bytes:
    """The record's piece, computed from numpy slicing of the whole source piece."""
    arr = _piece_array(index, g, k)
    if slc is not None:
        dim, start, stop = slc
        q = g.quantum if (g.quantum > 1 and dim == 1) else 1
        index_ = [slice(None)] * arr.ndim
        index_[dim] = slice(start // q, stop // q)
        arr = arr[tuple(index_)]
    src = np.ascontiguousarray(arr).tobytes()
    if g.conversion is None:
        return src
    dst = bytearray(len(src) * CONVERSIONS[g.conversion].ratio)
    convert(g.conversion, src, memoryview(dst))
    return bytes(dst)
