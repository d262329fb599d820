"""Where a process's kt-kernel wrappers take their experts from: one session per process.

- `Resident` (``KTNUMA_MANIFEST=<run.json>``, or a wrapper `weight_path` naming a ktnuma manifest):
  attaches a run staged earlier with ``python -m ktnuma.launch ... --detach`` once; every layer is a
  zero-copy view of its segments, which outlive the engine (in-place engines keep reading them).
- `Handoff` (``KTNUMA_STAGE=1``, `weight_path` the model directory): starts ``ktnuma.stream`` when the
  first wrapper asks, stages ahead of ``load_weights`` layer by layer and releases each layer once the
  engine has copied it (``done``), so memory holds the engine's copy plus a bounded window.

kt part i is ktnuma node i: a run's node count and ids must be the wrapper pool's ``threadpool_count``
and ``numa_nodes``; every mismatch (method vs format, nodes, split, model files) is one line naming both
values and the way out (BadInput).
"""
from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

from ktnuma.errors import BadInput
from ktnuma.integrations.kt_kernel.methods import Method, check_format, handoff_split, split_refusal

log = logging.getLogger(__name__)

MANIFEST_ENV = "KTNUMA_MANIFEST"
STAGE_ENV = "KTNUMA_STAGE"
PREFETCH_ENV = "KTNUMA_PREFETCH"  # handoff: layers staged ahead of the one the engine loads (default 1)

POOL: "Pool | None" = None  # the wrapper pool, recorded by activate when kt-kernel creates it


@dataclass(frozen=True)
class Pool:
    """The wrapper's CPUInfer pool: kt part i runs on real NUMA node numa_nodes[i]."""

    threadpool_count: int
    numa_nodes: tuple[int, ...]


def is_manifest(path: str) -> bool:
    """Whether `path` is a ktnuma manifest file (a JSON object with the `ktnuma_manifest` key)."""
    if not path or not os.path.isfile(path) or not path.endswith(".json"):
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return b'"ktnuma_manifest"' in head


def _model_root(path: str) -> str:
    p = os.path.realpath(path)
    return os.path.dirname(p) if os.path.isfile(p) else p


class Session:
    """Staged layers for one (method, source). `layer(L)` -> a LayerView; `done(L)`: the engine has
    copied layer L (a handoff releases it; a resident run keeps it)."""

    kind = ""
    in_place = False
    active = True

    def __init__(self, method: Method, pool: Pool, source: str) -> None:
        self.method, self.pool, self.source = method, pool, source
        self.where = f"ktnuma ({self.kind} {source}): "

    def layer(self, layer: int) -> Any:
        raise NotImplementedError

    def done(self, layer: int) -> None:
        pass

    def close(self) -> None:
        pass

    def global_scales(self, layer: int, proj: str) -> list[float]:
        """NVFP4: each expert's per-tensor f32 global scale of (layer, proj), experts 0..E-1."""
        raise NotImplementedError

    def _globals_from(self, records: Any, E: int, layer: int, proj: str) -> list[float]:
        out: list[Any] = [None] * E
        for first, values in records:
            out[first:first + len(values)] = [float(v) for v in values]
        if any(v is None for v in out):
            raise BadInput(f"{self.where}layer {layer} {proj}: NVFP4 global scales missing for some experts")
        return out

    def matches(self, method: Method, pool: Pool, source: str) -> None:
        if method.name != self.method.name:
            raise BadInput(f"{self.where}serves kt-kernel method {self.method.name}; a wrapper asked for "
                           f"{method.name} (one method per process)")
        if pool != self.pool:
            raise BadInput(f"{self.where}the kt-kernel pool changed from {self.pool} to {pool}")
        if source != self.source:
            raise BadInput(f"{self.where}a wrapper asked for {source}; one ktnuma source per process")

    # ------------------------------------------------------------------ checks
    def _check_run(self, fmt: str, split: str, nodes: tuple[int, ...], what: str) -> None:
        m, p = self.method, self.pool
        check_format(m, fmt, self.where)
        if len(nodes) != p.threadpool_count:
            raise BadInput(f"{self.where}{what} has {len(nodes)} node(s) {list(nodes)}, the kt-kernel pool has "
                           f"threadpool_count {p.threadpool_count}; stage it with `python -m ktnuma.launch MODEL "
                           f"--nodes {p.threadpool_count}` or set --kt-threadpool-count {len(nodes)}")
        if tuple(nodes) != p.numa_nodes:
            raise BadInput(f"{self.where}{what} nodes are {list(nodes)} but kt-kernel's numa_nodes are "
                           f"{list(p.numa_nodes)} (kt part i reads ktnuma node i); stage with a topology whose "
                           f"node ids are {list(p.numa_nodes)}")
        takes = split_refusal(m, split, len(nodes))
        if takes:
            raise BadInput(f"{self.where}{what} is a split={split} run over {len(nodes)} nodes; kt-kernel "
                           f"{m.name} takes {takes}")
        if self.in_place and len(nodes) != 1:
            raise BadInput(f"{self.where}kt-kernel {m.name} on this CPU reads the weights in place and runs on "
                           f"one subpool; set --kt-threadpool-count 1 and stage it with `python -m ktnuma.launch MODEL --nodes 1`")


