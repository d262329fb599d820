"""The planner: a pure function from (ModelIndex, Topology, split) to a Plan. No I/O.

Work units are per (layer, node, proj, kind) arrays of uniform pieces (one manifest record
each), not one object per piece, so a DeepSeek-V3-sized plan stays small.

Reading piece k of an ArrayPlan: from file `files[k]`, starting at `src_offsets[k]`, read
`rows` runs of `run` bytes each, `src_stride` bytes apart (rows == 1 or run == src_stride:
one contiguous run of rows*run bytes); the bytes land contiguously at segment offset
`offset + k * stride` after the named `conversion` (stride == rows * run * ratio).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ktnuma.errors import ConfigMismatch, KtnumaError, SplitError, TopologyError
from ktnuma.index.dtypes import CONVERSIONS
from ktnuma.index.model import KINDS, PROJS, ModelIndex, PieceGroup

ALIGN = 64  # every stacked array starts 64-byte aligned inside its segment


@dataclass(frozen=True)
class ArrayPlan:
    layer: int
    node: int  # topology node id
    proj: str  # gate | up | down
    kind: str  # weight | scale
    offset: int  # start of the stacked array in the segment (multiple of ALIGN)
    first: int  # first expert number
    count: int  # number of experts
    stride: int  # bytes of one staged piece (== nbytes)
    dtype: str  # staged dtype (after conversion)
    shape: tuple[int, ...]  # staged piece shape
    slice: tuple[int, int, int] | None  # (dim, start, stop) of the source piece; None = whole
    files: tuple[int, ...]  # per piece: index into Plan.files
    src_offsets: tuple[int, ...]  # per piece: absolute offset of its first byte to read
    rows: int
    run: int
    src_stride: int
    conversion: str | None = None
    shard: int | None = None

    @property
    def nbytes(self) -> int:
        return self.stride

    @property
    def end(self) -> int:
        return self.offset + self.count * self.stride


@dataclass(frozen=True)
class SegmentPlan:
    layer: int
    node: int
    size: int  # bytes of the segment (end of its last array; at least 1 array)
    arrays: tuple[ArrayPlan, ...]

    @property
    def payload(self) -> int:
        return sum(a.count * a.stride for a in self.arrays)


@dataclass(frozen=True)
class DropRange:
    file: int
    start: int  # page-aligned
    length: int  # page-rounded


@dataclass(frozen=True)
class Plan:
    split: str  # tp | ep
    files: tuple[str, ...]  # paths, index-aligned with ModelIndex.files
    nodes: tuple[int, ...]  # topology node ids in topology order
    layers: tuple[int, ...]
    segments: tuple[SegmentPlan, ...]  # ordered by layer, then node order
    drops: tuple[tuple[int, tuple[DropRange, ...]], ...]  # per layer: page-cache ranges to drop

    def layer_segments(self, layer: int) -> tuple[SegmentPlan, ...]:
        return tuple(s for s in self.segments if s.layer == layer)

    def drop_ranges(self, layer: int) -> tuple[DropRange, ...]:
        for lyr, ranges in self.drops:
            if lyr == layer:
                return ranges
        return ()

    @property
    def total_bytes(self) -> int:
        return sum(s.size for s in self.segments)


# ---------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------

log = logging.getLogger(__name__)

PAGE = 4096  # page-cache drop granularity
SPLITS: tuple[str, ...] = ("tp", "ep")
SUGGEST_NODES = range(1, 9)  # node counts offered as a way out of a refused split


class PlanInvalid(KtnumaError):
    """A plan that breaks an invariant (a planner bug, never user input). `.problems` lists all."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        shown = "; ".join(self.problems[:6])
        more = f"; ... (+{len(self.problems) - 6} more)" if len(self.problems) > 6 else ""
        super().__init__(f"plan invalid, {len(self.problems)} problem(s): {shown}{more}")


