"""The coordinator: one pinned ``python -m ktnuma.worker`` subprocess per node, layer jobs over pipes.

All nodes work at once; at most ``layers_in_flight`` layers are staged concurrently (a fast node
runs ahead by at most that many layers). Once every node has finished layer L, the page cache of
layer L's whole source ranges (``plan.drop_ranges(L)``) is dropped with ``posix_fadvise(DONTNEED)``,
and once more (widened to 2 MiB folio boundaries) when the run closes after its workers exited.
A worker that dies (EOF on its stdout) is restarted on the same node and the layer's segment is
discarded and redone from scratch, up to ``retries`` times, then :class:`WorkerFailed` (exit 4)
names the node and layer. On any failure or signal (an exception raised in the caller's thread,
e.g. by a signal handler), every worker is stopped and every segment of the run is unlinked.

Two ways in: :func:`stage` (stage everything, keep the segments, return a :class:`StageResult`),
and :class:`Run` (context manager; ``for done in run.layers(): ...; run.release_layer(L)``) for an
engine process that consumes layers as they complete (``ktnuma.stream``).
Imports nothing heavy.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any

from ktnuma.host import shm
from ktnuma.errors import BadInput, KtnumaError, NotEnoughMemory, SegmentExists, WorkerFailed
from ktnuma.plan.planner import ArrayPlan, Plan, SegmentPlan

log = logging.getLogger(__name__)


FOLIO_ALIGN = 2 << 20  # the largest page-cache folio the final drop pass expects (PMD size)
_PKG_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the dir holding ktnuma/


def worker_env() -> dict[str, str]:
    """The workers' environment: started with ``python -S`` (no site hooks, .pth files or
    editable-install finders to run: a faster start), so PYTHONPATH carries this package's parent
    and this interpreter's own import path (the standard library, site-packages for numpy)."""
    env = dict(os.environ)
    path = [_PKG_PARENT] + [p for p in sys.path if p and os.path.isdir(p)]
    if env.get("PYTHONPATH"):
        path.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(path))
    return env


@dataclass(frozen=True)
class SegmentResult:
    name: str
    layer: int
    node: int
    size: int
    bytes: int  # payload bytes written
    seconds: float
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

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.segments)

    def by_name(self) -> dict[str, SegmentResult]:
        return {s.name: s for s in self.segments}


def _real_node(topology, node_id: int) -> int:
    for n in topology.nodes:
        if n.id == node_id:
            return n.real_node
    raise KeyError(node_id)


def summarize(topology, segments: tuple[SegmentResult, ...]) -> tuple[NodeSummary, ...]:
    """Per-node bytes, busy seconds and pages on the backing real node."""
    out = []
    for n in topology.nodes:
        segs = [s for s in segments if s.node == n.id]
        pages = on = 0
        for s in segs:
            if s.placement:
                pages += sum(s.placement.values())
                on += s.placement.get(str(n.real_node), 0)
        out.append(NodeSummary(n.id, n.real_node, sum(s.bytes for s in segs),
                               sum(s.seconds for s in segs), pages, on))
    return tuple(out)


_ARRAY_FIELDS = tuple(f.name for f in fields(ArrayPlan))


def pack_ints(seq: tuple[int, ...]) -> list[int] | dict[str, int]:
    """A per-piece int tuple for the wire: ``{"a": first, "d": step, "n": count}`` when it is an
    arithmetic progression (checked at C level against a range), else the list as it is."""
    n = len(seq)
    if n >= 2:
        d = seq[1] - seq[0]
        if d == 0:
            if seq.count(seq[0]) == n:
                return {"a": seq[0], "d": 0, "n": n}
        elif seq == tuple(range(seq[0], seq[0] + d * n, d)):
            return {"a": seq[0], "d": d, "n": n}
    return list(seq)


def job_message(seg: SegmentPlan, name: str, attempt: int) -> bytes:
    """One JSON line; ArrayPlans shallowly as dicts (no deep copy), their per-piece ``files`` and
    ``src_offsets`` packed with :func:`pack_ints` (the worker's ``unpack_ints`` reverses it)."""
    arrays = []
    for a in seg.arrays:
        d = {f: getattr(a, f) for f in _ARRAY_FIELDS}
        d["files"] = pack_ints(a.files)
        d["src_offsets"] = pack_ints(a.src_offsets)
        arrays.append(d)
    msg = {"op": "job", "name": name, "layer": seg.layer, "node": seg.node, "size": seg.size,
           "attempt": attempt, "arrays": arrays}
    return json.dumps(msg, separators=(",", ":")).encode() + b"\n"


