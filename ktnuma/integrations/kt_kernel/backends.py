"""One table: ktnuma format -> kt-kernel backend, the engine spec, and the limits kt-kernel does not
check itself (see the package docstring for the data each engine takes)."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Callable

from ktnuma.errors import BadInput
from ktnuma.index.dtypes import DTYPES, FP8_BLOCK, GGML_TYPES, ggml_nbytes
from ktnuma.index.quant import MXFP4_GROUP, MXFP8_GROUP, NVFP4_GROUP
from ktnuma.index.quant import family as _family
from ktnuma.index.model import KINDS, PROJS
from ktnuma.integrations.kt_kernel.methods import cpu_flags

log = logging.getLogger(__name__)

MODES = ("flat", "pointers")

LLAMAFILE_QK = 256  # llamafile splits I in QK_K blocks
DEFAULT_MAX_LEN = 64


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
        # formats rows (engineer A): MiniMax-M3 MXFP8 (u8 ue8m0 scales as staged) and ModelOpt NVFP4 on the
        # FP4 kernel with group 16; NVFP4 takes bf16 scales = the staged e4m3 folded with the record's
        # global_scale (model.notes; ktnuma.tools.reference.fold_nvfp4)
        Backend("mxfp8", "AVX2MXFP8_MOE", lambda n, k, gs: ("f8_e4m3", (n, k)),
                lambda n, k, gs: ("u8", (n, k // MXFP8_GROUP)),
                8, MXFP8_GROUP, MXFP8_GROUP, True, lambda mode, tp: False, 0.02),
        Backend("nvfp4", "AVX2MXFP4_MOE", lambda n, k, gs: ("u8", (n, k // 2)),
                lambda n, k, gs: ("bf16", (n, k // NVFP4_GROUP)),
                4, NVFP4_GROUP, NVFP4_GROUP, True, lambda mode, tp: False, 0.02),
        Backend("gguf", "MOE", None, None,
                None, None, None, False, lambda mode, tp: tp == 1, 0.04),
    )
}



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
            return ggml_nbytes(dtype[5:], shape[0] * shape[1])
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
             f"(the engine returns NaN/garbage); use fewer parts or split=ep")
    elif fam in ("gptq-int4", "rawint4", "mxfp4", "mxfp8", "nvfp4"):
        gs = spec.group_size or 0
        need(gs > 0 and gs % 8 == 0, f"group size {gs} must be a positive multiple of 8")
        if gs > 0:
            need(H % gs == 0, f"hidden {H} is not a multiple of the group size {gs}")
            # silent failure: GPTQ with I_tp < gs gives all-zero output (engine-facts)
            need(It % gs == 0,
                 f"per-part intermediate {It} is not a multiple of the group size {gs} "
                 f"(the engine would return zeros or fail); use fewer parts or split=ep")
        if fam == "gptq-int4":
            need(gs in (32, 64, 128), f"group size {gs} untested with AVX2GPTQInt4_MOE (32, 64, 128 work)")
    elif fam == "gguf":
        assert spec.gguf_types is not None
        gate_t, up_t, down_t = (GGML_TYPES[t] for t in spec.gguf_types)
        need(It % LLAMAFILE_QK == 0,
             f"per-part intermediate {It} is not a multiple of {LLAMAFILE_QK} (llamafile splits I in QK_K "
             f"blocks); use fewer parts or split=ep")
        # silent failure: H=128 gives all zeros for qlen >= 10 (engine-facts)
        need(H != 128, "hidden 128 gives all-zero output for 10 or more tokens in llamafile")
        need(H % gate_t.block == 0 and H % up_t.block == 0,
             f"hidden {H} is not a multiple of the gate/up block ({gate_t.name} {gate_t.block}, {up_t.name} {up_t.block})")
        need(It % down_t.block == 0, f"per-part intermediate {It} is not a multiple of {down_t.name}'s block {down_t.block}")
        for t in (gate_t, up_t, down_t):
            need(t.block > 1 or t.name in ("F32", "F16", "BF16"), f"GGML type {t.name} is not a matrix type")
    if problems:
        raise BadInput(f"{what}: " + "; ".join(problems))


# GGML types kt-kernel 0.7.2's llamafile engine computes wrongly on a CPU without a flag, silently:
# BF16 on an AVX2-only CPU (AMD EPYC family 25) returned zeros or garbage that differed run to run;
# on an AVX-512 BF16 CPU the same engines matched the writer's tensors (tests/test_corpus.py)
LLAMAFILE_TYPE_NEEDS = {"BF16": "avx512_bf16"}


def check_engine_cpu(spec: EngineSpec, flags: frozenset[str] | None = None) -> None:
    """Refuse an engine this CPU would run wrongly (LLAMAFILE_TYPE_NEEDS): BadInput with the way out."""
    if spec.backend != "gguf" or not spec.gguf_types:
        return
    have = cpu_flags() if flags is None else flags
    for t in dict.fromkeys(spec.gguf_types):
        need = LLAMAFILE_TYPE_NEEDS.get(t)
        if need and need not in have:
            raise BadInput(f"kt-kernel {spec.engine_class} ({spec.format}): GGML type {t} needs a CPU with "
                           f"{need}, which this one lacks (kt-kernel 0.7.2's llamafile engine returns zeros or "
                           "garbage without it); requantize the GGUF (e.g. Q8_0) or use a CPU with AVX-512 BF16")


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



@dataclass(frozen=True)
class EngineKind:
    """What `ktnuma.stream(engine=...)` asks of an engine: whether it copies the weights at load.
    `engine_kind("rawint4", "pointers")` is kt-kernel's RAWINT4 in pointer mode (reads in place)."""

    backend: str  # a format or BACKENDS key
    mode: str = "flat"  # flat | pointers
    tp: int = 1  # the engine's own subpool count

    @property
    def copies_at_load(self) -> bool:
        return copies_at_load(self.backend, self.mode, self.tp)

    def __str__(self) -> str:
        return f"kt-kernel {self.backend} engine in {self.mode} mode (engine tp {self.tp})"


def engine_kind(backend: str, mode: str = "flat", tp: int = 1) -> EngineKind:
    """An EngineKind, checked (unknown backend or mode: BadInput)."""
    kind = EngineKind(str(backend), str(mode), int(tp))
    kind.copies_at_load  # noqa: B018 - validates backend and mode now, not inside stream()
    return kind
