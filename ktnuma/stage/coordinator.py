"""The coordinator: one pinned ``python -m ktnuma.worker`` subprocess per node, layer jobs over pipes.

All nodes work at once; at most ``layers_in_flight`` layers are staged concurrently (stage/schedule.py).
Each source byte is read once (plan/ops.py): a layer with cross-node writes first has every node
create its segment (ahead, within the window), then the readers fill them. Once every job of layer L is done, the segments are
committed (the workers no longer remove them) and the page cache of layer L's source ranges
(``plan.drop_ranges(L)``) is dropped, and once more (widened to 2 MiB folios) when the run closes
after its workers exited. A worker that dies (EOF on its stdout), or that makes no progress for
``stall_timeout`` seconds (then it is killed), is replaced on the same node and its job redone (a job
that created a segment: from scratch), up to ``retries`` times, then :class:`WorkerFailed` (exit 4)
names the node and layer (stage/supervisor.py). On any failure or signal (an exception raised in the
caller's thread, e.g. by a signal handler), every worker is stopped and every segment of the run is
unlinked.

Two ways in: :func:`stage` (stage everything, keep the segments, return a :class:`StageResult`),
and :class:`Run` (context manager; ``for done in run.layers(): ...; run.release_layer(L)``) for an
engine process that consumes layers as they complete (``ktnuma.stream``). Imports nothing heavy.
"""
from __future__ import annotations

import logging
import queue
import time
from dataclasses import replace
from collections.abc import Callable, Iterator
from typing import Any

from ktnuma.errors import BadInput, KtnumaError, WorkerFailed
from ktnuma.host import shm
from ktnuma.plan.records import Plan
from ktnuma.stage.pagecache import FOLIO_ALIGN, PageCache
from ktnuma.stage.procs import Workers, prespawn, worker_env  # noqa: F401 - the run's public helpers
from ktnuma.stage.protocol import pack_ints, unpack_ints  # noqa: F401 - one wire format, both sides
from ktnuma.stage.results import LayerDone, NodeSummary, ProgressEvent, SegmentResult, StageResult, summarize  # noqa: F401
from ktnuma.stage.schedule import Job, Schedule
from ktnuma.errors import SegmentExists  # noqa: F401 - raised by the run (supervisor)
from ktnuma.stage.supervisor import STALL_ENV, Supervisor  # noqa: F401
from ktnuma.stage.supervisor import stall_timeout as stall_timeout_of

log = logging.getLogger(__name__)


