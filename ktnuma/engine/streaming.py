"""Handoff for engines that copy the weights at load: stage layer by layer from the engine's process.

    with ktnuma.stream("model/", nodes=2, split="tp", prefetch=1, engine=K.engine_kind("bf16")) as layers:
        for staged in layers:                       # StagedLayer: layer, array, tensor, torch, pointers
            engines[staged.layer] = build(staged)   # copy (and sync) before asking for the next layer

The coordinator runs in the caller's process (a :class:`ktnuma.coordinator.Run` in stream mode);
its workers are ``python -m ktnuma.worker`` subprocesses, so the engine's torch never loads into a
worker. Workers stage up to ``prefetch`` layers ahead of the one the engine holds. Asking for the
next layer unmaps and unlinks the previous one (its views are invalid afterwards: copy first).
Leaving the context, normally or by an exception, stops the workers and removes every segment.

Engines that keep reading the source after load (kt-kernel's RAWINT4 in pointer mode, llamafile
with one subpool) cannot use this: pass ``engine=`` an object whose ``copies_at_load`` is False
(``ktnuma.integrations.kt_kernel.engine_kind(backend, mode, tp)``) and they are refused.
The run registers itself (state ``staging``) so ``python -m ktnuma.cleanup`` can remove what a
killed engine leaves behind.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from ktnuma.host import shm
from ktnuma.engine.views import ArrayRecord, LayerView, Released, SegmentViews
from ktnuma.errors import BadInput

log = logging.getLogger(__name__)


class StagedLayer(LayerView):
    """One staged layer, valid until the stream moves on: `layer`, `array(proj, kind, node)`,
    `tensor(expert, proj, kind, node=None)`, `torch(proj, kind, node, expert=None)`,
    `pointers(proj, kind)`; `seconds` is the staging time of its slowest node."""

    def __init__(self, views: SegmentViews, layer: int, seconds: float) -> None:
        super().__init__(views, layer)
        self.seconds = seconds
        self.released = False

    def _live(self) -> None:
        if self.released:
            raise Released(f"layer {self.layer} was released when the stream moved on; copy it before advancing")

    def array(self, proj: str, kind: str, node: int):
        self._live()
        return super().array(proj, kind, node)

    def tensor(self, expert: int, proj: str, kind: str, node: int | None = None):
        self._live()
        return super().tensor(expert, proj, kind, node)

    def torch(self, proj: str, kind: str, node: int, expert: int | None = None):
        self._live()
        return super().torch(proj, kind, node, expert)

    def pointers(self, proj: str, kind: str) -> list[list[int]]:
        self._live()
        return super().pointers(proj, kind)


class Stream:
    """What ``with ktnuma.stream(...) as layers`` yields: iterate it once for the StagedLayers.
    Timing: `staging_seconds` (workers' busy time), `waited_seconds` (time the engine waited for a
    layer), `layers_done`."""

    def __init__(self, run: Any, views: SegmentViews, seg_sizes: dict[str, int]) -> None:
        self.run = run
        self.views = views
        self.seg_sizes = seg_sizes
        self.format = views.format
        self.split = views.split
        self.config = views.config
        self.nodes = views.nodes
        self.layers = views.layers
        self.waited_seconds = 0.0
        self.staging_seconds = 0.0
        self.layers_done = 0
        self._started = False
        self._current: StagedLayer | None = None

    def _release(self, staged: StagedLayer) -> None:
        staged.released = True
        names = {r.segment for r in staged.records()}
        self.views.unmap(names)
        self.run.release_layer(staged.layer)

    def __iter__(self) -> Iterator[StagedLayer]:
        if self._started:
            raise BadInput("a stream can be iterated once")
        self._started = True
        it = self.run.layers()
        while True:
            t0 = time.perf_counter()
            done = next(it, None)
            self.waited_seconds += time.perf_counter() - t0
            if done is None:
                return
            for s in done.segments:
                self.views.map(s.name, self.seg_sizes[s.name])
            secs = max((s.seconds for s in done.segments), default=0.0)
            self.staging_seconds += sum(s.seconds for s in done.segments)
            staged = StagedLayer(self.views, done.layer, secs)
            self._current = staged
            yield staged
            self._release(staged)
            self._current = None
            self.layers_done += 1


def _refuse_in_place(engine: Any) -> None:
    """`engine` says whether it copies the weights at load (its `copies_at_load`); one that reads them
    in place is refused. The engine side knows no engine: integrations describe theirs (e.g.
    ``ktnuma.integrations.kt_kernel.engine_kind("bf16", "flat")``)."""
    if engine is None:
        return
    copies = getattr(engine, "copies_at_load", None)
    if not isinstance(copies, bool):
        raise BadInput(f"ktnuma.stream: engine={engine!r:.80} does not say whether it copies the weights at load "
                       "(an object with a bool copies_at_load, e.g. "
                       "ktnuma.integrations.kt_kernel.engine_kind('bf16', 'flat'))")
    if not copies:
        raise BadInput(f"ktnuma.stream: the {engine} keeps reading the "
                       "weights after load, and stream releases each layer once it is loaded; stage with "
                       "`python -m ktnuma.launch` and use ktnuma.attach instead (the segments then outlive the engine)")


def _check_records(p: Any, arrays: list[dict]) -> None:
    """The same validation a published manifest passes (manifest_check), on the stream's own records."""
    from ktnuma.stage.manifest_check import check

    segments = [{"name": shm.segment_name(p.run_id, s.layer, s.node), "layer": s.layer, "node": s.node,
                 "size": s.size, "placement": None} for s in p.plan.segments]
    check({"ktnuma_manifest": 1, "run_id": p.run_id, "owner": {"pid": os.getpid(), "start_time": None},
           "split": p.plan.split, "shm_dir": shm.norm_dir(p.shm_dir),
           "model": {"path": os.path.abspath(p.index.root), "format": p.index.format, "naming": p.index.naming,
                     "files": []},
           "config": p.index.config.as_manifest(), "topology": p.topology.as_manifest(),
           "segments": segments, "arrays": arrays}, f"stream {p.run_id}")


