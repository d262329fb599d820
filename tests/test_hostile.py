"""Issue 16 (trust nothing read from disk, remove only what is provably ours, never hang), one test
per class of failure, through the real CLI (`python -m ktnuma.*`) and the real API, with real
segments, real worker processes and real files. Every case: one line on stderr, the contract's
exit code, nothing of ours left behind, nothing of anyone else's removed.
"""
from __future__ import annotations

import copy
import json
import os
import signal
import stat
import struct
import subprocess
import sys
import time

import pytest

from conftest import REPO, run_module
from ktnuma.host import shm

TWO = os.path.join(REPO, "configs/topologies/two-node.toml")


def _launch(model: str, man, *extra: str, env: dict | None = None) -> dict:
    r = run_module("launch", "--topology", TWO, "--detach", "--quiet", "--manifest", str(man), *extra, model,
                   env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(open(man).read())


def _one_line(r: subprocess.CompletedProcess, code: int = 2) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == code, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr and lines and "error:" in lines[-1], r.stderr[-2000:]
    return lines[-1]


@pytest.fixture
def staged(synth_model, run_registry, tmp_path):
    """A detached bf16 run over two simulated nodes: (manifest path, manifest dict); released after."""
    man = tmp_path / "run.json"
    m = _launch(synth_model("bf16").path, man)
    yield man, m
    run_module("release", "--force", str(man))
    for s in m["segments"]:
        try:
            shm.unlink(s["name"])
        except OSError:
            pass


# ------------------------------------------------------------------ 1. the engine side trusts the manifest

def _bad_manifests(m: dict) -> list[tuple[str, dict, str]]:
    """(case, mutated manifest, the named error class) for attach/release/verify."""
    a0 = m["arrays"][0]
    seg0 = next(s for s in m["segments"] if s["name"] == a0["segment"])
    other = shm.new_run_id()
    out = []

    def case(name: str, cls: str, edit) -> None:
        x = copy.deepcopy(m)
        edit(x)
        out.append((name, x, cls))

    case("offset past segment", "ManifestOutOfBounds", lambda x: x["arrays"][0].update(offset=seg0["size"]))
    case("stride huge", "ManifestOutOfBounds", lambda x: x["arrays"][0].update(stride=1 << 40))
    case("nbytes inconsistent", "ManifestOutOfBounds", lambda x: x["arrays"][0].update(nbytes=a0["nbytes"] * 2))
    case("stride below nbytes", "ManifestOutOfBounds", lambda x: x["arrays"][0].update(stride=a0["nbytes"] - 2))
    case("negative first expert", "ManifestOutOfBounds", lambda x: x["arrays"][0].update(experts=[-1, 2]))
    case("experts beyond num_experts", "ManifestOutOfBounds",
         lambda x: x["arrays"][0].update(experts=[m["config"]["num_experts"] - 1, 2]))
    case("segment name with NUL", "ManifestMalformed", lambda x: x["segments"][0].update(name=x["segments"][0]["name"] + "\0"))
    case("segment of another run", "ManifestNames",
         lambda x: x["segments"][0].update(name=shm.segment_name(other, seg0["layer"], seg0["node"])))
    case("run id with slash", "ManifestNames", lambda x: x.update(run_id="../../etc/passwd"))
    case("offset a string", "ManifestMalformed", lambda x: x["arrays"][0].update(offset="0"))
    case("offset a float", "ManifestMalformed", lambda x: x["arrays"][0].update(offset=0.0))
    case("size a bool", "ManifestMalformed", lambda x: x["segments"][0].update(size=True))
    case("arrays not a list", "ManifestMalformed", lambda x: x.update(arrays={"a": 1}))
    case("shape zero dim", "ManifestOutOfBounds", lambda x: x["arrays"][0].update(shape=[0, 4]))
    case("node not in topology", "ManifestOutOfBounds", lambda x: x["arrays"][0].update(node=7))
    case("shm_dir relative", "ManifestMalformed", lambda x: x.update(shm_dir="../tmp"))
    return out


def test_attach_release_verify_refuse_every_bad_record_by_name(staged, tmp_path):
    import ktnuma
    from ktnuma import errors

    man, m = staged
    names = sorted(s["name"] for s in m["segments"])
    for case, x, cls in _bad_manifests(m):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(x))
        os.chmod(bad, 0o600)
        with pytest.raises(getattr(errors, cls)) as ei:
            ktnuma.attach(str(bad), check_source=False)
        assert ei.value.exit_code == 2 and str(bad) in str(ei.value), case
        for cmd in (("release", str(bad)), ("release", "--force", str(bad))):
            assert str(bad) in _one_line(run_module(*cmd)), case
        assert sorted(shm.run_segments(m["run_id"])) == names, case  # release removed nothing
    # the real manifest still attaches, every pointer inside its mapping
    with ktnuma.attach(str(man)) as att:
        for r in m["arrays"]:
            seg = att._segments[r["segment"]]
            for row in att.pointers(r["layer"], r["proj"], r["kind"]):
                for p in row:
                    assert p == 0 or any(s.address <= p and p + r["nbytes"] <= s.address + s.size
                                         for s in att._segments.values())
            assert seg.size >= r["offset"] + r["experts"][1] * r["stride"]


