"""One staging worker per node: ``python -m ktnuma.worker --node N --real-node R --cpus 0,1``.

Started by the coordinator with pipes; the messages are ktnuma.stage.protocol's. Imports only the
standard library and ktnuma's host modules (numpy lazily, for strided packing and conversions); never
torch, gguf or safetensors. It executes what it is sent and plans nothing.

A job may create this node's segment (O_CREX 0600, mmap, mbind to the backing real node -- or, when the
job carries a per-range policy (split tp-whole), each range bound or interleaved as it says -- then
posix_fallocate: pages placed before the first byte lands) and may run read ops that write into any
segment of the layer (all exist by then: the coordinator sequences it). Placement is read back with
move_pages after the job's own writes. A segment this worker created stays its own to remove until
the coordinator commits it: if stdin reaches EOF (the coordinator died) or a termination signal
arrives, the worker removes its uncommitted segments and exits (a crash while the coordinator lives
leaves them: other nodes may have filled them; the coordinator retries and cleans up).
"""
from __future__ import annotations

import logging
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor

from ktnuma.host import numa, shm
from ktnuma.stage import protocol
from ktnuma.errors import ParentGone, SourceTruncated
from ktnuma.stage.worker_io import Sources, direct_ok, prove  # noqa: F401 - direct_ok: launch checks files
from ktnuma.stage.worker_ops import JobOps

log = logging.getLogger("ktnuma.worker")

FAULT_ENV = "KTNUMA_WORKER_FAULT"  # tests: "L:n:k" -> die mid-job on (layer L, node n) while attempt < k
DELAY_ENV = "KTNUMA_WORKER_DELAY"  # tests: seconds to sleep (in small steps) inside every job with reads


class Hooks:
    """Test hooks, parsed once at the entry point (never read deeper in the worker). A plain class:
    no dataclasses import in the worker."""

    __slots__ = ("fault", "delay")

    def __init__(self, fault: tuple[int, int, int] | None = None, delay: float = 0.0) -> None:
        self.fault = fault  # (layer, node, k): die mid-job while attempt < k
        self.delay = delay

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Hooks:
        fault = env.get(FAULT_ENV, "")
        parts = tuple(int(x) for x in fault.split(":")) if fault else None
        if parts is not None and len(parts) != 3:
            raise ValueError(f"{FAULT_ENV}={fault!r}: expected L:n:k")
        return cls(parts, float(env.get(DELAY_ENV) or 0))  # type: ignore[arg-type]


