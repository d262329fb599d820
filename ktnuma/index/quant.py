"""One record per quantization format: everything ktnuma knows about a format, in one place.

A `QuantFormat` says which tensor suffixes carry its weights and scales, which stored dtypes are
accepted and how each is staged (as stored, relabelled, or through a named CONVERSIONS entry),
the orientation of a gate/up piece (which stored dim is I or H and in which unit; down swaps I and
H), what one unit along I is called in a tp refusal, the design's "tp needs" note and the
config.json checks. The index, the planner's refusals, the tools (synth, reference) and the
kt-kernel integration read these records; adding a format is one record here plus its encoder in
`ktnuma.tools.synth` and its dequantizer in `ktnuma.tools.reference`.

Import-light: no numpy, no readers.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ktnuma.errors import UnsupportedQuantization
from ktnuma.index.dtypes import CONVERSIONS

# (axis, unit) per stored dim of a gate/up piece. axis: "I", "H", or "one" (a trailing [N, 1] dim).
# unit: elements of that axis per stored index (int), "gs" = the group size read off the shapes,
# "blk" = the 128-wide FP8 block.
Dims = tuple[tuple[str, "int | str"], ...]
ConfigCheck = Callable[[Mapping[str, Any], str], None]
VariantTest = Callable[[tuple[int, ...], tuple[int, ...]], bool]

MXFP4_GROUP = 32  # E2M1 values per ue8m0 scale (OCP MX)
MXFP8_GROUP = 32  # e4m3 values per ue8m0 scale (OCP MX)
NVFP4_GROUP = 16  # E2M1 values per e4m3 block scale (ModelOpt NVFP4)


def down_dims(dims: Dims) -> Dims:
    """A down piece's dims from a gate/up piece's: I and H swap."""
    swap = {"I": "H", "H": "I"}
    return tuple((swap.get(a, a), u) for a, u in dims)


@dataclass(frozen=True)
class KindRule:
    """How one kind (weight or scale) of a format is stored and staged.

    `dtypes` maps each accepted stored dtype to the CONVERSIONS entry applied while staging (None:
    the bytes as stored). `staged_as` relabels stored bytes without converting (MXFP4's i8 nibbles
    are staged as u8). `unit_note` names one unit along I for tp refusals: "{u}" is the cut unit in I
    elements, "{T}" the GGML type. `when` selects a
    scale variant from (weight shape, scale shape); None matches anything."""

    suffixes: tuple[str, ...]
    dtypes: Mapping[str, str | None]
    dims: Dims
    unit_note: str = "{u}-element rows"
    staged_as: str | None = None
    variant: str = ""
    when: VariantTest | None = None

    def conversion(self, dtype: str) -> str | None:
        return self.dtypes.get(dtype)

    def staged_dtype(self, dtype: str) -> str:
        conv = self.dtypes.get(dtype)
        if conv is not None:
            return CONVERSIONS[conv].dst
        return self.staged_as or dtype


@dataclass(frozen=True)
class QuantFormat:
    """One quantization format (see the module docstring). `group` is a fixed group along K (None:
    none, or read off the scale shapes where a scale dim has unit "gs"). `tp` is the design's
    "tp needs" column; `staging` says how the format's arrays are staged (recorded in the manifest's
    model.notes when it is not "as stored"). `naming_only`: the format is implied by a naming (GGUF,
    pre-sharded AMX), never detected from suffixes."""

    name: str
    weight: KindRule
    scales: tuple[KindRule, ...] = ()
    group: int | None = None
    tp: str = "I % N == 0"
    staging: str = ""
    check_config: ConfigCheck | None = None
    naming_only: bool = False
    global_suffix: str | None = None  # a per-tensor scalar scale beside each weight (NVFP4 weight_scale_2)
    notes: Mapping[str, str] = field(default_factory=dict)

    def scale_rule(self, weight_shape: tuple[int, ...], scale_shape: tuple[int, ...]) -> KindRule:
        for r in self.scales:
            if r.when is None or r.when(weight_shape, scale_shape):
                return r
        raise LookupError(self.name)  # pragma: no cover - the last variant has no `when`

    @property
    def scale_suffixes(self) -> frozenset[str]:
        return frozenset(s for r in self.scales for s in r.suffixes)

    @property
    def scale_dtypes(self) -> frozenset[str]:
        return frozenset(d for r in self.scales for d in r.dtypes)


# ---------------------------------------------------------------- config checks
def _check_gptq(qc: Mapping[str, Any], where: str) -> None:
    if qc.get("desc_act") is True:
        raise UnsupportedQuantization(f"{where}: GPTQ desc_act=true (act-order) is not supported; requantize with desc_act=false")
    if qc.get("sym") is False:
        raise UnsupportedQuantization(f"{where}: GPTQ sym=false (asymmetric) is not supported; only sym=true")
    if qc.get("bits") not in (None, 4):
        raise UnsupportedQuantization(f"{where}: GPTQ bits={qc.get('bits')} is not supported; only 4-bit")


def _check_symmetric_groups(qc: Mapping[str, Any], where: str) -> None:
    groups = qc.get("config_groups")
    for name, g in (groups.items() if isinstance(groups, dict) else []):
        w = g.get("weights") if isinstance(g, dict) else None
        if isinstance(w, dict) and w.get("symmetric") is False:
            raise UnsupportedQuantization(f"{where}: config_groups.{name}: asymmetric int4 (symmetric=false) is not supported")


def _per_channel(w: tuple[int, ...], s: tuple[int, ...]) -> bool:
    """fp8 per-channel: the scale's first dim equals the weight's and it is 1-D or [N, 1]."""
    return bool(s) and s[0] == w[0] and (len(s) == 1 or s[1] == 1)


ROWS: Dims = (("I", 1), ("H", 1))
_INT4_WORDS = "{u} int4 values packed per int32 word"
_FP8_SCALE = ("weight_scale_inv", "weight_scale")

FORMATS: dict[str, QuantFormat] = {
    f.name: f
    for f in (
        QuantFormat("bf16", KindRule(("weight",), {"bf16": None}, ROWS)),
        QuantFormat(
            "fp8",
            KindRule(("weight",), {"f8_e4m3": None}, ROWS),
            (
                KindRule(_FP8_SCALE, {"f32": None, "bf16": "bf16->f32"}, (("I", 1),), variant="channel",
                         when=_per_channel),
                KindRule(_FP8_SCALE, {"f32": None, "bf16": "bf16->f32"}, (("I", "blk"), ("H", "blk")),
                         "{u}-wide FP8 scale blocks", variant="block"),
            ),
            tp="block: I_tp % 128; per-channel: I % N",
            staging="f32 scales staged as stored; bf16 scales (llm-compressor FP8_BLOCK) exactly converted to "
                    "f32 (dtype f32), as kt-kernel's FP8 engines take them",
        ),
        QuantFormat(
            "mxfp4",
            KindRule(("weight",), {"i8": None, "u8": None}, (("I", 1), ("H", 2)), "{u} FP4 values packed per byte",
                     staged_as="u8"),
            (KindRule(("scale",), {"f8_e8m0": "ue8m0->bf16", "u8": "ue8m0->bf16"}, (("I", 1), ("H", MXFP4_GROUP)),
                      "{u}-wide MXFP4 scale blocks"),),
            group=MXFP4_GROUP,
            tp="down: I_tp % 32",
            staging="ue8m0 scales staged as bf16 bits (u8 << 7)",
        ),
        QuantFormat(
            "rawint4",
            KindRule(("weight_packed",), {"i32": None}, (("I", 1), ("H", 8)), _INT4_WORDS),
            (KindRule(("weight_scale",), {"bf16": None}, (("I", 1), ("H", "gs")), "{u}-wide quant groups"),),
            tp="down: I_tp % lcm(8, gs)",
            check_config=_check_symmetric_groups,
        ),
        QuantFormat(
            "gptq-int4",
            KindRule(("qweight",), {"i32": None}, (("H", 8), ("I", 1)), _INT4_WORDS),
            (KindRule(("scales",), {"f16": "f16->f32"}, (("H", "gs"), ("I", 1)), "{u}-wide quant groups"),),
            tp="down: I_tp % lcm(8, gs)",
            staging="f16 scales staged as f32",
            check_config=_check_gptq,
        ),
        QuantFormat(
            "mxfp8",
            KindRule(("weight",), {"f8_e4m3": None}, ROWS),
            (KindRule(("weight_scale_inv", "weight_scale"), {"u8": None, "f8_e8m0": None},
                      (("I", 1), ("H", MXFP8_GROUP)), "{u}-wide MXFP8 scale blocks", staged_as="u8"),),
            group=MXFP8_GROUP,
            tp="down: I_tp % 32",
            staging="ue8m0 scales (one per 32 along K) staged as stored, dtype u8 (kt-kernel's MXFP8 engines "
                    "shift them to f32 at load)",
        ),
        QuantFormat(
            "nvfp4",
            KindRule(("weight",), {"u8": None, "i8": None}, (("I", 1), ("H", 2)), "{u} FP4 values packed per byte",
                     staged_as="u8"),
            (KindRule(("weight_scale",), {"f8_e4m3": None}, (("I", 1), ("H", NVFP4_GROUP)),
                      "{u}-wide NVFP4 scale blocks"),),
            group=NVFP4_GROUP,
            tp="down: I_tp % 16",
            global_suffix="weight_scale_2",
            staging="e4m3 block scales (one per 16 along K) staged as stored (dtype f8_e4m3); each expert's "
                    "per-tensor f32 weight_scale_2 is the scale record's global_scale list; the scale an "
                    "FP4 engine takes is bf16(f32(e4m3) * global_scale), rounded to nearest even, as "
                    "kt-kernel 0.7.2's NVFP4 loader folds it",
        ),
        QuantFormat("gguf", KindRule(("weight",), {}, ROWS, "{u}-weight {T} blocks"),
                    tp="down: I_tp % block(T)", naming_only=True),
        QuantFormat("amx-int4", KindRule(("weight",), {}, ()), tp="--nodes == shard count; tp only",
                    naming_only=True),
        QuantFormat("amx-int8", KindRule(("weight",), {}, ()), tp="--nodes == shard count; tp only",
                    naming_only=True),
    )
}
AMX_FORMATS: tuple[str, ...] = tuple(n for n in FORMATS if n.startswith("amx-"))


def family(fmt: str) -> str:
    """A format name's record key: "gguf:Q4_K" -> "gguf", "fp8" -> "fp8"."""
    return fmt.split(":", 1)[0]


def gguf_type(fmt: str) -> str | None:
    """The GGML type of a "gguf:<T>" format name (upper case), else None."""
    return fmt.split(":", 1)[1].upper() if fmt.startswith("gguf:") else None


def record(fmt: str) -> QuantFormat:
    return FORMATS[family(fmt)]


def unit_note(fmt: str, kind: str, u: int) -> str:
    """How a tp refusal names one cut unit of `u` I elements of `kind` in format `fmt`."""
    f = FORMATS.get(family(fmt))
    if f is None:
        return f"{u}-element units"
    rule = f.weight if kind == "weight" or not f.scales else f.scales[-1]
    return rule.unit_note.format(u=u, T=gguf_type(fmt) or "")


def detectable() -> tuple[QuantFormat, ...]:
    """Formats told apart by their weight suffix and dtype (in table order)."""
    return tuple(f for f in FORMATS.values() if not f.naming_only)
