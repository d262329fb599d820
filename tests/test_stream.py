"""ktnuma.stream: staging from the engine's process, layer by layer, with the previous layer released.

The memory test runs two engine processes on the same bf16 model (`python tests/test_stream.py
mem MODE MODEL`): "memory" feeds kt-kernel's per-node TP engines from tensors read into memory
one layer at a time (safetensors get_slice, the upstream way; peak B), "stream" feeds the same
engines from ktnuma.stream. Each samples its anonymous RSS plus the shared memory of its run
(segments still linked in /dev/shm, plus mappings of unlinked ones) every 2 ms.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TWO = os.path.join(REPO, "configs/topologies/two-node.toml")


# ============================================================== the measuring engine process
class Sampler:
    """Peak of RssAnon + shared memory of segments whose names start with `prefix`."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def now(self) -> tuple[int, int]:
        with open("/proc/self/status") as f:
            anon = next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))
        shm_bytes = 0
        seen = set()
        try:
            for e in os.scandir("/dev/shm"):
                if e.name.startswith(self.prefix):
                    try:
                        shm_bytes += e.stat().st_blocks * 512
                        seen.add(e.name)
                    except FileNotFoundError:
                        pass
        except FileNotFoundError:
            pass
        with open("/proc/self/maps") as f:  # unlinked segments still mapped keep their pages
            for line in f:
                if self.prefix in line and line.rstrip().endswith("(deleted)"):
                    name = os.path.basename(line.split()[5])
                    if name not in seen:
                        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                        shm_bytes += hi - lo
        return anon, shm_bytes

    def sample(self) -> None:
        anon, s = self.now()
        self.peak = max(self.peak, anon + s)
        self.samples += 1

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(0.002)

    def __enter__(self) -> "Sampler":
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.sample()


def measure(mode: str, model: str, prefetch: int = 1) -> dict:
    import numpy as np
    import torch
    from safetensors import safe_open

    import ktnuma
    from ktnuma.index.experts import index_model
    from ktnuma.integrations import kt_kernel as K

    cpu = K.make_cpuinfer(threads=2)
    index = index_model(model)
    cfg = index.config
    H, I, E = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
    spec = K.backend_for("bf16", hidden=H, intermediate=I, num_experts=E, experts_per_tok=cfg.experts_per_tok)
    part = spec.split(2)
    layer_bytes = sum(g.nbytes * g.count for g in index.groups if g.layer == cfg.layers[0])
    prefix = "ktnuma." + os.environ["KTNUMA_RUN_ID_PREFIX"]
    engines: list = []
    t0 = time.perf_counter()
    timing: dict = {}
    with Sampler(prefix) as smp:
        start = smp.now()
        if mode == "memory":
            files = {os.path.basename(f.path): f.path for f in index.files}
            with safe_open(next(iter(files.values())), framework="pt") as f:
                for layer in cfg.layers:
                    parts = []
                    for p in range(2):  # read each node's slices into memory, as the upstream TP loader does
                        arrays = {}
                        for proj, name in zip(K.PROJS, ("gate_proj", "up_proj", "down_proj")):
                            n, k = (part.intermediate, H) if proj != "down" else (H, part.intermediate)
                            out = torch.empty((E, n, k), dtype=torch.bfloat16)
                            for e in range(E):
                                sl = f.get_slice(f"model.layers.{layer}.mlp.experts.{e}.{name}.weight")
                                lo, hi = p * part.intermediate, (p + 1) * part.intermediate
                                out[e] = sl[lo:hi, :] if proj != "down" else sl[:, lo:hi]
                            arrays[(proj, "weight")] = out
                        parts.append(arrays)
                    for p in range(2):
                        engines.append(K.build_moe(cpu, part, parts[p], layer_idx=len(engines)))
                        engines[-1].keep = ()
                    del parts, arrays, out
                    smp.sample()
        else:
            waited = 0.0
            with ktnuma.stream(model, topology=TWO, split="tp", prefetch=prefetch, engine=K.engine_kind("bf16", "flat")) as layers:
                for staged in layers:
                    eng = K.engines_for_layer(staged, cpu)
                    eng.release_sources()
                    engines.append(eng)
                    smp.sample()
                timing = {"staging_busy_s": round(layers.staging_seconds, 4),
                          "engine_waited_s": round(layers.waited_seconds, 4)}
    total = time.perf_counter() - t0
    # the engines work: one forward through the last layer's engines
    x = torch.randn(4, H).to(torch.bfloat16)
    ids = np.stack([np.random.default_rng(i).permutation(E)[:cfg.experts_per_tok] for i in range(4)])
    w = np.full(ids.shape, 0.5, dtype=np.float32)
    last = engines[-1].parts if hasattr(engines[-1], "parts") else engines[-2:]
    out = sum(K.forward(m, cpu, x, ids, w).float() for m in last)
    return {"mode": mode, "peak": smp.peak, "start_anon": start[0], "start_shm": start[1],
            "layer_bytes": layer_bytes, "layers": len(cfg.layers), "seconds": round(total, 3),
            "samples": smp.samples, "finite": bool(torch.isfinite(out).all()), **timing}


