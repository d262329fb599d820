"""Building and running one kt-kernel MoE engine (kt-kernel imported lazily)."""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ktnuma.errors import BadInput
from ktnuma.index.dtypes import GGML_TYPES
from ktnuma.index.model import KINDS, PROJS
from ktnuma.integrations.kt_kernel.backends import (BACKENDS, MODES, EngineSpec, check_engine_cpu, check_engine_limits,
                                                  copies_at_load)

log = logging.getLogger(__name__)

_ext_cache: Any = None


def available() -> bool:
    """Whether kt-kernel can be imported (imports it)."""
    try:
        _ext()
    except ImportError:
        return False
    return True


def _ext() -> Any:
    global _ext_cache
    if _ext_cache is None:
        import kt_kernel  # noqa: F401  (loads the CPU variant and registers kt_kernel_ext)

        _ext_cache = kt_kernel.kt_kernel_ext
    return _ext_cache


def make_cpuinfer(threads: int = 1, numa_nodes: Sequence[int] = (0,)) -> Any:
    """A kt-kernel CPUInfer with one subpool per entry of `numa_nodes` (real node ids), `threads`
    threads each. ktnuma's per-node engines use one subpool each (engine tp == 1)."""
    ext = _ext()
    wc = ext.WorkerPoolConfig()
    wc.subpool_count = len(numa_nodes)
    wc.subpool_numa_map = [int(x) for x in numa_nodes]
    wc.subpool_thread_count = [int(threads)] * len(numa_nodes)
    return ext.CPUInfer(wc)


@dataclass
class LoadedMoE:
    """A loaded kt-kernel MoE plus everything it may still read (kept alive with it)."""

    spec: EngineSpec
    mode: str
    layer_idx: int
    engine: Any
    config: Any
    keep: tuple[Any, ...]
    in_place: bool  # the engine reads `keep`'s memory during forward


def merge_node_rows(rows: Sequence[Sequence[int]], what: str = "pointers") -> list[int]:
    """`ep` split: `Attached.pointers(...)` gives one row per node with 0 where the node holds no
    piece of expert e; the engine takes one row. Each expert must be held by exactly one node."""
    if not rows:
        raise BadInput(f"kt-kernel: {what}: no node rows")
    n_exp = len(rows[0])
    if any(len(r) != n_exp for r in rows):
        raise BadInput(f"kt-kernel: {what}: node rows of different lengths {[len(r) for r in rows]}")
    merged: list[int] = []
    for e in range(n_exp):
        held = [int(r[e]) for r in rows if int(r[e]) != 0]
        if len(held) != 1:
            raise BadInput(f"kt-kernel: {what}: expert {e} is held by {len(held)} nodes (ep needs exactly one)")
        merged.append(held[0])
    return merged


def _addr_nbytes(obj: Any) -> tuple[int, int]:
    """Address and byte length of a C-contiguous numpy array / torch tensor / buffer."""
    if hasattr(obj, "data_ptr") and hasattr(obj, "element_size"):  # torch
        if not obj.is_contiguous():
            raise BadInput("kt-kernel: array is not contiguous")
        return int(obj.data_ptr()), int(obj.numel() * obj.element_size())
    import numpy as np

    arr = obj if isinstance(obj, np.ndarray) else np.asarray(memoryview(obj))
    if not arr.flags["C_CONTIGUOUS"]:
        raise BadInput("kt-kernel: array is not C-contiguous")
    return int(arr.ctypes.data), int(arr.nbytes)


def _setters(spec: EngineSpec, arrays: Mapping[tuple[str, str], Any], mode: str) -> tuple[dict[str, Any], list[Any]]:
    """MOEConfig attribute -> value for the weight/scale sources, plus objects to keep alive."""
    E = spec.num_experts
    attrs: dict[str, Any] = {}
    keep: list[Any] = []
    for proj in PROJS:
        for kind in KINDS:
            need = spec.piece_nbytes(proj, kind)
            src = arrays.get((proj, kind))
            if need == 0:
                if src is not None and mode == "flat":
                    raise BadInput(f"kt-kernel {spec.engine_class}: takes no {proj} {kind}")
                if mode == "pointers" and kind == "scale":
                    attrs[f"{proj}_scales"] = [[0] * E]  # upstream passes zeros for BF16
                continue
            if src is None:
                raise BadInput(f"kt-kernel {spec.engine_class}: missing {proj} {kind} array")
            if mode == "flat":
                addr, nbytes = _addr_nbytes(src)
                if nbytes != need * E:
                    raise BadInput(
                        f"kt-kernel {spec.engine_class}: {proj} {kind} has {nbytes} bytes, expected "
                        f"{E} experts x {need} ({spec.piece(proj, kind)})"
                    )
                attrs[f"{proj}_proj" if kind == "weight" else f"{proj}_scale"] = addr
                keep.append(src)
            else:
                ptrs = [int(p) for p in src]
                if len(ptrs) != E or any(p <= 0 for p in ptrs):
                    raise BadInput(
                        f"kt-kernel {spec.engine_class}: {proj} {kind} pointer table needs {E} non-zero "
                        f"addresses, got {len(ptrs)} ({sum(p <= 0 for p in ptrs)} zero)"
                    )
                attrs[f"{proj}_projs" if kind == "weight" else f"{proj}_scales"] = [ptrs]
                keep.append(src)
    return attrs, keep


