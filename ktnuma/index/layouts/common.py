"""What every layout builder shares: the hits collected into a (layer, proj, kind, shard) table,
completeness and uniformity checks over experts, config cross-checks and PieceGroup construction."""
from __future__ import annotations

import logging
import math
import os
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Any, Iterable

from ktnuma.errors import BadInput, ConfigMismatch, FormatError, ModelError
from ktnuma.index.dtypes import FP8_BLOCK, GGML_TYPES, itemsize
from ktnuma.index.model import PROJS, ModelConfig, ModelIndex, PieceGroup, SourceFile, TensorExtent
from ktnuma.index.naming import SUFFIXES, Hit, NamingRule
from ktnuma.index.quant import Dims, QuantFormat
from ktnuma.text import ranges

log = logging.getLogger(__name__)

Key = tuple[int, str, str, "int | None"]  # (layer, proj, kind, shard)


@dataclass
class Context:
    """A matched model, collected: `table[(layer, proj, kind, shard)][expert]` is a tensor (stacked
    tensors: expert -1). `staged` are the layers to stage, `all_layers` every MoE layer found."""

    root: str
    paths: list[str]
    naming: NamingRule
    fmt: QuantFormat | None  # None where the naming implies the format (GGUF, AMX)
    found: dict[str, tuple[int, str]]
    forced: str | None
    table: dict[Key, dict[int, TensorExtent]]
    scale_suffixes: set[str]
    all_layers: tuple[int, ...] = ()
    staged: tuple[int, ...] = ()
    ignored: tuple[TensorExtent, ...] = ()  # expert tensors matched by the naming but never staged

    def err(self, ext: TensorExtent, reason: str) -> FormatError:
        return FormatError(self.paths[ext.file], reason, ext.name)

    # -- completeness and uniformity over experts
    def experts(self, kinds: tuple[str, ...], shards: tuple[Any, ...] = (None,), projs: tuple[str, ...] = PROJS) -> int:
        n = 0
        for d in self.table.values():
            n = max(n, max(d) + 1)
        for layer in self.all_layers:
            for proj in projs:
                for kind in kinds:
                    for shard in shards:
                        d = self.table.get((layer, proj, kind, shard), {})
                        for e in range(n):
                            if e not in d:
                                example = next(iter(next(iter(self.table.values())).values()))
                                raise ModelError(
                                    f"{self.root}: layer {layer} is missing {proj} {kind} of expert {e}"
                                    + (f" (shard {shard})" if shard is not None else "")
                                    + f" ({n} experts expected; tensors look like {example.name!r})"
                                )
        return n

    def uniform(self, proj: str, kind: str, shard: Any = None, layers: Iterable[int] | None = None) -> TensorExtent:
        """The (shape, dtype) every expert of (proj, kind) shares, checked over the MoE layers. Stacked
        tensors (one per layer) must agree in shape only: GGUF mixes quant types between layers (Q4_K_M)."""
        ref: TensorExtent | None = None
        for layer in self.all_layers if layers is None else layers:
            d = self.table.get((layer, proj, kind, shard))
            if not d:
                raise ModelError(f"{self.root}: layer {layer} has no {proj} {kind} tensor"
                                 + (f" (shard {shard})" if shard is not None else ""))
            for e, x in sorted(d.items()):
                if ref is None:
                    ref = x
                elif self.naming.stacked:
                    if x.shape != ref.shape:
                        raise self.err(x, f"shape {list(x.shape)} differs from {ref.name!r} {list(ref.shape)}")
                elif (x.shape, x.dtype) != (ref.shape, ref.dtype):
                    raise self.err(x, f"{proj} {kind} has shape {list(x.shape)} {x.dtype}, but {ref.name!r} has "
                                      f"{list(ref.shape)} {ref.dtype}; experts must agree")
        if ref is None:
            raise ModelError(f"{self.root}: no {proj} {kind} tensors")
        return ref

    def cross_check(self, derived: dict[str, int], evidence: str) -> None:
        for key, value in derived.items():
            if key in self.found and self.found[key][0] != value:
                v, where = self.found[key]
                raise ConfigMismatch(f"{self.root}: {where} = {v}, but the expert tensors give {key} = {value} "
                                     f"({evidence})")

    def drop_zero_experts(self) -> dict[str, str]:
        """LongCat-style zero (identity) experts: slots at or past the config's routed-expert count that
        hold some projections but not all. The engine computes only the routed experts, so only those
        are staged; returns the manifest note saying so ({} when there is nothing to drop)."""
        routed = self.found.get("num_experts")
        slots = 1 + max((e for d in self.table.values() for e in d), default=-1)
        if routed is None or slots <= routed[0]:
            return {}
        n = routed[0]
        extra = range(n, slots)
        kinds = {k[1:3] for k in self.table}
        incomplete = [e for e in extra if any(e not in self.table.get((layer, p, k, None), {})
                                              for layer in self.all_layers for p, k in kinds)]
        if not incomplete:
            return {}  # whole experts beyond the config's count: the cross-check reports the mismatch
        for d in self.table.values():
            for e in extra:
                d.pop(e, None)
        zero = self.found.get("zero_experts")
        why = f"{zero[1]} = {zero[0]}" if zero else "no down projection"
        return {"zero_experts": f"expert slots {ranges(list(extra))} hold only some projections: zero (identity) "
                                f"experts ({why}) that the engine does not compute; staged the {n} routed experts "
                                f"({routed[1]} = {n})"}

    def config(self, num_experts: int, hidden: int, inter: int, gs: int | None = None) -> ModelConfig:
        ept = self.found.get("experts_per_tok", (None, ""))[0]
        nh = self.found.get("num_hidden_layers", (None, ""))[0]
        return ModelConfig(num_experts, ept, hidden, inter, self.staged, nh, gs)

    def finish(self, fmt: str, groups: list[PieceGroup], cfg: ModelConfig, *, shards: int | None = None,
               notes: dict[str, str] | None = None, naming: str | None = None) -> ModelIndex:
        """The ModelIndex: only the files the staged groups use, renumbered."""
        used = sorted({f for g in groups for f in g.files})
        remap = {old: new for new, old in enumerate(used)}
        files = []
        for old in used:
            st = os.stat(self.paths[old])
            files.append(SourceFile(self.paths[old], st.st_size, st.st_mtime_ns))
        out = tuple(replace(g, files=tuple(remap[f] for f in g.files)) for g in groups)
        all_notes = dict(self.fmt.notes) if self.fmt is not None else {}
        if self.fmt is not None and self.fmt.staging:
            all_notes["staging"] = self.fmt.staging
        all_notes.update(notes or {})
        return ModelIndex(self.root, fmt, naming or self.naming.naming, tuple(files), cfg, out, self.all_layers,
                          shards=shards, notes=tuple(sorted(all_notes.items())))


