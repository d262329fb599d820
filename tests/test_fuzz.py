"""Fuzz tests (issue 16): thousands of random edits of a real manifest against `ktnuma.attach`, and
random mutations of a real GGUF header against the GGUF reader.

Manifest: each edit is either refused with a named ktnuma error (exit 2) or attaches, and then the
test itself checks that every view and every pointer lies inside the mapping of the segment its
record names (the bounds come from the mappings, not from ktnuma's validation). GGUF: each mutated
file either indexes, with every tensor's bytes inside the file, or raises a FormatError, within a
time bound, never another exception and never a hang.
"""
from __future__ import annotations

import copy
import json
import os
import random
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import REPO, run_module

TWO = os.path.join(REPO, "configs/topologies/two-node.toml")
EDITS = int(os.environ.get("KTNUMA_FUZZ_EDITS", "3000"))


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """A real detached ep+tp-mixed run (bf16, two simulated nodes), released at the end."""
    from ktnuma.tools.synth import write_model

    d = tmp_path_factory.mktemp("fuzz")
    reg = d / "registry"
    old = os.environ.get("KTNUMA_REGISTRY_DIR")
    os.environ["KTNUMA_REGISTRY_DIR"] = str(reg)
    info = write_model(d / "model", "bf16")
    man = d / "run.json"
    r = run_module("launch", "--topology", TWO, "--detach", "--quiet", "--manifest", str(man), info.path)
    assert r.returncode == 0, r.stderr
    yield man, json.loads(man.read_text())
    run_module("release", str(man))
    if old is None:
        os.environ.pop("KTNUMA_REGISTRY_DIR", None)
    else:
        os.environ["KTNUMA_REGISTRY_DIR"] = old


def _paths(obj, prefix=()):
    """Every (path, value) in a JSON value."""
    yield prefix, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _values(rng: random.Random, m: dict, old):
    sizes = [s["size"] for s in m["segments"]]
    ints = [-1, 0, 1, 2, 3, 7, 63, 64, 4096, 2**31, 2**63, 2**64 + 1, -2**63, rng.choice(sizes),
            rng.choice(sizes) + 1, rng.choice(sizes) - 1, m["config"]["num_experts"]]
    if isinstance(old, int) and not isinstance(old, bool):
        ints += [old + 1, old - 1, old * 2, old + rng.choice(sizes), -old]
    other = rng.choice(m["segments"])["name"]
    return ints + [None, True, False, 0.5, 1e308, "", "\0", "/", "..", "../x", other, other + "\0",
                   "ktnuma." + "f" * 16 + ".L1.n0", "gguf:Q4_K", "bf16", "f32", "u8", [], {}, [0], [1, 1],
                   [0, 2**40], {"dim": 0, "start": 0, "stop": 1}, "x" * 300]


def _mutate(rng: random.Random, m: dict) -> dict:
    x = copy.deepcopy(m)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        paths = [p for p, _ in _paths(x) if p]
        path = rng.choice(paths)
        parent = x
        for k in path[:-1]:
            parent = parent[k]
        key = path[-1]
        op = rng.random()
        if op < 0.1 and isinstance(parent, dict):
            del parent[key]
        elif op < 0.15 and isinstance(parent, list):
            parent.append(copy.deepcopy(parent[key]))  # a duplicate record
        elif op < 0.2 and isinstance(parent, list) and len(parent) > 1:
            j = rng.randrange(len(parent))
            parent[key], parent[j] = parent[j], parent[key]
        else:
            parent[key] = rng.choice(_values(rng, m, parent[key]))
    return x


def _check_inside(att) -> int:
    """Every array view and pointer of an attached run lies inside its record's segment mapping."""
    import numpy as np

    checked = 0
    segs = att._segments
    for layer in att.layers:
        for r in att.records(layer):
            seg = segs[r.segment]
            lo, hi = seg.address, seg.address + seg.size
            a = att.array(layer, r.proj, r.kind, r.node)
            start = a.__array_interface__["data"][0]
            assert lo <= start and start + a.nbytes <= hi, (r, lo, hi)
            assert a.shape[0] == r.count and isinstance(a, np.ndarray)
            for e in (r.first, r.first + r.count - 1):
                t = att.tensor(layer, e, r.proj, r.kind, r.node)
                ts = t.__array_interface__["data"][0]
                assert lo <= ts and ts + t.nbytes <= hi
            rows = att.pointers(layer, r.proj, r.kind)
            for node, row in zip(att.nodes, rows):
                if node != r.node:
                    continue
                assert len(row) == att.num_experts
                for e, p in enumerate(row):
                    if p:
                        assert e in r.experts and lo <= p and p + r.nbytes <= hi, (e, p, lo, hi)
                        checked += 1
    return checked