def build_moe(
    cpuinfer: Any,
    spec: EngineSpec,
    arrays: Mapping[tuple[str, str], Any],
    *,
    mode: str = "flat",
    layer_idx: int,
    engine_tp: int = 1,
) -> LoadedMoE:
    """Build and load one kt-kernel MoE. `arrays[(proj, kind)]` is a stacked C-contiguous [E, ...]
    array (numpy / torch; flat mode) or a sequence of E per-expert addresses (pointer mode), each
    piece as `spec.piece(proj, kind)` describes. `layer_idx` must be distinct per engine alive in
    the process. The caller keeps the source alive until this returns, and for as long as the
    engine lives when `copies_at_load` is False (the returned object also holds a reference).
    `engine_tp` is `cpuinfer`'s subpool count (the engine then splits I itself)."""
    if mode not in MODES:
        raise BadInput(f"kt-kernel: unknown mode {mode!r} (flat or pointers)")
    b = BACKENDS[spec.backend]
    if mode == "pointers" and not b.pointer_mode:
        raise BadInput(f"kt-kernel {spec.engine_class} ({spec.format}) takes stacked arrays only (mode='flat')")
    check_engine_limits(spec, engine_tp)
    check_engine_cpu(spec)
    attrs, keep = _setters(spec, arrays, mode)

    import numpy as np

    ext = _ext()
    moe_mod = ext.moe
    cls = getattr(moe_mod, spec.engine_class, None)
    if cls is None:
        raise BadInput(f"kt-kernel {getattr(ext, '__cpu_variant__', '?')} build has no {spec.engine_class}")
    cfg = moe_mod.MOEConfig(spec.num_experts, spec.experts_per_tok, spec.hidden, spec.intermediate, 0)
    cfg.layer_idx = int(layer_idx)
    cfg.pool = cpuinfer.backend_
    cfg.max_len = spec.max_len
    if spec.backend == "gguf":
        assert spec.gguf_types is not None
        gate_t, up_t, down_t = (GGML_TYPES[t].id for t in spec.gguf_types)
        cfg.m_block = 32
        cfg.group_min_len = 10
        cfg.group_max_len = spec.max_len
        cfg.gate_type, cfg.up_type, cfg.down_type = gate_t, up_t, down_t
        cfg.hidden_type = ext.kvcache.ggml_type.BF16
    elif spec.bits is not None:
        cfg.quant_config.bits = spec.bits
        cfg.quant_config.group_size = int(spec.group_size or 0)
        cfg.quant_config.zero_point = False
    for name, value in attrs.items():
        setattr(cfg, name, value)
    engine = cls(cfg)
    p2l = np.arange(spec.num_experts, dtype=np.int64)
    cpuinfer.submit(engine.load_weights_task(int(p2l.ctypes.data)))
    cpuinfer.sync()
    in_place = not copies_at_load(spec.backend, mode, engine_tp)
    log.debug("built %s layer_idx=%d mode=%s in_place=%s", spec.engine_class, layer_idx, mode, in_place)
    return LoadedMoE(spec, mode, int(layer_idx), engine, cfg, tuple(keep), in_place)


def forward(moe: LoadedMoE, cpuinfer: Any, x_bf16: Any, ids: Any, weights: Any, out: Any = None) -> Any:
    """Run the MoE on `x_bf16` ([q, H] bf16: torch bfloat16 or numpy uint16 bits), expert `ids`
    [q, k] and routing `weights` [q, k]. Returns `out` ([q, H], same kind as x), allocated if None."""
    import numpy as np

    spec = moe.spec
    is_torch = hasattr(x_bf16, "data_ptr")
    if is_torch:
        import torch

        if x_bf16.dtype != torch.bfloat16:
            raise BadInput(f"kt-kernel forward: x must be bfloat16, not {x_bf16.dtype}")
        x = x_bf16.contiguous()
        ids_a = np.ascontiguousarray(np.asarray(ids.cpu() if hasattr(ids, "cpu") else ids, dtype=np.int64))
        w_a = np.ascontiguousarray(np.asarray(weights.cpu() if hasattr(weights, "cpu") else weights, dtype=np.float32))
        if out is None:
            out = torch.empty_like(x)
        x_addr, out_addr = x.data_ptr(), out.data_ptr()
        q, h = x.shape
    else:
        x = np.ascontiguousarray(x_bf16)
        if x.dtype.itemsize != 2:
            raise BadInput("kt-kernel forward: numpy x must hold bf16 bits (2-byte elements)")
        ids_a = np.ascontiguousarray(ids, dtype=np.int64)
        w_a = np.ascontiguousarray(weights, dtype=np.float32)
        if out is None:
            out = np.empty_like(x)
        x_addr, out_addr = x.ctypes.data, out.ctypes.data
        q, h = x.shape
    k = spec.experts_per_tok
    if h != spec.hidden or ids_a.shape != (q, k) or w_a.shape != (q, k):
        raise BadInput(
            f"kt-kernel forward: x {tuple(x.shape)}, ids {ids_a.shape}, weights {w_a.shape} do not fit "
            f"hidden {spec.hidden}, experts_per_tok {k}"
        )
    if q > spec.max_len:
        raise BadInput(f"kt-kernel forward: {q} tokens exceed max_len {spec.max_len}")
    if q and (ids_a.min() < 0 or ids_a.max() >= spec.num_experts):
        raise BadInput(f"kt-kernel forward: expert ids outside [0, {spec.num_experts})")
    qlen = np.array([q], dtype=np.int32)
    cpuinfer.submit(
        moe.engine.forward_task(int(qlen.ctypes.data), k, int(ids_a.ctypes.data), int(w_a.ctypes.data),
                                int(x_addr), int(out_addr), False)
    )
    cpuinfer.sync()
    return out

