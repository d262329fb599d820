"""The model plan: every tensor (name, dtype, shape, generator, staged kind) of a safetensors or GGUF model."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from math import prod
from typing import Any

import numpy as np

from ktnuma.index.dtypes import GGML_TYPES, ggml_nbytes
from ktnuma.index.model import PROJS
from ktnuma.tools.synth.gen import ATTN_DIM, GENERATORS, Gen, VOCAB, _raw
from ktnuma.tools.synth.encoders import ENCODERS, Opts
from ktnuma.tools.synth.tables import Format, Shape
from ktnuma.tools.synth.namings import Naming

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
    elif nm.stacked:
        out.extend(_stacked(nm, pre, L, h, i, e, staged))
    else:
        # zero-experts (LongCat-Flash): slots past the routed ones hold gate/up but no down
        zero = ZERO_EXPERTS if "zero-experts" in opts.variants else 0
        for x in range(e + zero):
            for proj, pname in zip(PROJS, nm.projs):
                if x >= e and proj == "down":
                    continue
                n, k = _dims(proj, h, i)
                out.extend(_linears(fmt, opts, f"{pre}.{nm.expert.format(e=x, p=pname)}", n, k, L, True,
                                    staged and x < e))
    plain(nm.shared, nm.dense_projs, i)
    return out


ZERO_EXPERTS = 4  # zero-expert slots the "zero-experts" variant adds after the routed experts


def _stacked(nm: Naming, pre: str, L: int, h: int, i: int, e: int, staged: bool) -> list[_Spec]:
    """Stacked [E, ...] gate_up and down tensors: gate then up, or gate/up interleaved by rows ("rows";
    both [E, 2I, H] + [E, H, I]), or gpt-oss
    ([E, H, 2I] with gate/up interleaved on the last dim + [E, I, H], plus their biases)."""
    kind = "weight" if staged else None
    gu = f"{pre}.{nm.expert.format(p=nm.projs[0])}"
    dn = f"{pre}.{nm.expert.format(p=nm.projs[2])}"
    bf = GENERATORS["bf16"]
    if nm.stacked == "gpt-oss":
        return [_Spec(gu, "BF16", (e, h, 2 * i), bf, L, True, kind), _Spec(dn, "BF16", (e, i, h), bf, L, True, kind),
                _Spec(gu + "_bias", "BF16", (e, 2 * i), bf, L, True), _Spec(dn + "_bias", "BF16", (e, h), bf, L, True)]
    return [_Spec(gu, "BF16", (e, 2 * i, h), bf, L, True, kind), _Spec(dn, "BF16", (e, h, i), bf, L, True, kind)]


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
