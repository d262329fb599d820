"""write_model arguments -> a validated _Model (format, naming, options, shape, tensor specs)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ktnuma.index.dtypes import GGML_TYPES
from ktnuma.index.model import PROJS
from ktnuma.tools.synth.tables import FORMATS, FORMAT_NAMES, Format, GGUF_TYPES, PRESETS, Shape
from ktnuma.tools.synth.namings import NAMINGS
from ktnuma.tools.synth.encoders import Opts
from ktnuma.tools.synth.specs import _Model, _gguf_specs, _st_specs
from ktnuma.tools.synth.configs import _config

# ---- argument resolution and validation


def _parse_fmt(fmt: str, per_channel: bool, gguf_types: Any) -> tuple[Format, bool, tuple[str, str, str] | None]:
    name = fmt.strip()
    types: Any = gguf_types
    if name == "fp8-channel":
        name, per_channel = "fp8", True
    if name.startswith("gguf:"):
        name, t = "gguf", name[5:]
        types = gguf_types if gguf_types is not None else t
    if name not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; known: {', '.join(FORMAT_NAMES)}")
    if name != "fp8" and per_channel:
        raise ValueError(f"per_channel applies to fp8 only, not {name}")
    if name != "gguf":
        if gguf_types is not None:
            raise ValueError(f"gguf_types applies to gguf only, not {name}")
        return FORMATS[name], per_channel, None
    if types is None:
        types = "F16"
    if isinstance(types, str):
        types = [t.strip() for t in types.split(",")]
    if isinstance(types, dict):
        types = [types[p] for p in PROJS]
    types = [str(t).upper() for t in types]
    if len(types) == 1:
        types = types * 3
    elif len(types) == 2:  # gate/up, down
        types = [types[0], types[0], types[1]]
    if len(types) != 3 or any(t not in GGUF_TYPES for t in types):
        raise ValueError(f"gguf types {types} not understood; give one type, 'gate_up,down' or 'gate,up,down' "
                         f"from {', '.join(GGUF_TYPES)}")
    return FORMATS["gguf"], False, (types[0], types[1], types[2])


def _check_dims(fmt: Format, opts: Opts, h: int, i: int, dense_i: int) -> None:
    ks = {"hidden": h, "intermediate": i, "dense intermediate (2 x intermediate)": dense_i}
    problems = []
    if fmt.name in ("rawint4", "gptq-int4"):
        unit = int(np.lcm(8, opts.group_size))
        problems += [f"{k} {v} is not a multiple of lcm(8, group_size {opts.group_size})"
                     for k, v in ks.items() if v % unit]
        if fmt.name == "gptq-int4":
            problems += [f"{k} {v} is not a multiple of 8 (qzeros)" for k, v in ks.items() if v % 8]
    if fmt.group_size is None and fmt.k_multiple > 1 and fmt.layout == "per-expert":  # mxfp4/mxfp8/nvfp4 groups
        b = fmt.k_multiple
        problems += [f"{k} {v} is not a multiple of {b} ({fmt.name} blocks)" for k, v in ks.items() if v % b]
    if fmt.layout == "amx":
        sh = opts.numa_shards
        if sh < 1 or i % sh:
            problems.append(f"intermediate {i} does not split into {sh} numa shards")
        elif (i // sh) * h % (8 // fmt.amx_bits):
            problems.append("int4 shard does not fill whole bytes")
    if fmt.name == "gguf":
        for t in set(opts.gguf_types):
            b = GGML_TYPES[t].block
            problems += [f"{k} {v} is not a multiple of the {t} block ({b})" for k, v in ks.items() if v % b]
    if problems:
        raise ValueError(f"{fmt.name}: " + "; ".join(problems))


def _plan(fmt: str, naming: str | None, layers: int | None, experts: int | None, hidden: int | None,
          intermediate: int | None, experts_per_tok: int | None, group_size: int | None, gguf_types: Any,
          per_channel: bool, variant: str | Sequence[str] | None, preset: str | None, mtp: bool | None,
          numa_shards: int) -> _Model:
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    base = PRESETS[preset or "tiny"]
    given = {"layers": layers, "experts": experts, "hidden": hidden, "intermediate": intermediate,
             "experts_per_tok": experts_per_tok, "mtp": mtp}
    shape = Shape(**{k: (v if v is not None else getattr(base, k)) for k, v in given.items()})
    if shape.layers < 1 or shape.experts < 1 or not 1 <= shape.experts_per_tok <= shape.experts:
        raise ValueError(f"bad shape {shape}")
    f, per_channel, types = _parse_fmt(fmt, per_channel, gguf_types)
    nname = naming or f.namings[0]
    if nname not in f.namings:
        raise ValueError(f"naming {nname!r} is not written for format {f.name}; choose from {', '.join(f.namings)}")
    nm = NAMINGS[nname]
    if isinstance(variant, str):
        variant = [v.strip() for v in variant.split(",") if v.strip()]
    variants = frozenset(variant or ())
    unknown = variants - set(f.variants)
    if unknown:
        raise ValueError(f"variant(s) {sorted(unknown)} not known for {f.name}; "
                         f"known: {', '.join(f.variants) or 'none'}")
    if "1d" in variants and not per_channel:
        raise ValueError("variant 1d applies to per-channel fp8 scales only")
    if group_size is not None and f.group_size is None:
        raise ValueError(f"{f.name} has no group size option")
    opts = Opts(group_size or f.group_size or 0, per_channel, variants, numa_shards,
                types or ("F16", "F16", "F16"))
    dense_i = shape.intermediate if nm.config == "mixtral" else 2 * shape.intermediate
    _check_dims(f, opts, shape.hidden, shape.intermediate, dense_i)
    moe_layers = tuple(range(1, shape.layers + 1))
    mtp_layer = shape.layers + 1 if (shape.mtp and nm.mtp) else None
    m: dict[str, Any] = {"fmt": f, "naming": nm, "opts": opts, "shape": shape, "dense_i": dense_i,
                         "moe_layers": moe_layers, "mtp_layer": mtp_layer}
    specs = _gguf_specs(m) if f.container == "gguf" else _st_specs(m)
    return _Model(f, nm, opts, shape, dense_i, tuple(specs), _config(m), moe_layers, mtp_layer)
