"""The one validation of a manifest read from disk (attach, release, stream, verify use it).

Nothing in a manifest is trusted for an address or a delete until :func:`check` accepted it:

* types: every required key with the contract's type (ints are ints, not bools or floats);
* names: ``run_id`` of the generated form (hex, 16-48 digits) and every segment named exactly
  ``ktnuma.<run_id>.L<layer>.n<node>`` from its own record, each once;
* bounds: every array inside its segment (``offset + (count - 1) * stride + nbytes <= size``),
  its layer/node those of the segment, experts ``[first, first + count)`` inside
  ``[0, num_experts)``, ``stride == nbytes`` (densely packed), ``nbytes`` equal to what ``dtype`` and ``shape``
  give, nodes among ``topology.nodes``, one record per (layer, proj, kind, node);
* placement: a segment's optional ``policy`` ranges cover it exactly in page-aligned steps, with a
  known mode over nodes of ``topology.nodes``;
* size: the file is a regular file of at most :data:`LIMIT` bytes, JSON bounded
  (:mod:`ktnuma.index.bounded`).

A violation is a named :class:`~ktnuma.errors.ManifestError` subclass (exit 2) with the record.
"""
from __future__ import annotations

import os
from typing import Any

from ktnuma.errors import ManifestMalformed, ManifestNames, ManifestOutOfBounds
from ktnuma.host import shm
from ktnuma.index.dtypes import DTYPES, GGML_TYPES
from ktnuma.index.model import KINDS, PROJS
from ktnuma.plan.records import MODES as POLICY_MODES, PAGE as POLICY_PAGE  # the planner's ranges
from ktnuma.plan.splits import SPLITS as _SPLIT_TABLE
from ktnuma.stage.manifest import LIMIT, POLICY_KEY, REQUIRED_KEYS, VERSION  # noqa: F401 - the contract's constants

MAX_EXPERTS = 1 << 16
MAX_SIZE = 1 << 52  # bytes of one segment
MAX_DIM = 1 << 40
MAX_NDIM = 4
SPLITS = tuple(_SPLIT_TABLE)  # the planner's split table is the one list of splits


_JSON_NAMES = {int: "integer", str: "string", list: "array", dict: "object"}


class _Check:
    def __init__(self, path: str) -> None:
        self.path = path

    def bad(self, what: str, why: str, cls: type = ManifestMalformed) -> Exception:
        return cls(f"{self.path}: {what}: {why}")

    def get(self, obj: Any, key: str, typ: type, what: str) -> Any:
        if not isinstance(obj, dict) or key not in obj:
            raise self.bad(what, f"missing key {key!r}")
        v = obj[key]
        if type(v) is not typ:  # exact: a bool is no int, a float no int
            raise self.bad(f"{what}.{key}", f"{v!r:.60} is not a JSON {_JSON_NAMES[typ]}")
        return v

    def int(self, obj: Any, key: str, what: str, lo: int, hi: int, cls: type = ManifestOutOfBounds) -> int:
        v = self.get(obj, key, int, what)
        if not lo <= v <= hi:
            raise self.bad(f"{what}.{key}", f"{v} outside [{lo}, {hi}]", cls)
        return v

    def ints(self, v: Any, what: str, lo: int, hi: int) -> list[int]:
        if not isinstance(v, list) or not all(type(x) is int for x in v):
            raise self.bad(what, f"{v!r:.60} is not a list of integers")
        for x in v:
            if not lo <= x <= hi:
                raise self.bad(what, f"{x} outside [{lo}, {hi}]", ManifestOutOfBounds)
        return v

    def string(self, obj: Any, key: str, what: str) -> str:
        v = self.get(obj, key, str, what)
        if "\0" in v:
            raise self.bad(f"{what}.{key}", "holds a NUL byte")
        return v


def piece_nbytes(dtype: str, shape: list[int]) -> int | None:
    """Bytes of one piece of `dtype` and `shape` as staged; None for an unknown dtype."""
    n = 1
    for d in shape:
        n *= d
    if dtype.startswith("gguf:"):
        t = GGML_TYPES.get(dtype[5:])
        if t is None or shape[-1] % t.block:
            return None
        return n // t.block * t.type_size
    d = DTYPES.get(dtype)
    return None if d is None else n * d.itemsize


