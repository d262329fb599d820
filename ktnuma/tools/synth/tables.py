"""FORMATS (container, layout, namings, variants of each format), GGUF types, shape presets, SynthInfo."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# --------------------------------------------------------------------------- formats


@dataclass(frozen=True)
class Format:
    name: str
    container: str  # "safetensors" | "gguf"
    layout: str  # "per-expert" | "amx" | "gguf"
    namings: tuple[str, ...]  # first is the default
    variants: tuple[str, ...] = ()
    group_size: int | None = None  # default group size where the format has one
    k_multiple: int = 1  # K (input dim) must be a multiple of this (times group size where relevant)
    amx_bits: int = 0


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("bf16", "safetensors", "per-expert", ("deepseek", "mixtral", "mistral", "qwen-packed", "gpt-oss",
                                                     "granite", "granite-swa", "jetmoe", "inkling2"),
               ("zero-experts",)),
        Format("fp8", "safetensors", "per-expert", ("deepseek", "mixtral", "mistral"), ("1d", "bf16-scale")),
        Format("mxfp8", "safetensors", "per-expert", ("mixtral", "deepseek", "mistral"), (), None, 32),
        Format("nvfp4", "safetensors", "per-expert", ("deepseek", "mixtral", "mistral"), (), None, 16),
        Format("rawint4", "safetensors", "per-expert", ("deepseek", "mixtral", "mistral"), ("asym",), 32, 8),
        Format("gptq-int4", "safetensors", "per-expert", ("deepseek", "mixtral", "mistral"),
               ("desc_act", "asym"), 32, 8),
        Format("mxfp4", "safetensors", "per-expert", ("deepseek-v4",), (), None, 32),
        Format("amx-int4", "safetensors", "amx", ("amx",), (), None, 2, amx_bits=4),
        Format("amx-int8", "safetensors", "amx", ("amx",), (), None, 1, amx_bits=8),
        Format("gguf", "gguf", "gguf", ("gguf",), ("no-expert-counts",)),
    )
}
FORMAT_NAMES: tuple[str, ...] = ("bf16", "fp8", "fp8-channel", "rawint4", "gptq-int4", "mxfp4", "amx-int4",
                                 "amx-int8", "mxfp8", "nvfp4", "gguf:F16", "gguf:BF16", "gguf:Q8_0", "gguf:Q4_K", "gguf:Q6_K")

# GGUF types synth writes, and how: "f16"/"bf16"/"f32" raw bits, "quantize" through gguf.quants,
# or random blocks whose f16 scale fields (byte offsets in the block) are overwritten with finite values.
# (the offsets are GGMLType.f16_fields)
GGUF_BLOCK_SCALES: tuple[str, ...] = ("Q4_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
GGUF_TYPES: tuple[str, ...] = ("F32", "F16", "BF16", "Q8_0", *GGUF_BLOCK_SCALES)

# --------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class Shape:
    layers: int = 2
    experts: int = 8
    hidden: int = 256
    intermediate: int = 256
    experts_per_tok: int = 2
    mtp: bool = True


# bench: DeepSeek-V3 proportions (H/I = 7168/2048 = 3.5) scaled down: 8 MoE layers x 48 experts x
# 3 x 1792 x 512 x 2 bytes = 2.11e9 bytes (1.97 GiB) of bf16 routed experts; no MTP layer.
PRESETS: dict[str, Shape] = {
    "tiny": Shape(),
    "bench": Shape(layers=8, experts=48, hidden=1792, intermediate=512, experts_per_tok=6, mtp=False),
}

# --------------------------------------------------------------------------- result


@dataclass(frozen=True)
class SynthInfo:
    path: str  # the model directory
    fmt: str  # format family: bf16 fp8 rawint4 gptq-int4 mxfp4 amx-int4 amx-int8 gguf
    naming: str
    config: dict[str, Any]  # config.json as written (GGUF: the metadata written)
    moe_layers: tuple[int, ...]  # checkpoint layer numbers of the MoE layers (MTP excluded)
    tensor_count: int
    nbytes: int  # sum of tensor data bytes (headers excluded)
    files: tuple[str, ...] = ()  # data files written, absolute
    staged: tuple[str, ...] = ()  # names of the tensors ktnuma must stage (routed experts of moe_layers)
    staged_nbytes: int = 0  # their data bytes
    mtp_layer: int | None = None  # layer number of the MTP layer written, if any
    manifest_config: dict[str, Any] = field(default_factory=dict)  # what `inspect` should report
    options: dict[str, Any] = field(default_factory=dict)  # per_channel, variants, group_size, gguf_types...
