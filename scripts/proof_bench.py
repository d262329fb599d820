#!/usr/bin/env python3
"""The placement proof's cost, side by side: map a staged segment's pages, move_pages, unmap.

    python3 scripts/proof_bench.py [--mib 256] [--rounds 5] [--shm-dir /dev/shm]

Each round makes a fresh segment the way a worker does (ftruncate, mbind to node 0, posix_fallocate,
every page but a few written with pwrite: staged segments have unwritten padding) and proves it
twice, in alternating order, each on its own new mapping:
  populate  MADV_POPULATE_READ over the whole mapping, then numa.placement (the former worker code)
  prove     ktnuma.stage.worker_io.prove (MADV_RANDOM, one read per 64 KiB, absent pages one by one)
Prints the median CPU milliseconds (thread time) of mapping + move_pages and of the unmap, and
prove / populate. prove must count every page on node 0 (it maps and asks again for any page
move_pages missed); the script fails otherwise. populate asks once: a page that was being
migrated (memory compaction) right then counts as absent there, which the script reports.
A development tool (never imported by ktnuma).
"""
from __future__ import annotations

import argparse
import mmap
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ktnuma.host import numa  # noqa: E402
from ktnuma.stage.worker_io import populate, prove  # noqa: E402


def make_segment(shm_dir: str, size: int) -> int:
    path = os.path.join(shm_dir, f"ktnuma-proof-bench.{os.getpid()}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.unlink(path)  # the fd keeps it: nothing can be left behind
    os.ftruncate(fd, size)
    mm = mmap.mmap(fd, size)
    numa.mbind(numa.address_of(mm), size, 0)
    mm.close()
    os.posix_fallocate(fd, 0, size)
    chunk = memoryview(os.urandom(1 << 20) * 8)
    holes = sorted({0, size // 2 // 4096, size // 4096 - 1})  # pages never written, as padding is
    start = 0
    for page in holes + [size // 4096]:
        end = page * 4096
        for off in range(start, end, len(chunk)):
            os.pwrite(fd, chunk[:min(len(chunk), end - off)], off)
        start = end + 4096
    return fd


def one(fd: int, size: int, how: str) -> tuple[float, float]:
    mm = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    addr = numa.address_of(mm)
    t0 = time.thread_time()
    if how == "populate":
        populate(mm, numa.PAGE_SIZE)
        got = numa.placement(addr, size)
    else:
        got = prove(mm, addr, size)
    t1 = time.thread_time()
    mm.close()
    t2 = time.thread_time()
    pages = size // numa.PAGE_SIZE
    if how == "prove" and got != {"0": pages} or set(got) - {"0", "absent"}:
        raise SystemExit(f"{how}: placement {got}, expected every one of {pages} pages on node 0")
    if got.get("absent"):  # populate asks once: a page migrated (compaction) right then is missed
        print(f"note: {how} found {got['absent']} of {pages} pages absent", file=sys.stderr)
    return t1 - t0, t2 - t1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--shm-dir", default="/dev/shm")
    a = p.parse_args(argv)
    size = a.mib << 20
    res: dict[str, list[tuple[float, float]]] = {"populate": [], "prove": []}
    for r in range(a.rounds):
        fd = make_segment(a.shm_dir, size)
        try:
            for how in (("populate", "prove") if r % 2 == 0 else ("prove", "populate")):
                res[how].append(one(fd, size, how))
        finally:
            os.close(fd)
    tot = {}
    for how, v in res.items():
        m, u = statistics.median(x[0] for x in v) * 1e3, statistics.median(x[1] for x in v) * 1e3
        tot[how] = m + u
        print(f"{how:9} map+move_pages {m:6.1f} ms  unmap {u:5.1f} ms  total {m + u:6.1f} ms  ({a.mib} MiB, "
              f"median of {a.rounds})")
    print(f"prove / populate: {tot['prove'] / tot['populate']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