def check(m: Any, path: str) -> dict[str, Any]:
    """Validate a parsed manifest (see the module doc); returns it unchanged, or raises."""
    c = _Check(path)
    if not isinstance(m, dict) or "ktnuma_manifest" not in m:
        raise ManifestMalformed(f"{path}: not a ktnuma manifest (no 'ktnuma_manifest' key)")
    if m["ktnuma_manifest"] != VERSION or type(m["ktnuma_manifest"]) is not int:
        raise ManifestMalformed(f"{path}: manifest version {m['ktnuma_manifest']!r:.40}, this ktnuma reads {VERSION}")
    missing = [k for k in REQUIRED_KEYS if k not in m]
    if missing:
        raise ManifestMalformed(f"{path}: manifest lacks keys {', '.join(missing)}")
    run_id = c.get(m, "run_id", str, "manifest")
    if not shm.valid_run_id(run_id):
        raise ManifestNames(f"{path}: run_id {run_id!r:.60} is not a ktnuma run id (16-48 hex digits)")
    owner = c.get(m, "owner", dict, "manifest")
    c.int(owner, "pid", "owner", 1, 1 << 31)
    if owner.get("start_time") is not None:
        c.int(owner, "start_time", "owner", 0, 1 << 62)
    split = c.get(m, "split", str, "manifest")
    if split not in SPLITS:
        raise c.bad("split", f"{split!r:.40} is not one of {', '.join(SPLITS)}")
    d = c.string(m, "shm_dir", "manifest")
    if not os.path.isabs(d) or os.path.normpath(d) != d:
        raise c.bad("shm_dir", f"{d!r:.80} is not a normalised absolute path")
    model = c.get(m, "model", dict, "manifest")
    for k in ("path", "format", "naming"):
        c.string(model, k, "model")
    files = c.get(model, "files", list, "model")
    for i, f in enumerate(files):
        c.string(f, "path", f"model.files[{i}]")
        c.int(f, "size", f"model.files[{i}]", 0, 1 << 62)
        c.int(f, "mtime_ns", f"model.files[{i}]", -(1 << 62), 1 << 62)
    cfg = c.get(m, "config", dict, "manifest")
    num_experts = c.int(cfg, "num_experts", "config", 1, MAX_EXPERTS)
    c.ints(c.get(cfg, "layers", list, "config"), "config.layers", 0, shm.MAX_LAYER)
    topo = c.get(m, "topology", dict, "manifest")
    nodes = c.get(topo, "nodes", list, "topology")
    if not nodes:
        raise c.bad("topology.nodes", "empty")
    node_ids: set[int] = set()
    for i, n in enumerate(nodes):
        nid = c.int(n, "id", f"topology.nodes[{i}]", 0, shm.MAX_NODE)
        c.ints(c.get(n, "cpus", list, f"topology.nodes[{i}]"), f"topology.nodes[{i}].cpus", 0, 1 << 20)
        if nid in node_ids:
            raise c.bad("topology.nodes", f"node {nid} listed twice")
        node_ids.add(nid)
    sizes = _segments(c, m, run_id, node_ids)
    _arrays(c, m, sizes, num_experts)
    return m


def _segments(c: _Check, m: dict, run_id: str, node_ids: set[int]) -> dict[str, tuple[int, int, int]]:
    """name -> (layer, node, size) of every segment record."""
    out: dict[str, tuple[int, int, int]] = {}
    for i, s in enumerate(c.get(m, "segments", list, "manifest")):
        what = f"segments[{i}]"
        name = c.string(s, "name", what)
        layer = c.int(s, "layer", what, 0, shm.MAX_LAYER)
        node = c.int(s, "node", what, 0, shm.MAX_NODE)
        size = c.int(s, "size", what, 1, MAX_SIZE)
        if node not in node_ids:
            raise c.bad(what, f"node {node} is not in topology.nodes", ManifestOutOfBounds)
        if name != shm.segment_name(run_id, layer, node):
            raise ManifestNames(f"{c.path}: {what}: name {name!r:.80} is not "
                                f"{shm.segment_name(run_id, layer, node)!r} (run id, layer and node of the record)")
        if name in out:
            raise ManifestNames(f"{c.path}: {what}: segment {name} listed twice")
        p = s.get("placement")
        if p is not None and not (isinstance(p, dict) and all(type(v) is int for v in p.values())):
            raise c.bad(f"{what}.placement", "not null or an object of page counts")
        _policy(c, s.get(POLICY_KEY), f"{what}.{POLICY_KEY}", size, node_ids)
        out[name] = (layer, node, size)
    return out


