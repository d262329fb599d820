"""transformers writer: tiny configs of every MoE causal-LM class, random weights, save_pretrained.

Every class the installed transformers maps in MODEL_FOR_CAUSAL_LM_MAPPING whose default config has a
routed-expert count is a candidate (`moe_model_types`); `shrink` turns its default config into a tiny one
with one generic table of size keys (only keys the config already has are set), plus the few per-class
keys in OVERRIDES. What the test expects (experts, top-k, hidden, expert I, MoE layers) is recorded next
to the model in corpus.json, from the values set here, never read back through ktnuma.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

HIDDEN, MOE_I, EXPERTS, TOPK, LAYERS = 128, 256, 8, 2, 2

# Size keys set wherever the default config has them (nested text_config / ffn_config included).
GENERIC = {
    "hidden_size": HIDDEN, "d_model": HIDDEN, "intermediate_size": MOE_I, "moe_intermediate_size": MOE_I,
    "expert_ffn_hidden_size": MOE_I, "ffn_hidden_size": MOE_I, "shared_expert_intermediate_size": MOE_I,
    "moe_shared_expert_intermediate_size": MOE_I, "intermediate_size_mlp": MOE_I,
    "shared_experts_intermediate_size": MOE_I,
    "num_hidden_layers": LAYERS, "n_layers": LAYERS, "num_layers": LAYERS,
    "num_attention_heads": 4, "n_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "kv_channels": 32,
    "vocab_size": 512, "max_position_embeddings": 512, "max_seq_len": 512,
    "num_experts": EXPERTS, "num_local_experts": EXPERTS, "n_routed_experts": EXPERTS,
    "moe_num_experts": EXPERTS,
    "num_experts_per_tok": TOPK, "num_experts_per_token": TOPK, "moe_topk": TOPK, "moe_k": TOPK,
    "moe_top_k": TOPK, "top_k_experts": TOPK,
    "n_shared_experts": 1, "num_shared_experts": 1, "moe_num_shared_experts": 1,
    "first_k_dense_replace": 0, "moe_layer_start_index": 0, "decoder_sparse_step": 1,
    "n_group": 1, "topk_group": 1, "num_expert_group": 1,
    "q_lora_rank": 64, "kv_lora_rank": 32, "qk_rope_head_dim": 16, "qk_nope_head_dim": 16,
    "v_head_dim": 32, "qk_head_dim": 32,
    "mlp_only_layers": [], "tie_word_embeddings": False,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 32,
    "linear_value_head_dim": 32, "linear_conv_kernel_dim": 4,
    "sliding_window": 64, "attention_chunk_size": 64,
}

# Per model_type: extra keys, and how to read the expected values.
OVERRIDES: dict[str, dict] = {
    "longcat_flash": {"zero_expert_num": 4},
    "ernie4_5_moe": {"moe_layer_end_index": LAYERS - 1, "moe_layer_interval": 1},
    "llama4_text": {"moe_layers": list(range(LAYERS)), "interleave_moe_layer_step": 1, "no_rope_layers": [1] * LAYERS},
    "zaya": {"num_experts_per_tok": 1},
    # MLA: llama.cpp's converter (as DeepSeek's real configs) has as many KV heads as heads.
    "deepseek_v2": {"num_key_value_heads": 4},
    "deepseek_v3": {"num_key_value_heads": 4},
    "dots3_note_text": {"num_key_value_heads": 4},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 0},
    "granitemoehybrid": {"mamba_n_heads": 8, "mamba_d_head": 32, "mamba_d_state": 16, "mamba_n_groups": 1},
    "jamba": {"expert_layer_period": 1, "expert_layer_offset": 0, "attn_layer_period": 2, "attn_layer_offset": 1},
}
# Families whose default layer_types list must be trimmed to LAYERS (keep the pattern's head).
# Multimodal wrappers of a *_text type listed separately, and configs that are not MoE by default.
SKIP_TYPES = {"llama4", "qwen3_5_moe", "gemma4", "dots3_note", "qwen4_exp", "doge"}
# Types whose model transformers itself cannot build from a valid config (reported, not generated).
BROKEN = {
    "dbrx": "transformers: DbrxAttentionConfig has no attribute 'rope_theta' (the class cannot be built)",
    "qwen4_exp_text": "transformers: Qwen4ExpTextQSAIndexer needs token_budget/compress_ratio (no defaults)",
}
# save_original_format=False: the fused layout transformers uses in memory (gate_up_proj [E,2I,H]).
FUSED = ("qwen3_5_moe_text", "qwen3_moe", "mixtral")


@dataclass(frozen=True)
class HFSpec:
    model_type: str
    cls: str
    overrides: dict = field(default_factory=dict)
    save_kwargs: dict = field(default_factory=dict)
    name: str = ""

    @property
    def key(self) -> str:
        return self.name or self.model_type


def moe_model_types() -> list[HFSpec]:
    """Every causal-LM model_type of the installed transformers whose default config routes experts."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    out = []
    for mt, cls in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        if mt in SKIP_TYPES:
            continue
        try:
            d = CONFIG_MAPPING[mt]().to_dict()
        except Exception:  # noqa: BLE001 - a config that cannot be built with defaults is not a candidate
            continue
        flat = {**d, **(d.get("text_config") or {}), **(d.get("ffn_config") or {})}
        n = next((flat[k] for k in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
                  if isinstance(flat.get(k), int)), None)
        if flat.get("is_moe") is False or flat.get("enable_moe_block") is False:
            continue
        if n and n > 1 or mt == "hunyuan_v1_moe":
            out.append(HFSpec(mt, cls, OVERRIDES.get(mt, {})))
            if mt in FUSED:
                out.append(HFSpec(mt, cls, OVERRIDES.get(mt, {}), {"save_original_format": False}, mt + "-fused"))
    return out