# The design's "tp needs" column as ONE table. A tp split cuts every I-dependent piece at
# multiples of I_tp = I/N along its `i_dim`; one stored index there covers `i_unit` I elements
# (times the GGUF block when the cut runs across columns), so every such unit must divide
# I_tp. The units themselves come from the index (the readers set them from the formats
# table); this table only says, per (format family, kind), what the unit is, for the message.
#   format family -> kind -> description ("{u}" = the unit)
TP_NEEDS: dict[str, dict[str, str]] = {
    "bf16": {"weight": "{u}-element rows"},
    "fp8": {"weight": "{u}-element rows", "scale": "{u}-wide FP8 scale blocks"},
    "rawint4": {"weight": "{u} int4 values packed per int32 word", "scale": "{u}-wide quant groups"},
    "gptq-int4": {"weight": "{u} int4 values packed per int32 word", "scale": "{u}-wide quant groups"},
    "mxfp4": {"weight": "{u} FP4 values packed per byte", "scale": "{u}-wide MXFP4 scale blocks"},
    "gguf": {"weight": "{u}-weight {t} blocks"},
    "amx-int4": {},  # pre-sharded: no tp cut of ours (node count must equal the shard count)
    "amx-int8": {},
}


def format_family(fmt: str) -> str:
    return fmt.split(":", 1)[0]


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


def _ratio(g: PieceGroup) -> int:
    return CONVERSIONS[g.conversion].ratio if g.conversion else 1


def _staged_dtype(g: PieceGroup) -> str:
    return g.staged_dtype or (CONVERSIONS[g.conversion].dst if g.conversion else g.dtype)


def _quantum_bytes(g: PieceGroup) -> int:
    """Bytes of one column quantum along a row (an element, or a GGUF block)."""
    return g.quantum_bytes or g.row_bytes * g.quantum // g.cols


def _cut_unit(g: PieceGroup) -> int:
    """I elements per smallest legal cut along g.i_dim (caller ensures i_dim is not None)."""
    return g.i_unit * (g.quantum if g.i_dim == 1 else 1)


def _where(index: ModelIndex, g: PieceGroup) -> str:
    path = index.files[g.files[0]].path if g.files and g.files[0] < len(index.files) else "?"
    return f"{path}: tensor {g.tensors[0] if g.tensors else '?'!r}"


