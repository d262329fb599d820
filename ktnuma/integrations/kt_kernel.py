"""kt-kernel (kvcache-ai/ktransformers) MoE engines built on staged (or any in-memory) expert weights.

kt-kernel is optional: nothing here imports it until an engine is built (`available()` says whether
it can be). The AVX2 classes are forced for the native formats (they run on every x86-64 CPU
kt-kernel supports; the AVX-VNNI/AMX ones are chosen by kt-kernel itself only where the CPU has
them), and llamafile's `MOE` runs GGUF.

Data the engines take, per expert (gate/up act on [N=I, K=H], down on [N=H, K=I]); this is the
staged layout of `design.md` (GPTQ scales converted f16 -> f32, MXFP4 scales u8 -> bf16):

| format       | class              | weight piece            | scale piece                     |
|--------------|--------------------|-------------------------|---------------------------------|
| bf16         | AVX2BF16_MOE       | bf16 [N, K]             | -                               |
| fp8          | AVX2FP8_MOE        | e4m3 [N, K]             | f32 [ceil(N/128), ceil(K/128)]  |
| gptq-int4    | AVX2GPTQInt4_MOE   | i32 [K/8, N]            | f32 [K/gs, N]                   |
| rawint4      | AVX2RawInt4_MOE    | i32 [N, K/8] (u8 [N,K/2])| bf16 [N, K/gs]                 |
| mxfp4        | AVX2MXFP4_MOE      | u8 [N, K/2]             | bf16 [N, K/32]                  |
| gguf:<T>     | MOE (llamafile)    | T blocks [N, K]         | -                               |

Two ways to hand weights over (`build_moe(mode=...)`):
- "flat": one stacked [E, ...] buffer per (proj, kind) (`gate_proj`, `gate_scale`...);
- "pointers": one address per expert per (proj, kind) (`gate_projs=[[...]]`, numa dimension 1),
  the native classes only (llamafile takes stacked buffers alone).

Tensor parallelism is done by ktnuma, not by the engine: a `tp` split builds one engine per node,
each of width I/N on that node's slices (`EngineSpec.split(n)`), and the outputs are summed.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Callable

from ktnuma.errors import BadInput
from ktnuma.index.dtypes import DTYPES, FP8_BLOCK, GGML_TYPES
from ktnuma.index.model import KINDS, PROJS

log = logging.getLogger(__name__)

MODES = ("flat", "pointers")

MXFP4_GROUP = 32
LLAMAFILE_QK = 256  # llamafile splits I in QK_K blocks
DEFAULT_MAX_LEN = 64


# --------------------------------------------------------------------------------------------
# One table: ktnuma format -> kt-kernel backend
# --------------------------------------------------------------------------------------------
def _ceil(a: int, b: int) -> int:
    return -(-a // b)


Shape = tuple[int, ...]
# (N, K, group_size) -> (dtype, shape) of one expert's piece as the engine reads it
LayoutFn = Callable[[int, int, int | None], tuple[str, Shape]]


@dataclass(frozen=True)
class Backend:
    name: str  # ktnuma format family ("bf16", "fp8", ..., "gguf")
    engine_class: str  # attribute of kt_kernel_ext.moe
    weight: LayoutFn | None  # None: GGUF (computed from the GGML type)
    scale: LayoutFn | None  # None: no scales
    bits: int | None  # quant_config.bits (None: not set)
    group_size: int | None  # fixed group size; None: from the model (gptq/rawint4) or unused
    default_group_size: int | None
    pointer_mode: bool  # takes per-expert pointer tables
    in_place: Callable[[str, int], bool]  # (mode, engine tp) -> keeps reading the source after load
    tolerance: float  # relative L1 vs the torch reference (engine-facts.md)
    i_dims: tuple[int, int] = (0, 1)  # dim of a (weight or scale) piece that is I: (gate/up, down)


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("bf16", "AVX2BF16_MOE", lambda n, k, gs: ("bf16", (n, k)), None,
                None, None, None, True, lambda mode, tp: False, 0.02),
        Backend("fp8", "AVX2FP8_MOE", lambda n, k, gs: ("f8_e4m3", (n, k)),
                lambda n, k, gs: ("f32", (_ceil(n, FP8_BLOCK), _ceil(k, FP8_BLOCK))),
                8, FP8_BLOCK, FP8_BLOCK, True, lambda mode, tp: False, 0.02),
        Backend("gptq-int4", "AVX2GPTQInt4_MOE", lambda n, k, gs: ("i32", (k // 8, n)),
                lambda n, k, gs: ("f32", (k // gs, n)),
                4, None, None, True, lambda mode, tp: False, 0.02, (1, 0)),
        Backend("rawint4", "AVX2RawInt4_MOE", lambda n, k, gs: ("i32", (n, k // 8)),
                lambda n, k, gs: ("bf16", (n, k // gs)),
                4, None, 32, True, lambda mode, tp: mode == "pointers", 0.02),
        Backend("mxfp4", "AVX2MXFP4_MOE", lambda n, k, gs: ("u8", (n, k // 2)),
                lambda n, k, gs: ("bf16", (n, k // gs)),
                4, MXFP4_GROUP, MXFP4_GROUP, True, lambda mode, tp: False, 0.02),
        Backend("gguf", "MOE", None, None,
                None, None, None, False, lambda mode, tp: tp == 1, 0.04),
    )
}



def _family(fmt: str) -> str:
    return "gguf" if fmt.startswith("gguf:") else fmt


# --------------------------------------------------------------------------------------------
# EngineSpec
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EngineSpec:
    """Everything needed to build one kt-kernel MoE engine. `intermediate` is this engine's width
    (I for a whole layer, I/N for one of N tensor-parallel parts)."""

    format: str  # ktnuma format name: bf16, fp8, gptq-int4, rawint4, mxfp4, gguf:<T>
    backend: str  # key of BACKENDS
    engine_class: str
    hidden: int
    intermediate: int
    num_experts: int
    experts_per_tok: int
    group_size: int | None = None
    bits: int | None = None
    gguf_types: tuple[str, str, str] | None = None  # (gate, up, down) GGML type names
    max_len: int = DEFAULT_MAX_LEN

    def split(self, n_parts: int) -> "EngineSpec":
        """The spec of one of `n_parts` tensor-parallel parts (checked by check_engine_limits)."""
        check_engine_limits(self, n_parts)
        return replace(self, intermediate=self.intermediate // n_parts)

    def _nk(self, proj: str) -> tuple[int, int]:
        return (self.intermediate, self.hidden) if proj in ("gate", "up") else (self.hidden, self.intermediate)

    def piece(self, proj: str, kind: str) -> tuple[str, Shape] | None:
        """(dtype, shape) of one expert's piece of (proj, kind) as this engine reads it; None if the
        backend takes no such array (scales of bf16 / GGUF)."""
        if proj not in PROJS or kind not in KINDS:
            raise BadInput(f"unknown array ({proj!r}, {kind!r}); projs {PROJS}, kinds {KINDS}")
        n, k = self._nk(proj)
        b = BACKENDS[self.backend]
        if b.weight is None:  # GGUF
            if kind == "scale":
                return None
            t = GGML_TYPES[self.gguf_types[PROJS.index(proj)]]  # type: ignore[index]
            return f"gguf:{t.name}", (n, k)
        fn = b.weight if kind == "weight" else b.scale
        return None if fn is None else fn(n, k, self.group_size)

    def piece_nbytes(self, proj: str, kind: str) -> int:
        p = self.piece(proj, kind)
        if p is None:
            return 0
        dtype, shape = p
        if dtype.startswith("gguf:"):
            t = GGML_TYPES[dtype[5:]]
            return shape[0] * (shape[1] // t.block) * t.type_size
        size = DTYPES[dtype].itemsize
        for d in shape:
            size *= d
        return size

    def i_dim(self, proj: str) -> int:
        """The dim of this engine's (weight or scale) piece of `proj` that runs along I."""
        return BACKENDS[self.backend].i_dims[0 if proj in ("gate", "up") else 1]

    @property
    def kinds(self) -> tuple[str, ...]:
        return KINDS if BACKENDS[self.backend].scale is not None else ("weight",)

    @property
    def tolerance(self) -> float:
        return BACKENDS[self.backend].tolerance


