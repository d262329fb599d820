"""Naming rules: which tensor names are routed-expert pieces, and what (layer, expert, proj, suffix)
they carry. One table (NAMING_RULES); each rule also names the layout builder that turns its tensors
into piece groups (ktnuma.index.layouts)."""
from __future__ import annotations

import os
import re
from collections import defaultdict
from dataclasses import dataclass

from ktnuma.errors import ModelError, UnsupportedQuantization
from ktnuma.index.model import TensorExtent
from ktnuma.index.quant import FORMATS

_LAYER = r"^(?:model\.language_model\.|language_model\.model\.|model\.llm\.|model\.)?layers\.(?P<layer>\d+)"
_SUFFIX = r"\.(?P<suffix>[A-Za-z_][A-Za-z_0-9]*)$"
_DS = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
_W = {"w1": "gate", "w3": "up", "w2": "down"}
_GG = {"gate": "gate", "up": "up", "down": "down"}
_GU = {"gate_up": "gate_up", "down": "down"}
_W13 = {"w13": "gate_up", "w2": "down"}  # Inkling2
_FC = {"fc1": "gate_up", "fc2": "down"}  # Aria
_IO = {"input": "gate_up", "output": "down"}  # Granite/JetMoe input_linear = gate and up, output_linear = down


@dataclass(frozen=True)
class NamingRule:
    naming: str
    pattern: re.Pattern[str]
    projs: dict[str, str]  # token in the name -> gate|up|down ("gate_up" = gate and up in one tensor)
    layout: str = "per-expert"  # key of ktnuma.index.layouts.LAYOUTS
    reader: str = ".safetensors"  # which reader's files this rule applies to

    @property
    def stacked(self) -> bool:
        """One tensor holds every expert (experts on dim 0)."""
        return self.layout in ("stacked", "gguf")


NAMING_RULES: tuple[NamingRule, ...] = (
    NamingRule("deepseek", re.compile(_LAYER + r"\.mlp\.experts\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)" + _SUFFIX), _DS),
    NamingRule("mixtral", re.compile(_LAYER + r"\.block_sparse_moe\.experts\.(?P<expert>\d+)\.(?P<proj>w[123])" + _SUFFIX), _W),
    NamingRule("v4flash", re.compile(_LAYER + r"\.ffn\.experts\.(?P<expert>\d+)\.(?P<proj>w[123])" + _SUFFIX), _W),
    NamingRule("jamba", re.compile(_LAYER + r"\.feed_forward\.experts\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)" + _SUFFIX), _DS),
    NamingRule("lfm2", re.compile(_LAYER + r"\.feed_forward\.experts\.(?P<expert>\d+)\.(?P<proj>w[123])" + _SUFFIX), _W),
    NamingRule("nemotron-h", re.compile(r"^backbone\.layers\.(?P<layer>\d+)\.mixer\.experts\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)" + _SUFFIX), _DS),
    NamingRule("mistral", re.compile(_LAYER + r"\.experts\.(?P<expert>\d+)\.(?P<proj>w[123])" + _SUFFIX), _W),
    # stacked [E, ...] tensors: Qwen3.5 packed and gpt-oss (told apart by shape), GraniteMoeSWA, Granite/JetMoe
    NamingRule("packed", re.compile(_LAYER + r"\.mlp\.experts\.(?P<proj>gate_up|down)_proj(?:_(?P<suffix>bias|blocks|scales))?$"), _GU, "stacked"),
    NamingRule("granite-swa", re.compile(_LAYER + r"\.block_sparse_moe\.experts\.(?P<proj>gate_up|down)_proj$"), _GU, "stacked"),
    NamingRule("granite", re.compile(_LAYER + r"\.block_sparse_moe\.(?P<proj>input|output)_linear\.(?P<suffix>weight)$"), _IO, "stacked"),
    NamingRule("jetmoe", re.compile(_LAYER + r"\.mlp\.(?P<proj>input|output)_linear\.(?P<suffix>weight)$"), _IO, "stacked"),
    # stacked, storage order fixed by the model family (layouts/stacked.ORDER_OF_NAMING)
    NamingRule("llama4", re.compile(_LAYER + r"\.feed_forward\.experts\.(?P<proj>gate_up|down)_proj$"), _GU, "stacked"),
    NamingRule("aria", re.compile(_LAYER + r"\.mlp\.experts\.(?P<proj>fc1|fc2)\.(?P<suffix>weight)$"), _FC, "stacked"),
    NamingRule("inkling2", re.compile(_LAYER + r"\.mlp\.experts\.(?P<proj>w13|w2)_(?P<suffix>weight)$"), _W13, "stacked"),
    NamingRule("amx", re.compile(r"^blk\.(?P<layer>\d+)\.ffn_(?P<proj>gate|up|down)_exps\.(?P<expert>\d+)\.numa\.(?P<shard>\d+)" + _SUFFIX), _GG, "amx"),
    NamingRule("gguf", re.compile(r"^blk\.(?P<layer>\d+)\.ffn_(?P<proj>gate|up|down)_exps\.(?P<suffix>weight)$"), _GG, "gguf", ".gguf"),
)

# suffix -> "weight" | "scale" from the format records; IGNORED suffixes are never staged, REFUSED ones stop
# the index with the reason.
IGNORED_SUFFIXES: frozenset[str] = frozenset({"qzeros", "g_idx", "weight_shape", "bias", "input_scale"})
SUFFIXES: dict[str, str | None] = {
    **{s: "weight" for f in FORMATS.values() for s in f.weight.suffixes},
    **{s: "scale" for f in FORMATS.values() for s in f.scale_suffixes},
    **{f.global_suffix: "global" for f in FORMATS.values() if f.global_suffix},
    **dict.fromkeys(IGNORED_SUFFIXES),
}
REFUSED_SUFFIXES: dict[str, str] = {
    "weight_zero_point": "asymmetric int4 (weight_zero_point) is not supported; only symmetric checkpoints are",
    "blocks": "gpt-oss MXFP4 (gate_up_proj_blocks/_scales: E2M1 blocks with gate/up interleaved along 2I) is "
              "not supported: no engine here takes that layout (kt-kernel 0.7.2's MXFP4 loader reads per-expert "
              "DeepSeek-V4 .weight/.scale tensors only); save the model dequantized to bf16 and stage that",
}


@dataclass(frozen=True)
class Hit:
    """A tensor that a naming rule matched."""

    layer: int
    expert: int  # -1 for stacked tensors
    proj: str  # gate | up | down | gate_up
    suffix: str
    shard: int | None
    ext: TensorExtent


def match(extents: list[TensorExtent], files: list[str], ext_of_file: list[str]) -> tuple[NamingRule, list[Hit]]:
    """The one naming rule the routed-expert tensors follow, and its hits."""
    by_rule: dict[str, list[Hit]] = defaultdict(list)
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
            by_rule[rule.naming].append(Hit(int(g["layer"]), expert, rule.projs[g["proj"]], suffix, shard, e))
            break
    if not by_rule:
        raise ModelError(f"{os.path.dirname(files[0])}: no routed-expert tensors found (namings tried: "
                         f"{', '.join(r.naming for r in NAMING_RULES)})")
    if len(by_rule) > 1:
        names = sorted(by_rule)
        raise ModelError(f"{os.path.dirname(files[0])}: tensors follow several expert namings at once ({', '.join(names)})")
    naming = next(iter(by_rule))
    return rules[naming], by_rule[naming]
