"""kt-kernel engines on in-memory weights in each staged encoding, against the torch reference.

Shapes are the smallest engine-facts.md reports working (2 threads, a handful of experts)."""
from __future__ import annotations

import logging
import subprocess
import sys
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ktnuma.tools import reference as R  # noqa: E402
from ktnuma.errors import BadInput  # noqa: E402
from ktnuma.integrations import kt_kernel as K  # noqa: E402
from ktnuma.tools import engine_check as EC  # noqa: E402

log = logging.getLogger(__name__)

E, TOPK, Q = 8, 2, 12  # 12 tokens: llamafile's grouped path starts at 10

# format -> (hidden, intermediate, group size): smallest shapes that also split in two
CASES = {
    "bf16": (64, 64, None),
    "fp8": (128, 256, None),
    "gptq-int4": (64, 64, 32),
    "rawint4": (64, 64, 32),
    "mxfp4": (64, 64, None),
    "gguf:Q8_0": (256, 512, None),
    "gguf:Q4_K": (256, 512, None),
}
NATIVE = [f for f in CASES if not f.startswith("gguf:")]
_layer_ids = iter(range(10_000))


@pytest.fixture(scope="module")
def cpu():
    pytest.importorskip("kt_kernel")  # engine tests only; the tables and limits need no engine
    return K.make_cpuinfer(threads=2)


def test_importing_the_integration_loads_no_engine_and_no_torch():
    code = ("import sys, ktnuma.integrations.kt_kernel as K; "
            "K.backend_for('fp8', hidden=128, intermediate=256, num_experts=4, experts_per_tok=2).split(2); "
            "print(sorted(m for m in ('torch', 'kt_kernel', 'gguf', 'safetensors') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


def _spec(fmt: str) -> K.EngineSpec:
    H, I, gs = CASES[fmt]
    return K.backend_for(fmt, hidden=H, intermediate=I, num_experts=E, experts_per_tok=TOPK, group_size=gs)


def _layer(spec: K.EngineSpec, seed: int = 0):
    """Stacked arrays {(proj, kind): [E, ...]} and dequantized float weights {proj: [E][N, K]}."""
    rng = np.random.default_rng(seed)
    arrays, deq = {}, {}
    for proj in K.PROJS:
        n, k = (spec.intermediate, spec.hidden) if proj != "down" else (spec.hidden, spec.intermediate)
        pieces = [R.encode_random(spec.format, n, k, group_size=spec.group_size, rng=rng) for _ in range(E)]
        for kind in spec.kinds:
            arrays[(proj, kind)] = np.ascontiguousarray(np.stack([p[kind] for p in pieces]))
        deq[proj] = [
            R.dequantize(spec.format, p["weight"], p.get("scale"), n=n, k=k, group_size=spec.group_size)
            for p in pieces
        ]
    return arrays, deq


def _tokens(spec: K.EngineSpec, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(Q, spec.hidden, generator=g).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(E, generator=g)[:TOPK] for _ in range(Q)]).to(torch.int64)
    w = torch.rand(Q, TOPK, generator=g, dtype=torch.float32)
    return x, ids, w


def _build(cpu, spec, arrays, mode="flat"):
    t0 = time.perf_counter()
    moe = K.build_moe(cpu, spec, arrays, mode=mode, layer_idx=next(_layer_ids))
    log.info("%s %s H=%d I=%d build %.1f ms", spec.engine_class, mode, spec.hidden, spec.intermediate,
             (time.perf_counter() - t0) * 1e3)
    return moe


def _pointer_tables(arrays):
    """Per-expert copies in separate buffers and their address tables (pointer mode)."""
    keep, tables = [], {}
    for key, stacked in arrays.items():
        pieces = [np.array(stacked[e], copy=True) for e in range(E)]
        keep.append(pieces)
        tables[key] = [p.ctypes.data for p in pieces]
    return tables, keep


def _scribble(arrays):
    for a in arrays.values():
        a.view(np.uint8)[...] = 0x11


@pytest.mark.parametrize("fmt", list(CASES))
def test_engine_matches_reference(cpu, fmt):
    spec = _spec(fmt)
    arrays, deq = _layer(spec)
    x, ids, w = _tokens(spec)
    moe = _build(cpu, spec, arrays)
    t0 = time.perf_counter()
    out = K.forward(moe, cpu, x, ids, w)
    log.info("%s forward %d tokens %.2f ms", spec.engine_class, Q, (time.perf_counter() - t0) * 1e3)
    ref = R.moe_forward(x, ids, w, deq["gate"], deq["up"], deq["down"])
    assert torch.isfinite(out.float()).all()
    err = R.rel_l1(out, ref)
    log.info("%s rel L1 %.4f", fmt, err)
    assert err < spec.tolerance, f"{fmt}: rel L1 {err:.4f} >= {spec.tolerance}"


