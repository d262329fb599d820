"""kt-kernel's loader interface, served from staged segments (zero-copy views; see methods.py for what
each method's upstream loader returns, which these return exactly).

- `NativeLoader`  (NativeMoEWrapper._create_loader): `load_experts(base_key)` for `model.layers.L`,
  `language_model.model.layers.L`, `model.language_model.layers.L`; any other key is a KeyError (the
  wrapper tries the next). `close_all_handles()` tells the session the engine has copied what this
  loader served (a handoff releases it); it never unmaps memory an in-place engine still reads: the
  resident segments stay mapped for the life of the process.
- `AmxLoader`     (AMXMoEWrapper's SafeTensorLoader): `load_experts("blk.L")` -> `[numa][expert]` numpy.
- `GgufLoader`    (LlamafileMoEWrapper's GGUFLoader): `get_undequanted_tensor_and_ggml_type(name)` ->
  the layer's stacked bytes (torch uint8, 1-D) and its GGML type; the layer is done once the engine drops
  all three tensors (the wrapper never releases its loader).
A loader is a few attributes over the process's session: creating one per layer costs nothing.
"""
from __future__ import annotations

import gc
import logging
import re
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from ktnuma.errors import BadInput
from ktnuma.index.model import PROJS

log = logging.getLogger(__name__)

NATIVE_KEYS = (re.compile(r"^model\.layers\.(\d+)$"), re.compile(r"^language_model\.model\.layers\.(\d+)$"),
               re.compile(r"^model\.language_model\.layers\.(\d+)$"))
AMX_KEY = re.compile(r"^blk\.(\d+)$")
GGUF_KEY = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight$")

SessionFn = Callable[[], Any]  # -> the process's Session (created on first use)


def _layer_of(base_key: str, patterns: tuple[re.Pattern[str], ...]) -> int:
    for p in patterns:
        m = p.match(str(base_key))
        if m:
            return int(m.group(1))
    raise KeyError(f"ktnuma: no staged experts under {base_key!r}")


def _pieces(m: Any, stacked: Any, kind: str, gl: list[Any]) -> list[Any]:
    """`m.view` of each expert piece of a stacked torch view, in order. One `unbind` gives the pieces; a
    view that returns its piece unchanged is skipped, and one that merely reinterprets it (same memory,
    e.g. RAWINT4's i32 words as u8) is applied once to the whole stack when that provably gives every
    piece the same tensor (dtype, shape, strides, address) as applying it piece by piece."""
    parts = stacked.unbind(0)
    if not parts:
        return []
    if any(g is not None for g in gl):  # a per-expert argument (NVFP4 globals): piece by piece
        return [m.view(p, kind, g) for p, g in zip(parts, gl)]
    probe = m.view(parts[0], kind, None)
    if probe is parts[0]:
        return list(parts)
    if probe.data_ptr() == parts[0].data_ptr():
        try:
            whole = m.view(stacked, kind, None)
        except Exception:  # a view defined on pieces only
            whole = None
        if (whole is not None and whole.dim() == probe.dim() + 1 and whole.dtype == probe.dtype
                and tuple(whole.shape[1:]) == tuple(probe.shape) and whole.stride()[1:] == probe.stride()
                and whole.data_ptr() == stacked.data_ptr() and whole.shape[0] == len(parts)
                and whole.stride(0) * whole.element_size() == stacked.stride(0) * stacked.element_size()):
            return list(whole.unbind(0))
    return [probe, *(m.view(p, kind, None) for p in parts[1:])]


def _by_expert(view: Any, m: Any, proj: str, kind: str, gl: list[Any], where: str) -> list[Any]:
    """What upstream's loader returns for every expert 0..E-1 of (proj, kind) (`m.view` of its staged
    piece, `gl[e]` its NVFP4 global scale or None), across the nodes holding whole pieces."""
    E = int(view.config["num_experts"])
    out: list[Any] = [None] * E
    for node in view.nodes:
        if not view.has(proj, kind, node):
            continue
        r = view.record(proj, kind, node)
        if r.slice is not None:
            raise BadInput(f"{where}layer {view.layer} node {node} {proj} {kind} holds a slice {r.slice} of "
                           "each expert; kt-kernel's native wrapper takes whole experts: stage it with "
                           "`python -m ktnuma.launch MODEL --split tp-whole` (or --split ep)")
        todo = [i for i, e in enumerate(r.experts) if out[e] is None]
        if not todo:
            continue
        pieces = _pieces(m, view.torch(proj, kind, node), kind, list(gl[r.first:r.first + r.count]))
        for i in todo:
            out[r.first + i] = pieces[i]
    missing = [e for e, x in enumerate(out) if x is None]
    if missing:
        raise BadInput(f"{where}layer {view.layer}: {proj} {kind} of expert(s) {missing[:8]} are not staged; "
                       "stage every expert of the layer")
    return out


