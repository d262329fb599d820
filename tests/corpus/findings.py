"""python -m tests.corpus.findings [OUT.md]: what the corpus holds and what `ktnuma.inspect` says of it.

Per model: the expert tensors of its first MoE layer (names with the expert index folded to {e}, dtype,
shape, how many), the config keys about experts, and inspect's verdict. Reads headers with its own
parser (never ktnuma's readers).
"""
from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

from tests.corpus import build, versions

CONFIG_KEYS = re.compile(r"expert|moe|^hidden_size$|^d_model$|^intermediate_size$|^num_hidden_layers$|"
                         r"^n_layers$|layer_types|top_?k|dense|quantization_config")


def st_header(path: Path) -> dict:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        h = json.loads(f.read(n))
    h.pop("__metadata__", None)
    return h


def expert_rows(d: Path, layer: int, experts: int) -> list[str]:
    """Tensors of `layer` named like experts, or stacked [E, ...] (Granite/JetMoe input_linear...)."""
    rows: "OrderedDict[tuple, int]" = OrderedDict()
    pat = re.compile(rf"(^|\.)layers\.{layer}\.")
    for f in sorted(d.glob("*.safetensors")):
        for name, v in sorted(st_header(f).items()):
            stacked = len(v["shape"]) == 3 and v["shape"][0] == experts
            if not pat.search(name) or "shared" in name or not ("expert" in name or stacked):
                continue
            folded = re.sub(r"\.experts\.\d+\.", ".experts.{e}.", name)
            key = (folded, v["dtype"], tuple(v["shape"]))
            rows[key] = rows.get(key, 0) + 1
    return [f"`{n}` {dt} {list(sh)}" + (f" x{c}" if c > 1 else "") for (n, dt, sh), c in rows.items()]


def gguf_rows(path: Path) -> list[str]:
    from gguf import GGUFReader

    r = GGUFReader(path)
    out = [f"`{t.name}` {t.tensor_type.name} ggml-shape {list(map(int, t.shape))}" for t in r.tensors
           if t.name.startswith("blk.0.") and "exps" in t.name]
    arch = r.fields["general.architecture"]
    a = bytes(arch.parts[arch.data[0]]).decode()
    out += [f"meta `{k}` = {r.fields[k].contents()}" for k in r.fields
            if k.startswith(a + ".") and re.search(r"expert|block_count|embedding_length|feed_forward", k)]
    return out


def config_keys(d: Path) -> dict:
    p = d / "config.json"
    if not p.is_file():
        return {}
    c = json.loads(p.read_text())
    flat = {**c, **{f"text_config.{k}": v for k, v in (c.get("text_config") or {}).items()},
            **{f"ffn_config.{k}": v for k, v in (c.get("ffn_config") or {}).items()}}
    return {k: v for k, v in flat.items() if CONFIG_KEYS.search(k.split(".")[-1])}


def inspect(d: Path) -> str:
    env = dict(os.environ)
    p = subprocess.run([sys.executable, "-m", "ktnuma.inspect", str(d), "--json"], capture_output=True,
                       text=True, env=env, timeout=120)
    if p.returncode == 0:
        j = json.loads(p.stdout.strip().splitlines()[-1])
        c = j.get("config", {})
        m = j.get("model", j)
        return (f"ok: format {m.get('format')}, naming {m.get('naming')}, E={c.get('num_experts')} "
                f"k={c.get('experts_per_tok')} H={c.get('hidden_size')} I={c.get('moe_intermediate_size')} "
                f"layers={c.get('layers')}")
    err = (p.stderr.strip().splitlines() or ["(no message)"])[-1]
    return f"exit {p.returncode}: {err}"


def section(d: Path) -> str:
    rec = build.record(d)
    exp = rec.get("expected", {})
    lines = [f"### {rec['key']}  ({rec.get('class', '')}; {rec['writer']} {rec.get('writer_version')}; "
             f"{rec.get('format')})", f"- dir: `{d}`", f"- expected: {json.dumps(exp)}"]
    layer = (exp.get("layers") or [0])[0]
    ggufs = sorted(d.glob("*.gguf"))
    rows = gguf_rows(ggufs[0]) if ggufs else expert_rows(d, layer, exp.get("num_experts", 0))
    lines.append(f"- expert tensors of layer {layer}:")
    lines += [f"  - {r}" for r in rows[:12]] + ([f"  - ... {len(rows) - 12} more"] if len(rows) > 12 else [])
    ck = config_keys(d)
    if ck:
        lines.append(f"- config: `{json.dumps(ck, default=str)}`")
    target = ggufs[0] if ggufs else d
    lines.append(f"- `ktnuma.inspect` (main at time of writing): {inspect(target)}")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0]) if argv else None
    keys = argv[1:] or list(build.entries())
    parts = [f"# Corpus findings (engineer W)\n\nWriters: `{json.dumps(versions.versions())}`. Regenerate: "
             "`PYTHONPATH=<tree> python3 -m tests.corpus && python3 -m tests.corpus.findings OUT.md`.\n"
             "Each model: tiny config, random bf16 weights, `save_pretrained` (or the converter named).\n"]
    for k in keys:
        try:
            parts.append(section(build.ensure(k)))
        except Exception as e:  # noqa: BLE001
            parts.append(f"### {k}\n- writer failed: {type(e).__name__}: {e}")
    text = "\n\n".join(parts) + "\n"
    if out:
        out.write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
