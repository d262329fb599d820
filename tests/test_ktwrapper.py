"""The kt-kernel drop-in through the real, unmodified `kt_kernel.KTMoEWrapper`, in a multiprocessing
`spawn` child as SGLang's scheduler is (ktnuma/tools/ktwrapper_child.py), activated only by the environment
and the package's .pth line (processed here through a sitecustomize that adds the .pth's directory as a
site dir, as site-packages would be).

For each method this CPU runs, threadpool_count 1 and 2: forward output of the wrapper with ktnuma
(resident: a run staged by `launch --detach`; handoff: KTNUMA_STAGE=1) is bit-identical to the same
wrapper loading the model directory the stock way. RAWINT4 on AVX2: the stock wrapper crashes (SIGSEGV)
and ktnuma's output is the torch reference's; a second process attaching the same run gets the same bits
without reading the model.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, run_module

pytest.importorskip("kt_kernel")
torch = pytest.importorskip("torch")

pytestmark = pytest.mark.procs  # a fresh spawn child per case

log = logging.getLogger(__name__)
TWO = str(REPO / "configs/topologies/two-node.toml")
E, TOPK = 8, 2

# method -> (ktnuma format, hidden, intermediate, synth extras): smallest shapes that also split in two
CASES = {
    "BF16": ("bf16", 64, 64, {}),
    "FP8": ("fp8", 128, 256, {}),
    "GPTQ_INT4": ("gptq-int4", 64, 64, {"group_size": 32}),
    "RAWINT4": ("rawint4", 64, 64, {"group_size": 32}),  # default pick here: AMXInt4_KGroup_MOE (copies)
    "MXFP4": ("mxfp4", 64, 64, {}),
    "NVFP4": ("nvfp4", 64, 64, {}),
    "MXFP8": ("mxfp8", 64, 64, {}),
    "LLAMAFILE": ("gguf:Q8_0", 256, 512, {}),
    "AMXINT4": ("amx-int4", 256, 512, {}),  # pre-sharded: .numa.{n} shards = threadpool_count
    "AMXINT8": ("amx-int8", 256, 512, {}),
}
# (method, threadpool_count) whose engine reads the staged memory in place (engine-facts): resident only
IN_PLACE = {("LLAMAFILE", 1)}
# kt-kernel's own backend switches a method needs on this CPU (same for stock and ktnuma)
ENGINE_ENV = {"NVFP4": {"KT_MXFP4_BACKEND": "avx2"}}  # its AMX FP4 kernel has no group-16 path
# where the stock wrapper itself dies on this 1-node machine (nothing to compare with)
STOCK_CRASHES = {("RAWINT4", 2): "stock AMXInt4_KGroup_MOE over 2 subpools segfaults here (NUMA node 1 not found)"}


@pytest.fixture(scope="session")
def hook_site(tmp_path_factory) -> Path:
    """A directory whose sitecustomize adds a site dir holding the package's .pth (what pip installs)."""
    from ktnuma.tools.ktwrapper_child import make_hook_site

    return Path(make_hook_site(str(tmp_path_factory.mktemp("hook"))))