# ============================================================== tests
def _segments(prefix):
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(prefix))


@pytest.fixture
def prefix():
    return "ktnuma." + os.environ["KTNUMA_RUN_ID_PREFIX"]


def test_layers_in_order_previous_released_all_removed(synth_model, run_registry, prefix):
    import ktnuma
    from ktnuma.stage import registry
    from ktnuma.errors import Released

    info = synth_model("fp8", hidden=128, intermediate=256, layers=4, mtp=False)
    before = _segments(prefix)
    seen, held = [], []
    with ktnuma.stream(info.path, topology=TWO, split="tp", prefetch=1) as layers:
        assert len(registry.entries()) == 1 and registry.entries()[0].state == "staging"
        prev = None
        for staged in layers:
            seen.append(staged.layer)
            now = set(_segments(prefix)) - set(before)
            held.append(len(now))
            mine = {r.segment for r in staged.records()}
            assert mine <= now and len(mine) == 2
            assert now - mine <= {n.replace(f".L{staged.layer}.", f".L{staged.layer + 1}.") for n in mine}
            if prev is not None:
                assert not {r.segment for r in prev.records()} & now  # the previous layer is unlinked
                with pytest.raises(Released, match=f"layer {prev.layer} was released"):
                    prev.array("gate", "weight", 0)
            w = staged.torch("gate", "weight", 1)
            assert str(w.dtype) == "torch.float8_e4m3fn" and tuple(w.shape) == (8, 128, 128)
            assert staged.record("gate", "weight", 1).slice == (0, 128, 256)
            assert all(p for p in staged.pointers("down", "scale")[0])
            prev = staged
    assert seen == [1, 2, 3, 4]
    assert max(held) <= 2 * 2  # (prefetch + 1) layers x 2 nodes
    assert _segments(prefix) == before and registry.entries() == []


def _source_bytes(info, name: str) -> bytes:
    import torch
    from safetensors import safe_open

    with safe_open(info.files[0], "pt") as f:
        return f.get_tensor(name).view(torch.uint8).numpy().tobytes()


def test_prefetch_zero_and_exception_remove_everything(synth_model, run_registry, prefix):
    import ktnuma

    info = synth_model("bf16", hidden=64, intermediate=64, layers=3, mtp=False)
    before = _segments(prefix)
    with ktnuma.stream(info.path, topology=TWO, split="ep", prefetch=0) as layers:
        for staged in layers:
            assert len(set(_segments(prefix)) - set(before)) <= 2
            want = _source_bytes(info, f"model.layers.{staged.layer}.mlp.experts.5.up_proj.weight")
            assert staged.tensor(5, "up", "weight").tobytes() == want  # ep: the holder is found
    with pytest.raises(RuntimeError, match="engine failed"):
        with ktnuma.stream(info.path, topology=TWO, split="ep") as layers:
            for staged in layers:
                raise RuntimeError("engine failed")
    assert _segments(prefix) == before


