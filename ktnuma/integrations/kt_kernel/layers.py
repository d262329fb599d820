"""Engines for a staged layer (`ktnuma.attach(...).layer(L)` or a `ktnuma.stream` StagedLayer). Their checks
against the torch reference are a tool: `ktnuma.tools.engine_check`."""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ktnuma.errors import BadInput
from ktnuma.index.model import PROJS
from ktnuma.integrations.kt_kernel.backends import BACKENDS, DEFAULT_MAX_LEN, EngineSpec, _family, backend_for
from ktnuma.integrations.kt_kernel.engine import LoadedMoE, build_moe, forward, merge_node_rows

log = logging.getLogger(__name__)


# format family -> (which dim of the gate *scale* piece runs along K=H): the group size is H / that dim
GROUP_DIM: dict[str, int] = {"gptq-int4": 0, "rawint4": 1, "mxfp4": 1}

_next_layer_idx = iter(range(1 << 30))


def spec_for_layer(view: Any, *, experts_per_tok: int | None = None, max_len: int = DEFAULT_MAX_LEN) -> EngineSpec:
    """The whole-layer EngineSpec of a staged layer view (format, config and staged records).
    The group size (gptq/rawint4) is read off the staged scale shape; GGUF types off the dtypes."""
    cfg = view.config
    k = experts_per_tok if experts_per_tok is not None else cfg.get("experts_per_tok")
    if not k:
        raise BadInput("kt-kernel: the manifest has no experts_per_tok (GGUF without expert counts?); "
                       "pass experts_per_tok=")
    fam = _family(view.format)
    H = int(cfg["hidden_size"])
    first_node = view.nodes[0] if view.has("gate", "weight", view.nodes[0]) else next(
        n for n in view.nodes if view.has("gate", "weight", n))
    gs = None
    if fam in GROUP_DIM:
        rec = view.record("gate", "scale", first_node)
        gs = H // rec.shape[GROUP_DIM[fam]]
    types = None
    if fam == "gguf":
        types = tuple(view.record(p, "weight", first_node).dtype[5:] for p in PROJS)
    return backend_for(view.format, hidden=H, intermediate=int(cfg["moe_intermediate_size"]),
                       num_experts=int(cfg["num_experts"]), experts_per_tok=int(k), group_size=gs,
                       gguf_types=types, max_len=max_len)


def _check_piece(spec: EngineSpec, view: Any, proj: str, kind: str, node: int) -> None:
    want = spec.piece(proj, kind)
    r = view.record(proj, kind, node)
    if want is None or (r.dtype, tuple(r.shape)) != (want[0], tuple(want[1])):
        raise BadInput(f"kt-kernel {spec.engine_class}: staged layer {view.layer} node {node} {proj} {kind} is "
                       f"{r.dtype} {list(r.shape)}, the engine takes {want} (I per engine {spec.intermediate})")


class _ByExpert:
    """Indexable by expert number -> that expert's piece (ep: pieces spread over node segments)."""

    def __init__(self, view: Any, proj: str, kind: str) -> None:
        self.view, self.proj, self.kind = view, proj, kind

    def __getitem__(self, e: int) -> Any:
        return self.view.tensor(int(e), self.proj, self.kind)


@dataclass
class LayerEngines:
    """The kt-kernel MoE(s) of one staged layer. tp: one engine per node (width I/N, node order),
    whose outputs sum to the layer's; ep: one engine over every expert."""

    layer: int
    split: str
    spec: EngineSpec  # the whole layer
    parts: tuple[LoadedMoE, ...]
    nodes: tuple[int, ...]  # tp: the node of each part
    sources: tuple[Mapping[tuple[str, str], Any], ...]  # per part: arrays indexable by expert (reference)
    copied: int = 0  # bytes gathered into engine-side buffers before load (ep + flat over several nodes)

    def forward_parts(self, cpuinfer: Any, x: Any, ids: Any, weights: Any) -> list[Any]:
        return [forward(m, cpuinfer, x, ids, weights) for m in self.parts]

    def forward(self, cpuinfer: Any, x: Any, ids: Any, weights: Any) -> Any:
        """The layer's output as float32 (the sum of the parts' bf16 outputs)."""
        outs = self.forward_parts(cpuinfer, x, ids, weights)
        total = outs[0].float() if hasattr(outs[0], "float") else outs[0].astype("f4")
        for o in outs[1:]:
            total = total + (o.float() if hasattr(o, "float") else o.astype("f4"))
        return total

    @property
    def in_place(self) -> bool:
        return any(m.in_place for m in self.parts)

    def release_sources(self) -> None:
        """Drop every reference to the staged views (the reference arrays, and the engines' own
        `keep` when they copied at load), so a stream can unmap the layer when it moves on.
        Refused for engines that read the staged memory in place."""
        if self.in_place:
            raise BadInput(f"kt-kernel {self.spec.engine_class}: the engine reads the staged memory in place; "
                           "its sources must outlive it")
        self.sources = ()
        for m in self.parts:
            m.keep = ()


