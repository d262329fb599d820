"""Writing: safetensors shards (cut inside expert ranges) or one GGUF; write_model and estimate."""
from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Sequence
from math import prod
from pathlib import Path
from typing import Any

import numpy as np

from ktnuma.index.dtypes import SAFETENSORS_DTYPES, ggml_nbytes
from ktnuma.tools.st_write import StTensor, write_safetensors
from ktnuma.tools.synth.gen import GGUF_FILE, _produce
from ktnuma.tools.synth.tables import SynthInfo
from ktnuma.tools.synth.specs import _Model, _Spec
from ktnuma.tools.synth.build import _plan

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- writing

def _itemsize(st_dtype: str) -> int:
    return SAFETENSORS_DTYPES[st_dtype].itemsize


def _spec_nbytes(sp: _Spec, container: str) -> int:
    if container == "gguf":
        return ggml_nbytes(sp.dtype, sp.count)
    return sp.count * _itemsize(sp.dtype)


def _cuts(specs: Sequence[_Spec], shards: int) -> list[int]:
    """Tensor positions where shard files 2..n start.

    A cut at position p has specs[p-1] and specs[p] routed tensors of the same layer, so that layer's
    experts span two files. Each cut aims at the middle of the routed layer nearest to an equal-bytes
    split point, so the spanning layer is split roughly in half.
    """
    if shards == 1:
        return []
    starts = np.cumsum([0, *(_spec_nbytes(s, "safetensors") for s in specs)])
    total = int(starts[-1])
    cands = [p for p in range(1, len(specs))
             if specs[p - 1].routed and specs[p].routed and specs[p - 1].layer == specs[p].layer]
    if len(cands) < shards - 1:
        raise ValueError(f"cannot split {len(specs)} tensors into {shards} files inside expert ranges")
    cuts: list[int] = []
    for j in range(1, shards):
        target = total * j / shards
        usable = [p for p in cands if not cuts or p > cuts[-1]]
        usable = usable[: len(usable) - (shards - 1 - j)]  # leave room for the later cuts
        layers: dict[int | None, list[int]] = {}
        for p in usable:
            layers.setdefault(specs[p].layer, []).append(p)

        def distance(ps: list[int]) -> float:
            lo, hi = int(starts[ps[0] - 1]), int(starts[ps[-1] + 1])
            return max(lo - target, 0, target - hi)

        ps = min(layers.values(), key=distance)
        goal = (int(starts[ps[0] - 1]) + int(starts[ps[-1] + 1])) / 2
        cuts.append(min(ps, key=lambda p: abs(int(starts[p]) - goal)))
    return cuts


def _write_safetensors(model: _Model, out: Path, seed: int, shards: int) -> list[Path]:
    specs = model.specs
    cuts = [0, *_cuts(specs, shards), len(specs)]
    files: list[Path] = []
    weight_map: dict[str, str] = {}
    total = 0
    for j in range(shards):
        part = specs[cuts[j]:cuts[j + 1]]
        # data order within a file as the safetensors library writes it: by alignment, then name
        part = sorted(part, key=lambda sp: (-_itemsize(sp.dtype), sp.name))
        fname = "model.safetensors" if shards == 1 else f"model-{j + 1:05d}-of-{shards:05d}.safetensors"
        tensors = [StTensor(sp.name, sp.dtype, sp.shape, functools.partial(_produce, seed, sp.name, sp.gen, sp.count))
                   for sp in part]
        write_safetensors(out / fname, tensors)
        files.append(out / fname)
        for sp in part:
            weight_map[sp.name] = fname
            total += _spec_nbytes(sp, "safetensors")
    if shards > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(model.config, indent=2) + "\n")
    return files


def _write_gguf(model: _Model, out: Path, seed: int) -> list[Path]:
    import gguf

    path = out / GGUF_FILE
    w = gguf.GGUFWriter(str(path), model.config["general.architecture"])
    for key, value in model.config.items():
        if key == "general.architecture":
            continue
        if isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_uint32(key, int(value))
    for sp in model.specs:
        nbytes = _spec_nbytes(sp, "gguf")
        row = nbytes // prod(sp.shape[:-1])
        w.add_tensor_info(sp.name, (*sp.shape[:-1], row), np.dtype(np.uint8), nbytes,
                          raw_dtype=gguf.GGMLQuantizationType[sp.dtype])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for sp in model.specs:
        data = _produce(seed, sp.name, sp.gen, sp.count).view(np.uint8)
        w.write_tensor_data(data)
    w.close()
    return [path]


