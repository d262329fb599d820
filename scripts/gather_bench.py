#!/usr/bin/env python3
"""tp's column gather, side by side: the ways a worker could move a row-major matrix's column cuts
(a down projection's N per-node parts) from a cached source file into N segments.

    python3 scripts/gather_bench.py [--nodes 2] [--rows 1792] [--row-bytes 1024] [--mib 128]
                                    [--rounds 5] [--shm-dir /dev/shm]

The source is a temporary file of random bytes (read once first, so it is in the page cache): a run
of matrices of `rows` rows of `row-bytes` bytes. Each way fills N fresh segments (O_EXCL 0600,
ftruncate + posix_fallocate, as a worker creates them; unlinked at once, so nothing is left behind):
  worker    ktnuma.stage.worker_ops.JobOps on the planner's op shape (one read op per matrix, one
            strided write per node): pread, pack (ktnuma._pack), pwrite. What ktnuma runs.
  scatter   preadv straight into N per-node buffers (one iovec per row part), then pwrite each.
  mmap      pread, then pack straight into each segment's MADV_POPULATE_WRITE mapping.
  sendfile  the same number of bytes as contiguous sendfile copies (what ep does: the floor).
Every way's segments are compared byte for byte with slices of the source (a fail exits 1). Prints
the median CPU milliseconds (thread time, unmaps included) per way and each way / sendfile.
A development tool (never imported by ktnuma).
"""
from __future__ import annotations

import argparse
import mmap
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ktnuma._pack import pack  # noqa: E402
from ktnuma.host import shm  # noqa: E402
from ktnuma.stage.worker_io import Sources  # noqa: E402
from ktnuma.stage.worker_ops import JobOps  # noqa: E402

IOV_MAX = 1024
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)


class Case:
    def __init__(self, src: str, nodes: int, rows: int, row_bytes: int, mats: int, shm_dir: str) -> None:
        self.src, self.nodes, self.rows, self.row, self.mats, self.shm_dir = src, nodes, rows, row_bytes, mats, shm_dir
        self.run = row_bytes // nodes
        self.length = rows * row_bytes  # one matrix
        self.part = rows * self.run  # one node's part of one matrix
        self.seg = mats * self.part
        self.fd = os.open(src, os.O_RDONLY)

    def segments(self) -> tuple[list[int], list[str]]:
        fds, names = [], []
        for j in range(self.nodes):
            name = f"{shm.PREFIX}gather-bench.{os.getpid()}.{j}"
            fd = os.open(os.path.join(self.shm_dir, name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            fds.append(fd)
            names.append(name)
            os.ftruncate(fd, self.seg)
            os.posix_fallocate(fd, 0, self.seg)
        return fds, names

    def worker(self, fds: list[int], names: list[str]) -> None:
        src = Sources([self.src], direct=False, tick=lambda n: None)
        ops = JobOps(src, dict(enumerate(names)), self.shm_dir, lambda: None)
        try:
            for i in range(self.mats):
                writes = tuple((j, i * self.part, j * self.run, self.rows, self.run, self.row, self.part, None)
                               for j in range(self.nodes))
                ops.one((0, i * self.length, self.length, writes))
        finally:
            ops.close()
            src.close()

    def scatter(self, fds: list[int], names: list[str]) -> None:
        bufs = [mmap.mmap(-1, self.part) for _ in range(self.nodes)]
        views = [memoryview(b) for b in bufs]
        iov = [views[j][r * self.run:(r + 1) * self.run] for r in range(self.rows) for j in range(self.nodes)]
        for i in range(self.mats):
            for a in range(0, len(iov), IOV_MAX):
                os.preadv(self.fd, iov[a:a + IOV_MAX], i * self.length + a * self.run)
            for j in range(self.nodes):
                os.pwrite(fds[j], views[j], i * self.part)
        del iov
        for v in views:
            v.release()
        for b in bufs:
            b.close()

    def mapping(self, fds: list[int], names: list[str]) -> None:
        buf = mmap.mmap(-1, self.length)
        mms = [mmap.mmap(fd, self.seg) for fd in fds]
        for m in mms:
            m.madvise(MADV_POPULATE_WRITE)
        for i in range(self.mats):
            os.preadv(self.fd, [buf], i * self.length)
            for j in range(self.nodes):
                with memoryview(mms[j]) as d:
                    pack(buf, j * self.run, self.rows, self.run, self.row, d[i * self.part:(i + 1) * self.part])
        for m in mms:
            m.close()
        buf.close()

    def sendfile(self, fds: list[int], names: list[str]) -> None:
        for i in range(self.mats):
            for j in range(self.nodes):
                os.lseek(fds[j], i * self.part, os.SEEK_SET)
                off, left = i * self.length + j * self.part, self.part
                while left:
                    n = os.sendfile(fds[j], self.fd, off, left)
                    off, left = off + n, left - n

    def check(self, how: str, fds: list[int]) -> None:
        """Each segment against the source, read back independently (no ktnuma code)."""
        for i in range(self.mats):
            mat = os.pread(self.fd, self.length, i * self.length)
            for j in range(self.nodes):
                got = os.pread(fds[j], self.part, i * self.part)
                if how == "sendfile":
                    want = mat[j * self.part:(j + 1) * self.part]
                else:
                    want = b"".join(mat[r * self.row + j * self.run:r * self.row + (j + 1) * self.run]
                                    for r in range(self.rows))
                if got != want:
                    raise SystemExit(f"{how}: matrix {i} node {j}: segment bytes differ from the source")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--rows", type=int, default=1792)
    p.add_argument("--row-bytes", type=int, default=1024)
    p.add_argument("--mib", type=int, default=128, help="source bytes per way and round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--shm-dir", default="/dev/shm")
    a = p.parse_args(argv)
    if a.nodes < 1 or a.row_bytes % a.nodes or a.rows < 1:
        p.error("--row-bytes must be a positive multiple of --nodes, --rows positive")
    mats = max(1, (a.mib << 20) // (a.rows * a.row_bytes))
    with tempfile.NamedTemporaryFile(prefix="ktnuma-gather-bench.") as tmp:
        total = mats * a.rows * a.row_bytes
        for off in range(0, total, 1 << 20):
            tmp.write(os.urandom(min(1 << 20, total - off)))
        tmp.flush()
        c = Case(tmp.name, a.nodes, a.rows, a.row_bytes, mats, a.shm_dir)
        while os.read(c.fd, 1 << 24):  # into the page cache
            pass
        ways: dict[str, Callable[[list[int], list[str]], None]] = {
            "worker": c.worker, "scatter": c.scatter, "mmap": c.mapping, "sendfile": c.sendfile}
        res: dict[str, list[float]] = {k: [] for k in ways}
        for r in range(a.rounds):
            order = list(ways) if r % 2 == 0 else list(ways)[::-1]
            for how in order:
                fds, names = c.segments()
                try:
                    t0 = time.thread_time()
                    ways[how](fds, names)
                    res[how].append(time.thread_time() - t0)
                    if r == 0:
                        c.check(how, fds)
                finally:
                    for name in names:
                        os.unlink(os.path.join(a.shm_dir, name))
                    for fd in fds:
                        os.close(fd)
        os.close(c.fd)
    floor = statistics.median(res["sendfile"])
    mib = total / 2**20
    for how, v in res.items():
        m = statistics.median(v)
        print(f"{how:9} {m * 1e3:7.1f} ms CPU  {mib / 1024 / m:5.2f} GiB/s  x{m / floor:.2f} sendfile  "
              f"({a.nodes} nodes, {a.row_bytes // a.nodes} B runs, {mib:.0f} MiB, median of {a.rounds})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