class Worker:
    def __init__(self, node: int, real_node: int, cpus: list[int], threads: int, hooks: Hooks | None = None) -> None:
        self.node = node
        self.real_node = real_node
        self.cpus = cpus
        self.hooks = hooks or Hooks()
        self.src: Sources | None = None
        self.shm_dir: str | None = None
        self.gone = threading.Event()
        self.inbox: queue.Queue = queue.Queue()
        self.pool = ThreadPoolExecutor(max_workers=threads) if threads > 1 else None
        self.lock = threading.Lock()  # guards unfinished, stdout and the progress counters
        self.unfinished: set[str] = set()  # segments created here and not committed yet
        self.where = (None, node)  # (layer, node) of the current job, for progress messages
        self.moved = 0
        self.last_report = 0.0

    # ------------------------------------------------------------------ messages
    def send(self, msg: dict) -> None:
        with self.lock:
            sys.stdout.buffer.write(protocol.encode(msg))
            sys.stdout.buffer.flush()

    def tick(self, n: int) -> None:
        """Count I/O progress; tell the coordinator at most every PROGRESS_EVERY seconds."""
        now = time.monotonic()
        with self.lock:
            self.moved += n
            if now - self.last_report < protocol.PROGRESS_EVERY:
                return
            self.last_report = now
            moved = self.moved
        try:
            self.send({"op": "progress", "layer": self.where[0], "node": self.where[1], "read": moved})
        except (BrokenPipeError, ValueError):
            self.gone.set()

    def check(self) -> None:
        if self.gone.is_set():
            raise ParentGone()

    # ------------------------------------------------------------------ one job
    def _create(self, name: str, size: int, policy: list | None = None) -> tuple[int, object, int]:
        """Create, map and place the segment: ``policy`` = [[start, stop, mode, [real node, ...]], ...]
        (the plan's ranges, mapped to real nodes by the coordinator), else the whole segment bound
        to this worker's real node; then reserve its space (pages placed by the policy)."""
        fd = shm.create(name, self.shm_dir)  # FileExistsError: someone else's; never touched
        with self.lock:
            self.unfinished.add(name)
        try:
            os.ftruncate(fd, size)  # sparse: no page is touched before mbind
            mm = shm.map_fd(fd, size)
            addr = numa.address_of(mm)
            for start, stop, mode, nodes in policy or ((0, size, "bind", (self.real_node,)),):
                numa.mbind(addr + start, stop - start, nodes[0], mode, nodes)
            os.posix_fallocate(fd, 0, size)
            return fd, mm, addr
        except BaseException:
            os.close(fd)
            raise

    def _fault(self, msg: dict, n_ops: int) -> Callable[[int], None]:
        f = self.hooks.fault
        hit = f is not None and f[:2] == (msg["layer"], msg["node"]) and msg.get("attempt", 0) < f[2]

        def before(i: int) -> None:
            if hit and i >= n_ops // 2:
                log.warning("fault injection: dying mid-job")
                sys.stderr.flush()
                os._exit(9)
        return before

    def _delay(self) -> None:
        end = time.monotonic() + self.hooks.delay
        while time.monotonic() < end:
            self.check()
            self.tick(0)  # a slow job still reports that it is alive
            time.sleep(0.01)

    def job(self, msg: dict) -> dict:
        create = msg.get("create")
        name, size = (create["name"], create["size"]) if create else (None, 0)
        base = {"name": name, "layer": msg["layer"], "node": msg["node"]}
        self.where = (msg["layer"], msg["node"])
        self.last_report = time.monotonic()
        t0 = time.perf_counter()
        fd, mm, ops, ok = -1, None, None, False
        try:
            if create:
                fd, mm, addr = self._create(name, size, create.get("policy"))
            steps = protocol.unpack_ops(msg.get("ops"))
            if steps:
                ops = JobOps(self.src, {int(k): v for k, v in msg["segments"].items()}, self.shm_dir, self.check)
                ops.run(steps, self.pool, self._fault(msg, len(steps)))
                self._delay()
            placement = None
            if mm is not None and ops is not None:  # create-only: see protocol ("measure")
                placement = prove(mm, addr, size)
            self.check()  # a parent gone by now gets no finished segment left behind
            ok = True
            return {"op": "done", **base, "size": size, "placement": placement,
                    "read": ops.read if ops else 0,
                    "written": {str(k): v for k, v in (ops.written if ops else {}).items()},
                    "seconds": time.perf_counter() - t0}
        except ParentGone:
            raise
        except (OSError, SourceTruncated, numa.NumaError) as exc:
            kind = protocol.error_kind(exc)
            text = str(exc) if kind in ("exists", "input") or not isinstance(exc, OSError) else \
                f"segment {name} ({size} bytes): {exc.strerror or exc}" if name else f"{exc.strerror or exc}"
            return {"op": "error", **base, "kind": kind, "message": text}
        except Exception as exc:  # noqa: BLE001 - reported, the coordinator decides
            log.exception("job L%s n%s failed", msg["layer"], msg["node"])
            return {"op": "error", **base, "kind": "os", "message": f"{type(exc).__name__}: {exc}"}
        finally:
            if ops is not None:
                ops.close()
            if mm is not None:
                mm.close()
            if fd >= 0:
                os.close(fd)
            if name is not None and not ok:
                self.drop(name)  # only if this job created it

    def measure(self, name: str, size: int) -> None:
        """Answer "measure": the page placement of a segment of this node that others filled."""
        placement, fd, mm = None, -1, None
        try:
            fd = shm.open_segment(name, self.shm_dir)
            mm = shm.map_fd(fd, size, write=False)
            placement = prove(mm, numa.address_of(mm), size)
        except (OSError, ValueError, numa.NumaError) as exc:  # gone (released) or unreadable: unknown
            log.debug("measure %s: %s", name, exc)
        finally:
            if mm is not None:
                mm.close()
            if fd >= 0:
                os.close(fd)
        self.send({"op": "placed", "name": name, "placement": placement})

    def drop(self, name: str) -> None:
        with self.lock:
            if name not in self.unfinished:
                return
            self.unfinished.discard(name)
        shm.unlink(name, self.shm_dir)

    def drop_unfinished(self) -> None:
        for name in list(self.unfinished):
            self.drop(name)

    # ------------------------------------------------------------------ loop
    def reader(self) -> None:
        buf = b""
        try:
            while True:
                chunk = os.read(0, 1 << 20)  # raw fd: no buffered-reader lock at shutdown
                if not chunk:
                    break
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if not line.strip():
                        continue
                    msg = protocol.decode(line)
                    if msg.get("op") == "commit":  # at once, even while a job runs
                        with self.lock:
                            self.unfinished.difference_update(msg.get("names", ()))
                    elif msg.get("op") == "measure":
                        self.measure(str(msg["name"]), int(msg["size"]))
                    else:
                        self.inbox.put(msg)
        except (OSError, ValueError):
            pass
        self.gone.set()
        self.inbox.put(None)

    def serve(self) -> int:
        threading.Thread(target=self.reader, name="stdin", daemon=True).start()
        self.send({"op": "ready", "pid": os.getpid(), "cpus": self.cpus})
        while True:
            msg = self.inbox.get()
            if msg is None:
                return 0
            op = msg.get("op")
            if op == "init":
                self.shm_dir = msg.get("shm_dir")
                # files refusing O_DIRECT stay buffered (launch warned)
                self.src = Sources(list(msg["files"]), msg.get("io") == "direct", self.tick)
            elif op == "job":
                try:
                    res = self.job(msg)
                except ParentGone:
                    log.debug("parent gone during L%s: removed its segment", msg.get("layer"))
                    return 0
                try:
                    self.send(res)
                except BrokenPipeError:
                    return 0
            elif op == "exit":
                return 0


