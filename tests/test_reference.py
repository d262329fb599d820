"""The torch reference against independent, element-by-element decodings of each encoding."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")

from ktnuma.tools import reference as R  # noqa: E402
from ktnuma.index.dtypes import convert  # noqa: E402

RNG = np.random.default_rng(1234)


def _exact_bf16(shape):
    """Scales that bf16 represents exactly (small dyadic values)."""
    return (RNG.integers(1, 16, shape) / 64.0).astype(np.float32)


def test_bf16_bits_round_trip():
    x = RNG.standard_normal((5, 7)).astype(np.float32)
    bits = R.f32_to_bf16_bits(x)
    assert bits.dtype == np.uint16
    want = torch.from_numpy(x).to(torch.bfloat16)
    assert torch.equal(R.bf16_to_f32(bits), want.float())
    assert torch.equal(R.dequantize("bf16", bits, n=5, k=7), want.float())


@pytest.mark.parametrize("scale_dtype", [np.float32, np.float16])
def test_gptq_int4(scale_dtype):
    K, N, gs = 32, 3, 8
    q = RNG.integers(-8, 8, (K, N))
    scales = RNG.uniform(0.1, 1.0, (K // gs, N)).astype(scale_dtype)
    words = np.zeros((K // 8, N), dtype=np.uint32)
    for r in range(K // 8):
        for n in range(N):
            w = 0
            for i in range(8):
                w |= int(q[8 * r + i, n] + 8) << (4 * i)
            words[r, n] = w
    got = R.dequantize("gptq-int4", words.view(np.int32), scales, n=N, k=K, group_size=gs)
    want = np.array([[q[k, n] * float(scales[k // gs, n]) for k in range(K)] for n in range(N)], dtype=np.float32)
    assert got.shape == (N, K)
    np.testing.assert_array_equal(got.numpy(), want)


def test_rawint4_compressed_tensors_words_and_bytes():
    N, K, gs = 4, 64, 32
    q = RNG.integers(-8, 8, (N, K))
    words = np.zeros((N, K // 8), dtype=np.uint32)
    for n in range(N):
        for c in range(K // 8):
            w = 0
            for i in range(8):
                w |= int(q[n, 8 * c + i] + 8) << (4 * i)
            words[n, c] = w
    scales = _exact_bf16((N, K // gs))
    bits = R.f32_to_bf16_bits(scales)
    want = q * np.repeat(scales, gs, axis=1)
    got = R.dequantize("rawint4", words.view(np.int32), bits, n=N, k=K, group_size=gs)
    np.testing.assert_array_equal(got.numpy(), want.astype(np.float32))
    as_bytes = words.view(np.uint8)  # little-endian: byte j holds k = 2j (low) and 2j+1 (high)
    assert as_bytes.shape == (N, K // 2)
    assert (as_bytes[0, 0] & 0xF) == q[0, 0] + 8 and (as_bytes[0, 0] >> 4) == q[0, 1] + 8
    np.testing.assert_array_equal(
        R.dequantize("rawint4", as_bytes, bits, n=N, k=K, group_size=gs).numpy(), got.numpy()
    )


def test_mxfp4_nibbles_and_scales():
    e2m1 = [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    N, K = 2, 64
    nib = RNG.integers(0, 16, (N, K))
    packed = (nib[:, 0::2] | (nib[:, 1::2] << 4)).astype(np.uint8)
    e8m0 = RNG.integers(120, 131, (N, K // 32)).astype(np.uint8)
    staged = np.empty(e8m0.shape, dtype=np.uint16)
    convert("ue8m0->bf16", e8m0.tobytes(), memoryview(staged).cast("B"))
    want = np.array(
        [[(-1 if nib[n, k] & 8 else 1) * e2m1[nib[n, k] & 7] * 2.0 ** (int(e8m0[n, k // 32]) - 127)
          for k in range(K)] for n in range(N)], dtype=np.float32)
    for scale in (staged, e8m0):
        got = R.dequantize("mxfp4", packed, scale, n=N, k=K)
        np.testing.assert_array_equal(got.numpy(), want)
    one = R.dequantize("mxfp4", np.array([[0x21] * 16], np.uint8), np.array([[127]], np.uint8), n=1, k=32)
    assert one[0, :4].tolist() == [0.5, 1.0, 0.5, 1.0]


def test_fp8_block_and_per_channel():
    N, K = 200, 136  # ragged: 2x2 blocks, the last ones partial
    v = torch.from_numpy(RNG.standard_normal((N, K)).astype(np.float32) * 8)
    f8 = v.to(torch.float8_e4m3fn)
    raw = f8.view(torch.uint8).numpy()
    q = f8.float().numpy()
    blocks = RNG.uniform(0.5, 2, (2, 2)).astype(np.float32)
    want = np.empty((N, K), np.float32)
    for i in range(N):
        for j in range(K):
            want[i, j] = q[i, j] * blocks[i // 128, j // 128]
    np.testing.assert_array_equal(R.dequantize("fp8", raw, blocks, n=N, k=K).numpy(), want)
    chan = RNG.uniform(0.5, 2, N).astype(np.float32)
    for s in (chan, chan.reshape(N, 1)):
        np.testing.assert_array_equal(R.dequantize("fp8", raw, s, n=N, k=K).numpy(), q * chan[:, None])


def test_gguf_q8_0_against_a_manual_decode():
    N, K = 3, 64
    w = RNG.standard_normal((N, K)).astype(np.float32)
    raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0).view(np.uint8).reshape(N, -1)
    assert raw.shape == (N, 2 * 34)
    want = np.empty((N, K), np.float32)
    for n in range(N):
        for b in range(2):
            blk = raw[n, 34 * b:34 * (b + 1)]
            d = float(blk[:2].view(np.float16)[0])
            want[n, 32 * b:32 * (b + 1)] = d * blk[2:].view(np.int8).astype(np.float32)
    got = R.dequantize("gguf:Q8_0", raw, n=N, k=K).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
    assert np.abs(got - w).max() < np.abs(w).max() / 100


def _q4k_block_manual(blk: np.ndarray) -> np.ndarray:
    d = float(blk[0:2].view(np.float16)[0])
    dmin = float(blk[2:4].view(np.float16)[0])
    sc, qs = blk[4:16].astype(int), blk[16:144].astype(int)

    def scale_min(j):
        if j < 4:
            return sc[j] & 63, sc[j + 4] & 63
        return (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4), (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4)

    out = np.empty(256, np.float64)
    for c in range(4):  # 64 outputs per 32 bytes
        s1, m1 = scale_min(2 * c)
        s2, m2 = scale_min(2 * c + 1)
        q = qs[32 * c:32 * (c + 1)]
        out[64 * c:64 * c + 32] = d * s1 * (q & 0xF) - dmin * m1
        out[64 * c + 32:64 * c + 64] = d * s2 * (q >> 4) - dmin * m2
    return out


def test_gguf_q4_k_random_blocks():
    N, K = 4, 512
    raw = R.encode_random("gguf:Q4_K", N, K, rng=7)["weight"]
    assert raw.dtype == np.uint8 and raw.shape == (N, 2 * 144)
    got = R.dequantize("gguf:Q4_K", raw, n=N, k=K).numpy()
    assert np.isfinite(got).all() and 0.3 < got.std() * np.sqrt(K) < 3
    for n in range(N):
        for b in range(2):
            want = _q4k_block_manual(raw[n, 144 * b:144 * (b + 1)])
            np.testing.assert_allclose(got[n, 256 * b:256 * (b + 1)], want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("fmt,gs", [("bf16", None), ("fp8", None), ("gptq-int4", 32), ("rawint4", 32),
                                    ("mxfp4", None), ("gguf:Q8_0", None), ("gguf:Q4_K", None),
                                    ("gguf:Q6_K", None)])
def test_random_encoders_have_unit_gain(fmt, gs):
    n, k = 64, 256
    p = R.encode_random(fmt, n, k, group_size=gs, rng=3)
    w = R.dequantize(fmt, p["weight"], p.get("scale"), n=n, k=k, group_size=gs)
    assert w.shape == (n, k) and torch.isfinite(w).all()
    assert 0.3 < float(w.std()) * np.sqrt(k) < 3.0
    again = R.encode_random(fmt, n, k, group_size=gs, rng=3)
    assert all(np.array_equal(again[key], p[key]) for key in p)


def test_moe_forward_against_a_token_loop():
    E, H, I, q, k = 4, 8, 6, 5, 2
    g = torch.Generator().manual_seed(0)
    gate, up, down = (torch.randn(E, a, b, generator=g) for a, b in ((I, H), (I, H), (H, I)))
    x = torch.randn(q, H, generator=g)
    ids = torch.tensor([[0, 1], [1, 0], [3, 2], [2, 2], [0, 3]])
    w = torch.rand(q, k, generator=g)
    out = R.moe_forward(x, ids, w, gate, up, down)
    for t in range(q):
        want = torch.zeros(H)
        for j in range(k):
            e = int(ids[t, j])
            h = torch.nn.functional.silu(gate[e] @ x[t]) * (up[e] @ x[t])
            want += w[t, j] * (down[e] @ h)
        torch.testing.assert_close(out[t], want, rtol=1e-5, atol=1e-5)
    assert R.rel_l1(out, out) == 0.0 and R.rel_l1(torch.zeros_like(out), out) == 1.0
