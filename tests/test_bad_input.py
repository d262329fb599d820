"""Bad input through the real CLI (issue 7): every case is `python -m ktnuma.launch` on a broken model
(or bad flags) and must give exit 2, exactly ONE line on stderr naming the file, the tensor (where one
is involved) and the reason, no traceback, nothing on stdout, no segment of this session in /dev/shm,
no manifest and no registry entry.

The reader-level details (error classes, numbers) live in test_safetensors_reader.py / test_index.py;
this file checks what a user sees. The fuzzing additions (allocation bound, hang guard) are at the end.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import SESSION_TAG, run_module

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWO = os.path.join(REPO, "configs/topologies/two-node.toml")
FOUR = os.path.join(REPO, "configs/topologies/four-node.toml")
GATE0 = "model.layers.1.mlp.experts.0.gate_proj.weight"


# ------------------------------------------------------------------ helpers to break files

def st_read(path) -> tuple[dict, bytes]:
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def st_write(path, header: dict | bytes, data: bytes, declared: int | None = None) -> None:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h) if declared is None else declared) + h + data)


def copy_model(info, dst) -> str:
    shutil.copytree(info.path, dst)
    return str(dst)


def only_st(d) -> str:
    files = [f for f in os.listdir(d) if f.endswith(".safetensors")]
    assert len(files) == 1
    return os.path.join(d, files[0])


def edit_header(d, fn) -> str:
    """Apply fn(header, data) -> (header, data[, declared length]) to the model's only shard."""
    p = only_st(d)
    h, data = st_read(p)
    st_write(p, *fn(h, data))
    return p


def _set(h, name, **kw):
    h[name] = {**h[name], **kw}
    return h


def _gguf_type_pos(path: str, tensor: str) -> int:
    """Byte position of `tensor`'s ggml type field in a GGUF header (name, n_dims, dims, TYPE, offset)."""
    raw = open(path, "rb").read()
    key = struct.pack("<Q", len(tensor)) + tensor.encode()
    i = raw.index(key) + len(key)
    (ndims,) = struct.unpack_from("<I", raw, i)
    return i + 4 + 8 * ndims


# ------------------------------------------------------------------ the cases
# each builder(synth_model, tmp_path) -> (model path, extra args, words the one line must hold)

def b_truncated(sm, t):
    d = copy_model(sm("bf16"), t / "m")
    p = only_st(d)
    os.truncate(p, 5)
    return d, [], [p, "5 bytes"]


def b_truncated_data(sm, t):
    d = copy_model(sm("bf16"), t / "m")
    p = only_st(d)
    os.truncate(p, os.path.getsize(p) - 1000)  # header intact, last tensors cut short
    return d, [], [p, "run past", "tensor '"]


def b_header_beyond(sm, t):
    d = copy_model(sm("bf16"), t / "m")
    n = os.path.getsize(only_st(d)) + 1000  # under the cap, beyond the file
    p = edit_header(d, lambda h, data: (h, data, n))
    return d, [], [p, str(n), "past the end"]


def b_header_cap(sm, t):
    d = copy_model(sm("bf16"), t / "m")
    p = edit_header(d, lambda h, data: (h, data, 2 ** 40))
    return d, [], [p, str(2 ** 40), "cap"]


def b_invalid_json(sm, t):
    d = copy_model(sm("bf16"), t / "m")
    p = edit_header(d, lambda h, data: (json.dumps(h).encode()[:-2] + b"  ", data))
    return d, [], [p, "JSON"]


def b_unknown_dtype(sm, t):
    d = copy_model(sm("bf16"), t / "m")
    p = edit_header(d, lambda h, data: (_set(h, GATE0, dtype="BF17"), data))
    return d, [], [p, GATE0, "BF17"]


def b_shape_bytes(sm, t):
    d = copy_model(sm("bf16"), t / "m")

    def fn(h, data):
        shape = h[GATE0]["shape"]
        return _set(h, GATE0, shape=[shape[0] + 1, shape[1]]), data
    p = edit_header(d, fn)
    return d, [], [p, GATE0, "data_offsets span"]


