"""One record per kt-kernel method: which ktnuma format it takes, which wrapper class serves it, which
splits a resident run may use for it, and how a staged piece becomes exactly what kt-kernel 0.7.2's own
loader returns for it (dtype and shape, zero-copy views only).

What upstream's loaders return (kt_kernel/utils/loader.py, facts):

| method          | wrapper   | loader output, per expert (logical order, all E)                     |
|-----------------|-----------|----------------------------------------------------------------------|
| BF16            | native    | gate/up/down bf16 [N, K]; no scale keys                              |
| FP8             | native    | e4m3 (torch.float8_e4m3fn) [N, K]; *_scale as stored (f32 blocks)    |
| FP8_PERCHANNEL  | native    | e4m3 [N, K]; *_scale [N] (an [N, 1] scale squeezed)                  |
| GPTQ_INT4       | native    | qweight i32 [K/8, N]; scales f32 [K/gs, N] (f16 converted)           |
| RAWINT4         | native    | u8 [N, K/2] (the i32 [N, K/8] words as bytes); bf16 [N, K/gs]        |
| MXFP4           | native    | u8 [N, K/2]; bf16 [N, K/32] (ue8m0 << 7)                             |
| NVFP4           | native    | u8 [N, K/2]; bf16 [N, K/16] (e4m3 block x global, folded)            |
| MXFP8           | native    | u8 [N, K] (the e4m3 bytes); u8 ue8m0 [N, K/32]                       |
| AMXINT4/AMXINT8 | amx       | numpy [numa][expert] of the `.numa.{n}` shards as stored             |
| LLAMAFILE       | llamafile | whole-layer stacked GGUF bytes (torch u8, 1-D) + the GGML type       |
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ktnuma.errors import BadInput
from ktnuma.index.quant import family

# torch dtype names the loaders hand out, by staged dtype (what the attach torch view gives)
# (torch view of one staged piece, kind, the expert's NVFP4 global scale or None) -> what upstream returns
Viewer = Callable[[Any, str, Any], Any]


def _as_is(t: Any, kind: str, g: Any = None) -> Any:
    return t


def _fold_nvfp4(t: Any, kind: str, g: Any = None) -> Any:
    """NVFP4 scales: bf16(f32(e4m3 block scale) * f32 global), as kt-kernel's loader folds them (a copy
    of the scales only; the weights stay zero-copy)."""
    if kind != "scale":
        return t
    import torch

    return (t.to(torch.float32) * torch.tensor(g, dtype=torch.float32).reshape(())).to(torch.bfloat16).contiguous()


def _weight_bytes(t: Any, kind: str, g: Any = None) -> Any:
    """i32 words / e4m3 bytes -> the same bytes as uint8 (RAWINT4, MXFP8 weights)."""
    if kind != "weight":
        return t
    import torch

    return t.view(torch.uint8)


def _squeeze_channel(t: Any, kind: str, g: Any = None) -> Any:
    """FP8_PERCHANNEL: an [N, 1] scale comes out as [N]."""
    if kind == "scale" and t.dim() == 2 and t.shape[1] == 1:
        return t.squeeze(1)
    return t


def _rawint4_in_place(amx: Any) -> bool:
    """kt-kernel's RAWINT4 pick on this CPU: its AVX2 / AVX-VNNI engines read the source in place
    (measured for AVX2RawInt4_MOE), the AMX KGroup engines repack into their own buffers."""
    picked = amx._select_rawint4_backend(None)
    return picked is not None and picked.__name__ not in ("AMXInt4_KGroup_MOE", "AMXInt4_KGroupBlocked_MOE")


@dataclass(frozen=True)
class Method:
    name: str  # kt-kernel method string
    family: str  # ktnuma format family it takes ("gguf" for any gguf:<T>)
    wrapper: str  # "native" | "amx" | "llamafile"
    splits: tuple[str, ...]  # resident splits it takes ("tp": one node for native methods, pre-sharded for amx)
    view: Viewer = _as_is
    scales: bool = True  # the loader returns *_scale keys
    needs_amx: Callable[[Mapping[str, str]], bool] = lambda env: False  # (environment) -> engine needs AMX
    # (threadpool_count, kt_kernel.utils.amx) -> the engine kt-kernel picks keeps reading the source after load
    in_place: Callable[[int, Any], bool] = lambda tp, amx: False
    globals: bool = False  # the view needs each expert's per-tensor global scale (NVFP4)
    amx_engine: str = ""  # the AMX-only engine, named in the refusal


# native methods take whole experts: tp-whole (each kt part's rows on its node: the split for several
# nodes), ep (whole experts, each on one node), tp only over one node (every piece whole)
NATIVE_SPLITS = ("tp-whole", "ep", "tp")

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("BF16", "bf16", "native", NATIVE_SPLITS, scales=False),
        Method("FP8", "fp8", "native", NATIVE_SPLITS),
        Method("FP8_PERCHANNEL", "fp8", "native", NATIVE_SPLITS, _squeeze_channel,
               needs_amx=lambda env: True, amx_engine="AMXFP8PerChannel_MOE (no AVX2 engine exists)"),
        Method("GPTQ_INT4", "gptq-int4", "native", NATIVE_SPLITS),
        Method("RAWINT4", "rawint4", "native", NATIVE_SPLITS, _weight_bytes, in_place=lambda tp, amx: _rawint4_in_place(amx)),
        Method("MXFP4", "mxfp4", "native", NATIVE_SPLITS),
        Method("NVFP4", "nvfp4", "native", NATIVE_SPLITS, _fold_nvfp4, globals=True),
        Method("MXFP8", "mxfp8", "native", NATIVE_SPLITS, _weight_bytes,
               needs_amx=lambda env: env.get("KT_MXFP8_BACKEND", "").strip().lower() == "amx",
               amx_engine="AMXMXFP8_KGroup_MOE (forced by KT_MXFP8_BACKEND=amx; unset it for AVX2MXFP8_MOE)"),
        Method("AMXINT4", "amx-int4", "amx", ("tp",)),
        Method("AMXINT8", "amx-int8", "amx", ("tp",)),
        Method("LLAMAFILE", "gguf", "llamafile", ("ep", "tp"), in_place=lambda tp, amx: tp == 1),
    )
}
# kt-kernel method for a ktnuma format family (the way out of a mismatch)
METHOD_FOR_FAMILY: dict[str, str] = {"bf16": "BF16", "fp8": "FP8", "gptq-int4": "GPTQ_INT4", "rawint4": "RAWINT4",
                                     "mxfp4": "MXFP4", "nvfp4": "NVFP4", "mxfp8": "MXFP8", "amx-int4": "AMXINT4",
                                     "amx-int8": "AMXINT8", "gguf": "LLAMAFILE"}


def split_refusal(m: Method, split: str, n_nodes: int) -> str | None:
    """What method `m` takes instead of a `split` run over `n_nodes` nodes, with the way out (None: it
    takes it). Native methods slice whole experts per part themselves: a sliced tp run over several
    nodes would hand them 1/N of each expert."""
    if split in m.splits and not (split == "tp" and m.wrapper != "amx" and n_nodes > 1):
        return None
    if m.wrapper == "amx":
        return "pre-sharded .numa shards: stage it again with `python -m ktnuma.launch MODEL --split tp` (shard n on node n)"
    if m.wrapper == "native":
        return ("whole experts: stage it again with `python -m ktnuma.launch MODEL --split tp-whole` (each kt part's "
                "rows on its node), or --split ep")
    return "whole experts: stage it again with `python -m ktnuma.launch MODEL --split ep`"


def handoff_split(m: Method, threadpool_count: int) -> str:
    """The split a handoff (KTNUMA_STAGE) stages for `m` over `threadpool_count` parts."""
    if m.wrapper == "amx" or threadpool_count == 1:
        return "tp"  # amx: shard n on node n; one part: whole pieces
    return "tp-whole" if m.wrapper == "native" else "ep"


def method(name: str) -> Method:
    m = METHODS.get(str(name))
    if m is None:
        raise BadInput(f"ktnuma: kt-kernel method {name!r} has no ktnuma loader (ktnuma serves "
                       f"{', '.join(METHODS)}); unset KTNUMA_MANIFEST/KTNUMA_STAGE to load it the stock way")
    return m


def check_format(m: Method, fmt: str, where: str) -> None:
    """Refuse a staged format the method does not read (one line, the way out)."""
    fam = family(fmt)
    if fam == m.family:
        return
    want = METHOD_FOR_FAMILY.get(fam)
    out = f"use --kt-method {want}" if want else "stage a model in a format this method reads"
    raise BadInput(f"{where}holds format {fmt}, but kt-kernel method {m.name} reads {m.family}; {out}")


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags (the first ``flags`` line of /proc/cpuinfo; empty if unreadable)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_amx(cpuinfo: str = "/proc/cpuinfo") -> bool:
    return "amx_tile" in cpu_flags(cpuinfo)


def check_cpu(m: Method, env: Mapping[str, str], has_amx: bool) -> None:
    """Refuse an engine that needs AMX on a CPU without it (before any weight moves)."""
    if m.needs_amx(env) and not has_amx:
        raise BadInput(f"ktnuma: kt-kernel method {m.name} runs on {m.amx_engine}, which needs AMX (amx_tile), "
                       "and this CPU has none; stage the model in a format with an AVX2 engine "
                       "(e.g. fp8 block scales, --kt-method FP8) or run on an AMX CPU")
