"""``--verify``: per-piece CRC-32 checksums from the source and from the segment.

`launch --verify` computes, for every staged piece (one expert's slice of one stacked array), the
CRC-32 (``zlib.crc32``) of the bytes the plan says it must hold -- read from the source files the
plan's way (contiguous run or strided rows) and converted like the worker converts -- and of the
bytes actually in the segment; any difference fails the run (exit 4). The checksums are recorded
in the manifest as one optional top-level key, parallel to ``arrays`` (the array records stay exactly
what the planner writes, so a re-plan still compares equal)::

    "checksums": {"algo": "crc32",
                  "arrays": [[crc of expert first, crc of first+1, ...]   # arrays[0]: `count` ints
                             , ...]}                                      # one list per arrays record

With the run's topology it also checks placement: each segment's memory-policy ranges (the plan's
``policy``, else the whole segment bound to its node) against the policy the segment carries and the
node of every page (:func:`check_placement`).
An engine's ``attach(verify=True)`` rechecks them with :func:`check` (or :func:`check_manifest`,
which maps the segments itself) -- no source re-read needed.
Imports only the standard library (numpy lazily, through the conversions).
"""
from __future__ import annotations

import logging
import os
import zlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ktnuma.host import shm
from ktnuma.errors import VerifyFailed

log = logging.getLogger(__name__)

ALGO = "crc32"
KEY = "checksums"  # the optional top-level manifest key

ArrayKey = tuple[int, int, str, str]  # (layer, node, proj, kind)


def crc(data: Any) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def source_piece(a, k: int, fds: Mapping[int, int]) -> bytes:
    """The bytes piece ``k`` of ArrayPlan ``a`` must hold: read the plan's way, then converted."""
    fd = fds[a.files[k]]
    off = a.src_offsets[k]
    if a.rows == 1 or a.run == a.src_stride:
        src = os.pread(fd, a.rows * a.run, off)
    else:
        src = b"".join(os.pread(fd, a.run, off + r * a.src_stride) for r in range(a.rows))
    if len(src) != a.rows * a.run:
        raise VerifyFailed(f"verify=True: source file ended early reading layer {a.layer} {a.proj} {a.kind} "
                           f"expert {a.first + k} (was it changed?)")
    if a.conversion:
        from ktnuma.index.dtypes import convert, transposes

        out = bytearray(a.stride)  # a transposing conversion turns the piece's rows (staged columns) into rows
        convert(a.conversion, src, memoryview(out), a.shape[-1] if transposes(a.conversion) else a.rows)
        return bytes(out)
    return src


def source_checksums(plan) -> dict[ArrayKey, list[int]]:
    """CRC-32 of every piece of the plan, computed from the source files."""
    out: dict[ArrayKey, list[int]] = {}
    fds = {i: os.open(p, os.O_RDONLY | os.O_CLOEXEC) for i, p in enumerate(plan.files)}
    try:
        for s in plan.segments:
            for a in s.arrays:
                out[(a.layer, a.node, a.proj, a.kind)] = [crc(source_piece(a, k, fds)) for k in range(a.count)]
    finally:
        for fd in fds.values():
            os.close(fd)
    return out


def buffer_checksums(buf: Any, offset: int, stride: int, count: int) -> list[int]:
    mv = memoryview(buf)
    try:
        return [crc(mv[offset + k * stride:offset + (k + 1) * stride]) for k in range(count)]
    finally:
        mv.release()


def _map(name: str, size: int, shm_dir: str | None):
    fd = shm.open_segment(name, shm_dir)
    try:
        return shm.map_fd(fd, size, write=False)
    finally:
        os.close(fd)


