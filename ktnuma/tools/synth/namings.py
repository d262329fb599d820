"""NAMINGS: the tensor names of each checkpoint family synth writes."""
from __future__ import annotations

from dataclasses import dataclass

# --------------------------------------------------------------------------- namings


@dataclass(frozen=True)
class Naming:
    """Tensor names of one checkpoint family. Templates are relative to `layer` unless noted."""

    name: str
    layer: str  # layer prefix, "{L}" is the layer number
    expert: str  # routed expert stem, "{e}" expert, "{p}" proj name from `projs`
    projs: tuple[str, str, str]  # gate, up, down names of the routed experts
    dense: str  # dense MLP stem of layer 0, "{p}" from `dense_projs`
    dense_projs: tuple[str, str, str]
    shared: str  # shared expert stem, "{p}" from `dense_projs`
    router: str  # full tensor name(s) relative to the layer, comma separated; first is [E, H]
    router_bias: str | None  # relative tensor name of an [E] f32 router bias
    attn: str  # attention output projection stem, [H, ATTN_DIM]
    norms: tuple[str, ...]
    embed: str  # absolute stems
    final_norm: str
    head: str
    mtp: bool  # DeepSeek family: an MTP layer numbered num_hidden_layers carries experts
    config: str  # CONFIGS key
    extra: tuple[str, ...] = ()  # absolute names of further bf16 [H, ATTN_DIM] tensors (e.g. a vision tower)
    stacked: str = ""  # "concat": one [E, 2I, H] gate_up + [E, H, I] down; "gpt-oss": [E, H, 2I] interleaved;
    # "rows": [E, 2I, H] with gate/up interleaved by rows (Inkling2 w13_weight) + [E, H, I]


_HF = ("gate_proj", "up_proj", "down_proj")
_W = ("w1", "w3", "w2")
_BLK = ("gate", "up", "down")
_GU = ("gate_up_proj", "gate_up_proj", "down_proj")
_IO = ("input_linear.weight", "input_linear.weight", "output_linear.weight")

NAMINGS: dict[str, Naming] = {
    n.name: n
    for n in (
        Naming("deepseek", "model.layers.{L}", "mlp.experts.{e}.{p}", _HF, "mlp.{p}", _HF,
               "mlp.shared_experts.{p}", "mlp.gate.weight", "mlp.gate.e_score_correction_bias",
               "self_attn.o_proj", ("input_layernorm", "post_attention_layernorm"),
               "model.embed_tokens", "model.norm", "lm_head", True, "deepseek"),
        Naming("mixtral", "model.layers.{L}", "block_sparse_moe.experts.{e}.{p}", _W, "mlp.{p}", _HF,
               "mlp.shared_experts.{p}", "block_sparse_moe.gate.weight", None,
               "self_attn.o_proj", ("input_layernorm", "post_attention_layernorm"),
               "model.embed_tokens", "model.norm", "lm_head", False, "mixtral"),
        Naming("mistral", "layers.{L}", "experts.{e}.{p}", _W, "feed_forward.{p}", _W,
               "shared_experts.{p}", "gate.weight", None,
               "attention.wo", ("attention_norm", "ffn_norm"),
               "tok_embeddings", "norm", "output", False, "mixtral"),
        Naming("qwen-packed", "model.language_model.layers.{L}", "mlp.experts.{p}",
               ("gate_up_proj", "gate_up_proj", "down_proj"), "mlp.{p}", _HF,
               "mlp.shared_expert.{p}", "mlp.gate.weight,mlp.shared_expert_gate.weight", None,
               "self_attn.o_proj", ("input_layernorm", "post_attention_layernorm"),
               "model.language_model.embed_tokens", "model.language_model.norm", "lm_head", False, "qwen",
               extra=("model.visual.blocks.0.attn.proj.weight",), stacked="concat"),
        Naming("gpt-oss", "model.layers.{L}", "mlp.experts.{p}", _GU, "mlp.{p}", _HF,
               "mlp.shared_experts.{p}", "mlp.router.weight", "mlp.router.bias",
               "self_attn.o_proj", ("input_layernorm", "post_attention_layernorm"),
               "model.embed_tokens", "model.norm", "lm_head", False, "gpt-oss", stacked="gpt-oss"),
        Naming("granite", "model.layers.{L}", "block_sparse_moe.{p}", _IO, "mlp.{p}", _HF,
               "shared_mlp.{p}", "block_sparse_moe.router.layer.weight", None,
               "self_attn.o_proj", ("input_layernorm", "post_attention_layernorm"),
               "model.embed_tokens", "model.norm", "lm_head", False, "mixtral", stacked="concat"),
        Naming("granite-swa", "model.layers.{L}", "block_sparse_moe.experts.{p}", _GU, "mlp.{p}", _HF,
               "shared_mlp.{p}", "block_sparse_moe.router.weight", None,
               "self_attn.o_proj", ("input_layernorm", "post_attention_layernorm"),
               "model.embed_tokens", "model.norm", "lm_head", False, "mixtral", stacked="concat"),
        Naming("jetmoe", "model.layers.{L}", "mlp.{p}", _IO, "mlp.dense.{p}", _HF,
               "mlp.shared.{p}", "mlp.router.layer.weight", None,
               "self_attention.o_proj", ("input_layernorm", "post_attention_layernorm"),
               "model.embed_tokens", "model.norm", "lm_head", False, "mixtral", stacked="concat"),
        Naming("inkling2", "model.llm.layers.{L}", "mlp.experts.{p}", ("w13_weight", "w13_weight", "w2_weight"),
               "mlp.{p}", _HF, "mlp.shared_experts.{p}", "mlp.gate.weight", None,
               "self_attn.o_proj", ("input_layernorm", "post_attention_layernorm"),
               "model.llm.embed_tokens", "model.llm.norm", "lm_head", False, "mixtral", stacked="rows"),
        Naming("deepseek-v4", "layers.{L}", "ffn.experts.{e}.{p}", _W, "ffn.{p}", _W,
               "ffn.shared_experts.{p}", "ffn.gate.weight", "ffn.gate.bias",
               "attn.wo", ("attn_norm", "ffn_norm"), "embed", "norm", "head", True, "deepseek-v4"),
        Naming("amx", "blk.{L}", "ffn_{p}_exps.{e}", _BLK, "ffn_{p}", _BLK,
               "ffn_{p}_shexp", "ffn_gate_inp.weight", "exp_probs_b.bias",
               "attn_output", ("attn_norm", "ffn_norm"), "token_embd", "output_norm", "output", False, "deepseek"),
        Naming("gguf", "blk.{L}", "ffn_{p}_exps", _BLK, "ffn_{p}", _BLK,
               "ffn_{p}_shexp", "ffn_gate_inp.weight", "exp_probs_b.bias",
               "attn_output", ("attn_norm", "ffn_norm"), "token_embd", "output_norm", "output", False, "gguf"),
    )
}