@pytest.mark.parametrize("fmt", NATIVE)
def test_pointer_mode_is_bit_identical_to_flat(cpu, fmt):
    spec = _spec(fmt)
    arrays, _ = _layer(spec, seed=2)
    x, ids, w = _tokens(spec, seed=3)
    flat = K.forward(_build(cpu, spec, arrays), cpu, x, ids, w)
    tables, keep = _pointer_tables(arrays)
    moe = _build(cpu, spec, tables, mode="pointers")
    out = K.forward(moe, cpu, x, ids, w)
    assert out.view(torch.int16).equal(flat.view(torch.int16))
    assert flat.float().abs().sum() > 0
    del keep


@pytest.mark.parametrize("fmt", list(CASES))
def test_two_tp_parts_sum_to_the_whole(cpu, fmt):
    spec = _spec(fmt)
    arrays, deq = _layer(spec, seed=4)
    x, ids, w = _tokens(spec, seed=5)
    whole = K.forward(_build(cpu, spec, arrays), cpu, x, ids, w).float()
    part = spec.split(2)
    total = torch.zeros_like(whole)
    for p in range(2):
        sliced = {}
        for (proj, kind), a in arrays.items():
            axis = 1 + part.i_dim(proj)
            sliced[(proj, kind)] = np.ascontiguousarray(np.split(a, 2, axis=axis)[p])
        total += K.forward(_build(cpu, part, sliced), cpu, x, ids, w).float()
    ref = R.moe_forward(x, ids, w, deq["gate"], deq["up"], deq["down"])
    e_whole, e_ref = R.rel_l1(total, whole), R.rel_l1(total, ref)
    log.info("%s TP2: vs whole %.4f, vs torch %.4f", fmt, e_whole, e_ref)
    assert e_whole < spec.tolerance and e_ref < spec.tolerance


@pytest.mark.parametrize("mode", K.MODES)
@pytest.mark.parametrize("fmt", list(CASES))
def test_copies_at_load_matches_the_engine(cpu, fmt, mode):
    """Overwrite the source after load: the output changes exactly when the engine reads in place."""
    spec = _spec(fmt)
    if mode == "pointers" and fmt.startswith("gguf:"):
        with pytest.raises(BadInput, match="stacked arrays only"):
            K.build_moe(cpu, spec, {}, mode=mode, layer_idx=next(_layer_ids))
        return
    arrays, _ = _layer(spec, seed=6)
    x, ids, w = _tokens(spec, seed=7)
    keep = None
    if mode == "pointers":
        src, keep = _pointer_tables(arrays)
    else:
        src = arrays
    moe = _build(cpu, spec, src, mode=mode)
    before = K.forward(moe, cpu, x, ids, w).clone()
    if mode == "pointers":
        for pieces in keep:
            for p in pieces:
                p.view(np.uint8)[...] = 0x11
    else:
        _scribble(arrays)
    after = K.forward(moe, cpu, x, ids, w)
    unchanged = bool(after.view(torch.int16).equal(before.view(torch.int16)))
    assert unchanged == K.copies_at_load(fmt, mode, 1), f"{fmt} {mode}: engine copies={unchanged}"
    assert moe.in_place == (not unchanged)


def test_engines_this_cpu_runs_wrongly_are_refused(tmp_path):
    """GGUF BF16 through llamafile needs avx512_bf16 (K.LLAMAFILE_TYPE_NEEDS): refused without it, with
    the way out; other types and other engines are not the CPU's business. cpu_flags reads a cpuinfo."""
    def spec(fmt, types=None):
        return K.backend_for(fmt, hidden=256, intermediate=512, num_experts=4, experts_per_tok=2, gguf_types=types)

    with pytest.raises(BadInput, match=r"GGML type BF16 needs a CPU with avx512_bf16, which this one lacks.*Q8_0"):
        K.check_engine_cpu(spec("gguf:BF16"), frozenset({"avx2"}))
    with pytest.raises(BadInput, match="GGML type BF16"):  # the down projection alone in BF16
        K.check_engine_cpu(spec("gguf:Q8_0", ("Q8_0", "Q8_0", "BF16")), frozenset({"avx2"}))
    K.check_engine_cpu(spec("gguf:BF16"), frozenset({"avx2", "avx512_bf16"}))
    K.check_engine_cpu(spec("gguf:Q8_0"), frozenset())
    K.check_engine_cpu(K.backend_for("bf16", hidden=64, intermediate=64, num_experts=4, experts_per_tok=2), frozenset())
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert K.cpu_flags(str(info)) == {"fpu", "avx2", "avx512_bf16"}
    assert K.cpu_flags(str(tmp_path / "missing")) == frozenset()


