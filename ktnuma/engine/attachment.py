"""Engine side: `ktnuma.attach(manifest)` -> zero-copy views of a published run's segments.

    with ktnuma.attach("ktnuma-<run_id>.json") as att:
        w = att.array(1, "gate", "weight", 0)      # numpy [count, *shape] view of node 0's gate weights
        t = att.torch(1, "gate", "weight", 0)      # the same as a torch tensor (bf16 as torch.bfloat16)
        rows = att.pointers(1, "gate", "weight")   # [[address of expert e's piece] per node], 0 = not held

Attaching reads the manifest through the one validation (``ktnuma.stage.manifest_check``: types,
names of the run, every record inside its segment, experts inside ``num_experts``; a named
refusal, exit 2, before any view or pointer exists), checks that every segment is a regular file
of the recorded size owned by the current user, and (unless ``check_source=False``) that the model
files still have the recorded size and mtime; then it maps each segment (read-only unless
``writable=True``). It reads none of the data. ``verify=True`` additionally re-plans the model and
compares every staged byte with the source (slow: reads everything). The dtypes of the views and
their lifetime: ``ktnuma.engine.views``. Addresses from ``pointers()`` are valid only while the
Attached is open.
"""
from __future__ import annotations

import os
from typing import Any

from ktnuma.engine.views import ArrayRecord, LayerView, SegmentViews, map_segment  # noqa: F401
from ktnuma.errors import (AttachError, KtnumaError, Released, SegmentMismatch, SegmentMissing,  # noqa: F401
                           SourceChanged)
from ktnuma.host import shm


class Attached(SegmentViews):
    """A published run, mapped. Context manager; see the module doc."""

    def __init__(self, manifest_path: str, manifest: dict, *, writable: bool) -> None:
        self.path = os.path.abspath(manifest_path)
        self.manifest = manifest
        self.run_id: str = manifest["run_id"]
        shm_dir = shm.resolve_dir(manifest["shm_dir"])
        super().__init__((ArrayRecord.from_json(r) for r in manifest["arrays"]),
                         [n["id"] for n in manifest["topology"]["nodes"]],
                         fmt=manifest["model"]["format"], split=manifest["split"], config=manifest["config"],
                         shm_dir=shm_dir, writable=writable, where=f"{self.path}: ")
        try:
            for s in manifest["segments"]:
                self.map(s["name"], int(s["size"]))
            names = {s["name"] for s in manifest["segments"]}
            stray = sorted({r.segment for recs in self._by_layer.values() for r in recs} - names)
            if stray:
                raise AttachError(f"{self.path}: arrays name segments not in the manifest: {stray[:3]}")
        except BaseException:
            self.close()
            raise

    # layer-first signatures of the contract (SegmentViews already has them); aliases for clarity
    def __enter__(self) -> "Attached":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<Attached run {self.run_id} {self.format} {self.split} layers {list(self.layers)} "
                f"nodes {list(self.nodes)}{' closed' if self.closed else ''}>")


def _check_source(path: str, m: dict) -> None:
    for f in m["model"]["files"]:
        try:
            st = os.stat(f["path"])
        except FileNotFoundError:
            raise SourceChanged(f"{path}: model file {f['path']} is gone since staging "
                                "(pass check_source=False to attach anyway)") from None
        if st.st_size != f["size"] or st.st_mtime_ns != f["mtime_ns"]:
            raise SourceChanged(f"{path}: model file {f['path']} changed since staging (size {st.st_size} vs "
                                f"{f['size']}, mtime_ns {st.st_mtime_ns} vs {f['mtime_ns']}); stage it again "
                                "or pass check_source=False")


def _verify(path: str, m: dict) -> None:
    """Re-plan the model for the manifest's topology and check the layout, then every staged byte:
    against the checksums `launch --verify` recorded, or else against the source itself."""
    from ktnuma.index.experts import index_model
    from ktnuma.plan.planner import manifest_arrays, plan as make_plan
    from ktnuma.stage.verify import check_manifest, recorded, verify_run

    index = index_model(m["model"]["path"], format=m["model"]["format"], layers=m["config"]["layers"])
    node_ids = [n["id"] for n in m["topology"]["nodes"]]
    p = make_plan(index, node_ids, m["split"])
    expected = manifest_arrays(p, lambda layer, node: shm.segment_name(m["run_id"], layer, node))
    if expected != m["arrays"]:
        raise AttachError(f"{path}: the manifest's arrays do not match a fresh plan of {m['model']['path']}")
    try:
        if recorded(m) is not None:
            check_manifest(path)
        else:
            verify_run(p, m["run_id"], shm.resolve_dir(m["shm_dir"]))
    except KtnumaError as exc:
        raise AttachError(f"{path}: {exc}") from None


def attach(manifest_path: str | os.PathLike[str], *, writable: bool = False, verify: bool = False,
           check_source: bool = True) -> Attached:
    """Map a published run's segments (see the module doc). Raises AttachError (exit 2) naming the
    manifest and the reason: wrong version, a missing / resized / foreign segment, a changed model file."""
    from ktnuma.stage.manifest import load

    path = os.fspath(manifest_path)
    m = load(path)
    if check_source:
        _check_source(path, m)
    if verify:
        _verify(path, m)
    return Attached(path, m, writable=writable)
