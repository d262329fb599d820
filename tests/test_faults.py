"""Faults injected into real runs (issue 7): real processes, real signals, real POSIX shm and tmpfs.

Each test kills or starves something for real and checks the contract: a dead worker is noticed within
a second, replaced on the same node and its layer redone byte-exact; exhausted retries exit 4 naming node
and layer, leaving nothing; a SIGKILLed coordinator's workers drop their unfinished segments and exit on
their own, and `cleanup` removes the rest while a live and a detached run keep theirs; SIGINT/SIGTERM while
staging exit 130 leaving nothing; out of memory is exit 3 before (pre-flight, with numbers) or during
(ENOSPC from posix_fallocate, never SIGBUS) the run; a changed source or segment is refused at attach;
--verify checksums are recorded and rechecked.

Covered elsewhere, not repeated: fault-hook retries in-process (test_staging), SIGTERM while staging
(test_launch_cli.test_signal_while_staging_exits_130_leaving_nothing), shm-dir pre-flight exit 3
(test_launch_cli.test_not_enough_shm_is_exit_3), ENOSPC in-process (test_staging).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import zlib

import pytest

from conftest import SESSION_TAG, run_module
from ktnuma.errors import VerifyFailed
from ktnuma.host import shm

pytestmark = pytest.mark.procs  # kills, stops and replaces workers and coordinators

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TWO = os.path.join(REPO, "configs/topologies/two-node.toml")


# ------------------------------------------------------------------ helpers

def _entries(reg) -> list[str]:
    return sorted(p for p in os.listdir(reg) if p.endswith(".json")) if os.path.isdir(reg) else []


def children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{t}/children") as f:
                out += [int(x) for x in f.read().split()]
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode() for a in f.read().split(b"\0") if a]
    except (FileNotFoundError, ProcessLookupError):
        return []


def workers(pid: int) -> dict[int, int]:
    """{node: worker pid} of a launch process (its `python -m ktnuma.worker --node N` children)."""
    out = {}
    for c in children(pid):
        a = cmdline(c)
        if "ktnuma.worker" in a and "--node" in a:
            out[int(a[a.index("--node") + 1])] = c
    return out


def running(pid: int) -> bool:
    """Exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return data[data.rindex(b")") + 2:].split()[0] != b"Z"


def wait_for(pred, timeout: float, step: float = 0.01):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(step)
    return pred()


class Launch:
    """`python -m ktnuma.launch` in the background; stderr lines collected with arrival times."""

    def __init__(self, *args: str, env: dict | None = None) -> None:
        e = dict(os.environ)
        e.update(env or {})
        self.p = subprocess.Popen([sys.executable, "-m", "ktnuma.launch", *args], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=e)
        self.err: list[tuple[float, str]] = []
        self.t = threading.Thread(target=self._drain, daemon=True)
        self.t.start()

    def _drain(self) -> None:
        for line in self.p.stderr:
            self.err.append((time.monotonic(), line.rstrip("\n")))

    def wait(self, timeout: float = 60) -> int:
        rc = self.p.wait(timeout)
        self.t.join(5)
        return rc

    @property
    def stderr(self) -> str:
        return "\n".join(line for _, line in self.err)

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


def session_segments() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith(f"ktnuma.{SESSION_TAG}")}


def run_id_of(reg) -> str:
    return wait_for(lambda: _entries(reg), 30)[0][:-5]


# ------------------------------------------------------------------ worker death

def test_worker_sigkilled_mid_layer_is_replaced_and_layer_redone_byte_exact(synth_model, run_registry, tmp_path):
    from test_staging import verify_in_subprocess

    info = synth_model("bf16", layers=3, mtp=False)
    layer = info.moe_layers[1]
    man = tmp_path / "m.json"
    run = Launch("--topology", TWO, "--detach", "--json", "--manifest", str(man), info.path,
                 env={"KTNUMA_WORKER_DELAY": "0.7"})
    try:
        run_id = run_id_of(run_registry)
        # segments are created ahead (two layers in flight), then every fill sleeps 0.7 s: node 1 is
        # filling layer 1 or 2 (or waiting for its next fill) when it is killed
        victim_seg = shm.segment_name(run_id, layer, 1)
        assert wait_for(lambda: os.path.exists(f"/dev/shm/{victim_seg}"), 30), "layer never started"
        time.sleep(0.3)
        before = workers(run.p.pid)
        assert set(before) == {0, 1}
        os.kill(before[1], signal.SIGKILL)  # the real kill, mid-layer (segment created, job not done)
        t_kill = time.monotonic()
        assert run.wait(60) == 0, run.stderr
        retry = [(t, ln) for t, ln in run.err if "killed by signal 9" in ln and "retry 1/2" in ln]
        assert len(retry) == 1, run.stderr
        t_seen, line = retry[0]
        assert re.search(rf"node 1 layer ({'|'.join(map(str, info.moe_layers))}):", line) and "retry 1/2" in line
        assert t_seen - t_kill < 1.0, f"noticed after {t_seen - t_kill:.2f} s"
        out = run.p.stdout.read().strip().splitlines()
        assert out[-1] == f"ready {man}" and json.loads(out[0])["retries"] == 1
        verify_in_subprocess(str(man))  # every piece byte-exact, the redone layer included
    finally:
        run.kill()
        if man.exists():
            run_module("release", str(man))