def test_limits_refuse_the_silent_failures():
    def spec(fmt, H, I, gs=None):
        return K.backend_for(fmt, hidden=H, intermediate=I, num_experts=4, experts_per_tok=2, group_size=gs)

    with pytest.raises(BadInput, match=r"per-part intermediate 64 .*128"):
        K.check_engine_limits(spec("fp8", 128, 128), 2)
    K.check_engine_limits(spec("fp8", 128, 256), 2)
    with pytest.raises(BadInput, match=r"per-part intermediate 32 .*group size 64"):
        K.check_engine_limits(spec("gptq-int4", 128, 64, 64), 2)
    K.check_engine_limits(spec("gptq-int4", 64, 64, 32), 2)
    with pytest.raises(BadInput, match=r"per-part intermediate 192 .*group size 128"):
        K.check_engine_limits(spec("rawint4", 512, 384, 128), 2)
    with pytest.raises(BadInput, match="multiple of 256"):
        K.check_engine_limits(spec("gguf:Q8_0", 256, 256), 2)
    with pytest.raises(BadInput, match="hidden 128"):
        spec("gguf:Q8_0", 128, 256)
    with pytest.raises(BadInput, match="does not split into 3"):
        spec("bf16", 64, 64).split(3)
    with pytest.raises(BadInput, match="uses group size 128, not 64"):
        spec("fp8", 128, 128, 64)
    with pytest.raises(BadInput, match="no engine for format"):
        spec("amx-int4", 128, 128)
    assert spec("bf16", 64, 128).split(2).intermediate == 64
    down_q6 = K.backend_for("gguf:Q4_K", hidden=256, intermediate=512, num_experts=4, experts_per_tok=2,
                            gguf_types=("Q4_K", "Q4_K", "Q6_K"))
    assert down_q6.piece("down", "weight") == ("gguf:Q6_K", (256, 512))
    assert down_q6.piece_nbytes("down", "weight") == 256 * 2 * 210


def test_copies_at_load_table():
    assert not K.copies_at_load("rawint4", "pointers", 1)
    assert K.copies_at_load("rawint4", "flat", 1)
    assert not K.copies_at_load("gguf:Q4_K", "flat", 1)
    assert K.copies_at_load("gguf:Q4_K", "flat", 2)
    for fmt in ("bf16", "fp8", "gptq-int4", "mxfp4"):
        assert K.copies_at_load(fmt, "pointers", 1) and K.copies_at_load(fmt, "flat", 1)
    with pytest.raises(BadInput):
        K.copies_at_load("bf16", "mmap", 1)


def test_bad_arrays_are_refused(cpu):
    spec = _spec("rawint4")
    arrays, _ = _layer(spec)
    short = dict(arrays)
    short[("down", "scale")] = arrays[("down", "scale")][:-1]
    with pytest.raises(BadInput, match=r"down scale has \d+ bytes, expected 8 experts"):
        K.build_moe(cpu, spec, short, layer_idx=next(_layer_ids))
    missing = {key: a for key, a in arrays.items() if key != ("up", "weight")}
    with pytest.raises(BadInput, match="missing up weight"):
        K.build_moe(cpu, spec, missing, layer_idx=next(_layer_ids))
    tables, keep = _pointer_tables(arrays)
    tables[("gate", "weight")] = tables[("gate", "weight")][:-1] + [0]
    with pytest.raises(BadInput, match="1 zero"):
        K.build_moe(cpu, spec, tables, mode="pointers", layer_idx=next(_layer_ids))
    del keep


@pytest.mark.parametrize("fmt", ["rawint4", "gguf:Q4_K"])
def test_self_check_passes_on_good_weights_and_catches_bad_ones(cpu, fmt):
    spec = _spec(fmt)
    arrays, _ = _layer(spec, seed=8)
    moe = _build(cpu, spec, arrays)
    assert EC.self_check(moe, cpu, arrays) < spec.tolerance
    wrong, _ = _layer(spec, seed=9)  # the reference computed from other weights
    with pytest.raises(BadInput, match="disagrees with the torch reference"):
        EC.self_check(moe, cpu, wrong)


def test_merge_node_rows_for_ep():
    assert K.merge_node_rows([[11, 12, 0, 0], [0, 0, 23, 24]]) == [11, 12, 23, 24]
    with pytest.raises(BadInput, match="expert 2 is held by 0 nodes"):
        K.merge_node_rows([[11, 12, 0, 0], [0, 0, 0, 24]])
    with pytest.raises(BadInput, match="expert 0 is held by 2 nodes"):
        K.merge_node_rows([[11, 12, 0, 0], [5, 0, 23, 24]])