def check_placement(mm: Any, name: str, ranges: Iterable[Any], real_of: Mapping[int, int]) -> None:
    """Each policy range of segment ``name`` (mapped as ``mm``) against its intent: the segment's
    policy at the range's first and last page is its mode over its nodes' real nodes
    (get_mempolicy(MPOL_F_ADDR)), and every page of it is on one of those real nodes (move_pages).
    VerifyFailed naming the range otherwise."""
    from ktnuma.host import numa
    from ktnuma.stage.worker_io import populate

    populate(mm, numa.PAGE_SIZE)  # pages mapped here, so move_pages sees them
    addr = numa.address_of(mm)
    for r in ranges:
        want = tuple(sorted({real_of[n] for n in r.nodes}))
        what = f"verify=True: segment {name} bytes [{r.start}, {r.stop}) ({r.mode} over nodes {list(r.nodes)})"
        for at in {r.start, (r.stop - 1) // numa.PAGE_SIZE * numa.PAGE_SIZE}:
            mode, nodes = numa.policy_at(addr + at)
            if (mode, nodes) != (numa.MODES[r.mode], want):
                raise VerifyFailed(f"{what}: the policy at byte {at} is {numa.mempolicy_name(mode)} over real "
                                   f"nodes {list(nodes)}, not {r.mode} over {list(want)}")
        got = numa.placement(addr + r.start, r.stop - r.start)
        off = {k: v for k, v in got.items() if k == "absent" or int(k) not in want}
        if off:
            raise VerifyFailed(f"{what}: pages {off} are not on real node(s) {list(want)} (placement {got})")


def verify_run(plan, run_id: str, shm_dir: str | None, topology: Any = None) -> dict[ArrayKey, list[int]]:
    """Checksum every piece from the source and from its segment; raise VerifyFailed on the first
    difference (naming segment, layer, proj, kind, expert); with ``topology`` (its nodes' real
    nodes) also :func:`check_placement` of every segment's ranges; return the checksums."""
    sums = source_checksums(plan)
    real_of = {n.id: n.real_node for n in topology.nodes} if topology is not None else None
    for s in plan.segments:
        name = shm.segment_name(run_id, s.layer, s.node)
        mm = _map(name, s.size, shm_dir)
        try:
            if real_of is not None:
                check_placement(mm, name, s.ranges(), real_of)
            for a in s.arrays:
                got = buffer_checksums(mm, a.offset, a.stride, a.count)
                want = sums[(a.layer, a.node, a.proj, a.kind)]
                for k, (g, w) in enumerate(zip(got, want)):
                    if g != w:
                        raise VerifyFailed(f"verify=True: segment {name} layer {a.layer} {a.proj} {a.kind} expert "
                                           f"{a.first + k} differs from the source (crc32 {g:08x}, source {w:08x})")
        finally:
            mm.close()
    log.info("verified %d pieces of run %s against the source", sum(len(v) for v in sums.values()), run_id)
    return sums


def add_to_manifest(manifest: dict, sums: Mapping[ArrayKey, list[int]]) -> dict:
    """Record the checksums in the manifest, parallel to its array records (in place; returns it)."""
    manifest[KEY] = {"algo": ALGO, "arrays": [list(sums[(r["layer"], r["node"], r["proj"], r["kind"])])
                                              for r in manifest["arrays"]]}
    return manifest


def recorded(manifest: Mapping[str, Any]) -> list[list[int]] | None:
    """The manifest's per-array checksum lists (None if it was staged without --verify)."""
    c = manifest.get(KEY)
    if not isinstance(c, dict) or c.get("algo") != ALGO or not isinstance(c.get("arrays"), list) \
            or len(c["arrays"]) != len(manifest["arrays"]):
        return None
    return c["arrays"]


def check(manifest: Mapping[str, Any], buffer_of: Callable[[str], Any],
          layers: Iterable[int] | None = None) -> int:
    """Recheck the recorded checksums against the segments (``buffer_of(segment name)`` -> a buffer
    holding the whole segment), optionally only of some layers. Raises VerifyFailed if the manifest
    has none or a piece differs; returns the number of pieces checked."""
    sums = recorded(manifest)
    if sums is None:
        raise VerifyFailed(f"manifest of run {manifest.get('run_id')} has no {ALGO} checksums "
                           "(staged without verify=True)")
    only = None if layers is None else set(layers)
    n = 0
    for r, want in zip(manifest["arrays"], sums):
        if only is not None and r["layer"] not in only:
            continue
        if not isinstance(want, list) or len(want) != r["experts"][1]:
            raise VerifyFailed(f"manifest array layer {r['layer']} node {r['node']} {r['proj']} {r['kind']} "
                               f"has no {KEY} list of {r['experts'][1]} pieces")
        got = buffer_checksums(buffer_of(r["segment"]), r["offset"], r["stride"], r["experts"][1])
        for k, (g, w) in enumerate(zip(got, want)):
            if g != w:
                raise VerifyFailed(f"segment {r['segment']} layer {r['layer']} {r['proj']} {r['kind']} expert "
                                   f"{r['experts'][0] + k} does not match its recorded {ALGO} "
                                   f"({g:08x}, recorded {w:08x}); the segment was modified")
        n += len(want)
    return n


def check_manifest(manifest_path: str) -> int:
    """Map every segment of a published manifest read-only and :func:`check` it."""
    from ktnuma.stage.manifest import load

    m = load(manifest_path)
    shm_dir = shm.resolve_dir(m["shm_dir"])
    maps = {}
    try:
        for s in m["segments"]:
            maps[s["name"]] = _map(s["name"], s["size"], shm_dir)
        return check(m, maps.__getitem__)
    finally:
        for mm in maps.values():
            mm.close()
