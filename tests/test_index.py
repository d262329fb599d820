"""The model index on synth checkpoints of every format: exactly the routed experts, byte-exact extents."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open

from ktnuma import errors as E
from ktnuma.index.experts import index_model, parse_layers
from ktnuma.tools.synth import FORMAT_NAMES, write_model

CASES = [(f, None) for f in FORMAT_NAMES] + [
    ("bf16", "mixtral"), ("bf16", "mistral"), ("bf16", "qwen-packed"), ("fp8", "mixtral"),
    ("gptq-int4", "mixtral"), ("rawint4", "mistral"), ("bf16", "gpt-oss"), ("bf16", "granite"),
    ("bf16", "granite-swa"), ("bf16", "jetmoe"), ("mxfp8", "deepseek"), ("nvfp4", "mixtral"),
]


def _source_bytes(path: str, name: str) -> bytes:
    if path.endswith(".gguf"):
        from gguf import GGUFReader

        r = GGUFReader(path)
        t = next(t for t in r.tensors if t.name == name)
        return np.asarray(t.data).tobytes()
    with safe_open(path, "pt") as f:
        return f.get_tensor(name).contiguous().view(torch.uint8).numpy().tobytes()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {c: write_model(root / f"{c[0].replace(':', '_')}-{c[1]}", c[0], naming=c[1], seed=7) for c in CASES}


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_index_finds_exactly_the_routed_experts_byte_exact(models, case):
    info = models[case]
    idx = index_model(info.path)
    assert idx.config.layers == tuple(info.moe_layers)
    found = {name for g in idx.groups for name in g.tensors}
    assert found == set(info.staged), (sorted(found ^ set(info.staged))[:5])
    cfg = idx.config.as_manifest()
    for k, v in info.manifest_config.items():
        assert cfg[k] == v, (k, cfg[k], v)
    # every piece's raw bytes equal what the reference library returns for that tensor (or expert slice)
    cache: dict[str, bytes] = {}
    for g in idx.groups:
        for k in range(g.count):
            name = g.tensors[k]
            path = idx.files[g.files[k]].path
            src = cache.get(name) or cache.setdefault(name, _source_bytes(path, name))
            with open(path, "rb") as f:
                f.seek(g.offsets[k])
                got = f.read(g.nbytes)
            if len(src) == g.nbytes:
                assert got == src, (name, k)
            elif g.conversion in ("bf16-even-T", "bf16-odd-T"):  # gpt-oss: the expert's [H, 2I] piece, de-interleaved
                assert got == src[k * g.nbytes:(k + 1) * g.nbytes], (name, k)
                cols = np.frombuffer(got, np.uint16).reshape(g.shape[0], -1)
                with safe_open(path, "pt") as f:
                    t = f.get_tensor(name)[k].contiguous().view(torch.int16).numpy().view(np.uint16)
                phase = 0 if g.proj == "gate" else 1
                assert np.array_equal(cols[:, phase::2], t[:, phase::2])
            else:  # stacked: expert k's piece (packed gate_up: gate then up halves)
                assert got in (src[k * g.nbytes:(k + 1) * g.nbytes],
                               src[2 * k * g.nbytes:(2 * k + 1) * g.nbytes],
                               src[(2 * k + 1) * g.nbytes:(2 * k + 2) * g.nbytes]), (name, k)
                half = src[2 * k * g.nbytes:(2 * k + 2) * g.nbytes]
                if len(src) == 2 * g.count * g.nbytes:  # gate_up: gate then up halves
                    assert got == (half[:g.nbytes] if g.proj == "gate" else half[g.nbytes:])
                else:
                    assert got == src[k * g.nbytes:(k + 1) * g.nbytes]


def test_mtp_layer_skipped_unless_named(models):
    info = models[("bf16", None)]
    assert info.mtp_layer is not None
    idx = index_model(info.path)
    assert info.mtp_layer not in idx.config.layers and info.mtp_layer in idx.all_layers
    idx2 = index_model(info.path, layers=f"{info.mtp_layer}")
    assert idx2.config.layers == (info.mtp_layer,)
    assert {g.layer for g in idx2.groups} == {info.mtp_layer}


def test_layers_out_of_range(models):
    with pytest.raises(E.BadInput, match="layer\\(s\\) 99 have no routed experts"):
        index_model(models[("bf16", None)].path, layers="99")
    assert parse_layers("1-3,7") == (1, 2, 3, 7)
    with pytest.raises(E.BadInput):
        parse_layers("3-1")


def test_deepseek_dense_intermediate_size_not_taken(models):
    info = models[("bf16", None)]
    cfg = json.load(open(os.path.join(info.path, "config.json")))
    assert cfg["intermediate_size"] != cfg["moe_intermediate_size"]
    assert index_model(info.path).config.moe_intermediate_size == cfg["moe_intermediate_size"]


def test_mixtral_intermediate_size_is_expert_size(models):
    info = models[("bf16", "mixtral")]
    cfg = json.load(open(os.path.join(info.path, "config.json")))
    assert "moe_intermediate_size" not in cfg
    assert index_model(info.path).config.moe_intermediate_size == cfg["intermediate_size"]


def test_qwen_config_nested_in_text_config(models):
    info = models[("bf16", "qwen-packed")]
    cfg = json.load(open(os.path.join(info.path, "config.json")))
    assert "text_config" in cfg
    c = index_model(info.path).config
    assert c.num_experts == cfg["text_config"]["num_experts"]
    assert c.experts_per_tok == cfg["text_config"]["num_experts_per_tok"]


def test_gguf_without_expert_counts_takes_shapes(tmp_path):
    info = write_model(tmp_path / "g", "gguf:Q8_0", variant="no-expert-counts", experts=6)
    from gguf import GGUFReader

    keys = set(GGUFReader(info.files[0]).fields)
    assert not any(k.endswith(".expert_count") for k in keys)
    c = index_model(info.path).config
    assert c.num_experts == 6 and c.experts_per_tok is None


def test_config_disagreeing_with_shapes(tmp_path, models):
    src = models[("bf16", None)].path
    dst = tmp_path / "m"
    shutil.copytree(src, dst)
    cfg = json.load(open(dst / "config.json"))
    cfg["moe_intermediate_size"] += 64
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(E.ConfigMismatch, match="moe_intermediate_size"):
        index_model(str(dst))


def test_multishard_symlinked_hf_cache_layout(tmp_path):
    info = write_model(tmp_path / "blobs-src", "bf16", shards=2, seed=3)
    # Hugging Face cache: snapshot dir of symlinks into blobs/
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "abc123"
    blobs.mkdir()
    snap.mkdir(parents=True)
    for i, n in enumerate(sorted(os.listdir(info.path))):
        shutil.copy(os.path.join(info.path, n), blobs / f"blob{i}")
        os.symlink(os.path.relpath(blobs / f"blob{i}", snap), snap / n)
    idx = index_model(str(snap))
    assert len(idx.files) == 2
    per_layer_files = {}
    for g in idx.groups:
        per_layer_files.setdefault(g.layer, set()).update(g.files)
    assert any(len(s) == 2 for s in per_layer_files.values()), "one layer's experts should span both files"
    assert {n for g in idx.groups for n in g.tensors} == set(info.staged)
    for g in idx.groups[:6]:
        for k in range(g.count):
            with open(idx.files[g.files[k]].path, "rb") as f:
                f.seek(g.offsets[k])
                assert f.read(g.nbytes) == _source_bytes(idx.files[g.files[k]].path, g.tensors[k])


@pytest.mark.parametrize("variant, fmt, words", [
    ("asym", "rawint4", ["weight_zero_point", "asymmetric"]),
    ("desc_act", "gptq-int4", ["desc_act=true"]),
    ("asym", "gptq-int4", ["sym=false"]),
])
def test_refused_quantizations(tmp_path, variant, fmt, words):
    info = write_model(tmp_path / "m", fmt, variant=variant)
    with pytest.raises(E.UnsupportedQuantization) as ei:
        index_model(info.path)
    for w in words:
        assert w in str(ei.value)


def test_missing_expert_and_inconsistent_shapes(tmp_path):
    import torch
    from safetensors.torch import save_file

    t = {}
    for e in range(4):
        for p, s in (("gate_proj", (32, 64)), ("up_proj", (32, 64)), ("down_proj", (64, 32))):
            t[f"model.layers.1.mlp.experts.{e}.{p}.weight"] = torch.zeros(s, dtype=torch.bfloat16)
    d = tmp_path / "missing"
    d.mkdir()
    t2 = dict(t)
    del t2["model.layers.1.mlp.experts.2.up_proj.weight"]
    save_file(t2, str(d / "model.safetensors"))
    with pytest.raises(E.ModelError, match="layer 1 is missing up weight of expert 2"):
        index_model(str(d))
    d = tmp_path / "shapes"
    d.mkdir()
    t3 = dict(t)
    t3["model.layers.1.mlp.experts.3.gate_proj.weight"] = torch.zeros((16, 64), dtype=torch.bfloat16)
    save_file(t3, str(d / "model.safetensors"))
    with pytest.raises(E.FormatError, match="experts must agree") as ei:
        index_model(str(d))
    assert "experts.3.gate_proj" in str(ei.value) or "experts.0.gate_proj" in str(ei.value)


@pytest.mark.parametrize("case", ["missing", "empty", "badmagic", "truncated-gguf"])
def test_inspect_exits_2_one_line(tmp_path, case):
    target = tmp_path / "m"
    if case == "empty":
        target.mkdir()
    elif case == "badmagic":
        target.mkdir()
        (target / "model.gguf").write_bytes(b"GGUX" + bytes(64))
    elif case == "truncated-gguf":
        info = write_model(tmp_path / "g", "gguf:Q8_0")
        target.mkdir()
        data = open(info.files[0], "rb").read()
        (target / "model.gguf").write_bytes(data[: len(data) - 5000])
    r = subprocess.run([sys.executable, "-m", "ktnuma.inspect", str(target)], capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert str(target) in lines[0]


def test_inspect_json_every_format(models):
    for case in [("bf16", None), ("gguf:Q4_K", None), ("mxfp4", None)]:
        info = models[case]
        r = subprocess.run([sys.executable, "-m", "ktnuma.inspect", info.path, "--json"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        d = json.loads(r.stdout)
        assert d["config"] == {**d["config"], **info.manifest_config}
        assert d["expert_bytes"] == info.staged_nbytes


def _write_gguf(path, layers: dict, experts=4, hidden=64, inter=64):
    """A GGUF with stacked expert tensors; layers: {layer: {proj: "F16"|"Q8_0"|None (missing)}}."""
    import gguf
    from gguf import GGMLQuantizationType as T

    w = gguf.GGUFWriter(str(path), "deepseek2")
    w.add_uint32("deepseek2.block_count", max(layers) + 1)
    rng = np.random.default_rng(0)
    for layer, projs in layers.items():
        for proj, typ in projs.items():
            if typ is None:
                continue
            shape = (experts, hidden, inter) if proj == "down" else (experts, inter, hidden)
            a = rng.standard_normal(shape).astype(np.float32)
            if typ == "F16":
                w.add_tensor(f"blk.{layer}.ffn_{proj}_exps.weight", a.astype(np.float16))
            else:
                q = gguf.quants.quantize(a, T.Q8_0)
                w.add_tensor(f"blk.{layer}.ffn_{proj}_exps.weight", q, raw_shape=q.shape, raw_dtype=T.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_layers_may_mix_quant_types(tmp_path):
    d = tmp_path / "mixed"
    d.mkdir()
    _write_gguf(d / "m.gguf", {1: {"gate": "Q8_0", "up": "Q8_0", "down": "F16"},
                               2: {"gate": "Q8_0", "up": "Q8_0", "down": "Q8_0"}})
    idx = index_model(str(d))
    types = {(g.layer, g.proj): g.dtype for g in idx.groups}
    assert types[(1, "down")] == "gguf:F16" and types[(2, "down")] == "gguf:Q8_0"
    assert idx.format == "gguf:Q8_0"
    assert index_model(str(d), layers="2").config.layers == (2,)
    with pytest.raises(E.BadInput, match="stores its experts as"):
        index_model(str(d), format="gguf:Q2_K")


def test_gguf_layer_missing_a_projection_is_one_line(tmp_path):
    d = tmp_path / "hole"
    d.mkdir()
    _write_gguf(d / "m.gguf", {1: {"gate": "Q8_0", "up": "Q8_0", "down": "Q8_0"},
                               2: {"gate": "Q8_0", "up": "Q8_0", "down": None}})
    with pytest.raises(E.ModelError, match="layer 2 has no down weight"):
        index_model(str(d))
    r = subprocess.run([sys.executable, "-m", "ktnuma.inspect", str(d)], capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_packed_model_missing_its_other_shard_is_one_line(tmp_path):
    info = write_model(tmp_path / "q", "bf16", naming="qwen-packed", shards=2)
    d = tmp_path / "half"
    d.mkdir()
    first = sorted(n for n in os.listdir(info.path) if n.endswith(".safetensors"))[0]
    shutil.copy(os.path.join(info.path, first), d / first)
    shutil.copy(os.path.join(info.path, "config.json"), d / "config.json")
    r = subprocess.run([sys.executable, "-m", "ktnuma.inspect", str(d)], capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr


# ------------------------------------------------------------------------------------------
# issue 14: what the field's writers produce; refusals name the missing feature
# ------------------------------------------------------------------------------------------
def _write(path, tensors: dict[str, tuple[str, tuple[int, ...]]], config: dict | None = None) -> str:
    from ktnuma.tools.st_write import StTensor, write_safetensors

    os.makedirs(path, exist_ok=True)
    write_safetensors(os.path.join(path, "model.safetensors"),
                      [StTensor(n, dt, sh, lambda n=0, sh=sh, dt=dt: np.zeros(int(np.prod(sh)) * (2 if dt == "BF16" else 1),
                                                                         np.uint8)) for n, (dt, sh) in tensors.items()])
    if config is not None:
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(config, f)
    return str(path)


def test_gpt_oss_mxfp4_refused_naming_the_feature(tmp_path):
    E_, H, I = 2, 64, 32
    p = _write(tmp_path / "m", {
        "model.layers.0.mlp.experts.gate_up_proj_blocks": ("U8", (E_, 2 * I, H // 32, 16)),
        "model.layers.0.mlp.experts.gate_up_proj_scales": ("U8", (E_, 2 * I, H // 32)),
        "model.layers.0.mlp.experts.down_proj_blocks": ("U8", (E_, H, I // 32, 16)),
        "model.layers.0.mlp.experts.down_proj_scales": ("U8", (E_, H, I // 32)),
    })
    with pytest.raises(E.UnsupportedQuantization, match=r"gpt-oss MXFP4 .*gate/up interleaved.*no engine here"):
        index_model(p)


def test_stacked_shapes_that_fit_no_layout_say_which_layouts(tmp_path):
    p = _write(tmp_path / "m", {"model.layers.0.mlp.experts.gate_up_proj": ("BF16", (2, 64, 100)),
                                "model.layers.0.mlp.experts.down_proj": ("BF16", (2, 64, 32))})
    with pytest.raises(E.FormatError, match=r"neither \[E, 2I, H\] \+ \[E, H, I\] \(gate then up\) nor gpt-oss"):
        index_model(p)


def test_gpt_oss_groups_read_pairs_and_deinterleave(models):
    idx = index_model(models[("bf16", "gpt-oss")].path)
    g = {(x.proj): x for x in idx.groups if x.layer == idx.config.layers[0]}
    H, I = idx.config.hidden_size, idx.config.moe_intermediate_size
    assert (g["gate"].shape, g["gate"].i_dim, g["gate"].conversion) == ((H, I), 1, "bf16-even-T")
    assert (g["up"].conversion, g["up"].offsets, g["up"].staged_dtype) == ("bf16-odd-T", g["gate"].offsets, "bf16")
    assert g["gate"].nbytes == H * 2 * I * 2 and g["gate"].quantum_bytes == 4
    assert (g["down"].shape, g["down"].i_dim, g["down"].conversion) == ((I, H), 0, "bf16-T")


def test_new_formats_tp_refusals_name_their_units(models):
    from ktnuma.errors import SplitError
    from ktnuma.plan.planner import check_split

    for fmt, naming, unit in (("mxfp8", "deepseek", "32-wide MXFP8 scale blocks"),
                              ("nvfp4", "mixtral", "16-wide NVFP4 scale blocks")):
        idx = index_model(models[(fmt, naming)].path)
        with pytest.raises(SplitError, match=f"not a multiple of the {unit} of down_proj"):
            check_split(idx, 16 if fmt == "mxfp8" else 32, "tp")


@pytest.mark.parametrize("naming, gu, dn", [
    ("llama4", "model.layers.0.feed_forward.experts.gate_up_proj", "model.layers.0.feed_forward.experts.down_proj"),
    ("aria", "model.layers.0.mlp.experts.fc1.weight", "model.layers.0.mlp.experts.fc2.weight"),
])
def test_chunked_transposed_stacks_stage_transposed(tmp_path, naming, gu, dn):
    """Llama4 / Aria stacks are stored transposed ([E, H, 2I] gate columns then up columns, [E, I, H]):
    gate/up are strided [H, I] column ranges and down [I, H] rows, all staged transposed (bf16-T)."""
    E_, H, I = 2, 64, 32
    p = _write(tmp_path / "m", {gu: ("BF16", (E_, H, 2 * I)), dn: ("BF16", (E_, I, H))})
    idx = index_model(p)
    assert (idx.naming, idx.format, idx.config.hidden_size, idx.config.moe_intermediate_size) == (naming, "bf16", H, I)
    assert "transposed" in dict(idx.notes)["layout"]
    g = {x.proj: x for x in idx.groups}
    piece = H * 2 * I * 2
    assert (g["gate"].shape, g["gate"].i_dim, g["gate"].row_stride, g["gate"].conversion) == ((H, I), 1, 4 * I, "bf16-T")
    assert [o - g["gate"].offsets[0] for o in g["up"].offsets] == [2 * I + e * piece for e in range(E_)]
    assert (g["down"].shape, g["down"].i_dim, g["down"].conversion) == ((I, H), 0, "bf16-T")


def test_fixed_order_namings_check_the_shapes(tmp_path):
    """A naming whose storage order is fixed refuses shapes of the other order, naming both."""
    p = _write(tmp_path / "m", {"model.layers.0.feed_forward.experts.gate_up_proj": ("BF16", (2, 64, 32)),
                                "model.layers.0.feed_forward.experts.down_proj": ("BF16", (2, 32, 32))})
    with pytest.raises(E.FormatError, match=r"llama4 stacked gate/up \[2, 64, 32\].*are not \[E, H, 2I\] \+ \[E, I, H\]"):
        index_model(p)
