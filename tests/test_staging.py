"""Multi-process staging under simulated 2- and 4-node topologies, verified from a separate process.

Each case: synth model -> index -> plan -> coordinator.stage (one real worker process per node, real
POSIX shm) -> manifest published -> `python tests/test_staging.py verify MANIFEST` maps every segment
named in the manifest and compares every piece byte for byte with the numpy slice of the source piece
(plus the named conversion), read from the source files as raw bytes.
"""
from __future__ import annotations

import ctypes
import json
import mmap
import os
import signal
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TOPOS = {2: os.path.join(REPO, "configs/topologies/two-node.toml"),
         4: os.path.join(REPO, "configs/topologies/four-node.toml")}


# ============================================================== the separate verifier process

def verify_manifest(path: str) -> dict:
    """Map every segment of the manifest; compare every piece with the numpy reference."""
    import numpy as np

    from ktnuma.host import shm
    from ktnuma.index.experts import index_model
    from ktnuma.stage.manifest import load
    from planexec import reference_piece

    m = load(path)
    index = index_model(m["model"]["path"], layers=m["config"]["layers"])
    assert index.format == m["model"]["format"], (index.format, m["model"]["format"])
    shm_dir = None if shm.is_posix(m["shm_dir"]) else m["shm_dir"]
    maps, fds = {}, []
    for s in m["segments"]:
        fd = shm.open_segment(s["name"], shm_dir)
        fds.append(fd)
        assert os.fstat(fd).st_size == s["size"], s
        maps[s["name"]] = mmap.mmap(fd, s["size"], prot=mmap.PROT_READ)
    names = {s["name"] for s in m["segments"]}
    pieces = 0
    covered: dict[tuple, list] = {}
    for r in m["arrays"]:
        assert r["segment"] in names and r["offset"] % 64 == 0 and r["stride"] == r["nbytes"]
        groups = [g for g in index.groups if (g.layer, g.proj, g.kind) == (r["layer"], r["proj"], r["kind"])
                  and (g.shard is None or g.shard == r["node"])]
        assert len(groups) == 1, (r, len(groups))
        g = groups[0]
        slc = r["slice"]
        slc_t = None if slc is None else (slc["dim"], slc["start"], slc["stop"])
        first, count = r["experts"]
        buf = maps[r["segment"]]
        assert r["offset"] + count * r["stride"] <= len(buf)
        for e in range(first, first + count):
            want = reference_piece(index, g, e - g.first, slc_t)
            start = r["offset"] + (e - first) * r["stride"]
            got = buf[start:start + r["nbytes"]]
            assert len(want) == r["nbytes"], (r, len(want))
            if got != want:
                raise AssertionError(f"layer {r['layer']} {r['proj']} {r['kind']} expert {e} node "
                                     f"{r['node']} slice {slc}: staged bytes differ from the source")
            covered.setdefault((g.layer, g.proj, g.kind, g.shard, e), []).append(slc_t)
            pieces += 1
    # every source piece is covered: whole (ep / copied) or by slices tiling its I dim (tp)
    for g in index.groups:
        for k in range(g.count):
            slices = covered.get((g.layer, g.proj, g.kind, g.shard, g.first + k))
            assert slices, f"layer {g.layer} {g.proj} {g.kind} expert {g.first + k} not staged"
            if m["split"] == "ep" or g.shard is not None:
                assert slices == [None], slices
            elif None not in slices:
                spans = sorted((s[1], s[2]) for s in slices)
                assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    for mm in maps.values():
        mm.close()
    for fd in fds:
        os.close(fd)
    del np
    return {"pieces": pieces, "segments": len(names)}


if __name__ == "__main__" and sys.argv[1:2] == ["verify"]:
    sys.path.insert(0, HERE)
    print(json.dumps(verify_manifest(sys.argv[2])))
    sys.exit(0)


# ============================================================== helpers

