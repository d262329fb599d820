"""Security (issue 7): owner-only segments and manifests, unguessable names created O_CREX (a name that
already exists is never attached to, resized or removed), attach refuses foreign or resized segments,
shard paths that leave the model directory are refused, symlinked Hugging Face cache shards are fine.

Already covered elsewhere (referenced, not repeated): O_CREX + 0600 of shm.create on a bare name
(test_shm.test_create_exclusive_mode_and_unlink), manifest mode 0600 and registry dir 0700
(test_launch_cli.test_detach_json_ready_release), shard_paths refusing absolute/`..` names and the
symlinked cache at index level (test_safetensors_reader, test_index).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys

import pytest

from conftest import SESSION_TAG, run_module
from ktnuma.errors import SegmentExists, SegmentMismatch
from ktnuma.host import shm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWO = os.path.join(REPO, "configs/topologies/two-node.toml")


def _session_segments() -> list[str]:
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(f"ktnuma.{SESSION_TAG}"))


def _entries(reg) -> list[str]:
    return sorted(p for p in os.listdir(reg) if p.endswith(".json")) if os.path.isdir(reg) else []


def _launch_detached(model: str, man, *extra: str) -> dict:
    r = run_module("launch", "--topology", TWO, "--detach", "--quiet", "--manifest", str(man), *extra, model)
    assert r.returncode == 0, r.stderr
    return json.loads(open(man).read())


def test_segments_manifest_registry_owner_only_and_names_unguessable(synth_model, run_registry, tmp_path):
    info = synth_model("bf16")
    m1 = _launch_detached(info.path, tmp_path / "a.json")
    m2 = _launch_detached(info.path, tmp_path / "b.json")
    try:
        for m, man in ((m1, tmp_path / "a.json"), (m2, tmp_path / "b.json")):
            # run id: the session tag, then 16 random hex digits (64 bits) -- never reused
            assert re.fullmatch(SESSION_TAG + r"[0-9a-f]{16}", m["run_id"]), m["run_id"]
            for s in m["segments"]:
                st = os.lstat(os.path.join("/dev/shm", s["name"]))
                assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600, s["name"]
                assert st.st_uid == os.getuid() and st.st_size == s["size"]
                assert s["name"].startswith(f"ktnuma.{m['run_id']}.L")
            assert stat.S_IMODE(os.stat(man).st_mode) == 0o600
            reg = run_registry / f"{m['run_id']}.json"
            assert stat.S_IMODE(os.stat(reg).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(run_registry).st_mode) == 0o700
        assert m1["run_id"] != m2["run_id"]
        assert not set(s["name"] for s in m1["segments"]) & set(s["name"] for s in m2["segments"])
    finally:
        for man in ("a.json", "b.json"):
            run_module("release", str(tmp_path / man))
    assert shm.run_segments(m1["run_id"]) == shm.run_segments(m2["run_id"]) == []


def _stage(info, run_id, shm_dir=None):
    from ktnuma.stage.coordinator import stage
    from ktnuma.index.experts import index_model
    from ktnuma.host.topology import select

    return stage(index_model(info.path), select(path=TWO), "tp", run_id=run_id, shm_dir=shm_dir)


@pytest.mark.parametrize("where", ["posix", "shm-dir"])
def test_preexisting_segment_name_is_never_attached_resized_or_removed(where, synth_model, tiny_tmpfs):
    """Pre-create the name a run will use (the run id is ours to pick in-process): the run fails
    naming it, the foreign object keeps its size and bytes, the run's own segments are all gone."""

    info = synth_model("bf16")
    d = None if where == "posix" else tiny_tmpfs("32m")
    run_id = shm.new_run_id()
    layer = info.moe_layers[-1]
    name = shm.segment_name(run_id, layer, 1)
    fd = shm.create(name, d)
    try:
        os.write(fd, b"not yours" * 100)
        with pytest.raises(SegmentExists, match=re.escape(name)) as ei:
            _stage(info, run_id, d)
        assert ei.value.exit_code == 4
        st = os.fstat(fd)
        assert st.st_size == 900 and os.pread(fd, 900, 0) == b"not yours" * 100
        assert shm.run_segments(run_id, d) == [name]  # only the foreign one, untouched
    finally:
        os.close(fd)
        shm.unlink(name, d)


def test_symlink_planted_at_segment_name_is_not_followed(synth_model, tiny_tmpfs, tmp_path):
    """--shm-dir files are created O_CREAT|O_EXCL|O_NOFOLLOW: a symlink at the name is never written through."""

    info = synth_model("bf16")
    d = tiny_tmpfs("32m")
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    run_id = shm.new_run_id()
    link = os.path.join(d, shm.segment_name(run_id, info.moe_layers[0], 0))
    os.symlink(victim, link)
    try:
        with pytest.raises(SegmentExists):
            _stage(info, run_id, d)
        assert victim.read_bytes() == b"precious" and os.path.islink(link)
        assert os.listdir(d) == [os.path.basename(link)]
    finally:
        os.unlink(link)


