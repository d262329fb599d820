"""Routed experts: naming rules, format rules and orientation as data; `index_model` builds a ModelIndex.

Three tables drive everything (no per-format loops, no string sniffing scattered around):
- NAMING_RULES: tensor-name patterns that carry (layer, expert, proj, suffix[, shard]);
- SUFFIXES + FORMAT_RULES: which suffix is a weight or a scale, and which (suffix, dtype) means which format;
- ORIENTATION: per (format family, kind) which stored dim is I or H and in which unit, plus conversions.
"""
from __future__ import annotations

import logging
import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable

from ktnuma.text import ranges
from ktnuma.index.config import load_config_json, lookup, quantization_config
from ktnuma.errors import BadInput, ConfigMismatch, FormatError, ModelError, UnsupportedQuantization
from ktnuma.index import gguf as gguf_reader
from ktnuma.index import safetensors as st_reader
from ktnuma.index.dtypes import FP8_BLOCK, GGML_TYPES, itemsize
from ktnuma.index.model import KINDS, PROJS, ModelConfig, ModelIndex, PieceGroup, SourceFile, TensorExtent

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- naming rules
_LAYER = r"^(?:model\.language_model\.|language_model\.model\.|model\.)?layers\.(?P<layer>\d+)"
_SUFFIX = r"\.(?P<suffix>[A-Za-z_]+)$"
_DS = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
_W = {"w1": "gate", "w3": "up", "w2": "down"}
_GG = {"gate": "gate", "up": "up", "down": "down"}


@dataclass(frozen=True)
class NamingRule:
    naming: str
    pattern: re.Pattern[str]
    projs: dict[str, str]  # token in the name -> gate|up|down ("gate_up" = packed gate and up)
    stacked: bool = False  # one tensor holds every expert, experts on dim 0
    reader: str = ".safetensors"  # which reader's files this rule applies to


NAMING_RULES: tuple[NamingRule, ...] = (
    NamingRule("deepseek", re.compile(_LAYER + r"\.mlp\.experts\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)" + _SUFFIX), _DS),
    NamingRule("mixtral", re.compile(_LAYER + r"\.block_sparse_moe\.experts\.(?P<expert>\d+)\.(?P<proj>w[123])" + _SUFFIX), _W),
    NamingRule("v4flash", re.compile(_LAYER + r"\.ffn\.experts\.(?P<expert>\d+)\.(?P<proj>w[123])" + _SUFFIX), _W),
    NamingRule("mistral", re.compile(_LAYER + r"\.experts\.(?P<expert>\d+)\.(?P<proj>w[123])" + _SUFFIX), _W),
    NamingRule("packed", re.compile(_LAYER + r"\.mlp\.experts\.(?P<proj>gate_up|down)_proj$"), {"gate_up": "gate_up", "down": "down"}, stacked=True),
    NamingRule("amx", re.compile(r"^blk\.(?P<layer>\d+)\.ffn_(?P<proj>gate|up|down)_exps\.(?P<expert>\d+)\.numa\.(?P<shard>\d+)" + _SUFFIX), _GG),
    NamingRule("gguf", re.compile(r"^blk\.(?P<layer>\d+)\.ffn_(?P<proj>gate|up|down)_exps\.(?P<suffix>weight)$"), _GG, stacked=True, reader=".gguf"),
)

# suffix -> "weight" | "scale" | None (never staged); REFUSED suffixes stop the index with the reason.
SUFFIXES: dict[str, str | None] = {
    "weight": "weight",
    "weight_packed": "weight",
    "qweight": "weight",
    "weight_scale_inv": "scale",
    "weight_scale": "scale",
    "scales": "scale",
    "scale": "scale",
    "qzeros": None,
    "g_idx": None,
    "weight_shape": None,
    "bias": None,
    "input_scale": None,
}
REFUSED_SUFFIXES: dict[str, str] = {
    "weight_zero_point": "asymmetric int4 (weight_zero_point) is not supported; only symmetric checkpoints are",
}


