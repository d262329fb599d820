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

from importlib import import_module
from typing import Any

# public name -> submodule: imported on first use, so the .pth hook (activate) and ktnuma's workers,
# which inherit the activation variables, import none of this at start-up
_WHERE = {
    **dict.fromkeys(("BACKENDS", "DEFAULT_MAX_LEN", "LLAMAFILE_QK", "MODES", "MXFP4_GROUP", "Backend", "EngineSpec",
                     "backend_for", "check_engine_cpu", "check_engine_limits", "copies_at_load", "EngineKind",
                     "engine_kind", "LLAMAFILE_TYPE_NEEDS"), "backends"),
    **dict.fromkeys(("LoadedMoE", "available", "build_moe", "forward", "make_cpuinfer", "merge_node_rows"), "engine"),
    **dict.fromkeys(("GROUP_DIM", "LayerEngines", "engines_for_layer", "random_tokens", "spec_for_layer"),
                    "layers"),
    **dict.fromkeys(("KINDS", "PROJS"), "ktnuma.index.model"),
    "cpu_flags": "methods",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    mod = import_module(where if "." in where else f"{__name__}.{where}")
    value = getattr(mod, name)
    globals()[name] = value
    return value
