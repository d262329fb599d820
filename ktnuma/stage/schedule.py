"""Which job each node's worker runs next (pure bookkeeping, no processes).

Per layer the jobs come from the plan's read ops (plan.ops.layer_ops, computed when the layer is
first reached). A layer whose reads all land in the reader's own segment gets one job per node:
create the segment and fill it. A layer with cross-node writes gets, per node, a *create* job, and
per reading node a *fill* job that may start only once every segment of the layer exists (the
barrier). At most ``layers_in_flight`` layers are in progress: counted from the first incomplete
layer, or, when streaming, from the first layer the consumer has not released.

Within that window a node creates its segments ahead: a create-only job of any layer in the window
goes before the node's next fill, so by the time the nodes reach a layer's fills its segments exist
and the barrier rarely waits. A node's fills (and create+fill jobs) still run in layer order.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from ktnuma.plan.ops import ReadOp, is_cross, layer_ops
from ktnuma.plan.records import Plan, SegmentPlan


@dataclass(frozen=True)
class Job:
    layer: int
    node: int
    create: SegmentPlan | None  # this node's segment to create first (None: fill only)
    ops: tuple[ReadOp, ...]

    @property
    def targets(self) -> tuple[int, ...]:
        """Nodes whose segments the ops write into."""
        return tuple(sorted({w.node for op in self.ops for w in op.writes}))


class Schedule:
    def __init__(self, plan: Plan, layers_in_flight: int, stream: bool, io: str = "buffered") -> None:
        self.plan = plan
        self.io = io
        self.order = list(plan.layers)
        self.pos = {lyr: i for i, lyr in enumerate(self.order)}
        self.layers_in_flight = layers_in_flight
        self.stream = stream
        self.segs: dict[int, dict[int, SegmentPlan]] = {lyr: {} for lyr in self.order}
        self.todo: dict[int, list[int]] = {n: [] for n in plan.nodes}  # layers with jobs left, in order
        self.mine: dict[int, list[int]] = {n: [] for n in plan.nodes}  # layers a node has a segment of
        for s in plan.segments:
            self.segs[s.layer][s.node] = s
            self.todo[s.node].append(s.layer)
            self.mine[s.node].append(s.layer)
        self.jobs: dict[int, dict[int, deque[Job]]] = {}  # layer -> node -> jobs (once expanded)
        self.left: dict[int, int | None] = dict.fromkeys(self.order)  # jobs outstanding per layer
        self.created: dict[int, int] = dict.fromkeys(self.order, 0)
        self.released: set[int] = set()

    # ------------------------------------------------------------------ layers
    def _expand(self, layer: int) -> dict[int, deque[Job]]:
        jobs = self.jobs.get(layer)
        if jobs is not None:
            return jobs
        segs = self.segs[layer]
        ops = layer_ops(self.plan, layer, io=self.io)
        jobs = self.jobs[layer] = {n: deque() for n in segs}
        if is_cross(ops):
            for n, s in segs.items():
                jobs[n].append(Job(layer, n, s, ()))
            for n, o in ops.items():
                jobs[n].append(Job(layer, n, None, o))
        else:
            for n, s in segs.items():
                jobs[n].append(Job(layer, n, s, ops.get(n, ())))
        self.left[layer] = sum(len(q) for q in jobs.values())
        return jobs

    def complete(self, layer: int) -> bool:
        return self.left[layer] == 0

    @property
    def finished(self) -> bool:
        return all(v == 0 for v in self.left.values())

    def window_end(self) -> int:
        """Position (in plan order) of the first layer past the window."""
        done = self.released if self.stream else {lyr for lyr in self.order if self.complete(lyr)}
        base = next((i for i, lyr in enumerate(self.order) if lyr not in done), len(self.order))
        return base + self.layers_in_flight

    def window_ok(self, layer: int) -> bool:
        return self.pos[layer] < self.window_end()

    # ------------------------------------------------------------------ per node
    def has_work(self, node: int) -> bool:
        return bool(self.todo.get(node))

    def pending(self, node: int, layer: int) -> bool:
        """Whether node still has jobs of `layer` to run."""
        return layer in self.todo.get(node, ())

    def settled(self, node: int) -> bool:
        """No jobs left for node and every layer it has a segment of complete (all committed)."""
        return not self.todo.get(node) and all(self.complete(lyr) for lyr in self.mine.get(node, ()))

    def next_job(self, node: int) -> Job | None:
        """The node's next job if one may start now (window, barrier); taken off its queue: a
        create-only job of a layer in the window first, else the job at the front of its earliest
        layer (a fill only once every segment of that layer exists)."""
        todo = self.todo.get(node)
        end = self.window_end()
        if not todo or self.pos[todo[0]] >= end:
            return None
        for layer in todo:
            if self.pos[layer] >= end:
                break
            q = self._expand(layer)[node]
            if q[0].create is not None and not q[0].ops:
                return self._take(node, layer)
        layer = todo[0]
        job = self.jobs[layer][node][0]
        if job.create is None and self.created[layer] < len(self.segs[layer]):
            return None  # cross-node writes wait until every segment of the layer exists
        return self._take(node, layer)

    def _take(self, node: int, layer: int) -> Job:
        q = self.jobs[layer][node]
        job = q.popleft()
        if not q:
            self.todo[node].remove(layer)
        return job

    def retry(self, job: Job) -> None:
        """Put a failed job back at the front of its node's queue."""
        q = self.jobs[job.layer][job.node]
        if not q:
            todo = self.todo[job.node]
            todo.append(job.layer)
            todo.sort(key=self.pos.__getitem__)
        q.appendleft(job)

    def done(self, job: Job) -> bool:
        """Account a finished job; True when its layer is now complete."""
        if job.create is not None:
            self.created[job.layer] += 1
        self.left[job.layer] -= 1
        return self.left[job.layer] == 0