class Resident(Session):
    kind = "resident"

    def __init__(self, method: Method, pool: Pool, manifest: str, weight_path: str, in_place: bool) -> None:
        from ktnuma.engine.attachment import attach

        self.in_place = in_place
        super().__init__(method, pool, os.path.abspath(manifest))
        self.att = attach(manifest)
        try:
            m = self.att.manifest
            self._check_run(m["model"]["format"], m["split"], tuple(self.att.nodes), "the run")
            if weight_path and not is_manifest(weight_path):
                want, have = _model_root(weight_path), _model_root(m["model"]["path"])
                if want != have:
                    raise BadInput(f"{self.where}the run staged {have}, but the wrapper's weight_path is {want}; "
                                   f"point --kt-weight-path at {have} (or at the manifest), or stage {want}")
        except BaseException:
            self.att.close()
            raise
        log.info("ktnuma: kt-kernel %s attached to %s (%s, split %s, nodes %s)", method.name, self.source,
                 self.att.format, self.att.split, list(self.att.nodes))

    def layer(self, layer: int) -> Any:
        if layer not in self.att.layers:
            raise BadInput(f"{self.where}no experts staged for layer {layer} (staged layers "
                           f"{list(self.att.layers)}); stage every MoE layer the engine builds (`python -m ktnuma.launch MODEL` "
                           "without --layers)")
        return self.att.layer(layer)

    def close(self) -> None:
        self.active = False
        self.att.close()

    def global_scales(self, layer: int, proj: str) -> list[float]:
        recs = [(r["experts"][0], r.get("global_scale", ())) for r in self.att.manifest["arrays"]
                if r["layer"] == layer and r["proj"] == proj and r["kind"] == "scale"]
        return self._globals_from(recs, int(self.att.config["num_experts"]), layer, proj)


