"""Routed experts: `index_model` reads a model's headers into a ModelIndex.

The path: files -> readers (TensorExtents) -> naming rule (ktnuma.index.naming) -> format record
(ktnuma.index.quant) -> layout builder (ktnuma.index.layouts, chosen by the naming's layout).
"""
from __future__ import annotations

import os
import re
from collections import defaultdict
from collections.abc import Callable
from importlib import import_module
from typing import Any, Iterable

from ktnuma.errors import BadInput, FormatError, ModelError, ShapeMismatch
from ktnuma.host.shm import MAX_LAYER
from ktnuma.index import safetensors as st_reader
from ktnuma.index.config import load_config_json, lookup, quantization_config
from ktnuma.index.layouts.common import Context, collect
from ktnuma.index.model import ModelIndex, TensorExtent
from ktnuma.index.naming import SUFFIXES, Hit, NamingRule, match
from ktnuma.index.quant import AMX_FORMATS, QuantFormat, detectable
from ktnuma.text import ranges


def _lazy(module: str, name: str) -> Callable[..., Any]:
    """``module.name``, imported at its first call: a launch reads one format, and the readers and
    layouts of the others would only add to its start-up (the GGUF reader for a safetensors model)."""
    def call(*args: Any) -> Any:
        return getattr(import_module(module), name)(*args)
    return call


LAYOUTS: dict[str, Callable[[Context], ModelIndex]] = {
    "per-expert": _lazy("ktnuma.index.layouts.per_expert", "build"),
    "stacked": _lazy("ktnuma.index.layouts.stacked", "build"),
    "gguf": _lazy("ktnuma.index.layouts.gguf", "build"),
    "amx": _lazy("ktnuma.index.layouts.amx", "build"),
}


# ---------------------------------------------------------------- layer specs
def parse_layers(spec: str | Iterable[int] | None) -> tuple[int, ...] | None:
    """'1-3,7' -> (1, 2, 3, 7). Checkpoint layer numbers."""
    if spec is None:
        return None
    if not isinstance(spec, str):
        nums = tuple(sorted(set(int(x) for x in spec)))
        if nums and not 0 <= nums[0] <= nums[-1] <= MAX_LAYER:
            raise BadInput(f"layers: layer numbers must be in [0, {MAX_LAYER}], got {nums[0]}..{nums[-1]}")
        return nums
    out: set[int] = set()
    for part in spec[:4096].split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d{1,12})(?:-(\d{1,12}))?", part)
        if not m:
            raise BadInput(f"layers={spec[:80]!r}: {part[:40]!r} is not a layer number or range like 1-3")
        a = int(m.group(1))
        b = int(m.group(2)) if m.group(2) else a
        if b < a:
            raise BadInput(f"layers={spec[:80]!r}: range {part!r} runs backwards")
        if b > MAX_LAYER:  # bounded before anything is allocated: a layer number must fit a segment name
            raise BadInput(f"layers={spec[:80]!r}: layer {b} is beyond {MAX_LAYER}, the largest layer number "
                           "a segment name holds")
        out.update(range(a, b + 1))
    return tuple(sorted(out))


format_layers = ranges  # "1-3,7"


# ---------------------------------------------------------------- reading the files
_READERS = {".safetensors": st_reader.read_file, ".gguf": _lazy("ktnuma.index.gguf", "read_file")}


def _model_files(path: str) -> tuple[str, list[str]]:
    """(root dir, files) for a model path (a directory, or one .safetensors/.gguf file)."""
    if not os.path.exists(path):
        raise ModelError(f"{path}: model path does not exist")
    if not os.path.isfile(path) and not os.path.isdir(path):
        raise ModelError(f"{path}: not a regular file or a directory (a FIFO or device is never read)")
    if os.path.isfile(path):
        ext = os.path.splitext(path)[1]
        if ext not in _READERS:
            raise ModelError(f"{path}: not a .safetensors or .gguf file")
        return os.path.dirname(os.path.abspath(path)), [os.path.abspath(path)]
    root = os.path.abspath(path)
    if not os.access(root, os.R_OK | os.X_OK):
        raise ModelError(f"{root}: cannot read the model directory (permission denied)")
    st = st_reader.shard_paths(root)
    gg = sorted(os.path.join(root, n) for n in os.listdir(root) if n.endswith(".gguf"))
    if st and gg:
        raise ModelError(f"{root}: holds both .safetensors and .gguf files; pass the one to stage")
    if not st and not gg:
        raise ModelError(f"{root}: no .safetensors or .gguf files in the model directory")
    return root, st or gg