def engines_for_layer(
    view: Any,
    cpuinfer: Any,
    *,
    mode: str | None = None,
    experts_per_tok: int | None = None,
    max_len: int = DEFAULT_MAX_LEN,
    layer_idx: int | None = None,
) -> LayerEngines:
    """Build the kt-kernel MoE(s) of one staged layer (`view`: `Attached.layer(L)` or a stream's
    `StagedLayer`), reading the staged memory directly.

    - `tp` split: one engine per node over that node's slices (intermediate = I/N), `mode` "flat"
      (default: the node's stacked arrays) or "pointers" (the node's row of the pointer table);
    - `ep` split: one engine over all experts: "pointers" (default for the native formats: the
      nodes' pointer rows merged, zero-copy), or "flat" (GGUF's only way: one node's stacked
      arrays as they are, or, when the experts span several nodes, a gathered copy; `copied`
      says how many bytes).
    Engine-only limits (e.g. llamafile's I/N % 256) are refused with BadInput."""
    spec = spec_for_layer(view, experts_per_tok=experts_per_tok, max_len=max_len)
    b = BACKENDS[spec.backend]
    nodes = tuple(view.nodes)
    base = next(_next_layer_idx) * 64 if layer_idx is None else int(layer_idx)
    if view.split == "tp":
        n = len(nodes)
        part = spec.split(n) if n > 1 else spec
        m = mode or "flat"
        parts, sources = [], []
        for pos, node in enumerate(nodes):
            arrays: dict[tuple[str, str], Any] = {}
            refs: dict[tuple[str, str], Any] = {}
            for proj in PROJS:
                for kind in part.kinds:
                    _check_piece(part, view, proj, kind, node)
                    refs[(proj, kind)] = view.array(proj, kind, node)
                    arrays[(proj, kind)] = refs[(proj, kind)] if m == "flat" else view.pointers(proj, kind)[pos]
            parts.append(build_moe(cpuinfer, part, arrays, mode=m, layer_idx=base + pos))
            sources.append(refs)
        return LayerEngines(view.layer, "tp", spec, tuple(parts), nodes, tuple(sources))
    if view.split != "ep":
        raise BadInput(f"kt-kernel: unknown split {view.split!r}")
    m = mode or ("pointers" if b.pointer_mode else "flat")
    holders = [nd for nd in nodes if view.has("gate", "weight", nd)]
    arrays = {}
    refs = {}
    copied = 0
    for proj in PROJS:
        for kind in spec.kinds:
            for nd in holders:
                _check_piece(spec, view, proj, kind, nd)
            refs[(proj, kind)] = _ByExpert(view, proj, kind)
            if m == "pointers":
                arrays[(proj, kind)] = merge_node_rows(view.pointers(proj, kind), f"layer {view.layer} {proj} {kind}")
            elif len(holders) == 1:
                arrays[(proj, kind)] = view.array(proj, kind, holders[0])
            else:
                import numpy as np

                ordered = sorted(holders, key=lambda nd: view.record(proj, kind, nd).first)
                arrays[(proj, kind)] = np.concatenate([view.array(proj, kind, nd) for nd in ordered])
                copied += arrays[(proj, kind)].nbytes
    if copied:
        log.info("layer %d: %s over %d nodes takes one stacked buffer: gathered %d bytes", view.layer,
                 spec.engine_class, len(holders), copied)
    moe = build_moe(cpuinfer, spec, arrays, mode=m, layer_idx=base)
    return LayerEngines(view.layer, "ep", spec, (moe,), tuple(holders), (refs,), copied)


def random_tokens(spec: EngineSpec, tokens: int, seed: int = 0) -> tuple[Any, Any, Any]:
    """x [q, H] bf16 (torch), ids [q, k] int64, routing weights [q, k] float32 (numpy)."""
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    q = min(int(tokens), spec.max_len)
    x = torch.from_numpy(rng.standard_normal((q, spec.hidden), dtype=np.float32)).to(torch.bfloat16)
    ids = np.stack([rng.permutation(spec.num_experts)[: spec.experts_per_tok] for _ in range(q)]).astype(np.int64)
    w = rng.random((q, spec.experts_per_tok), dtype=np.float32)
    return x, ids, w
