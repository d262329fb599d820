"""ktnuma.tools.synth and ktnuma.tools.st_write: models of every format, read back with the upstream readers.

Expected names, dtypes and shapes are spelled out here from the design's formats table, independently of
synth's own tables, so that a wrong template in synth fails these tests.
"""
from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open

from ktnuma.tools import synth
from ktnuma.tools.st_write import StTensor, header_bytes, write_safetensors

H, I, E, LAYERS = 256, 256, 4, 2
SMALL = {"hidden": H, "intermediate": I, "experts": E, "layers": LAYERS}
MOE = (1, 2)
PROJ_HF = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
PROJ_W = {"gate": "w1", "up": "w3", "down": "w2"}


def nk(proj: str) -> tuple[int, int]:
    return (H, I) if proj == "down" else (I, H)


# ---------------------------------------------------------------- expected routed tensors per format
# name -> (safetensors dtype, shape)


def per_expert(stem: str, projs: dict[str, str], leaves) -> dict[str, tuple[str, tuple[int, ...]]]:
    out = {}
    for L in MOE:
        for e in range(E):
            for proj, pname in projs.items():
                n, k = nk(proj)
                for suffix, dtype, shape in leaves(n, k):
                    out[f"{stem.format(L=L, e=e, p=pname)}.{suffix}"] = (dtype, shape)
    return out


def exp_bf16(n, k):
    return [("weight", "BF16", (n, k))]


