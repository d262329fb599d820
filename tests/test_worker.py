"""The worker process on its own: real subprocess, real POSIX shm, hand-built jobs."""
from __future__ import annotations

import json
import mmap
import os
import stat
import subprocess
import sys

import numpy as np
import pytest

from ktnuma.host import shm
from ktnuma.plan.ops import is_cross, layer_ops
from ktnuma.plan.planner import ArrayPlan, Plan, SegmentPlan
from ktnuma.stage import protocol

RNG = np.random.default_rng(7)


class Worker:
    def __init__(self, files, shm_dir=None, node=0, cpus=(0,), env=None):
        self.files = [str(f) for f in files]
        e = dict(os.environ)
        e.update(env or {})
        self.p = subprocess.Popen([sys.executable, "-m", "ktnuma.worker", "--node", str(node),
                                   "--real-node", "0", "--cpus", ",".join(map(str, cpus))],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=e)
        self.send({"op": "init", "files": [str(f) for f in files], "shm_dir": shm_dir})
        assert self.recv()["op"] == "ready"

    def send(self, msg):
        self.p.stdin.write(json.dumps(msg).encode() + b"\n")
        self.p.stdin.flush()

    def recv(self):
        while True:  # progress messages come while a job moves; the answer follows
            line = self.p.stdout.readline()
            msg = json.loads(line) if line else None
            if msg is None or msg["op"] != "progress":
                return msg

    def job(self, name, size, arrays, layer=0, node=0, wait=True):
        """Create segment `name` holding `arrays` and fill it with the plan's read ops for it."""
        p = Plan("ep", tuple(self.files), (node,), (layer,), (SegmentPlan(layer, node, size, tuple(arrays)),), ())
        ops = layer_ops(p, layer)
        assert not is_cross(ops)
        self.p.stdin.write(protocol.job(layer, node, 0, (name, size), {node: name}, ops.get(node)))
        self.p.stdin.flush()
        return self.recv() if wait else None

    def close(self):
        self.p.stdin.close()
        rc = self.p.wait(20)
        self.p.stdout.close()
        return rc


def arr(offset, count, stride, src_offsets, rows, run, src_stride, conversion=None, proj="gate"):
    return ArrayPlan(0, 0, proj, "weight", offset, 0, count, stride, "u8", (stride,), None,
                     (0,) * count, tuple(src_offsets), rows, run, src_stride, conversion)


@pytest.fixture
def source(tmp_path):
    data = RNG.integers(0, 256, 4 << 20, dtype=np.uint8)
    p = tmp_path / "src.bin"
    data.tofile(p)
    return p, data


def read_segment(name, size, shm_dir=None):
    fd = shm.open_segment(name, shm_dir)
    try:
        st = os.fstat(fd)
        assert st.st_size == size and stat.S_IMODE(st.st_mode) == 0o600
        with open(fd, "rb", closefd=False) as f:
            return np.frombuffer(f.read(size), np.uint8)
    finally:
        os.close(fd)


