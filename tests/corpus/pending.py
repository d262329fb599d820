"""Corpus models main's ktnuma does not stage yet: format gaps open for engineer A (issue 14), each
with the feature it needs. They are NOT expected to fail: they are left out of the default run until
the feature lands (delete the entry with the fix). `KTNUMA_CORPUS_PENDING=run` runs them too (they fail
today, naming the gap)."""
from __future__ import annotations

import os

PENDING: dict[str, str] = {
    "bailing_hybrid": "experts_per_tok from config key num_experts_per_token",
    "kimi_linear": "experts_per_tok from config key num_experts_per_token",
    "ernie4_5_moe": "experts_per_tok from config key moe_k",
    "jamba": "naming feed_forward.experts.{e}.{gate,up,down}_proj",
    "lfm2_moe": "naming feed_forward.experts.{e}.{w1,w3,w2}",
    "granitemoe": "stacked block_sparse_moe.input_linear [E,2I,H] + output_linear [E,H,I]",
    "granitemoe_swa": "stacked block_sparse_moe.input_linear [E,2I,H] + output_linear [E,H,I]",
    "granitemoeshared": "stacked block_sparse_moe.input_linear [E,2I,H] + output_linear [E,H,I]",
    "granitemoehybrid": "stacked block_sparse_moe.input_linear [E,2I,H] + output_linear [E,H,I]",
    "jetmoe": "stacked mlp.input_linear [E,2I,H] + mlp.output_linear [E,H,I] (not self_attention.experts)",
    "gpt_oss": "gate_up_proj [E,H,2I] gate/up interleaved on the last dim, down_proj [E,I,H], biases",
    "llama4_text": "feed_forward.experts.gate_up_proj [E,H,2I] (gate = first I columns) + down_proj [E,I,H]",
    "aria_text": "mlp.experts.fc1 [E,H,2I] (gate = first I columns) + fc2 [E,I,H]",
    "inkling2_text": "model.llm.layers prefix, w13_weight [E,2I,H] gate/up interleaved by rows + w2_weight",
    "longcat_flash": "zero-expert slots: stage the config's n_routed_experts (8 of 12 slots)",
    "nemotron_h": "refusal naming un-gated experts (up/down only, relu2): no engine here runs them",
}


def skip_pending() -> bool:
    return os.environ.get("KTNUMA_CORPUS_PENDING") != "run"