def verify_in_subprocess(manifest_path: str) -> dict:
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "verify", manifest_path],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def resident_fraction(path: str, ranges) -> float:
    """Fraction of the pages of `ranges` [(start, length)] of `path` in the page cache (mincore)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ)
        try:
            import numpy as np

            base = np.frombuffer(mm, np.uint8).ctypes.data
            page = mmap.PAGESIZE
            vec = (ctypes.c_ubyte * ((size + page - 1) // page))()
            assert libc.mincore(ctypes.c_void_p(base), size, vec) == 0, ctypes.get_errno()
            res = tot = 0
            for start, length in ranges:
                for p in range(start // page, (start + length + page - 1) // page):
                    tot += 1
                    res += vec[p] & 1
            return res / tot if tot else 0.0
        finally:
            del base
            mm.close()


# per (format, nodes, split): intermediate size a tp split needs on the tiny preset
def _intermediate(fmt: str, nodes: int, split: str) -> int:
    if split == "tp" and fmt in ("gguf:Q4_K", "gguf:Q6_K"):
        return 256 * nodes
    if split == "tp" and fmt == "fp8" and nodes == 4:
        return 512
    return 256


FORMATS = ["bf16", "fp8", "fp8-channel", "rawint4", "gptq-int4", "mxfp4", "amx-int4", "amx-int8",
           "gguf:F16", "gguf:BF16", "gguf:Q8_0", "gguf:Q4_K", "gguf:Q6_K"]
CASES = [(f, n, s) for f in FORMATS for n in (2, 4) for s in ("tp", "ep")
         if not (f.startswith("amx") and (n != 2 or s != "tp"))]


def _stage_and_publish(info, nodes, split, tmp_path, **kw):
    from ktnuma.host import shm
    from ktnuma.stage.coordinator import stage
    from ktnuma.index.experts import index_model
    from ktnuma.stage.manifest import build, publish
    from ktnuma.plan.planner import check_split, plan as make_plan
    from ktnuma.host.topology import select

    topo = select(path=TOPOS[nodes])
    index = index_model(info.path)
    check_split(index, len(topo.nodes), split)
    plan = make_plan(index, topo, split)
    run_id = shm.new_run_id()
    res = stage(index, topo, split, run_id=run_id, plan=plan, **kw)
    m = build(index, topo, plan, res, run_id=run_id, shm_dir=kw.get("shm_dir"))
    path = publish(m, str(tmp_path / "manifest.json"))
    return m, path, res


# ============================================================== tests

@pytest.mark.parametrize("fmt,nodes,split", CASES, ids=[f"{f}-{n}n-{s}" for f, n, s in CASES])
def test_stage_every_format_verified_by_separate_process(fmt, nodes, split, synth_model, tmp_path):
    from ktnuma.host import shm

    info = synth_model(fmt, intermediate=_intermediate(fmt, nodes, split))
    m, path, res = _stage_and_publish(info, nodes, split, tmp_path)
    try:
        assert m["topology"]["simulated"] is True and len(m["topology"]["nodes"]) == nodes
        assert sorted(s["name"] for s in m["segments"]) == sorted(shm.run_segments(m["run_id"]))
        for s in m["segments"]:
            assert s["placement"] and sum(s["placement"].values()) == -(-s["size"] // mmap.PAGESIZE)
        out = verify_in_subprocess(path)
        assert out["segments"] == len(m["segments"]) and out["pieces"] >= len(info.staged)
        assert res.bytes == sum(r["nbytes"] * r["experts"][1] for r in m["arrays"])
    finally:
        shm.unlink_run(m["run_id"])


def test_refused_split_leaves_nothing(synth_model):
    from ktnuma.errors import SplitError
    from ktnuma.index.experts import index_model
    from ktnuma.plan.planner import check_split

    index = index_model(synth_model("fp8").path)
    with pytest.raises(SplitError, match="128"):
        check_split(index, 4, "tp")


def test_worker_death_is_retried_and_result_exact(synth_model, tmp_path, monkeypatch):
    from ktnuma.host import shm

    info = synth_model("bf16")
    layer = info.moe_layers[-1]
    monkeypatch.setenv("KTNUMA_WORKER_FAULT", f"{layer}:1:2")  # node 1 dies twice on that layer
    events = []
    m, path, res = _stage_and_publish(info, 2, "tp", tmp_path, retries=2, progress=events.append)
    try:
        assert res.retries_used == 2
        assert [e.kind for e in events].count("retry") == 2
        assert {s.name: s.attempts for s in res.segments}[shm.segment_name(res.run_id, layer, 1)] == 3
        verify_in_subprocess(path)
    finally:
        shm.unlink_run(m["run_id"])


@pytest.mark.parametrize("split", ["ep", "tp"])
def test_worker_dying_with_its_next_job_queued(split, synth_model, tmp_path, monkeypatch):
    """Each worker is sent its next job before it finishes the current one (supervisor.QUEUED). A
    worker that dies mid-job has one queued behind it: that one goes back to the schedule without
    counting as a failure, the dead one's job is retried once, and the result is exact."""
    from ktnuma.host import shm
    from ktnuma.stage import supervisor

    info = synth_model("bf16", layers=4, mtp=False)
    layer = info.moe_layers[0]
    monkeypatch.setenv("KTNUMA_WORKER_FAULT", f"{layer}:0:1")  # node 0 dies once on the first layer
    monkeypatch.setenv("KTNUMA_WORKER_DELAY", "0.2")  # its jobs with reads last long enough to queue behind
    depth: list[int] = []
    send = supervisor.Supervisor.send

    def counting_send(self, p, job):
        send(self, p, job)
        depth.append(len(p.jobs))

    monkeypatch.setattr(supervisor.Supervisor, "send", counting_send)

    def hung(signum, frame):  # a job lost with the dead worker would leave its layer waiting forever
        raise TimeoutError("staging did not finish in 60 s: a job was lost")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    try:
        m, path, res = _stage_and_publish(info, 2, split, tmp_path, retries=1)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    try:
        assert max(depth) == supervisor.QUEUED == 2
        assert res.retries_used == 1
        verify_in_subprocess(path)
    finally:
        shm.unlink_run(m["run_id"])