DS = "model.layers.{L}.mlp.experts.{e}.{p}"
EXPECTED = {
    ("bf16", "deepseek"): per_expert(DS, PROJ_HF, exp_bf16),
    ("bf16", "mixtral"): per_expert("model.layers.{L}.block_sparse_moe.experts.{e}.{p}", PROJ_W, exp_bf16),
    ("bf16", "mistral"): per_expert("layers.{L}.experts.{e}.{p}", PROJ_W, exp_bf16),
    ("bf16", "qwen-packed"): {
        **{f"model.language_model.layers.{L}.mlp.experts.gate_up_proj": ("BF16", (E, 2 * I, H)) for L in MOE},
        **{f"model.language_model.layers.{L}.mlp.experts.down_proj": ("BF16", (E, H, I)) for L in MOE}},
    ("fp8", "deepseek"): per_expert(DS, PROJ_HF, lambda n, k: [
        ("weight", "F8_E4M3", (n, k)), ("weight_scale_inv", "F32", (n // 128, k // 128))]),
    ("fp8-channel", "deepseek"): per_expert(DS, PROJ_HF, lambda n, k: [
        ("weight", "F8_E4M3", (n, k)), ("weight_scale", "F32", (n, 1))]),
    ("rawint4", "deepseek"): per_expert(DS, PROJ_HF, lambda n, k: [
        ("weight_packed", "I32", (n, k // 8)), ("weight_scale", "BF16", (n, k // 32))]),
    ("gptq-int4", "deepseek"): per_expert(DS, PROJ_HF, lambda n, k: [
        ("qweight", "I32", (k // 8, n)), ("scales", "F16", (k // 32, n))]),
    ("mxfp4", "deepseek-v4"): per_expert("layers.{L}.ffn.experts.{e}.{p}", PROJ_W, lambda n, k: [
        ("weight", "I8", (n, k // 2)), ("scale", "F8_E8M0", (n, k // 32))]),
}


def amx_expected(bits: int, shards: int = 2):
    out = {}
    per_byte = 8 // bits
    for L in MOE:
        for e in range(E):
            for proj in ("gate", "up", "down"):
                n, k = (H, I // shards) if proj == "down" else (I // shards, H)
                for s in range(shards):
                    out[f"blk.{L}.ffn_{proj}_exps.{e}.numa.{s}.weight"] = ("U8", (n * k // per_byte,))
                    out[f"blk.{L}.ffn_{proj}_exps.{e}.numa.{s}.scale"] = ("F32", (n,))
    return out


EXPECTED[("amx-int4", "amx")] = amx_expected(4)
EXPECTED[("amx-int8", "amx")] = amx_expected(8)

# non-routed tensors each model must contain (one of each kind is enough), per naming
TRAPS = {
    "deepseek": ["model.layers.1.mlp.gate.weight", "model.layers.1.mlp.shared_experts.gate_proj",
                 "model.layers.0.mlp.down_proj", "model.layers.1.self_attn.o_proj.weight",
                 "model.embed_tokens.weight", "model.layers.2.input_layernorm.weight",
                 "model.layers.3.mlp.experts.0.gate_proj"],
    "mixtral": ["model.layers.1.block_sparse_moe.gate.weight", "model.layers.1.mlp.shared_experts.up_proj",
                "model.layers.0.mlp.gate_proj", "model.layers.1.self_attn.o_proj.weight"],
    "mistral": ["layers.1.gate.weight", "layers.1.shared_experts.w1", "layers.0.feed_forward.w2",
                "layers.1.attention.wo.weight"],
    "qwen-packed": ["model.language_model.layers.1.mlp.gate.weight",
                    "model.language_model.layers.1.mlp.shared_expert.gate_proj.weight",
                    "model.language_model.layers.0.mlp.up_proj.weight", "model.visual.blocks.0.attn.proj.weight"],
    "deepseek-v4": ["layers.1.ffn.gate.weight", "layers.1.ffn.shared_experts.w1", "layers.0.ffn.w1",
                    "layers.3.ffn.experts.0.w1.weight"],
    "amx": ["blk.1.ffn_gate_inp.weight", "blk.1.ffn_up_shexp.weight", "blk.0.ffn_gate.weight",
            "blk.1.attn_output.weight", "token_embd.weight"],
}

ST_CASES = [(*key, {}) for key in EXPECTED if key[0] != "fp8-channel"] + [("fp8-channel", "deepseek", {})]


def read_all(path: str) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """name -> (dtype, shape, raw bytes) of every tensor, through safetensors' own reader."""
    d = Path(path)
    files = sorted(d.glob("*.safetensors"))
    index = d / "model.safetensors.index.json"
    if index.exists():
        wm = json.loads(index.read_text())["weight_map"]
        assert sorted(set(wm.values())) == [f.name for f in files]
    out = {}
    for f in files:
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                sl = fh.get_slice(k)
                t = fh.get_tensor(k)
                raw = t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
                assert k not in out
                out[k] = (sl.get_dtype(), tuple(sl.get_shape()), raw)
                if index.exists():
                    assert wm[k] == f.name
    return out


@pytest.mark.parametrize("fmt,naming,kw", ST_CASES, ids=lambda v: v if isinstance(v, str) else "")
def test_safetensors_formats_read_back(tmp_path, fmt, naming, kw):
    info = synth.write_model(tmp_path / "m", fmt, naming=naming, **SMALL, **kw)
    assert info.naming == naming
    tensors = read_all(info.path)
    expected = EXPECTED[(fmt, naming)]
    assert set(info.staged) == set(expected)
    for name, (dtype, shape) in expected.items():
        assert tensors[name][:2] == (dtype, shape), name
    assert info.tensor_count == len(tensors)
    assert info.nbytes == sum(len(t[2]) for t in tensors.values())
    assert info.staged_nbytes == sum(len(tensors[n][2]) for n in expected)
    for trap in TRAPS[naming]:
        hits = [n for n in tensors if n.startswith(trap)]
        assert hits and not set(hits) & set(info.staged), trap
    # nothing outside the expected set looks like a routed expert of a MoE layer
    assert info.moe_layers == MOE
    cfg = json.loads((Path(info.path) / "config.json").read_text())
    assert cfg == info.config


def test_deepseek_config_and_mtp(tmp_path):
    info = synth.write_model(tmp_path / "m", "bf16", **SMALL, experts_per_tok=3)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 3 and info.mtp_layer == 3
    assert cfg["hidden_size"] == H and cfg["moe_intermediate_size"] == I
    assert cfg["intermediate_size"] != I  # DeepSeek: the dense size
    assert (cfg["n_routed_experts"], cfg["num_experts_per_tok"]) == (E, 3)
    tensors = read_all(info.path)
    assert tensors["model.layers.0.mlp.gate_proj.weight"][1] == (cfg["intermediate_size"], H)
    mtp = [n for n in tensors if n.startswith("model.layers.3.mlp.experts.")]
    assert len(mtp) == 3 * E and not set(mtp) & set(info.staged)
    assert not any(n.startswith("model.layers.0.mlp.experts") for n in tensors)
    assert info.manifest_config == {"num_experts": E, "experts_per_tok": 3, "hidden_size": H,
                                    "moe_intermediate_size": I, "layers": [1, 2]}
    no_mtp = synth.write_model(tmp_path / "n", "bf16", **SMALL, mtp=False)
    assert no_mtp.mtp_layer is None
    assert not any(n.startswith("model.layers.3.") for n in read_all(no_mtp.path))


def test_mixtral_and_qwen_configs(tmp_path):
    mix = synth.write_model(tmp_path / "mix", "bf16", naming="mixtral", **SMALL)
    cfg = json.loads((tmp_path / "mix" / "config.json").read_text())
    assert cfg["intermediate_size"] == I and "moe_intermediate_size" not in cfg
    assert cfg["num_local_experts"] == E and mix.mtp_layer is None
    qwen = synth.write_model(tmp_path / "qw", "bf16", naming="qwen-packed", **SMALL)
    cfg = json.loads((tmp_path / "qw" / "config.json").read_text())
    tc = cfg["text_config"]
    assert "num_hidden_layers" not in cfg and tc["num_hidden_layers"] == 3
    assert (tc["num_experts"], tc["moe_intermediate_size"], tc["hidden_size"]) == (E, I, H)
    assert tc["intermediate_size"] != I
    assert qwen.mtp_layer is None


def test_encodings_are_real(tmp_path):
    """Values decode to finite numbers; constant tensors hold what the format defines."""
    bf = read_all(synth.write_model(tmp_path / "bf", "bf16", **SMALL).path)
    w = np.frombuffer(bf["model.layers.1.mlp.experts.0.gate_proj.weight"][2], "<u2")
    x = torch.from_numpy(w.astype(np.int16)).view(torch.bfloat16).float()
    assert torch.isfinite(x).all() and (x != 0).any() and (x < 0).any() and x.abs().max() < 4

    fp = read_all(synth.write_model(tmp_path / "fp", "fp8", **SMALL).path)
    w = np.frombuffer(fp["model.layers.2.mlp.experts.3.down_proj.weight"][2], np.uint8)
    x = torch.from_numpy(w.copy()).view(torch.float8_e4m3fn).float()
    assert torch.isfinite(x).all() and len(np.unique(w)) > 64
    s = np.frombuffer(fp["model.layers.2.mlp.experts.3.down_proj.weight_scale_inv"][2], "<f4")
    assert (s > 0).all() and np.isfinite(s).all()

    ch = read_all(synth.write_model(tmp_path / "ch", "fp8", per_channel=True, variant="1d", **SMALL).path)
    assert ch["model.layers.1.mlp.experts.0.up_proj.weight_scale"][:2] == ("F32", (I,))
    assert ch["model.layers.1.mlp.experts.0.down_proj.weight_scale"][:2] == ("F32", (H,))

    mx = read_all(synth.write_model(tmp_path / "mx", "mxfp4", **SMALL).path)
    sc = np.frombuffer(mx["layers.1.ffn.experts.2.w2.scale"][2], np.uint8)
    assert sc.min() >= 118 and sc.max() <= 130 and len(np.unique(sc)) > 5

    ri = synth.write_model(tmp_path / "ri", "rawint4", **SMALL)
    rt = read_all(ri.path)
    assert np.frombuffer(rt["model.layers.1.mlp.experts.0.down_proj.weight_shape"][2], "<i4").tolist() == [H, I]
    sc = np.frombuffer(rt["model.layers.1.mlp.experts.0.down_proj.weight_scale"][2], "<u2")
    sc = torch.from_numpy(sc.astype(np.int16)).view(torch.bfloat16).float()
    assert torch.isfinite(sc).all() and (sc > 0).all()
    assert not any("weight_zero_point" in n for n in rt)
    weights = ri.config["quantization_config"]["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["group_size"], weights["symmetric"]) == (4, 32, True)

    gq = synth.write_model(tmp_path / "gq", "gptq-int4", **SMALL)
    gt = read_all(gq.path)
    stem = "model.layers.1.mlp.experts.1.up_proj"
    assert gt[f"{stem}.qzeros"][1] == (H // 32, I // 8)
    assert set(np.frombuffer(gt[f"{stem}.qzeros"][2], "<u4").tolist()) == {0x88888888}
    assert np.frombuffer(gt[f"{stem}.g_idx"][2], "<i4").tolist() == [k // 32 for k in range(H)]
    sc = np.frombuffer(gt[f"{stem}.scales"][2], "<f2")
    assert np.isfinite(sc).all() and (sc > 0).all()
    assert {k: gq.config["quantization_config"][k] for k in ("quant_method", "bits", "group_size", "sym",
                                                             "desc_act")} == {
        "quant_method": "gptq", "bits": 4, "group_size": 32, "sym": True, "desc_act": False}


def test_refused_variants_are_written(tmp_path):
    asym = synth.write_model(tmp_path / "a", "rawint4", variant="asym", **SMALL)
    t = read_all(asym.path)
    zp = "model.layers.1.mlp.experts.0.gate_proj.weight_zero_point"
    assert t[zp][:2] == ("I32", (I // 8, H // 32))
    assert asym.config["quantization_config"]["config_groups"]["group_0"]["weights"]["symmetric"] is False
    da = synth.write_model(tmp_path / "d", "gptq-int4", variant="desc_act", group_size=64, **SMALL)
    q = da.config["quantization_config"]
    assert (q["desc_act"], q["sym"], q["group_size"]) == (True, True, 64)
    g = np.frombuffer(read_all(da.path)["model.layers.1.mlp.experts.0.gate_proj.g_idx"][2], "<i4")
    assert sorted(g.tolist()) == [k // 64 for k in range(H)] and g.tolist() != sorted(g.tolist())
    sym = synth.write_model(tmp_path / "s", "gptq-int4", variant="asym", **SMALL)
    assert sym.config["quantization_config"]["sym"] is False
    with pytest.raises(ValueError, match="variant"):
        synth.write_model(tmp_path / "x", "bf16", variant="asym", **SMALL)


def test_determinism(tmp_path):
    def digest(d: Path) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}

    for fmt in ("fp8", "gguf:Q4_K"):
        a = synth.write_model(tmp_path / f"a{fmt}", fmt, seed=7, **SMALL)
        b = synth.write_model(tmp_path / f"b{fmt}", fmt, seed=7, **SMALL)
        c = synth.write_model(tmp_path / f"c{fmt}", fmt, seed=8, **SMALL)
        assert digest(Path(a.path)) == digest(Path(b.path))
        assert digest(Path(a.path)) != digest(Path(c.path))
    # the bytes of a tensor do not depend on sharding
    one = read_all(synth.write_model(tmp_path / "one", "bf16", seed=3, **SMALL).path)
    two = read_all(synth.write_model(tmp_path / "two", "bf16", seed=3, shards=2, **SMALL).path)
    assert one == two
    other = read_all(synth.write_model(tmp_path / "oth", "bf16", seed=4, **SMALL).path)
    name = "model.layers.1.mlp.experts.0.gate_proj.weight"
    assert other[name][2] != one[name][2]


@pytest.mark.parametrize("naming", ["deepseek", "qwen-packed"])
def test_shards_split_a_layer(tmp_path, naming):
    info = synth.write_model(tmp_path / "m", "bf16", naming=naming, shards=2, **SMALL)
    d = Path(info.path)
    assert sorted(p.name for p in d.glob("*.safetensors")) == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    index = json.loads((d / "model.safetensors.index.json").read_text())
    tensors = read_all(info.path)
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == info.nbytes
    files_of_layer: dict[str, set[str]] = {}
    for n in info.staged:
        layer = n.split("layers.")[1].split(".")[0]
        files_of_layer.setdefault(layer, set()).add(index["weight_map"][n])
    assert any(len(f) == 2 for f in files_of_layer.values())


def test_gguf_types_and_metadata(tmp_path):
    info = synth.write_model(tmp_path / "g", "gguf", gguf_types=("Q4_K", "Q6_K"), **SMALL, experts_per_tok=3)
    r = gguf.GGUFReader(info.files[0])
    fields = {f.name: f.contents() for f in r.fields.values()}
    assert fields["general.architecture"] == "deepseek2"
    assert {k: fields[f"deepseek2.{k}"] for k in ("expert_count", "expert_used_count", "embedding_length",
                                                 "expert_feed_forward_length", "block_count")} == {
        "expert_count": E, "expert_used_count": 3, "embedding_length": H, "expert_feed_forward_length": I,
        "block_count": 3}
    ts = {t.name: t for t in r.tensors}
    want = {f"blk.{L}.ffn_{p}_exps.weight": (("Q6_K" if p == "down" else "Q4_K"), nk(p)) for L in MOE
            for p in ("gate", "up", "down")}
    assert set(info.staged) == set(want)
    for name, (tname, (n, k)) in want.items():
        t = ts[name]
        assert t.tensor_type.name == tname
        assert t.shape.tolist() == [k, n, E]  # GGML order
        d = gguf.quants.dequantize(t.data, t.tensor_type)
        assert d.shape == (E, n, k) and np.isfinite(d).all() and np.abs(d).max() < 64 and d.std() > 0
    for trap in ("blk.1.ffn_gate_inp.weight", "blk.1.ffn_down_shexp.weight", "blk.0.ffn_up.weight",
                 "token_embd.weight"):
        assert trap in ts
    assert not any(n.startswith("blk.0.ffn_") and "exps" in n for n in ts)


@pytest.mark.parametrize("t", ["F16", "BF16", "Q8_0", "Q4_K", "Q6_K"])
def test_gguf_each_type(tmp_path, t):
    info = synth.write_model(tmp_path / "g", f"gguf:{t}", **SMALL)
    r = gguf.GGUFReader(info.files[0])
    ts = {x.name: x for x in r.tensors}
    for L in MOE:
        x = ts[f"blk.{L}.ffn_up_exps.weight"]
        assert x.tensor_type.name == t
        d = gguf.quants.dequantize(x.data, x.tensor_type)
        assert d.shape == (E, I, H) and np.isfinite(d).all() and d.std() > 0
        # the raw bytes at the record's absolute offset are the tensor's data
        raw = Path(info.files[0]).read_bytes()[x.data_offset:x.data_offset + x.n_bytes]
        assert raw == np.asarray(x.data).tobytes()


def test_gguf_without_expert_counts(tmp_path):
    info = synth.write_model(tmp_path / "g", "gguf:Q8_0", variant="no-expert-counts", **SMALL)
    fields = {f.name for f in gguf.GGUFReader(info.files[0]).fields.values()}
    assert "deepseek2.expert_count" not in fields and "deepseek2.expert_used_count" not in fields
    assert "deepseek2.expert_feed_forward_length" in fields
    assert info.manifest_config["experts_per_tok"] is None


def test_bench_preset_size_formula():
    est = synth.estimate("bf16", preset="bench")
    b = synth.PRESETS["bench"]
    assert b.layers == 8
    assert est["staged"] == 8 * b.experts * 3 * b.hidden * b.intermediate * 2
    assert abs(est["staged"] - 2 * 2**30) < 0.1 * 2**30
    assert est["total"] < 1.1 * est["staged"]
    tiny = synth.estimate("bf16", preset="tiny")
    assert tiny["total"] < 32 * 2**20


def test_estimate_matches_written(tmp_path):
    info = synth.write_model(tmp_path / "m", "gptq-int4", **SMALL)
    est = synth.estimate("gptq-int4", **SMALL)
    assert (est["total"], est["staged"], est["tensors"]) == (info.nbytes, info.staged_nbytes, info.tensor_count)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown format"):
        synth.write_model(tmp_path, "int3")
    with pytest.raises(ValueError, match="naming"):
        synth.write_model(tmp_path, "mxfp4", naming="mixtral")
    with pytest.raises(ValueError, match="Q4_K block"):
        synth.write_model(tmp_path, "gguf:Q4_K", hidden=128, intermediate=256)
    with pytest.raises(ValueError, match="group_size"):
        synth.write_model(tmp_path, "rawint4", hidden=256, intermediate=48)


def test_cli(tmp_path):
    out = tmp_path / "cli"
    r = subprocess.run([sys.executable, "-m", "ktnuma.synth", str(out), "--format", "gguf:Q4_K",
                        "--layers", "1", "--experts", "2"], capture_output=True, text=True, check=True)
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1 and "format=gguf" in lines[0] and str(out) in lines[0]
    assert (out / "model.gguf").exists()
    r = subprocess.run([sys.executable, "-m", "ktnuma.synth", str(tmp_path / "x"), "--format", "nope"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "unknown format" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "ktnuma.synth", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "gptq-int4" in r.stdout and "--preset" in r.stdout


def test_cli_variant_and_shards(tmp_path):
    out = tmp_path / "c"
    subprocess.run([sys.executable, "-m", "ktnuma.synth", str(out), "--format", "fp8-channel", "--shards", "2",
                    "--layers", "1", "--experts", "2", "--no-mtp"], capture_output=True, text=True, check=True)
    t = read_all(str(out))
    assert t["model.layers.1.mlp.experts.1.down_proj.weight_scale"][:2] == ("F32", (256, 1))
    assert not any(n.startswith("model.layers.2.") for n in t)


# ---------------------------------------------------------------- st_write


def test_st_write_layout(tmp_path):
    rng = np.random.default_rng(1)
    arrays = {
        "a": ("BF16", (3, 5), rng.integers(0, 2**15, 15, dtype=np.uint16)),
        "b": ("F8_E8M0", (7,), rng.integers(100, 140, 7, dtype=np.uint8)),
        "c": ("I32", (2, 2), rng.integers(-9, 9, 4, dtype=np.int32)),
        "d": ("F8_E4M3", (0,), np.zeros(0, np.uint8)),
    }
    tensors = [StTensor(n, dt, sh, (lambda a=a: a)) for n, (dt, sh, a) in arrays.items()]
    path = tmp_path / "t.safetensors"
    size = write_safetensors(path, tensors)
    raw = path.read_bytes()
    assert size == len(raw)
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0
    header = json.loads(raw[8:8 + n])
    assert header["__metadata__"] == {"format": "pt"}
    assert raw[:8 + n] == header_bytes(tensors)
    offset = 0
    for name, (dt, sh, a) in arrays.items():
        h = header[name]
        assert (h["dtype"], h["shape"]) == (dt, list(sh))
        assert h["data_offsets"] == [offset, offset + a.nbytes]
        assert raw[8 + n + offset:8 + n + offset + a.nbytes] == a.tobytes()
        offset += a.nbytes
    assert len(raw) == 8 + n + offset
    with safe_open(str(path), "pt") as fh:
        assert fh.metadata() == {"format": "pt"}
        assert fh.get_tensor("b").view(torch.uint8).numpy().tobytes() == arrays["b"][2].tobytes()
        assert fh.get_tensor("a").dtype == torch.bfloat16
        assert fh.get_tensor("c").numpy().tolist() == arrays["c"][2].reshape(2, 2).tolist()


def test_st_write_rejects_wrong_sizes(tmp_path):
    with pytest.raises(ValueError, match="expected 8 bytes"):
        write_safetensors(tmp_path / "x", [StTensor("x", "F32", (2,), lambda: np.zeros(3, np.float32))])
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="unknown safetensors dtype"):
        write_safetensors(tmp_path / "y", [StTensor("y", "F4", (2,), lambda: b"\0")])
