"""Worker subprocesses seen from the coordinator: how they are started (``python -S -m
ktnuma.worker``, own process group, pinned by their own arguments), the thread that forwards each
one's stdout messages to the run's event queue (stamping when it last heard from it), and the
workers started before a plan exists (:func:`prespawn`). Imports nothing heavy."""
from __future__ import annotations

import logging
import os
import queue
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from ktnuma.stage import protocol

log = logging.getLogger(__name__)

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


class WorkerProc:
    """One worker subprocess. Events on the queue: (node id, generation, message | None at EOF)."""

    def __init__(self, node, gen: int, events: queue.Queue, files: list[str] | None, shm_dir: str | None,
                 io: str = "buffered", env: dict[str, str] | None = None):
        self.node = node
        self.gen = gen
        cmd = [sys.executable, "-S", "-m", "ktnuma.worker", "--node", str(node.id),
               "--real-node", str(node.real_node), "--cpus", ",".join(map(str, node.cpus))]
        # own process group: a terminal's Ctrl-C reaches the coordinator only (workers follow the pipe)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, process_group=0,
                                     close_fds=True, env=env or worker_env())
        self.jobs: deque[Any] = deque()  # jobs sent and not answered yet, in the order it runs them
        self.layer: int | None = None  # layer of the last job sent
        self.heard = time.monotonic()  # when it last sent a message (or was sent a job)
        self.stalled: str | None = None  # why the coordinator killed it, if it did
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
                self.heard = time.monotonic()
                try:
                    self.events.put((self.node.id, self.gen, protocol.decode(line)))
                except ValueError:
                    log.warning("worker n%d: unreadable line %r", self.node.id, line[:200])
        except (OSError, ValueError):
            pass
        self.events.put((self.node.id, self.gen, None))

    def send(self, msg: dict | bytes) -> bool:
        data = msg if isinstance(msg, bytes) else protocol.encode(msg)
        try:
            self.proc.stdin.write(data)
            self.proc.stdin.flush()
            return True
        except (BrokenPipeError, OSError, ValueError):
            return False

    @property
    def job(self) -> Any:
        """The job it is running now (the oldest unanswered one), or None when idle."""
        return self.jobs[0] if self.jobs else None

    def send_job(self, job: Any, data: bytes) -> None:
        if not self.jobs:
            self.heard = time.monotonic()  # the stall deadline runs from the start of its job
        self.jobs.append(job)
        self.layer = job.layer
        self.send(data)  # a broken pipe shows up as EOF on its stdout

    def kill_stalled(self, why: str) -> None:
        """Treat it as dead: SIGKILL (works on a stopped process too); its EOF follows."""
        self.stalled = why
        try:
            self.proc.kill()
        except OSError:  # pragma: no cover - already reaped
            pass

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
    procs: dict[int, WorkerProc]

    def stop(self) -> None:
        for p in self.procs.values():
            p.stop(2.0)
        self.procs.clear()


def prespawn(topology) -> Workers:
    events: queue.Queue = queue.Queue()
    env = worker_env()
    return Workers(events, {n.id: WorkerProc(n, 1, events, None, None, env=env) for n in topology.nodes})