@pytest.mark.parametrize("text,why", [
    ("[" * 100000 + "]" * 100000, "nested deeper"),
    ('{"ktnuma_manifest": ' + "9" * 5000 + "}", "5000 digits"),
    ('{"ktnuma_manifest": 1, "ktnuma_manifest": 1}', "duplicate key"),
    ("\x00\xff binary", "not valid JSON"),
], ids=["deep", "5000-digits", "duplicate-key", "binary"])
def test_manifest_json_bounds_one_line(text, why, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(text, errors="surrogateescape")
    os.chmod(bad, 0o600)
    for mod in ("release",):
        assert why in _one_line(run_module(mod, str(bad)))
    import ktnuma
    from ktnuma.errors import ManifestMalformed

    with pytest.raises(ManifestMalformed, match=why):
        ktnuma.attach(str(bad))


def test_manifest_size_limit_and_dev_zero(tmp_path):
    from ktnuma.stage.manifest_check import LIMIT

    big = tmp_path / "big.json"
    with open(big, "wb") as f:  # sparse: costs no disk
        f.truncate(LIMIT + 1)
    os.chmod(big, 0o600)
    assert "limit" in _one_line(run_module("release", str(big)))
    t0 = time.monotonic()
    assert "writable by group or others" in _one_line(run_module("release", "/dev/zero"))
    assert "not a regular file" in _one_line(run_module("release", "--force", "/dev/zero"))
    assert time.monotonic() - t0 < 30


def test_fifo_at_a_segment_name_never_blocks_attach(staged):
    import ktnuma
    from ktnuma.errors import SegmentMismatch

    man, m = staged
    victim = m["segments"][0]["name"]
    shm.unlink(victim)
    os.mkfifo(os.path.join("/dev/shm", victim), 0o600)
    try:
        t0 = time.monotonic()
        with pytest.raises(SegmentMismatch, match="not a regular file"):
            ktnuma.attach(str(man))
        assert time.monotonic() - t0 < 10
    finally:
        os.unlink(os.path.join("/dev/shm", victim))


# ------------------------------------------------------------------ 2. removal takes identity from the registry

def test_release_refuses_untrusted_manifest_unless_forced(staged):
    man, m = staged
    os.chmod(man, 0o666)
    line = _one_line(run_module("release", str(man)))
    assert "writable by group or others" in line and "--force" in line
    os.chmod(man, 0o600)
    os.chown(man, 65534, 65534)
    assert "owned by uid 65534" in _one_line(run_module("release", str(man)))
    assert len(shm.run_segments(m["run_id"])) == len(m["segments"])  # nothing removed
    r = run_module("release", "--force", str(man))
    assert r.returncode == 0 and shm.run_segments(m["run_id"]) == [] and not man.exists()


def test_release_never_removes_files_outside_the_run(staged, tmp_path, tiny_tmpfs):
    """A manifest rewritten to claim another shm dir or other names removes nothing there."""
    man, m = staged
    d = tiny_tmpfs("1m")
    bystander = os.path.join(d, m["segments"][0]["name"])  # same name, in a dir the run never used
    open(bystander, "wb").close()
    x = copy.deepcopy(m)
    x["shm_dir"] = d
    forged = tmp_path / "forged.json"
    forged.write_text(json.dumps(x))
    os.chmod(forged, 0o600)
    # the registry records this run's manifest elsewhere: refused
    assert "registry records" in _one_line(run_module("release", str(forged)))
    r = run_module("release", "--force", str(forged))  # forced: still the registry's shm dir, not the forged one
    assert r.returncode == 0, r.stderr
    assert os.path.exists(bystander) and shm.run_segments(m["run_id"]) == []


def test_cleanup_dead_run_pass_spares_other_uids(synth_model, run_registry, tmp_path, tiny_tmpfs):
    from ktnuma.stage import registry

    d = tiny_tmpfs("1m")
    gone = subprocess.Popen(["true"])
    gone.wait()
    rid = shm.new_run_id()
    registry.register(rid, str(tmp_path / "x.json"), d, state="held", pid=gone.pid)
    mine, theirs = shm.segment_name(rid, 1, 0), shm.segment_name(rid, 1, 1)
    for n in (mine, theirs):
        os.close(shm.create(n, d))
    os.chown(os.path.join(d, theirs), 65534, 65534)
    r = run_module("cleanup", "--shm-dir", d)
    assert r.returncode == 0, r.stderr
    assert os.listdir(d) == [theirs] and registry.get(rid) is None
    os.unlink(os.path.join(d, theirs))


# ------------------------------------------------------------------ 3. one registry whatever the environment

def test_registry_location_ignores_the_environment(tmp_path):
    code = "from ktnuma.stage import registry; print(registry.registry_dir(create=False))"
    seen = set()
    for xdg in (None, str(tmp_path), "/dev/shm", "/nonexistent"):
        env = {k: v for k, v in os.environ.items() if k not in ("XDG_RUNTIME_DIR", "KTNUMA_REGISTRY_DIR")}
        if xdg:
            env["XDG_RUNTIME_DIR"] = xdg
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == 0, r.stderr
        seen.add(r.stdout.strip())
    assert len(seen) == 1
    (where,) = seen
    assert where in (f"/run/ktnuma-{os.getuid()}", f"/tmp/ktnuma-{os.getuid()}")
    assert not os.path.realpath(where).startswith("/dev/shm")


def test_registry_override_under_dev_shm_refused():
    from ktnuma.errors import RegistryError
    from ktnuma.stage import registry

    old = os.environ.get(registry.DIR_ENV)
    os.environ[registry.DIR_ENV] = "/dev/shm/ktnuma-registry-test"
    try:
        with pytest.raises(RegistryError, match="under /dev/shm"):
            registry.registry_dir()
    finally:
        if old is None:
            del os.environ[registry.DIR_ENV]
        else:
            os.environ[registry.DIR_ENV] = old
    assert not os.path.exists("/dev/shm/ktnuma-registry-test")


def test_cleanup_from_another_environment_keeps_live_and_detached(synth_model, run_registry, tmp_path):
    man = tmp_path / "det.json"
    m = _launch(synth_model("bf16").path, man, env={"XDG_RUNTIME_DIR": str(tmp_path)})
    try:
        r = run_module("cleanup", env={"XDG_RUNTIME_DIR": "/nonexistent", "HOME": "/"})
        assert r.returncode == 0, r.stderr
        assert len(shm.run_segments(m["run_id"])) == len(m["segments"]) and man.exists()
    finally:
        run_module("release", str(man))


# ------------------------------------------------------------------ 4. publish races

def test_publish_never_replaces_and_unlinks_only_its_own(tmp_path):
    from ktnuma.errors import ManifestExists
    from ktnuma.stage.manifest import publish, tmp_path as temp_of, unlink_if_ours

    p = tmp_path / "m.json"
    a, b = {"run_id": shm.new_run_id(), "n": 1}, {"run_id": shm.new_run_id(), "n": 2}
    publish(a, str(p))
    with pytest.raises(ManifestExists):
        publish(b, str(p))
    assert json.loads(p.read_text()) == a and os.listdir(tmp_path) == ["m.json"]  # no temp left
    assert not unlink_if_ours(str(p), b["run_id"]) and p.exists()
    assert unlink_if_ours(str(p), a["run_id"]) and not p.exists()
    assert os.path.basename(temp_of(str(p), a["run_id"])) == f".m.json.{a['run_id']}.tmp"


def test_foreground_exit_spares_a_manifest_that_is_no_longer_its_own(synth_model, run_registry, tmp_path):
    man = tmp_path / "m.json"
    p = subprocess.Popen([sys.executable, "-m", "ktnuma.launch", "--topology", TWO, "--quiet", "--manifest",
                          str(man), synth_model("bf16").path], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        line = p.stdout.readline()
        assert line.startswith("ready "), p.stderr.read()
        rid = json.loads(man.read_text())["run_id"]
        other = {"run_id": shm.new_run_id(), "note": "another run published here meanwhile"}
        os.unlink(man)
        man.write_text(json.dumps(other))
        p.send_signal(signal.SIGTERM)
        assert p.wait(60) == 0
        assert json.loads(man.read_text()) == other and shm.run_segments(rid) == []
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_two_launches_racing_for_one_manifest_path(synth_model, run_registry, tmp_path):
    """Both pass the early 'exists' check (their workers are slowed), only one publishes: the other
    exits 2 naming the path, leaving nothing and not touching the winner's manifest."""
    man = tmp_path / "m.json"
    cmd = [sys.executable, "-m", "ktnuma.launch", "--topology", TWO, "--detach", "--quiet", "--manifest",
           str(man), synth_model("bf16").path]
    env = dict(os.environ, KTNUMA_WORKER_DELAY="1")
    ps = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
          for _ in range(2)]
    outs = [(p.wait(120), p.stdout.read(), p.stderr.read()) for p in ps]
    try:
        codes = sorted(c for c, _, _ in outs)
        assert codes == [0, 2], outs
        (win,) = [o for o in outs if o[0] == 0]
        (lose,) = [o for o in outs if o[0] == 2]
        assert win[1].strip() == f"ready {man}" and "ready" not in lose[1]
        assert str(man) in lose[2] and ("exists" in lose[2]) and "Traceback" not in lose[2], lose
        m = json.loads(man.read_text())
        assert len(shm.run_segments(m["run_id"])) == len(m["segments"])
        assert [n[:-5] for n in os.listdir(run_registry) if n.endswith(".json")] == [m["run_id"]]
    finally:
        run_module("release", str(man))


def test_cleanup_removes_a_killed_publishers_temp_file(run_registry, tmp_path):
    from ktnuma.stage import registry
    from ktnuma.stage.manifest import tmp_path as temp_of

    gone = subprocess.Popen(["true"])
    gone.wait()
    rid = shm.new_run_id()
    man = tmp_path / "m.json"
    registry.register(rid, str(man), "/dev/shm", state="staging", pid=gone.pid)
    tmp = temp_of(str(man), rid)
    open(tmp, "w").write("{half a manifest")
    reg_tmp = os.path.join(str(run_registry), registry.tmp_name(rid, gone.pid))
    open(reg_tmp, "w").write("{")
    r = run_module("cleanup")
    assert r.returncode == 0, r.stderr
    assert not os.path.exists(tmp) and not os.path.exists(reg_tmp) and registry.get(rid) is None


# ------------------------------------------------------------------ 5. ready on a closed stdout

@pytest.mark.parametrize("how", ["reader-gone", "fd-closed"])
def test_ready_unwritable_removes_the_run(how, synth_model, run_registry, tmp_path):
    man = tmp_path / "m.json"
    cmd = [sys.executable, "-m", "ktnuma.launch", "--topology", TWO, "--detach", "--quiet", "--manifest",
           str(man), synth_model("bf16").path]
    if how == "fd-closed":
        r = subprocess.run(["sh", "-c", 'exec "$@" >&-', "sh", *cmd], capture_output=True, text=True, timeout=120)
        code, err = r.returncode, r.stderr
    else:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        p.stdout.close()
        code, err = p.wait(120), p.stderr.read()
    assert code == 2 and "ready" in err and "Traceback" not in err, err
    assert not man.exists() and not [n for n in os.listdir(run_registry) if n.endswith(".json")]
    # no segment either: the conftest leak check fails the test otherwise


# ------------------------------------------------------------------ 6. hangs and unbounded work

def _gguf_with_array(path, count: int) -> None:
    """A tiny valid GGUF (one Q8_0 expert stack layer) whose metadata array then claims `count` items."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_array("test.claim", [7, 7, 7])
    w.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = bytearray(open(path, "rb").read())
    key = b"test.claim"
    i = data.index(key) + len(key) + 4 + 4  # value type (ARRAY), element type, then the u64 count
    assert struct.unpack_from("<Q", data, i)[0] == 3
    struct.pack_into("<Q", data, i, count)
    open(path, "wb").write(bytes(data))


def test_gguf_array_claiming_2_60_elements_is_refused_at_once(tmp_path):
    p = tmp_path / "model.gguf"
    _gguf_with_array(p, 1 << 60)
    t0 = time.monotonic()
    for cmd in (("inspect", str(p)), ("launch", "--topology", TWO, str(p))):
        line = _one_line(run_module(*cmd, timeout=60))
        assert "claims" in line and "past the end" in line
    assert time.monotonic() - t0 < 60


def test_fifo_as_model_file_never_blocks(tmp_path, synth_model):
    d = tmp_path / "m"
    d.mkdir()
    src = synth_model("bf16").path
    for n in os.listdir(src):
        if n.endswith(".json"):
            open(d / n, "w").write(open(os.path.join(src, n)).read())
    os.mkfifo(d / "model.safetensors")
    assert "not a regular file" in _one_line(run_module("inspect", str(d), timeout=30))
    assert "not a regular file" in _one_line(run_module("launch", "--topology", TWO, str(d), timeout=30))
    os.mkfifo(tmp_path / "lone.safetensors")
    assert "not a regular file" in _one_line(run_module("inspect", str(tmp_path / "lone.safetensors"), timeout=30))
    os.mkfifo(tmp_path / "topo.toml")
    assert "not a regular file" in _one_line(run_module("launch", "--topology", str(tmp_path / "topo.toml"),
                                                        src, timeout=30))


def test_layers_and_nodes_bounded_before_any_worker(synth_model, monkeypatch, run_registry):
    """In-process: a worker process would be a procs.WorkerProc; none may exist when the inputs are refused."""
    from ktnuma import launch
    from ktnuma.errors import BadInput
    from ktnuma.stage import procs

    started = []
    monkeypatch.setattr(procs.WorkerProc, "__init__", lambda self, *a, **k: started.append(a) or 1 / 0)
    model = synth_model("bf16").path
    for argv, what in ((["/nonexistent", "--nodes", "256"], "does not exist"),
                       ([model, "--layers", "0-100000000000"], "beyond"),
                       ([model, "--layers", "7"], "no routed experts"),
                       ([model, "--nodes", "100000000000"], "more than 1024"),
                       ([model, "--nodes", "3"], "nodes")):
        with pytest.raises(BadInput, match=what):
            launch.main(argv + ["--quiet"])
        assert started == [], argv


def test_shm_dir_on_disk_refused(synth_model, tmp_path):
    d = tmp_path / "disk"
    d.mkdir()
    if shm.is_tmpfs(str(d)):
        pytest.skip("tmp_path is a tmpfs here")
    assert "not on a tmpfs" in _one_line(run_module("launch", "--topology", TWO, "--shm-dir", str(d),
                                                    synth_model("bf16").path))
    assert os.listdir(d) == []


# ------------------------------------------------------------------ 7. tracebacks -> one line, exit 2

def _write_st(path, tensors: dict, raw: bytes | None = None) -> None:
    hdr, off = {}, 0
    for n, (dt, shape, nb) in tensors.items():
        hdr[n] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + nb]}
        off += nb
    h = raw if raw is not None else json.dumps(hdr).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"\0" * off)


def _moe_dir(d, shapes, layers=(0,), cfg=None) -> str:
    os.makedirs(d, exist_ok=True)
    t = {}
    for lyr in layers:
        for e in range(2):
            for proj, shp in zip(("gate_proj", "up_proj", "down_proj"), shapes):
                n = 2
                for x in shp:
                    n *= x
                t[f"model.layers.{lyr}.mlp.experts.{e}.{proj}.weight"] = ("BF16", list(shp), n)
    _write_st(os.path.join(d, "model.safetensors"), t)
    c = {"n_routed_experts": 2, "num_experts_per_tok": 1, "hidden_size": 8, "moe_intermediate_size": 4,
         "num_hidden_layers": max(layers) + 1, **(cfg or {})}
    open(os.path.join(d, "config.json"), "w").write(json.dumps(c))
    return str(d)


def test_hostile_models_are_one_line_exit_2(tmp_path):
    ok = [(4, 8), (4, 8), (8, 4)]
    cases = {
        "1-D expert weights": (_moe_dir(tmp_path / "a", [(32,), (32,), (32,)]), "1-D"),
        "0-D expert weights": (_moe_dir(tmp_path / "b", [(), (), ()]), "0-D"),
        "zero-size dims": (_moe_dir(tmp_path / "c", [(0, 8), (0, 8), (8, 0)], cfg={"moe_intermediate_size": 0}),
                           "zero-size"),
        "layer too long for a name": (_moe_dir(tmp_path / "d", ok, layers=(100000,)), "beyond 99999"),
    }
    e = tmp_path / "e"
    _moe_dir(e, ok)
    open(e / "config.json", "w").write('{"a":' * 20000 + "1" + "}" * 20000)
    cases["deeply nested config.json"] = (str(e), "nested deeper")
    f = tmp_path / "f"
    _moe_dir(f, ok)
    open(f / "config.json", "w").write('{"hidden_size": ' + "9" * 5000 + "}")
    cases["5000-digit int in config.json"] = (str(f), "5000 digits")
    g = tmp_path / "g"
    g.mkdir()
    name = "model.layers.0.mlp.experts.0.gate_proj.weight"
    _write_st(g / "model.safetensors", {}, ('{"%s":{"dtype":"BF16","shape":[4,8],"data_offsets":[0,64]},'
                                            '"%s":{"dtype":"BF16","shape":[4,8],"data_offsets":[64,128]}}'
                                            % (name, name)).encode())
    cases["duplicate safetensors keys"] = (str(g), "duplicate key")
    h = tmp_path / "h"
    h.mkdir()
    _write_st(h / "model.safetensors", {}, b'{"x":{"dtype":"BF16","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,2]}}')
    cases["5000-digit int in a safetensors header"] = (str(h), "5000 digits")
    i = tmp_path / "i"
    i.mkdir()
    _write_st(i / "model.safetensors", {}, b'{"x":' * 50000 + b"1" + b"}" * 50000)
    cases["deeply nested safetensors header"] = (str(i), "nested deeper")
    for case, (model, why) in cases.items():
        for cmd in (("inspect", model), ("launch", "--topology", TWO, "--quiet", model)):
            assert why in _one_line(run_module(*cmd, timeout=60)), case


def test_binary_and_hostile_topology_files(synth_model, tmp_path):
    model = synth_model("bf16").path
    b = tmp_path / "bin.toml"
    b.write_bytes(bytes(range(256)) * 8)
    assert "not a TOML text file" in _one_line(run_module("launch", "--topology", str(b), model))
    h = tmp_path / "huge.toml"
    h.write_text("[[nodes]]\nid = " + "9" * 5000 + "\ncpus = [0]\n")
    assert "topology" in _one_line(run_module("launch", "--topology", str(h), model))
    n = tmp_path / "bigid.toml"
    n.write_text("[[nodes]]\nid = 100000\ncpus = [0]\n")
    assert "'id' must be a non-negative integer (at most 9999)" in _one_line(run_module("launch", "--topology", str(n), model))


def test_overlapping_gguf_tensors_refused(tmp_path):
    import gguf
    import numpy as np

    p = tmp_path / "model.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    w.add_tensor("a.weight", np.zeros((4, 32), dtype=np.float32))
    w.add_tensor("b.weight", np.zeros((4, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = bytearray(p.read_bytes())
    i = data.index(b"b.weight") + len(b"b.weight") + 4 + 8 * 2 + 4  # n_dims, 2 dims, type -> offset
    assert struct.unpack_from("<Q", data, i)[0] == 4 * 32 * 4
    struct.pack_into("<Q", data, i, 64)  # b now starts inside a
    p.write_bytes(bytes(data))
    from ktnuma.errors import OverlappingTensors
    from ktnuma.index.gguf import read_file

    with pytest.raises(OverlappingTensors, match="overlaps 'b.weight'"):
        read_file(str(p), 0)
    assert "overlaps" in _one_line(run_module("inspect", str(p)))


def test_registry_entries_are_validated(run_registry):
    from ktnuma.stage import registry

    registry.registry_dir()
    rid = shm.new_run_id()
    for bad in ({"run_id": rid}, [1], {"run_id": "../x", "pid": 1}, "x" * 10):
        open(os.path.join(run_registry, f"{rid}.json"), "w").write(json.dumps(bad))
        assert registry.get(rid) is None
    open(os.path.join(run_registry, "..json"), "w").write("{}")
    assert registry.entries() == []
    os.chmod(run_registry, 0o755)
    registry.registry_dir()
    assert stat.S_IMODE(os.stat(run_registry).st_mode) == 0o700


def test_cleanup_with_a_private_registry_spares_other_sessions_segments(run_registry):
    """A private registry (tests) cannot see the runs of other registries of the same uid: its
    unowned pass takes only the session's run ids (KTNUMA_RUN_ID_PREFIX); the real one takes all."""
    rid = shm.new_run_id()
    assert shm.session_prefix() and rid.startswith(shm.session_prefix())  # conftest sets one
    mine = shm.segment_name(rid, 1, 0)
    other = shm.segment_name(("1" if rid[0] == "0" else "0") + rid[1:], 1, 0)  # another session's
    made = []
    try:
        for name in (mine, other):
            os.close(shm.create(name))
            made.append(name)
        r = run_module("cleanup")
        assert r.returncode == 0, r.stderr
        assert not os.path.exists(shm.segment_path(mine)), "the session's unowned segment stayed"
        assert os.path.exists(shm.segment_path(other)), "another session's segment went"
    finally:
        for name in made:
            shm.unlink(name)
