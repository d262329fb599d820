"""One staging worker per node: ``python -m ktnuma.stage.worker --node N --real-node R --cpus 0,1``.

Started by the coordinator with pipes: stdin carries JSON-line jobs, stdout JSON-line results.
Imports only the standard library, ktnuma.numa / shm / formats.dtypes (numpy lazily, for strided
gathers and conversions); never torch, gguf or safetensors.

Protocol (one JSON object per line):
  in : {"op": "init", "files": [path, ...], "shm_dir": str|null}
       {"op": "job", "name": seg, "layer": L, "node": n, "size": bytes, "attempt": k,
        "arrays": [ArrayPlan fields as a dict, ...]}
  out: {"op": "ready", "pid": pid, "cpus": [...]}
       {"op": "done", "name", "layer", "node", "size", "bytes", "seconds", "placement"}
       {"op": "error", "name", "layer", "node", "kind": "nospace"|"input"|"exists"|"os", "message"}

Per job: create the segment O_CREX 0600, mmap it, mbind it to the backing real node,
posix_fallocate it, then read: ``os.preadv`` straight into the mapping for contiguous runs
(adjacent pieces coalesced, split in chunks for a small thread pool, looping on short reads), a
per-thread reusable bounce buffer for strided gathers and conversions. Placement is read back with
move_pages, the mapping is closed (no file mapping survives a job). If stdin reaches EOF (the
coordinator died) the worker removes its unfinished segment and exits; finished segments belong
to the coordinator.
"""
from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import queue
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from ktnuma.host import numa
from ktnuma.host import shm
from ktnuma.errors import ParentGone, SourceTruncated

log = logging.getLogger("ktnuma.worker")

CHUNK = 8 << 20  # bytes per contiguous preadv task
BOUNCE_MAX = 64 << 20  # bytes of source span gathered per bounce-buffer fill
FAULT_ENV = "KTNUMA_WORKER_FAULT"  # tests: "L:n:k" -> die mid-job on (layer L, node n) while attempt < k
DELAY_ENV = "KTNUMA_WORKER_DELAY"  # tests: seconds to sleep (in small steps) inside every job


def read_full(fd: int, dst: memoryview, offset: int, path: str) -> None:
    """preadv until ``dst`` is full; EOF before that is a SourceTruncated."""
    while len(dst):
        n = os.preadv(fd, [dst], offset)
        if n <= 0:
            raise SourceTruncated(f"{path}: unexpected end of file at byte {offset} "
                             f"({len(dst)} bytes still expected); was the file changed?")
        dst = dst[n:]
        offset += n


def write_full(fd: int, src: memoryview, offset: int) -> None:
    while len(src):
        n = os.pwritev(fd, [src], offset)
        src = src[n:]
        offset += n


MADV_POPULATE_READ = 22  # Linux 5.14+: map the segment's pages without touching them one by one


def populate(mm) -> None:
    """Map the (already written) pages of ``mm`` so move_pages can see them; best effort."""
    try:
        mm.madvise(MADV_POPULATE_READ)
    except OSError:  # older kernel: fault them in, one read per page
        for i in range(0, len(mm), numa.PAGE_SIZE):
            mm[i]


ALIGN = 4096  # O_DIRECT: file offset, length and buffer address multiple of this


def unpack_ints(v) -> list[int] | range:
    """Per-piece ints from the wire: a list, or ``{"a": first, "d": step, "n": count}``
    (coordinator.pack_ints)."""
    if isinstance(v, dict):
        a, d, n = v["a"], v["d"], v["n"]
        return [a] * n if d == 0 else range(a, a + d * n, d)
    return v


def direct_ok(path: str) -> bool:
    """Whether ``path`` can be read with O_DIRECT (tmpfs and some overlay filesystems refuse)."""
    if not hasattr(os, "O_DIRECT"):
        return False
    import mmap

    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:
        return False
    buf = mmap.mmap(-1, ALIGN)
    try:
        os.preadv(fd, [buf], 0)
        return True
    except OSError:
        return False
    finally:
        buf.close()
        os.close(fd)


