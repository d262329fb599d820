"""GGUF: stacked `blk.{L}.ffn_{gate,up,down}_exps.weight` [E, rows, cols] of GGML blocks; layers may
mix quant types (Q4_K_M)."""
from __future__ import annotations

from ktnuma.errors import BadInput
from ktnuma.index.dtypes import GGML_TYPES, ggml_nbytes
from ktnuma.index.layouts.common import Context, group
from ktnuma.index.model import PROJS, ModelIndex, PieceGroup
from ktnuma.index.quant import FORMATS, down_dims, gguf_type


def build(ctx: Context) -> ModelIndex:
    refs = {p: ctx.uniform(p, "weight") for p in PROJS}
    gate, up, down = refs["gate"], refs["up"], refs["down"]
    for x in refs.values():
        if len(x.shape) != 3:
            raise ctx.err(x, f"stacked expert tensor has shape {list(x.shape)}, expected [experts, rows, cols]")
    n, inter, hidden = gate.shape
    if up.shape != gate.shape:
        raise ctx.err(up, f"shape {list(up.shape)} differs from gate's {list(gate.shape)}")
    if down.shape != (n, hidden, inter):
        raise ctx.err(down, f"shape {list(down.shape)}, expected {[n, hidden, inter]} from gate's {list(gate.shape)}")
    ctx.cross_check({"num_experts": n, "hidden_size": hidden, "moe_intermediate_size": inter},
                    f"{gate.name!r} shape {list(gate.shape)}")
    rule = FORMATS["gguf"].weight
    groups: list[PieceGroup] = []
    for layer in ctx.staged:
        for p in PROJS:
            x = ctx.table[(layer, p, "weight", None)][-1]
            t = GGML_TYPES[gguf_type(x.dtype)]  # type: ignore[index]
            rows, cols = x.shape[1], x.shape[2]
            piece = ggml_nbytes(t, rows * cols)
            dims = rule.dims if p != "down" else down_dims(rule.dims)
            groups.append(group(layer, p, "weight", x, dims, note=rule.unit_note, files=(x.file,) * n,
                                offsets=tuple(x.offset + e * piece for e in range(n)), tensors=(x.name,) * n,
                                shape=(rows, cols), nbytes=piece, quantum=t.block, quantum_bytes=t.type_size,
                                note_fmt={"T": t.name}))
    fmt = groups[0].dtype  # gguf:<type of the first staged gate>; arrays carry their own types
    if ctx.forced not in (None, "gguf", fmt):
        have = sorted({g.dtype for g in groups})
        raise BadInput(f"format={ctx.forced}: {ctx.root} stores its experts as {', '.join(have)}")
    return ctx.finish(fmt, groups, ctx.config(n, hidden, inter))
