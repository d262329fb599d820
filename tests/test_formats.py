"""Formats and layouts of the field's writers (issue 14), staged by the real `python -m ktnuma.launch`
(tp and ep, 2 and 4 simulated nodes) and compared byte for byte with an oracle that reads the
safetensors headers itself and applies each format's documented staging rule with numpy:

- MXFP8 (MiniMax-M3: e4m3 + ue8m0 u8 `weight_scale_inv`, `block_sparse_moe.experts.{e}.w1/w3/w2`): as stored;
- NVFP4 (ModelOpt: E2M1 u8 + e4m3 `weight_scale` per 16 + f32 `weight_scale_2`): as stored, the globals
  in the scale records' `global_scale`;
- FP8 block with bf16 `weight_scale` (llm-compressor FP8_BLOCK): scales exactly converted to f32;
- gpt-oss `gate_up_proj` [E, H, 2I] interleaved: gate = even columns, up = odd, staged transposed as
  bf16 [I, H]; `down_proj` [E, I, H] staged transposed as [H, I];
- Granite / GraniteMoeSWA / JetMoe stacked [E, 2I, H] gate-then-up + [E, H, I];
- Inkling2 `model.llm.layers.{L}.mlp.experts.w13_weight` [E, 2I, H], gate = even rows, up = odd (as stored,
  gathered row by row) + `w2_weight` [E, H, I];
- LongCat zero-expert slots (gate/up, no down): only the config's routed experts.
"""
from __future__ import annotations

import json
import math
import os
import struct

import numpy as np
import pytest

from conftest import run_module

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TOPOS = {2: os.path.join(REPO, "configs/topologies/two-node.toml"),
         4: os.path.join(REPO, "configs/topologies/four-node.toml")}
WIDTH = {1: np.uint8, 2: np.uint16, 4: np.uint32}
ST = {"BF16": 2, "F16": 2, "F32": 4, "F8_E4M3": 1, "U8": 1, "I8": 1, "I32": 4, "F8_E8M0": 1, "I64": 8}
PROJ_W = {"gate": "w1", "up": "w3", "down": "w2"}


# --------------------------------------------------------------------------- the oracle
class Tensors:
    """Every tensor of a model directory as raw elements (uint of the dtype's width), from the headers."""

    def __init__(self, root: str) -> None:
        self.t: dict[str, tuple[str, np.ndarray]] = {}
        for name in sorted(os.listdir(root)):
            if not name.endswith(".safetensors"):
                continue
            raw = open(os.path.join(root, name), "rb").read()
            n = struct.unpack("<Q", raw[:8])[0]
            header = json.loads(raw[8:8 + n])
            for k, v in header.items():
                if k == "__metadata__":
                    continue
                a, b = v["data_offsets"]
                w = ST[v["dtype"]]
                data = np.frombuffer(raw, dtype=WIDTH.get(w, np.uint8), count=(b - a) // w, offset=8 + n + a)
                self.t[k] = (v["dtype"], data.reshape(v["shape"]) if v["shape"] else data)

    def __getitem__(self, k: str) -> np.ndarray:
        return self.t[k][1]


def _cut(piece: np.ndarray, slc: dict | None) -> np.ndarray:
    if slc is None:
        return piece
    ix = [slice(None)] * piece.ndim
    ix[slc["dim"]] = slice(slc["start"], slc["stop"])
    return piece[tuple(ix)]


def _per_expert(stem: str, suffixes: dict[str, str], convert=None):
    def piece(ts: Tensors, layer: int, e: int, proj: str, kind: str) -> np.ndarray:
        name = stem.format(L=layer, e=e, p=proj, w=PROJ_W[proj]) + "." + suffixes[kind]
        return ts[name]
    return piece


DS = "model.layers.{L}.mlp.experts.{e}.{p}_proj"
MX = "model.layers.{L}.block_sparse_moe.experts.{e}.{w}"


def _stacked(gu: str, dn: str, order: str):
    def piece(ts: Tensors, layer: int, e: int, proj: str, kind: str) -> np.ndarray:
        if proj == "down":
            d = ts[dn.format(L=layer)][e]
            return d.T if order == "gpt-oss" else d  # gpt-oss [I, H], staged transposed: [H, I]
        g = ts[gu.format(L=layer)][e]
        if order == "gpt-oss":  # [H, 2I]: gate = even columns, up = odd, staged transposed as bf16 [I, H]
            return (g[:, 0::2] if proj == "gate" else g[:, 1::2]).T
        if order == "rows":  # [2I, H]: gate = even rows, up = odd, as stored
            return g[0::2] if proj == "gate" else g[1::2]
        i = g.shape[0] // 2  # [2I, H]: gate rows then up rows
        return g[:i] if proj == "gate" else g[i:]
    return piece


def _bf16_to_f32_bytes(a: np.ndarray) -> np.ndarray:
    return (a.astype(np.uint32) << 16).astype(np.uint32)


# case -> (synth format, synth kwargs, piece oracle, {kind: staged conversion})
CASES = {
    "mxfp8": ("mxfp8", {"intermediate": 256}, _per_expert(MX, {"weight": "weight", "scale": "weight_scale_inv"}), {}),
    "nvfp4": ("nvfp4", {"intermediate": 256}, _per_expert(DS, {"weight": "weight", "scale": "weight_scale"}), {}),
    "fp8-bf16-scale": ("fp8", {"intermediate": 512, "variant": "bf16-scale"},
                       _per_expert(DS, {"weight": "weight", "scale": "weight_scale"}), {"scale": _bf16_to_f32_bytes}),
    "gpt-oss": ("bf16", {"naming": "gpt-oss"},
                _stacked("model.layers.{L}.mlp.experts.gate_up_proj", "model.layers.{L}.mlp.experts.down_proj",
                         "gpt-oss"), {}),
    "granite": ("bf16", {"naming": "granite"},
                _stacked("model.layers.{L}.block_sparse_moe.input_linear.weight",
                         "model.layers.{L}.block_sparse_moe.output_linear.weight", "concat"), {}),
    "granite-swa": ("bf16", {"naming": "granite-swa"},
                    _stacked("model.layers.{L}.block_sparse_moe.experts.gate_up_proj",
                             "model.layers.{L}.block_sparse_moe.experts.down_proj", "concat"), {}),
    "jetmoe": ("bf16", {"naming": "jetmoe"},
               _stacked("model.layers.{L}.mlp.input_linear.weight", "model.layers.{L}.mlp.output_linear.weight",
                        "concat"), {}),
    "inkling2": ("bf16", {"naming": "inkling2"},
                 _stacked("model.llm.layers.{L}.mlp.experts.w13_weight", "model.llm.layers.{L}.mlp.experts.w2_weight",
                          "rows"), {}),
    "zero-experts": ("bf16", {"variant": "zero-experts"}, _per_expert(DS, {"weight": "weight"}), {}),
}


def check_manifest(m: dict, ts: Tensors, piece, conv: dict, experts: int) -> int:
    """Every staged piece == the oracle's; every expert's pieces tile it. Returns pieces compared."""
    maps = {}
    for s in m["segments"]:
        with open(os.path.join(m["shm_dir"], s["name"]), "rb") as f:
            maps[s["name"]] = f.read()
        assert len(maps[s["name"]]) == s["size"]
    seen: dict[tuple, list] = {}
    n = 0
    for r in m["arrays"]:
        first, count = r["experts"]
        buf = maps[r["segment"]]
        for e in range(first, first + count):
            want = _cut(piece(ts, r["layer"], e, r["proj"], r["kind"]), r["slice"])
            if r["kind"] in conv:
                want = conv[r["kind"]](want)
            want_b = np.ascontiguousarray(want).tobytes()
            start = r["offset"] + (e - first) * r["stride"]
            assert list(want.shape) == r["shape"], (r, want.shape)
            assert buf[start:start + r["nbytes"]] == want_b, (r["layer"], r["proj"], r["kind"], e, r["slice"])
            seen.setdefault((r["layer"], r["proj"], r["kind"], e), []).append(r["slice"])
            n += 1
    layers = m["config"]["layers"]
    kinds = {r["kind"] for r in m["arrays"]}
    assert set(seen) == {(L, p, k, e) for L in layers for p in ("gate", "up", "down") for k in kinds
                         for e in range(experts)}
    for slices in seen.values():
        if None not in slices:
            spans = sorted((s["start"], s["stop"]) for s in slices)
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])) and spans[0][0] == 0
    return n


