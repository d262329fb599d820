"""One config-key table: where each ModelConfig value may come from (config.json, GGUF metadata).

Values found here are cross-checked against tensor shapes by `experts.index_model`; a disagreement is
a ConfigMismatch, never a silent guess.
"""
from __future__ import annotations

import os
from typing import Any

from ktnuma.errors import InvalidHeaderJSON

# key -> candidates in priority order. config.json keys are looked up in `text_config` first (Qwen3.5
# VL and similar nest the language model's config there), then at the top level. GGUF keys are
# formatted with the file's `general.architecture`.
# moe_intermediate_size: DeepSeek's `intermediate_size` is the DENSE size and it has
# `moe_intermediate_size`; Mixtral has only `intermediate_size`, which is the expert size. So the
# moe key wins and `intermediate_size` counts only when no moe key exists (then the shapes confirm it).
CONFIG_KEYS: dict[str, dict[str, tuple[str, ...]]] = {
    "num_experts": {
        "json": ("n_routed_experts", "num_local_experts", "num_experts", "moe_num_experts", "n_experts"),
        "gguf": ("{arch}.expert_count",),
    },
    "experts_per_tok": {
        "json": ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_k", "n_activated_experts",
                 "num_activated_experts"),
        "gguf": ("{arch}.expert_used_count",),
    },
    "hidden_size": {
        "json": ("hidden_size", "dim", "d_model"),
        "gguf": ("{arch}.embedding_length",),
    },
    "moe_intermediate_size": {
        "json": ("moe_intermediate_size", "expert_intermediate_size", "expert_ffn_hidden_size", "intermediate_size"),
        "gguf": ("{arch}.expert_feed_forward_length",),
    },
    "num_hidden_layers": {
        "json": ("num_hidden_layers", "n_layers", "num_layers"),
        "gguf": ("{arch}.block_count",),
    },
    "zero_experts": {  # LongCat-Flash: identity experts that have router slots but no weights to compute
        "json": ("zero_expert_num",),
        "gguf": (),
    },
    "group_size": {
        "json": ("quantization_config.group_size", "quantization_config.config_groups.group_0.weights.group_size"),
        "gguf": (),
    },
}


def _dig(d: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


CONFIG_LIMIT = 16 << 20  # bytes of a config.json


def load_config_json(root: str) -> dict[str, Any] | None:
    path = os.path.join(root, "config.json")
    if not os.path.isfile(path):
        return None
    from ktnuma.index import bounded

    try:
        cfg = bounded.read(path, limit=CONFIG_LIMIT)
    except OSError as e:
        raise InvalidHeaderJSON(path, f"cannot read: {e.strerror}") from None
    except bounded.JSONLimit as e:
        raise InvalidHeaderJSON(path, f"config is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise InvalidHeaderJSON(path, "config is not a JSON object")
    return cfg


def lookup(cfg: dict[str, Any] | None, gguf_meta: dict[str, Any] | None) -> dict[str, tuple[int, str]]:
    """Every table key found: name -> (value, where it came from)."""
    found: dict[str, tuple[int, str]] = {}
    scopes: list[tuple[str, dict[str, Any]]] = []
    if cfg is not None:
        if isinstance(cfg.get("text_config"), dict):
            scopes.append(("config.json text_config.", cfg["text_config"]))
        scopes.append(("config.json ", cfg))
    arch = str((gguf_meta or {}).get("general.architecture", ""))
    for key, sources in CONFIG_KEYS.items():
        hit: tuple[int, str] | None = None
        for cand in sources["json"]:
            for label, scope in scopes:
                v = _dig(scope, cand)
                if isinstance(v, int) and not isinstance(v, bool):
                    hit = (v, label + cand)
                    break
            if hit:
                break
        if hit is None and gguf_meta:
            for cand in sources["gguf"]:
                k = cand.format(arch=arch)
                v = gguf_meta.get(k)
                if isinstance(v, int) and not isinstance(v, bool):
                    hit = (v, "GGUF " + k)
                    break
        if hit is not None:
            found[key] = hit
    return found


def quantization_config(cfg: dict[str, Any] | None) -> dict[str, Any]:
    if not cfg:
        return {}
    for scope in (cfg.get("text_config"), cfg):
        if isinstance(scope, dict) and isinstance(scope.get("quantization_config"), dict):
            return scope["quantization_config"]
    return {}
