"""Synthetic MoE checkpoints in every upstream format ktnuma reads (`python -m ktnuma.tools.synth`).

A model is fully determined by its arguments and `seed`: every tensor's bytes come from a generator
seeded by (seed, tensor name), so the same call writes the same bytes whatever the sharding.
Encodings are real (bf16, e4m3 + f32 block scales, GPTQ / compressed-tensors int4 packing, e2m1 + e8m0,
GGUF blocks with finite scales) but values are random: the files exist to be indexed and staged.

Besides routed experts each model carries what must *not* be staged: a dense layer 0, routers (and
their bias), shared experts, attention and norm weights, embeddings, GPTQ `qzeros`/`g_idx`,
compressed-tensors `weight_shape`, and for the DeepSeek namings an MTP layer numbered
`num_hidden_layers` that has experts too. MoE layers are 1..layers.

Everything is table driven, one module each: `namings` (NAMINGS: tensor names of a checkpoint family),
`encoders` (ENCODERS: how one linear layer is stored in a format), `gen` (GENERATORS: random bytes of
one stored dtype), `tables` (FORMATS, GGUF types, presets); `specs`/`configs` build a model's tensor list
and config, `build` validates the arguments, `write` writes the files, `cli` is the command line.
"""
from __future__ import annotations

from ktnuma.tools.synth.cli import main
from ktnuma.tools.synth.gen import GENERATORS
from ktnuma.tools.synth.namings import NAMINGS
from ktnuma.tools.synth.tables import FORMAT_NAMES, FORMATS, GGUF_TYPES, PRESETS, SynthInfo
from ktnuma.tools.synth.write import estimate, write_model

__all__ = ["FORMATS", "FORMAT_NAMES", "GENERATORS", "GGUF_TYPES", "NAMINGS", "PRESETS", "SynthInfo", "estimate",
           "main", "write_model"]
