"""Torch reference for the staged encodings: dequantizers, random encoders and the MoE forward.

Used by tests and by the engine integration's self-check; never by workers (imports torch/gguf).
Each format's per-expert piece is dequantized to float32 W[N, K] in the [out, in] convention
(gate/up: N=I, K=H; down: N=H, K=I). Pieces are numpy arrays or torch tensors in the layout the
engines take (see ktnuma.integrations.kt_kernel: bf16 as uint16 bits, e4m3 as uint8 bytes).

| format     | weight                                   | scale                                   |
|------------|------------------------------------------|-----------------------------------------|
| bf16       | bf16 [N, K]                              | -                                       |
| fp8        | e4m3 [N, K]                              | f32 blocks [ceil(N/128), ceil(K/128)], or per channel [N] / [N, 1] |
| gptq-int4  | i32 [K/8, N]: nibble (q+8) at bits 4*(k%8) | f16/f32 [K/gs, N]                     |
| rawint4    | i32 [N, K/8] (= u8 [N, K/2], low nibble = even k), nibble = q+8 | bf16 [N, K/gs]   |
| mxfp4      | u8 [N, K/2] E2M1, low nibble = even k    | bf16 [N, K/32] (= e8m0 u8 << 7) or raw e8m0 u8 |
| mxfp8      | e4m3 [N, K]                              | ue8m0 u8 [N, K/32]                      |
| nvfp4      | u8 [N, K/2] E2M1, low nibble = even k    | bf16 [N, K/16] = fold_nvfp4(e4m3, global) |
| gguf:<T>   | T blocks, u8 [N, K/block*type_size]      | -                                       |
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ktnuma.index.dtypes import FP8_BLOCK, GGML_TYPES, ggml_nbytes
from ktnuma.index.quant import MXFP4_GROUP, MXFP8_GROUP, NVFP4_GROUP, family, gguf_type

E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


# --------------------------------------------------------------------------------------------
# raw bytes <-> torch
# --------------------------------------------------------------------------------------------
def _np(a: Any) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        t = a.detach().contiguous().cpu()
        if t.dtype in (torch.bfloat16, torch.float16):
            return t.view(torch.int16).numpy().view(np.uint16 if t.dtype == torch.bfloat16 else np.float16)
        if t.dtype == torch.float8_e4m3fn:
            return t.view(torch.uint8).numpy()
        return t.numpy()
    return np.ascontiguousarray(a)


def bf16_to_f32(bits: Any) -> torch.Tensor:
    """bf16 given as uint16/int16 bits (numpy) or a torch bfloat16 tensor -> float32."""
    if isinstance(bits, torch.Tensor) and bits.dtype == torch.bfloat16:
        return bits.float()
    a = _np(bits)
    if a.dtype.itemsize != 2:
        a = a.view(np.uint8)  # raw bytes (e.g. a staged array mapped as u8)
    return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16).float()


def f32_to_bf16_bits(x: Any) -> np.ndarray:
    """float -> bf16 (round to nearest even, torch's rule) as uint16 bits."""
    t = torch.as_tensor(np.asarray(x, dtype=np.float32)) if not isinstance(x, torch.Tensor) else x.float()
    return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def _nibbles(u8: np.ndarray) -> np.ndarray:
    """u8 [..., B] -> u8 [..., 2B], low nibble first."""
    out = np.empty(u8.shape[:-1] + (u8.shape[-1] * 2,), dtype=np.uint8)
    out[..., 0::2] = u8 & 0x0F
    out[..., 1::2] = u8 >> 4
    return out


def _pack_nibbles(nib: np.ndarray) -> np.ndarray:
    """u8 nibbles [..., 2B] -> u8 [..., B], even index in the low nibble."""
    nib = nib.astype(np.uint8)
    return (nib[..., 0::2] | (nib[..., 1::2] << 4)).astype(np.uint8)


def _f32(a: Any) -> np.ndarray:
    """Float scales: f16/f32 values, or raw f32 bytes given as u8."""
    x = _np(a)
    return x.view(np.float32) if x.dtype == np.uint8 else x.astype(np.float32)


def _group_expand(scale: torch.Tensor, axis: int, size: int) -> torch.Tensor:
    rep = size // scale.shape[axis]
    return scale.repeat_interleave(rep, dim=axis)


# --------------------------------------------------------------------------------------------
# dequantizers: (weight, scale, n, k, group_size, gguf_type) -> float32 [N, K]
# --------------------------------------------------------------------------------------------
def _deq_bf16(w: Any, s: Any, n: int, k: int, gs: int | None, gt: str | None) -> torch.Tensor:
    return bf16_to_f32(w).reshape(n, k)


def _deq_fp8(w: Any, s: Any, n: int, k: int, gs: int | None, gt: str | None) -> torch.Tensor:
    q = torch.from_numpy(_np(w).view(np.uint8).reshape(n, k).copy()).view(torch.float8_e4m3fn).float()
    sc = torch.from_numpy(_f32(s))
    if sc.ndim == 1 or (sc.ndim == 2 and sc.shape == (n, 1)):  # per channel
        return q * sc.reshape(n, 1)
    bs = gs or FP8_BLOCK
    full = sc.repeat_interleave(bs, 0).repeat_interleave(bs, 1)[:n, :k]
    return q * full


def _deq_gptq(w: Any, s: Any, n: int, k: int, gs: int | None, gt: str | None) -> torch.Tensor:
    words = _np(w).view(np.uint32).reshape(k // 8, n)
    shifts = (np.arange(8, dtype=np.uint32) * 4).reshape(1, 8, 1)
    nib = ((words[:, None, :] >> shifts) & 0xF).reshape(k, n)  # k = 8*row + i
    q = torch.from_numpy(nib.astype(np.float32) - 8.0)
    sc = torch.from_numpy(_f32(s).reshape(k // gs, n))  # type: ignore[operator]
    return (q * _group_expand(sc, 0, k)).T.contiguous()


def _deq_rawint4(w: Any, s: Any, n: int, k: int, gs: int | None, gt: str | None) -> torch.Tensor:
    nib = _nibbles(_np(w).view(np.uint8).reshape(n, k // 2))
    q = torch.from_numpy(nib.astype(np.float32) - 8.0)
    return q * _group_expand(bf16_to_f32(s).reshape(n, k // gs), 1, k)  # type: ignore[operator]


def _mx_scale(s: Any, n: int, groups: int) -> torch.Tensor:
    a = _np(s)
    if a.dtype.itemsize == 1:  # raw e8m0 exponent
        return torch.from_numpy(np.ldexp(1.0, a.astype(np.int32) - 127).astype(np.float32)).reshape(n, groups)
    return bf16_to_f32(a).reshape(n, groups)


def _deq_mxfp4(w: Any, s: Any, n: int, k: int, gs: int | None, gt: str | None) -> torch.Tensor:
    nib = _nibbles(_np(w).view(np.uint8).reshape(n, k // 2))
    q = torch.tensor(E2M1, dtype=torch.float32)[torch.from_numpy(nib.astype(np.int64))]
    g = gs or MXFP4_GROUP
    return q * _group_expand(_mx_scale(s, n, k // g), 1, k)


def _e4m3(a: Any, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.from_numpy(_np(a).view(np.uint8).reshape(shape).copy()).view(torch.float8_e4m3fn).float()


def _deq_mxfp8(w: Any, s: Any, n: int, k: int, gs: int | None, gt: str | None) -> torch.Tensor:
    g = gs or MXFP8_GROUP
    return _e4m3(w, (n, k)) * _group_expand(_mx_scale(s, n, k // g), 1, k)


def fold_nvfp4(block_scale: Any, global_scale: float) -> np.ndarray:
    """NVFP4 e4m3 block scales (raw bytes) x the per-tensor f32 global -> bf16 bits, as the manifest's
    model.notes and kt-kernel 0.7.2's NVFP4 loader fold them: bf16(f32(e4m3) * f32(global))."""
    a = _np(block_scale).view(np.uint8)
    s = torch.from_numpy(a.copy()).view(torch.float8_e4m3fn).to(torch.float32)
    s = s * torch.tensor(global_scale, dtype=torch.float32)
    return s.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16).reshape(a.shape)


def _deq_nvfp4(w: Any, s: Any, n: int, k: int, gs: int | None, gt: str | None) -> torch.Tensor:
    nib = _nibbles(_np(w).view(np.uint8).reshape(n, k // 2))
    q = torch.tensor(E2M1, dtype=torch.float32)[torch.from_numpy(nib.astype(np.int64))]
    g = gs or NVFP4_GROUP
    return q * _group_expand(bf16_to_f32(s).reshape(n, k // g), 1, k)


def _deq_gguf(w: Any, s: Any, n: int, k: int, gs: int | None, gt: str | None) -> torch.Tensor:
    import gguf.quants

    t = GGML_TYPES[gt]  # type: ignore[index]
    raw = _np(w).view(np.uint8).reshape(n, ggml_nbytes(t, k))
    out = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(t.id))
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).reshape(n, k)


DequantFn = Callable[[Any, Any, int, int, "int | None", "str | None"], torch.Tensor]
DEQUANT: dict[str, DequantFn] = {
    "bf16": _deq_bf16,
    "fp8": _deq_fp8,
    "gptq-int4": _deq_gptq,
    "rawint4": _deq_rawint4,
    "mxfp4": _deq_mxfp4,
    "mxfp8": _deq_mxfp8,
    "nvfp4": _deq_nvfp4,
    "gguf": _deq_gguf,
}


def dequantize(fmt: str, weight: Any, scale: Any = None, *, n: int, k: int, group_size: int | None = None) -> torch.Tensor:
    """One expert's piece of format `fmt` -> float32 W[n, k]."""
    return DEQUANT[family(fmt)](weight, scale, n, k, group_size, gguf_type(fmt))


# --------------------------------------------------------------------------------------------
# random encoders (tests, self-check): one expert's piece in the engine layout
# --------------------------------------------------------------------------------------------
def _enc_bf16(rng: np.random.Generator, n: int, k: int, gs: int | None, gt: str | None) -> dict[str, np.ndarray]:
    return {"weight": f32_to_bf16_bits(rng.standard_normal((n, k), dtype=np.float32) / np.sqrt(k))}


def _enc_fp8(rng: np.random.Generator, n: int, k: int, gs: int | None, gt: str | None) -> dict[str, np.ndarray]:
    bs = gs or FP8_BLOCK
    v = torch.from_numpy(rng.standard_normal((n, k), dtype=np.float32) * 4.0)
    q = v.to(torch.float8_e4m3fn).view(torch.uint8).numpy().copy()
    s = (rng.uniform(0.5, 1.5, (-(-n // bs), -(-k // bs))) / (4.0 * np.sqrt(k))).astype(np.float32)
    return {"weight": q, "scale": s}


def _enc_gptq(rng: np.random.Generator, n: int, k: int, gs: int | None, gt: str | None) -> dict[str, np.ndarray]:
    nib = rng.integers(0, 16, (k // 8, 8, n), dtype=np.uint32)
    words = np.zeros((k // 8, n), dtype=np.uint32)
    for i in range(8):
        words |= nib[:, i, :] << np.uint32(4 * i)
    s = (rng.uniform(0.5, 1.5, (k // gs, n)) / (4.6 * np.sqrt(k))).astype(np.float32)  # type: ignore[operator]
    return {"weight": words.view(np.int32), "scale": s}


def _enc_rawint4(rng: np.random.Generator, n: int, k: int, gs: int | None, gt: str | None) -> dict[str, np.ndarray]:
    packed = _pack_nibbles(rng.integers(0, 16, (n, k), dtype=np.uint8))
    s = rng.uniform(0.5, 1.5, (n, k // gs)) / (4.6 * np.sqrt(k))  # type: ignore[operator]
    return {"weight": packed.view(np.int32), "scale": f32_to_bf16_bits(s)}


def _enc_mxfp4(rng: np.random.Generator, n: int, k: int, gs: int | None, gt: str | None) -> dict[str, np.ndarray]:
    packed = _pack_nibbles(rng.integers(0, 16, (n, k), dtype=np.uint8))
    # E2M1 magnitudes average ~2.6: exponents around 2^-(log2(2.6*sqrt(k)))
    centre = 127 - int(round(np.log2(2.6 * np.sqrt(k))))
    e8m0 = rng.integers(centre - 1, centre + 2, (n, k // (gs or MXFP4_GROUP)), dtype=np.int64).astype(np.uint8)
    return {"weight": packed, "scale": (e8m0.astype(np.uint16) << 7)}


def _enc_mxfp8(rng: np.random.Generator, n: int, k: int, gs: int | None, gt: str | None) -> dict[str, np.ndarray]:
    v = torch.from_numpy(rng.standard_normal((n, k), dtype=np.float32))
    q = v.to(torch.float8_e4m3fn).view(torch.uint8).numpy().copy()
    centre = 127 - int(round(np.log2(0.8 * np.sqrt(k))))
    e8m0 = rng.integers(centre - 1, centre + 2, (n, k // (gs or MXFP8_GROUP)), dtype=np.int64).astype(np.uint8)
    return {"weight": q, "scale": e8m0}


def _enc_nvfp4(rng: np.random.Generator, n: int, k: int, gs: int | None, gt: str | None) -> dict[str, np.ndarray]:
    packed = _pack_nibbles(rng.integers(0, 16, (n, k), dtype=np.uint8))
    block = torch.from_numpy(rng.uniform(0.5, 1.5, (n, k // (gs or NVFP4_GROUP))).astype(np.float32))
    e4m3 = block.to(torch.float8_e4m3fn).view(torch.uint8).numpy().copy()
    return {"weight": packed, "scale": fold_nvfp4(e4m3, float(1.0 / (2.6 * np.sqrt(k))))}


def _enc_gguf(rng: np.random.Generator, n: int, k: int, gs: int | None, gt: str | None) -> dict[str, np.ndarray]:
    import gguf.quants

    t = GGML_TYPES[gt]  # type: ignore[index]
    qtype = gguf.GGMLQuantizationType(t.id)
    target = 1.0 / np.sqrt(k)
    if t.block == 256 and t.f16_fields:  # gguf.quants cannot quantize K-quants: random blocks
        blocks = rng.integers(0, 256, (n, k // t.block, t.type_size), dtype=np.uint8)
        if gt == "Q6_K":  # int8 sub-block scales: keep them positive-ish and bounded
            blocks[:, :, 192:208] = rng.integers(1, 64, (n, k // t.block, 16), dtype=np.uint8)
        ones = np.full((n, k // t.block), 1.0, np.float16).view(np.uint8).reshape(n, k // t.block, 2)
        for off in t.f16_fields:
            blocks[:, :, off:off + 2] = ones
        raw = blocks.reshape(n, -1)
        std = float(np.std(gguf.quants.dequantize(raw, qtype)))
        factor = target / std if std > 0 else 1.0
        vals = (rng.uniform(0.5, 1.5, (n, k // t.block)) * factor).astype(np.float16)
        for off in t.f16_fields:
            blocks[:, :, off:off + 2] = vals.view(np.uint8).reshape(n, k // t.block, 2)
        return {"weight": blocks.reshape(n, -1).copy()}
    w = (rng.standard_normal((n, k)) * target).astype(np.float32)
    return {"weight": np.ascontiguousarray(gguf.quants.quantize(w, qtype)).view(np.uint8).reshape(n, -1)}


EncodeFn = Callable[[np.random.Generator, int, int, "int | None", "str | None"], dict[str, np.ndarray]]
ENCODERS: dict[str, EncodeFn] = {
    "bf16": _enc_bf16,
    "fp8": _enc_fp8,
    "gptq-int4": _enc_gptq,
    "rawint4": _enc_rawint4,
    "mxfp4": _enc_mxfp4,
    "mxfp8": _enc_mxfp8,
    "nvfp4": _enc_nvfp4,
    "gguf": _enc_gguf,
}


def encode_random(
    fmt: str, n: int, k: int, *, group_size: int | None = None, rng: np.random.Generator | int = 0
) -> dict[str, np.ndarray]:
    """A random piece of format `fmt` for a [n, k] matrix, scaled so W @ x keeps x's magnitude:
    {"weight": ..., "scale": ...} in the engine layout (no "scale" for bf16 / GGUF)."""
    g = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    return ENCODERS[family(fmt)](g, n, k, group_size, gguf_type(fmt))


# --------------------------------------------------------------------------------------------
# MoE forward and comparison
# --------------------------------------------------------------------------------------------
def moe_forward(
    x: Any,
    ids: Any,
    weights: Any,
    gate: Sequence[torch.Tensor] | torch.Tensor,
    up: Sequence[torch.Tensor] | torch.Tensor,
    down: Sequence[torch.Tensor] | torch.Tensor,
) -> torch.Tensor:
    """out[t] = sum_j weights[t, j] * down[e](silu(gate[e] x[t]) * up[e] x[t]), e = ids[t, j];
    gate/up [E][I, H], down [E][H, I] float; x [q, H] (float or bf16). Returns float32 [q, H]."""
    xf = x.float() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x, dtype=np.float32))
    ids_t = torch.as_tensor(np.asarray(ids.cpu() if isinstance(ids, torch.Tensor) else ids, dtype=np.int64))
    w_t = torch.as_tensor(np.asarray(weights.cpu() if isinstance(weights, torch.Tensor) else weights, dtype=np.float32))
    out = torch.zeros(xf.shape[0], xf.shape[1], dtype=torch.float32)
    for e in torch.unique(ids_t).tolist():
        tok, slot = torch.nonzero(ids_t == e, as_tuple=True)
        xe = xf[tok]
        h = torch.nn.functional.silu(xe @ gate[e].float().T) * (xe @ up[e].float().T)
        out.index_add_(0, tok, (h @ down[e].float().T) * w_t[tok, slot].unsqueeze(1))
    return out


def rel_l1(a: Any, b: Any) -> float:
    """sum |a - b| / sum |b| (b the reference)."""
    at = a.float() if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a, dtype=np.float32))
    bt = b.float() if isinstance(b, torch.Tensor) else torch.as_tensor(np.asarray(b, dtype=np.float32))
    return float((at - bt).abs().sum() / bt.abs().sum().clamp_min(1e-30))