@dataclass(frozen=True)
class FormatRule:
    format: str
    family: str  # key into ORIENTATION
    weight_suffix: str
    weight_dtypes: frozenset[str]
    scale_suffixes: frozenset[str]  # empty: no scales
    scale_dtypes: frozenset[str]


FORMAT_RULES: tuple[FormatRule, ...] = (
    FormatRule("bf16", "bf16", "weight", frozenset({"bf16"}), frozenset(), frozenset()),
    FormatRule("fp8", "fp8", "weight", frozenset({"f8_e4m3"}), frozenset({"weight_scale_inv", "weight_scale"}), frozenset({"f32"})),
    FormatRule("mxfp4", "mxfp4", "weight", frozenset({"i8", "u8"}), frozenset({"scale"}), frozenset({"f8_e8m0", "u8"})),
    FormatRule("rawint4", "rawint4", "weight_packed", frozenset({"i32"}), frozenset({"weight_scale"}), frozenset({"bf16"})),
    FormatRule("gptq-int4", "gptq-int4", "qweight", frozenset({"i32"}), frozenset({"scales"}), frozenset({"f16"})),
)
AMX_FORMATS = ("amx-int4", "amx-int8")


@dataclass(frozen=True)
class Orientation:
    """Stored dims of a gate/up piece as (axis, unit); down swaps I and H. unit "gs": the group size,
    "blk": the 128-wide FP8 block. `i_note` names the unit of the I dim for split refusals."""

    dims: tuple[tuple[str, int | str], ...]
    i_note: str = ""
    conversion: str | None = None
    staged_dtype: str | None = None  # None: as stored


ORIENTATION: dict[tuple[str, str], Orientation] = {
    ("bf16", "weight"): Orientation((("I", 1), ("H", 1))),
    ("fp8", "weight"): Orientation((("I", 1), ("H", 1))),
    ("fp8", "scale"): Orientation((("I", "blk"), ("H", "blk")), "128-wide FP8 scale blocks"),
    ("fp8-channel", "scale"): Orientation((("I", 1),)),
    ("rawint4", "weight"): Orientation((("I", 1), ("H", 8)), "int32 words of 8 int4 values"),
    ("rawint4", "scale"): Orientation((("I", 1), ("H", "gs")), "{gs}-wide int4 scale groups"),
    ("gptq-int4", "weight"): Orientation((("H", 8), ("I", 1)), "int32 words of 8 int4 values"),
    ("gptq-int4", "scale"): Orientation((("H", "gs"), ("I", 1)), "{gs}-wide GPTQ scale groups", "f16->f32", "f32"),
    ("mxfp4", "weight"): Orientation((("I", 1), ("H", 2)), "bytes of 2 FP4 values", None, "u8"),
    ("mxfp4", "scale"): Orientation((("I", 1), ("H", 32)), "32-wide MXFP4 scale groups", "ue8m0->bf16", "bf16"),
    ("gguf", "weight"): Orientation((("I", 1), ("H", 1)), "{T} blocks of {block} weights"),
}


def _down(dims: tuple[tuple[str, int | str], ...]) -> tuple[tuple[str, int | str], ...]:
    swap = {"I": "H", "H": "I"}
    return tuple((swap.get(a, a), u) for a, u in dims)


# ---------------------------------------------------------------- layer specs
def parse_layers(spec: str | Iterable[int] | None) -> tuple[int, ...] | None:
    """'1-3,7' -> (1, 2, 3, 7). Checkpoint layer numbers."""
    if spec is None:
        return None
    if not isinstance(spec, str):
        return tuple(sorted(set(int(x) for x in spec)))
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise BadInput(f"--layers {spec!r}: {part!r} is not a layer number or range like 1-3")
        a = int(m.group(1))
        b = int(m.group(2)) if m.group(2) else a
        if b < a:
            raise BadInput(f"--layers {spec!r}: range {part!r} runs backwards")
        out.update(range(a, b + 1))
    return tuple(sorted(out))


format_layers = ranges  # "1-3,7"


# ---------------------------------------------------------------- reading the files
_READERS = {".safetensors": st_reader.read_file, ".gguf": gguf_reader.read_file}