class Child:
    """Runs ktnuma.tools.ktwrapper_child with the hook on the path; env vars per call."""

    def __init__(self, hook: Path, tmp: Path) -> None:
        self.hook, self.tmp, self.n = hook, tmp, 0

    def __call__(self, method: str, weight_path: str, info, tp: int, **env: str):
        spec = {"experts": E, "experts_per_tok": TOPK, "hidden": info.config_h, "intermediate": info.config_i,
                "threadpool_count": tp, "weight_path": weight_path, "method": method,
                "layers": list(info.moe_layers), "model_files": list(info.files)}
        self.n += 1
        sp, out = self.tmp / f"spec{self.n}.json", self.tmp / f"out{self.n}.npz"
        sp.write_text(json.dumps(spec))
        e = {k: v for k, v in os.environ.items() if k not in ("KTNUMA_MANIFEST", "KTNUMA_STAGE", "KTNUMA_PREFETCH")}
        e.update(PYTHONPATH=f"{self.hook}{os.pathsep}{REPO}", KT_FORCE_SYNC_SUBMIT="1", **ENGINE_ENV.get(method, {}))
        e.update(env)
        r = subprocess.run([sys.executable, "-m", "ktnuma.tools.ktwrapper_child", str(sp), str(out)],
                           capture_output=True, text=True, env=e, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        res = json.loads(r.stdout.strip().splitlines()[-1])
        res["stderr"], res["stdout"] = r.stderr, r.stdout
        if res["exitcode"] == 0:
            z = np.load(out)
            res["out"] = {k: z[k] for k in z.files if k != "meta"}
            res.update(json.loads(bytes(z["meta"])))
        return res


@pytest.fixture
def child(hook_site, tmp_path):
    return Child(hook_site, tmp_path)


@pytest.fixture
def detached(tmp_path, run_registry):
    made: list[str] = []

    def launch(model: str, split: str, nodes: int) -> str:
        man = str(tmp_path / f"run{len(made)}.json")
        args = ["--topology", TWO] if nodes > 1 else []
        r = run_module("launch", model, *args, "--nodes", str(nodes), "--split", split, "--detach", "--quiet",
                       "--manifest", man)
        assert r.returncode == 0, r.stderr
        made.append(man)
        return man

    yield launch
    for man in made:
        if os.path.exists(man):
            run_module("release", man)


def _model(synth_model, method, tp: int = 1):
    fmt, H, I, kw = CASES[method]
    if fmt.startswith("amx-"):
        kw = {**kw, "numa_shards": tp}
    return _Info(synth_model(fmt, hidden=H, intermediate=I, experts=E, experts_per_tok=TOPK, **kw), H, I)


class _Info:
    def __init__(self, info, H: int, I: int) -> None:
        self.path, self.files, self.moe_layers = info.path, info.files, info.moe_layers
        self.config_h, self.config_i = H, I


def _same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b) and a
    for k in a:
        assert np.array_equal(a[k], b[k]), f"{k}: not bit-identical"
        assert np.abs(a[k].astype(np.int32)).sum() > 0


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("method", list(CASES))
def test_wrapper_output_is_bit_identical_resident_and_handoff(child, detached, synth_model, method, tp):
    info = _model(synth_model, method, tp)
    if method == "RAWINT4" and _rawint4_picks_in_place():
        pytest.skip("kt-kernel picks the in-place AVX2RawInt4_MOE on this CPU (no AVX-512): the stock load "
                    "crashes; test_rawint4_in_place_engine_crashes_stock_and_runs_on_resident_segments covers it")
    stock = child(method, info.path, info, tp)
    if stock["exitcode"] != 0 and "backend not available" in (stock["error"] or ""):
        assert not cpu_has_avx512(), stock["error"]  # only a CPU without AVX-512 may lack the engine
        pytest.skip(f"kt-kernel has no {method} engine on this CPU: {stock['error'].splitlines()[0]}")
    if (method, tp) in STOCK_CRASHES:
        assert stock["exitcode"] == -11
        pytest.skip(STOCK_CRASHES[(method, tp)])
    assert stock["exitcode"] == 0, stock["stderr"][-1500:]
    ho = child(method, info.path, info, tp, KTNUMA_STAGE="1")
    if (method, tp) in IN_PLACE:  # the engine keeps reading the source: a handoff would free it under it
        assert ho["exitcode"] == 2 and "keeps reading the weights after load" in ho["error"]
        assert "\n" not in ho["error"] and "KTNUMA_MANIFEST" in ho["error"]
    else:
        assert ho["exitcode"] == 0, ho["error"] or ho["stderr"][-1500:]
        _same(stock["out"], ho["out"])
        assert ho["shm_after"] == 0  # every handoff segment is gone once the last layer is loaded
    man = detached(info.path, "ep" if tp > 1 and not method.startswith("AMX") else "tp", tp)
    res = child(method, info.path, info, tp, KTNUMA_MANIFEST=man)
    assert res["exitcode"] == 0, res["error"] or res["stderr"][-1500:]
    _same(stock["out"], res["out"])
    if not method.startswith("AMX"):  # AMXMoEWrapper globs weight_path/*.safetensors itself
        # --kt-weight-path naming the manifest itself
        res2 = child(method, man, info, tp, KTNUMA_MANIFEST=man)
        assert res2["exitcode"] == 0, res2["error"] or res2["stderr"][-1500:]
        _same(stock["out"], res2["out"])
    log.info("%s tp%d: load stock %.3f s, handoff %s s, resident %.3f s", method, tp, stock["load_s"],
             ho.get("load_s"), res["load_s"])