def test_job_contiguous_strided_and_conversions(source):
    path, data = source
    f16 = data[:1 << 20].view("<f2")
    rid = shm.new_run_id()
    name = shm.segment_name(rid, 0, 0)
    # 1) four adjacent contiguous pieces (coalesced into one read), 64 KiB each, from 1 MiB
    a = arr(0, 4, 65536, [(1 << 20) + k * 65536 for k in range(4)], 1, 65536, 65536)
    # 2) strided: 3 pieces of [128 rows x 100 bytes] taken from [128 x 300] at column 100
    b = arr(a.end, 3, 128 * 100, [(2 << 20) + k * 128 * 300 + 100 for k in range(3)], 128, 100, 300,
            proj="down")
    boff = (a.end + 63) // 64 * 64
    b = arr(boff, 3, 128 * 100, b.src_offsets, 128, 100, 300, proj="down")
    # 3) f16->f32, strided: 2 pieces of [16 rows x 8 f16] from [16 x 32 f16] (rows 64 bytes apart)
    coff = (b.end + 63) // 64 * 64
    c = arr(coff, 2, 16 * 8 * 4, [k * 1024 + 16 for k in range(2)], 16, 16, 64, "f16->f32")
    # 4) ue8m0->bf16 contiguous: 2 pieces of 40 bytes
    doff = (c.end + 63) // 64 * 64
    d = arr(doff, 2, 80, [(3 << 20) + k * 40 for k in range(2)], 1, 40, 40, "ue8m0->bf16")
    size = d.end
    w = Worker([path])
    try:
        res = w.job(name, size, [a, b, c, d])
        assert res["op"] == "done", res
        assert res["written"] == {"0": a.count * a.stride + b.count * b.stride + c.count * c.stride + d.count * d.stride}
        # every source byte read once: the contiguous pieces, the strided spans, the converted pieces
        spans = 4 * 65536 + 3 * (127 * 300 + 100) + 2 * (15 * 64 + 16) + 2 * 40
        assert res["read"] == spans
        assert sum(res["placement"].values()) == -(-size // 4096)
        assert res["placement"].get("0") == -(-size // 4096)  # every page present on real node 0
        seg = read_segment(name, size)
        assert (seg[:a.end] == data[1 << 20:(1 << 20) + 4 * 65536]).all()
        for k in range(3):
            src = data[(2 << 20) + k * 38400:(2 << 20) + (k + 1) * 38400].reshape(128, 300)[:, 100:200]
            got = seg[boff + k * 12800:boff + (k + 1) * 12800].reshape(128, 100)
            assert (got == src).all()
        for k in range(2):
            src = f16[k * 512:(k + 1) * 512].reshape(16, 32)[:, 8:16].astype("<f4")
            got = seg[coff + k * 512:coff + (k + 1) * 512].view("<f4").reshape(16, 8)
            assert np.array_equal(got, src, equal_nan=True)
        for k in range(2):
            src = data[(3 << 20) + k * 40:(3 << 20) + (k + 1) * 40].astype("<u2") << 7
            assert (seg[doff + k * 80:doff + (k + 1) * 80].view("<u2") == src).all()
        assert w.close() == 0
    finally:
        shm.unlink(name)


def _maps_numpy(pid: int) -> bool:
    with open(f"/proc/{pid}/maps") as f:
        return "_multiarray_umath" in f.read()


def test_strided_rows_packed_in_python_until_the_budget_then_numpy(source):
    """Without the C packer (KTNUMA_NATIVE_PACK=0, or a build without a compiler), small strided jobs
    are packed without importing numpy (start-up time); past the worker's PY_ROWS budget numpy packs
    them; the bytes are the same either way."""
    from ktnuma.stage.worker_ops import PY_ROWS

    path, data = source
    rid = shm.new_run_id()
    w = Worker([path], env={"KTNUMA_NATIVE_PACK": "0"})
    names = []
    try:
        for i, (rows, run, src_stride, col) in enumerate(((128, 100, 300, 100), (PY_ROWS + 5, 2, 6, 2),
                                                          (64, 10, 30, 20))):
            name = shm.segment_name(rid, i, 0)
            names.append(name)
            a = arr(0, 1, rows * run, [(1 << 20) + col], rows, run, src_stride, proj="down")
            res = w.job(name, a.end, [a], layer=i)
            assert res["op"] == "done", res
            assert _maps_numpy(w.p.pid) == (i > 0), i  # the first job stays below the budget
            got = read_segment(name, a.end).reshape(rows, run)
            src = data[1 << 20:(1 << 20) + rows * src_stride].reshape(rows, src_stride)[:, col:col + run]
            assert (got == src).all(), i
        assert w.close() == 0
    finally:
        for name in names:
            shm.unlink(name)


def test_strided_rows_packed_by_the_c_packer_never_import_numpy(source):
    """The installed C packer (ktnuma/_pack.c, built by `pip install -e .`) packs strided rows of every
    width (1 byte, odd, page-sized; rows well past PY_ROWS) without numpy ever loading in the worker."""
    import ktnuma._pack  # noqa: F401 - missing: run `pip install -e .` (or `python setup.py build_ext -i`)
    from ktnuma.stage.worker_ops import PY_ROWS

    path, data = source
    rid = shm.new_run_id()
    w = Worker([path])
    names = []
    try:
        for i, (rows, run, src_stride, col) in enumerate(((128, 100, 300, 100), (PY_ROWS + 5, 2, 6, 2),
                                                          (3000, 1, 7, 6), (200, 4096, 12288, 4096))):
            name = shm.segment_name(rid, i, 0)
            names.append(name)
            a = arr(0, 1, rows * run, [(1 << 20) + col], rows, run, src_stride, proj="down")
            res = w.job(name, a.end, [a], layer=i)
            assert res["op"] == "done", res
            got = read_segment(name, a.end).reshape(rows, run)
            src = data[1 << 20:(1 << 20) + rows * src_stride].reshape(rows, src_stride)[:, col:col + run]
            assert (got == src).all(), i
        assert not _maps_numpy(w.p.pid)
        assert w.close() == 0
    finally:
        for name in names:
            shm.unlink(name)


def test_c_packer_against_numpy_and_its_bounds():
    """ktnuma._pack.pack equals numpy's strided copy for random shapes, and refuses every out-of-bounds
    or negative argument before it copies a byte (the destination stays untouched)."""
    from ktnuma._pack import pack

    src = RNG.integers(0, 256, 1 << 16, dtype=np.uint8)
    for _ in range(300):
        run = int(RNG.integers(0, 300))
        stride = run + int(RNG.integers(0, 300))
        rows = int(RNG.integers(0, 60))
        off = int(RNG.integers(0, 1000))
        if rows and off + (rows - 1) * stride + run > len(src):
            continue
        dst = bytearray(rows * run + 7)
        pack(src, off, rows, run, stride, dst)
        want = np.lib.stride_tricks.as_strided(src[off:], (rows, run), (stride, 1)).tobytes() if rows else b""
        assert bytes(dst[:rows * run]) == want and dst[rows * run:] == bytes(7)
    dst = bytearray(b"\xaa" * 64)
    for args in ((0, 2, 8, 4), (-1, 1, 8, 8), (0, -1, 8, 8), (0, 1, -1, 8), (len(src) - 7, 1, 8, 8),
                 (0, 9, 8, 8), (0, 2, 8, 1 << 62), (1 << 62, 1, 8, 8), ((1 << 63) - 1, 1, 8, 16),
                 (len(src), 1, 1, 1), (8, 3, 1 << 62, 1 << 62)):
        with pytest.raises(ValueError, match="pack: "):
            pack(src, *args, dst)
        assert dst == b"\xaa" * 64, args
    with pytest.raises(TypeError):
        pack(src, 0, 1, 8, 8, bytes(8))  # a read-only destination


def test_worker_pins_itself(source):
    w = Worker([source[0]], cpus=(1,) if os.cpu_count() > 1 else (0,))
    try:
        with open(f"/proc/{w.p.pid}/status") as f:
            allowed = [ln.split()[1] for ln in f if ln.startswith("Cpus_allowed_list")][0]
        assert allowed == ("1" if os.cpu_count() > 1 else "0")
    finally:
        assert w.close() == 0


def test_truncated_source_reports_input_error_and_removes_segment(source):
    path, _ = source
    name = shm.segment_name(shm.new_run_id(), 0, 0)
    a = arr(0, 1, 8192, [(4 << 20) - 4096], 1, 8192, 8192)  # runs 4 KiB past the end of the file
    w = Worker([path])
    try:
        res = w.job(name, 8192, [a])
        assert res["op"] == "error" and res["kind"] == "input" and str(path) in res["message"]
        assert not os.path.exists(shm.segment_path(name))
        ok = w.job(name, 4096, [arr(0, 1, 4096, [0], 1, 4096, 4096)])  # and it keeps serving
        assert ok["op"] == "done"
        assert w.close() == 0
    finally:
        shm.unlink(name)


def test_parent_pipe_closed_mid_job_removes_unfinished_segment(source):
    path, _ = source
    name = shm.segment_name(shm.new_run_id(), 0, 0)
    a = arr(0, 1, 4096, [0], 1, 4096, 4096)
    w = Worker([path], env={"KTNUMA_WORKER_DELAY": "30"})
    try:
        w.job(name, 4096, [a], wait=False)
        for _ in range(500):  # wait until the segment exists (the job is running)
            if os.path.exists(shm.segment_path(name)):
                break
            import time
            time.sleep(0.01)
        assert os.path.exists(shm.segment_path(name))
        assert w.close() == 0  # EOF: the worker abandons the job within its 30 s delay
        assert not os.path.exists(shm.segment_path(name))
    finally:
        shm.unlink(name)


def test_nospace_is_reported(source, tiny_tmpfs):
    d = tiny_tmpfs("1m")
    name = shm.segment_name(shm.new_run_id(), 0, 0)
    w = Worker([source[0]], shm_dir=d)
    try:
        res = w.job(name, 4 << 20, [arr(0, 1, 4 << 20, [0], 1, 4 << 20, 4 << 20)])
        assert res["op"] == "error" and res["kind"] == "nospace", res
        assert os.listdir(d) == []
        assert w.close() == 0
    finally:
        shm.unlink(name, d)


def test_create_only_job_maps_nothing_and_measure_reads_placement_back(source):
    """A segment other nodes fill is created without mapping its pages (they would be zero-filled
    before the fills land); once filled, "measure" reads its placement back, while the bytes stay."""
    path, data = source
    size = 3 * mmap.PAGESIZE + 100
    name = shm.segment_name(shm.new_run_id(), 0, 0)
    missing = shm.segment_name(shm.new_run_id(), 0, 0)
    w = Worker([path])
    try:
        w.p.stdin.write(protocol.job(0, 0, 0, (name, size), {}, None))
        w.p.stdin.flush()
        done = w.recv()
        assert done["op"] == "done" and done["name"] == name and done["placement"] is None, done
        fd = shm.open_segment(name, write=True)  # "another node" fills it
        try:
            os.pwrite(fd, data[:size].tobytes(), 0)
        finally:
            os.close(fd)
        w.send({"op": "commit", "names": [name]})
        w.send({"op": "measure", "name": name, "size": size})
        placed = w.recv()
        assert placed == {"op": "placed", "name": name,
                          "placement": placed["placement"]} and placed["placement"], placed
        assert sum(placed["placement"].values()) == -(-size // mmap.PAGESIZE)
        assert "absent" not in placed["placement"]
        assert (read_segment(name, size) == data[:size]).all()
        w.send({"op": "measure", "name": missing, "size": size})  # gone (e.g. released): unknown
        assert w.recv() == {"op": "placed", "name": missing, "placement": None}
    finally:
        assert w.close() == 0
        assert shm.run_segments(name.split(".")[1]) == [name]  # committed: the worker keeps it
        shm.unlink(name)
