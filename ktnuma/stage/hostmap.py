"""Multi-host: which experts each rank (host) stages, and rank 0's global index.

The host map is pure: every rank computes the same contiguous expert blocks (the remainder to
the lowest ranks) or validates the same ``--host-experts`` map, and restricts its model index to
its own block. The global index ``<manifest stem>.global.json`` lists every rank's manifest.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from ktnuma.errors import BadInput
from ktnuma.index.model import ModelIndex

GLOBAL_VERSION = 1


def expert_span(index: ModelIndex) -> tuple[int, int]:
    """[first, stop) of the experts every piece group of the index covers."""
    spans = {(g.first, g.first + g.count) for g in index.groups}
    if len(spans) != 1:
        raise BadInput(f"{index.root}: layers hold different expert ranges {sorted(spans)}; "
                       "cannot split them across hosts")
    return spans.pop()


def host_blocks(first: int, stop: int, world: int) -> list[tuple[int, int]]:
    """Contiguous [first, stop) expert blocks per rank, the remainder to the lowest ranks."""
    from ktnuma.plan.planner import ep_blocks

    if stop - first < world:
        raise BadInput(f"{world} ranks but only {stop - first} experts: every host needs at least one "
                       "expert; use fewer hosts")
    return [(first + lo, first + hi) for lo, hi in ep_blocks(stop - first, world)]


def parse_host_map(data: Any, world: int, first: int, stop: int, where: str = "host map") -> list[tuple[int, int]]:
    """Validate an explicit host map (see add_arguments) into [first, stop) per rank.

    Each rank's range must be contiguous and non-empty; together they must cover
    [first, stop) exactly once (any rank order)."""
    if isinstance(data, dict):
        try:
            keyed = {int(k): v for k, v in data.items()}
        except ValueError:
            raise BadInput(f"{where}: keys must be rank numbers, got {sorted(data)}") from None
        if sorted(keyed) != list(range(world)):
            raise BadInput(f"{where}: ranks {sorted(keyed)} given, world size is {world} "
                           f"(need ranks 0..{world - 1})")
        entries = [keyed[r] for r in range(world)]
    elif isinstance(data, list):
        if len(data) != world:
            raise BadInput(f"{where}: {len(data)} entries, world size is {world}")
        entries = data
    else:
        raise BadInput(f"{where}: expected a JSON list or object, got {type(data).__name__}")
    out: list[tuple[int, int]] = []
    for r, e in enumerate(entries):
        if isinstance(e, dict) and isinstance(e.get("experts"), list):
            ids = e["experts"]
            if not ids or not all(isinstance(x, int) and not isinstance(x, bool) for x in ids):
                raise BadInput(f"{where}: rank {r}: 'experts' must be a non-empty list of expert numbers")
            if ids != list(range(ids[0], ids[0] + len(ids))):
                raise BadInput(f"{where}: rank {r}: experts {ids[:8]}{'...' if len(ids) > 8 else ''} are not "
                               "contiguous; each host must hold one contiguous range")
            lo, hi = ids[0], ids[0] + len(ids)
        elif (isinstance(e, list) and len(e) == 2
              and all(isinstance(x, int) and not isinstance(x, bool) for x in e)):
            lo, hi = e[0], e[0] + e[1]
            if e[1] < 1:
                raise BadInput(f"{where}: rank {r}: [first, count] = {e} holds no expert")
        else:
            raise BadInput(f"{where}: rank {r}: expected [first, count] or {{\"experts\": [...]}}, got {e!r}")
        if lo < first or hi > stop:
            raise BadInput(f"{where}: rank {r}: experts [{lo}, {hi}) outside the model's [{first}, {stop})")
        out.append((lo, hi))
    pos = first
    for lo, hi in sorted(out):
        if lo != pos:
            r = out.index((lo, hi))
            what = f"experts [{pos}, {lo}) are on no host" if lo > pos else \
                f"rank {r}'s experts [{lo}, {min(hi, pos)}) are also on another host"
            raise BadInput(f"{where}: not a contiguous cover of experts [{first}, {stop}): {what}")
        pos = hi
    if pos != stop:
        raise BadInput(f"{where}: not a contiguous cover of experts [{first}, {stop}): "
                       f"experts [{pos}, {stop}) are on no host")
    return out


def load_host_map(path: str, world: int, first: int, stop: int) -> list[tuple[int, int]]:
    from ktnuma.index import bounded

    try:
        data = bounded.read(path, limit=16 << 20)
    except FileNotFoundError:
        raise BadInput(f"host_experts={path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise BadInput(f"host_experts={path}: not readable JSON ({exc})") from None
    return parse_host_map(data, world, first, stop, where=f"host_experts={path}")


def restrict_experts(index: ModelIndex, first: int, stop: int) -> ModelIndex:
    """The index with every piece group cut to experts [first, stop) (``first`` set to ``first``).

    Pure: the planner then plans only these experts, and the manifest's ``experts`` ranges carry
    the global expert numbers; ``config`` (num_experts) stays the model's."""
    if stop <= first:
        raise BadInput(f"experts [{first}, {stop}): empty range")
    groups = []
    for g in index.groups:
        lo, hi = first - g.first, stop - g.first
        if lo < 0 or hi > g.count:
            raise BadInput(f"experts [{first}, {stop}) outside layer {g.layer} {g.proj} {g.kind}'s "
                           f"[{g.first}, {g.first + g.count})")
        tensors = g.tensors[lo:hi] if len(g.tensors) == g.count else g.tensors
        groups.append(replace(g, files=g.files[lo:hi], offsets=g.offsets[lo:hi], tensors=tensors, first=first))
    return replace(index, groups=tuple(groups))


def global_path(manifest_path: str) -> str:
    stem, _ = os.path.splitext(os.path.abspath(manifest_path))
    return stem + ".global.json"


def write_global(manifest_path: str, reports: Sequence[Any], plan: dict | None = None) -> str:
    """Rank 0's ``<manifest stem>.global.json``: world size and each rank's host, manifest, experts
    (``[first, count]`` as in the manifest's arrays), plus the model's format and expert count."""
    plan = plan or {}
    from ktnuma.stage.manifest import write_atomic

    path = global_path(manifest_path)
    doc = {"ktnuma_global": GLOBAL_VERSION, "world_size": len(reports), "format": plan.get("format"),
           "num_experts": plan.get("num_experts"), "layers": plan.get("layers"),
           "ranks": [{"rank": r.rank, "host": r.host, "manifest": r.info["manifest"],
                      "run_id": r.info["run_id"],
                      "experts": [r.experts[0], r.experts[1] - r.experts[0]]}
                     for r in sorted(reports, key=lambda r: r.rank)]}
    write_atomic(path, json.dumps(doc, indent=1).encode() + b"\n")
    return path