def _tokens(info, layers, seed: int = 1, q: int = 12):
    """The child's tokens (same generator sequence as ktnuma.tools.ktwrapper_child)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for L in layers:
        x = torch.randn(q, info.config_h, generator=g).to(torch.bfloat16)
        ids = torch.stack([torch.randperm(E, generator=g)[:TOPK] for _ in range(q)]).to(torch.int64)
        w = torch.rand(q, TOPK, generator=g, dtype=torch.float32)
        out[L] = (x, ids, w)
    return out


def _rawint4_reference(info, layer: int, x, ids, w):
    """Torch MoE of the checkpoint's rawint4 experts, read with safetensors (not ktnuma's readers)."""
    from safetensors import safe_open

    from ktnuma.tools import reference as R

    H, I = info.config_h, info.config_i
    deq = {}
    with safe_open(os.path.join(info.path, "model.safetensors"), framework="pt") as f:
        for proj in ("gate", "up", "down"):
            n, k = (I, H) if proj != "down" else (H, I)
            deq[proj] = {e: R.dequantize("rawint4", f.get_tensor(f"model.layers.{layer}.mlp.experts.{e}.{proj}_proj"
                                                                  ".weight_packed").numpy(),
                                         f.get_tensor(f"model.layers.{layer}.mlp.experts.{e}.{proj}_proj"
                                                      ".weight_scale").view(torch.int16).numpy(),
                                         n=n, k=k, group_size=32)
                         for e in range(E)}
    return R.moe_forward(x, ids, w, deq["gate"], deq["up"], deq["down"])


def _drop_cache(paths) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)  # a freshly written model's dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def test_rawint4_in_place_engine_crashes_stock_and_runs_on_resident_segments(child, detached, synth_model):
    """AVX2RawInt4_MOE keeps reading the source after load: the stock wrapper has released its mmap by
    then (SIGSEGV); ktnuma's segments outlive the load, and a second process reuses them unread."""
    from ktnuma.tools import reference as R
    from ktnuma.tools.ktwrapper_child import cached_bytes

    info = _model(synth_model, "RAWINT4")
    avx2 = {"KT_RAWINT4_BACKEND": "avx2"}
    stock = child("RAWINT4", info.path, info, 1, **avx2)
    assert stock["exitcode"] == -11, f"stock RAWINT4 on AVX2 did not crash: {stock['exitcode']}"
    ho = child("RAWINT4", info.path, info, 1, KTNUMA_STAGE="1", **avx2)
    assert ho["exitcode"] == 2 and "keeps reading the weights after load" in ho["error"]
    man = detached(info.path, "ep", 1)
    first = child("RAWINT4", info.path, info, 1, KTNUMA_MANIFEST=man, **avx2)
    assert first["exitcode"] == 0, first["error"] or first["stderr"][-1500:]
    assert "AVX2_RAW_INT4" in first["stdout"]
    for L, (x, ids, w) in _tokens(info, info.moe_layers).items():
        out = torch.from_numpy(first["out"][f"L{L}"]).view(torch.bfloat16)
        err = R.rel_l1(out, _rawint4_reference(info, L, x, ids, w))
        assert err < 0.02, f"layer {L}: rel L1 {err:.4f} vs the torch reference"
    _drop_cache(info.files)
    second = child("RAWINT4", info.path, info, 1, KTNUMA_MANIFEST=man, **avx2)
    assert second["exitcode"] == 0, second["error"] or second["stderr"][-1500:]
    _same(first["out"], second["out"])
    assert cached_bytes(list(info.files)) == 0, "the second process read the model files"
    # an in-place engine over two subpools is refused with the way out
    two = child("RAWINT4", info.path, info, 2, KTNUMA_MANIFEST=detached(info.path, "ep", 2), **avx2)
    assert two["exitcode"] == 2 and "--kt-threadpool-count 1" in two["error"] and "\n" not in two["error"]


