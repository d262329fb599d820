"""ktnuma.attach on runs staged by `python -m ktnuma.launch --detach` in a separate process.

Views are compared byte for byte with the tensors read from the checkpoint with safetensors / gguf
(the upstream way); pointers are dereferenced with ctypes; every refusal is provoked for real
(resized, foreign, missing segments, touched model files, other manifest versions)."""
from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, run_module

torch = pytest.importorskip("torch")

import ktnuma  # noqa: E402
from ktnuma.host import shm  # noqa: E402
from ktnuma.errors import AttachError, ManifestError, SegmentMismatch, SegmentMissing, SourceChanged  # noqa: E402

TWO = str(REPO / "configs/topologies/two-node.toml")
HF = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


@pytest.fixture
def staged(tmp_path, run_registry):
    """staged(model_dir, split, *extra) -> manifest path of a detached run (released afterwards)."""
    made: list[str] = []

    def launch(model: str, split: str = "tp", *extra: str) -> str:
        man = str(tmp_path / f"run{len(made)}.json")
        r = run_module("launch", model, "--topology", TWO, "--split", split, "--detach", "--quiet",
                       "--manifest", man, *extra)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip().splitlines()[-1] == f"ready {man}"
        made.append(man)
        return man

    yield launch
    for man in made:
        if os.path.exists(man):
            with open(man) as f:
                m = json.load(f)
            run_module("release", man)
            shm.unlink_run(m["run_id"], None if shm.is_posix(m["shm_dir"]) else m["shm_dir"])


def _st_bf16(path: str, layer: int, expert: int, proj: str) -> np.ndarray:
    from safetensors import safe_open

    with safe_open(os.path.join(path, "model.safetensors"), framework="pt") as f:
        t = f.get_tensor(f"model.layers.{layer}.mlp.experts.{expert}.{HF[proj]}.weight")
    return t.view(torch.int16).numpy().view("<u2")


def test_ep_views_tensors_torch_and_pointers_match_the_checkpoint(synth_model, staged):
    info = synth_model("bf16", hidden=64, intermediate=128)
    man = staged(info.path, "ep")
    with ktnuma.attach(man) as att:
        assert att.split == "ep" and att.format == "bf16" and att.nodes == (0, 1) and att.layers == (1, 2)
        for layer in att.layers:
            for proj in HF:
                rows = att.pointers(layer, proj, "weight")
                assert len(rows) == 2 and all(len(r) == 8 for r in rows)
                for node, held in ((0, range(0, 4)), (1, range(4, 8))):
                    stacked = att.array(layer, proj, "weight", node)
                    assert stacked.dtype == np.dtype("<u2") and stacked.shape == (4, *_st_bf16(info.path, layer, 0, proj).shape)
                    assert not stacked.flags.writeable
                    for e in range(8):
                        if e not in held:
                            assert rows[node][e] == 0
                            continue
                        want = _st_bf16(info.path, layer, e, proj)
                        assert np.array_equal(stacked[e - held.start], want)
                        assert np.array_equal(att.tensor(layer, e, proj, "weight", node), want)
                        assert ctypes.string_at(rows[node][e], want.nbytes) == want.tobytes()
                        t = att.torch(layer, proj, "weight", node, expert=e)
                        assert t.dtype == torch.bfloat16
                        assert t.view(torch.int16).numpy().view("<u2").tobytes() == want.tobytes()
        with pytest.raises(ktnuma.errors.BadInput, match="not expert 5"):
            att.tensor(1, 5, "gate", "weight", 0)
        with pytest.raises(ktnuma.errors.BadInput, match="no staged array for layer 1, node 0, gate scale"):
            att.array(1, "gate", "scale", 0)


def test_tp_views_are_the_recorded_slices_and_torch_dtypes(synth_model, staged):
    from safetensors import safe_open

    info = synth_model("fp8", hidden=128, intermediate=256)
    man = staged(info.path, "tp")
    with ktnuma.attach(man) as att, safe_open(os.path.join(info.path, "model.safetensors"), framework="pt") as f:
        for proj in HF:
            for node in att.nodes:
                rec = att.record(1, proj, "weight", node)
                dim, lo, hi = rec.slice
                w = att.torch(1, proj, "weight", node)
                assert w.dtype == torch.float8_e4m3fn and tuple(w.shape) == (8, *rec.shape)
                for e in (0, 7):
                    src = f.get_tensor(f"model.layers.1.mlp.experts.{e}.{HF[proj]}.weight")
                    want = src.narrow(dim, lo, hi - lo).contiguous()
                    assert w[e].view(torch.uint8).equal(want.view(torch.uint8))
                    sc = att.tensor(1, e, proj, "scale", node)
                    full = f.get_tensor(f"model.layers.1.mlp.experts.{e}.{HF[proj]}.weight_scale_inv")
                    srec = att.record(1, proj, "scale", node)
                    sd, slo, shi = srec.slice
                    assert sc.dtype == np.float32
                    assert sc.tobytes() == full.narrow(sd, slo, shi - slo).contiguous().numpy().tobytes()
                # tp: every node holds a piece of every expert
                assert all(p != 0 for p in att.pointers(1, proj, "weight")[node])


