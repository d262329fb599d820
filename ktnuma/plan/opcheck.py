"""The read ops of a plan checked against its arrays (part of validate): every source byte a layer
needs read exactly once, every destination byte written exactly once, each write taking exactly the
bytes its array's record names."""
from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable

from ktnuma.index.dtypes import transposes
from ktnuma.plan.layout import ratio
from ktnuma.plan.ops import ReadOp, Write, layer_ops
from ktnuma.plan.records import ArrayPlan, Plan


def needed_bytes(plan: Plan, layer: int) -> int:
    """Distinct source bytes the layer's arrays take, counting the gaps between a strided piece's rows."""
    spans: dict[int, list[tuple[int, int]]] = {}
    for s in plan.layer_segments(layer):
        for a in s.arrays:
            span = a.rows * a.run if a.rows == 1 or a.run == a.src_stride else (a.rows - 1) * a.src_stride + a.run
            for f, o in zip(a.files, a.src_offsets):
                spans.setdefault(f, []).append((o, o + span))
    total = 0
    for ivs in spans.values():
        ivs.sort()
        cur_s, cur_e = ivs[0]
        for s0, e0 in ivs[1:]:
            if s0 > cur_e:
                total += cur_e - cur_s
                cur_s, cur_e = s0, e0
            else:
                cur_e = max(cur_e, e0)
        total += cur_e - cur_s
    return total


def _locate(segs, starts, node: int, dest: int) -> tuple[ArrayPlan, int, int] | None:
    """(array, piece k, bytes into the piece) of byte `dest` of node's segment; None outside its arrays."""
    s = segs.get(node)
    i = bisect_right(starts.get(node, ()), dest) - 1
    if s is None or i < 0 or not s.arrays[i].offset <= dest < s.arrays[i].end:
        return None
    a = s.arrays[i]
    k = (dest - a.offset) // a.stride
    return a, k, dest - a.offset - k * a.stride


def _transposed_ok(segs, starts, op: ReadOp, w: Write) -> bool:
    """A transposing write: exactly one whole piece, taken as the rows the staged piece has as columns."""
    at = _locate(segs, starts, w.node, w.dest)
    if at is None:
        return False
    a, k, within = at
    if a.rows > 1:
        takes = (w.rows, w.run, w.stride) == (a.rows, a.run, a.src_stride)
    else:
        takes = w.run == w.stride and w.rows * w.run == a.run
    return takes and within == 0 and w.rows == a.shape[-1] and w.nbytes == a.stride \
        and (w.conversion, w.ratio, op.file, op.offset + w.src) == (a.conversion, ratio(a), a.files[k], a.src_offsets[k])


def _write_ok(segs, starts, op: ReadOp, w: Write) -> bool:
    """Whether w takes exactly the bytes the records name for the destination bytes it writes."""
    if transposes(w.conversion):
        return _transposed_ok(segs, starts, op, w)
    if w.rows == 1 or w.run == w.stride:  # contiguous: may run over consecutive pieces (coalesced)
        pos, src, left = w.dest, op.offset + w.src, w.rows * w.run
        while left > 0:
            at = _locate(segs, starts, w.node, pos)
            if at is None:
                return False
            a, k, within = at
            contiguous = a.rows == 1 or a.run == a.src_stride
            if not contiguous or (w.conversion, w.ratio) != (a.conversion, ratio(a)) or within % w.ratio \
                    or (op.file, src) != (a.files[k], a.src_offsets[k] + within // w.ratio):
                return False
            take = min(left, (a.stride - within) // w.ratio)
            pos, src, left = pos + take * w.ratio, src + take, left - take
        return True
    at = _locate(segs, starts, w.node, w.dest)
    if at is None:
        return False
    a, k, within = at
    src = op.offset + w.src - a.src_offsets[k]
    if (w.conversion, w.ratio, w.run, w.stride, op.file) != (a.conversion, ratio(a), a.run, a.src_stride, a.files[k]) \
            or a.rows == 1 or src < 0 or src % a.src_stride:
        return False
    r0 = src // a.src_stride
    return within == r0 * a.run * w.ratio and r0 + w.rows <= a.rows


def check_ops(plan: Plan, bad: Callable[[str], None], io: str = "buffered") -> None:
    for layer in plan.layers:
        segs = {s.node: s for s in plan.layer_segments(layer)}
        starts = {n: [a.offset for a in s.arrays] for n, s in segs.items()}
        ops = layer_ops(plan, layer, io=io)
        reads: dict[int, list[tuple[int, int, int]]] = {}
        dests: dict[int, list[tuple[int, int]]] = {n: [] for n in segs}
        total = 0
        for reader, node_ops in ops.items():
            if reader not in segs:
                bad(f"layer {layer}: node {reader} reads but holds no segment")
            for op in node_ops:
                at = f"layer {layer} node {reader}: read {op.file}:[{op.offset}, {op.offset + op.length})"
                reads.setdefault(op.file, []).append((op.offset, op.offset + op.length, reader))
                total += op.length
                if not op.writes or min(w.src for w in op.writes) != 0 \
                        or max(w.src + w.span for w in op.writes) != op.length:
                    bad(f"{at}: reads bytes no write takes")
                for w in op.writes:
                    if not _write_ok(segs, starts, op, w):
                        bad(f"{at}: write {w} is not the bytes node {w.node}'s records name at {w.dest}")
                        continue
                    dests[w.node].append((w.dest, w.dest + w.nbytes))
        for f, ivs in reads.items():
            ivs.sort()
            for (s0, e0, n0), (s1, _, n1) in zip(ivs, ivs[1:]):
                if s1 < e0:
                    bad(f"layer {layer}: file {f} bytes [{s1}, {e0}) read twice (nodes {n0}, {n1})")
        if total != needed_bytes(plan, layer):
            bad(f"layer {layer}: {total} bytes read, the arrays take {needed_bytes(plan, layer)} distinct bytes")
        for n, ivs in dests.items():
            ivs.sort()
            for (s0, e0), (s1, _) in zip(ivs, ivs[1:]):
                if s1 < e0:
                    bad(f"layer {layer}: node {n}'s segment bytes [{s1}, {e0}) written twice")
            written = sum(e - s for s, e in ivs)
            if written != segs[n].payload:
                bad(f"layer {layer}: {written} bytes written into node {n}'s segment, it holds {segs[n].payload}")
