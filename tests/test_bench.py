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


def test_proof_bench_runs_both_proofs_and_checks_their_counts():
    """scripts/proof_bench.py on a small segment: both ways count every page on node 0 (it exits
    non-zero otherwise), it prints the ratio, and it leaves nothing in /dev/shm."""
    before = set(os.listdir("/dev/shm"))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "proof_bench.py"), "--mib", "8",
                        "--rounds", "2"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:] + r.stdout[-2000:]
    lines = r.stdout.splitlines()
    assert [ln.split()[0] for ln in lines[:2]] == ["populate", "prove"]
    assert lines[-1].startswith("prove / populate: ") and float(lines[-1].split()[-1]) > 0
    assert set(os.listdir("/dev/shm")) <= before


def test_gather_bench_checks_every_way_against_the_source():
    """scripts/gather_bench.py on a small source: every way's segments equal the source's column cuts
    (it exits non-zero otherwise), one line per way with its ratio to sendfile, nothing left in
    /dev/shm."""
    before = set(os.listdir("/dev/shm"))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gather_bench.py"), "--nodes", "4",
                        "--rows", "64", "--row-bytes", "512", "--mib", "2", "--rounds", "2"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:] + r.stdout[-2000:]
    lines = r.stdout.splitlines()
    assert [ln.split()[0] for ln in lines] == ["worker", "scatter", "mmap", "sendfile"]
    assert "x1.00 sendfile" in lines[-1] and all(float(ln.split()[1]) > 0 for ln in lines)
    assert set(os.listdir("/dev/shm")) <= before


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


def _row(rounds):
    import statistics
    return {"seconds": statistics.median(rounds), "rounds": rounds, "read_ratio": 1.0}


def test_two_case_targets_are_judged_on_the_rounds_paired_ratios():
    """tp@8 against ep@8 (and the sendfile floor against staging) is judged round by round: a slow
    round slows both cases of that round, and must not turn into a ratio of medians from different
    rounds. The message carries the paired median, the range and the ratio of the medians."""
    from ktnuma.tools.bench.report import paired, targets

    ep, tp = _row([1.0, 3.0, 1.1]), _row([1.1, 3.3, 3.0])  # medians 1.1 vs 3.0: 2.7x; pairs 1.1, 1.1, 2.7
    med, lo, hi, n = paired(tp, ep)
    assert (round(med, 9), round(lo, 9), round(hi, 9), n) == (1.1, 1.1, round(3.0 / 1.1, 9), 3)
    s = {"bytes": 1, "largest_layer": 1, "nodes": 2, "modes": {"warm": {"ep@8": ep, "tp@8": tp}}}
    (t,) = [t for t in targets(s) if "<= 1.15 x" in t["target"]]
    assert t["ok"] and t["measured"].startswith("1.10 x paired median of 3 round(s) (range 1.10-2.73)")
    assert "= 2.73 x" in t["measured"]
    # the other way round: the medians agree, every pair says tp is slower
    ep, tp = _row([1.0, 2.0, 3.0]), _row([2.2, 2.1, 3.6])
    s["modes"]["cold"] = {"ep-direct@8": ep, "tp-direct@8": tp}
    (t,) = [t for t in targets(s) if t["target"].startswith("cold tp-direct@8 <= 1.15")]
    assert not t["ok"] and t["measured"].startswith("1.20 x"), t
    # a case that failed part-way has fewer rounds: the pairs stop there
    assert paired(_row([2.0]), _row([1.0, 5.0]))[1:] == (2.0, 2.0, 1)


def test_sendfile_floor_target_is_paired():
    from ktnuma.tools.bench.report import targets

    warm = {"raw": _row([9.0, 9.0]), "rawsf": _row([1.0, 2.0]), "ep": _row([1.1, 2.2])}
    for r in warm.values():
        r.update(vs_raw=1.0, peak=0, cache_left=0.0)
    s = {"bytes": 1, "largest_layer": 1, "nodes": 2, "modes": {"warm": warm}}
    (t,) = [t for t in targets(s) if "sendfile floor" in t["target"]]
    assert t["ok"] and t["measured"].startswith("0.91 x paired median of 2"), t


def test_warm_free_memory_writes_and_frees_and_leaves_nothing(tmp_path, monkeypatch):
    """The bench's warm-up allocates and writes every byte of its scratch file before it frees it
    (seen at its close), and leaves no file behind, even when the space is not there."""
    from ktnuma.tools.bench import measure
    from ktnuma.tools.bench.measure import warm_free_memory

    d = str(tmp_path)
    seen, close = [], os.close

    def spy(fd):
        st = os.fstat(fd)
        seen.append((st.st_size, st.st_blocks * 512, os.pread(fd, 8, st.st_size - 8) if st.st_size else b""))
        close(fd)

    monkeypatch.setattr(measure.os, "close", spy)
    assert warm_free_memory(3 << 20, d) is True
    monkeypatch.setattr(measure.os, "close", close)
    assert seen == [(3 << 20, 3 << 20, bytes(8))], seen
    assert os.listdir(d) == []
    assert warm_free_memory(1 << 62, d) is False  # no such space: refused, nothing left
    assert os.listdir(d) == []
    os.chmod(d, 0o500)
    try:
        if os.geteuid() != 0:  # root writes anyway
            assert warm_free_memory(1 << 20, d) is False
    finally:
        os.chmod(d, 0o700)


def test_sampler_counts_our_segments_and_the_models_mapped_pages(tmp_path):
    """The sampler's maps scan (bytes, only the lines naming /dev/shm or a model file) finds a
    mapped segment of ours even once it is unlinked, ignores another prefix's, and counts the
    model file's resident mapped pages; the sampling thread's own CPU is kept."""
    import mmap
    import time

    from ktnuma.tools.bench import measure

    model = tmp_path / "model.safetensors"
    model.write_bytes(os.urandom(3 << 20))
    ours, theirs = f"/dev/shm/ktnuma.samptest.{os.getpid()}", f"/dev/shm/other.samptest.{os.getpid()}"
    maps, fds = [], []
    try:
        for path, size in ((ours, 5 << 20), (theirs, 1 << 20)):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            fds.append(fd)
            os.ftruncate(fd, size)
            maps.append(mmap.mmap(fd, size))
        os.unlink(ours)  # unlinked, still mapped: still ours, still counted
        with open(model, "rb") as f:
            m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        maps.append(m)
        for i in range(0, 2 << 20, 4096):  # 2 MiB of the 3 resident through the mapping
            m[i]
        seen: dict = {}
        rss: dict = {}
        measure._mapped(os.getpid(), frozenset([str(model)]), ("ktnuma.",), seen, rss)
        assert seen == {ours: 5 << 20}, seen
        assert list(rss) == [(os.getpid(), str(model))]
        assert 2 << 20 <= rss[(os.getpid(), str(model))] <= 3 << 20, rss
        s = measure.Sampler(os.getpid(), [str(model)], ("ktnuma.",), interval=0.001)
        s.start()
        end = time.monotonic() + 30  # a sample of a process that imported torch can take 20+ ms
        while s.samples < 3 and time.monotonic() < end:
            time.sleep(0.01)
        s.stop.set()
        s.join()
        assert s.samples >= 3 and s.cpu > 0, (s.samples, s.cpu)
        assert s.parts["shm"] >= 5 << 20 and s.parts["model_files"] >= 2 << 20, s.parts
    finally:
        for mm in maps:
            mm.close()
        for fd in fds:
            os.close(fd)
        for path in (ours, theirs):
            if os.path.exists(path):
                os.unlink(path)
