"""Per-expert tensors (`...experts.{e}.{proj}.{suffix}`): one tensor per (expert, proj, kind), read
through the format record (orientation, scale variant, group size, conversion)."""
from __future__ import annotations

import math
import struct
from dataclasses import replace

from ktnuma.errors import ConfigMismatch, ModelError, UnsupportedQuantization
from ktnuma.index.layouts.common import Context, group, resolve_dims, stored_shape
from ktnuma.index.model import PROJS, ModelIndex, PieceGroup
from ktnuma.index.quant import Dims, down_dims


def _dims(dims: Dims, proj: str) -> Dims:
    return down_dims(dims) if proj == "down" else dims


def build(ctx: Context) -> ModelIndex:
    fmt = ctx.fmt
    assert fmt is not None
    kinds = ("weight", "scale") if fmt.scales else ("weight",)
    if fmt.scales and not ctx.scale_suffixes:
        raise ModelError(f"{ctx.root}: {fmt.name} expert weights found but no scales "
                         f"(expected suffix {' or '.join(sorted(fmt.scale_suffixes))})")
    if not any(key[1] == "gate" for key in ctx.table):
        example = next(iter(next(iter(ctx.table.values())).values()))
        raise UnsupportedQuantization(
            f"{ctx.root}: routed experts have up and down projections but no gate (un-gated experts, e.g. "
            f"Nemotron-H's relu2 MLP; tensors look like {example.name!r}): no engine here runs non-gated experts")
    notes = ctx.drop_zero_experts()
    if fmt.global_suffix:
        kinds_checked = kinds + ("global",)
    else:
        kinds_checked = kinds
    n = ctx.experts(kinds_checked)
    shapes = {(p, k): ctx.uniform(p, k) for p in PROJS for k in kinds}
    gate, up, down = (shapes[(p, "weight")] for p in PROJS)
    w_dims = fmt.weight.dims
    logical = {axis: dim * int(unit) for (axis, unit), dim in zip(w_dims, gate.shape)}
    hidden, inter = logical["H"], logical["I"]
    if up.shape != gate.shape:
        raise ctx.err(up, f"up weight shape {list(up.shape)} differs from gate's {list(gate.shape)}")
    want_down = stored_shape(down_dims(w_dims), logical)
    if down.shape != want_down:
        raise ctx.err(down, f"down weight shape {list(down.shape)} does not match gate's {list(gate.shape)} "
                            f"(expected {list(want_down)} for H={hidden}, I={inter})")
    rules = {"weight": fmt.weight}
    dims: dict[tuple[str, str], Dims] = {(p, "weight"): _dims(w_dims, p) for p in PROJS}
    gs: int | None = fmt.group
    if "scale" in kinds:
        gscale = shapes[("gate", "scale")]
        rule = rules["scale"] = fmt.scale_rule(gate.shape, gscale.shape)
        if any(u == "gs" for _, u in rule.dims):
            h_pos = [a for a, _ in rule.dims].index("H")
            stored_h = gscale.shape[h_pos] if len(gscale.shape) > h_pos else 0
            if stored_h <= 0 or hidden % stored_h:
                raise ctx.err(gscale, f"scale shape {list(gscale.shape)} gives no whole group size for H={hidden}")
            gs = hidden // stored_h
            cfg_gs = ctx.found.get("group_size")
            if cfg_gs and cfg_gs[0] != gs:
                raise ConfigMismatch(f"{ctx.root}: {cfg_gs[1]} = {cfg_gs[0]}, but scale {gscale.name!r} shape "
                                     f"{list(gscale.shape)} gives group size {gs}")
        for p in PROJS:
            sx = shapes[(p, "scale")]
            d = resolve_dims(_dims(rule.dims, p), gs)
            if rule.variant == "channel":  # [N] or [N, 1]
                lead = hidden if p == "down" else inter
                if sx.shape not in ((lead,), (lead, 1)):
                    raise ctx.err(sx, f"per-channel scale shape {list(sx.shape)}, expected [{lead}] or [{lead}, 1]")
                d = d + ((("one", 1),) if len(sx.shape) == 2 else ())
            want = stored_shape(d, logical)
            if sx.shape != want:
                raise ctx.err(sx, f"{p} scale shape {list(sx.shape)} does not match its weight (expected {list(want)})")
            dims[(p, "scale")] = d
    ctx.cross_check({"num_experts": n, "hidden_size": hidden, "moe_intermediate_size": inter},
                    f"{gate.name!r} shape {list(gate.shape)} {gate.dtype}, {n} experts")
    groups: list[PieceGroup] = []
    for layer in ctx.staged:
        for p in PROJS:
            for k in kinds:
                d = ctx.table[(layer, p, k, None)]
                x = shapes[(p, k)]
                r = rules[k]
                groups.append(group(layer, p, k, x, dims[(p, k)], note=r.unit_note,
                                    files=tuple(d[e].file for e in range(n)),
                                    offsets=tuple(d[e].offset for e in range(n)),
                                    tensors=tuple(d[e].name for e in range(n)),
                                    conversion=r.conversion(x.dtype), staged_dtype=r.staged_dtype(x.dtype)))
    if fmt.global_suffix:
        groups = [replace(g, globals=read_globals(ctx, g, n)) if g.kind == "scale" else g for g in groups]
    derived_gs = gs if any(u == "gs" for r in rules.values() for _, u in r.dims) else None
    return ctx.finish(fmt.name, groups, ctx.config(n, hidden, inter, derived_gs), notes=notes)


def read_globals(ctx: Context, g: PieceGroup, n: int) -> tuple[float, ...]:
    """Each expert's per-tensor f32 scale (NVFP4 weight_scale_2) of g's (layer, proj): 4 bytes each, the
    only tensor data the index reads."""
    d = ctx.table[(g.layer, g.proj, "global", None)]
    out = []
    for e in range(n):
        x = d[e]
        if x.dtype != "f32" or x.nbytes != 4:
            raise ctx.err(x, f"per-tensor global scale is {x.dtype} {list(x.shape)}, expected one f32")
        with open(ctx.paths[x.file], "rb") as f:
            f.seek(x.offset)
            raw = f.read(4)
        if len(raw) != 4:
            raise ctx.err(x, "file ends inside the global scale")
        v = struct.unpack("<f", raw)[0]
        if not math.isfinite(v):
            raise ctx.err(x, f"global scale {v} is not finite")
        out.append(v)
    return tuple(out)
