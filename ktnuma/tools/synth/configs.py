"""config.json (and quantization_config) or GGUF metadata of a synthetic model."""
from __future__ import annotations

from typing import Any

from ktnuma.tools.synth.gen import ATTN_DIM, VOCAB
from ktnuma.tools.synth.tables import Format, Shape
from ktnuma.tools.synth.namings import Naming
from ktnuma.tools.synth.specs import ZERO_EXPERTS
from ktnuma.tools.synth.encoders import Opts

# ---- configs


def _quant_config(fmt: Format, opts: Opts) -> dict[str, Any] | None:
    gs = opts.group_size
    if fmt.name == "fp8" and not opts.per_channel:
        return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                "weight_block_size": [128, 128]}
    if fmt.name == "fp8":
        return {"quant_method": "compressed-tensors", "format": "float-quantized",
                "quantization_status": "compressed", "ignore": ["lm_head"],
                "config_groups": {"group_0": {"targets": ["Linear"],
                                              "weights": {"num_bits": 8, "type": "float", "strategy": "channel",
                                                          "symmetric": True, "dynamic": False},
                                              "input_activations": {"num_bits": 8, "type": "float",
                                                                    "strategy": "token", "dynamic": True}}}}
    if fmt.name == "rawint4":
        return {"quant_method": "compressed-tensors", "format": "pack-quantized",
                "quantization_status": "compressed", "ignore": ["lm_head"],
                "config_groups": {"group_0": {"targets": ["Linear"],
                                              "weights": {"num_bits": 4, "type": "int", "strategy": "group",
                                                          "group_size": gs, "symmetric": "asym" not in opts.variants,
                                                          "dynamic": False, "actorder": None,
                                                          "observer": "minmax"},
                                              "input_activations": None, "output_activations": None}}}
    if fmt.name == "gptq-int4":
        return {"quant_method": "gptq", "bits": 4, "group_size": gs, "sym": "asym" not in opts.variants,
                "desc_act": "desc_act" in opts.variants, "damp_percent": 0.01, "true_sequential": True,
                "checkpoint_format": "gptq"}
    if fmt.name == "mxfp4":
        return {"quant_method": "mxfp4", "fmt": "e2m1", "scale_fmt": "ue8m0", "group_size": 32}
    if fmt.name == "mxfp8":
        return {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0", "weight_block_size": [1, 32]}
    if fmt.name == "nvfp4":
        return {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16,
                "exclude_modules": ["lm_head"]}
    if fmt.name == "fp8" and "bf16-scale" in opts.variants:
        return {"quant_method": "compressed-tensors", "format": "float-quantized"}
    return None


def _config(m: dict[str, Any]) -> dict[str, Any]:
    nm: Naming = m["naming"]
    s: Shape = m["shape"]
    n_layers = 1 + s.layers
    kind = nm.config
    if kind in ("deepseek", "deepseek-v4"):
        cfg: dict[str, Any] = {
            "architectures": ["DeepseekV4ForCausalLM" if kind == "deepseek-v4" else "DeepseekV3ForCausalLM"],
            "model_type": "deepseek_v4" if kind == "deepseek-v4" else "deepseek_v3",
            "hidden_size": s.hidden, "intermediate_size": m["dense_i"],
            "moe_intermediate_size": s.intermediate, "num_hidden_layers": n_layers,
            "n_routed_experts": s.experts, "n_shared_experts": 1, "num_experts_per_tok": s.experts_per_tok,
            "first_k_dense_replace": 1, "moe_layer_freq": 1,
            "num_nextn_predict_layers": 1 if m["mtp_layer"] is not None else 0,
            "vocab_size": VOCAB, "torch_dtype": "bfloat16"}
    elif kind in ("mixtral", "gpt-oss"):
        arch, mt = ("GptOssForCausalLM", "gpt_oss") if kind == "gpt-oss" else ("MixtralForCausalLM", "mixtral")
        cfg = {"architectures": [arch], "model_type": mt, "hidden_size": s.hidden,
               "intermediate_size": s.intermediate, "num_hidden_layers": n_layers,
               "num_local_experts": s.experts, "num_experts_per_tok": s.experts_per_tok,
               "vocab_size": VOCAB, "torch_dtype": "bfloat16"}
    elif kind == "qwen":
        cfg = {"architectures": ["Qwen3_5MoeForConditionalGeneration"], "model_type": "qwen3_5_moe",
               "text_config": {"model_type": "qwen3_5_moe_text", "hidden_size": s.hidden,
                               "intermediate_size": m["dense_i"], "moe_intermediate_size": s.intermediate,
                               "shared_expert_intermediate_size": s.intermediate,
                               "num_hidden_layers": n_layers, "num_experts": s.experts,
                               "num_experts_per_tok": s.experts_per_tok, "decoder_sparse_step": 1,
                               "mlp_only_layers": [0], "vocab_size": VOCAB},
               "vision_config": {"hidden_size": ATTN_DIM, "depth": 1}, "torch_dtype": "bfloat16"}
    else:  # gguf: metadata is written by _write_gguf
        return _gguf_metadata(m)
    if "zero-experts" in m["opts"].variants:
        cfg["zero_expert_num"] = ZERO_EXPERTS
    q = _quant_config(m["fmt"], m["opts"])
    if q is not None:
        cfg["quantization_config"] = q
    return cfg


def _gguf_metadata(m: dict[str, Any]) -> dict[str, Any]:
    s: Shape = m["shape"]
    a = "deepseek2"
    meta: dict[str, Any] = {
        "general.architecture": a, "general.name": "ktnuma-synth",
        f"{a}.block_count": 1 + s.layers, f"{a}.context_length": 4096, f"{a}.embedding_length": s.hidden,
        f"{a}.feed_forward_length": m["dense_i"], f"{a}.expert_feed_forward_length": s.intermediate,
        f"{a}.leading_dense_block_count": 1, f"{a}.expert_shared_count": 1,
    }
    if "no-expert-counts" not in m["opts"].variants:
        meta[f"{a}.expert_count"] = s.experts
        meta[f"{a}.expert_used_count"] = s.experts_per_tok
    return meta
