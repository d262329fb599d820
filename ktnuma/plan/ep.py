"""`--split ep`: whole experts, a contiguous block of experts per node (remainder to the lowest
nodes); a node with no expert gets no segment."""
from __future__ import annotations

from ktnuma.index.model import ModelIndex, PieceGroup
from ktnuma.plan.layout import check_shards, ep_blocks, segment, whole
from ktnuma.plan.records import LayerInput, SegmentPlan, Split


def check(index: ModelIndex, n_nodes: int) -> None:
    check_shards(index, n_nodes, "ep", allowed=False)


def layer(inp: LayerInput) -> list[SegmentPlan]:
    blocks = ep_blocks(inp.groups[0].count, len(inp.nodes))
    out = []
    for (lo, hi), node in zip(blocks, inp.nodes):
        seg = segment(inp.layer, node, [(g, lo, hi, whole(g)) for g in inp.groups])
        if seg is not None:
            out.append(seg)
    return out


def _never(g: PieceGroup) -> bool:
    return False


EP = Split("ep", check, layer, _never, "whole experts, a contiguous block of experts per node")
