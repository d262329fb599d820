"""Bench cases: a whole model loaded through kt-kernel's unmodified KTMoEWrapper, SGLang's way (one wrapper
per MoE layer built in ascending order, then load_weights on each in order, in a multiprocessing spawn
child; ktnuma.tools.ktwrapper_child), three ways:

| case                | what the timed child does                                                       |
|---------------------|---------------------------------------------------------------------------------|
| ktwrapper-stock     | kt-kernel's own loaders read the model directory                                |
| ktwrapper-handoff   | KTNUMA_STAGE=1: ktnuma stages layer by layer ahead of load_weights, releases    |
| ktwrapper-resident  | KTNUMA_MANIFEST: attach to a run staged once before the rounds (restart cost)   |

Registered in the bench's case table through BENCH_CASES (ktnuma.tools.bench.cases.table), e.g.
``python -m ktnuma.bench MODEL --cases ktwrapper-stock,ktwrapper-handoff,ktwrapper-resident``; the
bench alternates them and reports seconds and peak (anon + shm + model page cache) side by side. The
method comes from the model's format, threadpool_count from the bench's --nodes.
"""
from __future__ import annotations

import atexit
import json
import os
import subprocess
from typing import Any

CHILD = "ktnuma.tools.ktwrapper_child"


def _spec(b: Any) -> str:
    """The child's spec for bench `b`'s model (written once)."""
    path = os.path.join(b.work, "ktwrapper-spec.json")
    if not os.path.exists(path):
        from ktnuma.index.experts import index_model
        from ktnuma.index.quant import family
        from ktnuma.integrations.kt_kernel.methods import METHOD_FOR_FAMILY

        idx = index_model(b.model)
        c = idx.config
        spec = {"experts": c.num_experts, "experts_per_tok": c.experts_per_tok, "hidden": c.hidden_size,
                "intermediate": c.moe_intermediate_size, "threadpool_count": b.nodes, "weight_path": b.model,
                "method": METHOD_FOR_FAMILY[family(idx.format)], "layers": list(c.layers), "forward": False}
        with open(path, "w") as f:
            json.dump(spec, f)
    return path


def _argv(b: Any, **env: str) -> list[str]:
    from ktnuma.tools.ktwrapper_child import make_hook_site

    hook = make_hook_site(os.path.join(b.work, "ktwrapper-hook"))
    paths = [hook, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))]
    pp = os.pathsep.join([*paths, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    out = os.path.join(b.work, "ktwrapper-out.npz")
    return ["env", f"PYTHONPATH={pp}", "KT_FORCE_SYNC_SUBMIT=1", *(f"{k}={v}" for k, v in env.items()),
            b.py, "-m", CHILD, _spec(b), out, "--strict"]


def _resident(b: Any) -> list[str]:
    man = os.path.join(b.work, "ktwrapper-run.json")
    if not os.path.exists(man):
        split = "tp" if b.nodes == 1 or json.load(open(_spec(b)))["method"].startswith("AMX") else "ep"
        subprocess.run([b.py, "-m", "ktnuma.launch", b.model, "--nodes", str(b.nodes), "--split", split,
                        "--detach", "--quiet", "--manifest", man], check=True, capture_output=True, env=b.env)
        atexit.register(b.release, man)
    return _argv(b, KTNUMA_MANIFEST=man)


BENCH_CASES = {
    "ktwrapper-stock": lambda b: _argv(b),
    "ktwrapper-handoff": lambda b: _argv(b, KTNUMA_STAGE="1"),
    "ktwrapper-resident": _resident,
}