# staged (weight, scale) torch dtypes and piece shapes per native method (as the attach torch views give them)
_STAGED = {"BF16": ((torch.bfloat16, (8, 16)), None),
           "FP8": ((torch.float8_e4m3fn, (8, 16)), (torch.float32, (1, 1))),
           "FP8_PERCHANNEL": ((torch.float8_e4m3fn, (8, 16)), (torch.float32, (8, 1))),
           "GPTQ_INT4": ((torch.int32, (2, 8)), (torch.float32, (1, 8))),
           "RAWINT4": ((torch.int32, (8, 2)), (torch.bfloat16, (8, 1))),
           "MXFP4": ((torch.uint8, (8, 8)), (torch.bfloat16, (8, 1))),
           "NVFP4": ((torch.uint8, (8, 8)), (torch.float8_e4m3fn, (8, 2))),
           "MXFP8": ((torch.float8_e4m3fn, (8, 16)), (torch.uint8, (8, 1)))}


@pytest.mark.parametrize("method", sorted(_STAGED))
def test_fast_expert_views_equal_the_per_piece_views(method):
    """The loader's one-unbind views (loaders._pieces) are, piece for piece, the tensor `Method.view` gives
    for that piece alone: same dtype, shape, strides, address, and for copying views (NVFP4's folded
    scales) the same bytes."""
    from ktnuma.integrations.kt_kernel.loaders import _pieces
    from ktnuma.integrations.kt_kernel.methods import method as method_of

    m = method_of(method)
    g = torch.Generator().manual_seed(3)
    for kind, staged in zip(("weight", "scale"), _STAGED[method]):
        if staged is None:
            continue
        dtype, shape = staged
        raw = torch.randint(1, 120, (E, *shape, dtype.itemsize), dtype=torch.uint8, generator=g)
        stacked = raw.view(dtype).reshape(E, *shape)
        gl = [float(e + 1) / 4 for e in range(E)] if m.globals and kind == "scale" else [None] * E
        fast = _pieces(m, stacked, kind, gl)
        slow = [m.view(stacked[e], kind, gl[e]) for e in range(E)]
        assert len(fast) == len(slow) == E
        for e, (a, b) in enumerate(zip(fast, slow)):
            assert (a.dtype, tuple(a.shape), a.stride()) == (b.dtype, tuple(b.shape), b.stride()), (kind, e)
            if b.data_ptr() == stacked[e].data_ptr():  # a view: the same memory
                assert a.data_ptr() == b.data_ptr(), (kind, e)
            assert torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)), (kind, e)


@pytest.mark.parametrize("method", ["AMXINT4", "AMXINT8"])
def test_amx_loader_output_equals_upstream_safetensor_loader(detached, synth_model, method):
    """[numa][expert] numpy arrays, same keys in the same order, dtypes, shapes and bytes."""
    from kt_kernel.utils.loader import SafeTensorLoader

    from ktnuma.integrations.kt_kernel import loaders, methods, sessions

    info = _model(synth_model, method, 2)
    man = detached(info.path, "tp", 2)
    sess = sessions.Resident(methods.method(method), sessions.Pool(2, (0, 1)), man, info.path, False)
    try:
        ours, stock = loaders.AmxLoader(lambda: sess), SafeTensorLoader(info.path)
        for L in info.moe_layers:
            a, b = ours.load_experts(f"blk.{L}"), stock.load_experts(f"blk.{L}")
            assert list(a) == list(b)
            for key in b:
                assert len(a[key]) == len(b[key]) == 2 and all(len(r) == E for r in a[key])
                for ra, rb in zip(a[key], b[key]):
                    for x, y in zip(ra, rb):
                        assert isinstance(x, np.ndarray) and x.dtype == y.dtype and x.shape == y.shape, key
                        assert x.tobytes() == y.tobytes(), f"layer {L} {key}: bytes differ"
        with pytest.raises(KeyError):
            ours.load_experts("model.layers.1")
    finally:
        sess.close()


