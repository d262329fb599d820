"""Stacked tensors: one tensor per (layer, proj) holding every expert on dim 0, bf16.

Storage orders, told apart by the shapes (they cannot both fit unless a dim is 0) or fixed by the naming:
- concatenated: gate_up [E, 2I, H] = gate rows then up rows, down [E, H, I] (Qwen3.5 packed
  `mlp.experts.gate_up_proj`, GraniteMoeSWA `block_sparse_moe.experts.gate_up_proj`, Granite/JetMoe
  `input_linear`/`output_linear`);
- gpt-oss: gate_up [E, H, 2I] with gate and up INTERLEAVED on the last dim (gate = even columns, up =
  odd) and down [E, I, H]: both transposed against [out, in]. A gate/up piece is read as the node's
  column range of gate_up ([H, I] columns of gate/up pairs: gate and up share the read) and staged
  transposed, keeping its phase (bf16-even-T / bf16-odd-T): bf16 [I, H], bits unchanged; down is read
  as its [I, H] rows and staged transposed (bf16-T), bf16 [H, I]. Biases are not staged (GPT_OSS_NOTES).
- chunked columns (Llama4 `feed_forward.experts.gate_up_proj`, Aria `mlp.experts.fc1.weight`): gate_up
  [E, H, 2I] = gate columns then up columns, down [E, I, H]: the shapes of gpt-oss, so the naming
  decides. Gate/up are read as a strided column range of the [H, 2I] piece (H rows of I elements, 2I
  apart) and down as [I, H] rows; all three staged transposed (bf16-T), gate/up [I, H] and down [H, I].
- interleaved rows (Inkling2 `w13_weight`): [E, 2I, H] with gate = even rows, up = odd rows, down
  `w2_weight` [E, H, I]. Gate/up are staged as stored, bf16 [I, H]: every other row of the [2I, H] piece.
"""
from __future__ import annotations

from ktnuma.errors import FormatError
from ktnuma.index.dtypes import itemsize
from ktnuma.index.layouts.common import Context, group
from ktnuma.index.model import PROJS, ModelIndex, PieceGroup, TensorExtent
from ktnuma.index.quant import FORMATS, ROWS, down_dims

GPT_OSS_NOTES = {
    "layout": "gpt-oss: gate_up_proj [E, H, 2I] interleaves gate (even columns) and up (odd columns); gate and "
              "up are staged de-interleaved and transposed as bf16 [I, H] pieces, down_proj [E, I, H] "
              "transposed as bf16 [H, I]: the [out, in] orientation of every other format, bits unchanged",
    "biases": "gate_up_proj_bias [E, 2I] (interleaved like gate_up_proj) and down_proj_bias [E, H] are not "
              "staged: the manifest holds routed-expert weights and scales only and kt-kernel's MoE takes no "
              "expert biases; an engine that needs them loads them from the checkpoint",
}


CHUNK_NOTES = {
    "layout": "gate_up [E, H, 2I] holds gate (the first I columns) then up (the last I); gate and up are staged "
              "transposed as bf16 [I, H] pieces, down [E, I, H] transposed as bf16 [H, I]: the [out, in] "
              "orientation of every other format, bits unchanged",
}
ROW_NOTES = {
    "layout": "w13_weight [E, 2I, H] interleaves gate (even rows) and up (odd rows); gate and up are staged as "
              "stored, bf16 [I, H] pieces gathered row by row (stride 2H), w2_weight [E, H, I] as [H, I]",
}
# namings whose storage order is fixed by the model family (the shapes alone cannot tell gate-then-up rows
# from interleaved rows)
ORDER_OF_NAMING = {"llama4": "chunked", "aria": "chunked", "inkling2": "rows"}
SHAPES = {"chunked": "[E, H, 2I] + [E, I, H]", "rows": "[E, 2I, H] + [E, H, I]"}
STORED = {"chunked": "gpt-oss", "rows": "concatenated"}  # the shape order (_orders) each fixed order has


def _orders(gu: tuple[int, ...], dn: tuple[int, ...]) -> str | None:
    if len(gu) != 3 or len(dn) != 3 or gu[0] != dn[0]:
        return None
    if gu[1] == 2 * dn[2] and gu[2] == dn[1]:
        return "concatenated"
    if gu[2] == 2 * dn[1] and gu[1] == dn[2]:
        return "gpt-oss"
    return None


