"""The bench model: a synth checkpoint generated once per (format, size) into the cache dir, and its
routed-expert byte ranges."""
from __future__ import annotations

import json
import os


def ensure_model(cache: str, fmt: str, quick: bool, size: float | None, nodes: int = 2) -> tuple[str, dict]:
    from ktnuma.tools import synth

    if quick:
        # llamafile (GGUF) needs I/N % 256 per tp part; the AVX2 classes are fine with 256
        inter = 256 * nodes if fmt.startswith("gguf") else 256
        kw = dict(layers=2, experts=8, hidden=512, intermediate=inter, experts_per_tok=2, mtp=False)
        tag = f"quick-{inter}"
    else:
        kw = dict(preset="bench")
        if size:
            kw["layers"] = max(1, round(8 * size / 1.97))
        tag = f"bench-{kw.get('layers', 8)}"
    path = os.path.join(cache, f"{fmt.replace(':', '_')}-{tag}")
    stamp = os.path.join(path, ".ktnuma-bench.json")
    if os.path.exists(stamp):
        with open(stamp) as f:
            return path, json.load(f)
    info = synth.write_model(path, fmt, **kw)
    for f in info.files:  # dirty pages cannot be dropped from the page cache: write them back first
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    meta = {"staged_nbytes": info.staged_nbytes, "layers": list(info.moe_layers)}
    with open(stamp, "w") as f:
        json.dump(meta, f)
    return path, meta


def expert_ranges(model: str) -> tuple[list[str], list[tuple[int, int, int]], int, dict[str, list[str]]]:
    """(files, merged (file, offset, length) expert ranges, largest layer's bytes,
    {file: routed-expert tensor names} for the peers)."""
    from ktnuma.index.experts import index_model

    idx = index_model(model)
    spans = sorted((g.files[k], g.offsets[k], g.nbytes) for g in idx.groups for k in range(g.count))
    merged: list[list[int]] = []
    for f, o, n in spans:
        if merged and merged[-1][0] == f and merged[-1][1] + merged[-1][2] == o:
            merged[-1][2] += n
        else:
            merged.append([f, o, n])
    per_layer: dict[int, int] = {}
    names: dict[str, dict[str, None]] = {}
    for g in idx.groups:
        per_layer[g.layer] = per_layer.get(g.layer, 0) + g.count * g.nbytes
        for fi, t in zip(g.files, g.tensors):
            names.setdefault(idx.files[fi].path, {})[t] = None
    return ([f.path for f in idx.files], [tuple(m) for m in merged], max(per_layer.values()),
            {f: list(ns) for f, ns in names.items()})
