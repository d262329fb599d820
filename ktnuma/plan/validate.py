"""validate(plan, index): every invariant of a plan checked against its index (PlanInvalid lists
all problems). Independent of how the split rules built the plan."""
from __future__ import annotations

import math
from bisect import bisect_left, bisect_right

from ktnuma.errors import PlanInvalid
from ktnuma.index.model import ModelIndex, PieceGroup
from ktnuma.plan.opcheck import check_ops
from ktnuma.plan.layout import quantum_bytes, ratio as ratio_of, staged_dtype, staged_i_dim, staged_rows
from ktnuma.plan.records import ALIGN, MODES, PAGE, Plan, SegmentPlan
from ktnuma.plan.splits import SPLITS


def _staged_nbytes(g: PieceGroup, shape: tuple[int, ...], ratio: int) -> int | None:
    """Bytes of a staged piece of `shape` cut from g (None if the shape is not a cut of g)."""
    if len(shape) != len(g.shape):
        return None
    if g.quantum > 1:
        rows, cols = shape
        if cols % g.quantum:
            return None
        return rows * (cols // g.quantum) * quantum_bytes(g) * ratio
    elems = math.prod(g.shape)
    if elems == 0 or g.nbytes % elems:
        return None
    return math.prod(shape) * (g.nbytes // elems) * ratio


def validate(plan: Plan, index: ModelIndex, *, io: str = "buffered") -> None:
    """Check every invariant of `plan` against `index`; raise PlanInvalid listing all problems."""
    problems: list[str] = []
    bad = problems.append
    if plan.files != tuple(f.path for f in index.files):
        bad("plan files differ from the index files")
    rule = SPLITS.get(plan.split)
    if rule is None:
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
            ratio = ratio_of(g)
            if a.conversion != g.conversion or a.dtype != staged_dtype(g):
                bad(f"{at}: conversion/dtype {a.conversion}/{a.dtype} != {g.conversion}/{staged_dtype(g)}")
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
                want = (0, g.rows, g.row_bytes, g.row_stride) if g.strided else (0, 1, g.nbytes, g.nbytes)
            else:
                dim, start, stop = a.slice
                if g.i_dim is None or dim != g.i_dim or not 0 <= start < stop <= g.shape[dim]:
                    bad(f"{at}: slice {a.slice} is not a cut of shape {list(g.shape)} on I dim {g.i_dim}")
                    continue
                cut = (start, stop)
                if dim == 0:
                    rb = g.row_bytes
                    if g.strided:
                        want = (start * g.row_stride, stop - start, rb, g.row_stride)
                    else:
                        want = (start * rb, 1, (stop - start) * rb, (stop - start) * rb)
                else:
                    qb = quantum_bytes(g)
                    if start % g.quantum or stop % g.quantum:
                        bad(f"{at}: slice {a.slice} cuts through {g.quantum}-wide blocks")
                        continue
                    want = (start // g.quantum * qb, g.rows, (stop - start) // g.quantum * qb,
                            g.row_stride if g.strided else g.row_bytes)
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
        _check_policy(s, where, pos_of, groups, index.config.moe_intermediate_size, bad)
        conv = sum(a.count * a.rows * a.run * ratio_of(a) for a in s.arrays)
        if conv != s.payload:
            bad(f"{where}: {conv} bytes read (after conversion) but {s.payload} staged")
    # every source byte needed covered exactly once (or once per node for replicated pieces)
    for key, g in groups.items():
        recs = cover[key]
        full = (0, 1) if g.i_dim is None else (0, g.shape[g.i_dim])
        replicated = rule is not None and rule.replicates(g)
        scopes = [[r for r in recs if r[0] == node] for node in nodes] if replicated else [recs]
        for scope in scopes:
            _check_tiling(scope, g, full, plan.split, key, bad)
    # totals conserved: source bytes read per group == its pieces' bytes (x nodes if replicated)
    for key, g in groups.items():
        replicated = rule is not None and rule.replicates(g)
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
                if not any(s0 <= o and o + g.span <= e0 for s0, e0 in by_file.get(f, ())):
                    bad(f"layer {layer}: piece of {g.tensors[0] if g.tensors else g.proj} at {f}:{o} not dropped")
                    break
    if not problems:  # the read ops derive from the arrays: check them on a sound plan only
        check_ops(plan, bad, io)
    if problems:
        raise PlanInvalid(problems)


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


def _check_policy(s: SegmentPlan, where: str, pos_of: dict[int, int], groups: dict, big_i: int, bad) -> None:
    """The segment's memory-policy ranges: page-aligned starts, covering [0, size) exactly in order,
    modes known, nodes in the run; a "bind" range holds only bytes that the bound node's part reads
    (whole-expert readers: part p of N reads bytes [p*b, (p+1)*b) of each piece whose I dim is its
    rows, b = staged piece bytes / N, when I splits into N whole row blocks); padding is read by none."""
    pos = 0
    n = len(pos_of)
    arrays = sorted(s.arrays, key=lambda a: a.offset)
    starts = [a.offset for a in arrays]
    for r in s.policy:
        at = f"{where} policy [{r.start}, {r.stop}) {r.mode} {list(r.nodes)}"
        if r.start != pos:
            bad(f"{at}: starts at {r.start}, the previous range ended at {pos}")
        if r.start % PAGE or r.stop <= r.start or (r.stop % PAGE and r.stop != s.size):
            bad(f"{at}: not a non-empty range of whole {PAGE}-byte pages (or ending at the size {s.size})")
        if r.mode not in MODES or not r.nodes or len(set(r.nodes)) != len(r.nodes) \
                or (r.mode == "bind" and len(r.nodes) != 1):
            bad(f"{at}: not a known mode ({', '.join(MODES)}) over distinct nodes (bind: one)")
        if any(x not in pos_of for x in r.nodes):
            bad(f"{at}: a node not in the run {sorted(pos_of)}")
        elif r.mode == "bind" and n > 1:
            part = pos_of[r.nodes[0]]
            for a in arrays[max(bisect_right(starts, r.start) - 1, 0):bisect_left(starts, r.stop)]:
                lo, hi = max(r.start, a.offset), min(r.stop, a.end)
                if lo >= hi:
                    continue
                g = groups.get((a.layer, a.proj, a.kind, a.shard))
                staged = a.stride
                ok = (g is not None and staged_i_dim(g) == 0 and big_i % n == 0 and (big_i // n) % g.i_unit == 0
                      and staged_rows(g) * g.i_unit == big_i and staged % n == 0)
                k0, k1 = (lo - a.offset) // staged, (hi - 1 - a.offset) // staged
                b = staged // n
                if not ok or k0 != k1 or not (part * b <= lo - a.offset - k0 * staged
                                              and hi - a.offset - k0 * staged <= (part + 1) * b):
                    bad(f"{at}: holds bytes of {a.proj} {a.kind} that part {part} (node {r.nodes[0]}) does not read")
                    break
        pos = max(pos, r.stop)
    if s.policy and pos != s.size:
        bad(f"{where}: policy ranges cover [0, {pos}), not the segment's {s.size} bytes")
