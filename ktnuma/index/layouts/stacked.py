"""Stacked tensors: one tensor per (layer, proj) holding every expert on dim 0 (Qwen3.5 packed
`mlp.experts.gate_up_proj` [E, 2I, H] + `down_proj` [E, H, I], bf16)."""
from __future__ import annotations

from ktnuma.index.dtypes import itemsize
from ktnuma.index.layouts.common import Context, group
from ktnuma.index.model import PROJS, ModelIndex, PieceGroup
from ktnuma.index.quant import FORMATS, down_dims


def build(ctx: Context) -> ModelIndex:
    gu = ctx.uniform("gate", "weight")
    dn = ctx.uniform("down", "weight")
    if len(gu.shape) != 3 or gu.shape[1] % 2:
        raise ctx.err(gu, f"packed gate_up_proj shape {list(gu.shape)} is not [E, 2*I, H]")
    n, two_i, hidden = gu.shape
    inter = two_i // 2
    if dn.shape != (n, hidden, inter):
        raise ctx.err(dn, f"packed down_proj shape {list(dn.shape)}, expected {[n, hidden, inter]} from gate_up_proj {list(gu.shape)}")
    ctx.cross_check({"num_experts": n, "hidden_size": hidden, "moe_intermediate_size": inter},
                    f"{gu.name!r} shape {list(gu.shape)}")
    rule = FORMATS["bf16"].weight
    piece = inter * hidden * itemsize(gu.dtype)
    groups: list[PieceGroup] = []
    for layer in ctx.staged:
        for p in PROJS:
            x = ctx.table[(layer, p, "weight", None)][-1]
            if p == "down":
                offs = tuple(x.offset + e * piece for e in range(n))
                shape, dims = (hidden, inter), down_dims(rule.dims)
            else:
                base = x.offset + (piece if p == "up" else 0)
                offs = tuple(base + e * 2 * piece for e in range(n))
                shape, dims = (inter, hidden), rule.dims
            groups.append(group(layer, p, "weight", x, dims, note=rule.unit_note, files=(x.file,) * n, offsets=offs,
                                tensors=(x.name,) * n, shape=shape, nbytes=piece))
    return ctx.finish("bf16", groups, ctx.config(n, hidden, inter))