def test_worker_death_after_retries_fails_and_removes_everything(synth_model, monkeypatch):
    from ktnuma.host import shm
    from ktnuma.stage.coordinator import stage
    from ktnuma.errors import WorkerFailed
    from ktnuma.index.experts import index_model
    from ktnuma.host.topology import select

    info = synth_model("bf16")
    layer = info.moe_layers[-1]
    monkeypatch.setenv("KTNUMA_WORKER_FAULT", f"{layer}:0:99")
    run_id = shm.new_run_id()
    with pytest.raises(WorkerFailed, match=f"node 0 failed staging layer {layer}") as ei:
        stage(index_model(info.path), select(path=TOPOS[2]), "tp", run_id=run_id, retries=1)
    assert ei.value.exit_code == 4
    assert shm.run_segments(run_id) == []


def test_enospc_in_worker_is_not_enough_memory(synth_model, tiny_tmpfs):
    from ktnuma.host import shm
    from ktnuma.stage.coordinator import stage
    from ktnuma.errors import NotEnoughMemory
    from ktnuma.index.experts import index_model
    from ktnuma.host.topology import select

    d = tiny_tmpfs("2m")  # the tiny bf16 model needs 6 MB: the pre-flight is bypassed on purpose
    run_id = shm.new_run_id()
    with pytest.raises(NotEnoughMemory, match="shm_dir=DIR") as ei:
        stage(index_model(synth_model("bf16").path), select(path=TOPOS[2]), "tp", run_id=run_id,
              shm_dir=d)
    assert ei.value.exit_code == 3
    assert os.listdir(d) == []


def test_shm_dir_backend(synth_model, tiny_tmpfs, tmp_path):
    from ktnuma.host import shm

    d = tiny_tmpfs("64m")
    m, path, _ = _stage_and_publish(synth_model("rawint4"), 2, "tp", tmp_path, shm_dir=d)
    try:
        assert m["shm_dir"] == d and len(os.listdir(d)) == len(m["segments"])
        verify_in_subprocess(path)
    finally:
        shm.unlink_run(m["run_id"], d)


def test_run_iterator_streams_layers_in_order_with_bounded_memory(synth_model):
    from ktnuma.host import shm
    from ktnuma.stage.coordinator import Run
    from ktnuma.index.experts import index_model
    from ktnuma.plan.planner import plan as make_plan
    from ktnuma.host.topology import select

    info = synth_model("bf16", layers=5, mtp=False)
    topo = select(path=TOPOS[2])
    p = make_plan(index_model(info.path), topo, "tp")
    run_id = shm.new_run_id()
    seen, peak = [], 0
    with Run(p, topo, run_id=run_id, layers_in_flight=2, stream=True) as run:
        for done in run.layers():
            seen.append(done.layer)
            names = shm.run_segments(run_id)
            peak = max(peak, len(names))
            assert {s.name for s in done.segments} <= set(names)
            run.release_layer(done.layer)
            assert not set(s.name for s in done.segments) & set(shm.run_segments(run_id))
    assert seen == list(p.layers) and len(seen) == 5
    assert peak <= 2 * len(topo.nodes)
    assert shm.run_segments(run_id) == []


