"""The manifest: one JSON file per published run (design "Manifest" contract).

Published without replace: written to ``.<name>.<run_id>.tmp`` in the same directory (mode 0600,
O_EXCL), fsynced, hard-linked to the target (``link`` fails if the target exists: two runs never
silently overwrite each other; :class:`~ktnuma.errors.ManifestExists`), the temp name unlinked,
the directory fsynced. The temp name is derived from the target and the run id, so ``cleanup``
removes the one a killed publisher left. :func:`unlink_if_ours` removes a manifest only while it
still carries the caller's run id. :func:`load` reads and validates (``manifest_check``).
Only complete runs publish one.
"""
from __future__ import annotations

import json
import logging
import os
import stat
from typing import Any

from ktnuma.errors import ManifestError, ManifestExists, ManifestMalformed, ManifestNotTrusted
from ktnuma.host import shm
from ktnuma.index import bounded
# ktnuma.stage.manifest_check (the validation) only in load(): a launch, which builds and publishes,
# never imports it (start-up time)

VERSION = 1
LIMIT = 256 << 20  # bytes of a manifest file (a DeepSeek-V3 run with --verify checksums is ~10 MB)
POLICY_KEY = "policy"  # optional per segment: its intended per-range memory policy (docs/manifest.md)
REQUIRED_KEYS = ("ktnuma_manifest", "run_id", "owner", "split", "shm_dir", "model", "config",
                 "topology", "segments", "arrays")

__all__ = ["ManifestError", "REQUIRED_KEYS", "VERSION", "build", "load", "publish", "read_raw",
           "trust", "tmp_path", "unlink_if_ours", "write_atomic", "proc_start_time"]
log = logging.getLogger(__name__)


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
        rec = {"name": name, "layer": s.layer, "node": s.node, "size": s.size, "placement": placements.get(name)}
        if s.policy:  # the intended per-range placement (split tp-whole); absent: all bound to `node`
            rec[POLICY_KEY] = [[r.start, r.stop, r.mode, list(r.nodes)] for r in s.policy]
        segments.append(rec)
    return {
        "ktnuma_manifest": VERSION,
        "run_id": run_id,
        "owner": {"pid": pid, "start_time": proc_start_time(pid)},
        "split": plan.split,
        "shm_dir": shm.norm_dir(shm_dir),
        "model": {"path": os.path.abspath(index.root), "format": index.format, "naming": index.naming,
                  "files": [{"path": f.path, "size": f.size, "mtime_ns": f.mtime_ns}
                            for f in index.files],
                  # how the format was staged (docs/formats.md), and the split's notes (placement)
                  "notes": {**dict(index.notes), **dict(plan.notes)}},
        "config": index.config.as_manifest(),
        "topology": topology_record(topology),
        "segments": segments,
        "arrays": _with_globals(manifest_arrays(plan, lambda layer, node: shm.segment_name(run_id, layer, node)),
                                index),
    }


def _with_globals(arrays: list[dict], index) -> list[dict]:
    """NVFP4: a scale record's `global_scale` lists its experts' per-tensor f32 scales (model.notes says how
    they fold into the scales an engine takes)."""
    by_key = {(g.layer, g.proj, g.kind): g for g in index.groups if g.globals}
    for r in arrays:
        g = by_key.get((r["layer"], r["proj"], r["kind"]))
        if g is not None:
            lo = r["experts"][0] - g.first
            r["global_scale"] = list(g.globals[lo:lo + r["experts"][1]])
    return arrays


def tmp_path(path: str, run_id: str) -> str:
    """The temp file a run publishes ``path`` through (cleanup finds a stale one by this name)."""
    path = os.path.abspath(path)
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{run_id}.tmp")


def _write_tmp(tmp: str, data: bytes, mode: int) -> None:
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        _unlink_quiet(tmp)
        raise


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _fsync_dir(d: str) -> None:
    try:
        dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:  # pragma: no cover - some filesystems refuse directory fsync
        pass


def write_atomic(path: str, data: bytes, mode: int = 0o600, *, tmp: str | None = None) -> None:
    """Write ``tmp`` (default ``.<name>.<pid>.tmp`` beside ``path``; O_EXCL, mode, fsync), then
    os.replace it over ``path`` and fsync the directory. For files ktnuma owns outright (registry
    entries, the global index); manifests use :func:`publish` (no replace)."""
    path = os.path.abspath(path)
    tmp = tmp or os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")
    _write_tmp(tmp, data, mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        _unlink_quiet(tmp)
        raise
    _fsync_dir(os.path.dirname(path))


def publish(manifest: dict, path: str) -> str:
    """Publish the manifest at ``path`` without replacing anything; returns the absolute path.
    ManifestExists if ``path`` exists (nothing is left behind)."""
    path = os.path.abspath(path)
    tmp = tmp_path(path, manifest["run_id"])
    _write_tmp(tmp, json.dumps(manifest, separators=(",", ":")).encode() + b"\n", 0o600)
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise ManifestExists(f"manifest {path} exists (published by another run meanwhile); "
                             "nothing of this run was kept") from None
    finally:
        _unlink_quiet(tmp)
    _fsync_dir(os.path.dirname(path))
    return path


def read_raw(path: str) -> Any:
    """The parsed JSON of a manifest file, bounded (regular file, size, depth, integers), unchecked."""
    try:
        return bounded.read(path, limit=LIMIT)
    except FileNotFoundError:
        raise ManifestError(f"{path}: no such manifest") from None
    except bounded.JSONLimit as exc:
        raise ManifestMalformed(f"{path}: not a readable ktnuma manifest ({exc})") from None
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read the manifest ({exc.strerror})") from None


def load(path: str) -> dict[str, Any]:
    """Read and validate a manifest (manifest_check.check); a named ManifestError otherwise."""
    from ktnuma.stage.manifest_check import check

    return check(read_raw(path), path)


def trust(path: str, force: bool = False) -> None:
    """Refuse a manifest not owned by the caller or writable by group/others (someone else could
    have written what it names), unless ``force``: ManifestNotTrusted saying why."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ManifestError(f"{path}: no such manifest") from None
    except OSError as exc:
        raise ManifestError(f"{path}: cannot stat the manifest ({exc.strerror})") from None
    why = None
    if st.st_uid != os.getuid():
        why = f"is owned by uid {st.st_uid}, not by this user (uid {os.getuid()})"
    elif st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        why = f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    if why and not force:
        raise ManifestNotTrusted(f"{path} {why}: refusing to act on what it names (force=True overrides)")
    if why:
        log.warning("%s %s; going on (forced)", path, why)


def carries(path: str, run_id: str) -> bool:
    """The file at ``path`` is a manifest (bounded read) whose run_id is ``run_id``."""
    try:
        m = bounded.read(path, limit=LIMIT)
    except (OSError, ValueError):
        return False
    return isinstance(m, dict) and m.get("run_id") == run_id


def unlink_if_ours(path: str, run_id: str) -> bool:
    """Unlink ``path`` only while it carries ``run_id``; True if removed. Never raises."""
    try:
        if not carries(path, run_id):
            return False
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False
    except OSError as exc:
        log.warning("cannot remove manifest %s: %s", path, exc)
        return False