def test_replacement_worker_runs_on_the_same_node(synth_model, run_registry, tmp_path):
    info = synth_model("bf16", layers=3, mtp=False)
    man = tmp_path / "m.json"
    run = Launch("--topology", TWO, "--detach", "--quiet", "--manifest", str(man), info.path,
                 env={"KTNUMA_WORKER_DELAY": "0.7"})
    try:
        run_id = run_id_of(run_registry)
        assert wait_for(lambda: shm.run_segments(run_id), 30)
        old = workers(run.p.pid)
        old_args = cmdline(old[0])
        os.kill(old[0], signal.SIGKILL)
        new = wait_for(lambda: (w := workers(run.p.pid)).get(0) not in (None, old[0]) and w, 5)
        assert new, "no replacement worker for node 0"
        new_args = cmdline(new[0])
        assert new_args == old_args  # same --node, --real-node and --cpus
        cpus = new_args[new_args.index("--cpus") + 1]

        def allowed():
            with open(f"/proc/{new[0]}/status") as f:
                return next(ln for ln in f if ln.startswith("Cpus_allowed_list:")).split()[1]
        assert wait_for(lambda: allowed() == cpus, 5), (allowed(), cpus)  # pinned like the one it replaced
        assert run.wait(60) == 0, run.stderr
    finally:
        run.kill()
        if man.exists():
            run_module("release", str(man))


def test_worker_killed_retries_exhausted_exit_4_nothing_left(synth_model, run_registry, tmp_path):
    info = synth_model("bf16", layers=3, mtp=False)
    man = tmp_path / "m.json"
    run = Launch("--topology", TWO, "--retries", "0", "--manifest", str(man), info.path,
                 env={"KTNUMA_WORKER_DELAY": "5"})
    try:
        run_id = run_id_of(run_registry)
        # node 0 creates its segments of the window's two layers ahead, then fills the first (5 s)
        ahead = shm.segment_name(run_id, info.moe_layers[1], 0)
        assert wait_for(lambda: os.path.exists(f"/dev/shm/{ahead}"), 30)
        time.sleep(0.5)
        ws = workers(run.p.pid)
        os.kill(ws[0], signal.SIGKILL)
        assert run.wait(30) == 4, run.stderr
        lines = run.stderr.splitlines()
        assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
        assert "node 0" in lines[0] and f"layer {info.moe_layers[0]}" in lines[0] and "signal 9" in lines[0]
        assert run.p.stdout.read() == ""
        assert wait_for(lambda: not any(running(w) for w in ws.values()), 5), "orphan workers left"
        assert shm.run_segments(run_id) == [] and not man.exists() and _entries(run_registry) == []
    finally:
        run.kill()