class _Proc:
    """One worker subprocess and the thread that forwards its stdout lines to the event queue."""

    def __init__(self, node, gen: int, events: queue.Queue, files: list[str] | None, shm_dir: str | None,
                 io: str = "buffered", env: dict[str, str] | None = None):
        self.node = node
        self.gen = gen
        cmd = [sys.executable, "-S", "-m", "ktnuma.worker", "--node", str(node.id),
               "--real-node", str(node.real_node), "--cpus", ",".join(map(str, node.cpus))]
        env = env or worker_env()
        # own process group: a terminal's Ctrl-C reaches the coordinator only (workers follow the pipe)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, process_group=0,
                                     close_fds=True, env=env)
        self.job: tuple[SegmentPlan, str, int] | None = None  # (segment, name, attempt)
        self.events = events
        self.thread = threading.Thread(target=self._read, name=f"worker-n{node.id}", daemon=True)
        self.thread.start()
        if files is not None:
            self.init(files, shm_dir, io)

    def init(self, files: list[str], shm_dir: str | None, io: str = "buffered") -> None:
        self.send({"op": "init", "files": files, "shm_dir": shm_dir, "io": io})

    def _read(self) -> None:
        try:
            for line in self.proc.stdout:
                try:
                    self.events.put((self.node.id, self.gen, json.loads(line)))
                except ValueError:
                    log.warning("worker n%d: unreadable line %r", self.node.id, line[:200])
        except (OSError, ValueError):
            pass
        self.events.put((self.node.id, self.gen, None))

    def send(self, msg: dict | bytes) -> bool:
        data = msg if isinstance(msg, bytes) else json.dumps(msg).encode() + b"\n"
        try:
            self.proc.stdin.write(data)
            self.proc.stdin.flush()
            return True
        except (BrokenPipeError, OSError, ValueError):
            return False

    def close_stdin(self) -> None:
        try:
            self.proc.stdin.close()
        except (BrokenPipeError, OSError, ValueError):
            pass

    def stop(self, timeout: float = 5.0) -> None:
        self.close_stdin()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout:
            try:
                self.proc.stdout.close()
            except OSError:
                pass


@dataclass
class Workers:
    """Workers started before the plan exists: their interpreters start while the caller indexes and
    plans. A Run adopts them (`Run(..., workers=...)`); unadopted ones exit when stopped or when this
    process's end closes their stdin."""

    events: queue.Queue
    procs: dict[int, _Proc]

    def stop(self) -> None:
        for p in self.procs.values():
            p.stop(2.0)
        self.procs.clear()


def prespawn(topology) -> Workers:
    events: queue.Queue = queue.Queue()
    env = worker_env()
    return Workers(events, {n.id: _Proc(n, 1, events, None, None, env=env) for n in topology.nodes})