def cpu_has_avx512() -> bool:
    """AVX512F and AVX512BW, what kt-kernel 0.7.2's AMX* methods and AMX KGroup RAWINT4 engines need
    (without them it says "AMXINT4 backend not available. Required ISA: AVX512F + AVX512BW")."""
    from ktnuma.integrations.kt_kernel.methods import cpu_flags

    return {"avx512f", "avx512bw"} <= cpu_flags()


def _rawint4_picks_in_place() -> bool:
    from kt_kernel.utils import amx

    from ktnuma.integrations.kt_kernel.methods import _rawint4_in_place

    return _rawint4_in_place(amx)


def cpu_has_amx() -> bool:
    from ktnuma.integrations.kt_kernel.methods import cpu_has_amx as has

    return has()


def test_amx_only_engines_are_refused_without_amx_whatever_this_cpu_has():
    """The refusal itself, on any CPU (the through-the-wrapper case above needs a CPU without AMX):
    FP8_PERCHANNEL always needs AMX, MXFP8 only when KT_MXFP8_BACKEND=amx forces it."""
    from ktnuma.errors import BadInput
    from ktnuma.integrations.kt_kernel.methods import check_cpu, method

    with pytest.raises(BadInput, match="needs AMX") as e:
        check_cpu(method("FP8_PERCHANNEL"), {}, has_amx=False)
    assert "\n" not in str(e.value) and "--kt-method FP8" in str(e.value)
    check_cpu(method("FP8_PERCHANNEL"), {}, has_amx=True)
    check_cpu(method("MXFP8"), {}, has_amx=False)
    with pytest.raises(BadInput, match="KT_MXFP8_BACKEND=amx"):
        check_cpu(method("MXFP8"), {"KT_MXFP8_BACKEND": "AMX"}, has_amx=False)


def _refused(res, *phrases: str) -> None:
    assert res["exitcode"] == 2, res.get("error") or res["stderr"][-1500:]
    import ktnuma.errors

    err = res["error"]
    cls = getattr(ktnuma.errors, err.split(":", 1)[0], None)
    assert cls is not None and issubclass(cls, ktnuma.errors.BadInput) and "\n" not in err, err
    for p in phrases:
        assert p in err, err


def test_refusals_through_the_real_wrapper_are_one_line_and_leave_nothing(child, detached, synth_model, tmp_path):
    bf16 = _model(synth_model, "BF16")
    man = detached(bf16.path, "tp", 1)
    # method / format mismatch, resident and handoff
    _refused(child("FP8", bf16.path, bf16, 1, KTNUMA_MANIFEST=man), "holds format bf16", "--kt-method BF16")
    _refused(child("FP8", bf16.path, bf16, 1, KTNUMA_STAGE="1"), "holds format bf16", "--kt-method BF16")
    # nodes: a one-node run for a two-subpool pool
    _refused(child("BF16", bf16.path, bf16, 2, KTNUMA_MANIFEST=man), "1 node(s)", "threadpool_count 2")
    # a sliced tp run for a native method: the split to use
    man_tp = detached(bf16.path, "tp", 2)
    _refused(child("BF16", bf16.path, bf16, 2, KTNUMA_MANIFEST=man_tp), "split=tp run over 2 nodes",
             "--split ep")
    # the wrapper's model is not the run's
    other = _model(synth_model, "MXFP4")
    _refused(child("BF16", other.path, bf16, 1, KTNUMA_MANIFEST=man), "the run staged", "weight_path is")
    # AMX: shard count != threadpool_count (upstream would index out of bounds); without AVX-512
    # kt-kernel's AMXINT4 wrapper refuses itself first (its own error, before any weight moves)
    amx = _model(synth_model, "AMXINT4", 2)
    man_amx = detached(amx.path, "tp", 2)
    res_amx = child("AMXINT4", amx.path, amx, 1, KTNUMA_MANIFEST=man_amx)
    ho_amx = child("AMXINT4", amx.path, amx, 1, KTNUMA_STAGE="1")
    if cpu_has_avx512():
        _refused(res_amx, "2 node(s)", "threadpool_count 1")
        _refused(ho_amx, "2 .numa shards")
    else:
        for r in (res_amx, ho_amx):
            assert r["exitcode"] != 0 and "AMXINT4 backend not available" in (r["error"] or ""), r["error"]
    # FP8_PERCHANNEL runs only on an AMX engine: refused on a CPU without AMX before any weight moves;
    # on an AMX CPU the same handoff loads, bit-identical to the stock load
    ch = synth_model("fp8-channel", hidden=128, intermediate=256, experts=E, experts_per_tok=TOPK)
    chi = _Info(ch, 128, 256)
    ho = child("FP8_PERCHANNEL", ch.path, chi, 1, KTNUMA_STAGE="1")
    if not cpu_has_avx512():  # kt-kernel's own ISA check refuses first ("backend not available")
        assert ho["exitcode"] != 0 and "FP8_PERCHANNEL backend not available" in (ho["error"] or ""), ho["error"]
    elif not cpu_has_amx():
        _refused(ho, "needs AMX")
    else:
        stock = child("FP8_PERCHANNEL", ch.path, chi, 1)
        assert ho["exitcode"] == 0 and stock["exitcode"] == 0, (ho.get("error"), stock.get("error"))
        _same(stock["out"], ho["out"])  # (its segments: the detached runs above share the prefix)
    # experts missing for a layer the engine builds
    man_l1 = str(tmp_path / "l1.json")
    r = run_module("launch", bf16.path, "--nodes", "1", "--layers", "1", "--detach", "--quiet", "--manifest", man_l1)
    assert r.returncode == 0, r.stderr
    try:
        _refused(child("BF16", bf16.path, bf16, 1, KTNUMA_MANIFEST=man_l1), "no experts staged for layer 2")
    finally:
        run_module("release", man_l1)


