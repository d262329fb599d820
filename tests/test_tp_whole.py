"""`--split tp-whole`: whole experts laid out as under ep, every array page-aligned, and a per-range
memory policy binding kt part i's row blocks to node i where they are whole pages (the rest
interleaved). Plan level here (independent oracle of which bytes each part reads, validate catching
broken policies); the staged run (worker mbind, manifest, verify) further down."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from ktnuma.errors import PlanInvalid, SplitError
from ktnuma.index.experts import index_model
from ktnuma.plan.planner import PAGE, plan, validate
from ktnuma.plan.records import PolicyRange
from planexec import execute

E = 8
# format -> (hidden, intermediate, synth extras)
SHAPES = {
    "bf16": (64, 64, {}),
    "fp8": (128, 256, {}),
    "gptq-int4": (64, 64, {"group_size": 32}),
    "rawint4": (256, 512, {"group_size": 32}),
    "mxfp4": (256, 512, {}),
    "mxfp8": (256, 512, {}),
    "nvfp4": (256, 512, {}),
}


def _index(synth_model, fmt: str, experts: int = E, **over):
    H, I, kw = SHAPES[fmt]
    kw = {**kw, "hidden": H, "intermediate": I, **over}
    return index_model(synth_model(fmt, experts=experts, experts_per_tok=2, **kw).path)


def _readers(index, a, n: int) -> np.ndarray:
    """Oracle, written from kt-kernel's rule and not from the planner: per byte of array `a`'s stack,
    the one part position that reads it, or -1 where several parts read it (columns, I-independent
    pieces). Part p reads I elements [p*I/n, (p+1)*I/n) of each piece along its I dim."""
    g = next(g for g in index.groups if (g.layer, g.proj, g.kind) == (a.layer, a.proj, a.kind))
    big_i = index.config.moe_intermediate_size
    piece = np.full(a.stride, -1, dtype=np.int64)
    if n > 1 and g.i_dim == 0 and big_i % n == 0:
        rows = g.shape[0]
        row_bytes = a.stride // rows
        for r in range(rows):
            i0, i1 = r * g.i_unit, min((r + 1) * g.i_unit, big_i)  # I elements row r covers
            parts = {i * n // big_i for i in range(i0, i1)}
            if len(parts) == 1:
                piece[r * row_bytes:(r + 1) * row_bytes] = parts.pop()
    elif n == 1:
        piece[:] = 0
    return np.tile(piece, a.count)


def _check_placement_rule(index, p) -> None:
    """Every bind range holds only its node's part's bytes; every page that holds only one part's
    bytes (and no padding) is bound to that part's node, all other pages interleaved over every node."""
    nodes = p.nodes
    for s in p.segments:
        owner = np.full(s.size, -2, dtype=np.int64)  # -2: padding
        for a in s.arrays:
            assert a.offset % PAGE == 0, f"array {a.proj} {a.kind} at {a.offset} is not page-aligned"
            assert a.slice is None
            owner[a.offset:a.end] = _readers(index, a, len(nodes))
        want = []
        for start in range(0, s.size, PAGE):
            o = set(owner[start:start + PAGE].tolist())
            want.append(("bind", (nodes[o.pop()],)) if len(o) == 1 and min(o) >= 0 else ("interleave", nodes))
        if len(nodes) == 1:
            want = [("bind", nodes)] * len(want)
        got = [None] * len(want)
        for r in s.ranges():
            for pg in range(r.start // PAGE, -(-r.stop // PAGE)):
                assert got[pg] is None, f"page {pg} in two ranges"
                got[pg] = (r.mode, r.nodes)
        assert got == want, f"segment L{s.layer} n{s.node}"


@pytest.mark.parametrize("fmt", list(SHAPES))
@pytest.mark.parametrize("n", [1, 2, 4])
def test_tp_whole_holds_ep_experts_whole_and_places_each_part_on_its_node(synth_model, fmt, n):
    index = _index(synth_model, fmt)
    p = plan(index, list(range(n)), "tp-whole")
    validate(p, index)
    ep = plan(index, list(range(n)), "ep")
    assert [(s.layer, s.node) for s in p.segments] == [(s.layer, s.node) for s in ep.segments]
    for s, t in zip(p.segments, ep.segments):
        key = lambda a: (a.proj, a.kind, a.first, a.count, a.stride, a.shape, a.files, a.src_offsets)  # noqa: E731
        assert [key(a) for a in s.arrays] == [key(a) for a in t.arrays]
    _check_placement_rule(index, p)
    # the bytes: each piece whole, the same as ep's
    got, ref = execute(p), execute(ep)
    for s, t in zip(p.segments, ep.segments):
        for a, b in zip(s.arrays, t.arrays):
            assert got[(s.layer, s.node)][a.offset:a.end] == ref[(t.layer, t.node)][b.offset:b.end]
    assert dict(p.notes)["placement"].startswith(f"tp-whole over {n} node")


def test_bound_blocks_where_expected_and_the_note_says_which(synth_model):
    index = _index(synth_model, "fp8")  # gate/up weight [256, 128] e4m3: a part's rows are 16 KiB
    p = plan(index, [0, 1], "tp-whole")
    s = p.segments[0]
    gate = next(a for a in s.arrays if (a.proj, a.kind) == ("gate", "weight"))
    binds = [r for r in s.policy if gate.offset <= r.start < gate.end]
    assert [(r.start - gate.offset, r.stop - gate.offset, r.nodes) for r in binds[:4]] == \
        [(0, 16384, (0,)), (16384, 32768, (1,)), (32768, 49152, (0,)), (49152, 65536, (1,))]
    down = next(a for a in s.arrays if (a.proj, a.kind) == ("down", "weight"))
    assert [(r.mode, r.nodes) for r in s.policy if r.start <= down.offset < r.stop] == [("interleave", (0, 1))]
    note = dict(p.notes)["placement"]
    assert "gate weight: each part's rows (16384 bytes per expert) bound" in note
    assert "down weight: interleaved over nodes 0,1 (its I dim is columns" in note


def test_blocks_that_are_not_whole_pages_are_all_interleaved_and_said(synth_model):
    index = _index(synth_model, "bf16")  # [64, 64] bf16: 3 parts do not split 64 rows
    p = plan(index, [0, 1, 2], "tp-whole")
    validate(p, index)
    assert all(s.policy == (PolicyRange(0, s.size, "interleave", (0, 1, 2)),) for s in p.segments)
    assert "does not split into 3 whole row blocks" in dict(p.notes)["placement"]
    small = _index(synth_model, "bf16", hidden=32)  # a part's rows: 32 rows x 32 x 2 = 2048 bytes
    q = plan(small, [0, 1], "tp-whole")
    validate(q, small)
    assert {r.mode for s in q.segments for r in s.policy} == {"interleave"}
    assert "rows are 2048 bytes, not whole 4096-byte pages" in dict(q.notes)["placement"]


def test_one_node_is_whole_experts_bound_to_it(synth_model):
    index = _index(synth_model, "bf16")
    p = plan(index, [3], "tp-whole")
    validate(p, index)
    assert all(s.policy == (PolicyRange(0, s.size, "bind", (3,)),) for s in p.segments)
    assert all(a.count == E and a.first == 0 for s in p.segments for a in s.arrays)


def test_more_nodes_than_experts_still_binds_every_part(synth_model):
    index = _index(synth_model, "bf16", experts=2, intermediate=256)  # parts of 64 rows x 64 x 2 = 8 KiB
    p = plan(index, [0, 1, 2, 3], "tp-whole")
    validate(p, index)
    assert sorted({s.node for s in p.segments}) == [0, 1]  # two experts: two segments per layer
    bound = {r.nodes[0] for s in p.segments for r in s.policy if r.mode == "bind"}
    assert bound == {0, 1, 2, 3}  # nodes without a segment still hold their part's rows
    _check_placement_rule(index, p)


def test_pre_sharded_files_are_refused(synth_model):
    idx = index_model(synth_model("amx-int4", hidden=256, intermediate=512, experts=E, experts_per_tok=2,
                                  numa_shards=2).path)
    with pytest.raises(SplitError, match="split=tp-whole is impossible; use split=tp nodes=2"):
        plan(idx, [0, 1], "tp-whole")


def _broken(p, seg: int, policy) -> object:
    segs = list(p.segments)
    segs[seg] = dataclasses.replace(segs[seg], policy=tuple(policy))
    return dataclasses.replace(p, segments=tuple(segs))


def test_validate_catches_broken_policies(synth_model):
    index = _index(synth_model, "bf16")
    p = plan(index, [0, 1], "tp-whole")
    pol = list(p.segments[0].policy)
    first, second = pol[0], pol[1]
    cases = {
        "starts at 4096, the previous range ended at 0": pol[1:],
        "does not read": [dataclasses.replace(first, nodes=(1,)), dataclasses.replace(second, nodes=(0,))] + pol[2:],
        "not in the run": [dataclasses.replace(first, mode="interleave", nodes=(0, 7))] + pol[1:],
        "whole 4096-byte pages": [dataclasses.replace(first, stop=100), dataclasses.replace(second, start=100)]
        + pol[2:],
        "not a known mode": [dataclasses.replace(first, mode="preferred")] + pol[1:],
        "cover [0,": pol[:-1],
    }
    down = next(r for r in pol if r.mode == "interleave")
    cases["down weight that part 0"] = [dataclasses.replace(r, mode="bind", nodes=(0,)) if r is down else r
                                        for r in pol]
    for why, policy in cases.items():
        with pytest.raises(PlanInvalid, match=why.replace("[", r"\[").replace("(", r"\(")):
            validate(_broken(p, 0, policy), index)