def build(ctx: Context) -> ModelIndex:
    gu = ctx.uniform("gate", "weight")
    dn = ctx.uniform("down", "weight")
    order = _orders(gu.shape, dn.shape)
    fixed = ORDER_OF_NAMING.get(ctx.naming.naming)
    if fixed is not None:
        if order != STORED[fixed]:
            raise ctx.err(gu, f"{ctx.naming.naming} stacked gate/up {list(gu.shape)} and down {list(dn.shape)} "
                              f"({dn.name!r}) are not {SHAPES[fixed]}")
        order = fixed
    if order is None:
        raise ctx.err(gu, f"stacked gate/up {list(gu.shape)} and down {list(dn.shape)} ({dn.name!r}) are neither "
                          f"[E, 2I, H] + [E, H, I] (gate then up) nor gpt-oss [E, H, 2I] + [E, I, H] (interleaved "
                          f"gate/up)")
    if order in ("concatenated", "rows"):
        n, two_i, hidden = gu.shape
    else:
        n, hidden, two_i = gu.shape
    inter = two_i // 2
    ctx.cross_check({"num_experts": n, "hidden_size": hidden, "moe_intermediate_size": inter},
                    f"{gu.name!r} shape {list(gu.shape)}")
    if gu.dtype != "bf16" or dn.dtype != "bf16":
        bad = gu if gu.dtype != "bf16" else dn
        raise FormatError(ctx.paths[bad.file], f"stacked expert tensors are staged from bf16 only, not {bad.dtype}",
                          bad.name)
    build_one = {"concatenated": _concatenated, "gpt-oss": _gpt_oss, "chunked": _chunked, "rows": _rows}[order]
    groups: list[PieceGroup] = []
    for layer in ctx.staged:
        for p in PROJS:
            groups.append(build_one(layer, ctx.table[(layer, p, "weight", None)][-1], p, n, hidden, inter))
    biases = any(x.name.endswith("_bias") for x in ctx.ignored)
    if order == "gpt-oss":
        notes = dict(GPT_OSS_NOTES) if biases else {"layout": GPT_OSS_NOTES["layout"]}
        return ctx.finish("bf16", groups, ctx.config(n, hidden, inter), naming="gpt-oss", notes=notes)
    notes = {"chunked": CHUNK_NOTES, "rows": ROW_NOTES}.get(order)
    return ctx.finish("bf16", groups, ctx.config(n, hidden, inter), notes=dict(notes) if notes else None)


def _concatenated(layer: int, x: TensorExtent, p: str, n: int, hidden: int, inter: int) -> PieceGroup:
    rule = FORMATS["bf16"].weight
    piece = inter * hidden * itemsize(x.dtype)
    if p == "down":
        offs = tuple(x.offset + e * piece for e in range(n))
        shape, dims = (hidden, inter), down_dims(rule.dims)
    else:
        base = x.offset + (piece if p == "up" else 0)
        offs = tuple(base + e * 2 * piece for e in range(n))
        shape, dims = (inter, hidden), rule.dims
    return group(layer, p, "weight", x, dims, note=rule.unit_note,
                 files=(x.file,) * n, offsets=offs, tensors=(x.name,) * n, shape=shape, nbytes=piece)


def _transposed_down(layer: int, x: TensorExtent, n: int, hidden: int, inter: int) -> PieceGroup:
    """down stored [I, H] (I on dim 0: tp cuts rows), staged transposed as [H, I]."""
    piece = inter * hidden * itemsize(x.dtype)
    return group(layer, "down", "weight", x, ROWS, note="{u}-element rows", files=(x.file,) * n,
                 offsets=tuple(x.offset + e * piece for e in range(n)), tensors=(x.name,) * n,
                 shape=(inter, hidden), nbytes=piece, conversion="bf16-T", staged_dtype="bf16")


def _gpt_oss(layer: int, x: TensorExtent, p: str, n: int, hidden: int, inter: int) -> PieceGroup:
    if p == "down":
        return _transposed_down(layer, x, n, hidden, inter)
    # gate/up: [H, I] columns of the [H, 2I] piece; one column = one gate/up pair (2 elements) read,
    # half of it staged
    isz = itemsize(x.dtype)
    piece = hidden * 2 * inter * isz
    return group(layer, p, "weight", x, (("H", 1), ("I", 1)), note="{u}-column gate/up pairs", files=(x.file,) * n,
                 offsets=tuple(x.offset + e * piece for e in range(n)), tensors=(x.name,) * n,
                 shape=(hidden, inter), nbytes=piece, quantum_bytes=2 * isz,
                 conversion="bf16-even-T" if p == "gate" else "bf16-odd-T", staged_dtype="bf16")


def _chunked(layer: int, x: TensorExtent, p: str, n: int, hidden: int, inter: int) -> PieceGroup:
    if p == "down":
        return _transposed_down(layer, x, n, hidden, inter)
    # gate/up: the first / last I columns of the [H, 2I] piece: H rows of I elements, 2I apart
    isz = itemsize(x.dtype)
    piece = hidden * 2 * inter * isz
    base = x.offset + (inter * isz if p == "up" else 0)
    return group(layer, p, "weight", x, (("H", 1), ("I", 1)), note="{u}-element columns", files=(x.file,) * n,
                 offsets=tuple(base + e * piece for e in range(n)), tensors=(x.name,) * n,
                 shape=(hidden, inter), nbytes=piece // 2, row_stride=2 * inter * isz, conversion="bf16-T",
                 staged_dtype="bf16")


def _rows(layer: int, x: TensorExtent, p: str, n: int, hidden: int, inter: int) -> PieceGroup:
    if p == "down":
        return _concatenated(layer, x, p, n, hidden, inter)  # [H, I]
    isz = itemsize(x.dtype)
    piece = 2 * inter * hidden * isz
    base = x.offset + (hidden * isz if p == "up" else 0)
    return group(layer, p, "weight", x, FORMATS["bf16"].weight.dims, note=FORMATS["bf16"].weight.unit_note,
                 files=(x.file,) * n, offsets=tuple(base + e * piece for e in range(n)), tensors=(x.name,) * n,
                 shape=(inter, hidden), nbytes=piece // 2, row_stride=2 * hidden * isz)
