"""Hostile and malformed safetensors inputs: each its own named error, naming file, tensor, numbers."""
from __future__ import annotations

import json
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ktnuma import errors as E
from ktnuma.index.safetensors import HEADER_CAP, read_file, shard_paths


def write_st(path, header: dict | bytes, data: bytes = b"", declared_len: int | None = None) -> str:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw) if declared_len is None else declared_len
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", n) + raw + data)
    return str(path)


def good_header() -> dict:
    return {
        "a": {"dtype": "BF16", "shape": [2, 4], "data_offsets": [0, 16]},
        "b": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]},
    }


def test_good_file_absolute_offsets(tmp_path):
    p = write_st(tmp_path / "m.safetensors", good_header(), bytes(range(32)))
    exts, _ = read_file(p, 0)
    hdr_len = len(json.dumps(good_header()).encode())
    by = {e.name: e for e in exts}
    assert by["a"].offset == 8 + hdr_len and by["a"].nbytes == 16 and by["a"].dtype == "bf16"
    assert by["b"].offset == 8 + hdr_len + 16 and by["b"].shape == (4,)
    raw = open(p, "rb").read()
    assert raw[by["b"].offset : by["b"].offset + 16] == bytes(range(16, 32))


def test_every_safetensors_dtype_is_known(tmp_path):
    sizes = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
             "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
    hdr, off = {}, 0
    for i, (dt, sz) in enumerate(sizes.items()):
        hdr[f"t{i}"] = {"dtype": dt, "shape": [3], "data_offsets": [off, off + 3 * sz]}
        off += 3 * sz
    exts, _ = read_file(write_st(tmp_path / "m.safetensors", hdr, bytes(off)), 0)
    assert len(exts) == len(sizes)


@pytest.mark.parametrize(
    "case, make, err, words",
    [
        ("truncated", lambda p: open(p, "wb").write(b"\x01\x02"), E.TruncatedFile, ["2 bytes"]),
        ("beyond", lambda p: write_st(p, good_header(), bytes(32), declared_len=10_000), E.HeaderOutOfBounds, ["10000"]),
        ("cap", lambda p: write_st(p, b"{}", declared_len=HEADER_CAP + 1), E.HeaderTooLarge, [str(HEADER_CAP + 1)]),
        ("json", lambda p: write_st(p, b"{not json", bytes(8)), E.InvalidHeaderJSON, ["JSON"]),
        ("notobj", lambda p: write_st(p, b"[1, 2]"), E.InvalidHeaderJSON, ["list"]),
        ("dtype", lambda p: write_st(p, {"x": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 1]}}, b"\0"),
         E.UnknownDtype, ["'x'", "Q9"]),
        ("shape", lambda p: write_st(p, {"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8)),
         E.ShapeMismatch, ["'x'", "12", "8"]),
        ("outside", lambda p: write_st(p, {"x": {"dtype": "U8", "shape": [64], "data_offsets": [0, 64]}}, bytes(8)),
         E.OffsetsOutOfBounds, ["'x'", "64", "8-byte"]),
        ("backwards", lambda p: write_st(p, {"x": {"dtype": "U8", "shape": [0], "data_offsets": [8, 0]}}, bytes(8)),
         E.OffsetsOutOfBounds, ["'x'"]),
        ("overlap", lambda p: write_st(p, {"x": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]},
                                           "y": {"dtype": "U8", "shape": [8], "data_offsets": [4, 12]}}, bytes(12)),
         E.OverlappingTensors, ["'x'", "'y'"]),
        ("badshape", lambda p: write_st(p, {"x": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 1]}}, b"\0"),
         E.InvalidHeaderJSON, ["'x'", "shape"]),
    ],
)
def test_malformed(tmp_path, case, make, err, words):
    p = str(tmp_path / f"{case}.safetensors")
    make(p)
    with pytest.raises(err) as ei:
        read_file(p, 0)
    msg = str(ei.value)
    assert p in msg
    for w in words:
        assert w in msg, (w, msg)
    assert isinstance(ei.value, E.FormatError) and ei.value.exit_code == 2


def test_unreadable_file(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads every file")
    p = write_st(tmp_path / "m.safetensors", good_header(), bytes(32))
    os.chmod(p, 0)
    with pytest.raises(E.FormatError, match="cannot read"):
        read_file(p, 0)


@pytest.mark.parametrize("bad", ["/etc/passwd", "../outside.safetensors", "sub/../../x.safetensors"])
def test_index_refuses_unsafe_shard_paths(tmp_path, bad):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": bad}}))
    with pytest.raises(E.UnsafeShardPath, match="absolute or leaves"):
        shard_paths(str(tmp_path))


def test_index_lists_shards(tmp_path):
    for n in ("a.safetensors", "b.safetensors"):
        write_st(tmp_path / n, good_header(), bytes(32))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "b.safetensors", "y": "a.safetensors"}}))
    assert [os.path.basename(p) for p in shard_paths(str(tmp_path))] == ["a.safetensors", "b.safetensors"]


# ------------------------------------------------------------------ fuzzing
_BASE = json.dumps(good_header()).encode()


@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.data(),
    kind=st.sampled_from(["flip", "truncate", "insert", "length"]),
)
def test_fuzz_header_mutations_raise_only_format_errors(tmp_path_factory, data, kind):
    blob = bytearray(struct.pack("<Q", len(_BASE)) + _BASE + bytes(range(32)))
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(blob) - 1))
            blob[i] = data.draw(st.integers(0, 255))
    elif kind == "truncate":
        blob = blob[: data.draw(st.integers(0, len(blob)))]
    elif kind == "insert":
        i = data.draw(st.integers(8, len(blob)))
        blob[i:i] = data.draw(st.binary(min_size=1, max_size=16))
    else:
        blob[0:8] = struct.pack("<Q", data.draw(st.integers(0, 2**64 - 1)))
    p = tmp_path_factory.mktemp("fz") / "f.safetensors"
    p.write_bytes(bytes(blob))
    try:
        exts, _ = read_file(str(p), 0)
    except E.FormatError as e:
        assert str(p) in str(e)
        return
    size = len(blob)
    for e in exts:  # whatever parses must lie inside the file
        assert 0 <= e.offset and e.offset + e.nbytes <= size