def _detect_format(hits: list[Hit], files: list[str], forced: str | None) -> QuantFormat:
    """The format record whose weight suffix and dtypes every expert weight matches."""
    weights = {(h.suffix, h.ext.dtype) for h in hits if SUFFIXES.get(h.suffix) == "weight"}
    if not weights:
        raise ModelError(f"{os.path.dirname(files[0])}: expert tensors found but no expert weights")
    candidates = [f for f in detectable() if forced is None or f.name == forced]
    if forced is not None and not candidates:
        raise BadInput(f"format={forced!r} is not a format for this naming")
    scales = {(h.suffix, h.ext.dtype) for h in hits if SUFFIXES.get(h.suffix) == "scale"}
    fits = [f for f in candidates if all(s in f.weight.suffixes and d in f.weight.dtypes for s, d in weights)]
    for f in fits:  # formats sharing a weight encoding (fp8/mxfp8, mxfp4/nvfp4) differ in their scales
        if not f.scales or any(s in f.scale_suffixes and d in f.scale_dtypes for s, d in scales):
            return f
    if fits:
        return fits[0]
    s, d = sorted(weights)[0]
    h = next(h for h in hits if (h.suffix, h.ext.dtype) == (s, d))
    what = f"format={forced}" if forced else "any known format"
    raise FormatError(files[h.ext.file], f"expert weight suffix {s!r} with dtype {d} matches {what}", h.ext.name)


# (naming layout) -> check of --format for namings that imply their format
_IMPLIED: dict[str, Callable[[str, str], str | None]] = {
    "gguf": lambda forced, path: None if forced.startswith("gguf") else
    f"format={forced!r} does not fit {path}, a GGUF model (use gguf:<TYPE> or leave it out)",
    "amx": lambda forced, path: None if forced in AMX_FORMATS else
    f"format={forced!r} does not fit pre-sharded `.numa.N` tensors (use {' or '.join(AMX_FORMATS)})",
}


def _format_for(naming: NamingRule, hits: list[Hit], paths: list[str], forced: str | None,
                cfg: dict[str, Any] | None, root: str) -> QuantFormat | None:
    implied = _IMPLIED.get(naming.layout)
    if implied is not None:
        why = implied(forced, paths[0]) if forced is not None else None
        if why:
            raise BadInput(why)
        return None
    fmt = _detect_format(hits, paths, forced)
    if fmt.check_config is not None:
        fmt.check_config(quantization_config(cfg), os.path.join(root, "config.json"))
    return fmt


# ---------------------------------------------------------------- building the index
def _check_dims(ctx: Context, layout: str) -> None:
    """Before any layout does arithmetic on shapes: no zero-size dimension, and expert weights at
    least 2-D ([out, in]; stacked [E, out, in]) except pre-sharded AMX blobs."""
    for (_layer, _proj, kind, _shard), by_expert in ctx.table.items():
        for t in by_expert.values():
            if 0 in t.shape:
                raise ShapeMismatch(ctx.paths[t.file], f"shape {list(t.shape)} has a zero-size dimension", t.name)
            if kind == "weight" and layout != "amx" and len(t.shape) < 2:
                raise ShapeMismatch(ctx.paths[t.file], f"expert weight of shape {list(t.shape)} is "
                                    f"{len(t.shape)}-D; expected [out, in]", t.name)



def index_model(path: str, format: str | None = None, layers: str | Iterable[int] | None = None) -> ModelIndex:
    """Read a model directory (headers only) into a ModelIndex of routed-expert pieces."""
    root, paths = _model_files(path)
    extents: list[TensorExtent] = []
    metas: list[dict[str, Any]] = []
    exts: list[str] = []
    for i, p in enumerate(paths):
        ext = os.path.splitext(p)[1]
        exts.append(ext)
        try:
            es, meta = _READERS[ext](p, i)
        except FileNotFoundError:
            raise FormatError(p, "file does not exist (dangling symlink?)") from None
        extents.extend(es)
        metas.append(meta)
    naming, hits = match(extents, paths, exts)
    cfg = load_config_json(root)
    gguf_meta: dict[str, Any] = {}
    if naming.reader == ".gguf":
        for m in metas:
            gguf_meta.update(m)
    found = lookup(cfg, gguf_meta)
    want_layers = parse_layers(layers)
    fmt = _format_for(naming, hits, paths, format, cfg, root)
    # ModelIndex.root is what the manifest records as the model path: the file itself when one was named
    where = os.path.abspath(path) if os.path.isfile(path) else root
    ctx = collect(where, paths, naming, fmt, hits, found, format, want_layers)
    _check_dims(ctx, naming.layout)
    index = LAYOUTS[naming.layout](ctx)
    big = [g.layer for g in index.groups if g.layer > MAX_LAYER]
    if big:  # a layer number must fit a segment name (ktnuma.<run>.L<layer>.n<node>)
        raise ModelError(f"{where}: layer number {big[0]} is beyond {MAX_LAYER}, the largest a segment name holds")
    return index


def layer_bytes(index: ModelIndex) -> dict[int, int]:
    out: dict[int, int] = defaultdict(int)
    for g in index.groups:
        out[g.layer] += g.nbytes * g.count
    return dict(out)