def _policy(c: _Check, pol: Any, what: str, size: int, node_ids: set[int]) -> None:
    """null, or [[start, stop, mode, [node, ...]], ...] covering [0, size) in order, starts on page
    boundaries, stops too except the last (== size), mode bind (one node) or interleave, nodes in topology."""
    if pol is None:
        return
    if not isinstance(pol, list) or not pol:
        raise c.bad(what, "not null or a non-empty list of ranges")
    pos = 0
    for k, r in enumerate(pol):
        at = f"{what}[{k}]"
        if not (isinstance(r, list) and len(r) == 4 and type(r[0]) is int and type(r[1]) is int
                and type(r[2]) is str and isinstance(r[3], list)):
            raise c.bad(at, f"{r!r:.60} is not [start, stop, mode, [node, ...]]")
        start, stop, mode, nodes = r
        c.ints(nodes, f"{at} nodes", 0, shm.MAX_NODE)
        if start != pos or stop <= start or start % POLICY_PAGE or (stop % POLICY_PAGE and stop != size):
            raise c.bad(at, f"[{start}, {stop}) does not continue the ranges at {pos} in whole "
                            f"{POLICY_PAGE}-byte pages", ManifestOutOfBounds)
        if stop > size:
            raise c.bad(at, f"[{start}, {stop}) runs past the {size}-byte segment", ManifestOutOfBounds)
        if mode not in POLICY_MODES or not nodes or len(set(nodes)) != len(nodes) \
                or (mode == "bind" and len(nodes) != 1):
            raise c.bad(at, f"{mode!r:.20} over {nodes} is not bind (one node) or interleave (distinct nodes)")
        if not set(nodes) <= node_ids:
            raise c.bad(at, f"nodes {nodes} are not all in topology.nodes", ManifestOutOfBounds)
        pos = stop
    if pos != size:
        raise c.bad(what, f"the ranges cover [0, {pos}), not the {size}-byte segment", ManifestOutOfBounds)


def _arrays(c: _Check, m: dict, sizes: dict[str, tuple[int, int, int]], num_experts: int) -> None:
    seen: set[tuple[int, str, str, int]] = set()
    for i, r in enumerate(c.get(m, "arrays", list, "manifest")):
        what = f"arrays[{i}]"
        layer = c.int(r, "layer", what, 0, shm.MAX_LAYER)
        node = c.int(r, "node", what, 0, shm.MAX_NODE)
        proj, kind = c.string(r, "proj", what), c.string(r, "kind", what)
        if proj not in PROJS or kind not in KINDS:
            raise c.bad(what, f"proj {proj!r:.20} / kind {kind!r:.20} not in {PROJS} / {KINDS}")
        what = f"arrays[{i}] (layer {layer} node {node} {proj} {kind})"
        key = (layer, proj, kind, node)
        if key in seen:
            raise c.bad(what, "a second record for the same array")
        seen.add(key)
        seg = c.string(r, "segment", what)
        if seg not in sizes:
            raise ManifestNames(f"{c.path}: {what}: segment {seg!r:.80} is not in the manifest's segments")
        s_layer, s_node, size = sizes[seg]
        if (s_layer, s_node) != (layer, node):
            raise c.bad(what, f"its segment {seg} holds layer {s_layer} node {s_node}", ManifestOutOfBounds)
        experts = c.get(r, "experts", list, what)
        first, count = c.ints(experts, f"{what}.experts", 0, MAX_EXPERTS)[:2] if len(experts) == 2 else (None, None)
        if first is None:
            raise c.bad(f"{what}.experts", f"{experts!r:.40} is not [first, count]")
        if count < 1 or first + count > num_experts:
            raise c.bad(f"{what}.experts", f"[{first}, {count}] is not inside the {num_experts} experts",
                        ManifestOutOfBounds)
        dtype = c.string(r, "dtype", what)
        shape = c.get(r, "shape", list, what)
        if not 1 <= len(shape) <= MAX_NDIM:
            raise c.bad(f"{what}.shape", f"{len(shape)} dims (1 to {MAX_NDIM})")
        c.ints(shape, f"{what}.shape", 1, MAX_DIM)
        want = piece_nbytes(dtype, shape)
        if want is None:
            raise c.bad(f"{what}.dtype", f"{dtype!r:.40} with shape {shape} is not a staged dtype")
        nbytes = c.int(r, "nbytes", what, 1, MAX_SIZE)
        stride = c.int(r, "stride", what, 1, MAX_SIZE)
        offset = c.int(r, "offset", what, 0, MAX_SIZE)
        if nbytes != want:
            raise c.bad(what, f"nbytes {nbytes} but {dtype} {shape} is {want} bytes", ManifestOutOfBounds)
        if stride != nbytes:  # the contract: densely packed, so an array is a true [count, ...] stack
            raise c.bad(what, f"stride {stride} != nbytes {nbytes} (pieces must be densely packed)",
                        ManifestOutOfBounds)
        end = offset + (count - 1) * stride + nbytes
        if end > size:
            raise c.bad(what, f"bytes [{offset}, {end}) run past its {size}-byte segment {seg}",
                        ManifestOutOfBounds)
        sl = r.get("slice")
        if sl is not None:
            lo = c.int(sl, "start", f"{what}.slice", 0, MAX_DIM)
            hi = c.int(sl, "stop", f"{what}.slice", 0, MAX_DIM)
            c.int(sl, "dim", f"{what}.slice", 0, MAX_NDIM - 1)
            if hi <= lo:
                raise c.bad(f"{what}.slice", f"[{lo}, {hi}) is empty", ManifestOutOfBounds)