def test_fuzz_manifest_edits_against_attach(real_run, tmp_path):
    import ktnuma
    from ktnuma.errors import KtnumaError

    man, m = real_run
    rng = random.Random(16)
    bad = tmp_path / "edited.json"
    refused = attached = pointers = 0
    for i in range(EDITS):
        x = _mutate(rng, m)
        bad.write_text(json.dumps(x))
        try:
            att = ktnuma.attach(str(bad), check_source=rng.random() < 0.2)
        except KtnumaError as exc:
            assert exc.exit_code == 2, (i, type(exc), exc)
            assert str(bad) in str(exc) or "segment" in str(exc), (i, exc)
            refused += 1
            continue
        with att:
            pointers += _check_inside(att)
        attached += 1
    print(f"\nmanifest fuzz: {EDITS} edits, {refused} refused by name, {attached} attached "
          f"({pointers} pointers checked inside their mappings)")
    assert refused > EDITS // 2 and attached > 0
    with ktnuma.attach(str(man)) as att:  # the real one, untouched
        assert _check_inside(att) > 0


# ------------------------------------------------------------------ GGUF headers

@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory) -> bytes:
    from ktnuma.tools.synth import write_model

    d = tmp_path_factory.mktemp("gguf")
    info = write_model(d / "m", "gguf:Q8_0", layers=2, experts=2, hidden=64, intermediate=64)
    (path,) = [os.path.join(info.path, n) for n in os.listdir(info.path) if n.endswith(".gguf")]
    return open(path, "rb").read()


def _header_len(data: bytes) -> int:
    """Bytes up to the end of the tensor infos (where mutations matter)."""
    from ktnuma.index.gguf import read_file  # noqa: F401 (the walker below mirrors the format)

    pos = 4 + 4
    n_t, n_kv = struct.unpack_from("<QQ", data, pos)
    pos += 16
    scal = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

    def val(t):
        nonlocal pos
        if t in scal:
            pos += scal[t]
        elif t == 8:
            (n,) = struct.unpack_from("<Q", data, pos)
            pos += 8 + n
        else:
            et, n = struct.unpack_from("<IQ", data, pos)
            pos += 12
            for _ in range(n):
                val(et)

    for _ in range(n_kv):
        (n,) = struct.unpack_from("<Q", data, pos)
        pos += 8 + n
        (t,) = struct.unpack_from("<I", data, pos)
        pos += 4
        val(t)
    for _ in range(n_t):
        (n,) = struct.unpack_from("<Q", data, pos)
        pos += 8 + n
        (nd,) = struct.unpack_from("<I", data, pos)
        pos += 4 + 8 * nd + 4 + 8
    return pos


@settings(max_examples=400, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_gguf_header_mutations_raise_only_format_errors(gguf_bytes, tmp_path_factory, data):
    from ktnuma.errors import FormatError
    from ktnuma.index.gguf import read_file

    raw = bytearray(gguf_bytes)
    end = _header_len(gguf_bytes)
    kind = data.draw(st.sampled_from(["u64", "u32", "byte", "truncate", "count"]))
    pos = data.draw(st.integers(4, end - 8))
    if kind == "u64":
        struct.pack_into("<Q", raw, pos, data.draw(st.sampled_from([0, 1, 2**32, 2**60, 2**64 - 1,
                                                                    len(raw), len(raw) * 2])))
    elif kind == "u32":
        struct.pack_into("<I", raw, pos, data.draw(st.integers(0, 2**32 - 1)))
    elif kind == "byte":
        raw[pos] = data.draw(st.integers(0, 255))
    elif kind == "truncate":
        raw = raw[:pos]
    else:  # the count fields right after the magic and version
        struct.pack_into("<Q", raw, data.draw(st.sampled_from([8, 16])), data.draw(st.sampled_from(
            [0, 1, 10**6, 2**40, 2**60])))
    p = tmp_path_factory.mktemp("g") / "model.gguf"
    p.write_bytes(bytes(raw))
    t0 = time.monotonic()
    try:
        extents, _meta = read_file(str(p), 0)
    except FormatError as exc:
        assert str(p) in str(exc)
    else:
        for e in extents:
            assert 0 <= e.offset and e.offset + e.nbytes <= len(raw), e
    assert time.monotonic() - t0 < 5
