"""kt-kernel's pre-sharded AMX files: `blk.{L}.ffn_{gate,up,down}_exps.{e}.numa.{n}.{weight,scale}`,
opaque bytes staged as stored, shard n on node n."""
from __future__ import annotations

from ktnuma.errors import ModelError
from ktnuma.index.layouts.common import Context, group
from ktnuma.index.model import KINDS, PROJS, ModelIndex, PieceGroup


def build(ctx: Context) -> ModelIndex:
    shards = tuple(sorted({k[3] for k in ctx.table}))
    if shards != tuple(range(len(shards))):
        raise ModelError(f"{ctx.root}: pre-sharded `.numa.N` shards are {list(shards)}, not 0..{len(shards) - 1}")
    kinds = tuple(k for k in KINDS if any(key[2] == k for key in ctx.table))
    n = ctx.experts(kinds, shards)
    hidden = ctx.found.get("hidden_size", (0, ""))[0]
    inter = ctx.found.get("moe_intermediate_size", (0, ""))[0]
    if not hidden or not inter:
        raise ModelError(f"{ctx.root}: pre-sharded AMX tensors are opaque; config.json must give hidden_size "
                         f"and moe_intermediate_size")
    ctx.cross_check({"num_experts": n}, f"{n} experts in `.numa.N` tensors")
    gw = ctx.uniform("gate", "weight", 0)
    fmt = ctx.forced
    if fmt is None:
        ratio = gw.nbytes * len(shards) / (hidden * inter)
        fmt = "amx-int8" if ratio >= 0.75 else "amx-int4"
    groups: list[PieceGroup] = []
    for layer in ctx.staged:
        for shard in shards:
            for p in PROJS:
                for k in kinds:
                    x = ctx.uniform(p, k, shard)
                    d = ctx.table[(layer, p, k, shard)]
                    groups.append(group(layer, p, k, x, (("X", 1),) * len(x.shape), note="",
                                        files=tuple(d[e].file for e in range(n)),
                                        offsets=tuple(d[e].offset for e in range(n)),
                                        tensors=tuple(d[e].name for e in range(n)), shard=shard))
    return ctx.finish(fmt, groups, ctx.config(n, hidden, inter), shards=len(shards))
