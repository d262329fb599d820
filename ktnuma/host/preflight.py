"""Pre-flight memory check, before the first segment exists: the shm filesystem's free space and each
backing real node's MemAvailable (under MPOL_BIND a full node calls the OOM killer instead of failing)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ktnuma.host import shm
from ktnuma.text import human
from ktnuma.errors import BadInput, NotEnoughMemory


def check_memory(segments: Sequence[Any], topology: Any, shm_dir: str | None, *,
                 what: str = "staging", way_out: str = "stage fewer layers (layers=SPEC)") -> None:
    """`segments` (SegmentPlans: .node, .size) must fit at once; NotEnoughMemory (exit 3) names the numbers."""
    from ktnuma.host.topology import real_mem_available

    need = sum(s.size for s in segments)
    where = shm.norm_dir(shm_dir)
    try:
        free = shm.free_bytes(shm_dir)
    except FileNotFoundError:
        raise BadInput(f"shm_dir={where}: no such directory") from None
    if need > free:
        raise NotEnoughMemory(
            f"{what} needs {human(need)} ({need} bytes) in {len(segments)} segments but {where} has "
            f"{human(free)} free; enlarge it (e.g. `mount -o remount,size={-(-need // 2**30) + 1}G {where}`) "
            f"or use shm_dir=DIR on a larger tmpfs, or {way_out}")
    per_real: dict[int, int] = {}
    real_of = {n.id: n.real_node for n in topology.nodes}
    for s in segments:
        per_real[real_of[s.node]] = per_real.get(real_of[s.node], 0) + s.size
    avail = real_mem_available(topology)
    for r, b in sorted(per_real.items()):
        if b > avail.get(r, 0):
            raise NotEnoughMemory(
                f"{what}: real NUMA node {r} must hold {human(b)} ({b} bytes) of segments but has "
                f"{human(avail.get(r, 0))} available; free memory, use more nodes (nodes=N), or {way_out}")