def backend_for(
    format: str,
    *,
    hidden: int,
    intermediate: int,
    num_experts: int,
    experts_per_tok: int,
    group_size: int | None = None,
    gguf_types: Sequence[str] | None = None,
    max_len: int = DEFAULT_MAX_LEN,
) -> EngineSpec:
    """The engine for ktnuma format `format` (e.g. "fp8", "gguf:Q4_K"). GGUF models whose down
    projection has another type pass `gguf_types=(gate, up, down)`."""
    fam = _family(format)
    b = BACKENDS.get(fam)
    if b is None:
        raise BadInput(
            f"kt-kernel: no engine for format {format!r} (known: {', '.join(k for k in BACKENDS if k != 'gguf')}, "
            "gguf:<TYPE>); fp8 per-channel and amx-int4/amx-int8 have no AVX2 class in kt-kernel 0.7.2"
        )
    types: tuple[str, str, str] | None = None
    if fam == "gguf":
        if gguf_types is None:
            gguf_types = (format[5:],) * 3
        types = tuple(str(t).upper() for t in gguf_types)  # type: ignore[assignment]
        if len(types) != 3 or any(t not in GGML_TYPES for t in types):  # type: ignore[arg-type]
            raise BadInput(f"kt-kernel: unknown GGML types {gguf_types!r} for format {format!r}")
        gs = None
    elif b.group_size is not None:
        if group_size not in (None, b.group_size):
            raise BadInput(f"kt-kernel: {fam} uses group size {b.group_size}, not {group_size}")
        gs = b.group_size
    elif b.scale is not None:
        gs = group_size if group_size is not None else b.default_group_size
        if gs is None:
            raise BadInput(f"kt-kernel: format {fam} needs the checkpoint's group size (group_size=...)")
    else:
        gs = None
    spec = EngineSpec(
        format=format,
        backend=fam,
        engine_class=b.engine_class,
        hidden=int(hidden),
        intermediate=int(intermediate),
        num_experts=int(num_experts),
        experts_per_tok=int(experts_per_tok),
        group_size=gs,
        bits=b.bits,
        gguf_types=types,
        max_len=int(max_len),
    )
    check_engine_limits(spec, 1)
    return spec