def test_in_place_engines_and_bad_arguments_are_refused(synth_model, prefix):
    import ktnuma
    from ktnuma.errors import BadInput
    from ktnuma.integrations import kt_kernel as K

    info = synth_model("rawint4", hidden=64, intermediate=64, group_size=32)
    before = _segments(prefix)
    with pytest.raises(BadInput, match="rawint4 engine in pointers mode .* keeps reading the weights"):
        with ktnuma.stream(info.path, topology=TWO, engine=K.engine_kind("rawint4", "pointers")):
            pass
    with pytest.raises(BadInput, match="gguf:Q4_K engine in flat mode"):
        with ktnuma.stream(info.path, topology=TWO, engine=K.engine_kind("gguf:Q4_K")):
            pass
    with pytest.raises(BadInput, match="does not say whether it copies the weights at load"):
        with ktnuma.stream(info.path, topology=TWO, engine=("bf16", "flat")):  # the engine side knows no engine
            pass
    with pytest.raises(BadInput, match="unknown mode"):
        K.engine_kind("bf16", "sideways")
    with pytest.raises(BadInput, match="prefetch must be >= 0"):
        with ktnuma.stream(info.path, topology=TWO, prefetch=-1):
            pass
    with ktnuma.stream(info.path, topology=TWO, engine=K.engine_kind("rawint4", "flat")) as layers:  # copies at load: fine
        assert [s.layer for s in layers] == [1, 2]
    assert _segments(prefix) == before


def test_stream_peak_memory_is_the_engine_plus_layers_in_flight(synth_model, tmp_path, prefix):
    pytest.importorskip("kt_kernel")
    info = synth_model("bf16", hidden=1024, intermediate=512, experts=16, layers=6, mtp=False)
    res = {}
    for mode in ("memory", "stream"):
        env = dict(os.environ, KTNUMA_RUN_ID_PREFIX=os.environ["KTNUMA_RUN_ID_PREFIX"] + mode[0].replace("m", "a"))
        r = subprocess.run([sys.executable, __file__, "mem", mode, info.path], capture_output=True, text=True,
                           env=env, timeout=300, cwd=REPO)
        assert r.returncode == 0, r.stderr[-3000:]
        res[mode] = json.loads(r.stdout.strip().splitlines()[-1])
    B, S, L = res["memory"]["peak"], res["stream"]["peak"], res["memory"]["layer_bytes"]
    msg = (f"B (in-memory feed) {B / 2**20:.1f} MiB, stream {S / 2**20:.1f} MiB, layer {L / 2**20:.1f} MiB, "
           f"{res['memory']['layers']} layers; stream {res['stream']}")
    print(msg)
    assert res["memory"]["finite"] and res["stream"]["finite"]
    # the engines hold their own copy of every layer: both peaks are at least that
    assert B > res["memory"]["layers"] * L and S > res["stream"]["layers"] * L, msg
    assert S < B + 2.5 * L, msg
    assert _segments(prefix) == []


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "mem":
        sys.path.insert(0, REPO)
        os.environ.setdefault("KTNUMA_RUN_ID_PREFIX", "ee")
        saved = os.dup(1)
        os.dup2(2, 1)  # kt-kernel's chatter to stderr
        result = measure(sys.argv[2], sys.argv[3], *(int(x) for x in sys.argv[4:5]))
        sys.stdout.flush()
        os.dup2(saved, 1)
        print(json.dumps(result), flush=True)
        os._exit(0)
    sys.exit(f"usage: {sys.argv[0]} mem memory|stream MODEL [PREFETCH]")