def _model_files(path: str) -> tuple[str, list[str]]:
    """(root dir, files) for a model path (a directory, or one .safetensors/.gguf file)."""
    if not os.path.exists(path):
        raise ModelError(f"{path}: model path does not exist")
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


@dataclass(frozen=True)
class _Hit:
    layer: int
    expert: int
    proj: str
    suffix: str
    shard: int | None
    ext: TensorExtent


def _match(extents: list[TensorExtent], files: list[str], ext_of_file: list[str]) -> tuple[NamingRule, list[_Hit]]:
    by_rule: dict[str, list[_Hit]] = defaultdict(list)
    rules = {r.naming: r for r in NAMING_RULES}
    for e in extents:
        for rule in NAMING_RULES:
            if rule.reader != ext_of_file[e.file]:
                continue
            m = rule.pattern.match(e.name)
            if m is None:
                continue
            g = m.groupdict()
            suffix = g.get("suffix") or "weight"
            if suffix in REFUSED_SUFFIXES:
                raise UnsupportedQuantization(f"{files[e.file]}: tensor {e.name!r}: {REFUSED_SUFFIXES[suffix]}")
            shard = int(g["shard"]) if g.get("shard") is not None else None
            expert = int(g["expert"]) if g.get("expert") is not None else -1
            by_rule[rule.naming].append(
                _Hit(int(g["layer"]), expert, rule.projs[g["proj"]], suffix, shard, e)
            )
            break
    if not by_rule:
        raise ModelError(f"{os.path.dirname(files[0])}: no routed-expert tensors found (namings tried: "
                         f"{', '.join(r.naming for r in NAMING_RULES)})")
    if len(by_rule) > 1:
        names = sorted(by_rule)
        raise ModelError(f"{os.path.dirname(files[0])}: tensors follow several expert namings at once ({', '.join(names)})")
    naming = next(iter(by_rule))
    return rules[naming], by_rule[naming]


def _detect_rule(hits: list[_Hit], files: list[str], forced: str | None) -> FormatRule:
    weights = {(h.suffix, h.ext.dtype) for h in hits if SUFFIXES.get(h.suffix) == "weight"}
    if not weights:
        raise ModelError(f"{os.path.dirname(files[0])}: expert tensors found but no expert weights")
    candidates = [r for r in FORMAT_RULES if forced is None or r.format == forced]
    if forced is not None and not candidates:
        raise BadInput(f"--format {forced!r} is not a format for this naming")
    for rule in candidates:
        if all(s == rule.weight_suffix and d in rule.weight_dtypes for s, d in weights):
            return rule
    s, d = sorted(weights)[0]
    h = next(h for h in hits if (h.suffix, h.ext.dtype) == (s, d))
    what = f"--format {forced}" if forced else "any known format"
    raise FormatError(files[h.ext.file], f"expert weight suffix {s!r} with dtype {d} matches {what}", h.ext.name)


def _check_quant_config(rule: FormatRule, cfg: dict[str, Any] | None, root: str) -> None:
    qc = quantization_config(cfg)
    cfg_path = os.path.join(root, "config.json")
    if rule.format == "gptq-int4":
        if qc.get("desc_act") is True:
            raise UnsupportedQuantization(f"{cfg_path}: GPTQ desc_act=true (act-order) is not supported; requantize with desc_act=false")
        if qc.get("sym") is False:
            raise UnsupportedQuantization(f"{cfg_path}: GPTQ sym=false (asymmetric) is not supported; only sym=true")
        if qc.get("bits") not in (None, 4):
            raise UnsupportedQuantization(f"{cfg_path}: GPTQ bits={qc.get('bits')} is not supported; only 4-bit")
    if rule.format == "rawint4":
        groups = qc.get("config_groups")
        for name, g in (groups.items() if isinstance(groups, dict) else []):
            w = g.get("weights") if isinstance(g, dict) else None
            if isinstance(w, dict) and w.get("symmetric") is False:
                raise UnsupportedQuantization(f"{cfg_path}: config_groups.{name}: asymmetric int4 (symmetric=false) is not supported")


