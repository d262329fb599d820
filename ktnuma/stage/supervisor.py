"""The coordinator's side of its workers: spawning them, sending each the job the schedule allows,
reading what they answer, retrying failed or dead ones, and the deadline for a worker that stops
making progress. The Run (coordinator.py) owns one Supervisor."""
from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Callable

from ktnuma.errors import BadInput, NotEnoughMemory, SegmentExists, WorkerFailed
from ktnuma.host import shm
from ktnuma.stage import protocol
from ktnuma.stage.procs import WorkerProc, Workers, worker_env
from ktnuma.stage.schedule import Job, Schedule

log = logging.getLogger("ktnuma.stage.coordinator")

STALL_ENV = "KTNUMA_STALL_TIMEOUT"  # seconds without any progress before a busy worker counts as dead
STALL_DEFAULT = 300.0
QUEUED = 2  # jobs sent ahead to a worker: the one it runs and the next (it reads them in order)


def stall_timeout(value: float | None = None) -> float:
    """The deadline: `value`, else $KTNUMA_STALL_TIMEOUT, else STALL_DEFAULT seconds."""
    if value is None:
        raw = os.environ.get(STALL_ENV, "")
        try:
            value = float(raw) if raw else STALL_DEFAULT
        except ValueError:
            raise BadInput(f"{STALL_ENV}={raw!r}: expected seconds") from None
    if not value > 0:
        raise BadInput(f"stall_timeout={value}: must be > 0 seconds")
    return value


