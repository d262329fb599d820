"""launch / release / cleanup as users run them: real subprocesses, real signals, real POSIX shm."""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from conftest import run_module
from ktnuma.host import shm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWO = os.path.join(REPO, "configs/topologies/two-node.toml")
MANIFEST_KEYS = {"ktnuma_manifest", "run_id", "owner", "split", "shm_dir", "model", "config", "topology",
                 "segments", "arrays"}


def entries(reg):
    return sorted(p for p in os.listdir(reg) if p.endswith(".json")) if os.path.isdir(reg) else []


def test_help_explains():
    for mod in ("launch", "release", "cleanup"):
        r = run_module(mod, "--help")
        assert r.returncode == 0 and "usage" in r.stdout
    out = run_module("launch", "--help").stdout
    for flag in ("--nodes", "--topology", "--no-simulate", "--split", "--format", "--layers", "--manifest",
                 "--detach", "--shm-dir", "--io", "--verify", "--retries", "--json", "--quiet", "exit codes"):
        assert flag in out, flag


def test_detach_json_ready_release(synth_model, run_registry, tmp_path):
    info = synth_model("gptq-int4")
    man = tmp_path / "m.json"
    r = run_module("launch", "--topology", TWO, "--detach", "--json", "--verify", "--manifest", str(man),
                   info.path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[-1] == f"ready {man}" and len(lines) == 2
    s = json.loads(lines[0])
    assert s["manifest"] == str(man) and s["bytes"] > 0 and len(s["nodes"]) == 2
    assert "GB/s" in r.stderr and "on node" in r.stderr  # summary table on stderr
    m = json.loads(man.read_text())
    assert set(m) >= MANIFEST_KEYS and m["ktnuma_manifest"] == 1 and m["shm_dir"] == "/dev/shm"
    assert stat.S_IMODE(os.stat(man).st_mode) == 0o600
    assert m["owner"]["start_time"] > 0 and {f["path"] for f in m["model"]["files"]} == set(info.files)
    assert m["config"] == info.manifest_config
    names = [x["name"] for x in m["segments"]]
    assert sorted(names) == shm.run_segments(m["run_id"]) and len(names) == 2 * len(info.moe_layers)
    reg = json.loads((run_registry / f"{m['run_id']}.json").read_text())
    assert reg["state"] == "detached" and reg["manifest"] == str(man)
    assert stat.S_IMODE(os.stat(run_registry).st_mode) == 0o700
    try:
        c = run_module("cleanup")  # a detached run survives cleanup
        assert c.returncode == 0 and shm.run_segments(m["run_id"]) and man.exists()
    finally:
        rr = run_module("release", str(man))
    assert rr.returncode == 0, rr.stderr
    assert shm.run_segments(m["run_id"]) == [] and not man.exists() and entries(run_registry) == []


def test_more_nodes_than_experts_ep_and_one_node_tp(synth_model, run_registry, tmp_path):
    """Edge cases: ep over 4 nodes with 2 experts (nodes 2, 3 get no segment and pointer 0; their
    workers, started before planning, exit), and tp on one node (whole pieces, slice null)."""
    import ktnuma

    info = synth_model("bf16", experts=2, layers=1, hidden=64, intermediate=64, mtp=False)
    man = tmp_path / "ep.json"
    r = run_module("launch", "--nodes", "4", "--split", "ep", "--detach", "--quiet", "--manifest", str(man), info.path)
    assert r.returncode == 0, r.stderr
    try:
        m = json.loads(man.read_text())
        assert sorted((s["layer"], s["node"]) for s in m["segments"]) == [(1, 0), (1, 1)]
        with ktnuma.attach(str(man)) as att:
            rows = att.pointers(1, "gate", "weight")
            assert [[bool(a) for a in row] for row in rows] == [[True, False], [False, True], [False, False],
                                                                [False, False]]
    finally:
        assert run_module("release", str(man)).returncode == 0
    man = tmp_path / "tp1.json"
    r = run_module("launch", "--nodes", "1", "--detach", "--quiet", "--manifest", str(man), info.path)
    assert r.returncode == 0, r.stderr
    try:
        m = json.loads(man.read_text())
        assert {a["slice"] is None for a in m["arrays"]} == {True}
        assert {tuple(a["experts"]) for a in m["arrays"]} == {(0, 2)}
    finally:
        assert run_module("release", str(man)).returncode == 0
    assert shm.run_segments(m["run_id"]) == []


def _start(args, env=None):
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.Popen([sys.executable, "-m", "ktnuma.launch", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=e)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_foreground_holds_until_signal_then_removes_everything(sig, synth_model, run_registry, tmp_path):
    man = tmp_path / "m.json"
    p = _start(["--topology", TWO, "--split", "ep", "--quiet", "--manifest", str(man),
                synth_model("bf16").path])
    try:
        line = p.stdout.readline().strip()
        assert line == f"ready {man}", p.stderr.read() if p.poll() is not None else line
        m = json.loads(man.read_text())
        assert len(shm.run_segments(m["run_id"])) == len(m["segments"]) > 0
        assert json.loads((run_registry / f"{m['run_id']}.json").read_text())["state"] == "held"
        time.sleep(0.2)
        assert p.poll() is None  # holding
        p.send_signal(sig)
        assert p.wait(30) == 0
        assert p.stderr.read() == ""  # --quiet
        assert shm.run_segments(m["run_id"]) == [] and not man.exists() and entries(run_registry) == []
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_signal_while_staging_exits_130_leaving_nothing(synth_model, run_registry, tmp_path):
    man = tmp_path / "m.json"
    p = _start(["--topology", TWO, "--manifest", str(man), synth_model("bf16").path],
               env={"KTNUMA_WORKER_DELAY": "20"})
    try:
        deadline = time.time() + 30
        while time.time() < deadline and not entries(run_registry):
            time.sleep(0.02)
        run_id = entries(run_registry)[0][:-5]
        while time.time() < deadline and not shm.run_segments(run_id):
            time.sleep(0.02)
        assert shm.run_segments(run_id)  # staging is under way
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 130
        err = p.stderr.read()
        assert err.strip().splitlines()[-1].startswith("ktnuma launch: error: interrupted by SIGTERM")
        assert "Traceback" not in err
        assert p.stdout.read() == ""
        time.sleep(0.3)  # workers are already gone; nothing may reappear
        assert shm.run_segments(run_id) == [] and not man.exists() and entries(run_registry) == []
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.parametrize("args,code,text", [
    (["/nonexistent/model"], 2, "/nonexistent/model"),
    (["--topology", TWO, "--nodes", "3", "MODEL"], 2, "--nodes 3"),
    (["--nodes", "0", "MODEL"], 2, "--nodes"),
    (["--nodes", "2", "--no-simulate", "MODEL"], 2, "--no-simulate"),
    (["--nodes", "4", "--split", "tp", "FP8"], 2, "128"),
    (["--split", "bogus", "MODEL"], 2, "invalid choice"),
    (["--retries", "-1", "MODEL"], 2, "--retries"),
    (["--shm-dir", "/nonexistent/dir", "MODEL"], 2, "/nonexistent/dir"),
])
def test_bad_input_is_one_line_exit_2(args, code, text, synth_model, run_registry, tmp_path):
    args = [synth_model("bf16").path if a == "MODEL" else synth_model("fp8").path if a == "FP8" else a
            for a in args]
    r = run_module("launch", "--manifest", str(tmp_path / "m.json"), *args)
    assert r.returncode == code, r.stderr
    assert "Traceback" not in r.stderr and text in r.stderr
    assert r.stdout == "" and not (tmp_path / "m.json").exists() and entries(run_registry) == []


def test_not_enough_shm_is_exit_3(synth_model, run_registry, tmp_path, tiny_tmpfs):
    d = tiny_tmpfs("1m")
    r = run_module("launch", "--topology", TWO, "--shm-dir", d, "--manifest", str(tmp_path / "m.json"),
                   synth_model("bf16").path)
    assert r.returncode == 3, r.stderr
    line = [ln for ln in r.stderr.splitlines() if "error" in ln][0]
    assert "staging needs" in line and d in line and "--shm-dir" in line
    assert os.listdir(d) == [] and entries(run_registry) == []


def test_worker_failure_exit_4_leaves_nothing(synth_model, run_registry, tmp_path):
    info = synth_model("bf16")
    r = run_module("launch", "--topology", TWO, "--retries", "1", "--manifest", str(tmp_path / "m.json"),
                   info.path, env={"KTNUMA_WORKER_FAULT": f"{info.moe_layers[0]}:1:5"})
    assert r.returncode == 4, r.stderr
    assert "node 1" in r.stderr and f"layer {info.moe_layers[0]}" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "m.json").exists() and entries(run_registry) == []
    assert not [n for n in os.listdir("/dev/shm") if n.startswith("ktnuma.") and
                os.stat(f"/dev/shm/{n}").st_mtime > time.time() - 30 and
                n.startswith("ktnuma." + os.environ["KTNUMA_RUN_ID_PREFIX"])]


def test_cleanup_dead_unowned_live_and_foreign(synth_model, run_registry, tmp_path, tiny_tmpfs):
    from ktnuma.stage import registry

    scan = tiny_tmpfs("8m")
    # a run whose owner died while holding: detach it, then rewrite its entry as a dead holder
    man = tmp_path / "dead.json"
    r = run_module("launch", "--topology", TWO, "--detach", "--quiet", "--manifest", str(man),
                   synth_model("bf16").path)
    assert r.returncode == 0, r.stderr
    dead_id = json.loads(man.read_text())["run_id"]
    gone = subprocess.Popen(["true"])
    gone.wait()
    e = registry.get(dead_id)
    registry.update(e, state="held", pid=gone.pid, start_time=1)
    # a live run (this process) and a detached one with its manifest, both in --shm-dir
    live = registry.register(shm.new_run_id(), str(tmp_path / "live.json"), scan, state="held")
    det_man = tmp_path / "det.json"
    det = registry.register(shm.new_run_id(), str(det_man), scan, state="detached")
    det_man.write_text(json.dumps({"run_id": det.run_id}))
    keep = [shm.segment_name(live.run_id, 1, 0), shm.segment_name(det.run_id, 1, 0)]
    orphan = shm.segment_name(shm.new_run_id(), 1, 0)  # no registry entry
    foreign = shm.segment_name(shm.new_run_id(), 2, 0)  # another user's
    for n in keep + [orphan, foreign]:
        os.close(shm.create(n, scan))
    os.chown(os.path.join(scan, foreign), 65534, 65534)
    try:
        dry = run_module("cleanup", "--dry-run", "--shm-dir", scan)
        assert dry.returncode == 0 and "would remove" in dry.stdout and orphan in dry.stdout
        assert shm.run_segments(dead_id) and os.path.exists(os.path.join(scan, orphan))
        c = run_module("cleanup", "--shm-dir", scan)
        assert c.returncode == 0, c.stderr
        assert shm.run_segments(dead_id) == [] and not man.exists() and registry.get(dead_id) is None
        assert sorted(os.listdir(scan)) == sorted(keep + [foreign])
        assert registry.get(live.run_id) and registry.get(det.run_id)
        det_man.unlink()  # a detached entry without its manifest counts as dead
        c = run_module("cleanup", "--shm-dir", scan)
        assert sorted(os.listdir(scan)) == sorted([keep[0], foreign]) and registry.get(det.run_id) is None
    finally:
        shm.unlink_run(dead_id)
        for n in os.listdir(scan):
            os.unlink(os.path.join(scan, n))
