"""`python -m ktnuma.inspect MODEL [--json]`: what ktnuma would stage from a model directory."""
from __future__ import annotations

import argparse
import json
import sys

from ktnuma.cli import human, run


def describe(path: str, fmt: str | None = None, layers: str | None = None) -> dict:
    from ktnuma.index.experts import format_layers, index_model, layer_bytes

    idx = index_model(path, format=fmt, layers=layers)
    per_layer = layer_bytes(idx)
    return {
        "path": idx.root,
        "format": idx.format,
        "naming": idx.naming,
        "notes": dict(idx.notes),
        "config": idx.config.as_manifest(),
        "moe_layers": list(idx.all_layers),
        "layers_spec": format_layers(idx.config.layers),
        "shards": idx.shards,
        "files": [{"path": f.path, "size": f.size} for f in idx.files],
        "layer_bytes": {str(k): v for k, v in sorted(per_layer.items())},
        "expert_bytes": sum(per_layer.values()),
        "dtypes": sorted({f"{g.proj}.{g.kind}={g.dtype}" for g in idx.groups}),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m ktnuma.inspect",
        description="Show what ktnuma finds in a model directory: format, expert naming, config "
        "(the manifest's config keys) and the routed-expert bytes of every MoE layer. Reads headers only.",
    )
    ap.add_argument("model", help="model directory (safetensors shards or GGUF) or one .safetensors/.gguf file")
    ap.add_argument("--format", help="override format detection (bf16, fp8, rawint4, gptq-int4, mxfp4, "
                    "amx-int4, amx-int8, gguf:<TYPE>)")
    ap.add_argument("--layers", help="checkpoint layer numbers to include, e.g. 1-3,7 (default: every MoE layer "
                    "below num_hidden_layers)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = ap.parse_args(argv)
    info = describe(args.model, args.format, args.layers)
    if args.json:
        print(json.dumps(info))
        return 0
    c = info["config"]
    print(f"model      {info['path']}")
    print(f"format     {info['format']}   naming {info['naming']}" + (f"   shards {info['shards']}" if info["shards"] else ""))
    print(f"config     num_experts={c['num_experts']} experts_per_tok={c['experts_per_tok']} "
          f"hidden_size={c['hidden_size']} moe_intermediate_size={c['moe_intermediate_size']}")
    print(f"layers     {info['layers_spec']} (MoE layers in the checkpoint: {len(info['moe_layers'])})")
    print(f"dtypes     {' '.join(info['dtypes'])}")
    for layer, n in info["layer_bytes"].items():
        print(f"  layer {layer:>4}  {human(n):>12}")
    print(f"total      {human(info['expert_bytes'])} of routed experts in {len(info['files'])} file(s)")
    return 0


if __name__ == "__main__":
    sys.exit(run("inspect", main))