def collect(root: str, paths: list[str], naming: NamingRule, fmt: QuantFormat | None, hits: list[Hit],
            found: dict[str, tuple[int, str]], forced: str | None, want_layers: tuple[int, ...] | None) -> Context:
    """Sort the hits into the (layer, proj, kind, shard) table; choose the staged layers."""
    table: dict[Key, dict[int, TensorExtent]] = defaultdict(dict)
    scale_suffixes: set[str] = set()
    ctx = Context(root, paths, naming, fmt, found, forced, table, scale_suffixes)
    ignored: list[TensorExtent] = []
    for h in hits:
        kind = SUFFIXES.get(h.suffix)
        if kind is None:
            if h.suffix not in SUFFIXES:
                log.debug("ignoring %s (suffix %r is not staged)", h.ext.name, h.suffix)
            ignored.append(h.ext)
            continue
        if fmt is not None:
            if kind == "weight" and h.suffix not in fmt.weight.suffixes:
                continue
            if kind == "global" and h.suffix != fmt.global_suffix:
                continue
            if kind == "scale":
                if h.suffix not in fmt.scale_suffixes:
                    continue
                if h.ext.dtype not in fmt.scale_dtypes:
                    raise ctx.err(h.ext, f"scale dtype {h.ext.dtype} is not one of {sorted(fmt.scale_dtypes)} for {fmt.name}")
                scale_suffixes.add(h.suffix)
        projs = ("gate", "up") if h.proj == "gate_up" else (h.proj,)
        for p in projs:
            key = (h.layer, p, kind, h.shard)
            if h.expert in table[key] and not naming.stacked:
                raise ctx.err(h.ext, f"duplicate expert {h.expert} (also {table[key][h.expert].name!r})")
            table[key][h.expert] = h.ext
    if len(scale_suffixes) > 1:
        raise ModelError(f"{root}: expert scales use several suffixes at once ({', '.join(sorted(scale_suffixes))})")
    all_layers = tuple(sorted({k[0] for k in table}))
    nh = found.get("num_hidden_layers", (None, ""))[0]
    if want_layers is None:
        staged = tuple(layer for layer in all_layers if nh is None or layer < nh) or all_layers
    else:
        missing = [layer for layer in want_layers if layer not in all_layers]
        if missing:
            raise BadInput(f"layers={ranges(want_layers)}: layer(s) {ranges(missing)} have no routed experts in {root} "
                           f"(MoE layers: {ranges(all_layers)})")
        staged = want_layers
    ctx.all_layers, ctx.staged, ctx.ignored = all_layers, staged, tuple(ignored)
    return ctx


