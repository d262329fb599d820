"""kt-kernel's MoE on weights staged by `python -m ktnuma.launch --detach` (a separate process).

For each engine format (BF16, FP8, GPTQ int4, RAWINT4, MXFP4, GGUF Q8_0/Q4_K), with the two-node
topology file:
- `ep`: one engine on the staged memory (merged per-expert pointer rows; GGUF one stacked buffer)
  gives output bit-identical to the same engine built from the tensors read the upstream way
  (safetensors `safe_open` / `gguf.GGUFReader`, the loader's conversions);
- `tp`: one engine per node over its slices; their outputs summed match the single upstream MoE
  within engine-facts' tolerance, and both match the torch reference of the dequantized weights.
Shapes: the smallest engine-facts reports working that also split in two.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, run_module
from test_kt_kernel import CASES  # format -> (hidden, intermediate, group size), shapes per engine-facts

torch = pytest.importorskip("torch")
pytest.importorskip("kt_kernel")

import ktnuma  # noqa: E402
from ktnuma.tools import reference as R  # noqa: E402
from ktnuma.host import shm  # noqa: E402
from ktnuma.integrations import kt_kernel as K  # noqa: E402
from ktnuma.tools import engine_check as EC  # noqa: E402

log = logging.getLogger(__name__)
TWO = str(REPO / "configs/topologies/two-node.toml")
Q = 12  # tokens: llamafile's grouped path starts at 10



# ---------------------------------------------------------------- the upstream way of reading
def _e8m0_to_bf16(t):
    return (t.view(torch.uint8).to(torch.int32) << 7).to(torch.int16).view(torch.bfloat16)


# format -> (tensor stem, proj names, weight suffix, scale suffix, weight conversion, scale conversion)
ST_LAYOUT = {
    "bf16": ("model.layers.{L}.mlp.experts.{e}.{p}", ("gate_proj", "up_proj", "down_proj"), "weight", None,
             None, None),
    "fp8": ("model.layers.{L}.mlp.experts.{e}.{p}", ("gate_proj", "up_proj", "down_proj"), "weight",
            "weight_scale_inv", None, None),
    "gptq-int4": ("model.layers.{L}.mlp.experts.{e}.{p}", ("gate_proj", "up_proj", "down_proj"), "qweight",
                  "scales", None, lambda t: t.float()),
    "rawint4": ("model.layers.{L}.mlp.experts.{e}.{p}", ("gate_proj", "up_proj", "down_proj"), "weight_packed",
                "weight_scale", None, None),
    "mxfp4": ("layers.{L}.ffn.experts.{e}.{p}", ("w1", "w3", "w2"), "weight", "scale",
              lambda t: t.view(torch.uint8), _e8m0_to_bf16),
}


def upstream_arrays(model_dir: str, fmt: str, layer: int, experts: int) -> dict:
    """{(proj, kind): stacked [E, ...] tensor} read from the checkpoint without ktnuma."""
    out = {}
    if fmt.startswith("gguf:"):
        import gguf

        reader = gguf.GGUFReader(os.path.join(model_dir, "model.gguf"))
        by_name = {t.name: t for t in reader.tensors}
        for proj in K.PROJS:
            t = by_name[f"blk.{layer}.ffn_{proj}_exps.weight"]
            raw = np.array(t.data, copy=True).view(np.uint8)
            out[(proj, "weight")] = raw.reshape(experts, -1)
        return out
    from safetensors import safe_open

    stem, names, wsuf, ssuf, wconv, sconv = ST_LAYOUT[fmt]
    with safe_open(os.path.join(model_dir, "model.safetensors"), framework="pt") as f:
        for proj, name in zip(K.PROJS, names):
            for kind, suf, conv in (("weight", wsuf, wconv), ("scale", ssuf, sconv)):
                if suf is None:
                    continue
                ts = [f.get_tensor(f"{stem.format(L=layer, e=e, p=name)}.{suf}") for e in range(experts)]
                t = torch.stack([conv(x) if conv else x for x in ts]).contiguous()
                out[(proj, kind)] = t
    return out


def _reference(spec, arrays, x, ids, w):
    used = sorted(set(ids.ravel().tolist()))
    deq = {p: {} for p in K.PROJS}
    for proj in K.PROJS:
        n, k = spec._nk(proj)
        for e in used:
            sc = arrays.get((proj, "scale"))
            deq[proj][e] = R.dequantize(spec.format, arrays[(proj, "weight")][e], None if sc is None else sc[e],
                                        n=n, k=k, group_size=spec.group_size)
    return R.moe_forward(x, ids, w, deq["gate"], deq["up"], deq["down"])


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cpu():
    return K.make_cpuinfer(threads=2)


@pytest.fixture
def detached(tmp_path, run_registry):
    made: list[str] = []

    def launch(model: str, split: str) -> tuple[str, float]:
        man = str(tmp_path / f"{split}{len(made)}.json")
        t0 = time.perf_counter()
        r = run_module("launch", model, "--topology", TWO, "--nodes", "2", "--split", split, "--detach",
                       "--quiet", "--manifest", man)
        assert r.returncode == 0, r.stderr
        made.append(man)
        return man, time.perf_counter() - t0

    yield launch
    for man in made:
        if os.path.exists(man):
            m = json.load(open(man))
            run_module("release", man)
            shm.unlink_run(m["run_id"])


def _model(synth_model, fmt):
    H, I, gs = CASES[fmt]
    kw = {"group_size": gs} if gs else {}
    return synth_model(fmt, hidden=H, intermediate=I, **kw)


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize("fmt", list(CASES))
def test_ep_staged_engine_is_bit_identical_to_upstream_loading(cpu, synth_model, detached, fmt):
    info = _model(synth_model, fmt)
    man, t_stage = detached(info.path, "ep")
    t0 = time.perf_counter()
    att = ktnuma.attach(man)
    t_attach = time.perf_counter() - t0
    with att:
        for layer in att.layers:
            t0 = time.perf_counter()
            staged = K.engines_for_layer(att.layer(layer), cpu)
            t_build = time.perf_counter() - t0
            assert len(staged.parts) == 1 and staged.nodes == (0, 1)
            assert staged.parts[0].mode == ("flat" if fmt.startswith("gguf:") else "pointers")
            spec = staged.spec
            up = upstream_arrays(info.path, fmt, layer, spec.num_experts)
            ref_moe = K.build_moe(cpu, spec, up, mode="flat", layer_idx=10_000 + layer)
            x, ids, w = K.random_tokens(spec, Q, seed=layer)
            out = staged.forward_parts(cpu, x, ids, w)[0]
            want = K.forward(ref_moe, cpu, x, ids, w)
            assert torch.isfinite(want.float()).all() and want.float().abs().sum() > 0
            assert out.view(torch.int16).equal(want.view(torch.int16)), f"{fmt} layer {layer}: not bit-identical"
            err = R.rel_l1(out, _reference(spec, up, x, ids, w))
            assert err < spec.tolerance
            log.info("%s ep L%d: stage %.3f s (launch process), attach %.2f ms, build %.2f ms, rel L1 %.4f",
                     fmt, layer, t_stage, t_attach * 1e3, t_build * 1e3, err)


@pytest.mark.parametrize("fmt", list(CASES))
def test_tp_node_engines_sum_to_the_single_moe(cpu, synth_model, detached, fmt):
    info = _model(synth_model, fmt)
    man, _ = detached(info.path, "tp")
    with ktnuma.attach(man) as att:
        layer = att.layers[-1]
        staged = K.engines_for_layer(att.layer(layer), cpu)
        spec = staged.spec
        assert len(staged.parts) == 2 and all(p.spec.intermediate == spec.intermediate // 2 for p in staged.parts)
        up = upstream_arrays(info.path, fmt, layer, spec.num_experts)
        single = K.build_moe(cpu, spec, up, mode="flat", layer_idx=20_000 + layer)
        x, ids, w = K.random_tokens(spec, Q, seed=7)
        parts = staged.forward_parts(cpu, x, ids, w)
        total = parts[0].float() + parts[1].float()
        assert all(p.float().abs().sum() > 0 for p in parts)
        whole = K.forward(single, cpu, x, ids, w).float()
        ref = _reference(spec, up, x, ids, w)
        e_whole, e_ref, e_single = R.rel_l1(total, whole), R.rel_l1(total, ref), R.rel_l1(whole, ref)
        log.info("%s tp2: sum vs single %.4f, sum vs torch %.4f, single vs torch %.4f", fmt, e_whole, e_ref, e_single)
        assert e_whole < spec.tolerance and e_ref < spec.tolerance and e_single < spec.tolerance
        # the parts are not the whole: each one alone is far from it
        assert R.rel_l1(parts[0].float(), whole) > 0.1
        # and the layer check (per-node torch references of the staged slices) agrees
        err, _ = EC.check_layer(staged, cpu, tokens=Q, seed=3)
        assert err < spec.tolerance


def test_engine_limits_are_refused_on_staged_layers(cpu, synth_model, detached):
    # llamafile needs I/N % 256: I=256 over two nodes stages fine (Q8_0 blocks of 32) but is refused
    info = synth_model("gguf:Q8_0", hidden=256, intermediate=256)
    man, _ = detached(info.path, "tp")
    with ktnuma.attach(man) as att:
        with pytest.raises(ktnuma.errors.BadInput, match="per-part intermediate 128 is not a multiple of 256"):
            K.engines_for_layer(att.layer(1), cpu)


@pytest.mark.procs
@pytest.mark.parametrize("fmt,split", [("rawint4", "ep")])
def test_attach_forward_script_twice_in_fresh_processes(synth_model, detached, fmt, split):
    """RAWINT4 in pointer mode reads the staged memory itself (in place); the second engine
    process attaches after the first has exited."""
    info = _model(synth_model, fmt)
    man, _ = detached(info.path, split)
    runs = []
    for _ in range(2):
        r = subprocess.run([sys.executable, str(REPO / "scripts/attach_forward.py"), man, "--threads", "2",
                            "--json"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
    for res in runs:
        assert res["split"] == split and [x["layer"] for x in res["layers"]] == [1, 2]
        assert all(x["rel_l1"] < 0.04 and x["engines"] == (2 if split == "tp" else 1) for x in res["layers"])
        log.info("attach_forward %s %s: attach %.2f ms, build %.1f ms, forward %s ms", fmt, split,
                 res["attach_s"] * 1e3, res["build_s"] * 1e3, [round(x["forward_s"] * 1e3, 2) for x in res["layers"]])
    assert [x["rel_l1"] for x in runs[0]["layers"]] == [x["rel_l1"] for x in runs[1]["layers"]]