# --------------------------------------------------------------------------------------------
# Limits the engine does not check itself (or checks only by crashing / returning garbage)
# --------------------------------------------------------------------------------------------
def check_engine_limits(spec: EngineSpec, n_parts: int = 1) -> None:
    """Refuse what the engine cannot run when `spec` is split into `n_parts` engines of width
    I/n_parts (n_parts=1: the spec as is). Raises BadInput with the numbers and a way out."""
    H, I, n = spec.hidden, spec.intermediate, int(n_parts)
    what = f"kt-kernel {spec.engine_class} ({spec.format}, hidden {H}, intermediate {I}"
    what += f" over {n} parts)" if n > 1 else ")"
    if n < 1:
        raise BadInput(f"{what}: n_parts must be >= 1")
    if min(H, I, spec.num_experts, spec.experts_per_tok) < 1 or spec.experts_per_tok > spec.num_experts:
        raise BadInput(f"{what}: bad sizes (experts {spec.num_experts}, per token {spec.experts_per_tok})")
    if I % n:
        raise BadInput(f"{what}: intermediate {I} does not split into {n} equal parts")
    It = I // n
    fam = spec.backend
    problems: list[str] = []

    def need(cond: bool, msg: str) -> None:
        if not cond:
            problems.append(msg)

    if fam == "bf16":
        need(H % 8 == 0 and It % 8 == 0, f"hidden and per-part intermediate ({It}) must be multiples of 8")
    elif fam == "fp8":
        need(H % FP8_BLOCK == 0, f"hidden {H} is not a multiple of the {FP8_BLOCK}-wide FP8 scale blocks")
        # silent failure: I_tp 64 gives NaN / rel 0.5 (engine-facts)
        need(It % FP8_BLOCK == 0,
             f"per-part intermediate {It} is not a multiple of the {FP8_BLOCK}-wide FP8 scale blocks "
             f"(the engine returns NaN/garbage); use fewer parts or --split ep")
    elif fam in ("gptq-int4", "rawint4", "mxfp4"):
        gs = spec.group_size or 0
        need(gs > 0 and gs % 8 == 0, f"group size {gs} must be a positive multiple of 8")
        if gs > 0:
            need(H % gs == 0, f"hidden {H} is not a multiple of the group size {gs}")
            # silent failure: GPTQ with I_tp < gs gives all-zero output (engine-facts)
            need(It % gs == 0,
                 f"per-part intermediate {It} is not a multiple of the group size {gs} "
                 f"(the engine would return zeros or fail); use fewer parts or --split ep")
        if fam == "gptq-int4":
            need(gs in (32, 64, 128), f"group size {gs} untested with AVX2GPTQInt4_MOE (32, 64, 128 work)")
    elif fam == "gguf":
        assert spec.gguf_types is not None
        gate_t, up_t, down_t = (GGML_TYPES[t] for t in spec.gguf_types)
        need(It % LLAMAFILE_QK == 0,
             f"per-part intermediate {It} is not a multiple of {LLAMAFILE_QK} (llamafile splits I in QK_K "
             f"blocks); use fewer parts or --split ep")
        # silent failure: H=128 gives all zeros for qlen >= 10 (engine-facts)
        need(H != 128, "hidden 128 gives all-zero output for 10 or more tokens in llamafile")
        need(H % gate_t.block == 0 and H % up_t.block == 0,
             f"hidden {H} is not a multiple of the gate/up block ({gate_t.name} {gate_t.block}, {up_t.name} {up_t.block})")
        need(It % down_t.block == 0, f"per-part intermediate {It} is not a multiple of {down_t.name}'s block {down_t.block}")
        for t in (gate_t, up_t, down_t):
            need(t.block > 1 or t.name in ("F32", "F16", "BF16"), f"GGML type {t.name} is not a matrix type")
    if problems:
        raise BadInput(f"{what}: " + "; ".join(problems))