@pytest.mark.procs
@pytest.mark.parametrize("nodes", [2, 4])
@pytest.mark.parametrize("split", ["tp", "ep"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_launch_stages_format_byte_exact(case, split, nodes, synth_model, run_registry, tmp_path):
    fmt, kw, piece, conv = CASES[case]
    info = synth_model(fmt, **kw)
    man = tmp_path / "run.json"
    r = run_module("launch", info.path, "--nodes", str(nodes), "--topology", TOPOS[nodes], "--split", split,
                   "--detach", "--quiet", "--manifest", str(man), timeout=300)
    assert r.returncode == 0, r.stderr
    try:
        m = json.loads(man.read_text())
        ts = Tensors(info.path)
        experts = info.manifest_config["num_experts"]
        assert m["config"]["num_experts"] == experts
        assert check_manifest(m, ts, piece, conv, experts) >= experts * 3 * len(m["config"]["layers"])
        notes = m["model"]["notes"]
        if case == "nvfp4":
            assert "bf16(f32(e4m3) * global_scale)" in notes["staging"]
            for rec in m["arrays"]:
                if rec["kind"] == "scale":
                    first, count = rec["experts"]
                    want = [float(np.frombuffer(ts[DS.format(L=rec["layer"], e=e, p=rec["proj"]) + ".weight_scale_2"]
                                                .tobytes(), "<f4")[0]) for e in range(first, first + count)]
                    assert rec["global_scale"] == want and all(math.isfinite(v) for v in want)
        if case == "gpt-oss":
            assert m["model"]["naming"] == "gpt-oss" and "not staged" in notes["biases"]
            assert {rec["dtype"] for rec in m["arrays"]} == {"bf16"}
        if case == "inkling2":
            assert m["model"]["naming"] == "inkling2" and "even rows" in notes["layout"]
            assert {rec["dtype"] for rec in m["arrays"]} == {"bf16"}
        if case == "zero-experts":
            assert "8-11" in notes["zero_experts"] and "zero_expert_num = 4" in notes["zero_experts"]
        if case == "fp8-bf16-scale":
            assert {rec["dtype"] for rec in m["arrays"] if rec["kind"] == "scale"} == {"f32"}
    finally:
        rel = run_module("release", str(man))
        assert rel.returncode == 0, rel.stderr