def _check_geometry(index: ModelIndex) -> None:
    """Every I-dependent group must span exactly moe_intermediate_size along its i_dim."""
    big_i = index.config.moe_intermediate_size
    seen: set[tuple] = set()
    for g in index.groups:
        if g.i_dim is None:
            continue
        key = (g.shape, g.i_dim, g.i_unit)
        if key in seen:
            continue
        if g.i_dim >= max(len(g.shape), 1) or g.i_unit < 1:
            raise ConfigMismatch(f"{_where(index, g)}: I dim {g.i_dim} does not exist in shape {list(g.shape)}")
        n = g.shape[g.i_dim]
        if -(-big_i // g.i_unit) != n:
            raise ConfigMismatch(
                f"{_where(index, g)}: dim {g.i_dim} of shape {list(g.shape)} holds {n} x {g.i_unit} "
                f"elements, but moe_intermediate_size is {big_i}"
            )
        if g.i_dim == 1 and g.cols % g.quantum:
            raise ConfigMismatch(f"{_where(index, g)}: {g.cols} columns are not whole blocks of {g.quantum}")
        seen.add(key)


def _tp_units(index: ModelIndex) -> list[tuple[int, str, str]]:
    """Distinct (unit, description, projs) cut units of the index's I-dependent groups.

    projs is "" when every projection shares the unit, else e.g. "down_proj"."""
    fam = format_family(index.format)
    notes = TP_NEEDS.get(fam, {})
    gguf_type = index.format.split(":", 1)[1] if ":" in index.format else ""
    out: dict[tuple[int, str], set[str]] = {}
    for g in index.groups:
        if g.i_dim is None:
            continue
        u = _cut_unit(g)
        desc = (g.unit_note or notes.get(g.kind) or "{u}-element units").format(u=u, t=gguf_type)
        out.setdefault((u, desc), set()).add(g.proj)
    return [
        (u, d, "" if len(p) == len(PROJS) else "/".join(x for x in PROJS if x in p) + "_proj")
        for (u, d), p in out.items()
    ]


def _tp_refusal(big_i: int, n: int, units: list[tuple[int, str, str]]) -> str | None:
    """Why `n` nodes cannot tp-split I (None: they can)."""
    if n == 1:
        return None  # whole pieces, nothing is cut
    if big_i % n:
        return f"gives {big_i / n:g} per node, not a whole number"
    i_tp = big_i // n
    bad = [(u, d, p) for (u, d, p) in units if i_tp % u]
    if not bad:
        return None
    what = " and ".join(f"the {d}" + (f" of {p}" if p else "") for u, d, p in bad)
    return f"gives {i_tp} per node, not a multiple of {what}"


def check_split(index: ModelIndex, n_nodes: int, split: str) -> None:
    """Refuse a split the alignment table forbids, with the numbers and a way out (SplitError)."""
    if split not in SPLITS:
        raise SplitError(f"--split {split!r}: expected one of {', '.join(SPLITS)}")
    if n_nodes < 1:
        raise SplitError(f"--nodes {n_nodes}: need at least one node")
    if index.shards is not None:
        if split != "tp":
            raise SplitError(
                f"{index.format} files are pre-sharded into {index.shards} .numa shards: "
                f"--split {split} is impossible; use --split tp --nodes {index.shards}"
            )
        if n_nodes != index.shards:
            raise SplitError(
                f"{index.format} files are pre-sharded into {index.shards} .numa shards, "
                f"not {n_nodes}; use --nodes {index.shards}"
            )
        return
    if split == "ep":
        return
    _check_geometry(index)
    big_i = index.config.moe_intermediate_size
    units = _tp_units(index)
    why = _tp_refusal(big_i, n_nodes, units)
    if why is None:
        return
    ok = [n for n in SUGGEST_NODES if n > 1 and _tp_refusal(big_i, n, units) is None]
    if ok:
        nodes = ", ".join(map(str, ok[:-1])) + (" or " if len(ok) > 1 else "") + str(ok[-1])
        way = f"use --nodes {nodes}, or --split ep"
    else:
        way = "use --split ep"
    raise SplitError(f"moe_intermediate_size {big_i} over {n_nodes} nodes {why}; {way}")


def _align(x: int) -> int:
    return -(-x // ALIGN) * ALIGN


def _layout_key(g: PieceGroup) -> tuple[int, int, int]:
    return (KINDS.index(g.kind), PROJS.index(g.proj), -1 if g.shard is None else g.shard)


def _shift(offsets: tuple[int, ...], delta: int) -> tuple[int, ...]:
    return offsets if delta == 0 else tuple([o + delta for o in offsets])


def _tp_geometry(g: PieceGroup, pos: int, n: int, big_i: int) -> tuple:
    """(slice, staged shape, delta, rows, run, src_stride) of node `pos` of `n` for group g."""
    if g.i_dim is None or n == 1:  # I-independent, or one node: the whole piece (slice null)
        return None, g.shape, 0, 1, g.nbytes, g.nbytes
    i_tp = big_i // n
    dim_n = g.shape[g.i_dim]
    start = pos * i_tp // g.i_unit
    stop = dim_n if pos == n - 1 else (pos + 1) * i_tp // g.i_unit
    if g.i_dim == 0:
        rb = g.row_bytes
        run = (stop - start) * rb
        return (0, start, stop), (stop - start, *g.shape[1:]), start * rb, 1, run, run
    qb = _quantum_bytes(g)
    return (
        (1, start, stop),
        (g.rows, stop - start),
        start // g.quantum * qb,
        g.rows,
        (stop - start) // g.quantum * qb,
        g.row_bytes,
    )


def _array(
    g: PieceGroup, node: int, lo: int, hi: int, geom: tuple, offset: int
) -> ArrayPlan:
    slc, shape, delta, rows, run, src_stride = geom
    offs = g.offsets if (lo, hi) == (0, g.count) else g.offsets[lo:hi]
    files = g.files if (lo, hi) == (0, g.count) else g.files[lo:hi]
    return ArrayPlan(
        layer=g.layer,
        node=node,
        proj=g.proj,
        kind=g.kind,
        offset=offset,
        first=g.first + lo,
        count=hi - lo,
        stride=rows * run * _ratio(g),
        dtype=_staged_dtype(g),
        shape=tuple(shape),
        slice=slc,
        files=files,
        src_offsets=_shift(offs, delta),
        rows=rows,
        run=run,
        src_stride=src_stride,
        conversion=g.conversion,
        shard=g.shard,
    )


def ep_blocks(count: int, n: int) -> list[tuple[int, int]]:
    """Contiguous [lo, hi) positions per node; the remainder goes to the lowest nodes."""
    base, rem = divmod(count, n)
    out, lo = [], 0
    for i in range(n):
        hi = lo + base + (1 if i < rem else 0)
        out.append((lo, hi))
        lo = hi
    return out


def _drops(groups: Iterable[PieceGroup]) -> tuple[DropRange, ...]:
    spans: list[tuple[int, int, int]] = []
    for g in groups:
        nb = g.nbytes
        spans.extend(zip(g.files, g.offsets, [o + nb for o in g.offsets]))
    spans.sort()
    out: list[DropRange] = []
    cur_f, cur_s, cur_e = -1, 0, 0
    for f, s, e in spans:
        s = s // PAGE * PAGE
        e = -(-e // PAGE) * PAGE
        if f == cur_f and s <= cur_e:
            if e > cur_e:
                cur_e = e
            continue
        if cur_f >= 0:
            out.append(DropRange(cur_f, cur_s, cur_e - cur_s))
        cur_f, cur_s, cur_e = f, s, e
    if cur_f >= 0:
        out.append(DropRange(cur_f, cur_s, cur_e - cur_s))
    return tuple(out)


def _layers(index: ModelIndex) -> dict[int, list[PieceGroup]]:
    by_layer: dict[int, list[PieceGroup]] = {}
    for g in index.groups:
        by_layer.setdefault(g.layer, []).append(g)
    for layer, gs in by_layer.items():
        gs.sort(key=_layout_key)
        spans = {(g.first, g.count) for g in gs}
        if len(spans) != 1:
            raise ConfigMismatch(
                f"{_where(index, gs[0])}: layer {layer} has groups over different expert ranges "
                f"{sorted(spans)}"
            )
    return by_layer


def plan(index: ModelIndex, topology: Any, split: str = "tp") -> Plan:
    """Per (layer, node): segment size and read ops for `split` over `topology`. Pure, no I/O."""
    nodes = node_ids(topology)
    n = len(nodes)
    check_split(index, n, split)
    big_i = index.config.moe_intermediate_size
    by_layer = _layers(index)
    geom_cache: dict[tuple, tuple] = {}
    segments: list[SegmentPlan] = []
    drops: list[tuple[int, tuple[DropRange, ...]]] = []
    for layer, groups in by_layer.items():
        count = groups[0].count
        blocks = ep_blocks(count, n) if split == "ep" else [(0, count)] * n
        for pos, node in enumerate(nodes):
            lo, hi = blocks[pos]
            if hi <= lo:
                continue  # ep: a node with no expert gets no segment
            arrays: list[ArrayPlan] = []
            cursor = 0
            for g in groups:
                if g.shard is not None and g.shard != pos:
                    continue
                if split == "ep":
                    geom = (None, g.shape, 0, 1, g.nbytes, g.nbytes)
                else:
                    key = (g.shape, g.nbytes, g.i_dim, g.i_unit, g.quantum, g.quantum_bytes, pos)
                    geom = geom_cache.get(key)
                    if geom is None:
                        geom = geom_cache[key] = _tp_geometry(g, pos, n, big_i)
                a = _array(g, node, lo, hi, geom, _align(cursor))
                arrays.append(a)
                cursor = a.end
            if arrays:
                segments.append(SegmentPlan(layer, node, cursor, tuple(arrays)))
        drops.append((layer, _drops(groups)))
    log.debug("planned %s over %d node(s): %d layer(s), %d segment(s), %d array(s)", split, n,
              len(by_layer), len(segments), sum(len(s.arrays) for s in segments))
    return Plan(
        split=split,
        files=tuple(f.path for f in index.files),
        nodes=nodes,
        layers=tuple(by_layer),
        segments=tuple(segments),
        drops=tuple(drops),
    )


# ---------------------------------------------------------------------------------------
# Manifest records
# ---------------------------------------------------------------------------------------
def manifest_arrays(plan: Plan, segment_name: Callable[[int, int], str] | str) -> list[dict]:
    """The manifest's "arrays" records, one per (layer, node, proj, kind) array.

    `segment_name(layer, node)` gives a segment's manifest name; a str is a format template
    with `{layer}` and `{node}` fields (e.g. "ktnuma.RUN.L{layer}.n{node}").
    """
    name = segment_name.format if isinstance(segment_name, str) else None
    out: list[dict] = []
    for s in plan.segments:
        seg = name(layer=s.layer, node=s.node) if name else segment_name(s.layer, s.node)  # type: ignore[operator]
        for a in s.arrays:
            out.append(
                {
                    "layer": a.layer,
                    "node": a.node,
                    "proj": a.proj,
                    "kind": a.kind,
                    "segment": seg,
                    "offset": a.offset,
                    "experts": [a.first, a.count],
                    "stride": a.stride,
                    "nbytes": a.nbytes,
                    "dtype": a.dtype,
                    "shape": list(a.shape),
                    "slice": None
                    if a.slice is None
                    else {"dim": a.slice[0], "start": a.slice[1], "stop": a.slice[2]},
                }
            )
    return out


# ---------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------
def _staged_nbytes(g: PieceGroup, shape: tuple[int, ...], ratio: int) -> int | None:
    """Bytes of a staged piece of `shape` cut from g (None if the shape is not a cut of g)."""
    if len(shape) != len(g.shape):
        return None
    if g.quantum > 1:
        rows, cols = shape
        if cols % g.quantum:
            return None
        return rows * (cols // g.quantum) * _quantum_bytes(g) * ratio
    elems = math.prod(g.shape)
    if elems == 0 or g.nbytes % elems:
        return None
    return math.prod(shape) * (g.nbytes // elems) * ratio


def validate(plan: Plan, index: ModelIndex) -> None:
    """Check every invariant of `plan` against `index`; raise PlanInvalid listing all problems."""
    problems: list[str] = []
    bad = problems.append
    if plan.files != tuple(f.path for f in index.files):
        bad("plan files differ from the index files")
    if plan.split not in SPLITS:
        bad(f"unknown split {plan.split!r}")
    nodes = plan.nodes
    pos_of = {node: i for i, node in enumerate(nodes)}
    groups = {(g.layer, g.proj, g.kind, g.shard): g for g in index.groups}
    # (group key) -> list of (node, first, count, (start, stop) on the cut dim)
    cover: dict[tuple, list[tuple[int, int, int, int, int]]] = {k: [] for k in groups}
    seen_seg: set[tuple[int, int]] = set()
    read_bytes: dict[tuple, int] = dict.fromkeys(groups, 0)
    for s in plan.segments:
        where = f"segment L{s.layer} n{s.node}"
        if (s.layer, s.node) in seen_seg:
            bad(f"{where}: planned twice")
        seen_seg.add((s.layer, s.node))
        if s.node not in pos_of:
            bad(f"{where}: node not in the topology")
            continue
        if not s.arrays:
            bad(f"{where}: no arrays")
            continue
        end = 0
        for a in sorted(s.arrays, key=lambda a: a.offset):
            at = f"{where} {a.proj} {a.kind}"
            if (a.layer, a.node) != (s.layer, s.node):
                bad(f"{at}: belongs to L{a.layer} n{a.node}")
            if a.offset % ALIGN:
                bad(f"{at}: offset {a.offset} not {ALIGN}-byte aligned")
            if a.offset < end:
                bad(f"{at}: [{a.offset}, {a.end}) overlaps the previous array ending at {end}")
            end = max(end, a.end)
            if a.count < 1 or len(a.files) != a.count or len(a.src_offsets) != a.count:
                bad(f"{at}: {a.count} experts but {len(a.files)} files, {len(a.src_offsets)} offsets")
                continue
            g = groups.get((a.layer, a.proj, a.kind, a.shard))
            if g is None:
                bad(f"{at}: no such piece group in the index (shard {a.shard})")
                continue
            if a.shard is not None and pos_of[s.node] != a.shard:
                bad(f"{at}: shard {a.shard} planned on node position {pos_of[s.node]}")
            ratio = _ratio(g)
            if a.conversion != g.conversion or a.dtype != _staged_dtype(g):
                bad(f"{at}: conversion/dtype {a.conversion}/{a.dtype} != {g.conversion}/{_staged_dtype(g)}")
            if a.stride != a.rows * a.run * ratio:
                bad(f"{at}: stride {a.stride} != rows {a.rows} x run {a.run} x ratio {ratio}")
            if _staged_nbytes(g, a.shape, ratio) != a.stride:
                bad(f"{at}: shape {list(a.shape)} does not make a {a.stride}-byte piece")
            lo = a.first - g.first
            if lo < 0 or lo + a.count > g.count:
                bad(f"{at}: experts [{a.first}, {a.first + a.count}) outside the group's")
                continue
            # the read geometry must be exactly what the record's slice names
            if a.slice is None:
                cut = (0, 1) if g.i_dim is None else (0, g.shape[g.i_dim])
                want = (0, 1, g.nbytes, g.nbytes)
            else:
                dim, start, stop = a.slice
                if g.i_dim is None or dim != g.i_dim or not 0 <= start < stop <= g.shape[dim]:
                    bad(f"{at}: slice {a.slice} is not a cut of shape {list(g.shape)} on I dim {g.i_dim}")
                    continue
                cut = (start, stop)
                if dim == 0:
                    rb = g.row_bytes
                    want = (start * rb, 1, (stop - start) * rb, (stop - start) * rb)
                else:
                    qb = _quantum_bytes(g)
                    if start % g.quantum or stop % g.quantum:
                        bad(f"{at}: slice {a.slice} cuts through {g.quantum}-wide blocks")
                        continue
                    want = (start // g.quantum * qb, g.rows, (stop - start) // g.quantum * qb, g.row_bytes)
            delta, rows, run, src_stride = want
            if (a.rows, a.run) != (rows, run) or (rows > 1 and a.src_stride != src_stride):
                bad(f"{at}: reads {a.rows}x{a.run}/{a.src_stride}, slice needs {rows}x{run}/{src_stride}")
            if a.files != g.files[lo : lo + a.count]:
                bad(f"{at}: source files differ from the pieces'")
            if a.src_offsets != tuple(o + delta for o in g.offsets[lo : lo + a.count]):
                bad(f"{at}: source offsets are not the slice's start in each piece")
            span = (a.rows - 1) * a.src_stride + a.run if a.rows > 1 else a.run
            for f, o in zip(a.files, a.src_offsets):
                if f >= len(index.files) or o < 0 or o + span > index.files[f].size:
                    bad(f"{at}: read [{o}, {o + span}) outside file {f}")
                    break
            cover[(g.layer, g.proj, g.kind, g.shard)].append((s.node, a.first, a.count, *cut))
            read_bytes[(g.layer, g.proj, g.kind, g.shard)] += a.count * a.rows * a.run
        if end != s.size:
            bad(f"{where}: size {s.size} != end of its last array {end}")
        conv = sum(a.count * a.rows * a.run * _ratio_of(a) for a in s.arrays)
        if conv != s.payload:
            bad(f"{where}: {conv} bytes read (after conversion) but {s.payload} staged")
    # every source byte needed covered exactly once (or once per node for replicated pieces)
    for key, g in groups.items():
        recs = cover[key]
        full = (0, 1) if g.i_dim is None else (0, g.shape[g.i_dim])
        replicated = plan.split == "tp" and g.i_dim is None and g.shard is None
        scopes = [[r for r in recs if r[0] == node] for node in nodes] if replicated else [recs]
        for scope in scopes:
            _check_tiling(scope, g, full, plan.split, key, bad)
    # totals conserved: source bytes read per group == its pieces' bytes (x nodes if replicated)
    for key, g in groups.items():
        replicated = plan.split == "tp" and g.i_dim is None and g.shard is None
        want = g.count * g.nbytes * (len(nodes) if replicated else 1)
        if read_bytes[key] != want:
            bad(f"L{key[0]} {key[1]} {key[2]}: {read_bytes[key]} source bytes read, pieces hold {want}")
    # page-cache drops cover every piece read
    layers = {g.layer for g in index.groups}
    if set(plan.layers) != layers:
        bad(f"plan layers {sorted(plan.layers)} != index layers {sorted(layers)}")
    for layer in layers:
        ranges = plan.drop_ranges(layer)
        for r in ranges:
            if r.start % PAGE or r.length % PAGE or r.length <= 0:
                bad(f"layer {layer}: drop range {r} not page-rounded")
        by_file: dict[int, list[tuple[int, int]]] = {}
        for r in ranges:
            by_file.setdefault(r.file, []).append((r.start, r.start + r.length))
        for g in index.groups:
            if g.layer != layer:
                continue
            for f, o in zip(g.files, g.offsets):
                if not any(s0 <= o and o + g.nbytes <= e0 for s0, e0 in by_file.get(f, ())):
                    bad(f"layer {layer}: piece of {g.tensors[0] if g.tensors else g.proj} at {f}:{o} not dropped")
                    break
    if problems:
        raise PlanInvalid(problems)


def _ratio_of(a: ArrayPlan) -> int:
    return CONVERSIONS[a.conversion].ratio if a.conversion else 1


def _check_tiling(recs: list, g: PieceGroup, full: tuple[int, int], split: str, key: tuple, bad) -> None:
    """Per expert, the records' cuts must tile [0, dim) exactly once."""
    name = f"L{key[0]} {key[1]} {key[2]}" + ("" if key[3] is None else f" shard {key[3]}")
    if not recs:
        bad(f"{name}: not planned on any node")
        return
    cuts = sorted({g.first, g.first + g.count} | {r[1] for r in recs} | {r[1] + r[2] for r in recs})
    for e0, e1 in zip(cuts, cuts[1:]):
        parts = sorted((r[3], r[4]) for r in recs if r[1] <= e0 and e1 <= r[1] + r[2])
        pos = full[0]
        ok = bool(parts)
        for s0, s1 in parts:
            if s0 != pos:
                ok = False
                break
            pos = s1
        if not ok or pos != full[1]:
            bad(f"{name}: experts [{e0}, {e1}) covered by {parts}, not exactly [{full[0]}, {full[1]}) once")