_EXPERTS_MODULE = re.compile(r"layers\.(\d+)\.(?:.*\.)?experts$")


def moe_layers(model) -> list[int]:
    """Layers whose transformers module tree has a routed `experts` module (the oracle for `layers`)."""
    found = {int(m.group(1)) for name, _ in model.named_modules() if (m := _EXPERTS_MODULE.search(name))}
    return sorted(found)


def _layers(d: dict) -> int | None:
    return next((d[k] for k in ("num_hidden_layers", "n_layers", "num_layers") if isinstance(d.get(k), int)), None)


def _trim_per_layer(d: dict, n0: int, n: int) -> None:
    """Per-layer lists/dicts of the default depth n0 cut to n layers: MLP kinds all routed, others keep
    one layer of each kind in order of appearance."""
    for k, v in list(d.items()):
        if isinstance(v, list) and len(v) == n0 and n0 != n:
            if k == "mlp_layer_types":
                moe = next((x for x in v if x not in ("dense", "mlp")), v[0])
                d[k] = [moe] * n
            elif all(isinstance(x, str) for x in v):
                kinds = list(dict.fromkeys(v))
                d[k] = (kinds * n)[:n]
            else:
                d[k] = v[:n]
        elif k == "per_layer_config" and isinstance(v, dict):
            d[k] = {i: c for i, c in v.items() if int(i) < n}


def _shrink_dict(d: dict, extra: dict) -> None:
    n0 = _layers(d)
    for k, v in {**GENERIC, **extra}.items():
        if k in d or k in extra:
            d[k] = v
    n = _layers(d)
    if n0 and n:
        _trim_per_layer(d, n0, n)
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if isinstance(d.get(k), int) and d[k] >= GENERIC["vocab_size"]:
            d[k] = GENERIC["vocab_size"] - 1
    for k in ("ffn_config", "attn_config", "text_config"):
        if isinstance(d.get(k), dict):
            _shrink_dict(d[k], extra if k == "text_config" else {})


def shrink(spec: HFSpec):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cfg_cls = CONFIG_MAPPING[spec.model_type]
    d = cfg_cls().to_dict()
    _shrink_dict(d, spec.overrides)
    d.pop("model_type", None)
    d.pop("transformers_version", None)
    return cfg_cls(**d)


def write(spec: HFSpec, out: Path, seed: int = 0) -> dict:
    """Build the tiny model with random weights and save_pretrained it to out; returns corpus.json's record."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = shrink(spec)
    cls = getattr(transformers, spec.cls)
    model = cls._from_config(cfg, dtype=torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():  # some classes init experts to zeros/empty: random bytes everywhere
            p.normal_(0, 0.05)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, **spec.save_kwargs)
    return {"writer": "transformers", "writer_version": transformers.__version__, "class": spec.cls,
            "model_type": spec.model_type, "format": "bf16", "save_kwargs": spec.save_kwargs,
            "expected": expected(spec, moe_layers(model))}


def expected(spec: HFSpec, layers: list[int]) -> dict:
    """The config values this generator set (the test's oracle for inspect)."""
    ov = spec.overrides
    return {"num_experts": ov.get("n_routed_experts", EXPERTS),
            "experts_per_tok": ov.get("num_experts_per_tok", TOPK),
            "hidden_size": ov.get("hidden_size", HIDDEN), "moe_intermediate_size": ov.get("moe_intermediate_size", MOE_I),
            "layers": layers}


# Sources for the other writers, wider than the default: I = 512 so that 128-wide FP8 blocks / int4
# groups split over 4 nodes ("-i512"); for llama.cpp also H = 256 (llamafile needs H >= 256, I/N % 256).
SIZES = {"i512": {"moe_intermediate_size": 512, "intermediate_size": 512},
         "h256": {"hidden_size": 256, "moe_intermediate_size": 512, "intermediate_size": 512}}


def sized(model_type: str, size: str) -> HFSpec:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return HFSpec(model_type, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type],
                  {**OVERRIDES.get(model_type, {}), **SIZES[size]}, name=f"{model_type}-{size}")