def _resolve_kwargs(fmt: str, kw: dict[str, Any]) -> _Model:
    return _plan(fmt, kw.get("naming"), kw.get("layers"), kw.get("experts"), kw.get("hidden"),
                 kw.get("intermediate"), kw.get("experts_per_tok"), kw.get("group_size"), kw.get("gguf_types"),
                 kw.get("per_channel", False), kw.get("variant"), kw.get("preset"), kw.get("mtp"),
                 kw.get("numa_shards", 2))


def estimate(fmt: str = "bf16", **kwargs: Any) -> dict[str, int]:
    """Bytes a write_model call with these arguments would write, without writing:
    {"total": all tensor data, "staged": routed experts of the MoE layers, "tensors": count}."""
    model = _resolve_kwargs(fmt, kwargs)
    c = model.fmt.container
    return {"total": sum(_spec_nbytes(s, c) for s in model.specs),
            "staged": sum(_spec_nbytes(s, c) for s in model.specs if s.kind),
            "tensors": len(model.specs)}


def write_model(out_dir: str | os.PathLike[str], fmt: str = "bf16", *, naming: str | None = None,
                layers: int | None = None, experts: int | None = None, hidden: int | None = None,
                intermediate: int | None = None, experts_per_tok: int | None = None, seed: int = 0,
                shards: int = 1, group_size: int | None = None, gguf_types: Any = None,
                per_channel: bool = False, variant: str | Sequence[str] | None = None,
                preset: str | None = None, mtp: bool | None = None, numa_shards: int = 2) -> SynthInfo:
    """Write a synthetic MoE checkpoint into `out_dir` (created if missing) and describe it.

    Shape arguments left at None come from `preset` (default "tiny": layers=2, experts=8, hidden=256,
    intermediate=256, experts_per_tok=2, mtp=True). `fmt` is one of FORMAT_NAMES (or "gguf" with
    `gguf_types`: one type, (gate_up, down), (gate, up, down) or {proj: type}). `variant` selects
    variants the index must handle or refuse: fp8 "1d" (per-channel scales [N] instead of [N, 1]),
    rawint4 "asym", gptq-int4 "desc_act"/"asym", gguf "no-expert-counts". `numa_shards` is the
    `.numa.{n}` count of amx formats; `shards` the number of safetensors files.
    """
    model = _resolve_kwargs(fmt, {"naming": naming, "layers": layers, "experts": experts, "hidden": hidden,
                                  "intermediate": intermediate, "experts_per_tok": experts_per_tok,
                                  "group_size": group_size, "gguf_types": gguf_types,
                                  "per_channel": per_channel, "variant": variant, "preset": preset,
                                  "mtp": mtp, "numa_shards": numa_shards})
    if shards < 1 or (shards > 1 and model.fmt.container == "gguf"):
        raise ValueError(f"shards={shards} not possible for {model.fmt.name}")
    out = Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    if model.fmt.container == "gguf":
        files = _write_gguf(model, out, seed)
    else:
        files = _write_safetensors(model, out, seed, shards)
    c = model.fmt.container
    s = model.shape
    info = SynthInfo(
        path=str(out), fmt=model.fmt.name, naming=model.naming.name, config=model.config,
        moe_layers=model.moe_layers, tensor_count=len(model.specs),
        nbytes=sum(_spec_nbytes(sp, c) for sp in model.specs), files=tuple(str(p) for p in files),
        staged=tuple(sp.name for sp in model.specs if sp.kind),
        staged_nbytes=sum(_spec_nbytes(sp, c) for sp in model.specs if sp.kind), mtp_layer=model.mtp_layer,
        manifest_config={"num_experts": s.experts,
                         "experts_per_tok": None if "no-expert-counts" in model.opts.variants else s.experts_per_tok,
                         "hidden_size": s.hidden, "moe_intermediate_size": s.intermediate,
                         "layers": list(model.moe_layers)},
        options={"per_channel": model.opts.per_channel, "variants": sorted(model.opts.variants),
                 "group_size": model.opts.group_size or None,
                 "gguf_types": list(model.opts.gguf_types) if c == "gguf" else None,
                 "numa_shards": model.opts.numa_shards if model.fmt.layout == "amx" else None,
                 "seed": seed, "shards": shards})
    log.info("wrote %s: %s/%s, %d tensors, %d bytes", out, info.fmt, info.naming, info.tensor_count, info.nbytes)
    return info