@contextmanager
def _no_gc() -> Iterator[None]:
    """The cyclic collector off while a layer's views are made (thousands of tensors, no cycles: each goes
    by reference count once the engine drops it), so that burst does not trigger a full collection of the
    engine's heap (~0.1-0.2 s with torch loaded); the collector's previous state is restored."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


class NativeLoader:
    def __init__(self, session: SessionFn) -> None:
        self._session = session
        self._served: list[int] = []

    def load_experts(self, base_key: str, device: str = "cpu") -> dict[str, list[Any]]:
        layer = _layer_of(base_key, NATIVE_KEYS)
        s = self._session()
        view = s.layer(layer)  # a handoff may wait here for its workers: the collector stays on meanwhile
        with _no_gc():
            return self._load(s, view, layer)

    def _load(self, s: Any, view: Any, layer: int) -> dict[str, list[Any]]:
        m = s.method
        kinds = ("weight", "scale") if m.scales else ("weight",)
        out: dict[str, list[Any]] = {}
        E = int(view.config["num_experts"])
        for kind in kinds:
            for proj in PROJS:
                gl = s.global_scales(layer, proj) if m.globals and kind == "scale" else [None] * E
                out[proj if kind == "weight" else f"{proj}_scale"] = _by_expert(view, m, proj, kind, gl, s.where)
        self._served.append(layer)
        return out

    def close_all_handles(self) -> None:
        served, self._served = self._served, []
        if served:
            s = self._session()
            for layer in served:
                s.done(layer)

    def has_tensor(self, name: str) -> bool:
        return False


class AmxLoader:
    def __init__(self, session: SessionFn) -> None:
        self._session = session

    def load_experts(self, base_key: str, device: str = "cpu") -> dict[str, list[list[Any]]]:
        layer = _layer_of(base_key, (AMX_KEY,))
        s = self._session()
        view = s.layer(layer)
        with _no_gc():
            return self._load(s, view, layer)

    def _load(self, s: Any, view: Any, layer: int) -> dict[str, list[list[Any]]]:
        out: dict[str, list[list[Any]]] = {}
        for kind in ("weight", "scale"):
            for proj in ("up", "gate", "down"):
                rows = []
                for node in view.nodes:
                    r = view.record(proj, kind, node)
                    stacked = view.array(proj, kind, node)
                    if r.first != 0 or r.count != int(view.config["num_experts"]):
                        raise BadInput(f"{s.where}layer {layer} node {node} holds experts {r.first}.."
                                       f"{r.first + r.count - 1} of {proj} {kind}; AMX shards need all")
                    rows.append([stacked[i] for i in range(r.count)])
                out[proj if kind == "weight" else f"{proj}_scale"] = rows
        arrays = [a for rows in out.values() for row in rows for a in row]
        _Lease(lambda: s.done(layer), len(arrays)).track(arrays)
        return out

    def close_all_handles(self) -> None:
        pass  # AMXMoEWrapper never releases its loader: a layer is done once its arrays are dropped


class _Lease:
    """Calls `done()` once `count` tracked objects (what a loader handed out for one layer) are gone:
    the engine has copied the layer and dropped its sources."""

    def __init__(self, done: Callable[[], None], count: int) -> None:
        self.done, self.left = done, count

    def track(self, objs: list[Any]) -> None:
        for o in objs:
            weakref.finalize(o, self.drop)

    def drop(self) -> None:
        self.left -= 1
        if self.left == 0:
            self.done()


class GgufLoader:
    def __init__(self, session: SessionFn) -> None:
        self._session = session
        self._leases: dict[int, _Lease] = {}

    def has_tensor(self, name: str) -> bool:
        return GGUF_KEY.match(str(name)) is not None

    def get_ggml_type(self, name: str) -> Any:
        return self.get_undequanted_tensor_and_ggml_type(name, _track=False)[1]

    def get_undequanted_tensor_and_ggml_type(self, name: str, _track: bool = True) -> tuple[Any, Any]:
        import numpy as np
        import torch
        from gguf import GGMLQuantizationType

        from ktnuma.index.dtypes import GGML_TYPES

        m = GGUF_KEY.match(str(name))
        if m is None:
            raise KeyError(f"Tensor '{name}' not found in GGUF files")
        layer, proj = int(m.group(1)), m.group(2)
        s = self._session()
        view = s.layer(layer)
        holders = sorted((n for n in view.nodes if view.has(proj, "weight", n)),
                         key=lambda n: view.record(proj, "weight", n).first)
        if not holders:
            raise BadInput(f"{s.where}layer {layer}: no {proj} weights staged")
        dtype = view.record(proj, "weight", holders[0]).dtype
        if len(holders) == 1:
            data = view.array(proj, "weight", holders[0]).reshape(-1)
        else:  # llamafile takes one stacked buffer: gather (the engine copies at load with TP > 1)
            data = np.concatenate([view.array(proj, "weight", n).reshape(-1) for n in holders])
            log.info("ktnuma: layer %d %s over %d nodes gathered into one buffer (%d bytes)", layer, proj,
                     len(holders), data.nbytes)
        t = torch.from_numpy(data)
        if _track:
            lease = self._leases.get(layer)
            if lease is None:
                lease = self._leases[layer] = _Lease(lambda: self._finished(layer), len(PROJS))
            lease.track([t])
        return t, GGMLQuantizationType(GGML_TYPES[dtype[5:]].id)

    def _finished(self, layer: int) -> None:
        self._leases.pop(layer, None)
        self._session().done(layer)

    def close_all_handles(self) -> None:
        pass