def _on_term(signum, frame):  # noqa: ARG001 - signal handler signature
    raise ParentGone()


USAGE = """usage: python -m ktnuma.worker --node N --real-node R --cpus LIST [--threads T]

ktnuma staging worker (started by the coordinator).

  --node N        topology node id
  --real-node R   real NUMA node backing it
  --cpus LIST     comma-separated CPUs to pin to
  --threads T     reader threads (default: one per CPU, max 8)
"""
ARGS = {"--node": "node", "--real-node": "real_node", "--cpus": "cpus", "--threads": "threads"}  # flag -> key
REQUIRED = ("node", "real_node", "cpus")


def parse_args(argv: list[str]) -> dict[str, str]:
    """The coordinator's command line (``--flag value`` or ``--flag=value``; no argparse: it costs
    the worker's start-up a few ms). ValueError naming the problem; "help" for -h/--help."""
    out: dict[str, str] = {}
    it = iter(argv)
    for a in it:
        if a in ("-h", "--help"):
            return {"help": "1"}
        flag, eq, value = a.partition("=")
        if flag not in ARGS:
            raise ValueError(f"unrecognized argument {a!r}")
        if not eq:
            value = next(it, None)
            if value is None:
                raise ValueError(f"{flag} expects a value")
        out[ARGS[flag]] = value
    missing = [f for f, k in ARGS.items() if k in REQUIRED and k not in out]
    if missing:
        raise ValueError(f"the following arguments are required: {', '.join(missing)}")
    for k in ("node", "real_node", "threads"):
        if k in out and not out[k].lstrip("-").isdigit():
            raise ValueError(f"{next(f for f, v in ARGS.items() if v == k)}: invalid int value {out[k]!r}")
    return out


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else list(argv))
    except ValueError as exc:  # exit 2 with the usage, as a CLI does
        sys.stderr.write(USAGE.split("\n\n")[0] + f"\npython -m ktnuma.worker: error: {exc}\n")
        return 2
    if "help" in args:
        sys.stdout.write(USAGE)
        return 0
    node, real_node = int(args["node"]), int(args["real_node"])
    logging.basicConfig(level=os.environ.get("KTNUMA_LOG", "WARNING").upper(), stream=sys.stderr,
                        format=f"ktnuma worker n{node}: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the coordinator decides
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGHUP, _on_term)
    try:
        cpus = [int(c) for c in args["cpus"].split(",") if c]
    except ValueError:
        sys.stderr.write(f"python -m ktnuma.worker: error: --cpus: not a comma-separated CPU list: {args['cpus']!r}\n")
        return 2
    threads = int(args.get("threads", 0))
    w = Worker(node, real_node, cpus, threads or min(len(cpus), 8), Hooks.from_env(os.environ))
    try:
        numa.pin_cpus(cpus)
        numa.bind_process_memory(real_node)
    except numa.NumaError as exc:
        w.send({"op": "error", "name": None, "layer": None, "node": node, "kind": "os",
                "message": str(exc)})
        return 1
    keep = False
    try:
        return w.serve()
    except ParentGone:
        return 0
    except BaseException:
        # a crash while the coordinator lives: it retries and owns the cleanup; other nodes may
        # have written into this worker's segments already, so they stay
        keep = not w.gone.is_set()
        raise
    finally:
        if not keep:
            w.drop_unfinished()