def copies_at_load(backend: str, mode: str, tp: int = 1) -> bool:
    """True when the engine copies the weights at `load_weights_task` (the source may go away once
    it has synced); False when it keeps reading them in place (the source must outlive it, so
    `ktnuma.stream` must refuse it). `backend` is a format or BACKENDS key; `tp` the engine's own
    subpool count (1 for the per-node engines ktnuma builds)."""
    fam = _family(backend)
    if fam not in BACKENDS:
        raise BadInput(f"kt-kernel: unknown backend {backend!r}")
    if mode not in MODES:
        raise BadInput(f"kt-kernel: unknown mode {mode!r} (flat or pointers)")
    return not BACKENDS[fam].in_place(mode, int(tp))


# --------------------------------------------------------------------------------------------
# kt-kernel, lazily
# --------------------------------------------------------------------------------------------
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



def _dequantized(spec: EngineSpec, arrays: Mapping[tuple[str, str], Any], used: Sequence[int]) -> dict[str, dict[int, Any]]:
    """Torch reference weights {proj: {expert: W[N, K] float32}} of the experts `used`, from an engine's arrays."""
    from ktnuma.tools import reference as R

    deq: dict[str, dict[int, Any]] = {p: {} for p in PROJS}
    for proj in PROJS:
        n, k = spec._nk(proj)
        wt, sc = arrays[(proj, "weight")], arrays.get((proj, "scale"))
        for e in used:
            deq[proj][e] = R.dequantize(spec.format, wt[e], None if sc is None else sc[e], n=n, k=k,
                                        group_size=spec.group_size)
    return deq


