#!/usr/bin/env python3
"""Placement check, numpy-free (imports are slow inside the TCG VM).

    python3 scripts/vm/placement_check.py [--mib N] [--nodes 0,1]

For each node (default: every real node) a child process pinned to that node's CPUs creates a POSIX
shm segment (posix_ipc, O_CREX, 0600), mmaps it, mbinds it to its node, posix_fallocates it, writes a
per-node byte pattern and reports ``numa.placement()``. The children run at the same time. With two or
more nodes, a control segment is written unbound by a child pinned to the first node (it must not land
on another node), and a "cross" segment is written from the first node's CPUs but bound to the second
node (all its pages must be there: proves mbind, not local allocation, placed them). The parent then
maps every segment itself, compares its bytes with the pattern and reads placement back (the pages
are the ones the children placed). Prints one JSON line and exits 0 only if every bound segment has
100% of its pages on its node and the control has none on any other node. Removes its segments.
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import posix_ipc  # noqa: E402

from ktnuma.host import numa  # noqa: E402


def pattern(tag: int, size: int) -> bytes:
    unit = bytes((tag * 37 + i) & 0xFF for i in range(251))  # period 251: not page-aligned
    return (unit * (size // len(unit) + 1))[:size]


def child(name: str, size: int, cpu_node: int, bind: int | None, tag: int) -> dict:
    numa.pin_cpus(numa.node_cpus(cpu_node))
    shm = posix_ipc.SharedMemory("/" + name, posix_ipc.O_CREX, mode=0o600, size=size)
    try:
        with mmap.mmap(shm.fd, size) as m:
            addr = numa.address_of(m)
            if bind is not None:
                numa.mbind(addr, size, bind)
            os.posix_fallocate(shm.fd, 0, size)
            m[:] = pattern(tag, size)
            return {"name": name, "cpu_node": cpu_node, "bound_to": bind, "cpus": sorted(os.sched_getaffinity(0)),
                    "placement": numa.placement(addr, size)}
    finally:
        shm.close_fd()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=16)
    ap.add_argument("--nodes", default=None, help="comma-separated real node ids (default: all)")
    ap.add_argument("--child", nargs=4, metavar=("NAME", "CPU_NODE", "BIND_NODE", "TAG"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    size = args.mib << 20
    if args.child:
        name, cpu_node, bind, tag = args.child
        print(json.dumps(child(name, size, int(cpu_node), None if bind == "-" else int(bind), int(tag))),
              flush=True)
        return 0

    t0 = time.monotonic()
    nodes = [int(n) for n in args.nodes.split(",")] if args.nodes else list(numa.real_nodes())
    run = f"ktnuma.check{os.getpid()}"
    # (segment, node whose CPUs write it, node it is bound to or None, pattern tag)
    jobs: list[tuple[str, int, int | None, int]] = [(f"{run}.n{n}", n, n, n) for n in nodes]
    if len(nodes) >= 2:
        jobs.append((f"{run}.control", nodes[0], None, 99))  # unbound: must stay off the other nodes
        jobs.append((f"{run}.cross", nodes[0], nodes[1], 98))  # bound away from the writer's node
    report: dict = {"real_nodes": list(numa.real_nodes()), "mib": args.mib, "segments": []}
    ok = True
    try:
        procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--mib", str(args.mib),
                                   "--child", name, str(node), "-" if bind is None else str(bind),
                                   str(tag)],
                                  stdout=subprocess.PIPE, text=True) for name, node, bind, tag in jobs]
        results = []
        for p in procs:
            out, _ = p.communicate()
            if p.returncode != 0:
                raise SystemExit(f"child {p.args[-4:]} failed with exit {p.returncode}")
            results.append(json.loads(out))
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        for (name, node, bind, tag), res in zip(jobs, results):
            shm = posix_ipc.SharedMemory("/" + name)
            try:
                with mmap.mmap(shm.fd, size, prot=mmap.PROT_READ) as m:
                    same = m[:] == pattern(tag, size)  # also maps every page into this process
                    seen = numa.placement(numa.address_of(m), size)
            finally:
                shm.close_fd()
            if bind is not None:
                good = res["placement"] == {str(bind): pages} and seen == {str(bind): pages}
            else:
                good = all(k in ("absent", str(node)) for k in seen) and sum(seen.values()) == pages
            ok &= good and same
            report["segments"].append({**res, "pages": pages, "placement_seen_by_parent": seen,
                                       "bytes_match": same, "ok": good and same})
    finally:
        for name, *_ in jobs:
            try:
                posix_ipc.unlink_shared_memory("/" + name)
            except posix_ipc.ExistentialError:
                pass
    report["ok"] = ok
    report["seconds"] = round(time.monotonic() - t0, 2)
    print(json.dumps(report), flush=True)
    for s in report["segments"]:
        kind = "unbound" if s["bound_to"] is None else f"bound to node {s['bound_to']}"
        print(f"{s['name']}: {kind}, written from node {s['cpu_node']}: {s['pages']} pages, placement {s['placement']}, "
              f"seen by parent {s['placement_seen_by_parent']}, bytes match {s['bytes_match']}",
              file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