class Supervisor:
    def __init__(self, run, sched: Schedule, retries: int, stall: float,
                 on_done: Callable[[Job, dict], None], emit: Callable[..., None]) -> None:
        self.run = run  # plan, topology, shm_dir, io, name(layer, node), events
        self.sched = sched
        self.retries = retries
        self.stall = stall
        self.on_done = on_done
        self.emit = emit
        self.env = worker_env()
        self.procs: dict[int, WorkerProc] = {}
        self.gen = 0
        self.attempts: dict[tuple[int, int], int] = {}
        self.retries_used = 0
        self.created: set[str] = set()  # every segment name a create was sent for
        self.foreign: set[str] = set()  # names that existed before we tried to create them

    def adopt(self, pre: Workers | None) -> None:
        """One worker per node with work: a prespawned one if there is, else a new one."""
        r = self.run
        if pre is not None:
            self.gen = 1
        for n in r.topology.nodes:
            p = pre.procs.pop(n.id, None) if pre is not None else None
            if not self.sched.has_work(n.id):
                if p is not None:
                    p.stop(2.0)  # a node with nothing to stage (ep, more nodes than experts)
            elif p is not None:
                p.init(list(r.plan.files), r.shm_dir, r.io)
                self.procs[n.id] = p
            else:
                self.spawn(n)
        if pre is not None:
            pre.stop()  # workers for nodes this topology does not have

    def spawn(self, node) -> WorkerProc:
        self.gen += 1
        r = self.run
        p = WorkerProc(node, self.gen, r.events, list(r.plan.files), r.shm_dir, r.io, self.env)
        self.procs[node.id] = p
        return p

    def dispatch(self) -> None:
        """Keep every worker's queue QUEUED jobs deep (as far as the schedule allows): the next job
        is already in its stdin when it finishes one, so it never waits for this process."""
        for nid, p in list(self.procs.items()):
            while len(p.jobs) < QUEUED:
                job = self.sched.next_job(nid)
                if job is None:
                    if not p.jobs and self.sched.settled(nid):
                        p.close_stdin()  # nothing left, its segments committed: let it exit
                    break
                self.send(p, job)

    def send(self, p: WorkerProc, job: Job) -> None:
        r = self.run
        create = policy = None
        if job.create is not None:
            name = r.name(job.layer, job.node)
            self.created.add(name)
            create = (name, job.create.size)
            policy = protocol.wire_policy(job.create.policy, {n.id: n.real_node for n in r.topology.nodes})
        data = protocol.job(job.layer, job.node, self.attempts.get((job.layer, job.node), 0), create,
                            {n: r.name(job.layer, n) for n in job.targets}, job.ops, policy)
        p.send_job(job, data)

    def commit(self, layer: int, nodes, measure: dict[int, int] | None = None) -> list[int]:
        """The layer is complete: its segments belong to the run now, not to the workers that made them.
        ``measure`` (node -> segment size): also ask those owners where the pages are; returns the
        nodes asked (a worker gone by now cannot answer)."""
        asked = []
        for n in nodes:
            p = self.procs.get(n)
            if p is not None:
                name = self.run.name(layer, n)
                p.send({"op": "commit", "names": [name]})
                if measure and n in measure:
                    p.send({"op": "measure", "name": name, "size": measure[n]})
                    asked.append(n)
        return asked

    # ------------------------------------------------------------------ failures
    def fail(self, layer: int, node: int, why: str) -> None:
        """Count a failure of node's work on layer; give up (WorkerFailed) past the retries."""
        attempt = self.attempts.get((layer, node), 0) + 1
        self.attempts[(layer, node)] = attempt
        if attempt > self.retries:
            raise WorkerFailed(f"worker for node {node} failed staging layer {layer} "
                               f"({why}); gave up after {self.retries} retries")
        self.retries_used += 1
        log.warning("worker for node %d failed staging layer %d (%s); retry %d of %d",
                    node, layer, why, attempt, self.retries)
        self.emit("retry", layer, node, f"{why}; retry {attempt}/{self.retries}")

    def retry(self, p: WorkerProc, why: str) -> None:
        """The current job of ``p`` failed (death or error): discard what it made and redo it."""
        job = p.jobs.popleft()
        if job.create is not None:
            shm.unlink(self.run.name(job.layer, job.node), self.run.shm_dir)
        self.fail(job.layer, job.node, why)
        self.sched.retry(job)

    def requeue(self, p: WorkerProc) -> None:
        """``p`` is gone: the jobs it was sent after its current one never started; back to the
        schedule, no failure counted (last first: each goes back to the front of its queue)."""
        while len(p.jobs) > 1:
            self.sched.retry(p.jobs.pop())

    def check_deadlines(self) -> None:
        now = time.monotonic()
        for p in self.procs.values():
            if p.job is not None and p.stalled is None and now - p.heard > self.stall:
                why = f"no progress for {now - p.heard:.0f} s"
                log.info("worker for node %d: %s on layer %d; killing it", p.node.id, why, p.job.layer)
                p.kill_stalled(why)

    # ------------------------------------------------------------------ messages
    def handle(self, nid: int, gen: int, msg: dict | None) -> None:
        p = self.procs.get(nid)
        if p is None or p.gen != gen:
            return  # a stale event of a replaced worker
        if msg is None:
            self._died(p)
            return
        op = msg.get("op")
        if op in ("ready", "progress"):
            return
        if op == "placed":
            self.run.placed(nid, str(msg.get("name")), msg.get("placement"))
            return
        if op == "error":
            self._error(p, msg)
            return
        if op == "done":
            job = p.job
            want = self.run.name(job.layer, job.node) if job and job.create else None
            if job is None or msg.get("name") != want or msg.get("layer") != job.layer:
                raise WorkerFailed(f"worker for node {nid} answered for {msg.get('name')}, expected {want}")
            p.jobs.popleft()
            self.on_done(job, msg)
            return
        log.warning("worker n%d: unknown message %r", nid, op)

    def _died(self, p: WorkerProc) -> None:
        nid = p.node.id
        try:
            rc = p.proc.wait(10)
        except subprocess.TimeoutExpired:
            p.proc.kill()
            rc = p.proc.wait()
        busy = p.layer is not None and self.sched.pending(nid, p.layer)
        self.run.placed(nid, None, None)  # its unanswered "measure"s stay unknown
        if p.job is None and not self.sched.has_work(nid):
            del self.procs[nid]  # finished its work and exited
            return
        why = p.stalled or (f"worker exited with code {rc}" if rc >= 0 else f"worker killed by signal {-rc}")
        if p.job is not None:
            self.requeue(p)
            self.retry(p, why)
        elif busy:  # between jobs of a layer (its fill waiting for the other segments)
            self.fail(p.layer, nid, why)
        p.stop(0.1)
        del self.procs[nid]
        if self.sched.has_work(nid):
            self.spawn(p.node)

    def _error(self, p: WorkerProc, msg: dict) -> None:
        kind, text = msg.get("kind"), msg.get("message", "")
        if kind == "exists" and p.job is not None:
            name = self.run.name(p.job.layer, p.job.node)
            self.created.discard(name)
            self.foreign.add(name)
            p.jobs.popleft()
            raise SegmentExists(f"segment {name} already exists (not created by this run); refusing to "
                                "attach to, resize or remove it", self.foreign)
        if kind == "nospace":
            where = shm.norm_dir(self.run.shm_dir)
            raise NotEnoughMemory(f"{text}: the shared-memory filesystem {where} is full; enlarge it "
                                  f"(mount -o remount,size=NG {where}) or use shm_dir=DIR on a larger tmpfs")
        if kind == "input":
            raise BadInput(text)
        if p.job is None:
            raise WorkerFailed(f"worker for node {p.node.id} failed: {text}")
        self.retry(p, text)

    def stop_all(self) -> None:
        """Stop every worker (politely, then SIGKILL); even if interrupted, none outlives the run."""
        try:
            for p in list(self.procs.values()):
                p.close_stdin()
            for p in list(self.procs.values()):
                p.stop()
        finally:
            for p in list(self.procs.values()):
                if p.proc.poll() is None:
                    p.proc.kill()
                    p.proc.wait()
            self.procs.clear()