def test_handoff_peak_is_at_most_the_stock_peak(child, synth_model):
    """Peak of (anon RSS + the run's segments + the model's page cache) during a whole-model load from a
    cold cache: the handoff holds the engine's copy plus a one-layer window; the stock loader the copy
    plus the model's pages it mapped. No segment is left after load."""
    info = synth_model("bf16", hidden=1024, intermediate=1024, experts=E, experts_per_tok=TOPK, layers=6)
    m = _Info(info, 1024, 1024)  # 288 MiB of experts: the weights, not the interpreters, decide the peak
    _drop_cache(info.files)
    stock = child("BF16", info.path, m, 1)
    _drop_cache(info.files)
    ho = child("BF16", info.path, m, 1, KTNUMA_STAGE="1")
    assert stock["exitcode"] == 0 and ho["exitcode"] == 0, (stock.get("error"), ho.get("error"))
    _same(stock["out"], ho["out"])
    log.info("peak: stock %.1f MB, handoff %.1f MB (staged %.1f MB)", stock["peak"] / 2**20, ho["peak"] / 2**20,
             info.staged_nbytes / 2**20)
    assert ho["peak"] <= stock["peak"], (ho["peak"], stock["peak"])
    assert ho["shm_after"] == 0


def test_the_pth_line_is_inert_unless_a_variable_is_set(hook_site):
    code = "import sys; print(sorted(m for m in sys.modules if m.startswith('ktnuma')))"
    base = {k: v for k, v in os.environ.items() if k not in ("KTNUMA_MANIFEST", "KTNUMA_STAGE")}
    base["PYTHONPATH"] = f"{hook_site}{os.pathsep}{REPO}"
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=base, timeout=60)
    assert off.stdout.strip() == "[]", off.stderr
    on = subprocess.run([sys.executable, "-c", code + "; print(any(type(f).__name__ == '_Finder' for f in "
                         "sys.meta_path))"], capture_output=True, text=True, env={**base, "KTNUMA_STAGE": "1"},
                        timeout=60)
    mods, finder = on.stdout.strip().splitlines()
    assert "ktnuma.integrations.kt_kernel.activate" in mods and finder == "True", on.stderr
    assert "ktnuma.integrations.kt_kernel.backends" not in mods  # nothing heavy until kt_kernel is imported
