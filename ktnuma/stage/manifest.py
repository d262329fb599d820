"""The manifest: one JSON file per published run (design "Manifest" contract).

Published atomically: written to a temp file in the same directory (mode 0600), fsynced,
``os.replace``d over the target, directory fsynced. Only complete runs publish one.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from ktnuma.host import shm
from ktnuma.errors import ManifestError

VERSION = 1
REQUIRED_KEYS = ("ktnuma_manifest", "run_id", "owner", "split", "shm_dir", "model", "config",
                 "topology", "segments", "arrays")


def proc_start_time(pid: int | None = None) -> int | None:
    """Field 22 of /proc/<pid>/stat (clock ticks since boot): with the pid, names a process uniquely."""
    try:
        with open(f"/proc/{pid or os.getpid()}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    rest = data[data.rindex(b")") + 2:].split()  # the command name may hold spaces and parens
    return int(rest[19])


def topology_record(topology) -> dict:
    if hasattr(topology, "as_manifest"):
        return topology.as_manifest()
    return {"simulated": bool(getattr(topology, "simulated", False)),
            "nodes": [{"id": n.id, "cpus": list(n.cpus)} for n in topology.nodes]}


def build(index, topology, plan, result, *, run_id: str, shm_dir: str | None,
          owner_pid: int | None = None) -> dict[str, Any]:
    """The manifest dict of a completed run (`result`: coordinator.StageResult)."""
    from ktnuma.plan.planner import manifest_arrays

    pid = owner_pid or os.getpid()
    placements = {s.name: s.placement for s in result.segments}
    segments = []
    for s in plan.segments:
        name = shm.segment_name(run_id, s.layer, s.node)
        segments.append({"name": name, "layer": s.layer, "node": s.node, "size": s.size,
                         "placement": placements.get(name)})
    return {
        "ktnuma_manifest": VERSION,
        "run_id": run_id,
        "owner": {"pid": pid, "start_time": proc_start_time(pid)},
        "split": plan.split,
        "shm_dir": shm.norm_dir(shm_dir),
        "model": {"path": os.path.abspath(index.root), "format": index.format, "naming": index.naming,
                  "files": [{"path": f.path, "size": f.size, "mtime_ns": f.mtime_ns}
                            for f in index.files],
                  "notes": dict(index.notes)},  # how the format was staged (docs/formats.md)
        "config": index.config.as_manifest(),
        "topology": topology_record(topology),
        "segments": segments,
        "arrays": manifest_arrays(plan, lambda layer, node: shm.segment_name(run_id, layer, node)),
    }


def write_atomic(path: str, data: bytes, mode: int = 0o600) -> None:
    """temp file in the same dir (mode), fsync, os.replace, fsync the directory."""
    path = os.path.abspath(path)
    d = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".ktnuma-", suffix=".tmp", dir=d)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:
        dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:  # pragma: no cover - some filesystems refuse directory fsync
        pass


def publish(manifest: dict, path: str) -> str:
    """Write the manifest atomically at `path`; returns the absolute path."""
    path = os.path.abspath(path)
    write_atomic(path, json.dumps(manifest, separators=(",", ":")).encode() + b"\n")
    return path


def load(path: str) -> dict[str, Any]:
    """Read and check a manifest (version, required keys)."""
    try:
        with open(path, "rb") as f:
            m = json.load(f)
    except FileNotFoundError:
        raise ManifestError(f"{path}: no such manifest") from None
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{path}: not a readable ktnuma manifest ({exc})") from None
    if not isinstance(m, dict) or "ktnuma_manifest" not in m:
        raise ManifestError(f"{path}: not a ktnuma manifest (no 'ktnuma_manifest' key)")
    if m["ktnuma_manifest"] != VERSION:
        raise ManifestError(f"{path}: manifest version {m['ktnuma_manifest']!r}, this ktnuma reads {VERSION}")
    missing = [k for k in REQUIRED_KEYS if k not in m]
    if missing:
        raise ManifestError(f"{path}: manifest lacks keys {', '.join(missing)}")
    for s in m["segments"]:
        if "/" in s["name"] or not s["name"].startswith(shm.PREFIX):
            raise ManifestError(f"{path}: bad segment name {s['name']!r}")
    return m