@pytest.mark.parametrize("retries", [1, 0])
def test_stopped_worker_is_noticed_killed_and_retried_or_exit_4(retries, synth_model, run_registry, tmp_path):
    """A SIGSTOPped worker makes no progress: after the deadline it is killed and its job redone on a
    new worker, or, out of retries, exit 4 naming the node and layer. A slow job that keeps reporting
    (the delay hook ticks) is never killed."""
    from test_staging import verify_in_subprocess

    info = synth_model("bf16", layers=3, mtp=False)
    man = tmp_path / "m.json"
    run = Launch("--topology", TWO, "--detach", "--json", "--retries", str(retries), "--manifest", str(man),
                 info.path, env={"KTNUMA_WORKER_DELAY": "3", "KTNUMA_STALL_TIMEOUT": "1.5"})
    try:
        run_id = run_id_of(run_registry)
        first = shm.segment_name(run_id, info.moe_layers[0], 1)
        assert wait_for(lambda: os.path.exists(f"/dev/shm/{first}"), 30)
        ws = workers(run.p.pid)
        os.kill(ws[1], signal.SIGSTOP)
        t_stop = time.monotonic()
        if retries:
            assert run.wait(90) == 0, run.stderr
            lines = [ln for _, ln in run.err if "no progress for" in ln and "retry 1/1" in ln]
            assert len(lines) == 1 and "node 1 layer" in lines[0], run.stderr
            out = run.p.stdout.read().strip().splitlines()
            assert json.loads(out[0])["retries"] == 1 and out[-1] == f"ready {man}"
            verify_in_subprocess(str(man))
        else:
            assert run.wait(60) == 4, run.stderr
            assert time.monotonic() - t_stop < 30
            lines = run.stderr.splitlines()
            assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
            assert "node 1" in lines[0] and "layer" in lines[0] and "no progress for" in lines[0]
            assert shm.run_segments(run_id) == [] and not man.exists()
        assert wait_for(lambda: not running(ws[1]), 5), "the stopped worker was left behind"
    finally:
        try:
            os.kill(ws[1], signal.SIGCONT)
        except (OSError, NameError, KeyError):
            pass
        run.kill()
        if man.exists():
            run_module("release", str(man))


# ------------------------------------------------------------------ coordinator death, signals

def test_coordinator_sigkilled_workers_clean_up_and_cleanup_spares_live_and_detached(
        synth_model, run_registry, tmp_path):
    info = synth_model("bf16", layers=4, mtp=False)
    small = synth_model("bf16")
    det_man, live_man, dead_man = tmp_path / "det.json", tmp_path / "live.json", tmp_path / "dead.json"
    r = run_module("launch", "--topology", TWO, "--detach", "--quiet", "--manifest", str(det_man), small.path)
    assert r.returncode == 0, r.stderr
    det = json.loads(det_man.read_text())
    live = Launch("--topology", TWO, "--quiet", "--manifest", str(live_man), small.path)
    dead = None
    try:
        assert live.p.stdout.readline().strip() == f"ready {live_man}", live.stderr
        live_m = json.loads(live_man.read_text())
        keep = {s["name"] for s in det["segments"] + live_m["segments"]}
        assert keep <= session_segments()

        dead = Launch("--topology", TWO, "--quiet", "--manifest", str(dead_man), info.path,
                      env={"KTNUMA_WORKER_DELAY": "2"})
        ids = wait_for(lambda: len(_entries(run_registry)) == 3 and _entries(run_registry), 30)
        dead_id = next(e[:-5] for e in ids if e[:-5] not in (det["run_id"], live_m["run_id"]))
        l1, l2, l3 = info.moe_layers[:3]
        in_progress = {shm.segment_name(dead_id, lyr, n) for lyr in (l2, l3) for n in (0, 1)}
        finished = {shm.segment_name(dead_id, l1, n) for n in (0, 1)}
        # layer 1 done on both nodes (only then may layer 3's segments be created: two layers in
        # flight), layer 2 being staged, layer 3 created ahead: kill the coordinator now
        assert wait_for(lambda: set(shm.run_segments(dead_id)) >= in_progress, 30), shm.run_segments(dead_id)
        assert set(shm.run_segments(dead_id)) >= finished
        ws = workers(dead.p.pid)
        assert len(ws) == 2
        os.kill(dead.p.pid, signal.SIGKILL)
        dead.wait(10)
        # the workers see their stdin close, remove the unfinished segments and exit on their own
        assert wait_for(lambda: not any(running(w) for w in ws.values()), 5), "orphan workers still running"
        left = set(shm.run_segments(dead_id))
        # layer 3 was only created (its fills take >= 2 s): its segments must be gone. Layer 2 was
        # being filled; one node may finish it (and the coordinator commit it) in the moment between
        # the check above and the kill, so it is either kept whole (committed) or gone whole.
        l2 = {shm.segment_name(dead_id, l2, n) for n in (0, 1)}
        l3_segs = in_progress - l2
        assert not left & l3_segs, left
        assert left & l2 in (set(), l2), left
        finished |= left & l2
        assert left == finished  # finished segments belonged to the dead coordinator: cleanup's job
        assert not dead_man.exists()

        c = run_module("cleanup")
        assert c.returncode == 0, c.stderr
        assert shm.run_segments(dead_id) == [] and dead_id + ".json" not in _entries(run_registry)
        for name in finished:
            assert name in c.stdout
        assert keep <= session_segments()  # live and detached runs untouched
        assert det_man.exists() and live_man.exists()
        assert sorted(_entries(run_registry)) == sorted([det["run_id"] + ".json", live_m["run_id"] + ".json"])
        assert live.p.poll() is None
    finally:
        if dead is not None:
            dead.kill()
        live.p.send_signal(signal.SIGTERM)
        assert live.wait(30) == 0
        run_module("release", str(det_man))
    assert not session_segments() & keep


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_while_staging_exit_130_nothing_left_no_orphans(sig, synth_model, run_registry, tmp_path):
    man = tmp_path / "m.json"
    run = Launch("--topology", TWO, "--manifest", str(man), synth_model("bf16").path,
                 env={"KTNUMA_WORKER_DELAY": "20"})
    try:
        run_id = run_id_of(run_registry)
        assert wait_for(lambda: len(shm.run_segments(run_id)) >= 2, 30)  # 4 once layer 2 is created ahead
        ws = workers(run.p.pid)
        assert len(ws) == 2
        run.p.send_signal(sig)
        assert run.wait(30) == 130, run.stderr
        assert "interrupted by " + signal.Signals(sig).name in run.stderr and "Traceback" not in run.stderr
        assert wait_for(lambda: not any(running(w) for w in ws.values()), 5), "orphan workers"
        time.sleep(0.2)
        assert shm.run_segments(run_id) == [] and not man.exists() and _entries(run_registry) == []
    finally:
        run.kill()