@contextmanager
def stream(model: str | os.PathLike[str], nodes: int | None = None, split: str = "tp",
           layers: str | Sequence[int] | None = None, shm_dir: str | None = None, topology: str | None = None,
           prefetch: int = 1, format: str | None = None, engine: Any = None,
           retries: int = 2, workers: Any = None) -> Iterator[Stream]:
    """Stage `model` layer by layer for an engine in this process (see the module doc).
    `nodes`/`topology`/`split`/`layers`/`shm_dir`/`format`/`retries` mean what they mean for
    `launch`; `prefetch` is how many layers the workers stage ahead of the one held; `engine`
    (an object with a bool `copies_at_load`) refuses engines that read in place. `workers`:
    ``ktnuma.stage.procs.prespawn(topology)`` started by the caller (their interpreters start while
    it imports and plans); the run adopts them, and the caller stops them if this raises first."""
    from ktnuma.plan.planner import SPLITS, manifest_arrays
    from ktnuma.stage.coordinator import Run
    from ktnuma.stage.session import prepare

    _refuse_in_place(engine)
    if int(prefetch) < 0:
        raise BadInput(f"ktnuma.stream: prefetch must be >= 0, got {prefetch}")
    if split not in SPLITS:
        raise BadInput(f"ktnuma.stream: split must be one of {', '.join(SPLITS)}, not {split!r}")
    window = int(prefetch) + 1
    p = prepare(model, nodes=nodes, topology=topology, split=split, format=format, layers=layers,
                shm_dir=shm_dir, stream=True, window=window, spawn=None if workers is None else lambda t: workers)
    views = None
    try:
        arrays = manifest_arrays(p.plan, lambda layer, node: shm.segment_name(p.run_id, layer, node))
        _check_records(p, arrays)
        records = [ArrayRecord.from_json(r) for r in arrays]
        views = SegmentViews(records, p.topology.ids, fmt=p.index.format, split=split,
                             config=p.index.config.as_manifest(), shm_dir=p.shm_dir, where=f"stream {p.run_id}: ")
        sizes = {shm.segment_name(p.run_id, s.layer, s.node): s.size for s in p.plan.segments}
        with Run(p.plan, p.topology, run_id=p.run_id, shm_dir=p.shm_dir, layers_in_flight=window,
                 retries=retries, stream=True, workers=p.workers) as run:
            st = Stream(run, views, sizes)
            log.info("stream %s: %s %s over %d node(s), %d layer(s), prefetch %d", p.run_id, p.index.format,
                     split, len(p.topology.nodes), len(p.plan.layers), prefetch)
            yield st
    finally:
        if views is not None:
            views.close()
        p.remove()