def self_check(
    moe: LoadedMoE,
    cpuinfer: Any,
    arrays: Mapping[tuple[str, str], Any],
    *,
    tokens: int = 12,
    seed: int = 0,
) -> float:
    """Run `moe` on random tokens and compare with the torch reference computed from `arrays`
    (the stacked [E, ...] arrays it was built from, e.g. staged views). Returns the relative L1
    error; raises BadInput when it exceeds the backend's tolerance. Imports torch (engine side)."""
    import numpy as np
    import torch

    from ktnuma.tools import reference as R

    spec = moe.spec
    rng = np.random.default_rng(seed)
    q = min(int(tokens), spec.max_len)
    x = torch.from_numpy(rng.standard_normal((q, spec.hidden), dtype=np.float32)).to(torch.bfloat16)
    ids = np.stack([rng.permutation(spec.num_experts)[: spec.experts_per_tok] for _ in range(q)]).astype(np.int64)
    w = rng.random((q, spec.experts_per_tok), dtype=np.float32)
    out = forward(moe, cpuinfer, x, ids, w)
    used = sorted(set(ids.ravel().tolist()))
    deq = _dequantized(spec, arrays, used)
    ref = R.moe_forward(x, ids, w, deq["gate"], deq["up"], deq["down"])
    err = R.rel_l1(out, ref)
    log.info("self-check %s layer_idx=%d: rel L1 %.4f", spec.engine_class, moe.layer_idx, err)
    if not err < spec.tolerance:
        raise BadInput(
            f"kt-kernel {spec.engine_class} ({spec.format}) disagrees with the torch reference: "
            f"relative L1 {err:.4f} >= {spec.tolerance}"
        )
    return err


# --------------------------------------------------------------------------------------------
# Engines for a staged layer (ktnuma.attach(...).layer(L) or a ktnuma.stream StagedLayer)
# --------------------------------------------------------------------------------------------
# format family -> (which dim of the gate *scale* piece runs along K=H): the group size is H / that dim
GROUP_DIM: dict[str, int] = {"gptq-int4": 0, "rawint4": 1, "mxfp4": 1}

_next_layer_idx = iter(range(1 << 30))


def spec_for_layer(view: Any, *, experts_per_tok: int | None = None, max_len: int = DEFAULT_MAX_LEN) -> EngineSpec:
    """The whole-layer EngineSpec of a staged layer view (format, config and staged records).
    The group size (gptq/rawint4) is read off the staged scale shape; GGUF types off the dtypes."""
    cfg = view.config
    k = experts_per_tok if experts_per_tok is not None else cfg.get("experts_per_tok")
    if not k:
        raise BadInput("kt-kernel: the manifest has no experts_per_tok (GGUF without expert counts?); "
                       "pass experts_per_tok=")
    fam = _family(view.format)
    H = int(cfg["hidden_size"])
    first_node = view.nodes[0] if view.has("gate", "weight", view.nodes[0]) else next(
        n for n in view.nodes if view.has("gate", "weight", n))
    gs = None
    if fam in GROUP_DIM:
        rec = view.record("gate", "scale", first_node)
        gs = H // rec.shape[GROUP_DIM[fam]]
    types = None
    if fam == "gguf":
        types = tuple(view.record(p, "weight", first_node).dtype[5:] for p in PROJS)
    return backend_for(view.format, hidden=H, intermediate=int(cfg["moe_intermediate_size"]),
                       num_experts=int(cfg["num_experts"]), experts_per_tok=int(k), group_size=gs,
                       gguf_types=types, max_len=max_len)


def _check_piece(spec: EngineSpec, view: Any, proj: str, kind: str, node: int) -> None:
    want = spec.piece(proj, kind)
    r = view.record(proj, kind, node)
    if want is None or (r.dtype, tuple(r.shape)) != (want[0], tuple(want[1])):
        raise BadInput(f"kt-kernel {spec.engine_class}: staged layer {view.layer} node {node} {proj} {kind} is "
                       f"{r.dtype} {list(r.shape)}, the engine takes {want} (I per engine {spec.intermediate})")


