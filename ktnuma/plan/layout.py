"""Building blocks for split rules: node ids, staged dtypes and sizes, the read geometry of a
piece's cut, and one segment's proj-major layout (each array 64-byte aligned). Pure."""
from __future__ import annotations

from collections.abc import Iterable
from fractions import Fraction
from functools import lru_cache
from typing import Any

from ktnuma.errors import SplitError, TopologyError
from ktnuma.index.dtypes import CONVERSIONS, transposes
from ktnuma.index.model import KINDS, PROJS, ModelIndex, PieceGroup
from ktnuma.index.quant import family as format_family  # noqa: F401 (re-exported by the planner)
from ktnuma.plan.records import ALIGN, ArrayPlan, SegmentPlan

# (slice, staged shape, delta, rows, run, src_stride): how one node's cut of a piece is read
Geometry = tuple


def node_ids(topology: Any) -> tuple[int, ...]:
    """Node ids in topology order from a Topology-like object (`.nodes[*].id`) or a sequence of ints."""
    nodes = getattr(topology, "nodes", topology)
    try:
        ids = tuple(int(getattr(n, "id", n)) for n in nodes)
    except (TypeError, ValueError) as exc:
        raise TopologyError(f"topology: cannot read node ids from {topology!r}: {exc}") from None
    if not ids:
        raise TopologyError("topology: no nodes")
    if len(set(ids)) != len(ids):
        raise TopologyError(f"topology: duplicate node ids in {list(ids)}")
    return ids


def ratio(g: Any) -> Fraction | int:
    """Bytes staged per byte read (the conversion's ratio); `g` is a PieceGroup or ArrayPlan."""
    if not g.conversion:
        return 1
    r = CONVERSIONS[g.conversion].ratio
    return int(r) if r.denominator == 1 else r


def staged_i_dim(g: PieceGroup) -> int | None:
    """g's I dim on the staged piece (a transposing conversion swaps the dims; None: I-independent)."""
    return None if g.i_dim is None else g.i_dim ^ transposes(g.conversion)


def staged_rows(g: PieceGroup) -> int:
    """Rows of g's whole piece as staged (a transposed piece's rows are the source's columns)."""
    return g.cols if transposes(g.conversion) else g.rows


def staged_slice(a: Any) -> tuple[int, int, int] | None:
    """An ArrayPlan's slice on the staged piece: `a.slice` names the cut on the source piece, whose
    dims a transposing conversion swaps (the manifest indexes the piece as staged)."""
    if a.slice is None or not transposes(a.conversion):
        return a.slice
    dim, start, stop = a.slice
    return 1 - dim, start, stop


def staged_dtype(g: PieceGroup) -> str:
    return g.staged_dtype or (CONVERSIONS[g.conversion].dst if g.conversion else g.dtype)


def quantum_bytes(g: PieceGroup) -> int:
    """Bytes of one column quantum along a row (an element, or a GGUF block)."""
    return g.quantum_bytes or g.row_bytes * g.quantum // g.cols


def where(index: ModelIndex, g: PieceGroup) -> str:
    path = index.files[g.files[0]].path if g.files and g.files[0] < len(index.files) else "?"
    return f"{path}: tensor {g.tensors[0] if g.tensors else '?'!r}"