class Handoff(Session):
    kind = "handoff"

    def __init__(self, method: Method, pool: Pool, model: str, in_place: bool) -> None:
        super().__init__(method, pool, os.path.abspath(model))
        if in_place:
            raise BadInput(f"{self.where}kt-kernel {method.name} on this CPU keeps reading the weights after "
                           "load, and KTNUMA_STAGE releases each layer once it is loaded; stage a resident run "
                           f"(python -m ktnuma.launch {model} --nodes {pool.threadpool_count} --split ep --detach) "
                           f"and set {MANIFEST_ENV}=<its manifest> instead")
        if is_manifest(model):
            raise BadInput(f"{self.where}weight_path is a ktnuma manifest; {STAGE_ENV}=1 stages from the model "
                           f"directory (set {MANIFEST_ENV}={model} to attach to that run instead)")
        split = handoff_split(method, pool.threadpool_count)
        prefetch = int(os.environ.get(PREFETCH_ENV, "1"))
        self._stack = ExitStack()
        self._lock = threading.RLock()
        self._closer: threading.Thread | None = None
        log.debug("ktnuma: handoff of %s starts (%d node(s))", model, pool.threadpool_count)
        workers = _prespawn(pool.threadpool_count)  # first: their interpreters start while this process plans
        try:
            from ktnuma.engine.streaming import stream

            self.stream = self._stack.enter_context(
                stream(model, nodes=pool.threadpool_count, split=split, prefetch=prefetch, workers=workers))
            self._check_run(self.stream.format, split, tuple(self.stream.nodes), "the staged model")
        except BaseException:
            self._stack.close()
            workers.stop()  # those the run did not adopt (it refused before it started)
            raise
        self._it = iter(self.stream)
        self._index: Any = None  # the model's index, read only for NVFP4's global scales
        self._held: dict[int, Any] = {}
        self._last = -1
        self._pending = set(self.stream.layers)
        log.info("ktnuma: kt-kernel %s handoff from %s (%s, %s over %d node(s), prefetch %d)", method.name,
                 self.source, self.stream.format, split, len(self.stream.nodes), prefetch)

    def layer(self, layer: int) -> Any:
        with self._lock:
            staged = self._held.get(layer)
            if staged is not None:
                return staged
            if layer not in self._pending:
                if layer in self.stream.layers:
                    raise BadInput(f"{self.where}layer {layer} was already released (the handoff serves each "
                                   f"layer once, in ascending order; asked after layer {self._last})")
                raise BadInput(f"{self.where}no experts for layer {layer} in the model (MoE layers "
                               f"{list(self.stream.layers)})")
            while True:
                t0 = time.perf_counter()
                staged = next(self._it)
                log.debug("ktnuma: layer %d staged (%.3f s on its slowest node); the engine waited %.3f s for it",
                          staged.layer, staged.seconds, time.perf_counter() - t0)
                self._last = staged.layer
                self._pending.discard(staged.layer)
                if staged.layer == layer:
                    self._held[layer] = staged
                    return staged
                log.warning("ktnuma: layer %d was staged but the engine asked for layer %d first; releasing "
                            "layer %d unused", staged.layer, layer, staged.layer)
                self.stream._release(staged)

    def global_scales(self, layer: int, proj: str) -> list[float]:
        if self._index is None:
            from ktnuma.index.experts import index_model

            self._index = index_model(self.source)
        recs = [(g.first, g.globals) for g in self._index.groups
                if g.layer == layer and g.proj == proj and g.kind == "scale" and g.globals]
        return self._globals_from(recs, int(self.stream.config["num_experts"]), layer, proj)

    def done(self, layer: int) -> None:
        with self._lock:
            staged = self._held.pop(layer, None)
            if staged is not None:
                self.stream._release(staged)  # unlink now; the workers move on to the next layer
            if not self._pending and not self._held and self._closer is None:
                # every segment is unlinked: stopping the workers and dropping the registry entry need
                # not delay the engine (close_session, at exit or on the next session, joins it)
                self.active = False
                self._closer = threading.Thread(target=self._close, name="ktnuma-handoff-close", daemon=True)
                self._closer.start()

    def _close(self) -> None:
        with self._lock:
            self.active = False
            self._pending.clear()
            self._held.clear()
            self._stack.close()

    def close(self) -> None:
        closer = self._closer
        if closer is not None:
            closer.join()
        self._close()


def _prespawn(nodes: int) -> Any:
    """The handoff's workers, started before anything is imported or planned for the stream."""
    from ktnuma.host.topology import select
    from ktnuma.stage.procs import prespawn

    return prespawn(select(nodes))


_session: Session | None = None
_session_lock = threading.Lock()


def session(method: Method, pool: Pool, weight_path: str, environ: Any = os.environ, in_place: bool = False) -> Session:
    """The process's session, created on first use from the environment and the first wrapper."""
    global _session
    with _session_lock:
        manifest = environ.get(MANIFEST_ENV) or (weight_path if is_manifest(weight_path) else "")
        source = os.path.abspath(manifest or weight_path)
        if _session is not None and _session.active:
            _session.matches(method, pool, source)
            return _session
        if _session is not None:
            _session.close()  # a finished handoff: wait for its workers to stop before a new session
        if manifest:
            _session = Resident(method, pool, manifest, weight_path, in_place)
        elif environ.get(STAGE_ENV, "") not in ("", "0"):
            _session = Handoff(method, pool, weight_path, in_place)
        else:
            raise BadInput(f"ktnuma: neither {MANIFEST_ENV} nor {STAGE_ENV} is set")
        return _session


def close_session() -> None:
    global _session
    with _session_lock:
        if _session is not None:
            _session.close()
            _session = None


atexit.register(close_session)