def b_overlap(sm, t):
    d = copy_model(sm("bf16"), t / "m")
    other = "model.layers.1.mlp.experts.1.gate_proj.weight"

    def fn(h, data):
        a, b = h[GATE0]["data_offsets"], h[other]["data_offsets"]
        return _set(h, other, data_offsets=[a[0], a[0] + b[1] - b[0]]), data  # same bytes as GATE0
    p = edit_header(d, fn)
    return d, [], [p, "overlap", "tensor 'model.layers.1.mlp.experts."]


def b_outside(sm, t):
    d = copy_model(sm("bf16"), t / "m")

    def fn(h, data):
        a = h[GATE0]["data_offsets"]
        n = a[1] - a[0]
        return _set(h, GATE0, data_offsets=[len(data) - n // 2, len(data) - n // 2 + n]), data
    p = edit_header(d, fn)
    return d, [], [p, GATE0, "data section"]


def _drop_tensors(d, pred):
    p = only_st(d)
    h, data = st_read(p)
    h = {k: v for k, v in h.items() if not pred(k)}
    st_write(p, h, data)  # the dropped bytes become unreferenced padding: legal
    return p


def b_missing_expert(sm, t):
    d = copy_model(sm("bf16"), t / "m")
    _drop_tensors(d, lambda k: ".experts.3." in k and k.startswith("model.layers.2."))
    return d, [], [d, "layer 2", "expert 3"]


def b_missing_projection(sm, t):
    d = copy_model(sm("bf16"), t / "m")
    _drop_tensors(d, lambda k: k.startswith("model.layers.1.") and "experts." in k and "down_proj" in k)
    return d, [], [d, "layer 1", "down"]


def b_inconsistent_shapes(sm, t):
    d = copy_model(sm("bf16"), t / "m")
    name = "model.layers.1.mlp.experts.5.up_proj.weight"

    def fn(h, data):  # half the rows, same dtype: a self-consistent but different shape
        a, shape = h[name]["data_offsets"], h[name]["shape"]
        return _set(h, name, shape=[shape[0] // 2, shape[1]],
                    data_offsets=[a[0], a[0] + (a[1] - a[0]) // 2]), data
    p = edit_header(d, fn)
    return d, [], [p, "experts.5.up_proj", "shape"]


def b_config_disagrees(sm, t):
    d = copy_model(sm("bf16"), t / "m")
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["moe_intermediate_size"] = cfg["moe_intermediate_size"] * 2
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    return d, [], [d, "moe_intermediate_size", str(cfg["moe_intermediate_size"])]


def b_gguf_magic(sm, t):
    d = copy_model(sm("gguf:Q8_0"), t / "m")
    p = os.path.join(d, os.listdir(d)[0])
    with open(p, "r+b") as f:
        f.write(b"GGUX")
    return d, [], [p, "magic", "GGUX"]


def b_gguf_truncated_data(sm, t):
    d = copy_model(sm("gguf:Q8_0"), t / "m")
    p = os.path.join(d, os.listdir(d)[0])
    os.truncate(p, os.path.getsize(p) - 4096)
    return d, [], [p, "runs past the end", "tensor '"]


def b_gguf_unknown_type(sm, t):
    d = copy_model(sm("gguf:Q8_0"), t / "m")
    p = os.path.join(d, os.listdir(d)[0])
    name = "blk.1.ffn_up_exps.weight"
    with open(p, "r+b") as f:
        f.seek(_gguf_type_pos(p, name))
        f.write(struct.pack("<I", 77))
    return d, [], [p, name, "77"]


def b_gptq_desc_act(sm, t):
    info = sm("gptq-int4", variant="desc_act")
    return info.path, [], [os.path.join(info.path, "config.json"), "desc_act=true"]


def b_gptq_asym(sm, t):
    info = sm("gptq-int4", variant="asym")
    return info.path, [], [os.path.join(info.path, "config.json"), "sym=false"]


def b_rawint4_asym(sm, t):
    info = sm("rawint4", variant="asym")
    return info.path, [], [info.files[0], "weight_zero_point", "tensor '"]


def b_presharded_other_count(sm, t):
    info = sm("amx-int4", numa_shards=4)  # made for 4 nodes, staged onto 2
    return info.path, [], [info.path, "4", "2"]


def b_misaligned_tp(sm, t):
    info = sm("gguf:Q4_K")  # I = 256 over 2 nodes = 128, not a multiple of the 256-weight Q4_K block
    return info.path, [], [info.path, "256", "128", "--split ep"]


def b_misaligned_rawint4(sm, t):
    info = sm("rawint4", intermediate=96)  # 96 / 2 = 48: not a multiple of lcm(8, 32)
    return info.path, [], [info.path, "48", "32"]


def b_empty_dir(sm, t):
    (t / "empty").mkdir()
    return str(t / "empty"), [], [str(t / "empty"), "no .safetensors or .gguf"]


def b_missing_dir(sm, t):
    return str(t / "nope"), [], [str(t / "nope"), "does not exist"]


def b_layers_out_of_range(sm, t):
    info = sm("bf16")
    return info.path, ["--layers", "1-40"], ["--layers", info.path]


def b_layers_garbage(sm, t):
    info = sm("bf16")
    return info.path, ["--layers", "1-x"], ["--layers", "1-x"]


def b_nodes_zero(sm, t):
    return sm("bf16").path, ["--nodes", "0"], ["--nodes"]


def b_nodes_over_topology(sm, t):
    return sm("bf16").path, ["--nodes", "3"], ["--nodes 3", "two-node.toml"]


def b_nodes_no_simulate(sm, t):
    return sm("bf16").path, ["--nodes", "2", "--no-simulate", "--topology", None], ["--no-simulate"]


CASES = {f.__name__[2:]: f for f in [
    b_truncated, b_truncated_data, b_header_beyond, b_header_cap, b_invalid_json, b_unknown_dtype,
    b_shape_bytes, b_overlap, b_outside, b_missing_expert, b_missing_projection, b_inconsistent_shapes,
    b_config_disagrees, b_gguf_magic, b_gguf_truncated_data, b_gguf_unknown_type, b_gptq_desc_act,
    b_gptq_asym, b_rawint4_asym, b_presharded_other_count, b_misaligned_tp, b_misaligned_rawint4,
    b_empty_dir, b_missing_dir, b_layers_out_of_range, b_layers_garbage, b_nodes_zero,
    b_nodes_over_topology, b_nodes_no_simulate]}


def _session_segments() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith(f"ktnuma.{SESSION_TAG}")}


def _entries(reg) -> list[str]:
    return sorted(p for p in os.listdir(reg) if p.endswith(".json")) if os.path.isdir(reg) else []


def assert_refused(r, words, man, reg, before) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr  # ONE line, whatever else happened
    line = lines[0]
    assert line.startswith("ktnuma launch: error: ") and "Traceback" not in r.stderr, line
    for w in words:
        assert str(w) in line, (w, line)
    assert r.stdout == ""
    assert _session_segments() == before and not os.path.exists(man) and _entries(reg) == []
    return line


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exit_2_one_line(case, synth_model, run_registry, tmp_path):
    model, extra, words = CASES[case](synth_model, tmp_path)
    if "--topology" not in extra:
        extra = ["--topology", TWO, *extra]
    extra = [a for a in extra if a is not None]
    if extra[-1] == "--topology":  # b_nodes_no_simulate: no topology file (real nodes only)
        extra = extra[:-1]
    extra = [a for i, a in enumerate(extra) if not (a == "--topology" and i + 1 < len(extra) and extra[i + 1] == "--topology")]
    man = tmp_path / "m.json"
    before = _session_segments()
    r = run_module("launch", "--manifest", str(man), *extra, model, timeout=60)
    assert_refused(r, words, man, run_registry, before)


def test_unreadable_file(synth_model, run_registry, tmp_path):
    """We run as root, which reads everything: launch without the capabilities that let root ignore file
    modes (setpriv drops CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH; uid 65534 cannot reach this python under
    /root), on a copy whose second shard is mode 0000."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv")
    d = tmp_path / "model"
    shutil.copytree(synth_model("bf16", shards=2).path, d)
    victim = str(d / sorted(n for n in os.listdir(d) if n.endswith(".safetensors"))[1])
    os.chmod(victim, 0)
    man = tmp_path / "m.json"
    before = _session_segments()
    r = subprocess.run(["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search",
                        sys.executable, "-m", "ktnuma.launch", "--topology", TWO, "--manifest", str(man), str(d)],
                       capture_output=True, text=True, timeout=60)
    line = assert_refused(r, [victim, "ermission"], man, run_registry, before)
    assert "cannot read" in line


# ------------------------------------------------------------------ fuzzing additions
# test_safetensors_reader.test_fuzz_header_mutations_raise_only_format_errors checks the error
# classes; here: a mutated header never makes the reader allocate more than the file holds, and
# never hangs (an alarm fires if one parse takes over 5 s).

_BASE_HDR = {f"model.layers.1.mlp.experts.{e}.{p}.weight": {"dtype": "BF16", "shape": [4, 8],
                                                             "data_offsets": [64 * (3 * e + i), 64 * (3 * e + i + 1)]}
             for e in range(4) for i, p in enumerate(("gate_proj", "up_proj", "down_proj"))}
_BASE = json.dumps(_BASE_HDR).encode()
_SLACK = 256 << 10  # bytes: json objects of a few hundred bytes of header, dicts, TensorExtents


class _Hang(Exception):
    pass


def _alarm(signum, frame):  # noqa: ARG001
    raise _Hang()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), kind=st.sampled_from(["flip", "truncate", "insert", "length", "bigshape", "bigoffset"]))
def test_fuzz_parser_allocation_bounded_and_never_hangs(tmp_path_factory, data, kind):
    from ktnuma.errors import FormatError
    from ktnuma.index.safetensors import read_file

    blob = bytearray(struct.pack("<Q", len(_BASE)) + _BASE + bytes(64 * 12))
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    elif kind == "truncate":
        blob = blob[: data.draw(st.integers(0, len(blob)))]
    elif kind == "insert":
        i = data.draw(st.integers(8, len(blob)))
        blob[i:i] = data.draw(st.binary(min_size=1, max_size=16))
    elif kind == "length":  # any declared header length, up to 2**64 - 1
        blob[0:8] = struct.pack("<Q", data.draw(st.integers(0, 2 ** 64 - 1)))
    else:  # claim a huge tensor: the reader must not try to hold it
        h = json.loads(_BASE)
        big = data.draw(st.integers(2 ** 31, 2 ** 62))
        if kind == "bigshape":
            h[next(iter(h))]["shape"] = [big, 8]
        else:
            h[next(iter(h))]["data_offsets"] = [0, big]
        raw = json.dumps(h).encode()
        blob = bytearray(struct.pack("<Q", len(raw)) + raw + bytes(64 * 12))
    p = tmp_path_factory.mktemp("fa") / "f.safetensors"
    ok = p.with_name("ok.safetensors")
    ok.write_bytes(struct.pack("<Q", len(_BASE)) + _BASE + bytes(64 * 12))
    read_file(str(ok), 0)  # the reader's lazy imports happen here, not inside the measured call
    p.write_bytes(bytes(blob))
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, 5.0)
    tracemalloc.start()
    try:
        read_file(str(p), 0)
    except FormatError as e:
        assert str(p) in str(e)
    except _Hang:
        pytest.fail(f"read_file hung on a {kind} mutation")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak <= len(blob) + _SLACK, (kind, peak, len(blob))


def test_declared_header_below_cap_but_beyond_file_allocates_nothing(tmp_path):
    """A 99 MB header length (under the 100 MB cap) on a 100-byte file: refused before any read."""
    from ktnuma.errors import HeaderOutOfBounds
    from ktnuma.index.safetensors import read_file

    p = tmp_path / "f.safetensors"
    st_write(p, b"{}" + bytes(90), b"", declared=99 * 2 ** 20)
    tracemalloc.start()
    try:
        with pytest.raises(HeaderOutOfBounds):
            read_file(str(p), 0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 << 10, peak
