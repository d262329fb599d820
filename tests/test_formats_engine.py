"""MXFP8 and NVFP4 through kt-kernel 0.7.2's AVX2 engines: the same engine built on ktnuma's staged
weights and on kt-kernel's own loader's tensors (MXFP8SafeTensorLoader / NVFP4SafeTensorLoader) gives
bit-identical output under ep (whole experts), and under tp the sum of the per-node engines matches
the whole-layer engine within the engine's rounding; both match the torch reference dequantizer.

Staging is the real `python -m ktnuma.launch` on 2 simulated nodes; NVFP4 scales are staged as stored
(e4m3) and folded with the records' `global_scale` exactly as model.notes says (reference.fold_nvfp4).
"""
from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
import torch

import ktnuma
from conftest import run_module
from ktnuma.index.model import PROJS
from ktnuma.tools import reference as R

kt_kernel = pytest.importorskip("kt_kernel")
import ktnuma.integrations.kt_kernel as K  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TWO = os.path.join(os.path.dirname(HERE), "configs/topologies/two-node.toml")
H, I, E, TOPK = 256, 256, 8, 2
LOADERS = {"mxfp8": "MXFP8SafeTensorLoader", "nvfp4": "NVFP4SafeTensorLoader"}
_ids = itertools.count(20_000)


@pytest.fixture(scope="module")
def cpu():
    return K.make_cpuinfer(threads=2)


def _loader_arrays(fmt: str, path: str, layer: int) -> dict[tuple[str, str], np.ndarray]:
    from kt_kernel.utils import loader as L

    ld = getattr(L, LOADERS[fmt])(path)
    got = ld.load_experts(f"model.layers.{layer}")
    out = {}
    for p in PROJS:
        for kind, key in (("weight", p), ("scale", f"{p}_scale")):
            t = torch.stack([x.contiguous() for x in got[key]])
            out[(p, kind)] = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t.view(torch.uint8)).numpy().copy()
    return out


def _staged_arrays(att, fmt: str, layer: int, node: int | None) -> dict[tuple[str, str], np.ndarray]:
    """One node's arrays (node None: every node's experts concatenated, ep), in the engine layout."""
    nodes = [node] if node is not None else [n["id"] for n in att.manifest["topology"]["nodes"]]
    out = {}
    for p in PROJS:
        for kind in ("weight", "scale"):
            parts = []
            for n in nodes:
                a = np.asarray(att.array(layer, p, kind, n))
                if fmt == "nvfp4" and kind == "scale":
                    rec = att.record(layer, p, kind, n)
                    glob = next(r["global_scale"] for r in att.manifest["arrays"]
                                if (r["layer"], r["proj"], r["kind"], r["node"]) == (layer, p, kind, n))
                    a = np.stack([R.fold_nvfp4(a[k], g) for k, g in enumerate(glob)]).view(np.int16)
                    assert len(glob) == a.shape[0] == len(rec.experts)
                parts.append(np.ascontiguousarray(a))
            out[(p, kind)] = np.concatenate(parts) if len(parts) > 1 else parts[0]
    return out


def _inputs(seed: int = 3):
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.standard_normal((5, H), dtype=np.float32)).to(torch.bfloat16)
    ids = np.stack([rng.choice(E, TOPK, replace=False) for _ in range(5)]).astype(np.int64)
    w = rng.random((5, TOPK), dtype=np.float32)
    return x, ids, w


def _engine_out(cpu, spec, arrays, x, ids, w) -> torch.Tensor:
    moe = K.build_moe(cpu, spec, arrays, mode="flat", layer_idx=next(_ids))
    return K.forward(moe, cpu, x, ids, w)


def _reference(fmt: str, arrays, x, ids, w) -> torch.Tensor:
    deq = {p: [R.dequantize(fmt, arrays[(p, "weight")][e], arrays[(p, "scale")][e],
                            n=H if p == "down" else I, k=I if p == "down" else H) for e in range(E)]
           for p in PROJS}
    return R.moe_forward(x, ids, w, deq["gate"], deq["up"], deq["down"])


def _launch(info, split: str, tmp_path) -> str:
    man = tmp_path / f"{split}.json"
    r = run_module("launch", info.path, "--topology", TWO, "--split", split, "--detach", "--quiet",
                   "--manifest", str(man), timeout=300)
    assert r.returncode == 0, r.stderr
    return str(man)


@pytest.mark.procs
@pytest.mark.parametrize("fmt", ["mxfp8", "nvfp4"])
def test_engine_on_staged_equals_engine_on_kt_kernel_loader(fmt, cpu, synth_model, run_registry, tmp_path):
    info = synth_model(fmt, hidden=H, intermediate=I, experts=E, experts_per_tok=TOPK)
    layer = info.moe_layers[0]
    spec = K.backend_for(fmt, hidden=H, intermediate=I, num_experts=E, experts_per_tok=TOPK)
    theirs = _loader_arrays(fmt, info.path, layer)
    x, ids, w = _inputs()
    out_theirs = _engine_out(cpu, spec, theirs, x, ids, w)
    ref = _reference(fmt, theirs, x, ids, w)
    assert R.rel_l1(out_theirs, ref) < spec.tolerance
    for split in ("ep", "tp"):
        man = _launch(info, split, tmp_path)
        try:
            with ktnuma.attach(man) as att:
                if split == "ep":
                    ours = _staged_arrays(att, fmt, layer, None)
                    for key, a in theirs.items():  # the same bytes kt-kernel's loader hands its engine
                        assert np.array_equal(ours[key].view(np.uint8), a.view(np.uint8)), key
                    out = _engine_out(cpu, spec, ours, x, ids, w)
                    assert torch.equal(out.view(torch.int16), out_theirs.view(torch.int16))
                else:
                    part = spec.split(2)
                    total = torch.zeros(x.shape, dtype=torch.float32)
                    for n in (n["id"] for n in att.manifest["topology"]["nodes"]):
                        total += _engine_out(cpu, part, _staged_arrays(att, fmt, layer, n), x, ids, w).float()
                    assert R.rel_l1(total, out_theirs.float()) < spec.tolerance
                    assert R.rel_l1(total, ref) < spec.tolerance
        finally:
            assert run_module("release", man).returncode == 0