# ------------------------------------------------------------------ out of memory

def test_preflight_refuses_node_memavailable_with_numbers(synth_model, monkeypatch):
    """The per-node MemAvailable half of the pre-flight (the shm half: test_launch_cli). This machine has
    24 GB, so the node's MemAvailable is replaced by a small number; the plan is real."""
    from ktnuma.host import topology
    from ktnuma.errors import NotEnoughMemory
    from ktnuma.host.preflight import check_memory
    from ktnuma.index.experts import index_model
    from ktnuma.plan.planner import plan as make_plan

    topo = topology.select(path=TWO)
    p = make_plan(index_model(synth_model("bf16").path), topo, "tp")
    monkeypatch.setattr(topology, "real_mem_available", lambda t: {0: 1_000_000})
    with pytest.raises(NotEnoughMemory) as ei:
        check_memory(p.segments, topo, None)
    msg = str(ei.value)
    assert ei.value.exit_code == 3
    assert f"({p.total_bytes} bytes)" in msg and "node 0" in msg and "1.00 MB" in msg and "nodes=N" in msg
    # the handoff checks its window of layers the same way, before any segment exists
    import ktnuma

    before = session_segments()
    with pytest.raises(NotEnoughMemory, match="in flight.*real NUMA node 0"):
        with ktnuma.stream(synth_model("bf16").path, topology=TWO):
            pass
    assert session_segments() == before


def test_space_vanishing_mid_run_exit_3_no_sigbus(synth_model, run_registry, tmp_path, tiny_tmpfs):
    """The pre-flight passes (8 MB free, ~6 MB needed); then another process fills the tmpfs: the next
    posix_fallocate fails with ENOSPC -> exit 3, one line, nothing of the run left, never SIGBUS."""
    info = synth_model("bf16")
    d = tiny_tmpfs("8m")
    man = tmp_path / "m.json"
    # one layer in flight: layer 2's segments are created only after layer 1 is filled (1 s)
    run = Launch("--topology", TWO, "--shm-dir", d, "--layers-in-flight", "1", "--manifest", str(man), info.path,
                 env={"KTNUMA_WORKER_DELAY": "1"})
    filler = os.path.join(d, "filler")
    try:
        assert wait_for(lambda: any(n.startswith("ktnuma.") for n in os.listdir(d)), 30), run.stderr
        with open(filler, "wb") as f:  # take every free byte
            try:
                while True:
                    f.write(b"\xff" * (64 << 10))
                    f.flush()
            except OSError:
                pass
        rc = run.wait(60)
        assert rc == 3, (rc, run.stderr)  # not -SIGBUS, not a traceback
        lines = [ln for ln in run.stderr.splitlines() if "retry" not in ln and not ln.startswith("layers ")]
        assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
        assert d in lines[0] and "full" in lines[0] and "--shm-dir" in lines[0]
        assert os.listdir(d) == ["filler"] and not man.exists() and _entries(run_registry) == []
    finally:
        run.kill()
        if os.path.exists(filler):
            os.unlink(filler)


# ------------------------------------------------------------------ changed source / segment, --verify

def _attach():
    from ktnuma.engine.attachment import attach

    return attach


