"""ENCODERS: how one linear layer [N, K] is stored in each format (its Leaf tensors)."""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

from ktnuma.index.dtypes import FP8_BLOCK
from ktnuma.index.quant import MXFP4_GROUP, MXFP8_GROUP, NVFP4_GROUP
from ktnuma.tools.synth.gen import GENERATORS, Gen, _gen_const_i32, _gen_fill_u32, _gen_g_idx

# --------------------------------------------------------------------------- per-format encodings of one linear


@dataclass(frozen=True)
class Leaf:
    """One stored tensor of a linear layer: suffix after the stem, dtype, shape, generator, staged kind."""

    suffix: str
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]
    gen: Gen
    kind: str | None  # "weight" / "scale" for what ktnuma stages of a routed expert; None otherwise


@dataclass(frozen=True)
class Opts:
    group_size: int
    per_channel: bool
    variants: frozenset[str]
    numa_shards: int
    gguf_types: tuple[str, str, str]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _enc_bf16(o: Opts, n: int, k: int) -> list[Leaf]:
    return [Leaf("weight", "BF16", (n, k), GENERATORS["bf16"], "weight")]


def _enc_fp8(o: Opts, n: int, k: int) -> list[Leaf]:
    w = Leaf("weight", "F8_E4M3", (n, k), GENERATORS["e4m3"], "weight")
    if o.per_channel:
        shape = (n,) if "1d" in o.variants else (n, 1)
        return [w, Leaf("weight_scale", "F32", shape, GENERATORS["f32+"], "scale")]
    blocks = (_cdiv(n, FP8_BLOCK), _cdiv(k, FP8_BLOCK))
    if "bf16-scale" in o.variants:  # llm-compressor FP8_BLOCK: bf16 block scales named weight_scale
        return [w, Leaf("weight_scale", "BF16", blocks, GENERATORS["bf16+"], "scale")]
    return [w, Leaf("weight_scale_inv", "F32", blocks, GENERATORS["f32+"], "scale")]


def _enc_rawint4(o: Opts, n: int, k: int) -> list[Leaf]:
    gs = o.group_size
    leaves = [
        Leaf("weight_packed", "I32", (n, k // 8), GENERATORS["i32"], "weight"),  # 8 signed nibbles, low first
        Leaf("weight_scale", "BF16", (n, k // gs), GENERATORS["bf16+"], "scale"),
        Leaf("weight_shape", "I32", (2,), functools.partial(_gen_const_i32, (n, k)), None),
    ]
    if "asym" in o.variants:  # compressed-tensors packs zero points along the output dim
        leaves.append(Leaf("weight_zero_point", "I32", (_cdiv(n, 8), k // gs), GENERATORS["i32"], None))
    return leaves


def _enc_gptq(o: Opts, n: int, k: int) -> list[Leaf]:
    gs = o.group_size
    qzeros = GENERATORS["i32"] if "asym" in o.variants else functools.partial(_gen_fill_u32, 0x88888888)
    return [
        Leaf("qweight", "I32", (k // 8, n), GENERATORS["i32"], "weight"),  # nibble q+8 at bits 4*(k%8)
        Leaf("scales", "F16", (k // gs, n), GENERATORS["f16+"], "scale"),
        Leaf("qzeros", "I32", (k // gs, n // 8), qzeros, None),
        Leaf("g_idx", "I32", (k,), functools.partial(_gen_g_idx, k, gs, "desc_act" in o.variants), None),
    ]


def _enc_mxfp8(o: Opts, n: int, k: int) -> list[Leaf]:
    return [  # MiniMax-M3: e4m3 weights, ue8m0 u8 scales per 32 along K named weight_scale_inv
        Leaf("weight", "F8_E4M3", (n, k), GENERATORS["e4m3"], "weight"),
        Leaf("weight_scale_inv", "U8", (n, k // MXFP8_GROUP), GENERATORS["e8m0"], "scale"),
    ]


def _enc_nvfp4(o: Opts, n: int, k: int) -> list[Leaf]:
    return [  # ModelOpt: E2M1 nibbles, e4m3 scale per 16 along K, per-tensor f32 global, activation scale
        Leaf("weight", "U8", (n, k // 2), GENERATORS["u8"], "weight"),
        Leaf("weight_scale", "F8_E4M3", (n, k // NVFP4_GROUP), GENERATORS["e4m3+"], "scale"),
        Leaf("weight_scale_2", "F32", (), GENERATORS["f32+"], None),
        Leaf("input_scale", "F32", (), GENERATORS["f32+"], None),
    ]


def _enc_mxfp4(o: Opts, n: int, k: int) -> list[Leaf]:
    return [
        Leaf("weight", "I8", (n, k // 2), GENERATORS["i8"], "weight"),  # E2M1, low nibble = even column
        Leaf("scale", "F8_E8M0", (n, k // MXFP4_GROUP), GENERATORS["e8m0"], "scale"),
    ]


ENCODERS: dict[str, Callable[[Opts, int, int], list[Leaf]]] = {
    "bf16": _enc_bf16,
    "fp8": _enc_fp8,
    "rawint4": _enc_rawint4,
    "gptq-int4": _enc_gptq,
    "mxfp4": _enc_mxfp4,
    "mxfp8": _enc_mxfp8,
    "nvfp4": _enc_nvfp4,
}