class _ByExpert:
    """Indexable by expert number -> that expert's piece (ep: pieces spread over node segments)."""

    def __init__(self, view: Any, proj: str, kind: str) -> None:
        self.view, self.proj, self.kind = view, proj, kind

    def __getitem__(self, e: int) -> Any:
        return self.view.tensor(int(e), self.proj, self.kind)


@dataclass
class LayerEngines:
    """The kt-kernel MoE(s) of one staged layer. tp: one engine per node (width I/N, node order),
    whose outputs sum to the layer's; ep: one engine over every expert."""

    layer: int
    split: str
    spec: EngineSpec  # the whole layer
    parts: tuple[LoadedMoE, ...]
    nodes: tuple[int, ...]  # tp: the node of each part
    sources: tuple[Mapping[tuple[str, str], Any], ...]  # per part: arrays indexable by expert (reference)
    copied: int = 0  # bytes gathered into engine-side buffers before load (ep + flat over several nodes)

    def forward_parts(self, cpuinfer: Any, x: Any, ids: Any, weights: Any) -> list[Any]:
        return [forward(m, cpuinfer, x, ids, weights) for m in self.parts]

    def forward(self, cpuinfer: Any, x: Any, ids: Any, weights: Any) -> Any:
        """The layer's output as float32 (the sum of the parts' bf16 outputs)."""
        outs = self.forward_parts(cpuinfer, x, ids, weights)
        total = outs[0].float() if hasattr(outs[0], "float") else outs[0].astype("f4")
        for o in outs[1:]:
            total = total + (o.float() if hasattr(o, "float") else o.astype("f4"))
        return total

    @property
    def in_place(self) -> bool:
        return any(m.in_place for m in self.parts)

    def release_sources(self) -> None:
        """Drop every reference to the staged views (the reference arrays, and the engines' own
        `keep` when they copied at load), so a stream can unmap the layer when it moves on.
        Refused for engines that read the staged memory in place."""
        if self.in_place:
            raise BadInput(f"kt-kernel {self.spec.engine_class}: the engine reads the staged memory in place; "
                           "its sources must outlive it")
        self.sources = ()
        for m in self.parts:
            m.keep = ()


def engines_for_layer(
    view: Any,
    cpuinfer: Any,
    *,
    mode: str | None = None,
    experts_per_tok: int | None = None,
    max_len: int = DEFAULT_MAX_LEN,
    layer_idx: int | None = None,
) -> LayerEngines:
    """Build the kt-kernel MoE(s) of one staged layer (`view`: `Attached.layer(L)` or a stream's
    `StagedLayer`), reading the staged memory directly.

    - `tp` split: one engine per node over that node's slices (intermediate = I/N), `mode` "flat"
      (default: the node's stacked arrays) or "pointers" (the node's row of the pointer table);
    - `ep` split: one engine over all experts: "pointers" (default for the native formats: the
      nodes' pointer rows merged, zero-copy), or "flat" (GGUF's only way: one node's stacked
      arrays as they are, or, when the experts span several nodes, a gathered copy; `copied`
      says how many bytes).
    Engine-only limits (e.g. llamafile's I/N % 256) are refused with BadInput."""
    spec = spec_for_layer(view, experts_per_tok=experts_per_tok, max_len=max_len)
    b = BACKENDS[spec.backend]
    nodes = tuple(view.nodes)
    base = next(_next_layer_idx) * 64 if layer_idx is None else int(layer_idx)
    if view.split == "tp":
        n = len(nodes)
        part = spec.split(n) if n > 1 else spec
        m = mode or "flat"
        parts, sources = [], []
        for pos, node in enumerate(nodes):
            arrays: dict[tuple[str, str], Any] = {}
            refs: dict[tuple[str, str], Any] = {}
            for proj in PROJS:
                for kind in part.kinds:
                    _check_piece(part, view, proj, kind, node)
                    refs[(proj, kind)] = view.array(proj, kind, node)
                    arrays[(proj, kind)] = refs[(proj, kind)] if m == "flat" else view.pointers(proj, kind)[pos]
            parts.append(build_moe(cpuinfer, part, arrays, mode=m, layer_idx=base + pos))
            sources.append(refs)
        return LayerEngines(view.layer, "tp", spec, tuple(parts), nodes, tuple(sources))
    if view.split != "ep":
        raise BadInput(f"kt-kernel: unknown split {view.split!r}")
    m = mode or ("pointers" if b.pointer_mode else "flat")
    holders = [nd for nd in nodes if view.has("gate", "weight", nd)]
    arrays = {}
    refs = {}
    copied = 0
    for proj in PROJS:
        for kind in spec.kinds:
            for nd in holders:
                _check_piece(spec, view, proj, kind, nd)
            refs[(proj, kind)] = _ByExpert(view, proj, kind)
            if m == "pointers":
                arrays[(proj, kind)] = merge_node_rows(view.pointers(proj, kind), f"layer {view.layer} {proj} {kind}")
            elif len(holders) == 1:
                arrays[(proj, kind)] = view.array(proj, kind, holders[0])
            else:
                import numpy as np

                ordered = sorted(holders, key=lambda nd: view.record(proj, kind, nd).first)
                arrays[(proj, kind)] = np.concatenate([view.array(proj, kind, nd) for nd in ordered])
                copied += arrays[(proj, kind)].nbytes
    if copied:
        log.info("layer %d: %s over %d nodes takes one stacked buffer: gathered %d bytes", view.layer,
                 spec.engine_class, len(holders), copied)
    moe = build_moe(cpuinfer, spec, arrays, mode=m, layer_idx=base)
    return LayerEngines(view.layer, "ep", spec, (moe,), tuple(holders), (refs,), copied)


