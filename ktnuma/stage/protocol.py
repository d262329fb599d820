"""The wire protocol between the coordinator and its workers: one JSON object per line over pipes.

Used by both sides; standard library only, and no typing import (the worker imports it at start-up).

coordinator -> worker (the worker's stdin):
  {"op": "init", "files": [path, ...], "shm_dir": str|null, "io": "buffered"|"direct"}
  {"op": "job", "layer": L, "node": n, "attempt": k,
   "create": {"name": seg, "size": bytes,             # create, mbind, fallocate this node's segment
              "policy": [[start, stop, "bind"|"interleave", [real node, ...]], ...] | null} | null,
   "segments": {"<node>": seg, ...},                  # the segments the ops write into (all exist)
   "ops": columns | null}                             # read ops (plan.ops), see pack_ops
  {"op": "commit", "names": [seg, ...]}               # these segments now belong to the coordinator
  {"op": "measure", "name": seg, "size": bytes}       # read back where a (filled) segment's pages are
  {"op": "exit"}
worker -> coordinator (its stdout):
  {"op": "ready", "pid": pid, "cpus": [...]}
  {"op": "progress", "layer", "node", "read": bytes}  # at least every PROGRESS_EVERY s while moving
  {"op": "done", "layer", "node", "name": seg|null, "size", "placement": {...}|null,
   "read": bytes read from source files, "written": {"<node>": bytes}, "seconds"}
  {"op": "error", "name", "layer", "node", "kind": one of ERROR_KINDS, "message"}
  {"op": "placed", "name": seg, "placement": {...}|null}  # the answer to "measure"

Jobs run one at a time, in the order they arrive, each answered by one "done" or "error"; the
coordinator sends a worker its next job while the current one runs (supervisor.QUEUED), so a job
line may wait in the pipe. "commit" and "measure" are handled as they arrive, even while a job
runs. A job that only creates a segment (other nodes fill it) reports no placement: mapping its
pages before the fills landed would zero-fill every one of them; the coordinator asks for it with
"measure" once the layer is complete.

A worker removes the segments it created and that were not committed when its stdin closes (the
coordinator died) or a job that created one fails.
"""
from __future__ import annotations

import errno
import json
from collections.abc import Iterable, Sequence

from ktnuma.errors import ParentGone, SourceTruncated  # noqa: F401 - the worker-side exceptions

PROGRESS_EVERY = 1.0  # seconds between a busy worker's progress messages
IO_STEP = 1 << 20  # bytes per read/sendfile call: progress is counted at least this often


# error kind -> what it means for the run (the coordinator turns it into the exception named here)
ERROR_KINDS: dict[str, str] = {
    "exists": "SegmentExists: the segment name already existed (never touched)",
    "nospace": "NotEnoughMemory: the shared-memory filesystem is full (exit 3)",
    "input": "SourceTruncated: a source file changed or is short (exit 2)",
    "os": "retried: any other failure of the job (then WorkerFailed, exit 4)",
}
_NOSPACE = (errno.ENOSPC, errno.ENOMEM, errno.EFBIG)


def error_kind(exc: BaseException) -> str:
    """The ERROR_KINDS entry of an exception raised inside a worker job."""
    if isinstance(exc, FileExistsError):
        return "exists"
    if isinstance(exc, SourceTruncated):
        return "input"
    if isinstance(exc, OSError) and exc.errno in _NOSPACE:
        return "nospace"
    return "os"


def encode(msg: dict) -> bytes:
    return json.dumps(msg, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> dict:
    msg = json.loads(line)
    if not isinstance(msg, dict):
        raise ValueError(f"not a message: {line[:80]!r}")
    return msg


def pack_ints(seq: Sequence[int]) -> list[int] | dict[str, int]:
    """Ints for the wire: ``{"a": first, "d": step, "n": count}`` when they are an arithmetic
    progression (checked at C level against a range), else the list as it is."""
    seq = tuple(seq)
    n = len(seq)
    if n >= 2:
        d = seq[1] - seq[0]
        if d == 0:
            if seq.count(seq[0]) == n:
                return {"a": seq[0], "d": 0, "n": n}
        elif seq == tuple(range(seq[0], seq[0] + d * n, d)):
            return {"a": seq[0], "d": d, "n": n}
    return list(seq)


def unpack_ints(v: list[int] | dict[str, int]) -> Sequence[int]:
    """The inverse of :func:`pack_ints`."""
    if isinstance(v, dict):
        a, d, n = v["a"], v["d"], v["n"]
        return [a] * n if d == 0 else range(a, a + d * n, d)
    return v


_OP_COLS = ("file", "offset", "length", "nwrites")
_W_COLS = ("node", "dest", "src", "rows", "run", "stride", "nbytes")  # nbytes: written (after conversion)


def pack_ops(ops: Iterable) -> dict:
    """ReadOps (plan.ops) as columns of packed ints; conversions as a list with nulls."""
    ops = list(ops)
    writes = [w for op in ops for w in op.writes]
    cols = {"file": [o.file for o in ops], "offset": [o.offset for o in ops],
            "length": [o.length for o in ops], "nwrites": [len(o.writes) for o in ops]}
    out: dict[str, object] = {k: pack_ints(v) for k, v in cols.items()}
    out["w"] = {k: pack_ints([getattr(w, k) for w in writes]) for k in _W_COLS}
    conv = [w.conversion for w in writes]
    out["w"]["conversion"] = conv if any(conv) else None
    return out


# a decoded op: (file, offset, length, ((node, dest, src, rows, run, stride, nbytes, conversion), ...))
Op = tuple[int, int, int, tuple[tuple, ...]]


def unpack_ops(cols: dict | None) -> list[Op]:
    if not cols:
        return []
    c = [unpack_ints(cols[k]) for k in _OP_COLS]
    w = [unpack_ints(cols["w"][k]) for k in _W_COLS]
    conv = cols["w"].get("conversion") or [None] * len(w[0])
    writes = list(zip(*w, conv))
    out, i = [], 0
    for f, off, length, n in zip(*c):
        out.append((f, off, length, tuple(writes[i:i + n])))
        i += n
    return out


def job(layer: int, node: int, attempt: int, create: tuple[str, int] | None,
        segments: dict[int, str], ops: Iterable | None, policy: list | None = None) -> bytes:
    """One job line: create this node's segment (``create`` = (name, size), placed by ``policy``:
    see :func:`wire_policy`; None: bound to the worker's node) and/or run read ops."""
    return encode({"op": "job", "layer": layer, "node": node, "attempt": attempt,
                   "create": None if create is None else {"name": create[0], "size": create[1], "policy": policy},
                   "segments": {str(n): s for n, s in segments.items()},
                   "ops": pack_ops(ops) if ops else None})


def wire_policy(ranges: Iterable, real_of: dict[int, int]) -> list | None:
    """A segment plan's PolicyRanges for the worker: topology nodes -> their real nodes (simulated
    nodes sharing a real node collapse into one); None for the default (no explicit ranges)."""
    out = [[r.start, r.stop, r.mode, sorted({real_of[n] for n in r.nodes})] for r in ranges]
    return out or None
