"""Plain single-process plan executor for tests: applies a Plan's read ops to bytearrays.

`execute(plan)` -> {(layer, node): bytearray of the segment}, made by applying the plan's read ops
(ktnuma.plan.ops, for `io` buffered or direct) as the workers would, while counting: every source byte a layer's arrays take is
read exactly once, no byte is read twice, every destination byte is written exactly once; the result
must equal `execute_arrays(plan)`, which reads each record's piece on its own. Bytes never written stay
0xEE so a gap or a short write shows up. `reference_piece(index, group, k, slice)` is the
independent reference: the numpy slice of source piece k named by a record's `slice` (on the source
piece: a transposing conversion stages it transposed), after the group's conversion.
"""
from __future__ import annotations

import os
from contextlib import ExitStack

import numpy as np

from ktnuma.index.dtypes import CONVERSIONS, convert, transposes
from ktnuma.index.model import ModelIndex, PieceGroup
from ktnuma.plan.ops import layer_ops
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


def execute_arrays(plan: Plan) -> dict[tuple[int, int], bytearray]:
    segs: dict[tuple[int, int], bytearray] = {}
    with ExitStack() as stack:
        fds = _open_all(stack, plan)
        for s in plan.segments:
            buf = bytearray([FILL]) * s.size
            mv = memoryview(buf)
            for a in s.arrays:
                for k in range(a.count):
                    src = read_piece_op(fds, a, k)
                    dst = mv[a.offset + k * a.stride : a.offset + (k + 1) * a.stride]
                    if a.conversion:  # a transposed piece: its gathered rows are the staged columns
                        convert(a.conversion, src, dst, a.shape[-1] if transposes(a.conversion) else a.rows)
                    else:
                        assert len(src) == len(dst)
                        dst[:] = src
            segs[(s.layer, s.node)] = buf
    return segs


def _open_all(stack: ExitStack, plan: Plan) -> list[int]:
    fds = []
    for path in plan.files:
        fd = os.open(path, os.O_RDONLY)
        stack.callback(os.close, fd)
        fds.append(fd)
    return fds


def _taken(plan: Plan, layer: int, sizes: list[int]) -> list[np.ndarray]:
    """Per file, how many times each byte is taken by the layer's records (0 or 1 expected)."""
    taken = [np.zeros(n, np.uint8) for n in sizes]
    for s in plan.layer_segments(layer):
        for a in s.arrays:
            for k in range(a.count):
                o = a.src_offsets[k]
                for r in range(a.rows):
                    taken[a.files[k]][o + r * a.src_stride:o + r * a.src_stride + a.run] = 1
    return taken


def execute(plan: Plan, io: str = "buffered") -> dict[tuple[int, int], bytearray]:
    segs = {(s.layer, s.node): bytearray([FILL]) * s.size for s in plan.segments}
    written = {k: np.zeros(len(v), np.uint8) for k, v in segs.items()}
    with ExitStack() as stack:
        fds = _open_all(stack, plan)
        sizes = [os.fstat(fd).st_size for fd in fds]
        for layer in plan.layers:
            read = [np.zeros(n, np.uint16) for n in sizes]
            for reader, ops in layer_ops(plan, layer, io=io).items():
                assert (layer, reader) in segs, f"node {reader} reads layer {layer} but holds no segment"
                for op in ops:
                    data = os.pread(fds[op.file], op.length, op.offset)
                    assert len(data) == op.length, "short read"
                    read[op.file][op.offset:op.offset + op.length] += 1
                    src = np.frombuffer(data, np.uint8)
                    for w in op.writes:
                        rows = np.stack([src[w.src + r * w.stride:w.src + r * w.stride + w.run] for r in range(w.rows)])
                        out = memoryview(segs[(layer, w.node)])[w.dest:w.dest + w.nbytes]
                        assert len(out) == w.nbytes, "write past the segment"
                        if w.conversion:
                            convert(w.conversion, rows.tobytes(), out, w.rows)
                        else:
                            out[:] = rows.tobytes()
                        written[(layer, w.node)][w.dest:w.dest + w.nbytes] += 1
            for f, (r, t) in enumerate(zip(read, _taken(plan, layer, sizes))):
                assert r.max(initial=0) <= 1, f"layer {layer}: file {f} has bytes read more than once"
                assert not (t & (r == 0)).any(), f"layer {layer}: file {f} has bytes taken but never read"
    for s in plan.segments:
        w = written[(s.layer, s.node)]
        assert w.max(initial=0) <= 1, f"L{s.layer} n{s.node}: bytes written twice"
        assert int(w.sum()) == s.payload, f"L{s.layer} n{s.node}: {int(w.sum())} bytes written of {s.payload}"
    assert segs == execute_arrays(plan), "the read ops and the records disagree"
    return segs


def _piece_array(index: ModelIndex, g: PieceGroup, k: int) -> np.ndarray:
    """Piece k of g as a numpy array of opaque items: elements, or GGUF blocks along columns."""
    with open(index.files[g.files[k]].path, "rb") as f:
        f.seek(g.offsets[k])
        raw = f.read(g.span)
    assert len(raw) == g.span
    if g.strided:  # rows of row_bytes, row_stride apart (a column chunk or a row interleave of a stack)
        raw = b"".join(raw[r * g.row_stride:r * g.row_stride + g.row_bytes] for r in range(g.rows))
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
    dst = bytearray(int(len(src) * CONVERSIONS[g.conversion].ratio))
    convert(g.conversion, src, memoryview(dst), arr.shape[0])  # rows: what a transposing conversion swaps
    return bytes(dst)
