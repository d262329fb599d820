"""`python -m ktnuma.tools.synth` / `python -m ktnuma.synth`."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ktnuma.text import ranges
from ktnuma.tools.synth.tables import FORMATS, FORMAT_NAMES, GGUF_TYPES, PRESETS
from ktnuma.tools.synth.write import write_model

# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m ktnuma.tools.synth",
        description="Write a deterministic synthetic MoE checkpoint (random values, real encodings) with the "
                    "routers, shared experts, dense layer 0 and (DeepSeek namings) MTP layer that ktnuma must "
                    "not stage. MoE layers are 1..LAYERS.",
        epilog="formats: " + ", ".join(FORMAT_NAMES) + " (any gguf:<T> of " + ", ".join(GGUF_TYPES) + "). "
               "namings: " + "; ".join(f"{f.name}: {', '.join(f.namings)}" for f in FORMATS.values()) + ". "
               "variants: fp8 1d, rawint4 asym, gptq-int4 desc_act|asym, gguf no-expert-counts. "
               "presets: " + "; ".join(f"{k}: {v}" for k, v in PRESETS.items()) + ".")
    p.add_argument("out_dir", help="directory to write (created if missing)")
    p.add_argument("--format", default="bf16", metavar="F", help="model format (default bf16)")
    p.add_argument("--naming", default=None, help="tensor naming (default: the format's first)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="shape preset (default tiny)")
    p.add_argument("--layers", type=int, default=None, help="number of MoE layers")
    p.add_argument("--experts", type=int, default=None, help="routed experts per layer")
    p.add_argument("--hidden", type=int, default=None, help="hidden size H")
    p.add_argument("--intermediate", type=int, default=None, help="expert intermediate size I")
    p.add_argument("--experts-per-tok", type=int, default=None, help="experts per token (top-k)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shards", type=int, default=1, help="safetensors files (> 1 writes an index json)")
    p.add_argument("--group-size", type=int, default=None, help="rawint4 / gptq-int4 group size (default 32)")
    p.add_argument("--gguf-type", default=None, metavar="T",
                   help="GGUF type: T, or GATEUP,DOWN, or GATE,UP,DOWN (e.g. Q4_K,Q6_K)")
    p.add_argument("--per-channel", action="store_true", help="fp8 per-channel scales (same as fp8-channel)")
    p.add_argument("--variant", default=None, help="comma-separated variants (see below)")
    p.add_argument("--numa-shards", type=int, default=2, help="amx formats: .numa.{n} shard count")
    p.add_argument("--no-mtp", action="store_true", help="omit the DeepSeek MTP layer")
    a = p.parse_args(argv)
    fmt = a.format
    if a.gguf_type and fmt == "bf16":
        fmt = "gguf"
    try:
        info = write_model(a.out_dir, fmt, naming=a.naming, layers=a.layers, experts=a.experts, hidden=a.hidden,
                           intermediate=a.intermediate, experts_per_tok=a.experts_per_tok, seed=a.seed,
                           shards=a.shards, group_size=a.group_size, gguf_types=a.gguf_type,
                           per_channel=a.per_channel, variant=a.variant, preset=a.preset,
                           mtp=False if a.no_mtp else None, numa_shards=a.numa_shards)
    except ValueError as e:
        print(f"ktnuma.synth: {e}", file=sys.stderr)
        return 2
    extra = f" gguf_types={','.join(info.options['gguf_types'])}" if info.options.get("gguf_types") else ""
    print(f"wrote {info.path}: format={info.fmt}{extra} naming={info.naming} moe_layers="
          f"{ranges(info.moe_layers)} experts={info.manifest_config['num_experts']} "
          f"H={info.manifest_config['hidden_size']} I={info.manifest_config['moe_intermediate_size']} "
          f"tensors={info.tensor_count} bytes={info.nbytes} staged_bytes={info.staged_nbytes} files={len(info.files)}")
    return 0