class Run:
    """A staging run over a Plan. Context manager; on exit without :meth:`keep` (or on an
    exception) every worker is stopped and every segment of the run unlinked."""

    def __init__(self, plan: Plan, topology, *, run_id: str, shm_dir: str | None = None,
                 layers_in_flight: int = 2, retries: int = 2,
                 progress: Callable[[ProgressEvent], None] | None = None,
                 stream: bool = False, drop_cache: bool = True, io: str = "buffered",
                 workers: Workers | None = None) -> None:
        if layers_in_flight < 1:
            raise BadInput(f"layers_in_flight must be >= 1, got {layers_in_flight}")
        if retries < 0:
            raise BadInput(f"retries={retries}: must be >= 0")
        self.plan = plan
        self.topology = topology
        self.run_id = run_id
        self.shm_dir = shm.resolve_dir(shm_dir)
        self.layers_in_flight = layers_in_flight
        self.retries = retries
        self.progress = progress
        self.stream = stream
        self.drop_cache = drop_cache
        if io not in ("buffered", "direct"):
            raise BadInput(f"io must be buffered or direct, not {io!r}")
        self.io = io
        self._env = worker_env()
        self.layers_order = list(plan.layers)
        self.layer_pos = {lyr: i for i, lyr in enumerate(self.layers_order)}
        self.pending: dict[int, list[SegmentPlan]] = {n.id: [] for n in topology.nodes}
        for s in plan.segments:
            self.pending[s.node].append(s)
        self.remaining = {lyr: len(plan.layer_segments(lyr)) for lyr in self.layers_order}
        self.done: dict[int, list[SegmentResult]] = {lyr: [] for lyr in self.layers_order}
        self.completed: list[int] = []  # layers complete, in completion order (== plan order here)
        self.released: set[int] = set()
        self.attempts: dict[tuple[int, int], int] = {}
        self.created: set[str] = set()  # every segment name a job was sent for
        self.foreign: set[str] = set()  # names that existed before we tried to create them
        self.procs: dict[int, _Proc] = {}
        self._pre = workers
        self.gen = 1 if workers is not None else 0
        self.events: queue.Queue = workers.events if workers is not None else queue.Queue()
        self.t0 = 0.0
        self.kept = False
        self.closed = False
        self.retries_used = 0
        self.bytes_total = sum(s.payload for s in plan.segments)
        self.node_bytes = {n.id: 0 for n in topology.nodes}
        self.node_seconds = {n.id: 0.0 for n in topology.nodes}
        self._drop_fds: dict[int, int] = {}
        self._yielded = 0

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> Run:
        try:
            self.start()
        except BaseException:  # __exit__ will not run: stop the workers and remove what they made
            self.close(remove=True)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(remove=exc_type is not None or not self.kept)

    def start(self) -> None:
        self.t0 = time.perf_counter()
        for n in self.topology.nodes:
            pre = self._pre.procs.pop(n.id, None) if self._pre is not None else None
            if not self.pending[n.id]:
                if pre is not None:
                    pre.stop(2.0)  # a node with nothing to stage (ep, more nodes than experts)
            elif pre is not None:
                pre.init(list(self.plan.files), self.shm_dir, self.io)
                self.procs[n.id] = pre
            else:
                self._spawn(n)
        if self._pre is not None:
            self._pre.stop()  # workers for nodes this topology does not have
        self._dispatch()

    def keep(self) -> None:
        """Leave the segments in place when the run closes (they now belong to the caller)."""
        self.kept = True

    def segment_names(self) -> list[str]:
        return [self.name(s) for s in self.plan.segments]

    def name(self, seg: SegmentPlan) -> str:
        return shm.segment_name(self.run_id, seg.layer, seg.node)

    def close(self, remove: bool = True) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            for p in list(self.procs.values()):
                p.close_stdin()
            for p in list(self.procs.values()):
                p.stop()
        finally:  # even if a signal interrupts the stops: no worker outlives the run, no segment stays
            for p in list(self.procs.values()):
                if p.proc.poll() is None:
                    p.proc.kill()
                    p.proc.wait()
            self.procs.clear()
            if remove:
                self.remove_segments()
        if self.drop_cache and self.completed:
            # a final pass once every worker has exited, widened to FOLIO_ALIGN: the page cache
            # keeps large folios, and DONTNEED only evicts folios wholly inside the range, so
            # the folios straddling a layer's range ends (up to 2 MiB each) survived its drop;
            # pages still under readahead at that moment go too
            for layer in self.completed:
                self._drop(layer, widen=FOLIO_ALIGN)
        for fd in self._drop_fds.values():
            os.close(fd)
        self._drop_fds.clear()

    def remove_segments(self) -> None:
        from ktnuma.stage.session import remove_run

        remove_run(self.run_id, self.shm_dir, names=self.created | set(self.segment_names()),
                   protected=self.foreign, entry=False)  # the registry entry is the session's

    # ------------------------------------------------------------------ workers
    def _spawn(self, node) -> _Proc:
        self.gen += 1
        p = _Proc(node, self.gen, self.events, list(self.plan.files), self.shm_dir, self.io, self._env)
        self.procs[node.id] = p
        return p

    def _window_ok(self, layer: int) -> bool:
        if self.stream:
            base = next((i for i, lyr in enumerate(self.layers_order) if lyr not in self.released),
                        len(self.layers_order))
        else:
            base = next((i for i, lyr in enumerate(self.layers_order) if self.remaining[lyr]),
                        len(self.layers_order))
        return self.layer_pos[layer] < base + self.layers_in_flight

    def _dispatch(self) -> None:
        for nid, p in list(self.procs.items()):
            if p.job is not None:
                continue
            todo = self.pending[nid]
            if not todo:
                p.close_stdin()  # nothing left for this node: let it exit
                continue
            seg = todo[0]
            if not self._window_ok(seg.layer):
                continue
            todo.pop(0)
            self._send_job(p, seg)

    def _send_job(self, p: _Proc, seg: SegmentPlan) -> None:
        name = self.name(seg)
        attempt = self.attempts.get((seg.layer, seg.node), 0)
        p.job = (seg, name, attempt)
        self.created.add(name)
        p.send(job_message(seg, name, attempt))  # a broken pipe shows up as EOF on its stdout

    def _retry(self, p: _Proc, why: str) -> None:
        """The current job of ``p`` failed (death or error): discard it and redo it, or give up."""
        seg, name, attempt = p.job
        shm.unlink(name, self.shm_dir)
        key = (seg.layer, seg.node)
        self.attempts[key] = attempt + 1
        if attempt + 1 > self.retries:
            raise WorkerFailed(f"worker for node {seg.node} failed staging layer {seg.layer} "
                               f"({why}); gave up after {self.retries} retries")
        self.retries_used += 1
        log.warning("worker for node %d failed staging layer %d (%s); retry %d of %d",
                    seg.node, seg.layer, why, attempt + 1, self.retries)
        self._emit("retry", seg.layer, seg.node, f"{why}; retry {attempt + 1}/{self.retries}")
        p.job = None
        self.pending[seg.node].insert(0, seg)

    # ------------------------------------------------------------------ event loop
    def _handle(self, nid: int, gen: int, msg: dict | None) -> None:
        p = self.procs.get(nid)
        if p is None or p.gen != gen:
            return  # a stale event of a replaced worker
        if msg is None:  # the worker is gone
            try:
                rc = p.proc.wait(10)
            except subprocess.TimeoutExpired:
                p.proc.kill()
                rc = p.proc.wait()
            if p.job is None and not self.pending[nid]:
                del self.procs[nid]  # finished its work and exited
                return
            why = f"worker exited with code {rc}" if rc >= 0 else f"worker killed by signal {-rc}"
            if p.job is not None:
                self._retry(p, why)
            p.stop(0.1)
            self._spawn(p.node)
            return
        op = msg.get("op")
        if op == "ready":
            return
        if op == "error":
            kind, text = msg.get("kind"), msg.get("message", "")
            if kind == "exists" and p.job is not None:
                name = p.job[1]
                self.created.discard(name)
                self.foreign.add(name)
                p.job = None
                raise SegmentExists(f"segment {name} already exists (not created by this run); refusing to "
                                    "attach to, resize or remove it", self.foreign)
            if kind == "nospace":
                where = shm.norm_dir(self.shm_dir)
                raise NotEnoughMemory(f"{text}: the shared-memory filesystem {where} is full; enlarge it "
                                      f"(mount -o remount,size=NG {where}) or use shm_dir=DIR on a larger tmpfs")
            if kind == "input":
                raise BadInput(text)
            if p.job is None:
                raise WorkerFailed(f"worker for node {nid} failed: {text}")
            self._retry(p, text)
            return
        if op == "done":
            seg, name, attempt = p.job
            if msg.get("name") != name:
                raise WorkerFailed(f"worker for node {nid} answered for {msg.get('name')}, "
                                   f"expected {name}")
            p.job = None
            res = SegmentResult(name, seg.layer, seg.node, seg.size, int(msg["bytes"]),
                                float(msg["seconds"]), msg.get("placement"), attempt + 1)
            self.done[seg.layer].append(res)
            self.remaining[seg.layer] -= 1
            self.node_bytes[seg.node] += res.bytes
            self.node_seconds[seg.node] += res.seconds
            self._emit("segment", seg.layer, seg.node)
            if self.remaining[seg.layer] == 0:
                self._layer_complete(seg.layer)
            return
        log.warning("worker n%d: unknown message %r", nid, op)

    def _layer_complete(self, layer: int) -> None:
        if self.drop_cache:
            self._drop(layer)
        order = {nid: i for i, nid in enumerate(self.plan.nodes)}
        self.done[layer].sort(key=lambda r: order.get(r.node, 0))
        self.completed.append(layer)
        self._emit("layer", layer, None)

    def _drop(self, layer: int, widen: int = 0) -> None:
        for r in self.plan.drop_ranges(layer):
            start, length = r.start, r.length
            if widen:
                start = r.start - r.start % widen
                length = -(-(r.start + r.length) // widen) * widen - start
            fd = self._drop_fds.get(r.file)
            if fd is None:
                try:
                    fd = self._drop_fds[r.file] = os.open(self.plan.files[r.file],
                                                          os.O_RDONLY | os.O_CLOEXEC)
                except OSError as exc:
                    log.warning("cannot open %s to drop its page cache: %s", self.plan.files[r.file], exc)
                    continue
            try:
                os.posix_fadvise(fd, start, length, os.POSIX_FADV_DONTNEED)
            except OSError as exc:  # pragma: no cover - advisory
                log.debug("posix_fadvise(%s): %s", self.plan.files[r.file], exc)

    def _emit(self, kind: str, layer: int, node: int | None, message: str = "") -> None:
        if self.progress is None:
            return
        ev = ProgressEvent(kind, layer, node, len(self.completed), len(self.layers_order),
                           sum(self.node_bytes.values()), self.bytes_total, dict(self.node_bytes),
                           dict(self.node_seconds), time.perf_counter() - self.t0, message)
        self.progress(ev)

    def step(self, timeout: float = 0.2) -> None:
        """Handle the events that arrived (waiting up to ``timeout``), then dispatch more jobs."""
        try:
            item = self.events.get(timeout=timeout)
        except queue.Empty:
            item = None
        while item is not None:
            self._handle(*item)
            try:
                item = self.events.get_nowait()
            except queue.Empty:
                item = None
        self._dispatch()

    @property
    def finished(self) -> bool:
        return len(self.completed) == len(self.layers_order)

    # ------------------------------------------------------------------ consumers
    def layers(self) -> Iterator[LayerDone]:
        """Yield each completed layer in plan order, as soon as it is complete.

        With ``stream=True`` the window advances only as layers are released
        (:meth:`release_layer`), so at most ``layers_in_flight`` layers exist at once.
        """
        if self.closed:
            raise KtnumaError("run is closed")
        while self._yielded < len(self.layers_order):
            layer = self.layers_order[self._yielded]
            while self.remaining[layer]:
                self.step()
            self._yielded += 1
            yield LayerDone(layer, tuple(self.done[layer]))

    def release_layer(self, layer: int) -> None:
        """Unlink a completed layer's segments now (streaming hand-off)."""
        for s in self.plan.layer_segments(layer):
            shm.unlink(self.name(s), self.shm_dir)
        self.released.add(layer)
        if not self.closed:
            self._dispatch()

    def wait(self) -> StageResult:
        """Run to completion; returns the result (segments stay until close/keep decides)."""
        while not self.finished:
            self.step()
        return self.result()

    def result(self) -> StageResult:
        segs = tuple(r for lyr in self.layers_order for r in self.done[lyr])
        return StageResult(self.run_id, self.plan, segs, time.perf_counter() - self.t0,
                           self.retries_used, summarize(self.topology, segs))


def stage(index, topology, split: str, *, run_id: str, shm_dir: str | None = None,
          layers_in_flight: int = 2, retries: int = 2,
          progress: Callable[[ProgressEvent], None] | None = None, plan: Plan | None = None,
          **kw: Any) -> StageResult:
    """Stage every segment of the plan; keep them and return the result. On any exception
    (including one raised by a signal handler) the run's segments are all unlinked."""
    if plan is None:
        from ktnuma.plan.planner import plan as make_plan

        plan = make_plan(index, topology, split)
    with Run(plan, topology, run_id=run_id, shm_dir=shm_dir, layers_in_flight=layers_in_flight,
             retries=retries, progress=progress, **kw) as run:
        result = run.wait()
        run.keep()
    return result
