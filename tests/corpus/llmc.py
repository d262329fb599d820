"""llm-compressor (compressed-tensors) data-free oneshot: FP8_BLOCK (e4m3, 128x128 blocks, bf16 scales)
and W4A16 (pack-quantized int4, symmetric, group 128: Kimi-K2's format) of two MoE models with I = 512.
Routers, shared experts, attention (MLA ranks of 64 are narrower than a group) and lm_head stay bf16."""
from __future__ import annotations

from pathlib import Path

from tests.corpus import hf, versions

SOURCES = ("qwen3_moe", "deepseek_v3")
SCHEMES = ("FP8_BLOCK", "W4A16")
IGNORE = ["lm_head", "re:.*self_attn.*", "re:.*mlp\\.gate$", "re:.*shared_expert.*", "re:.*shared_experts.*"]


def quantize(src: str, scheme: str, out: Path) -> dict:
    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM

    from tests.corpus import build

    sdir = build.ensure(f"{src}-i512")
    model = AutoModelForCausalLM.from_pretrained(sdir, dtype=torch.bfloat16)
    oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme=scheme, ignore=IGNORE))
    model.save_pretrained(out, save_compressed=True)
    rec = build.record(sdir)
    return {"writer": "llm-compressor", "writer_version": f"llmcompressor {versions.version('llmcompressor')}"
            f" / compressed-tensors {versions.version('compressed-tensors')}", "class": rec["class"],
            "model_type": rec["model_type"], "format": scheme, "source": f"{src}-i512",
            "expected": rec["expected"]}


def entries() -> list:
    from tests.corpus.build import Entry

    out = [Entry(f"{src}-i512", "transformers", lambda d, s=src: hf.write(hf.sized(s, "i512"), d)) for src in SOURCES]
    out += [Entry(f"llmc-{src}-{sch.lower()}", "llm-compressor", lambda d, s=src, c=sch: quantize(s, c, d),
                  (f"{src}-i512",)) for src in SOURCES for sch in SCHEMES]
    return out
