"""`--split tp`: every node holds a 1/N slice of every expert along I (kt-kernel's TP engine);
I-independent pieces go whole to every node. Refuses misaligned cuts with the numbers and a way out."""
from __future__ import annotations

from ktnuma.errors import ConfigMismatch, SplitError
from ktnuma.index.model import PROJS, ModelIndex, PieceGroup
from ktnuma.index.quant import unit_note
from ktnuma.plan.layout import check_shards, i_cut, segment, where
from ktnuma.plan.records import LayerInput, SegmentPlan, Split

SUGGEST_NODES = range(1, 9)  # node counts offered as a way out of a refused split

# A tp split cuts every I-dependent piece at multiples of I_tp = I/N along its `i_dim`; one stored
# index there covers `i_unit` I elements (times the GGUF block when the cut runs across columns), so
# every such unit must divide I_tp. The units and their names come from the index, which reads them
# off the format records (ktnuma.index.quant: the design's "tp needs" column).


def _cut_unit(g: PieceGroup) -> int:
    """I elements per smallest legal cut along g.i_dim (caller ensures i_dim is not None)."""
    return g.i_unit * (g.quantum if g.i_dim == 1 else 1)


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
            raise ConfigMismatch(f"{where(index, g)}: I dim {g.i_dim} does not exist in shape {list(g.shape)}")
        n = g.shape[g.i_dim]
        if -(-big_i // g.i_unit) != n:
            raise ConfigMismatch(
                f"{where(index, g)}: dim {g.i_dim} of shape {list(g.shape)} holds {n} x {g.i_unit} "
                f"elements, but moe_intermediate_size is {big_i}"
            )
        if g.i_dim == 1 and g.cols % g.quantum:
            raise ConfigMismatch(f"{where(index, g)}: {g.cols} columns are not whole blocks of {g.quantum}")
        seen.add(key)


def _tp_units(index: ModelIndex) -> list[tuple[int, str, str]]:
    """Distinct (unit, description, projs) cut units of the index's I-dependent groups.

    projs is "" when every projection shares the unit, else e.g. "down_proj"."""
    out: dict[tuple[int, str], set[str]] = {}
    for g in index.groups:
        if g.i_dim is None:
            continue
        u = _cut_unit(g)
        desc = g.unit_note or unit_note(index.format, g.kind, u)
        out.setdefault((u, desc), set()).add(g.proj)
    return [
        (u, d, "" if len(p) == len(PROJS) else "/".join(x for x in PROJS if x in p) + "_proj")
        for (u, d), p in out.items()
    ]


def _refusal(big_i: int, n: int, units: list[tuple[int, str, str]]) -> str | None:
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


def check(index: ModelIndex, n_nodes: int) -> None:
    if check_shards(index, n_nodes, "tp", allowed=True):
        return
    _check_geometry(index)
    big_i = index.config.moe_intermediate_size
    units = _tp_units(index)
    why = _refusal(big_i, n_nodes, units)
    if why is None:
        return
    ok = [n for n in SUGGEST_NODES if n > 1 and _refusal(big_i, n, units) is None]
    if ok:
        nodes = ", ".join(map(str, ok[:-1])) + (" or " if len(ok) > 1 else "") + str(ok[-1])
        way = f"use nodes={nodes}, or split=ep"
    else:
        way = "use split=ep"
    raise SplitError(f"moe_intermediate_size {big_i} over {n_nodes} nodes {why}; {way}")


def layer(inp: LayerInput) -> list[SegmentPlan]:
    n = len(inp.nodes)
    big_i = inp.index.config.moe_intermediate_size
    out = []
    for pos, node in enumerate(inp.nodes):
        parts = [(g, 0, g.count, i_cut(g, pos, n, big_i))
                 for g in inp.groups if g.shard is None or g.shard == pos]
        seg = segment(inp.layer, node, parts)
        if seg is not None:
            out.append(seg)
    return out


def replicates(g: PieceGroup) -> bool:
    return g.i_dim is None and g.shard is None


TP = Split("tp", check, layer, replicates,
           "every node a 1/N slice of every expert along I; I-independent pieces whole on every node")
