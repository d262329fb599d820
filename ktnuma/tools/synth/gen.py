"""Random bytes of one stored dtype: GENERATORS (rng, count) -> array, seeded per tensor name."""
from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Sequence

import numpy as np

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


def _gen_e4m3_pos(rng: np.random.Generator, n: int) -> np.ndarray:
    """Positive finite e4m3fn bits in [2^-4, 1.875] (NVFP4 block scales)."""
    r = _raw(rng, n)
    r &= np.uint8(0x3F)
    r |= np.uint8(0x18)
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
    "e4m3+": _gen_e4m3_pos,
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
