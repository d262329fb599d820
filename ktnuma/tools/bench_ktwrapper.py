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
                "method": METHOD_FOR_FAMILY[family(idx.format)], "layers": list(c.layers), "forward": False,
                "model_files": [f.path for f in idx.files]}
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


# ----------------------------------------------------------------------------------------------
# Standalone: the load itself (timed inside the engine process, start-up excluded), alternated.
#   python -m ktnuma.tools.bench_ktwrapper MODEL [--nodes N] [--repeat R] [--env K=V ...]
# ----------------------------------------------------------------------------------------------
def _set_cache(files: list[str], warm: bool) -> None:
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            if warm:
                while os.read(fd, 1 << 24):
                    pass
            else:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import statistics
    import sys
    import tempfile

    import numpy as np

    from ktnuma.index.experts import index_model

    ap = argparse.ArgumentParser(prog="python -m ktnuma.tools.bench_ktwrapper")
    ap.add_argument("model")
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--env", action="append", default=[], help="K=V for every engine process (all cases)")
    ap.add_argument("--ktnuma-env", action="append", default=[], help="K=V for the ktnuma cases only")
    a = ap.parse_args(argv)
    files = [f.path for f in index_model(a.model).files]
    with tempfile.TemporaryDirectory(prefix="ktwrapper-bench-") as work:

        class B:  # what the case functions read
            model, nodes, py = a.model, a.nodes, sys.executable
            env = dict(os.environ, KTNUMA_RUN_ID_PREFIX=os.urandom(3).hex())

            @staticmethod
            def release(man: str) -> None:
                subprocess.run([sys.executable, "-m", "ktnuma.release", man], capture_output=True, env=B.env)

        B.work = work
        _resident(B)  # stage the resident run once (its own run-id prefix: not in the peaks)
        staged_bytes = sum(s["size"] for s in json.load(open(os.path.join(work, "ktwrapper-run.json")))["segments"])
        mine = os.urandom(3).hex()
        extra = dict(kv.split("=", 1) for kv in a.env)
        ours = dict(kv.split("=", 1) for kv in a.ktnuma_env)
        cases = {"stock": {}, "handoff": {"KTNUMA_STAGE": "1", **ours},
                 "resident": {"KTNUMA_MANIFEST": os.path.join(work, "ktwrapper-run.json"), **ours}}
        rows: dict[tuple[str, str], list[dict]] = {}
        for mode in ("cold", "warm"):
            for _ in range(a.repeat):
                for case, env in cases.items():
                    _set_cache(files, mode == "warm")
                    argv_ = _argv(B, **env)
                    cmd = [argv_[0], f"KTNUMA_RUN_ID_PREFIX={mine}", *(f"{k}={v}" for k, v in extra.items()),
                           *argv_[1:-1]]
                    r = subprocess.run(cmd, capture_output=True, text=True, env=B.env)
                    res = json.loads(r.stdout.strip().splitlines()[-1])
                    if res["exitcode"] != 0:
                        rows.setdefault((mode, case), []).append({"error": res["error"] or f"exit {res['exitcode']}"})
                        continue
                    meta = json.loads(bytes(np.load(argv_[-2])["meta"]))
                    rows.setdefault((mode, case), []).append(meta)
        print(f"model {a.model}: {staged_bytes / 2**30:.2f} GiB staged, {a.nodes} node(s), "
              f"median of {a.repeat}; load = build + load_weights of every layer inside the engine process")
        print(f"{'mode':5} {'case':9} {'load s':>8} {'x stock':>8} {'peak GiB':>9} {'x stock':>8}  note")
        for mode in ("cold", "warm"):
            base = rows.get((mode, "stock"), [])
            base_ok = [r for r in base if "error" not in r]
            b_load = statistics.median(r["load_s"] for r in base_ok) if base_ok else None
            b_peak = statistics.median(r["peak"] for r in base_ok) if base_ok else None
            for case in cases:
                ok = [r for r in rows.get((mode, case), []) if "error" not in r]
                if not ok:
                    err = rows.get((mode, case), [{}])[0].get("error", "?")
                    print(f"{mode:5} {case:9} {'-':>8} {'-':>8} {'-':>9} {'-':>8}  {err[:90]}")
                    continue
                load = statistics.median(r["load_s"] for r in ok)
                peak = statistics.median(r["peak"] for r in ok)
                note = f"+ {staged_bytes / 2**30:.2f} GiB resident segments (not in peak)" if case == "resident" else ""
                xs = f"{load / b_load:8.3f}" if b_load else f"{'-':>8}"
                xp = f"{peak / b_peak:8.3f}" if b_peak else f"{'-':>8}"
                print(f"{mode:5} {case:9} {load:8.3f} {xs} {peak / 2**30:9.3f} {xp}  {note}")
        print("targets: handoff cold <= 0.6x stock, warm <= 1.0x, peak <= stock; resident RAWINT4 restart "
              "<= 0.01x stock load")
        B.release(os.path.join(work, "ktwrapper-run.json"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