def test_exception_in_consumer_removes_everything(synth_model):
    from ktnuma.host import shm
    from ktnuma.stage.coordinator import Run
    from ktnuma.index.experts import index_model
    from ktnuma.plan.planner import plan as make_plan
    from ktnuma.host.topology import select

    topo = select(path=TOPOS[2])
    p = make_plan(index_model(synth_model("bf16").path), topo, "ep")
    run_id = shm.new_run_id()
    with pytest.raises(RuntimeError, match="engine"):
        with Run(p, topo, run_id=run_id) as run:
            for _ in run.layers():
                assert shm.run_segments(run_id)
                raise RuntimeError("engine failed")
    assert shm.run_segments(run_id) == []


def test_page_cache_of_experts_dropped(synth_model, tmp_path):
    from ktnuma.host import shm

    info = synth_model("bf16", intermediate=512)
    for f in info.files:  # clean (written back: dirty pages cannot be dropped) and fully cached
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
            while fh.read(1 << 20):
                pass
        assert resident_fraction(f, [(0, os.path.getsize(f))]) > 0.95
    m, path, res = _stage_and_publish(info, 2, "tp", tmp_path)
    try:
        for fi, f in enumerate(res.plan.files):
            ranges = [(r.start, r.length) for lyr in res.plan.layers for r in res.plan.drop_ranges(lyr)
                      if r.file == fi]
            assert ranges
            assert resident_fraction(f, ranges) < 0.05
    finally:
        shm.unlink_run(m["run_id"])


def test_each_layers_page_cache_is_dropped_by_the_time_it_is_handed_out(synth_model):
    """The coordinator drops a complete layer's page cache as the layer completes, not only when
    the run closes: a streaming consumer handed layer L finds L's source ranges out of the page
    cache, while the layers not staged yet keep theirs."""
    from ktnuma.host import shm
    from ktnuma.host.topology import select
    from ktnuma.index.experts import index_model
    from ktnuma.plan.planner import plan as make_plan
    from ktnuma.stage.coordinator import Run

    info = synth_model("bf16", layers=4, mtp=False, intermediate=512)
    for f in info.files:  # clean and fully cached first
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
            while fh.read(1 << 20):
                pass
    topo = select(path=TOPOS[2])
    p = make_plan(index_model(info.path), topo, "tp")
    run_id = shm.new_run_id()
    left = {}
    with Run(p, topo, run_id=run_id, layers_in_flight=1, stream=True) as run:
        for done in run.layers():
            ranges = [(r.start, r.length) for r in p.drop_ranges(done.layer)]
            later = [(r.start, r.length) for lyr in p.layers if lyr > done.layer for r in p.drop_ranges(lyr)]
            left[done.layer] = (resident_fraction(p.files[0], ranges),
                                resident_fraction(p.files[0], later) if later else None)
            run.release_layer(done.layer)
    assert shm.run_segments(run_id) == []
    assert len(p.files) == 1 and sorted(left) == list(p.layers)
    for layer, (mine, later) in left.items():
        assert mine < 0.05, (layer, left)  # dropped before the consumer saw it
        assert later is None or later > 0.5, (layer, left)  # layers not staged yet keep theirs


@pytest.mark.parametrize("nodes,split", [(2, "tp"), (4, "tp"), (4, "ep")])
def test_every_source_byte_read_once_at_any_node_count(nodes, split, synth_model, tmp_path):
    """tp's strided down pieces are read once and scattered to every node's segment (cross-node
    writes into segments another worker created and bound): read_bytes == staged bytes, placement
    still 100% on the backing node, every piece byte-exact."""
    from ktnuma.host import shm

    info = synth_model("bf16", intermediate=_intermediate("bf16", nodes, split))
    m, path, res = _stage_and_publish(info, nodes, split, tmp_path)
    try:
        assert res.read_bytes == res.bytes and res.read_ratio == 1.0, (res.read_bytes, res.bytes)
        for n in res.nodes:
            assert n.pct_on_node == 100.0, n
        verify_in_subprocess(path)
    finally:
        shm.unlink_run(m["run_id"])
