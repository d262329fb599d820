"""`--split tp-whole`: whole experts for engines that slice every expert per NUMA part themselves
(kt-kernel's native backends: part i of N reads I rows [i*I/N, (i+1)*I/N) of gate/up and the same
I columns of down, whichever node's memory they are in).

Experts go into the (layer, node) segments exactly as under `ep` (a contiguous block per node, whole
pieces, `slice` null), so whole-expert views work unchanged; every array starts page-aligned. Each
segment carries a per-range memory policy that puts each byte on the node of the part that reads it
where pages allow:
- a piece whose I dim is its rows (dim 0) and whose part blocks are whole pages: part i's row block of
  every expert is bound to node i (pages are page-aligned because the array is and the piece is N
  whole-page blocks);
- everything else is interleaved over the run's nodes: pieces cut along columns (down's I dim: each
  part's bytes are strided), I-independent pieces (every part reads them), blocks that are not whole
  pages (a part's rows smaller than, or not a multiple of, a page; I not a multiple of N), and the
  padding between arrays. Scales follow the same rule (they are small: usually interleaved).
One node: the whole segment bound to that node (the same bytes as `ep` over one node).
"""
from __future__ import annotations

from dataclasses import replace
from functools import lru_cache

from ktnuma.index.model import ModelIndex, PieceGroup
from ktnuma.plan.ep import EP
from ktnuma.plan.layout import check_shards, ep_blocks, ratio, segment, staged_i_dim, staged_rows, whole
from ktnuma.plan.records import PAGE, LayerInput, PolicyRange, SegmentPlan, Split

NAME = "tp-whole"


def check(index: ModelIndex, n_nodes: int) -> None:
    check_shards(index, n_nodes, NAME, allowed=False)


def part_block(g: PieceGroup, n: int, big_i: int) -> tuple[int | None, str]:
    """(bytes of one part's row block of a staged piece of g, or None, why not): part i of n reads
    bytes [i*b, (i+1)*b) of each piece when g's I dim is its rows; bound only if b is whole pages."""
    if g.i_dim is None:
        return None, "I-independent: every part reads it"
    if staged_i_dim(g) != 0:  # (as staged: a transposed piece's rows are the source's columns)
        return None, "its I dim is columns: each part's bytes are strided"
    if big_i % n or (big_i // n) % g.i_unit or staged_rows(g) * g.i_unit != big_i:
        return None, f"moe_intermediate_size {big_i} does not split into {n} whole row blocks"
    staged = g.nbytes * ratio(g)
    b = staged // n
    if b % PAGE:
        return None, f"a part's rows are {b} bytes, not whole {PAGE}-byte pages"
    return b, f"each part's rows ({b} bytes per expert) bound to the part's node"


def policy(seg: SegmentPlan, blocks: dict[tuple[str, str], int | None], nodes: tuple[int, ...]) -> tuple[PolicyRange, ...]:
    """seg's ranges: bound row blocks per part, interleaved elsewhere (merged where equal)."""
    if len(nodes) == 1:
        return (PolicyRange(0, seg.size, "bind", (nodes[0],)),)
    # (offset, end, count, stride, block) per array: segments of one shape (every layer's, mostly) share it
    shape = tuple((a.offset, a.end, a.count, a.stride, blocks.get((a.proj, a.kind))) for a in seg.arrays)
    return _policy(seg.size, shape, nodes)


@lru_cache(maxsize=64)
def _policy(size: int, shape: tuple[tuple[int, int, int, int, int | None], ...],
            nodes: tuple[int, ...]) -> tuple[PolicyRange, ...]:
    spans: list[tuple[int, int, int | None]] = []  # (start, stop, part position or None: interleave)
    cursor = 0
    for offset, end, count, stride, b in shape:
        if offset > cursor:
            spans.append((cursor, offset, None))
        if b is None:
            spans.append((offset, end, None))
        else:
            for k in range(count):
                base = offset + k * stride
                spans.extend((base + i * b, base + (i + 1) * b, i) for i in range(len(nodes)))
        cursor = end
    out: list[PolicyRange] = []
    for start, stop, pos in spans:
        if pos is None:  # whole pages around it (a bound block never shares a page: it is page-exact)
            start, stop = start // PAGE * PAGE, min(-(-stop // PAGE) * PAGE, size)
            mode, on = "interleave", nodes
        else:
            mode, on = "bind", (nodes[pos],)
        prev = out[-1] if out else None
        if prev is not None and (prev.mode, prev.nodes) == (mode, on) and prev.stop >= start:
            out[-1] = replace(prev, stop=max(prev.stop, stop))
        elif start < stop:
            out.append(PolicyRange(max(start, prev.stop if prev else 0), stop, mode, on))
    return tuple(out)


def layer(inp: LayerInput) -> list[SegmentPlan]:
    n = len(inp.nodes)
    big_i = inp.index.config.moe_intermediate_size
    blocks = {(g.proj, g.kind): part_block(g, n, big_i)[0] if n > 1 else None for g in inp.groups}
    out = []
    for (lo, hi), node in zip(ep_blocks(inp.groups[0].count, n), inp.nodes):
        seg = segment(inp.layer, node, [(g, lo, hi, whole(g)) for g in inp.groups], align_to=PAGE)
        if seg is not None:
            out.append(replace(seg, policy=policy(seg, blocks, inp.nodes)))
    return out


def notes(index: ModelIndex, nodes: tuple[int, ...]) -> tuple[tuple[str, str], ...]:
    """How the pages are placed, per (proj, kind), for the manifest's model.notes["placement"]."""
    n = len(nodes)
    if n == 1:
        return (("placement", f"{NAME} over 1 node: whole experts, every segment bound to node {nodes[0]}"),)
    big_i = index.config.moe_intermediate_size
    seen: dict[tuple[str, str], str] = {}
    for g in index.groups:
        b, why = part_block(g, n, big_i)
        seen.setdefault((g.proj, g.kind), why if b is not None else f"interleaved over nodes "
                        f"{','.join(map(str, nodes))} ({why})")
    parts = "; ".join(f"{proj} {kind}: {text}" for (proj, kind), text in seen.items())
    return (("placement", f"{NAME} over {n} nodes: whole experts, experts per segment as under ep; part i "
                          f"reads I rows [i*I/{n}, (i+1)*I/{n}) of every expert; {parts}; padding interleaved"),)


TP_WHOLE = Split(NAME, check, layer, EP.replicates,  # whole pieces, each on one node: never replicated
                 "whole experts (as ep), each byte's page on the node of the kt part that reads it where pages "
                 "allow, the rest interleaved", notes)