def test_gguf_views_are_raw_blocks(synth_model, staged):
    import gguf

    info = synth_model("gguf:Q4_K", hidden=256, intermediate=512)
    man = staged(info.path, "ep")
    r = gguf.GGUFReader(info.files[0])
    t = next(t for t in r.tensors if t.name == "blk.1.ffn_down_exps.weight")
    raw = np.asarray(t.data).view(np.uint8).reshape(8, 256, -1)  # [E, rows, row bytes]
    with ktnuma.attach(man) as att:
        a = att.array(1, "down", "weight", 1)
        assert a.dtype == np.uint8 and a.shape == (4, 256, 512 // 256 * 144)
        assert att.record(1, "down", "weight", 1).dtype == "gguf:Q4_K"
        assert np.array_equal(a, raw[4:8])
        assert att.torch(1, "down", "weight", 1).dtype == torch.uint8


def _rss_shmem_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssShmem:"):
                return int(line.split()[1])
    raise AssertionError("no RssShmem")


def test_attach_maps_without_reading_and_close_with_live_views(synth_model, staged):
    info = synth_model("bf16", hidden=512, intermediate=1024, layers=2)  # 2 layers x 8 MiB segments
    man = staged(info.path, "tp")
    size = sum(s["size"] for s in json.load(open(man))["segments"])
    before = _rss_shmem_kb()
    att = ktnuma.attach(man)
    views = [att.array(layer, "down", "weight", n) for layer in att.layers for n in att.nodes]
    grew = (_rss_shmem_kb() - before) * 1024
    assert grew < size / 50, f"attach touched {grew} of {size} bytes"
    tv = att.torch(1, "gate", "weight", 0)
    keep = views[0].copy()
    att.close()  # live views: their mappings stay until they go
    assert np.array_equal(views[0], keep)
    assert tv.float().abs().sum() > 0
    with pytest.raises(ktnuma.errors.KtnumaError, match="closed"):
        att.array(1, "gate", "weight", 0)
    del views, tv
    with ktnuma.attach(man) as att2:  # a view-less close unmaps at once
        att2.array(1, "gate", "weight", 0)
    assert all(s.mm is None for s in att2._segments.values()) and not att2._segments


def test_read_only_by_default_writable_on_request_and_verify(synth_model, staged):
    info = synth_model("gptq-int4", hidden=64, intermediate=64)
    man = staged(info.path, "tp")
    with ktnuma.attach(man, verify=True) as att:
        a = att.array(1, "up", "scale", 1)
        with pytest.raises(ValueError):
            a[0, 0, 0] = 1.0
    with ktnuma.attach(man, writable=True) as att:
        a = att.array(1, "up", "scale", 1)
        a[0, 0, 0] = np.float32(a[0, 0, 0] * 2 + 1)
        del a
    with pytest.raises(AttachError, match=r"layer 1 up scale expert 0 differs from the source"):
        ktnuma.attach(man, verify=True)


def test_refusals_name_the_manifest_and_reason(synth_model, staged, tmp_path):
    info = synth_model("bf16", hidden=64, intermediate=64)
    man = staged(info.path, "ep")
    m = json.load(open(man))
    seg = m["segments"][1]["name"]
    path = shm.segment_path(seg)

    bad = dict(m, ktnuma_manifest=2)
    other = tmp_path / "v2.json"
    other.write_text(json.dumps(bad))
    with pytest.raises(ManifestError, match="manifest version 2, this ktnuma reads 1"):
        ktnuma.attach(str(other))

    os.truncate(path, m["segments"][1]["size"] + 4096)
    with pytest.raises(SegmentMismatch, match=rf"{seg} has \d+ bytes, the manifest records {m['segments'][1]['size']}"):
        ktnuma.attach(man)
    os.truncate(path, m["segments"][1]["size"])

    os.chown(path, 4321, -1)
    try:
        with pytest.raises(SegmentMismatch, match=f"{seg} is owned by uid 4321"):
            ktnuma.attach(man)
    finally:
        os.chown(path, os.getuid(), -1)

    st = os.stat(info.files[0])
    os.utime(info.files[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    try:
        with pytest.raises(SourceChanged, match="changed since staging"):
            ktnuma.attach(man)
        with ktnuma.attach(man, check_source=False) as att:
            assert att.array(1, "gate", "weight", 1).shape[0] == 4
    finally:
        os.utime(info.files[0], ns=(st.st_atime_ns, st.st_mtime_ns))

    shm.unlink(seg)
    with pytest.raises(SegmentMissing, match=f"{man}: segment {seg} does not exist"):
        ktnuma.attach(man)
    assert SegmentMissing.exit_code == 2


def test_second_attach_from_another_process_after_the_first_exits(synth_model, staged):
    info = synth_model("bf16", hidden=64, intermediate=64)
    man = staged(info.path, "tp")
    code = ("import sys, ktnuma; a = ktnuma.attach(sys.argv[1]); "
            "print(int(a.array(2, 'down', 'weight', 1).astype('i8').sum())); a.close()")
    outs = [subprocess.run([sys.executable, "-c", code, man], capture_output=True, text=True, check=True,
                           timeout=60).stdout for _ in range(2)]
    with ktnuma.attach(man) as att:
        here = int(att.array(2, "down", "weight", 1).astype("i8").sum())
    assert outs[0] == outs[1] == f"{here}\n"
