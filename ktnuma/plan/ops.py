"""Read ops: who reads which source bytes, and where each byte goes. A pure function of the plan.

Each source byte a layer needs is read from its file exactly once per run, at any node count: the
destination pieces of the layer's arrays are grouped into *regions* (pieces whose source spans
overlap: the N column cuts of a strided piece, the N copies of a replicated one); a region whose
bytes all go to one node is read by that node (contiguous: a `sendfile` copy); a region that feeds
several nodes is read once by one node, which writes each node's part into that node's segment
(any worker may write into a segment another created and bound: the pages are placed already).
Cross-node regions are dealt out in file order so every node reads about the same number of bytes.
Big regions are cut into ~CHUNK pieces (strided ones at row boundaries, ~GATHER_CHUNK when
buffered) so a worker's threads overlap them; adjacent small reads of one node are coalesced.

A ReadOp reads `length` bytes at `offset` of file `file`; each of its Writes takes `rows` runs of
`run` bytes, `stride` apart, starting `src` bytes into the read, converts them (`conversion`) and
writes them contiguously at byte `dest` of node `node`'s segment of the layer. A transposing
conversion (index.dtypes) stages its rows as columns: its write is always one whole piece, `rows`
being the piece's gathered rows (even where they are contiguous), and is never cut.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from ktnuma.index.dtypes import transposes
from ktnuma.plan.layout import ratio
from ktnuma.plan.records import ArrayPlan, Plan

CHUNK = 8 << 20  # bytes per read op, roughly (a worker thread's unit of work)
# bytes per buffered read op of strided rows (read, packed, pwritten): its buffers stay in the CPU's
# caches. scripts/gather_bench.py, 2 KiB rows, 8 nodes: 8 MiB ops took 1.80x the CPU of sendfile for
# the same bytes, 2 MiB ops 1.49x. O_DIRECT keeps CHUNK (no readahead: few large reads).
GATHER_CHUNK = 2 << 20


@dataclass(frozen=True, slots=True)
class Write:
    node: int
    dest: int
    src: int
    rows: int
    run: int
    stride: int
    conversion: str | None = None
    ratio: Fraction | int = 1

    @property
    def nbytes(self) -> int:
        """Bytes written into the segment (after conversion)."""
        return int(self.rows * self.run * self.ratio)

    @property
    def span(self) -> int:
        """Source bytes from the first byte taken to the last, relative to `src`."""
        return (self.rows - 1) * self.stride + self.run


@dataclass(frozen=True, slots=True)
class ReadOp:
    file: int
    offset: int
    length: int
    writes: tuple[Write, ...]

    @property
    def is_copy(self) -> bool:
        """One plain contiguous write of the whole read (sendfile-able)."""
        if len(self.writes) != 1:
            return False
        w = self.writes[0]
        return w.src == 0 and w.rows == 1 and w.run == self.length and w.conversion is None


def write_rows(a: ArrayPlan) -> tuple[int, int, int]:
    """(rows, run, stride) a write of one whole piece of `a` takes: a contiguous piece is one run
    (rows 1), except under a transposing conversion, which needs the rows it turns into columns (the
    staged piece's last dim)."""
    if transposes(a.conversion):
        rows = a.shape[-1]
        run = a.rows * a.run // rows
        return rows, run, (a.src_stride if a.rows > 1 else run)
    if a.rows == 1 or a.run == a.src_stride:
        return 1, a.rows * a.run, a.rows * a.run
    return a.rows, a.run, a.src_stride


def _pieces(plan: Plan, layer: int) -> list[tuple]:
    """(file, start, end, node, dest, rows, run, stride, conversion, ratio) per destination piece
    (rows, run, stride: `write_rows`)."""
    out = []
    for s in plan.layer_segments(layer):
        for a in s.arrays:
            r = ratio(a)
            rows, run, stride = write_rows(a)
            span = (rows - 1) * stride + run
            for k in range(a.count):
                src = a.src_offsets[k]
                out.append((a.files[k], src, src + span, s.node, a.offset + k * a.stride, rows, run, stride,
                            a.conversion, r))
    out.sort()
    return out


def _regions(pieces: list[tuple], gather: int = 0) -> list[list[tuple]]:
    """Pieces grouped where their source spans overlap; with `gather`, also where they touch, while
    the region stays within `gather` bytes (few large reads: what O_DIRECT needs)."""
    out: list[list[tuple]] = []
    start, end, file = -1, -1, -1
    for p in pieces:
        if out and p[0] == file and (p[1] < end or (p[1] == end and p[2] - start <= gather)):
            out[-1].append(p)
            end = max(end, p[2])
        else:
            out.append([p])
            file, start, end = p[0], p[1], p[2]
    return out


def _chunks(region: list[tuple], chunk: int, gather: int) -> list[ReadOp]:
    """One region as read ops of about `chunk` bytes each, `gather` for strided rows (whole if it
    cannot be cut evenly)."""
    file, start = region[0][0], region[0][1]
    rows, run, stride = region[0][5], region[0][6], region[0][7]
    single = len(region) == 1
    whole = any(transposes(p[8]) for p in region)  # a transposed piece is written whole: never cut
    if rows == 1 and not whole and (single or all(p[1] == start and p[5] == 1 and p[6] == run for p in region)):
        out = []  # contiguous runs from the same first byte (one piece, or replicated copies)
        for lo in range(0, run, chunk):
            n = min(chunk, run - lo)
            out.append(ReadOp(file, start + lo, n, tuple([Write(p[3], p[4] + int(lo * p[9]), 0, 1, n, n, p[8], p[9])
                                                           for p in region])))
        return out
    if rows > 1 and (single or all(p[5] == rows and p[7] == stride and p[1] - start < stride for p in region)):
        per = rows if whole else max(1, gather // stride)  # whole rows of a strided piece, cut between rows
        last = max(p[1] - start + p[6] for p in region)
        out = []
        for r0 in range(0, rows, per):
            r1 = min(rows, r0 + per)
            out.append(ReadOp(file, start + r0 * stride, (r1 - r0 - 1) * stride + last,
                              tuple(Write(p[3], p[4] + int(r0 * p[6] * p[9]), p[1] - start, r1 - r0, p[6], stride,
                                          p[8], p[9]) for p in region)))
        return out
    end = max(p[2] for p in region)
    return [ReadOp(file, start, end - start, tuple(Write(p[3], p[4], p[1] - start, p[5], p[6], p[7], p[8], p[9])
                                                   for p in region))]


def _merge(ops: list[ReadOp], chunk: int, gather: int) -> list[ReadOp]:
    """Coalesce file-adjacent reads of one node: copies that also continue in the segment, while
    the result stays within `chunk` bytes, or scatters, within `gather` bytes."""
    ops.sort(key=lambda o: (o.file, o.offset))
    out: list[ReadOp] = []
    for op in ops:
        prev = out[-1] if out else None
        if prev is None or prev.file != op.file or prev.offset + prev.length != op.offset \
                or prev.length + op.length > (chunk if op.is_copy else gather) or prev.is_copy != op.is_copy:
            out.append(op)
            continue
        n = prev.length + op.length
        if prev.is_copy:
            a, b = prev.writes[0], op.writes[0]
            if (a.node, a.dest + a.run) != (b.node, b.dest):
                out.append(op)
                continue
            out[-1] = ReadOp(op.file, prev.offset, n, (Write(a.node, a.dest, 0, 1, n, n),))
        else:
            shifted = tuple(Write(w.node, w.dest, w.src + prev.length, w.rows, w.run, w.stride, w.conversion,
                                  w.ratio) for w in op.writes)
            out[-1] = ReadOp(op.file, prev.offset, n, prev.writes + shifted)
    return out


def layer_ops(plan: Plan, layer: int, chunk: int = CHUNK, io: str = "buffered") -> dict[int, tuple[ReadOp, ...]]:
    """Per reading node (node id -> its ops, in file order) for one layer of `plan`. With io "direct"
    adjacent pieces are read together up to `chunk` bytes, whichever nodes they go to (O_DIRECT has
    no readahead: few large reads), instead of each node reading its own contiguous pieces."""
    gather = chunk if io == "direct" else min(chunk, GATHER_CHUNK)
    readers = [s.node for s in plan.layer_segments(layer)]
    load = dict.fromkeys(readers, 0)
    mine: dict[int, list[ReadOp]] = {n: [] for n in readers}
    shared: list[list[ReadOp]] = []
    for region in _regions(_pieces(plan, layer), chunk if io == "direct" else 0):
        ops = _chunks(region, chunk, gather)
        nodes = {p[3] for p in region}
        if len(nodes) == 1:
            node = nodes.pop()
            mine[node].extend(ops)
            load[node] += sum(o.length for o in ops)
        else:
            shared.append(ops)
    if shared:  # deal the cross-node regions out in file order, filling each node up to an even share
        target = (sum(load.values()) + sum(o.length for ops in shared for o in ops)) / len(readers)
        i = 0
        for ops in shared:
            while i < len(readers) - 1 and load[readers[i]] >= target:
                i += 1
            mine[readers[i]].extend(ops)
            load[readers[i]] += sum(o.length for o in ops)
    return {n: tuple(_merge(ops, chunk, gather)) for n, ops in mine.items() if ops}


def is_cross(ops: dict[int, tuple[ReadOp, ...]]) -> bool:
    """Whether some node writes into another node's segment (the layer's segments must then all
    exist before any of its reads start)."""
    return any(w.node != n for n, node_ops in ops.items() for op in node_ops for w in op.writes)
