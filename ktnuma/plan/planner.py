"""The planner: a pure function from (ModelIndex, Topology, split) to a Plan. No I/O.

The package: records.py (ArrayPlan, SegmentPlan, Plan, the Split record), splits.py (the
`--split` table: tp.py, ep.py, tp_whole.py), layout.py (building blocks of a split rule), ops.py (who
reads which source bytes, coalesced and chunked: the workers' read/scatter ops), validate.py.
This module keeps the names callers import (`from ktnuma.plan.planner import plan, ...`).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from ktnuma.errors import ConfigMismatch, PlanInvalid
from ktnuma.index.model import ModelIndex, PieceGroup
from ktnuma.plan.layout import ep_blocks, format_family, layout_key, node_ids, staged_slice, where
from ktnuma.plan.records import (ALIGN, PAGE, ArrayPlan, DropRange, LayerInput, Plan, SegmentPlan,
                                 Split)
from ktnuma.plan.splits import SPLITS, check_split, split_rule
from ktnuma.plan.validate import validate

__all__ = ["ALIGN", "PAGE", "ArrayPlan", "DropRange", "Plan", "PlanInvalid", "SegmentPlan", "Split",
           "SPLITS", "check_split", "ep_blocks", "format_family", "manifest_arrays", "node_ids", "plan",
           "validate"]

log = logging.getLogger(__name__)


def _drops(groups: Iterable[PieceGroup]) -> tuple[DropRange, ...]:
    spans: list[tuple[int, int, int]] = []
    for g in groups:
        nb = g.span
        spans.extend(zip(g.files, g.offsets, [o + nb for o in g.offsets]))
    spans.sort()
    out: list[DropRange] = []
    cur_f, cur_s, cur_e = -1, 0, 0
    for f, s, e in spans:
        s = s // PAGE * PAGE
        e = -(-e // PAGE) * PAGE
        if f == cur_f and s <= cur_e:
            if e > cur_e:
                cur_e = e
            continue
        if cur_f >= 0:
            out.append(DropRange(cur_f, cur_s, cur_e - cur_s))
        cur_f, cur_s, cur_e = f, s, e
    if cur_f >= 0:
        out.append(DropRange(cur_f, cur_s, cur_e - cur_s))
    return tuple(out)


def _layers(index: ModelIndex) -> dict[int, list[PieceGroup]]:
    by_layer: dict[int, list[PieceGroup]] = {}
    for g in index.groups:
        by_layer.setdefault(g.layer, []).append(g)
    for layer, gs in by_layer.items():
        gs.sort(key=layout_key)
        spans = {(g.first, g.count) for g in gs}
        if len(spans) != 1:
            raise ConfigMismatch(
                f"{where(index, gs[0])}: layer {layer} has groups over different expert ranges "
                f"{sorted(spans)}"
            )
    return by_layer


def plan(index: ModelIndex, topology: Any, split: str = "tp") -> Plan:
    """Per (layer, node): segment size and arrays for `split` over `topology`. Pure, no I/O."""
    nodes = node_ids(topology)
    check_split(index, len(nodes), split)
    rule = split_rule(split)
    by_layer = _layers(index)
    segments: list[SegmentPlan] = []
    drops: list[tuple[int, tuple[DropRange, ...]]] = []
    for layer, groups in by_layer.items():
        segments.extend(rule.layer(LayerInput(index, layer, tuple(groups), nodes)))
        drops.append((layer, _drops(groups)))
    log.debug("planned %s over %d node(s): %d layer(s), %d segment(s), %d array(s)", split, len(nodes),
              len(by_layer), len(segments), sum(len(s.arrays) for s in segments))
    return Plan(
        split=split,
        files=tuple(f.path for f in index.files),
        nodes=nodes,
        layers=tuple(by_layer),
        segments=tuple(segments),
        drops=tuple(drops),
        notes=rule.notes(index, nodes) if rule.notes else (),
    )


def manifest_arrays(plan: Plan, segment_name: Callable[[int, int], str] | str) -> list[dict]:
    """The manifest's "arrays" records, one per (layer, node, proj, kind) array.

    `segment_name(layer, node)` gives a segment's manifest name; a str is a format template
    with `{layer}` and `{node}` fields (e.g. "ktnuma.RUN.L{layer}.n{node}").
    """
    name = segment_name.format if isinstance(segment_name, str) else None
    out: list[dict] = []
    for s in plan.segments:
        seg = name(layer=s.layer, node=s.node) if name else segment_name(s.layer, s.node)  # type: ignore[operator]
        for a in s.arrays:
            out.append(
                {
                    "layer": a.layer,
                    "node": a.node,
                    "proj": a.proj,
                    "kind": a.kind,
                    "segment": seg,
                    "offset": a.offset,
                    "experts": [a.first, a.count],
                    "stride": a.stride,
                    "nbytes": a.nbytes,
                    "dtype": a.dtype,
                    "shape": list(a.shape),
                    "slice": None if a.slice is None else dict(zip(("dim", "start", "stop"), staged_slice(a))),
                }
            )
    return out