class Worker:
    def __init__(self, node: int, real_node: int, cpus: list[int], threads: int) -> None:
        self.node = node
        self.real_node = real_node
        self.cpus = cpus
        self.files: list[str] = []
        self.fds: dict[int, int] = {}
        self.shm_dir: str | None = None
        self.direct: set[int] = set()  # file indexes read with O_DIRECT (--io direct)
        self.dfds: dict[int, int] = {}
        self.gone = threading.Event()
        self.inbox: queue.Queue = queue.Queue()
        self.local = threading.local()
        self.pool = ThreadPoolExecutor(max_workers=max(1, threads)) if threads > 1 else None
        self.unfinished: list[str] = []  # segments created by the current job
        self.lock = threading.Lock()
        self.job_id = 0  # the current job's number, its segment's name and fds
        self.job_name = ""
        self.job_fd = -1
        self.job_fds: list[int] = []  # pool threads' own fds of the current segment
        fault = os.environ.get(FAULT_ENV, "")
        self.fault = tuple(int(x) for x in fault.split(":")) if fault else None
        self.delay = float(os.environ.get(DELAY_ENV) or 0)

    # ------------------------------------------------------------------ io helpers
    def fd(self, i: int) -> int:
        fd = self.fds.get(i)
        if fd is None:
            with self.lock:  # pool threads race here: open each file once
                fd = self.fds.get(i)
                if fd is None:
                    fd = self.fds[i] = os.open(self.files[i], os.O_RDONLY | os.O_CLOEXEC)
        return fd

    def dfd(self, i: int) -> int:
        fd = self.dfds.get(i)
        if fd is None:
            with self.lock:
                fd = self.dfds.get(i)
                if fd is None:
                    fd = self.dfds[i] = os.open(self.files[i], os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
        return fd

    def bounce(self, n: int) -> memoryview:
        """This thread's reusable buffer (anonymous mmap: page-aligned, as O_DIRECT needs)."""
        import mmap

        buf = getattr(self.local, "buf", None)
        if buf is None or len(buf) < n:
            buf = self.local.buf = mmap.mmap(-1, max(-(-n // ALIGN) * ALIGN, 1 << 20))
        return memoryview(buf)[:n]

    def read_span(self, fi: int, off: int, n: int, extra: int = 0) -> tuple[memoryview, memoryview]:
        """Bytes ``[off, off+n)`` of file ``fi`` in this thread's bounce buffer, and the buffer's
        ``extra`` bytes after them (page-aligned) for packing/converting: (span, extra view).
        O_DIRECT files are read as the aligned superset of the span."""
        path = self.files[fi]
        if fi not in self.direct:
            room = -(-n // ALIGN) * ALIGN
            buf = self.bounce(room + extra)
            read_full(self.fd(fi), buf[:n], off, path)
            return buf[:n], buf[room:room + extra]
        a0 = off - off % ALIGN
        a1 = -(-(off + n) // ALIGN) * ALIGN
        buf = self.bounce(a1 - a0 + extra)
        fd, pos, want = self.dfd(fi), a0, off + n  # read until the span's last byte is in
        while pos < want:
            got = os.preadv(fd, [buf[pos - a0:a1 - a0]], pos)
            if got <= 0 or (pos + got < want and got % ALIGN):
                raise SourceTruncated(f"{path}: unexpected end of file at byte {pos + max(got, 0)} "
                                 f"({want - pos - max(got, 0)} bytes still expected); was the file changed?")
            pos += got
        return buf[off - a0:off - a0 + n], buf[a1 - a0:a1 - a0 + extra]

    def check(self) -> None:
        if self.gone.is_set():
            raise ParentGone()

    # ------------------------------------------------------------------ operations
    def seg_fd(self) -> int:
        """This thread's own fd of the current job's segment (sendfile writes at the fd's position)."""
        if threading.current_thread() is threading.main_thread():
            return self.job_fd
        job, fd = getattr(self.local, "seg", (None, -1))
        if job != self.job_id:
            fd = shm.open_segment(self.job_name, self.shm_dir, write=True)
            with self.lock:
                self.job_fds.append(fd)
            self.local.seg = (self.job_id, fd)
        return fd

    def op_copy(self, view: memoryview, fi: int, off: int, dest: int, length: int) -> None:
        """Kernel copy page cache -> segment (sendfile): no user copy, no zero-fill of the pages."""
        self.check()
        if fi in self.direct:  # O_DIRECT into the aligned bounce buffer, pwrite the span
            data, _ = self.read_span(fi, off, length)
            write_full(self.seg_fd(), data, dest)
            return
        src, out = self.fd(fi), self.seg_fd()
        os.lseek(out, dest, os.SEEK_SET)
        while length:
            n = os.sendfile(out, src, off, length)
            if n <= 0:
                raise SourceTruncated(f"{self.files[fi]}: unexpected end of file at byte {off} "
                                 f"({length} bytes still expected); was the file changed?")
            off += n
            length -= n

    def op_gather(self, view: memoryview, fi: int, off: int, dest: int, rows: int, run: int,
                  src_stride: int, conversion: str | None, ratio: int) -> None:
        """Rows of ``run`` bytes ``src_stride`` apart (then converted) -> contiguous at dest.

        The source span is read into a per-thread bounce buffer, packed (and converted) there and
        written into the segment with pwrite (full pages: no zero-fill, no page faults)."""
        import numpy as np
        from numpy.lib.stride_tricks import as_strided

        out = self.seg_fd()
        per = max(1, BOUNCE_MAX // max(src_stride, 1)) if rows > 1 else 1
        out_run = run * ratio
        r = 0
        while r < rows:
            self.check()
            n = min(per, rows - r)
            span = (n - 1) * src_stride + run
            contiguous = n == 1 or run == src_stride
            pack_n = 0 if contiguous else n * run
            src, extra = self.read_span(fi, off + r * src_stride, span,
                                        pack_n + (n * out_run if conversion else 0))
            if contiguous:
                packed = src
            else:
                packed = extra[:pack_n]
                a = as_strided(np.frombuffer(src, np.uint8), shape=(n, run), strides=(src_stride, 1))
                np.copyto(np.frombuffer(packed, np.uint8).reshape(n, run), a)
                del a
            if conversion is not None:
                from ktnuma.index.dtypes import convert

                converted = extra[pack_n:pack_n + n * out_run]
                convert(conversion, packed, converted)
                packed = converted
            write_full(out, packed, dest + r * out_run)
            r += n

    def plan_ops(self, arrays: list[dict]) -> list[tuple]:
        """ArrayPlans -> coalesced contiguous copies (chunked) and gathers."""
        from ktnuma.index.dtypes import CONVERSIONS

        ops: list[tuple] = []
        cur: list | None = None  # [fi, off, dest, length] being coalesced
        for a in arrays:
            rows, run, sstride, conv = a["rows"], a["run"], a["src_stride"], a.get("conversion")
            contiguous = rows == 1 or run == sstride
            files, offsets = unpack_ints(a["files"]), unpack_ints(a["src_offsets"])
            for k in range(a["count"]):
                fi, off, dest = files[k], offsets[k], a["offset"] + k * a["stride"]
                if contiguous and conv is None:
                    length = rows * run
                    if cur and cur[0] == fi and cur[1] + cur[3] == off and cur[2] + cur[3] == dest:
                        cur[3] += length
                    else:
                        if cur:
                            ops.append(("copy", *cur))
                        cur = [fi, off, dest, length]
                else:
                    ratio = CONVERSIONS[conv].ratio if conv else 1
                    ops.append(("gather", fi, off, dest, rows, run, sstride, conv, ratio))
        if cur:
            ops.append(("copy", *cur))
        out: list[tuple] = []
        for op in ops:  # split big copies so the pool overlaps them
            if op[0] == "copy" and op[4] > CHUNK:
                _, fi, off, dest, length = op
                for s in range(0, length, CHUNK):
                    out.append(("copy", fi, off + s, dest + s, min(CHUNK, length - s)))
            else:
                out.append(op)
        return out

    def run_ops(self, view: memoryview, ops: list[tuple], fault_at: int | None) -> None:
        def one(i_op):
            i, op = i_op
            if fault_at is not None and i >= fault_at:
                log.warning("fault injection: dying mid-job")
                sys.stderr.flush()
                os._exit(9)
            kind, *args = op
            (self.op_copy if kind == "copy" else self.op_gather)(view, *args)

        items = list(enumerate(ops))
        if self.pool is None or len(ops) < 2:
            for it in items:
                one(it)
        else:  # wait for every op, even after a failure: none may outlive the job's fds
            futures = [self.pool.submit(one, it) for it in items]
            first: BaseException | None = None
            for f in futures:
                try:
                    f.result()
                except BaseException as exc:  # noqa: BLE001 - the first one is re-raised below
                    first = first or exc
            if first is not None:
                raise first

    # ------------------------------------------------------------------ one job
    def job(self, msg: dict) -> dict:
        name, size = msg["name"], msg["size"]
        base = {"name": name, "layer": msg["layer"], "node": msg["node"]}
        t0 = time.perf_counter()
        fd = -1
        mm = view = None
        try:
            fd = shm.create(name, self.shm_dir)
            self.unfinished.append(name)
            os.ftruncate(fd, size)  # sparse: no page is touched before mbind
            mm = shm.map_fd(fd, size)
            addr = numa.address_of(mm)
            numa.mbind(addr, size, self.real_node)
            os.posix_fallocate(fd, 0, size)
            view = memoryview(mm)
            self.job_id += 1
            self.job_name, self.job_fd = name, fd
            ops = self.plan_ops(msg["arrays"])
            fault_at = None
            if self.fault and self.fault[:2] == (msg["layer"], msg["node"]) \
                    and msg.get("attempt", 0) < self.fault[2]:
                fault_at = len(ops) // 2
            self.run_ops(view, ops, fault_at)
            end = time.monotonic() + self.delay
            while time.monotonic() < end:
                self.check()
                time.sleep(0.01)
            populate(mm)
            placement = numa.placement(addr, size)
            view.release()
            view = None
            mm.close()
            mm = None
            seconds = time.perf_counter() - t0
            nbytes = sum(a["count"] * a["stride"] for a in msg["arrays"])
            self.check()  # a parent gone by now gets no finished segment left behind
            self.unfinished.remove(name)
            return {"op": "done", **base, "size": size, "bytes": nbytes, "seconds": seconds,
                    "placement": placement}
        except FileExistsError as exc:
            return {"op": "error", **base, "kind": "exists", "message": str(exc)}
        except OSError as exc:
            kind = "nospace" if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG) else "os"
            return {"op": "error", **base, "kind": kind,
                    "message": f"segment {name} ({size} bytes): {exc.strerror or exc}"}
        except SourceTruncated as exc:
            return {"op": "error", **base, "kind": "input", "message": str(exc)}
        except numa.NumaError as exc:
            return {"op": "error", **base, "kind": "os", "message": str(exc)}
        except ParentGone:
            raise
        except Exception as exc:  # noqa: BLE001 - reported, the coordinator decides
            log.exception("job %s failed", name)
            return {"op": "error", **base, "kind": "os", "message": f"{type(exc).__name__}: {exc}"}
        finally:
            if view is not None:
                view.release()
            if mm is not None:
                try:
                    mm.close()
                except BufferError:  # pragma: no cover - a leaked view; the unlink below still runs
                    pass
            with self.lock:
                fds, self.job_fds = self.job_fds, []
            for f in fds:
                os.close(f)
            self.job_fd = -1
            if fd >= 0:
                os.close(fd)
            self.drop_unfinished()

    def drop_unfinished(self) -> None:
        while self.unfinished:
            shm.unlink(self.unfinished.pop(), self.shm_dir)

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
                    if line.strip():
                        self.inbox.put(json.loads(line))
        except (OSError, ValueError):
            pass
        self.gone.set()
        self.inbox.put(None)

    def send(self, msg: dict) -> None:
        out = sys.stdout.buffer
        out.write(json.dumps(msg, separators=(",", ":")).encode() + b"\n")
        out.flush()

    def serve(self) -> int:
        threading.Thread(target=self.reader, name="stdin", daemon=True).start()
        self.send({"op": "ready", "pid": os.getpid(), "cpus": self.cpus})
        while True:
            msg = self.inbox.get()
            if msg is None:
                return 0
            op = msg.get("op")
            if op == "init":
                self.files = list(msg["files"])
                self.shm_dir = msg.get("shm_dir")
                if msg.get("io") == "direct":  # files refusing O_DIRECT stay buffered (launch warned)
                    self.direct = {i for i, f in enumerate(self.files) if direct_ok(f)}
            elif op == "job":
                try:
                    res = self.job(msg)
                except ParentGone:
                    log.debug("parent gone during %s: removed it", msg.get("name"))
                    return 0
                try:
                    self.send(res)
                except BrokenPipeError:
                    return 0
            elif op == "exit":
                return 0


def _on_term(signum, frame):  # noqa: ARG001 - signal handler signature
    raise ParentGone()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ktnuma.worker",
                                description="ktnuma staging worker (started by the coordinator).")
    p.add_argument("--node", type=int, required=True, help="topology node id")
    p.add_argument("--real-node", type=int, required=True, help="real NUMA node backing it")
    p.add_argument("--cpus", required=True, help="comma-separated CPUs to pin to")
    p.add_argument("--threads", type=int, default=0, help="reader threads (default: one per CPU, max 8)")
    args = p.parse_args(argv)
    logging.basicConfig(level=os.environ.get("KTNUMA_LOG", "WARNING").upper(), stream=sys.stderr,
                        format=f"ktnuma worker n{args.node}: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the coordinator decides
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGHUP, _on_term)
    cpus = [int(c) for c in args.cpus.split(",") if c]
    w = Worker(args.node, args.real_node, cpus, args.threads or min(len(cpus), 8))
    try:
        numa.pin_cpus(cpus)
        numa.bind_process_memory(args.real_node)
    except numa.NumaError as exc:
        w.send({"op": "error", "name": None, "layer": None, "node": args.node, "kind": "os",
                "message": str(exc)})
        return 1
    try:
        return w.serve()
    except ParentGone:
        return 0
    finally:
        w.drop_unfinished()