def test_source_changed_under_detached_run_refused_unless_opted_out(synth_model, run_registry, tmp_path):
    import shutil

    attach = _attach()
    d = tmp_path / "model"
    shutil.copytree(synth_model("bf16").path, d)
    man = tmp_path / "m.json"
    r = run_module("launch", "--topology", TWO, "--detach", "--quiet", "--manifest", str(man), str(d))
    assert r.returncode == 0, r.stderr
    try:
        with attach(str(man)):
            pass
        src = str(d / "model.safetensors")
        st = os.stat(src)
        os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # touched: mtime differs
        with pytest.raises(Exception, match=re.escape(src)) as ei:
            attach(str(man))
        assert getattr(ei.value, "exit_code", None) == 2 and "changed" in str(ei.value)
        with open(src, "ab") as f:  # and grown
            f.write(b"\0" * 16)
        with pytest.raises(Exception, match="changed"):
            attach(str(man))
        with attach(str(man), check_source=False) as a:  # the engine opted out
            assert a is not None
    finally:
        assert run_module("release", str(man)).returncode == 0


def test_verify_records_checksums_and_attach_rechecks(synth_model, run_registry, tmp_path):
    from ktnuma.stage import verify
    from ktnuma.stage.manifest import load
    from test_staging import verify_in_subprocess

    man = tmp_path / "m.json"
    r = run_module("launch", "--topology", TWO, "--detach", "--quiet", "--verify", "--manifest", str(man),
                   synth_model("gptq-int4").path)  # conversions (f16 -> f32 scales) included
    assert r.returncode == 0, r.stderr
    try:
        m = load(str(man))
        assert m["checksums"]["algo"] == "crc32" and len(m["checksums"]["arrays"]) == len(m["arrays"])
        verify_in_subprocess(str(man))  # the segments are byte-exact ...
        for rec, sums in zip(m["arrays"], m["checksums"]["arrays"]):  # ... so the recorded checksums are the segment bytes' crc32
            fd = shm.open_segment(rec["segment"])
            try:
                for k in range(rec["experts"][1]):
                    piece = os.pread(fd, rec["nbytes"], rec["offset"] + k * rec["stride"])
                    assert sums[k] == zlib.crc32(piece)
            finally:
                os.close(fd)
        assert verify.check_manifest(str(man)) == sum(rec["experts"][1] for rec in m["arrays"])
        # flip one byte of one piece: the recheck names segment, layer and expert
        rec = m["arrays"][len(m["arrays"]) // 2]
        fd = shm.open_segment(rec["segment"], write=True)
        try:
            pos = rec["offset"] + rec["stride"] + 5  # second expert of that array
            b = os.pread(fd, 1, pos)
            os.pwrite(fd, bytes([b[0] ^ 0x40]), pos)
        finally:
            os.close(fd)
        with pytest.raises(VerifyFailed, match=re.escape(rec["segment"])) as ei:
            verify.check_manifest(str(man))
        assert f"expert {rec['experts'][0] + 1}" in str(ei.value) and f"layer {rec['layer']}" in str(ei.value)
        from ktnuma.engine.attachment import attach

        with attach(str(man), check_source=False):
            pass
        from ktnuma.errors import AttachError

        with pytest.raises(AttachError, match=re.escape(rec["segment"])):
            attach(str(man), verify=True)
    finally:
        assert run_module("release", str(man)).returncode == 0


def test_verify_run_catches_a_corrupted_segment(synth_model):
    from ktnuma.stage.coordinator import stage
    from ktnuma.index.experts import index_model
    from ktnuma.plan.planner import plan as make_plan
    from ktnuma.host.topology import select
    from ktnuma.stage.verify import source_checksums, verify_run

    topo = select(path=TWO)
    index = index_model(synth_model("fp8").path)
    p = make_plan(index, topo, "ep")
    run_id = shm.new_run_id()
    stage(index, topo, "ep", run_id=run_id, plan=p)
    try:
        sums = verify_run(p, run_id, None)
        assert sums == source_checksums(p) and sum(map(len, sums.values())) >= len(index.groups)
        seg = p.segments[-1]
        a = seg.arrays[-1]
        name = shm.segment_name(run_id, seg.layer, seg.node)
        fd = shm.open_segment(name, write=True)
        try:
            os.pwrite(fd, b"\x7f", a.offset + a.stride * (a.count - 1))
        finally:
            os.close(fd)
        with pytest.raises(VerifyFailed, match=f"{name} layer {a.layer} {a.proj} {a.kind} expert "
                                               f"{a.first + a.count - 1}") as ei:
            verify_run(p, run_id, None)
        assert ei.value.exit_code == 4
    finally:
        shm.unlink_run(run_id)