class Run:
    """A staging run over a Plan. Context manager; on exit without :meth:`keep` (or on an
    exception) every worker is stopped and every segment of the run unlinked."""

    def __init__(self, plan: Plan, topology, *, run_id: str, shm_dir: str | None = None,
                 layers_in_flight: int = 2, retries: int = 2,
                 progress: Callable[[ProgressEvent], None] | None = None,
                 stream: bool = False, drop_cache: bool = True, io: str = "buffered",
                 workers: Workers | None = None, stall_timeout: float | None = None) -> None:
        if layers_in_flight < 1:
            raise BadInput(f"layers_in_flight must be >= 1, got {layers_in_flight}")
        if retries < 0:
            raise BadInput(f"retries={retries}: must be >= 0")
        if io not in ("buffered", "direct"):
            raise BadInput(f"io must be buffered or direct, not {io!r}")
        self.plan = plan
        self.topology = topology
        self.run_id = run_id
        self.shm_dir = shm.resolve_dir(shm_dir)
        self.io = io
        self.progress = progress
        self.drop_cache = drop_cache
        self.events: queue.Queue = workers.events if workers is not None else queue.Queue()
        self.sched = Schedule(plan, layers_in_flight, stream, io)
        self.sup = Supervisor(self, self.sched, retries, stall_timeout_of(stall_timeout), self._job_done, self._emit)
        self._pre = workers
        self.done: dict[int, list[SegmentResult]] = {lyr: [] for lyr in plan.layers}
        self.completed: list[int] = []  # layers complete, in completion order
        self.written: dict[tuple[int, int], int] = {}
        self.made: dict[tuple[int, int], tuple[dict | None, float]] = {}  # (placement, seconds) per segment
        self.read_bytes = 0
        self.awaiting: dict[str, tuple[int, int]] = {}  # segment name -> (layer, node): "measure" sent
        self.bytes_total = sum(s.payload for s in plan.segments)
        self.node_bytes = {n.id: 0 for n in topology.nodes}
        self.node_seconds = {n.id: 0.0 for n in topology.nodes}
        self.cache = PageCache(plan.files)
        self.t0 = 0.0
        self.kept = False
        self.closed = False
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
        self.sup.adopt(self._pre)
        self.sup.dispatch()

    def keep(self) -> None:
        """Leave the segments in place when the run closes (they now belong to the caller)."""
        self.kept = True

    def name(self, layer: int, node: int) -> str:
        return shm.segment_name(self.run_id, layer, node)

    def segment_names(self) -> list[str]:
        return [self.name(s.layer, s.node) for s in self.plan.segments]

    @property
    def retries_used(self) -> int:
        return self.sup.retries_used

    def close(self, remove: bool = True) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.sup.stop_all()
        finally:  # even if a signal interrupts the stops: no segment stays
            if remove:
                self.remove_segments()
        if self.drop_cache:
            # a final pass once every worker has exited, widened to FOLIO_ALIGN: the page cache
            # keeps large folios, and DONTNEED only evicts folios wholly inside the range, so
            # the folios straddling a layer's range ends (up to 2 MiB each) survived its drop;
            # pages still under readahead at that moment go too
            for layer in self.completed:
                self.cache.drop(self.plan.drop_ranges(layer), widen=FOLIO_ALIGN)
        self.cache.close()

    def remove_segments(self) -> None:
        from ktnuma.stage.session import remove_run

        remove_run(self.run_id, self.shm_dir, names=self.sup.created | set(self.segment_names()),
                   protected=self.sup.foreign, entry=False)  # the registry entry is the session's

    # ------------------------------------------------------------------ events
    def _job_done(self, job: Job, msg: dict) -> None:
        seconds = float(msg["seconds"])
        if job.create is not None:
            self.made[(job.layer, job.node)] = (msg.get("placement"), seconds)
        else:
            placement, before = self.made.get((job.layer, job.node), (None, 0.0))
            self.made[(job.layer, job.node)] = (placement, before + seconds)
        for k, v in (msg.get("written") or {}).items():
            key = (job.layer, int(k))
            self.written[key] = self.written.get(key, 0) + int(v)
            self.node_bytes[job.node] += int(v)
        self.read_bytes += int(msg.get("read", 0))
        self.node_seconds[job.node] += seconds
        self._emit("segment", job.layer, job.node)
        if self.sched.done(job):
            self._layer_complete(job.layer)

    def _layer_complete(self, layer: int) -> None:
        segs = self.plan.layer_segments(layer)
        for s in segs:
            got = self.written.get((layer, s.node), 0)
            if got != s.payload:
                raise WorkerFailed(f"layer {layer} node {s.node}: {got} bytes written into segment "
                                   f"{self.name(layer, s.node)}, the plan stages {s.payload}")
            placement, seconds = self.made.get((layer, s.node), (None, 0.0))
            self.done[layer].append(SegmentResult(self.name(layer, s.node), layer, s.node, s.size, got, seconds,
                                                  placement, self.sup.attempts.get((layer, s.node), 0) + 1))
        # a segment created without its placement (others filled it): its owner reads it back now
        measure = {s.node: s.size for s in segs if self.made.get((layer, s.node), (None,))[0] is None}
        for n in self.sup.commit(layer, [s.node for s in segs], measure):
            self.awaiting[self.name(layer, n)] = (layer, n)
        if self.drop_cache:
            self.cache.drop(self.plan.drop_ranges(layer))
        self.completed.append(layer)
        self._emit("layer", layer, None)

    def placed(self, node: int, name: str | None, placement: dict | None) -> None:
        """A worker's answer to "measure" (name None: the worker is gone, its answers with it)."""
        if name is None:
            self.awaiting = {k: v for k, v in self.awaiting.items() if v[1] != node}
            return
        where = self.awaiting.pop(name, None)
        if where is None or where[1] != node:
            return  # not asked of this worker: ignored
        layer = where[0]
        self.done[layer] = [replace(r, placement=placement) if r.name == name else r for r in self.done[layer]]

    def _emit(self, kind: str, layer: int, node: int | None, message: str = "") -> None:
        if self.progress is None:
            return
        ev = ProgressEvent(kind, layer, node, len(self.completed), len(self.plan.layers),
                           sum(self.node_bytes.values()), self.bytes_total, dict(self.node_bytes),
                           dict(self.node_seconds), time.perf_counter() - self.t0, message)
        self.progress(ev)

    def step(self, timeout: float = 0.2) -> None:
        """Handle the events that arrived (waiting up to ``timeout``), check the deadlines, then
        dispatch more jobs."""
        try:
            item = self.events.get(timeout=timeout)
        except queue.Empty:
            item = None
        while item is not None:
            self.sup.handle(*item)
            try:
                item = self.events.get_nowait()
            except queue.Empty:
                item = None
        self.sup.check_deadlines()
        self.sup.dispatch()

    @property
    def finished(self) -> bool:
        return len(self.completed) == len(self.plan.layers)

    # ------------------------------------------------------------------ consumers
    def layers(self) -> Iterator[LayerDone]:
        """Yield each completed layer in plan order, as soon as it is complete.

        With ``stream=True`` the window advances only as layers are released
        (:meth:`release_layer`), so at most ``layers_in_flight`` layers exist at once.
        """
        if self.closed:
            raise KtnumaError("run is closed")
        order = self.plan.layers
        while self._yielded < len(order):
            layer = order[self._yielded]
            while not self.sched.complete(layer):
                self.step()
            self._yielded += 1
            yield LayerDone(layer, tuple(self.done[layer]))

    def release_layer(self, layer: int) -> None:
        """Unlink a completed layer's segments now (streaming hand-off)."""
        for s in self.plan.layer_segments(layer):
            shm.unlink(self.name(s.layer, s.node), self.shm_dir)
        self.sched.released.add(layer)
        if not self.closed:
            self.sup.dispatch()

    def wait(self) -> StageResult:
        """Run to completion; returns the result (segments stay until close/keep decides)."""
        while not self.finished or self.awaiting:
            self.step()
        return self.result()

    def result(self) -> StageResult:
        segs = tuple(r for lyr in self.plan.layers for r in self.done[lyr])
        return StageResult(self.run_id, self.plan, segs, time.perf_counter() - self.t0, self.retries_used,
                           summarize(self.topology, segs, self.node_seconds), self.read_bytes)


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