def test_launch_with_preexisting_name_exits_4_and_keeps_it(synth_model, run_registry, tmp_path, monkeypatch, capsys):
    """The CLI path: launch (in-process, so its run id can be fixed) refuses and removes only its own."""
    from ktnuma import cli, launch

    info = synth_model("bf16")
    run_id = shm.new_run_id()
    monkeypatch.setattr(shm, "new_run_id", lambda: run_id)
    name = shm.segment_name(run_id, info.moe_layers[0], 0)
    fd = shm.create(name)
    os.ftruncate(fd, 4096)
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    man = tmp_path / "m.json"
    try:
        rc = cli.run("launch", launch.main, ["--topology", TWO, "--quiet", "--manifest", str(man), info.path])
        err = capsys.readouterr().err
        assert rc == 4, err
        assert err.count("\n") == 1 and name in err and "Traceback" not in err
        assert os.fstat(fd).st_size == 4096 and shm.run_segments(run_id) == [name]
        assert not man.exists() and not _entries(run_registry)
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
        os.close(fd)
        shm.unlink(name)


# ------------------------------------------------------------------ attach (engine side)

def _attach_mod():
    import ktnuma.engine.attachment as mod

    return mod


def test_attach_refuses_segment_of_another_user(synth_model, run_registry, tmp_path):
    mod = _attach_mod()
    man = tmp_path / "m.json"
    m = _launch_detached(synth_model("bf16").path, man)
    try:
        with mod.attach(str(man)) as a:  # sane first: attach works on our own run
            assert a is not None
        victim = m["segments"][0]["name"]
        os.chown(os.path.join("/dev/shm", victim), 65534, 65534)
        with pytest.raises(SegmentMismatch, match=re.escape(victim)) as ei:
            with mod.attach(str(man)):
                pass
        assert "uid 65534" in str(ei.value) and ei.value.exit_code == 2
        # without the root capabilities that bypass file modes the segment cannot even be opened:
        # still the named refusal (one line, exit 2), never posix_ipc's own exception
        code = ("import sys, ktnuma\n"
                "try:\n    ktnuma.attach(sys.argv[1])\n"
                "except Exception as e:\n    print(type(e).__name__, getattr(e, 'exit_code', None), e)\n")
        r = subprocess.run(["setpriv", "--inh-caps=-dac_override,-dac_read_search,-fowner",
                            "--bounding-set=-dac_override,-dac_read_search,-fowner",
                            sys.executable, "-c", code, str(man)], capture_output=True, text=True, timeout=60)
        assert r.stdout.startswith("SegmentMismatch 2 "), r.stdout + r.stderr
        assert victim in r.stdout and "permission denied" in r.stdout
    finally:
        run_module("release", str(man))
    # removal is of the caller's uid only: release left the segment now owned by uid 65534
    assert shm.run_segments(m["run_id"]) == [victim]
    shm.unlink(victim)


def test_attach_refuses_segment_of_unexpected_size(synth_model, run_registry, tmp_path):
    mod = _attach_mod()
    man = tmp_path / "m.json"
    m = _launch_detached(synth_model("bf16").path, man)
    try:
        s = m["segments"][-1]
        fd = shm.open_segment(s["name"], write=True)
        try:
            os.ftruncate(fd, s["size"] + 4096)
        finally:
            os.close(fd)
        with pytest.raises(SegmentMismatch, match=re.escape(s["name"])) as ei:
            with mod.attach(str(man)):
                pass
        assert str(s["size"] + 4096) in str(ei.value) and str(s["size"]) in str(ei.value)
    finally:
        run_module("release", str(man))
    assert shm.run_segments(m["run_id"]) == []


# ------------------------------------------------------------------ shard paths

@pytest.mark.parametrize("bad", ["/etc/passwd", "../outside.safetensors", "sub/../../x.safetensors"])
def test_launch_refuses_index_with_unsafe_shard_path(bad, synth_model, run_registry, tmp_path):
    info = synth_model("bf16", shards=2)
    d = tmp_path / "m"
    shutil.copytree(info.path, d)
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    victim = next(iter(idx["weight_map"]))
    idx["weight_map"][victim] = bad
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    before = _session_segments()
    r = run_module("launch", "--topology", TWO, "--manifest", str(tmp_path / "o.json"), str(d))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert "model.safetensors.index.json" in lines[0] and victim in lines[0] and bad in lines[0]
    assert _session_segments() == before and not (tmp_path / "o.json").exists() and not _entries(run_registry)


def test_launch_symlinked_hf_cache_snapshot_is_staged_byte_exact(synth_model, run_registry, tmp_path):
    from test_staging import verify_in_subprocess

    info = synth_model("bf16", shards=2, seed=5)
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "0123abcd"
    blobs.mkdir()
    snap.mkdir(parents=True)
    for i, n in enumerate(sorted(os.listdir(info.path))):
        shutil.copy(os.path.join(info.path, n), blobs / f"sha256-{i}")
        os.symlink(os.path.relpath(blobs / f"sha256-{i}", snap), snap / n)
    man = tmp_path / "m.json"
    m = _launch_detached(str(snap), man)
    try:
        out = verify_in_subprocess(str(man))
        assert out["segments"] == len(m["segments"]) and out["pieces"] >= len(info.staged)
    finally:
        run_module("release", str(man))
    assert shm.run_segments(m["run_id"]) == []
