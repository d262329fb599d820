"""The benchmark runs end to end on a small model (every case, warm and cold) and reports sane numbers."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_raw_bound_imports_only_the_standard_library():
    src = open(os.path.join(ROOT, "scripts", "raw_bound.py")).read()
    imports = {l.split()[1].split(".")[0] for l in src.splitlines() if l.startswith(("import ", "from "))}
    assert imports <= {"json", "mmap", "os", "subprocess", "sys", "time"}, imports


@pytest.mark.bench
def test_quick_bench_json(tmp_path):
    pytest.importorskip("kt_kernel")
    r = subprocess.run([sys.executable, "-m", "ktnuma.bench", "--quick", "--json", "--cache", str(tmp_path)],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:] + r.stdout[-2000:]
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert s["errors"] == {}
    assert s["bytes"] > 0
    for mode in ("warm", "cold"):
        rows = s["modes"][mode]
        assert set(rows) == {"raw", "rawsf", "ep", "tp", "upstream", "stream", "attach"}
        for case, row in rows.items():
            assert row["seconds"] > 0 and row["gbps"] > 0, (mode, case, row)
            assert row["peak"] > 0, (mode, case)
            assert 0.0 <= row["cache_left"] <= 1.0
            assert row["peak"] == row["peak_anon"] + row["peak_shm"] + row["peak_model_files"], (case, row)
        # staging holds the staged bytes in shared memory at its peak (our segments, nobody else's)
        for case in ("ep", "tp"):
            assert s["bytes"] <= rows[case]["max_shm"] < s["bytes"] + (8 << 20), (case, rows[case])
        # staging drops the page cache of the expert ranges; the raw bound does not
        assert rows["ep"]["cache_left"] <= 0.05 and rows["tp"]["cache_left"] <= 0.05, rows
        # ktnuma's processes never map the model (shared libraries' file pages are not counted either;
        # kt-kernel's loader maps it only briefly on this tiny model, so its share is not asserted here)
        for case in ("ep", "tp", "stream"):
            assert rows[case]["peak_model_files"] == 0, (case, rows[case])
        # every source byte read once (the launch summary's read_bytes / staged bytes)
        for case in ("ep", "tp"):
            assert rows[case]["read_ratio"] == 1.0, (case, rows[case])
    assert {t["target"].split(" ")[0] for t in s["targets"]} >= {"warm", "cold"}
    # nothing of ours is left in /dev/shm
    assert not [n for n in os.listdir("/dev/shm") if n.startswith("ktnuma.raw.")]


@pytest.mark.bench
def test_peers_load_the_same_experts(tmp_path):
    """The peers (safetensors, fastsafetensors, runai-model-streamer) run as whole processes on the
    same routed-expert tensors, and the bench reports them beside ktnuma with ok/MISS targets."""
    for mod in ("safetensors", "fastsafetensors", "runai_model_streamer"):
        pytest.importorskip(mod)
    r = subprocess.run([sys.executable, "-m", "ktnuma.bench", "--quick", "--json", "--cache", str(tmp_path),
                        "--modes", "warm", "--cases", "ep,tp,safetensors,fastsafetensors,runai"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:] + r.stdout[-2000:]
    s = json.loads(r.stdout.strip().splitlines()[-1])
    rows = s["modes"]["warm"]
    assert set(rows) == {"ep", "tp", "safetensors", "fastsafetensors", "runai"}
    for peer in ("safetensors", "fastsafetensors", "runai"):
        assert rows[peer]["seconds"] > 0 and rows[peer]["peak"] > 0
    peer_targets = [t for t in s["targets"] if "faster than" in t["target"]]
    assert len(peer_targets) == 6, s["targets"]


def test_ktwrapper_bench_reads_kt_kernels_own_load_times():
    """The resident restart is split into kt-kernel's own C++ work and the rest from the per-layer line
    kt-kernel 0.7.2's NativeMoEWrapper.load_weights prints (its format, verbatim)."""
    from ktnuma.tools.bench_ktwrapper import _kt_cpp_seconds

    lines = ["Created AVX2_RAW_INT4_MOE_TP 0 at numa 0 (group_size=32)",
             "[NativeMoEWrapper Layer 4] load_experts: 0.8ms, prepare_tensors: 0.0ms, build_ptrs: 0.0ms, "
             "create_moe: 3.3ms, cpp_load_weights: 226.1ms, cleanup: 0.3ms, total: 230.6ms",
             "[NativeMoEWrapper Layer 5] load_experts: 5.1ms, prepare_tensors: 0.0ms, build_ptrs: 0.0ms, "
             "create_moe: 1.2ms, cpp_load_weights: 250.6ms, cleanup: 0.3ms, total: 257.2ms"]
    assert _kt_cpp_seconds(lines) == pytest.approx((3.3 + 226.1 + 1.2 + 250.6) / 1000)
    assert _kt_cpp_seconds(lines[:1]) is None