def layer_reference(engines: LayerEngines, x: Any, ids: Any, weights: Any) -> Any:
    """Torch reference of the layer (float32 [q, H]): the sum over parts of the MoE of each part's
    dequantized weights (tp: the node slices; ep: all experts)."""
    import numpy as np

    from ktnuma.tools import reference as R

    ids_np = np.asarray(ids.cpu() if hasattr(ids, "cpu") else ids)
    used = sorted(set(ids_np.ravel().tolist()))
    total = None
    for moe, src in zip(engines.parts, engines.sources):
        deq = _dequantized(moe.spec, src, used)
        ref = R.moe_forward(x, ids, weights, deq["gate"], deq["up"], deq["down"]).float()
        total = ref if total is None else total + ref
    return total


def random_tokens(spec: EngineSpec, tokens: int, seed: int = 0) -> tuple[Any, Any, Any]:
    """x [q, H] bf16 (torch), ids [q, k] int64, routing weights [q, k] float32 (numpy)."""
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    q = min(int(tokens), spec.max_len)
    x = torch.from_numpy(rng.standard_normal((q, spec.hidden), dtype=np.float32)).to(torch.bfloat16)
    ids = np.stack([rng.permutation(spec.num_experts)[: spec.experts_per_tok] for _ in range(q)]).astype(np.int64)
    w = rng.random((q, spec.experts_per_tok), dtype=np.float32)
    return x, ids, w


def check_layer(engines: LayerEngines, cpuinfer: Any, *, tokens: int = 12, seed: int = 0) -> tuple[float, float]:
    """Forward random tokens through the layer's engines and compare with the torch reference.
    Returns (relative L1, forward seconds); raises BadInput above the backend's tolerance."""
    import time

    from ktnuma.tools import reference as R

    x, ids, w = random_tokens(engines.spec, tokens, seed)
    t0 = time.perf_counter()
    out = engines.forward(cpuinfer, x, ids, w)
    dt = time.perf_counter() - t0
    err = R.rel_l1(out, layer_reference(engines, x, ids, w))
    tol = engines.spec.tolerance
    if not err < tol:
        raise BadInput(f"kt-kernel {engines.spec.engine_class} ({engines.spec.format}) layer {engines.layer}: "
                       f"relative L1 {err:.4f} vs the torch reference >= {tol}")
    return err, dt
