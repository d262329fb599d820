"""Corpus models main's ktnuma does not stage yet: format gaps open for engineer A (issue 14), each
with the feature it needs. They are NOT expected to fail: they are left out of the default run until
the feature lands (delete the entry with the fix). `KTNUMA_CORPUS_PENDING=run` runs them too (they fail
today, naming the gap). None is open today: Llama4, Aria and gpt-oss stage transposed (issue 14)."""
from __future__ import annotations

import os

PENDING: dict[str, str] = {}

# key -> regex of the one-line refusal: features no engine here can run (kt-kernel computes
# silu(gate) * up experts). tests/test_corpus.py requires exactly these refusals.
REFUSALS: dict[str, str] = {
    "nemotron_h": r"(?i)(no gate|non-gated|ungated|gate.*missing|relu)",
}


def skip_pending() -> bool:
    return os.environ.get("KTNUMA_CORPUS_PENDING") != "run"