# ---------------------------------------------------------------- building the index
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
    rule, hits = _match(extents, paths, exts)
    cfg = load_config_json(root)
    gguf_meta: dict[str, Any] = {}
    if rule.reader == ".gguf":
        for m in metas:
            gguf_meta.update(m)
    found = lookup(cfg, gguf_meta)
    want_layers = parse_layers(layers)
    if rule.naming == "gguf":
        fmt_rule = None
        if format is not None and not format.startswith("gguf"):
            raise BadInput(f"--format {format!r} does not fit {paths[0]}, a GGUF model (use gguf:<TYPE> or leave it out)")
    elif rule.naming == "amx":
        fmt_rule = None
        if format is not None and format not in AMX_FORMATS:
            raise BadInput(f"--format {format!r} does not fit pre-sharded `.numa.N` tensors (use amx-int4 or amx-int8)")
    else:
        fmt_rule = _detect_rule(hits, paths, format)
        _check_quant_config(fmt_rule, cfg, root)
    # ModelIndex.root is what the manifest records as the model path: the file itself when one was named
    where = os.path.abspath(path) if os.path.isfile(path) else root
    builder = _Builder(where, paths, rule, fmt_rule, hits, found, format)
    return builder.build(want_layers)


class _Builder:
    def __init__(self, root: str, paths: list[str], naming: NamingRule, fmt: FormatRule | None,
                 hits: list[_Hit], found: dict[str, tuple[int, str]], forced: str | None) -> None:
        self.root, self.paths, self.naming, self.fmt = root, paths, naming, fmt
        self.hits, self.found, self.forced = hits, found, forced

    # -- helpers
    def _err(self, ext: TensorExtent, reason: str) -> FormatError:
        return FormatError(self.paths[ext.file], reason, ext.name)

    def build(self, want_layers: tuple[int, ...] | None) -> ModelIndex:
        # (layer, proj, kind, shard) -> {expert: extent}, plus stacked tensors
        table: dict[tuple[int, str, str, int | None], dict[int, TensorExtent]] = defaultdict(dict)
        scale_suffixes: set[str] = set()
        for h in self.hits:
            kind = SUFFIXES.get(h.suffix, None) if h.suffix in SUFFIXES else None
            if kind is None:
                if h.suffix not in SUFFIXES:
                    log.debug("ignoring %s (suffix %r is not staged)", h.ext.name, h.suffix)
                continue
            if self.fmt is not None:
                if kind == "weight" and h.suffix != self.fmt.weight_suffix:
                    continue
                if kind == "scale":
                    if h.suffix not in self.fmt.scale_suffixes:
                        continue
                    if h.ext.dtype not in self.fmt.scale_dtypes:
                        raise self._err(h.ext, f"scale dtype {h.ext.dtype} is not one of {sorted(self.fmt.scale_dtypes)} for {self.fmt.format}")
                    scale_suffixes.add(h.suffix)
            projs = ("gate", "up") if h.proj == "gate_up" else (h.proj,)
            for p in projs:
                key = (h.layer, p, kind, h.shard)
                if h.expert in table[key] and not self.naming.stacked:
                    raise self._err(h.ext, f"duplicate expert {h.expert} (also {table[key][h.expert].name!r})")
                table[key][h.expert] = h.ext
        if len(scale_suffixes) > 1:
            raise ModelError(f"{self.root}: expert scales use several suffixes at once ({', '.join(sorted(scale_suffixes))})")
        all_layers = tuple(sorted({k[0] for k in table}))
        nh = self.found.get("num_hidden_layers", (None, ""))[0]
        if want_layers is None:
            staged = tuple(l for l in all_layers if nh is None or l < nh)
            if not staged:
                staged = all_layers
        else:
            missing = [l for l in want_layers if l not in all_layers]
            if missing:
                raise BadInput(f"--layers: layer(s) {format_layers(missing)} have no routed experts in {self.root} "
                               f"(MoE layers: {format_layers(all_layers)})")
            staged = want_layers
        if self.naming.naming == "gguf":
            return self._build_gguf(table, all_layers, staged)
        if self.naming.naming == "amx":
            return self._build_amx(table, all_layers, staged)
        return self._build_safetensors(table, all_layers, staged, scale_suffixes)

    # -- completeness and uniformity over experts
    def _experts(self, table: dict, all_layers: tuple[int, ...], kinds: tuple[str, ...], shards: tuple[Any, ...] = (None,)) -> int:
        n = 0
        for key, d in table.items():
            n = max(n, max(d) + 1)
        for layer in all_layers:
            for proj in PROJS:
                for kind in kinds:
                    for shard in shards:
                        d = table.get((layer, proj, kind, shard), {})
                        for e in range(n):
                            if e not in d:
                                example = next(iter(next(iter(table.values())).values()))
                                raise ModelError(
                                    f"{self.root}: layer {layer} is missing {proj} {kind} of expert {e}"
                                    + (f" (shard {shard})" if shard is not None else "")
                                    + f" ({n} experts expected; tensors look like {example.name!r})"
                                )
        return n

    def _uniform(self, table: dict, layers: Iterable[int], proj: str, kind: str, shard: Any = None) -> TensorExtent:
        """The (shape, dtype) every expert of (proj, kind) shares, checked over `layers`. Stacked tensors
        (one per layer) must agree in shape only: GGUF mixes quant types between layers (Q4_K_M)."""
        ref: TensorExtent | None = None
        for layer in layers:
            d = table.get((layer, proj, kind, shard))
            if not d:
                raise ModelError(f"{self.root}: layer {layer} has no {proj} {kind} tensor"
                                 + (f" (shard {shard})" if shard is not None else ""))
            for e, x in sorted(d.items()):
                if ref is None:
                    ref = x
                elif self.naming.stacked:
                    if x.shape != ref.shape:
                        raise self._err(x, f"shape {list(x.shape)} differs from {ref.name!r} {list(ref.shape)}")
                elif (x.shape, x.dtype) != (ref.shape, ref.dtype):
                    raise self._err(x, f"{proj} {kind} has shape {list(x.shape)} {x.dtype}, but {ref.name!r} has "
                                       f"{list(ref.shape)} {ref.dtype}; experts must agree")
        if ref is None:
            raise ModelError(f"{self.root}: no {proj} {kind} tensors")
        return ref

    def _cross_check(self, derived: dict[str, int], evidence: str) -> None:
        for key, value in derived.items():
            if key in self.found and self.found[key][0] != value:
                v, where = self.found[key]
                raise ConfigMismatch(f"{self.root}: {where} = {v}, but the expert tensors give {key} = {value} "
                                     f"({evidence})")

    def _files(self, groups: list[PieceGroup]) -> tuple[tuple[SourceFile, ...], list[PieceGroup]]:
        used = sorted({f for g in groups for f in g.files})
        remap = {old: new for new, old in enumerate(used)}
        files = []
        for old in used:
            st = os.stat(self.paths[old])
            files.append(SourceFile(self.paths[old], st.st_size, st.st_mtime_ns))
        from dataclasses import replace
        out = [replace(g, files=tuple(remap[f] for f in g.files)) for g in groups]
        return tuple(files), out

    def _config(self, num_experts: int, hidden: int, inter: int, staged: tuple[int, ...], gs: int | None) -> ModelConfig:
        ept = self.found.get("experts_per_tok", (None, ""))[0]
        nh = self.found.get("num_hidden_layers", (None, ""))[0]
        return ModelConfig(num_experts, ept, hidden, inter, staged, nh, gs)

    # -- safetensors formats
    def _build_safetensors(self, table: dict, all_layers: tuple[int, ...], staged: tuple[int, ...], scale_suffixes: set[str]) -> ModelIndex:
        fmt = self.fmt
        assert fmt is not None
        kinds = ("weight", "scale") if fmt.scale_suffixes else ("weight",)
        if fmt.scale_suffixes and not scale_suffixes:
            raise ModelError(f"{self.root}: {fmt.format} expert weights found but no scales "
                             f"(expected suffix {' or '.join(sorted(fmt.scale_suffixes))})")
        if self.naming.stacked:
            return self._build_packed(table, all_layers, staged)
        n = self._experts(table, all_layers, kinds)
        shapes = {(p, k): self._uniform(table, all_layers, p, k) for p in PROJS for k in kinds}
        family = fmt.family
        # H and I from gate's weight through the orientation table
        w_or = ORIENTATION[(family, "weight")]
        gate, up, down = (shapes[(p, "weight")] for p in PROJS)
        logical: dict[str, int] = {}
        for (axis, unit), dim in zip(w_or.dims, gate.shape):
            logical[axis] = dim * int(unit)
        hidden, inter = logical["H"], logical["I"]
        if up.shape != gate.shape:
            raise self._err(up, f"up weight shape {list(up.shape)} differs from gate's {list(gate.shape)}")
        want_down = tuple(logical[a] // int(u) for a, u in _down(w_or.dims))
        if down.shape != want_down:
            raise self._err(down, f"down weight shape {list(down.shape)} does not match gate's {list(gate.shape)} "
                                  f"(expected {list(want_down)} for H={hidden}, I={inter})")
        # scales: fp8 per-channel vs block, group size
        gs: int | None = None
        orient: dict[tuple[str, str], tuple[tuple[str, int | str], ...] | None] = {}
        for p in PROJS:
            orient[(p, "weight")] = w_or.dims if p != "down" else _down(w_or.dims)
        s_family = family
        if "scale" in kinds:
            gscale = shapes[("gate", "scale")]
            if family == "fp8":
                gw = gate.shape
                per_channel = gscale.shape[0] == gw[0] and (len(gscale.shape) == 1 or gscale.shape[1] == 1)
                if per_channel:
                    s_family = "fp8-channel"
            s_dims = ORIENTATION[(s_family, "scale")].dims
            if s_family in ("rawint4", "gptq-int4"):
                h_pos = [a for a, _ in s_dims].index("H")
                stored_h = gscale.shape[h_pos] if len(gscale.shape) > h_pos else 0
                if stored_h <= 0 or hidden % stored_h:
                    raise self._err(gscale, f"scale shape {list(gscale.shape)} gives no whole group size for H={hidden}")
                gs = hidden // stored_h
                cfg_gs = self.found.get("group_size")
                if cfg_gs and cfg_gs[0] != gs:
                    raise ConfigMismatch(f"{self.root}: {cfg_gs[1]} = {cfg_gs[0]}, but scale {gscale.name!r} shape "
                                         f"{list(gscale.shape)} gives group size {gs}")
            units = {"gs": gs or 1, "blk": FP8_BLOCK}
            for p in PROJS:
                dims = s_dims if p != "down" else _down(s_dims)
                sx = shapes[(p, "scale")]
                if s_family == "fp8-channel":
                    lead = hidden if p == "down" else inter
                    if sx.shape not in ((lead,), (lead, 1)):
                        raise self._err(sx, f"per-channel scale shape {list(sx.shape)}, expected [{lead}] or [{lead}, 1]")
                    orient[(p, "scale")] = (("H" if p == "down" else "I", 1),) + ((("one", 1),) if len(sx.shape) == 2 else ())
                    continue
                want = tuple(math.ceil(logical[a] / (units[u] if isinstance(u, str) else u)) for a, u in dims)
                if sx.shape != want:
                    raise self._err(sx, f"{p} scale shape {list(sx.shape)} does not match its weight (expected {list(want)})")
                orient[(p, "scale")] = tuple((a, units[u] if isinstance(u, str) else u) for a, u in dims)
        self._cross_check({"num_experts": n, "hidden_size": hidden, "moe_intermediate_size": inter},
                          f"{gate.name!r} shape {list(gate.shape)} {gate.dtype}, {n} experts")
        groups: list[PieceGroup] = []
        for layer in staged:
            for p in PROJS:
                for k in kinds:
                    d = table[(layer, p, k, None)]
                    x = shapes[(p, k)]
                    fam = s_family if k == "scale" else family
                    o = ORIENTATION[(fam, k)]
                    dims = orient[(p, k)]
                    assert dims is not None
                    groups.append(self._group(layer, p, k, x, dims, o, gs,
                                              files=tuple(d[e].file for e in range(n)),
                                              offsets=tuple(d[e].offset for e in range(n)),
                                              tensors=tuple(d[e].name for e in range(n))))
        files, groups = self._files(groups)
        cfg = self._config(n, hidden, inter, staged, gs)
        return ModelIndex(self.root, fmt.format, self.naming.naming, files, cfg, tuple(groups), all_layers)

    def _group(self, layer: int, proj: str, kind: str, x: TensorExtent, dims: tuple[tuple[str, int | str], ...],
               o: Orientation, gs: int | None, *, files: tuple[int, ...], offsets: tuple[int, ...],
               tensors: tuple[str, ...], shape: tuple[int, ...] | None = None, nbytes: int | None = None,
               quantum: int = 1, quantum_bytes: int | None = None, dtype: str | None = None,
               note_fmt: dict[str, Any] | None = None) -> PieceGroup:
        axes = [a for a, _ in dims]
        i_dim = axes.index("I") if "I" in axes else None
        i_unit = int(dims[i_dim][1]) if i_dim is not None else 1
        note = o.i_note.format(gs=gs, **(note_fmt or {})) if i_dim is not None else ""
        dt = dtype or x.dtype
        return PieceGroup(
            layer=layer, proj=proj, kind=kind, dtype=dt, shape=shape or x.shape,
            nbytes=nbytes if nbytes is not None else x.nbytes,
            files=files, offsets=offsets, tensors=tensors, i_dim=i_dim, i_unit=i_unit, unit_note=note,
            quantum=quantum, quantum_bytes=quantum_bytes if quantum_bytes is not None else (itemsize(dt) if not dt.startswith("gguf:") else 0),
            conversion=o.conversion, staged_dtype=o.staged_dtype or dt,
        )

    def _build_packed(self, table: dict, all_layers: tuple[int, ...], staged: tuple[int, ...]) -> ModelIndex:
        """Qwen3.5 packed: gate_up_proj [E, 2I, H] and down_proj [E, H, I], bf16."""
        gu = self._uniform(table, all_layers, "gate", "weight")
        dn = self._uniform(table, all_layers, "down", "weight")
        if len(gu.shape) != 3 or gu.shape[1] % 2:
            raise self._err(gu, f"packed gate_up_proj shape {list(gu.shape)} is not [E, 2*I, H]")
        n, two_i, hidden = gu.shape
        inter = two_i // 2
        if dn.shape != (n, hidden, inter):
            raise self._err(dn, f"packed down_proj shape {list(dn.shape)}, expected {[n, hidden, inter]} from gate_up_proj {list(gu.shape)}")
        self._cross_check({"num_experts": n, "hidden_size": hidden, "moe_intermediate_size": inter},
                          f"{gu.name!r} shape {list(gu.shape)}")
        isz = itemsize(gu.dtype)
        o = ORIENTATION[("bf16", "weight")]
        piece = inter * hidden * isz
        groups: list[PieceGroup] = []
        for layer in staged:
            for p in PROJS:
                x = table[(layer, p, "weight", None)][-1]
                if p == "down":
                    offs = tuple(x.offset + e * piece for e in range(n))
                    shape = (hidden, inter)
                    dims = _down(o.dims)
                else:
                    base = x.offset + (piece if p == "up" else 0)
                    offs = tuple(base + e * 2 * piece for e in range(n))
                    shape = (inter, hidden)
                    dims = o.dims
                groups.append(self._group(layer, p, "weight", x, dims, o, None, files=(x.file,) * n, offsets=offs,
                                          tensors=(x.name,) * n, shape=shape, nbytes=piece))
        files, groups = self._files(groups)
        return ModelIndex(self.root, "bf16", "packed", files, self._config(n, hidden, inter, staged, None),
                          tuple(groups), all_layers)

    def _build_gguf(self, table: dict, all_layers: tuple[int, ...], staged: tuple[int, ...]) -> ModelIndex:
        refs = {p: self._uniform(table, all_layers, p, "weight") for p in PROJS}
        gate, up, down = refs["gate"], refs["up"], refs["down"]
        for p, x in refs.items():
            if len(x.shape) != 3:
                raise self._err(x, f"stacked expert tensor has shape {list(x.shape)}, expected [experts, rows, cols]")
        n, inter, hidden = gate.shape
        if up.shape != gate.shape:
            raise self._err(up, f"shape {list(up.shape)} differs from gate's {list(gate.shape)}")
        if down.shape != (n, hidden, inter):
            raise self._err(down, f"shape {list(down.shape)}, expected {[n, hidden, inter]} from gate's {list(gate.shape)}")
        self._cross_check({"num_experts": n, "hidden_size": hidden, "moe_intermediate_size": inter},
                          f"{gate.name!r} shape {list(gate.shape)}")
        o = ORIENTATION[("gguf", "weight")]
        groups: list[PieceGroup] = []
        for layer in staged:
            for p in PROJS:
                x = table[(layer, p, "weight", None)][-1]
                t = GGML_TYPES[x.dtype.split(":", 1)[1]]
                rows, cols = x.shape[1], x.shape[2]
                piece = rows * (cols // t.block) * t.type_size
                dims = o.dims if p != "down" else _down(o.dims)
                g = self._group(layer, p, "weight", x, dims, o, None, files=(x.file,) * n,
                                offsets=tuple(x.offset + e * piece for e in range(n)), tensors=(x.name,) * n,
                                shape=(rows, cols), nbytes=piece, quantum=t.block, quantum_bytes=t.type_size,
                                note_fmt={"T": t.name, "block": t.block})
                groups.append(g)
        files, groups = self._files(groups)
        fmt = groups[0].dtype  # gguf:<type of the first staged gate>; arrays carry their own types
        if self.forced not in (None, "gguf", fmt):
            have = sorted({g.dtype for g in groups})
            raise BadInput(f"--format {self.forced}: {self.root} stores its experts as {', '.join(have)}")
        return ModelIndex(self.root, fmt, "gguf", files, self._config(n, hidden, inter, staged, None),
                          tuple(groups), all_layers)

    def _build_amx(self, table: dict, all_layers: tuple[int, ...], staged: tuple[int, ...]) -> ModelIndex:
        shards = tuple(sorted({k[3] for k in table}))
        if shards != tuple(range(len(shards))):
            raise ModelError(f"{self.root}: pre-sharded `.numa.N` shards are {list(shards)}, not 0..{len(shards) - 1}")
        kinds = tuple(k for k in KINDS if any(key[2] == k for key in table))
        n = self._experts(table, all_layers, kinds, shards)
        hidden = self.found.get("hidden_size", (0, ""))[0]
        inter = self.found.get("moe_intermediate_size", (0, ""))[0]
        if not hidden or not inter:
            raise ModelError(f"{self.root}: pre-sharded AMX tensors are opaque; config.json must give hidden_size "
                             f"and moe_intermediate_size")
        self._cross_check({"num_experts": n}, f"{n} experts in `.numa.N` tensors")
        gw = self._uniform(table, all_layers, "gate", "weight", 0)
        fmt = self.forced
        if fmt is None:
            ratio = gw.nbytes * len(shards) / (hidden * inter)
            fmt = "amx-int8" if ratio >= 0.75 else "amx-int4"
        o = Orientation(())
        groups: list[PieceGroup] = []
        for layer in staged:
            for shard in shards:
                for p in PROJS:
                    for k in kinds:
                        x = self._uniform(table, all_layers, p, k, shard)
                        d = table[(layer, p, k, shard)]
                        g = self._group(layer, p, k, x, (("X", 1),) * len(x.shape), o, None,
                                        files=tuple(d[e].file for e in range(n)),
                                        offsets=tuple(d[e].offset for e in range(n)),
                                        tensors=tuple(d[e].name for e in range(n)))
                        from dataclasses import replace
                        groups.append(replace(g, shard=shard))
        files, groups = self._files(groups)
        return ModelIndex(self.root, fmt, "amx", files, self._config(n, hidden, inter, staged, None),
                          tuple(groups), all_layers, shards=len(shards))


def layer_bytes(index: ModelIndex) -> dict[int, int]:
    out: dict[int, int] = defaultdict(int)
    for g in index.groups:
        out[g.layer] += g.nbytes * g.count
    return dict(out)
