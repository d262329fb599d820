"""Synthetic MoE checkpoints in every upstream format ktnuma reads (`python -m ktnuma.tools.synth`).

A model is fully determined by its arguments and `seed`: every tensor's bytes come from a generator
seeded by (seed, tensor name), so the same call writes the same bytes whatever the sharding.
Encodings are real (bf16, e4m3 + f32 block scales, GPTQ / compressed-tensors int4 packing, e2m1 + e8m0,
GGUF blocks with finite scales) but values are random: the files exist to be indexed and staged.

Besides routed experts each model carries what must *not* be staged: a dense layer 0, routers (and
their bias), shared experts, attention and norm weights, embeddings, GPTQ `qzeros`/`g_idx`,
compressed-tensors `weight_shape`, and for the DeepSeek namings an MTP layer numbered
`num_hidden_layers` that has experts too. MoE layers are 1..layers.

Everything is table driven: NAMINGS (tensor names of a checkpoint family), ENCODERS (how one linear
layer is stored in a format), GENERATORS (random bytes of one stored dtype), GGUF_BLOCK_SCALES (where a
K-quant block keeps its f16 scales).
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import Any

import numpy as np

from ktnuma.text import ranges
from ktnuma.index.dtypes import FP8_BLOCK, GGML_TYPES, SAFETENSORS_DTYPES, ggml_nbytes
from ktnuma.index.quant import MXFP4_GROUP
from ktnuma.tools.st_write import StTensor, write_safetensors
from ktnuma.index.model import PROJS

log = logging.getLogger(__name__)

VOCAB = 256  # embedding rows: small, the vocabulary is not what is being tested
ATTN_DIM = 64  # o_proj input width
GGUF_FILE = "model.gguf"

# --------------------------------------------------------------------------- random data generators
# Each takes (rng, number of stored elements) and returns a C-contiguous array of exactly that many
# elements of the stored dtype's width. Bulk data is the bit generator's raw output plus integer masking, never float math.

Gen = Callable[[np.random.Generator, int], np.ndarray]


def _raw(rng: np.random.Generator, nbytes: int) -> np.ndarray:
    """`nbytes` random bytes as a writable uint8 array (the bit generator's raw output: fastest)."""
    return rng.bit_generator.random_raw(-(-nbytes // 8)).view(np.uint8)[:nbytes]


def _bits16(rng: np.random.Generator, n: int, keep: int, set_: int) -> np.ndarray:
    r = _raw(rng, 2 * n).view("<u2")
    r &= np.uint16(keep)
    r |= np.uint16(set_)
    return r


def _gen_bf16(rng: np.random.Generator, n: int) -> np.ndarray:
    """Finite bf16 bits: random sign, mantissa and low 3 exponent bits, exponent 120..127 (|x| in [2^-7, 2))."""
    return _bits16(rng, n, 0x83FF, 0x3C00)


def _gen_bf16_pos(rng: np.random.Generator, n: int) -> np.ndarray:
    """Positive finite bf16 (scales): exponent 112..119 (x in [2^-15, 2^-7))."""
    return _bits16(rng, n, 0x03FF, 0x3800)


def _gen_f16(rng: np.random.Generator, n: int) -> np.ndarray:
    """Finite f16 bits: random sign and mantissa, exponent 8..11 (|x| in [2^-7, 2^-3))."""
    return _bits16(rng, n, 0x8FFF, 0x2000)


def _gen_f16_pos(rng: np.random.Generator, n: int) -> np.ndarray:
    """Positive finite f16 (GPTQ scales): exponent 8..11 (x in [2^-7, 2^-3))."""
    return _bits16(rng, n, 0x0FFF, 0x2000)


def _gen_f16_block_scale(rng: np.random.Generator, n: int) -> np.ndarray:
    """Positive f16 for GGUF block d/dmin: exponent 1..4 (x in [2^-14, 2^-10]), so dequantized
    K-quant values stay around 1 (Q6_K: d * scale(<=127) * 32)."""
    r = _raw(rng, 2 * n).view("<u2")
    return (r & np.uint16(0x03FF)) | ((((r >> 10) & np.uint16(3)) + np.uint16(1)) << np.uint16(10))


def _gen_f32(rng: np.random.Generator, n: int) -> np.ndarray:
    return (rng.standard_normal(n, dtype=np.float32) * np.float32(0.02)).astype("<f4")


def _gen_f32_pos(rng: np.random.Generator, n: int) -> np.ndarray:
    return (rng.random(n, dtype=np.float32) * np.float32(1e-3) + np.float32(1e-4)).astype("<f4")


def _gen_ones_f32(rng: np.random.Generator, n: int) -> np.ndarray:  # norms
    return (np.float32(1.0) + rng.standard_normal(n, dtype=np.float32) * np.float32(0.01)).astype("<f4")


def _gen_bytes(rng: np.random.Generator, n: int, width: int = 1) -> np.ndarray:
    return _raw(rng, n * width)


def _gen_e4m3(rng: np.random.Generator, n: int) -> np.ndarray:
    """e4m3fn bits without NaN: the top exponent bit is cleared (|x| <= 1.875)."""
    r = _raw(rng, n)
    r &= np.uint8(0xBF)
    return r


def _gen_e8m0(rng: np.random.Generator, n: int) -> np.ndarray:
    """UE8M0 scale exponents in a sane range (2^-9 .. 2^3); 255 (NaN) never occurs."""
    return rng.integers(118, 131, size=n, dtype=np.uint8)


def _gen_const_i32(values: Sequence[int], rng: np.random.Generator, n: int) -> np.ndarray:
    out = np.asarray(values, dtype="<i4")
    assert out.size == n
    return out


def _gen_fill_u32(value: int, rng: np.random.Generator, n: int) -> np.ndarray:
    return np.full(n, value, dtype="<u4")


def _gen_g_idx(k: int, gs: int, shuffled: bool, rng: np.random.Generator, n: int) -> np.ndarray:
    g = (np.arange(k, dtype="<i4") // gs).astype("<i4")
    if shuffled:  # desc_act: groups follow an activation order, not the column order
        g = g[rng.permutation(k)]
    return g


GENERATORS: dict[str, Gen] = {
    "bf16": _gen_bf16,
    "bf16+": _gen_bf16_pos,
    "f16": _gen_f16,
    "f16+": _gen_f16_pos,
    "f16d": _gen_f16_block_scale,
    "f32": _gen_f32,
    "f32+": _gen_f32_pos,
    "norm": _gen_ones_f32,
    "e4m3": _gen_e4m3,
    "e8m0": _gen_e8m0,
    "u8": _gen_bytes,
    "i8": _gen_bytes,
    "i32": functools.partial(_gen_bytes, width=4),
}


def _rng(seed: int, name: str) -> np.random.Generator:
    digest = hashlib.blake2b(name.encode(), digest_size=16).digest()
    return np.random.default_rng([seed, *np.frombuffer(digest, dtype="<u4").tolist()])


def _produce(seed: int, name: str, gen: Gen, count: int) -> np.ndarray:
    return np.ascontiguousarray(gen(_rng(seed, name), count))


# --------------------------------------------------------------------------- namings


@dataclass(frozen=True)
class Naming:
    """Tensor names of one checkpoint family. Templates are relative to `layer` unless noted."""

    name: str
    layer: str  # layer prefix, "{L}" is the layer number
    expert: str  # routed expert stem, "{e}" expert, "{p}" proj name from `projs`
    projs: tuple[str, str, str]  # gate, up, down names of the routed experts
    dense: str  # dense MLP stem of layer 0, "{p}" from `dense_projs`
    dense_projs: tuple[str, str, str]
    shared: str  # shared expert stem, "{p}" from `dense_projs`
    router: str  # full tensor name(s) relative to the layer, comma separated; first is [E, H]
    router_bias: str | None  # relative tensor name of an [E] f32 router bias
    attn: str  # attention output projection stem, [H, ATTN_DIM]
    norms: tuple[str, ...]
    embed: str  # absolute stems
    final_norm: str
    head: str
    mtp: bool  # DeepSeek family: an MTP layer numbered num_hidden_layers carries experts
    config: str  # CONFIGS key
    extra: tuple[str, ...] = ()  # absolute names of further bf16 [H, ATTN_DIM] tensors (e.g. a vision tower)


_HF = ("gate_proj", "up_proj", "down_proj")
_W = ("w1", "w3", "w2")
_BLK = ("gate", "up", "down")

NAMINGS: dict[str, Naming] = {
    n.name: n
    for n in (
        Naming("deepseek", "model.layers.{L}", "mlp.experts.{e}.{p}", _HF, "mlp.{p}", _HF,
               "mlp.shared_experts.{p}", "mlp.gate.weight", "mlp.gate.e_score_correction_bias",
               "self_attn.o_proj", ("input_layernorm", "post_attention_layernorm"),
               "model.embed_tokens", "model.norm", "lm_head", True, "deepseek"),
        Naming("mixtral", "model.layers.{L}", "block_sparse_moe.experts.{e}.{p}", _W, "mlp.{p}", _HF,
               "mlp.shared_experts.{p}", "block_sparse_moe.gate.weight", None,
               "self_attn.o_proj", ("input_layernorm", "post_attention_layernorm"),
               "model.embed_tokens", "model.norm", "lm_head", False, "mixtral"),
        Naming("mistral", "layers.{L}", "experts.{e}.{p}", _W, "feed_forward.{p}", _W,
               "shared_experts.{p}", "gate.weight", None,
               "attention.wo", ("attention_norm", "ffn_norm"),
               "tok_embeddings", "norm", "output", False, "mixtral"),
        Naming("qwen-packed", "model.language_model.layers.{L}", "mlp.experts.{p}",
               ("gate_up_proj", "gate_up_proj", "down_proj"), "mlp.{p}", _HF,
               "mlp.shared_expert.{p}", "mlp.gate.weight,mlp.shared_expert_gate.weight", None,
               "self_attn.o_proj", ("input_layernorm", "post_attention_layernorm"),
               "model.language_model.embed_tokens", "model.language_model.norm", "lm_head", False, "qwen",
               extra=("model.visual.blocks.0.attn.proj.weight",)),
        Naming("deepseek-v4", "layers.{L}", "ffn.experts.{e}.{p}", _W, "ffn.{p}", _W,
               "ffn.shared_experts.{p}", "ffn.gate.weight", "ffn.gate.bias",
               "attn.wo", ("attn_norm", "ffn_norm"), "embed", "norm", "head", True, "deepseek-v4"),
        Naming("amx", "blk.{L}", "ffn_{p}_exps.{e}", _BLK, "ffn_{p}", _BLK,
               "ffn_{p}_shexp", "ffn_gate_inp.weight", "exp_probs_b.bias",
               "attn_output", ("attn_norm", "ffn_norm"), "token_embd", "output_norm", "output", False, "deepseek"),
        Naming("gguf", "blk.{L}", "ffn_{p}_exps", _BLK, "ffn_{p}", _BLK,
               "ffn_{p}_shexp", "ffn_gate_inp.weight", "exp_probs_b.bias",
               "attn_output", ("attn_norm", "ffn_norm"), "token_embd", "output_norm", "output", False, "gguf"),
    )
}

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
    return [w, Leaf("weight_scale_inv", "F32", (_cdiv(n, FP8_BLOCK), _cdiv(k, FP8_BLOCK)), GENERATORS["f32+"], "scale")]


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
}

# --------------------------------------------------------------------------- formats


@dataclass(frozen=True)
class Format:
    name: str
    container: str  # "safetensors" | "gguf"
    layout: str  # "per-expert" | "amx" | "gguf"
    namings: tuple[str, ...]  # first is the default
    variants: tuple[str, ...] = ()
    group_size: int | None = None  # default group size where the format has one
    k_multiple: int = 1  # K (input dim) must be a multiple of this (times group size where relevant)
    amx_bits: int = 0


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("bf16", "safetensors", "per-expert", ("deepseek", "mixtral", "mistral", "qwen-packed")),
        Format("fp8", "safetensors", "per-expert", ("deepseek", "mixtral", "mistral"), ("1d",)),
        Format("rawint4", "safetensors", "per-expert", ("deepseek", "mixtral", "mistral"), ("asym",), 32, 8),
        Format("gptq-int4", "safetensors", "per-expert", ("deepseek", "mixtral", "mistral"),
               ("desc_act", "asym"), 32, 8),
        Format("mxfp4", "safetensors", "per-expert", ("deepseek-v4",), (), None, 32),
        Format("amx-int4", "safetensors", "amx", ("amx",), (), None, 2, amx_bits=4),
        Format("amx-int8", "safetensors", "amx", ("amx",), (), None, 1, amx_bits=8),
        Format("gguf", "gguf", "gguf", ("gguf",), ("no-expert-counts",)),
    )
}
FORMAT_NAMES: tuple[str, ...] = ("bf16", "fp8", "fp8-channel", "rawint4", "gptq-int4", "mxfp4", "amx-int4",
                                 "amx-int8", "gguf:F16", "gguf:BF16", "gguf:Q8_0", "gguf:Q4_K", "gguf:Q6_K")

# GGUF types synth writes, and how: "f16"/"bf16"/"f32" raw bits, "quantize" through gguf.quants,
# or random blocks whose f16 scale fields (byte offsets in the block) are overwritten with finite values.
# (the offsets are GGMLType.f16_fields)
GGUF_BLOCK_SCALES: tuple[str, ...] = ("Q4_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
GGUF_TYPES: tuple[str, ...] = ("F32", "F16", "BF16", "Q8_0", *GGUF_BLOCK_SCALES)

# --------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class Shape:
    layers: int = 2
    experts: int = 8
    hidden: int = 256
    intermediate: int = 256
    experts_per_tok: int = 2
    mtp: bool = True


# bench: DeepSeek-V3 proportions (H/I = 7168/2048 = 3.5) scaled down: 8 MoE layers x 48 experts x
# 3 x 1792 x 512 x 2 bytes = 2.11e9 bytes (1.97 GiB) of bf16 routed experts; no MTP layer.
PRESETS: dict[str, Shape] = {
    "tiny": Shape(),
    "bench": Shape(layers=8, experts=48, hidden=1792, intermediate=512, experts_per_tok=6, mtp=False),
}

# --------------------------------------------------------------------------- result


@dataclass(frozen=True)
class SynthInfo:
    path: str  # the model directory
    fmt: str  # format family: bf16 fp8 rawint4 gptq-int4 mxfp4 amx-int4 amx-int8 gguf
    naming: str
    config: dict[str, Any]  # config.json as written (GGUF: the metadata written)
    moe_layers: tuple[int, ...]  # checkpoint layer numbers of the MoE layers (MTP excluded)
    tensor_count: int
    nbytes: int  # sum of tensor data bytes (headers excluded)
    files: tuple[str, ...] = ()  # data files written, absolute
    staged: tuple[str, ...] = ()  # names of the tensors ktnuma must stage (routed experts of moe_layers)
    staged_nbytes: int = 0  # their data bytes
    mtp_layer: int | None = None  # layer number of the MTP layer written, if any
    manifest_config: dict[str, Any] = field(default_factory=dict)  # what `inspect` should report
    options: dict[str, Any] = field(default_factory=dict)  # per_channel, variants, group_size, gguf_types...


# --------------------------------------------------------------------------- model plan (names, dtypes, shapes)


@dataclass(frozen=True)
class _Spec:
    name: str
    dtype: str  # safetensors dtype name, or a GGUF type name for gguf
    shape: tuple[int, ...]  # elements, PyTorch order
    gen: Gen
    layer: int | None = None
    routed: bool = False  # a routed-expert tensor (also in the MTP layer)
    kind: str | None = None  # staged kind, only for routed tensors of MoE layers

    @property
    def count(self) -> int:
        return prod(self.shape)


@dataclass(frozen=True)
class _Model:
    fmt: Format
    naming: Naming
    opts: Opts
    shape: Shape
    dense_i: int
    specs: tuple[_Spec, ...]
    config: dict[str, Any]
    moe_layers: tuple[int, ...]
    mtp_layer: int | None


def _bf16_linear(name: str, n: int, k: int, layer: int | None) -> _Spec:
    return _Spec(name, "BF16", (n, k), GENERATORS["bf16"], layer)


def _common_layer(nm: Naming, L: int, h: int, e: int, moe: bool, blk: bool) -> list[_Spec]:
    """Attention, norms and (for MoE layers) routers of layer L, none of them staged."""
    pre = nm.layer.format(L=L)
    norm_dt = "F32" if blk else "BF16"
    norm_gen = GENERATORS["norm"] if blk else GENERATORS["bf16"]
    out = [_Spec(f"{pre}.{n}.weight", norm_dt, (h,), norm_gen, L) for n in nm.norms]
    attn_dt = "F16" if blk else "BF16"
    out.append(_Spec(f"{pre}.{nm.attn}.weight", attn_dt, (h, ATTN_DIM), GENERATORS[attn_dt.lower()], L))
    if moe:
        routers = nm.router.split(",")
        rdt = "F32" if blk else "BF16"
        out.append(_Spec(f"{pre}.{routers[0]}", rdt, (e, h), GENERATORS[rdt.lower()], L))
        out += [_Spec(f"{pre}.{r}", "BF16", (1, h), GENERATORS["bf16"], L) for r in routers[1:]]
        if nm.router_bias:
            out.append(_Spec(f"{pre}.{nm.router_bias}", "F32", (e,), GENERATORS["f32"], L))
    return out


def _linears(fmt: Format, opts: Opts, stem: str, n: int, k: int, layer: int, routed: bool,
             staged: bool) -> list[_Spec]:
    """One linear [n, k] in the format's encoding (GGUF/AMX non-expert linears handled by callers)."""
    out = []
    for leaf in ENCODERS[fmt.name](opts, n, k):
        out.append(_Spec(f"{stem}.{leaf.suffix}", leaf.dtype, leaf.shape, leaf.gen, layer, routed,
                         leaf.kind if (routed and staged) else None))
    return out


def _dims(proj: str, h: int, i: int) -> tuple[int, int]:
    """(N, K) = (out, in) of a projection: gate/up [I, H], down [H, I]."""
    return (h, i) if proj == "down" else (i, h)


def _st_layer_mlp(m: dict[str, Any], L: int, moe: bool, staged: bool) -> list[_Spec]:
    fmt: Format = m["fmt"]
    nm: Naming = m["naming"]
    opts: Opts = m["opts"]
    s: Shape = m["shape"]
    h, i, e = s.hidden, s.intermediate, s.experts
    pre = nm.layer.format(L=L)
    out: list[_Spec] = []

    def plain(stem_t: str, projs: Sequence[str], inter: int) -> None:
        for proj, pname in zip(PROJS, projs):
            n, k = _dims(proj, h, inter)
            stem = f"{pre}.{stem_t.format(p=pname)}"
            if fmt.layout == "amx":  # AMX dirs keep non-expert weights in bf16
                out.append(_bf16_linear(f"{stem}.weight", n, k, L))
            else:
                out.extend(_linears(fmt, opts, stem, n, k, L, False, False))

    if not moe:
        plain(nm.dense, nm.dense_projs, m["dense_i"])
        return out
    if fmt.layout == "amx":
        sh = opts.numa_shards
        i_s = i // sh
        per_byte = 8 // fmt.amx_bits
        for x in range(e):
            for proj, pname in zip(PROJS, nm.projs):
                n, k = _dims(proj, h, i_s)
                stem = f"{pre}.{nm.expert.format(e=x, p=pname)}"
                for shard in range(sh):
                    kind_w = "weight" if staged else None
                    kind_s = "scale" if staged else None
                    out.append(_Spec(f"{stem}.numa.{shard}.weight", "U8", (n * k // per_byte,),
                                     GENERATORS["u8"], L, True, kind_w))
                    out.append(_Spec(f"{stem}.numa.{shard}.scale", "F32", (n,), GENERATORS["f32+"], L, True,
                                     kind_s))
    elif nm.name == "qwen-packed":
        kind = "weight" if staged else None
        out.append(_Spec(f"{pre}.mlp.experts.gate_up_proj", "BF16", (e, 2 * i, h), GENERATORS["bf16"], L, True,
                         kind))
        out.append(_Spec(f"{pre}.mlp.experts.down_proj", "BF16", (e, h, i), GENERATORS["bf16"], L, True, kind))
    else:
        for x in range(e):
            for proj, pname in zip(PROJS, nm.projs):
                n, k = _dims(proj, h, i)
                out.extend(_linears(fmt, opts, f"{pre}.{nm.expert.format(e=x, p=pname)}", n, k, L, True, staged))
    plain(nm.shared, nm.dense_projs, i)
    return out


def _st_specs(m: dict[str, Any]) -> list[_Spec]:
    nm: Naming = m["naming"]
    s: Shape = m["shape"]
    h, e = s.hidden, s.experts
    blk = nm.name == "amx"
    specs: list[_Spec] = []
    edt = "F16" if blk else "BF16"
    specs.append(_Spec(f"{nm.embed}.weight", edt, (VOCAB, h), GENERATORS[edt.lower()]))
    for name in nm.extra:
        specs.append(_Spec(name, "BF16", (h, ATTN_DIM), GENERATORS["bf16"]))
    layers = [0, *m["moe_layers"]] + ([m["mtp_layer"]] if m["mtp_layer"] is not None else [])
    for L in layers:
        moe = L != 0
        specs += _common_layer(nm, L, h, e, moe, blk)
        specs += _st_layer_mlp(m, L, moe, staged=L in m["moe_layers"])
        if L == m["mtp_layer"]:  # DeepSeek MTP extras
            pre = nm.layer.format(L=L)
            specs += [_Spec(f"{pre}.{n}.weight", "BF16", (h,), GENERATORS["bf16"], L) for n in ("enorm", "hnorm")]
            specs.append(_Spec(f"{pre}.eh_proj.weight", "BF16", (h, 2 * h), GENERATORS["bf16"], L))
    specs.append(_Spec(f"{nm.final_norm}.weight", "F32" if blk else "BF16", (h,),
                       GENERATORS["norm" if blk else "bf16"]))
    specs.append(_Spec(f"{nm.head}.weight", edt, (VOCAB, h), GENERATORS[edt.lower()]))
    return specs


# ---- GGUF


def _gguf_gen(t: str) -> Gen:
    """Generator of a GGUF tensor's bytes as uint8 [count / block * type_size] for type `t`."""
    g = GGML_TYPES[t]
    if t in ("F32", "F16", "BF16"):
        base = {"F32": GENERATORS["f32"], "F16": GENERATORS["f16"], "BF16": GENERATORS["bf16"]}[t]
        return lambda rng, n: base(rng, n).view(np.uint8)
    if t == "Q8_0":
        def q8(rng: np.random.Generator, n: int) -> np.ndarray:
            import gguf

            vals = GENERATORS["f16"](rng, n).view("<f2").astype(np.float32).reshape(-1, g.block)
            return gguf.quants.quantize(vals, gguf.GGMLQuantizationType.Q8_0).reshape(-1)
        return q8
    offs = g.f16_fields

    def blocks(rng: np.random.Generator, n: int) -> np.ndarray:
        nb = n // g.block
        out = _raw(rng, ggml_nbytes(g, n)).reshape(nb, g.type_size)
        for off in offs:
            out[:, off:off + 2] = GENERATORS["f16d"](rng, nb).view(np.uint8).reshape(nb, 2)
        return out.reshape(-1)
    return blocks


def _gguf_specs(m: dict[str, Any]) -> list[_Spec]:
    nm: Naming = m["naming"]
    s: Shape = m["shape"]
    opts: Opts = m["opts"]
    h, i, e = s.hidden, s.intermediate, s.experts
    tg, tu, td = opts.gguf_types
    ptypes = dict(zip(PROJS, (tg, tu, td)))
    specs = [_Spec("token_embd.weight", "F16", (VOCAB, h), _gguf_gen("F16"))]
    for L in [0, *m["moe_layers"]]:
        pre = nm.layer.format(L=L)
        specs += [_Spec(f"{pre}.{n}.weight", "F32", (h,), _gguf_gen("F32"), L) for n in nm.norms]
        specs.append(_Spec(f"{pre}.{nm.attn}.weight", "F16", (h, ATTN_DIM), _gguf_gen("F16"), L))
        if L == 0:
            for proj in PROJS:
                n, k = _dims(proj, h, m["dense_i"])
                specs.append(_Spec(f"{pre}.ffn_{proj}.weight", ptypes[proj], (n, k), _gguf_gen(ptypes[proj]), L))
            continue
        specs.append(_Spec(f"{pre}.ffn_gate_inp.weight", "F32", (e, h), _gguf_gen("F32"), L))
        specs.append(_Spec(f"{pre}.exp_probs_b.bias", "F32", (e,), _gguf_gen("F32"), L))
        for proj in PROJS:
            n, k = _dims(proj, h, i)
            specs.append(_Spec(f"{pre}.ffn_{proj}_exps.weight", ptypes[proj], (e, n, k), _gguf_gen(ptypes[proj]), L,
                               True, "weight"))
        for proj in PROJS:
            n, k = _dims(proj, h, i)
            specs.append(_Spec(f"{pre}.ffn_{proj}_shexp.weight", ptypes[proj], (n, k), _gguf_gen(ptypes[proj]), L))
    specs.append(_Spec("output_norm.weight", "F32", (h,), _gguf_gen("F32")))
    specs.append(_Spec("output.weight", "F16", (VOCAB, h), _gguf_gen("F16")))
    return specs


# ---- configs


def _quant_config(fmt: Format, opts: Opts) -> dict[str, Any] | None:
    gs = opts.group_size
    if fmt.name == "fp8" and not opts.per_channel:
        return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                "weight_block_size": [128, 128]}
    if fmt.name == "fp8":
        return {"quant_method": "compressed-tensors", "format": "float-quantized",
                "quantization_status": "compressed", "ignore": ["lm_head"],
                "config_groups": {"group_0": {"targets": ["Linear"],
                                              "weights": {"num_bits": 8, "type": "float", "strategy": "channel",
                                                          "symmetric": True, "dynamic": False},
                                              "input_activations": {"num_bits": 8, "type": "float",
                                                                    "strategy": "token", "dynamic": True}}}}
    if fmt.name == "rawint4":
        return {"quant_method": "compressed-tensors", "format": "pack-quantized",
                "quantization_status": "compressed", "ignore": ["lm_head"],
                "config_groups": {"group_0": {"targets": ["Linear"],
                                              "weights": {"num_bits": 4, "type": "int", "strategy": "group",
                                                          "group_size": gs, "symmetric": "asym" not in opts.variants,
                                                          "dynamic": False, "actorder": None,
                                                          "observer": "minmax"},
                                              "input_activations": None, "output_activations": None}}}
    if fmt.name == "gptq-int4":
        return {"quant_method": "gptq", "bits": 4, "group_size": gs, "sym": "asym" not in opts.variants,
                "desc_act": "desc_act" in opts.variants, "damp_percent": 0.01, "true_sequential": True,
                "checkpoint_format": "gptq"}
    if fmt.name == "mxfp4":
        return {"quant_method": "mxfp4", "fmt": "e2m1", "scale_fmt": "ue8m0", "group_size": 32}
    return None


def _config(m: dict[str, Any]) -> dict[str, Any]:
    nm: Naming = m["naming"]
    s: Shape = m["shape"]
    n_layers = 1 + s.layers
    kind = nm.config
    if kind in ("deepseek", "deepseek-v4"):
        cfg: dict[str, Any] = {
            "architectures": ["DeepseekV4ForCausalLM" if kind == "deepseek-v4" else "DeepseekV3ForCausalLM"],
            "model_type": "deepseek_v4" if kind == "deepseek-v4" else "deepseek_v3",
            "hidden_size": s.hidden, "intermediate_size": m["dense_i"],
            "moe_intermediate_size": s.intermediate, "num_hidden_layers": n_layers,
            "n_routed_experts": s.experts, "n_shared_experts": 1, "num_experts_per_tok": s.experts_per_tok,
            "first_k_dense_replace": 1, "moe_layer_freq": 1,
            "num_nextn_predict_layers": 1 if m["mtp_layer"] is not None else 0,
            "vocab_size": VOCAB, "torch_dtype": "bfloat16"}
    elif kind == "mixtral":
        cfg = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": s.hidden,
               "intermediate_size": s.intermediate, "num_hidden_layers": n_layers,
               "num_local_experts": s.experts, "num_experts_per_tok": s.experts_per_tok,
               "vocab_size": VOCAB, "torch_dtype": "bfloat16"}
    elif kind == "qwen":
        cfg = {"architectures": ["Qwen3_5MoeForConditionalGeneration"], "model_type": "qwen3_5_moe",
               "text_config": {"model_type": "qwen3_5_moe_text", "hidden_size": s.hidden,
                               "intermediate_size": m["dense_i"], "moe_intermediate_size": s.intermediate,
                               "shared_expert_intermediate_size": s.intermediate,
                               "num_hidden_layers": n_layers, "num_experts": s.experts,
                               "num_experts_per_tok": s.experts_per_tok, "decoder_sparse_step": 1,
                               "mlp_only_layers": [0], "vocab_size": VOCAB},
               "vision_config": {"hidden_size": ATTN_DIM, "depth": 1}, "torch_dtype": "bfloat16"}
    else:  # gguf: metadata is written by _write_gguf
        return _gguf_metadata(m)
    q = _quant_config(m["fmt"], m["opts"])
    if q is not None:
        cfg["quantization_config"] = q
    return cfg


def _gguf_metadata(m: dict[str, Any]) -> dict[str, Any]:
    s: Shape = m["shape"]
    a = "deepseek2"
    meta: dict[str, Any] = {
        "general.architecture": a, "general.name": "ktnuma-synth",
        f"{a}.block_count": 1 + s.layers, f"{a}.context_length": 4096, f"{a}.embedding_length": s.hidden,
        f"{a}.feed_forward_length": m["dense_i"], f"{a}.expert_feed_forward_length": s.intermediate,
        f"{a}.leading_dense_block_count": 1, f"{a}.expert_shared_count": 1,
    }
    if "no-expert-counts" not in m["opts"].variants:
        meta[f"{a}.expert_count"] = s.experts
        meta[f"{a}.expert_used_count"] = s.experts_per_tok
    return meta


# ---- argument resolution and validation


def _parse_fmt(fmt: str, per_channel: bool, gguf_types: Any) -> tuple[Format, bool, tuple[str, str, str] | None]:
    name = fmt.strip()
    types: Any = gguf_types
    if name == "fp8-channel":
        name, per_channel = "fp8", True
    if name.startswith("gguf:"):
        name, t = "gguf", name[5:]
        types = gguf_types if gguf_types is not None else t
    if name not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; known: {', '.join(FORMAT_NAMES)}")
    if name != "fp8" and per_channel:
        raise ValueError(f"per_channel applies to fp8 only, not {name}")
    if name != "gguf":
        if gguf_types is not None:
            raise ValueError(f"gguf_types applies to gguf only, not {name}")
        return FORMATS[name], per_channel, None
    if types is None:
        types = "F16"
    if isinstance(types, str):
        types = [t.strip() for t in types.split(",")]
    if isinstance(types, dict):
        types = [types[p] for p in PROJS]
    types = [str(t).upper() for t in types]
    if len(types) == 1:
        types = types * 3
    elif len(types) == 2:  # gate/up, down
        types = [types[0], types[0], types[1]]
    if len(types) != 3 or any(t not in GGUF_TYPES for t in types):
        raise ValueError(f"gguf types {types} not understood; give one type, 'gate_up,down' or 'gate,up,down' "
                         f"from {', '.join(GGUF_TYPES)}")
    return FORMATS["gguf"], False, (types[0], types[1], types[2])


def _check_dims(fmt: Format, opts: Opts, h: int, i: int, dense_i: int) -> None:
    ks = {"hidden": h, "intermediate": i, "dense intermediate (2 x intermediate)": dense_i}
    problems = []
    if fmt.name in ("rawint4", "gptq-int4"):
        unit = int(np.lcm(8, opts.group_size))
        problems += [f"{k} {v} is not a multiple of lcm(8, group_size {opts.group_size})"
                     for k, v in ks.items() if v % unit]
        if fmt.name == "gptq-int4":
            problems += [f"{k} {v} is not a multiple of 8 (qzeros)" for k, v in ks.items() if v % 8]
    if fmt.name == "mxfp4":
        problems += [f"{k} {v} is not a multiple of 32 (mxfp4 blocks)" for k, v in ks.items() if v % 32]
    if fmt.layout == "amx":
        sh = opts.numa_shards
        if sh < 1 or i % sh:
            problems.append(f"intermediate {i} does not split into {sh} numa shards")
        elif (i // sh) * h % (8 // fmt.amx_bits):
            problems.append("int4 shard does not fill whole bytes")
    if fmt.name == "gguf":
        for t in set(opts.gguf_types):
            b = GGML_TYPES[t].block
            problems += [f"{k} {v} is not a multiple of the {t} block ({b})" for k, v in ks.items() if v % b]
    if problems:
        raise ValueError(f"{fmt.name}: " + "; ".join(problems))


def _plan(fmt: str, naming: str | None, layers: int | None, experts: int | None, hidden: int | None,
          intermediate: int | None, experts_per_tok: int | None, group_size: int | None, gguf_types: Any,
          per_channel: bool, variant: str | Sequence[str] | None, preset: str | None, mtp: bool | None,
          numa_shards: int) -> _Model:
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    base = PRESETS[preset or "tiny"]
    given = {"layers": layers, "experts": experts, "hidden": hidden, "intermediate": intermediate,
             "experts_per_tok": experts_per_tok, "mtp": mtp}
    shape = Shape(**{k: (v if v is not None else getattr(base, k)) for k, v in given.items()})
    if shape.layers < 1 or shape.experts < 1 or not 1 <= shape.experts_per_tok <= shape.experts:
        raise ValueError(f"bad shape {shape}")
    f, per_channel, types = _parse_fmt(fmt, per_channel, gguf_types)
    nname = naming or f.namings[0]
    if nname not in f.namings:
        raise ValueError(f"naming {nname!r} is not written for format {f.name}; choose from {', '.join(f.namings)}")
    nm = NAMINGS[nname]
    if isinstance(variant, str):
        variant = [v.strip() for v in variant.split(",") if v.strip()]
    variants = frozenset(variant or ())
    unknown = variants - set(f.variants)
    if unknown:
        raise ValueError(f"variant(s) {sorted(unknown)} not known for {f.name}; "
                         f"known: {', '.join(f.variants) or 'none'}")
    if "1d" in variants and not per_channel:
        raise ValueError("variant 1d applies to per-channel fp8 scales only")
    if group_size is not None and f.group_size is None:
        raise ValueError(f"{f.name} has no group size option")
    opts = Opts(group_size or f.group_size or 0, per_channel, variants, numa_shards,
                types or ("F16", "F16", "F16"))
    dense_i = shape.intermediate if nm.config == "mixtral" else 2 * shape.intermediate
    _check_dims(f, opts, shape.hidden, shape.intermediate, dense_i)
    moe_layers = tuple(range(1, shape.layers + 1))
    mtp_layer = shape.layers + 1 if (shape.mtp and nm.mtp) else None
    m: dict[str, Any] = {"fmt": f, "naming": nm, "opts": opts, "shape": shape, "dense_i": dense_i,
                         "moe_layers": moe_layers, "mtp_layer": mtp_layer}
    specs = _gguf_specs(m) if f.container == "gguf" else _st_specs(m)
    return _Model(f, nm, opts, shape, dense_i, tuple(specs), _config(m), moe_layers, mtp_layer)


# --------------------------------------------------------------------------- writing

def _itemsize(st_dtype: str) -> int:
    return SAFETENSORS_DTYPES[st_dtype].itemsize


def _spec_nbytes(sp: _Spec, container: str) -> int:
    if container == "gguf":
        return ggml_nbytes(sp.dtype, sp.count)
    return sp.count * _itemsize(sp.dtype)


def _cuts(specs: Sequence[_Spec], shards: int) -> list[int]:
    """Tensor positions where shard files 2..n start.

    A cut at position p has specs[p-1] and specs[p] routed tensors of the same layer, so that layer's
    experts span two files. Each cut aims at the middle of the routed layer nearest to an equal-bytes
    split point, so the spanning layer is split roughly in half.
    """
    if shards == 1:
        return []
    starts = np.cumsum([0, *(_spec_nbytes(s, "safetensors") for s in specs)])
    total = int(starts[-1])
    cands = [p for p in range(1, len(specs))
             if specs[p - 1].routed and specs[p].routed and specs[p - 1].layer == specs[p].layer]
    if len(cands) < shards - 1:
        raise ValueError(f"cannot split {len(specs)} tensors into {shards} files inside expert ranges")
    cuts: list[int] = []
    for j in range(1, shards):
        target = total * j / shards
        usable = [p for p in cands if not cuts or p > cuts[-1]]
        usable = usable[: len(usable) - (shards - 1 - j)]  # leave room for the later cuts
        layers: dict[int | None, list[int]] = {}
        for p in usable:
            layers.setdefault(specs[p].layer, []).append(p)

        def distance(ps: list[int]) -> float:
            lo, hi = int(starts[ps[0] - 1]), int(starts[ps[-1] + 1])
            return max(lo - target, 0, target - hi)

        ps = min(layers.values(), key=distance)
        goal = (int(starts[ps[0] - 1]) + int(starts[ps[-1] + 1])) / 2
        cuts.append(min(ps, key=lambda p: abs(int(starts[p]) - goal)))
    return cuts


def _write_safetensors(model: _Model, out: Path, seed: int, shards: int) -> list[Path]:
    specs = model.specs
    cuts = [0, *_cuts(specs, shards), len(specs)]
    files: list[Path] = []
    weight_map: dict[str, str] = {}
    total = 0
    for j in range(shards):
        part = specs[cuts[j]:cuts[j + 1]]
        # data order within a file as the safetensors library writes it: by alignment, then name
        part = sorted(part, key=lambda sp: (-_itemsize(sp.dtype), sp.name))
        fname = "model.safetensors" if shards == 1 else f"model-{j + 1:05d}-of-{shards:05d}.safetensors"
        tensors = [StTensor(sp.name, sp.dtype, sp.shape, functools.partial(_produce, seed, sp.name, sp.gen, sp.count))
                   for sp in part]
        write_safetensors(out / fname, tensors)
        files.append(out / fname)
        for sp in part:
            weight_map[sp.name] = fname
            total += _spec_nbytes(sp, "safetensors")
    if shards > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(model.config, indent=2) + "\n")
    return files


def _write_gguf(model: _Model, out: Path, seed: int) -> list[Path]:
    import gguf

    path = out / GGUF_FILE
    w = gguf.GGUFWriter(str(path), model.config["general.architecture"])
    for key, value in model.config.items():
        if key == "general.architecture":
            continue
        if isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_uint32(key, int(value))
    for sp in model.specs:
        nbytes = _spec_nbytes(sp, "gguf")
        row = nbytes // prod(sp.shape[:-1])
        w.add_tensor_info(sp.name, (*sp.shape[:-1], row), np.dtype(np.uint8), nbytes,
                          raw_dtype=gguf.GGMLQuantizationType[sp.dtype])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for sp in model.specs:
        data = _produce(seed, sp.name, sp.gen, sp.count).view(np.uint8)
        w.write_tensor_data(data)
    w.close()
    return [path]


def _resolve_kwargs(fmt: str, kw: dict[str, Any]) -> _Model:
    return _plan(fmt, kw.get("naming"), kw.get("layers"), kw.get("experts"), kw.get("hidden"),
                 kw.get("intermediate"), kw.get("experts_per_tok"), kw.get("group_size"), kw.get("gguf_types"),
                 kw.get("per_channel", False), kw.get("variant"), kw.get("preset"), kw.get("mtp"),
                 kw.get("numa_shards", 2))


def estimate(fmt: str = "bf16", **kwargs: Any) -> dict[str, int]:
    """Bytes a write_model call with these arguments would write, without writing:
    {"total": all tensor data, "staged": routed experts of the MoE layers, "tensors": count}."""
    model = _resolve_kwargs(fmt, kwargs)
    c = model.fmt.container
    return {"total": sum(_spec_nbytes(s, c) for s in model.specs),
            "staged": sum(_spec_nbytes(s, c) for s in model.specs if s.kind),
            "tensors": len(model.specs)}


def write_model(out_dir: str | os.PathLike[str], fmt: str = "bf16", *, naming: str | None = None,
                layers: int | None = None, experts: int | None = None, hidden: int | None = None,
                intermediate: int | None = None, experts_per_tok: int | None = None, seed: int = 0,
                shards: int = 1, group_size: int | None = None, gguf_types: Any = None,
                per_channel: bool = False, variant: str | Sequence[str] | None = None,
                preset: str | None = None, mtp: bool | None = None, numa_shards: int = 2) -> SynthInfo:
    """Write a synthetic MoE checkpoint into `out_dir` (created if missing) and describe it.

    Shape arguments left at None come from `preset` (default "tiny": layers=2, experts=8, hidden=256,
    intermediate=256, experts_per_tok=2, mtp=True). `fmt` is one of FORMAT_NAMES (or "gguf" with
    `gguf_types`: one type, (gate_up, down), (gate, up, down) or {proj: type}). `variant` selects
    variants the index must handle or refuse: fp8 "1d" (per-channel scales [N] instead of [N, 1]),
    rawint4 "asym", gptq-int4 "desc_act"/"asym", gguf "no-expert-counts". `numa_shards` is the
    `.numa.{n}` count of amx formats; `shards` the number of safetensors files.
    """
    model = _resolve_kwargs(fmt, {"naming": naming, "layers": layers, "experts": experts, "hidden": hidden,
                                  "intermediate": intermediate, "experts_per_tok": experts_per_tok,
                                  "group_size": group_size, "gguf_types": gguf_types,
                                  "per_channel": per_channel, "variant": variant, "preset": preset,
                                  "mtp": mtp, "numa_shards": numa_shards})
    if shards < 1 or (shards > 1 and model.fmt.container == "gguf"):
        raise ValueError(f"shards={shards} not possible for {model.fmt.name}")
    out = Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    if model.fmt.container == "gguf":
        files = _write_gguf(model, out, seed)
    else:
        files = _write_safetensors(model, out, seed, shards)
    c = model.fmt.container
    s = model.shape
    info = SynthInfo(
        path=str(out), fmt=model.fmt.name, naming=model.naming.name, config=model.config,
        moe_layers=model.moe_layers, tensor_count=len(model.specs),
        nbytes=sum(_spec_nbytes(sp, c) for sp in model.specs), files=tuple(str(p) for p in files),
        staged=tuple(sp.name for sp in model.specs if sp.kind),
        staged_nbytes=sum(_spec_nbytes(sp, c) for sp in model.specs if sp.kind), mtp_layer=model.mtp_layer,
        manifest_config={"num_experts": s.experts,
                         "experts_per_tok": None if "no-expert-counts" in model.opts.variants else s.experts_per_tok,
                         "hidden_size": s.hidden, "moe_intermediate_size": s.intermediate,
                         "layers": list(model.moe_layers)},
        options={"per_channel": model.opts.per_channel, "variants": sorted(model.opts.variants),
                 "group_size": model.opts.group_size or None,
                 "gguf_types": list(model.opts.gguf_types) if c == "gguf" else None,
                 "numa_shards": model.opts.numa_shards if model.fmt.layout == "amx" else None,
                 "seed": seed, "shards": shards})
    log.info("wrote %s: %s/%s, %d tensors, %d bytes", out, info.fmt, info.naming, info.tensor_count, info.nbytes)
    return info


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m ktnuma.tools.synth",
        description="Write a deterministic synthetic MoE checkpoint (random values, real encodings) with the "
                    "routers, shared experts, dense layer 0 and (DeepSeek namings) MTP layer that ktnuma must "
                    "not stage. MoE layers are 1..LAYERS.",
        epilog="formats: " + ", ".join(FORMAT_NAMES) + " (any gguf:<T> of " + ", ".join(GGUF_TYPES) + "). "
               "namings: " + "; ".join(f"{f.name}: {', '.join(f.namings)}" for f in FORMATS.values()) + ". "
               "variants: fp8 1d, rawint4 asym, gptq-int4 desc_act|asym, gguf no-expert-counts. "
               "presets: " + "; ".join(f"{k}: {v}" for k, v in PRESETS.items()) + ".")
    p.add_argument("out_dir", help="directory to write (created if missing)")
    p.add_argument("--format", default="bf16", metavar="F", help="model format (default bf16)")
    p.add_argument("--naming", default=None, help="tensor naming (default: the format's first)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="shape preset (default tiny)")
    p.add_argument("--layers", type=int, default=None, help="number of MoE layers")
    p.add_argument("--experts", type=int, default=None, help="routed experts per layer")
    p.add_argument("--hidden", type=int, default=None, help="hidden size H")
    p.add_argument("--intermediate", type=int, default=None, help="expert intermediate size I")
    p.add_argument("--experts-per-tok", type=int, default=None, help="experts per token (top-k)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shards", type=int, default=1, help="safetensors files (> 1 writes an index json)")
    p.add_argument("--group-size", type=int, default=None, help="rawint4 / gptq-int4 group size (default 32)")
    p.add_argument("--gguf-type", default=None, metavar="T",
                   help="GGUF type: T, or GATEUP,DOWN, or GATE,UP,DOWN (e.g. Q4_K,Q6_K)")
    p.add_argument("--per-channel", action="store_true", help="fp8 per-channel scales (same as fp8-channel)")
    p.add_argument("--variant", default=None, help="comma-separated variants (see below)")
    p.add_argument("--numa-shards", type=int, default=2, help="amx formats: .numa.{n} shard count")
    p.add_argument("--no-mtp", action="store_true", help="omit the DeepSeek MTP layer")
    a = p.parse_args(argv)
    fmt = a.format
    if a.gguf_type and fmt == "bf16":
        fmt = "gguf"
    try:
        info = write_model(a.out_dir, fmt, naming=a.naming, layers=a.layers, experts=a.experts, hidden=a.hidden,
                           intermediate=a.intermediate, experts_per_tok=a.experts_per_tok, seed=a.seed,
                           shards=a.shards, group_size=a.group_size, gguf_types=a.gguf_type,
                           per_channel=a.per_channel, variant=a.variant, preset=a.preset,
                           mtp=False if a.no_mtp else None, numa_shards=a.numa_shards)
    except ValueError as e:
        print(f"ktnuma.synth: {e}", file=sys.stderr)
        return 2
    extra = f" gguf_types={','.join(info.options['gguf_types'])}" if info.options.get("gguf_types") else ""
    print(f"wrote {info.path}: format={info.fmt}{extra} naming={info.naming} moe_layers="
          f"{ranges(info.moe_layers)} experts={info.manifest_config['num_experts']} "
          f"H={info.manifest_config['hidden_size']} I={info.manifest_config['moe_intermediate_size']} "
          f"tensors={info.tensor_count} bytes={info.nbytes} staged_bytes={info.staged_nbytes} files={len(info.files)}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    raise SystemExit(main())
