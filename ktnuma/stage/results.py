"""What a staging run reports: per segment, per completed layer, progress events, per-node summaries."""
from __future__ import annotations

from dataclasses import dataclass, field

from ktnuma.plan.records import Plan


@dataclass(frozen=True)
class SegmentResult:
    name: str
    layer: int
    node: int
    size: int
    bytes: int  # bytes written into it (by every worker that wrote into it)
    seconds: float  # busy seconds of its node's worker on this layer
    placement: dict[str, int] | None
    attempts: int = 1


@dataclass(frozen=True)
class LayerDone:
    """A completed layer: its segments (node order of the plan)."""

    layer: int
    segments: tuple[SegmentResult, ...]


@dataclass(frozen=True)
class ProgressEvent:
    kind: str  # "segment" | "layer" | "retry"
    layer: int
    node: int | None
    layers_done: int
    layers_total: int
    bytes_done: int
    bytes_total: int
    node_bytes: dict[int, int]  # payload bytes done per node
    node_seconds: dict[int, float]  # busy seconds per node
    elapsed: float
    message: str = ""


@dataclass(frozen=True)
class NodeSummary:
    node: int
    real_node: int
    bytes: int
    seconds: float
    pages: int
    pages_on_node: int

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    @property
    def pct_on_node(self) -> float:
        return 100.0 * self.pages_on_node / self.pages if self.pages else 0.0


@dataclass(frozen=True)
class StageResult:
    run_id: str
    plan: Plan
    segments: tuple[SegmentResult, ...]
    seconds: float
    retries_used: int = 0
    nodes: tuple[NodeSummary, ...] = field(default=())
    read_bytes: int = 0  # bytes read from the source files (O_DIRECT: the aligned supersets)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.segments)

    @property
    def read_ratio(self) -> float:
        """read_bytes / staged bytes: 1.0 when every source byte is read once."""
        return self.read_bytes / self.bytes if self.bytes else 0.0

    def by_name(self) -> dict[str, SegmentResult]:
        return {s.name: s for s in self.segments}


def summarize(topology, segments: tuple[SegmentResult, ...],
              busy: dict[int, float] | None = None) -> tuple[NodeSummary, ...]:
    """Per-node bytes, busy seconds (of its worker: `busy`, else its segments') and pages on the
    backing real node."""
    out = []
    for n in topology.nodes:
        segs = [s for s in segments if s.node == n.id]
        pages = on = 0
        for s in segs:
            if s.placement:
                pages += sum(s.placement.values())
                on += s.placement.get(str(n.real_node), 0)
        seconds = busy[n.id] if busy and n.id in busy else sum(s.seconds for s in segs)
        out.append(NodeSummary(n.id, n.real_node, sum(s.bytes for s in segs), seconds, pages, on))
    return tuple(out)