def resolve_dims(dims: Dims, gs: int | None) -> Dims:
    """Named units ("gs", "blk") -> numbers."""
    units = {"gs": gs or 1, "blk": FP8_BLOCK}
    return tuple((a, units[u] if isinstance(u, str) else u) for a, u in dims)


def stored_shape(dims: Dims, logical: dict[str, int]) -> tuple[int, ...]:
    """The stored shape of a piece of resolved `dims` for logical sizes {"I": .., "H": ..}."""
    return tuple(1 if a == "one" else math.ceil(logical[a] / int(u)) for a, u in dims)


def group(layer: int, proj: str, kind: str, x: TensorExtent, dims: Dims, *, note: str, files: tuple[int, ...],
          offsets: tuple[int, ...], tensors: tuple[str, ...], shape: tuple[int, ...] | None = None,
          nbytes: int | None = None, quantum: int = 1, quantum_bytes: int | None = None,
          conversion: str | None = None, staged_dtype: str | None = None, note_fmt: dict[str, Any] | None = None,
          shard: int | None = None, row_stride: int = 0) -> PieceGroup:
    """A PieceGroup of resolved `dims`; `note` (a KindRule.unit_note) is resolved with the cut unit."""
    axes = [a for a, _ in dims]
    i_dim = axes.index("I") if "I" in axes else None
    i_unit = int(dims[i_dim][1]) if i_dim is not None else 1
    cut = i_unit * (quantum if i_dim == 1 else 1)
    unit_note = note.format(u=cut, **(note_fmt or {})) if i_dim is not None else ""
    dt = x.dtype
    if quantum_bytes is None:
        quantum_bytes = 0 if dt.startswith("gguf:") else itemsize(dt)
    return PieceGroup(
        layer=layer, proj=proj, kind=kind, dtype=dt, shape=shape or x.shape,
        nbytes=nbytes if nbytes is not None else x.nbytes,
        files=files, offsets=offsets, tensors=tensors, i_dim=i_dim, i_unit=i_unit, unit_note=unit_note,
        quantum=quantum, quantum_bytes=quantum_bytes, conversion=conversion, staged_dtype=staged_dtype or dt,
        shard=shard, row_stride=row_stride,
    )


def gguf_block(dtype: str) -> tuple[int, int, str]:
    """(block, type_size, name) of a "gguf:<T>" dtype."""
    t = GGML_TYPES[dtype.split(":", 1)[1]]
    return t.block, t.type_size, t.name