def align(x: int, to: int = ALIGN) -> int:
    return -(-x // to) * to


def layout_key(g: PieceGroup) -> tuple[int, int, int]:
    return (KINDS.index(g.kind), PROJS.index(g.proj), -1 if g.shard is None else g.shard)


def ep_blocks(count: int, n: int) -> list[tuple[int, int]]:
    """Contiguous [lo, hi) positions per node; the remainder goes to the lowest nodes."""
    base, rem = divmod(count, n)
    out, lo = [], 0
    for i in range(n):
        hi = lo + base + (1 if i < rem else 0)
        out.append((lo, hi))
        lo = hi
    return out


def check_shards(index: ModelIndex, n_nodes: int, split: str, *, allowed: bool) -> bool:
    """Pre-sharded (`.numa.{n}`) files: refuse a split that cannot take them, or a node count other
    than the shard count. Returns whether the index is pre-sharded (nothing more to check)."""
    if index.shards is None:
        return False
    if not allowed:
        raise SplitError(f"{index.format} files are pre-sharded into {index.shards} .numa shards: "
                         f"split={split} is impossible; use split=tp nodes={index.shards}")
    if n_nodes != index.shards:
        raise SplitError(f"{index.format} files are pre-sharded into {index.shards} .numa shards, "
                         f"not {n_nodes}; use nodes={index.shards}")
    return True


def whole(g: PieceGroup) -> Geometry:
    """The whole piece, one contiguous run (slice null); a strided piece row by row."""
    if g.strided:
        return None, g.shape, 0, g.rows, g.row_bytes, g.row_stride
    return None, g.shape, 0, 1, g.nbytes, g.nbytes


@lru_cache(maxsize=4096)
def _cut(shape: tuple[int, ...], nbytes: int, i_dim: int, i_unit: int, quantum: int, qb: int,
         pos: int, n: int, big_i: int, row_stride: int = 0) -> Geometry:
    i_tp = big_i // n
    dim_n = shape[i_dim]
    start = pos * i_tp // i_unit
    stop = dim_n if pos == n - 1 else (pos + 1) * i_tp // i_unit
    rows = shape[0]
    row_bytes = nbytes // rows
    stride = row_stride or row_bytes
    if i_dim == 0 and stride != row_bytes:  # strided rows: gathered one by one
        return (0, start, stop), (stop - start, *shape[1:]), start * stride, stop - start, row_bytes, stride
    if i_dim == 0:
        run = (stop - start) * row_bytes
        return (0, start, stop), (stop - start, *shape[1:]), start * row_bytes, 1, run, run
    return ((1, start, stop), (rows, stop - start), start // quantum * qb, rows,
            (stop - start) // quantum * qb, stride)


def i_cut(g: PieceGroup, pos: int, n: int, big_i: int) -> Geometry:
    """Node `pos` of `n`'s 1/n of g along its I dim (the whole piece if I-independent or n == 1)."""
    if g.i_dim is None or n == 1:
        return whole(g)
    return _cut(g.shape, g.nbytes, g.i_dim, g.i_unit, g.quantum, quantum_bytes(g), pos, n, big_i,
                g.row_stride if g.strided else 0)


def _shift(offsets: tuple[int, ...], delta: int) -> tuple[int, ...]:
    return offsets if delta == 0 else tuple([o + delta for o in offsets])


def array(g: PieceGroup, node: int, lo: int, hi: int, geom: Geometry, offset: int) -> ArrayPlan:
    """Experts [lo, hi) (positions in g) of g cut as `geom`, stacked at segment `offset`."""
    slc, shape, delta, rows, run, src_stride = geom
    full = (lo, hi) == (0, g.count)
    staged = rows * run * ratio(g)
    if staged != int(staged):
        raise SplitError(f"{g.tensors[0] if g.tensors else g.proj}: a {rows}x{run}-byte cut does not stage whole "
                         f"bytes through {g.conversion}")
    return ArrayPlan(
        layer=g.layer, node=node, proj=g.proj, kind=g.kind, offset=offset,
        first=g.first + lo, count=hi - lo, stride=int(staged), dtype=staged_dtype(g),
        shape=tuple(shape[::-1] if transposes(g.conversion) else shape), slice=slc,
        files=g.files if full else g.files[lo:hi],
        src_offsets=_shift(g.offsets if full else g.offsets[lo:hi], delta),
        rows=rows, run=run, src_stride=src_stride, conversion=g.conversion, shard=g.shard,
    )


def segment(layer: int, node: int, parts: Iterable[tuple[PieceGroup, int, int, Geometry]],
            align_to: int = ALIGN) -> SegmentPlan | None:
    """One segment holding `parts` (group, lo, hi, geometry) in order, each array `align_to`-aligned
    (a multiple of ALIGN); None if there is nothing to hold."""
    arrays: list[ArrayPlan] = []
    cursor = 0
    for g, lo, hi, geom in parts:
        if hi <= lo:
            continue
        a = array(g, node, lo, hi, geom, align(cursor, align_to))
        arrays.append(a)
        cursor = a.end
    return SegmentPlan(layer, node, cursor, tuple(arrays)) if arrays else None
