"""Corpus models main's ktnuma does not stage yet: format gaps open for engineer A (issue 14), each
with the feature it needs. They are NOT expected to fail: they are left out of the default run until
the feature lands (delete the entry with the fix). `KTNUMA_CORPUS_PENDING=run` runs them too (they fail
today, naming the gap)."""
from __future__ import annotations

import os

PENDING: dict[str, str] = {
    "gpt_oss": ("stages byte-exact (stored orientation, gate/up de-interleaved as f32 [H, I]) but kt-kernel's "
                "AVX2BF16 integration refuses those pieces (it takes bf16 [I, H])"),
    "llama4_text": ("feed_forward.experts.gate_up_proj [E,H,2I] (gate = first I columns) + down_proj [E,I,H]: as "
                    "stored, gate is a strided bf16 [H, I] range and down is [I, H], but kt-kernel takes gate/up "
                    "[I, H] and down [H, I], and a tp slice can be square (misread silently): needs a "
                    "transposing stage (the executor's conversions do not see a piece's shape)"),
    "aria_text": "mlp.experts.fc1 [E,H,2I] (gate = first I columns) + fc2 [E,I,H]: same as llama4_text",
}


def skip_pending() -> bool:
    return os.environ.get("KTNUMA_CORPUS_PENDING") != "run"
