"""The plan's records: frozen descriptions of what lands where, and the split rule record.

Work units are per (layer, node, proj, kind) arrays of uniform pieces (one manifest record
each), not one object per piece, so a DeepSeek-V3-sized plan stays small.

Reading piece k of an ArrayPlan: from file `files[k]`, starting at `src_offsets[k]`, read
`rows` runs of `run` bytes each, `src_stride` bytes apart (rows == 1 or run == src_stride:
one contiguous run of rows*run bytes); the bytes land contiguously at segment offset
`offset + k * stride` after the named `conversion` (stride == rows * run * ratio).
Who reads which source bytes, and how the reads are coalesced and chunked, is `ops.py`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ktnuma.index.model import ModelIndex, PieceGroup

ALIGN = 64  # every stacked array starts 64-byte aligned inside its segment
PAGE = 4096  # page-cache drop granularity


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


MODES = ("bind", "interleave")  # memory policies a segment range can ask for (MPOL_BIND / MPOL_INTERLEAVE)


@dataclass(frozen=True)
class PolicyRange:
    """Bytes [start, stop) of a segment placed by one memory policy: "bind" to its one node, or
    "interleave" over its nodes (topology node ids; the worker maps them to real nodes). start is
    page-aligned; stop too, except for a segment's last range (stop == the segment size)."""

    start: int
    stop: int
    mode: str  # one of MODES
    nodes: tuple[int, ...]


@dataclass(frozen=True)
class SegmentPlan:
    layer: int
    node: int
    size: int  # bytes of the segment (end of its last array; at least 1 array)
    arrays: tuple[ArrayPlan, ...]
    # per-range memory policy covering [0, size) exactly; () = the whole segment bound to `node`
    policy: tuple[PolicyRange, ...] = ()

    def ranges(self) -> tuple[PolicyRange, ...]:
        """The policy as ranges (the default: one range binding the whole segment to its node)."""
        return self.policy or (PolicyRange(0, self.size, "bind", (self.node,)),)

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
    split: str  # a key of plan.splits.SPLITS
    files: tuple[str, ...]  # paths, index-aligned with ModelIndex.files
    nodes: tuple[int, ...]  # topology node ids in topology order
    layers: tuple[int, ...]
    segments: tuple[SegmentPlan, ...]  # ordered by layer, then node order
    drops: tuple[tuple[int, tuple[DropRange, ...]], ...]  # per layer: page-cache ranges to drop
    notes: tuple[tuple[str, str], ...] = ()  # (topic, text) the split adds to the manifest's model.notes

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


@dataclass(frozen=True)
class LayerInput:
    """What a split rule plans one layer from: the layer's piece groups (layout order: KINDS,
    then PROJS, then shard) over `nodes` (topology order)."""

    index: ModelIndex
    layer: int
    groups: tuple[PieceGroup, ...]
    nodes: tuple[int, ...]


@dataclass(frozen=True)
class Split:
    """One `--split`: a row of plan.splits.SPLITS.

    `check(index, n_nodes)` refuses what the split cannot do (SplitError, with the numbers and
    a way out); `layer(inp)` plans one layer's segments (pure; use plan.layout to build them);
    `replicates(group)` says whether every node holds a whole copy of the group's pieces (so
    validate expects one copy per node instead of one tiling over all nodes); `notes(index, nodes)`
    (optional) describes the plan for the manifest's model.notes."""

    name: str
    check: Callable[[ModelIndex, int], None]
    layer: Callable[[LayerInput], list[SegmentPlan]]
    replicates: Callable[[PieceGroup], bool]
    doc: str = ""
    # (index, nodes) -> (topic, text) notes for the manifest's model.notes (e.g. how pages are placed)
    notes: Callable[[ModelIndex, tuple[int, ...]], tuple[tuple[str, str], ...]] | None = None
