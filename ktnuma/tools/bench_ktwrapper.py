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
import re
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
# Standalone: the load itself (timed inside the engine process, interpreter start-up excluded), alternated.
#   python -m ktnuma.tools.bench_ktwrapper MODEL [MODEL ...] [--nodes N] [--repeat R] [--env K=V ...]
#        [--ktnuma-env K=V ...] [--resident-env K=V ...] [--no-warm-memory]
# Several MODELs (e.g. the same layer count at two sizes): each is measured on its own (stock, handoff,
# resident alternated within it) and the targets are judged per model, so a fixed cost shows as a
# ratio that shrinks with the model.
# ----------------------------------------------------------------------------------------------
CASES = ("stock", "handoff", "resident")
MODES = ("cold", "warm")


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


def _kv(items: list[str]) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in items)


def _measure(a: Any, model: str, work: str) -> tuple[dict, dict[tuple[str, str], list[dict]]]:
    """Stage the resident run once, then alternate the three cases `a.repeat` times per mode.
    Returns (facts about the model, {(mode, case): [child meta | {"error": ...}]})."""
    import sys

    import numpy as np

    from ktnuma.index.experts import index_model
    from ktnuma.tools.bench.measure import warm_free_memory

    files = [f.path for f in index_model(model).files]
    os.makedirs(work)

    class B:  # what the case functions read
        py = sys.executable
        env = dict(os.environ, KTNUMA_RUN_ID_PREFIX=os.urandom(3).hex())

        @staticmethod
        def release(man: str) -> None:
            subprocess.run([sys.executable, "-m", "ktnuma.release", man], capture_output=True, env=B.env)

    B.model, B.nodes, B.work = model, a.nodes, work
    man = os.path.join(work, "ktwrapper-run.json")
    _resident(B)  # staged once, before the rounds (its own run-id prefix: not in the peaks)
    try:
        staged = sum(s["size"] for s in json.load(open(man))["segments"])
        with open(_spec(B)) as f:
            spec = json.load(f)
        method = spec["method"]
        mine = os.urandom(3).hex()
        extra, ours = _kv(a.env), _kv(a.ktnuma_env)
        envs = {"stock": {}, "handoff": {"KTNUMA_STAGE": "1", **ours},
                "resident": {"KTNUMA_MANIFEST": man, **ours, **_kv(a.resident_env)}}
        rows: dict[tuple[str, str], list[dict]] = {}
        repeated = 0
        warm_bytes = staged + 2 * -(-staged // max(len(spec["layers"]), 1))  # staged + two layers, as the bench

        def once(mode: str, case: str) -> dict:
            _set_cache(files, mode == "warm")
            if a.warm_memory:  # right before the child starts (ktnuma.tools.bench.measure.warm_free_memory)
                warm_free_memory(warm_bytes)
            argv_ = _argv(B, **envs[case])
            cmd = [argv_[0], f"KTNUMA_RUN_ID_PREFIX={mine}", *(f"{k}={v}" for k, v in extra.items()), *argv_[1:-1]]
            r = subprocess.run(cmd, capture_output=True, text=True, env=B.env)
            lines = r.stdout.strip().splitlines()
            res = json.loads(lines[-1]) if lines else {"exitcode": r.returncode, "error": r.stderr[-300:]}
            if res["exitcode"] != 0:
                return {"error": res["error"] or f"exit {res['exitcode']}"}
            return {**json.loads(bytes(np.load(argv_[-2])["meta"])), "kt_cpp_s": _kt_cpp_seconds(lines)}

        for mode in MODES:
            for _ in range(a.repeat):
                for case in CASES:
                    row = once(mode, case)
                    if "SegmentMissing" in row.get("error", ""):  # another process's cleanup took the segments
                        repeated += 1
                        if case == "resident":  # stage the run again (same model, same command)
                            B.release(man)
                            if os.path.exists(man):
                                os.unlink(man)
                            _resident(B)
                        row = once(mode, case)
                    rows.setdefault((mode, case), []).append(row)
    finally:
        B.release(man)
    size = sum(os.path.getsize(f) for f in files)
    return {"model": model, "staged": staged, "size": size, "method": method, "repeated": repeated}, rows


_KT_TIMES = re.compile(r"\[NativeMoEWrapper Layer \d+\] .*create_moe: ([\d.]+)ms, cpp_load_weights: ([\d.]+)ms")


def _kt_cpp_seconds(lines: list[str]) -> float | None:
    """kt-kernel's own C++ share of the load: the sum over layers of the `create_moe` and
    `cpp_load_weights` times NativeMoEWrapper.load_weights prints (kt-kernel 0.7.2); None if it
    printed none (the AMX and llamafile wrappers do not)."""
    got = [float(m[1]) + float(m[2]) for m in map(_KT_TIMES.search, lines) if m]
    return sum(got) / 1000 if got else None


def _median(rows: list[dict], key: str) -> float | None:
    import statistics

    ok = [r[key] for r in rows if "error" not in r and key in r]
    return statistics.median(ok) if ok else None


def _report(facts: dict, rows: dict[tuple[str, str], list[dict]], a: Any) -> list[tuple[str, bool | None, str]]:
    """Print one model's table; return its targets as (name, met or None if not measured, numbers)."""
    G = 2**30
    staged = facts["staged"] / G
    print(f"\nmodel {facts['model']}: {facts['method']}, {facts['size'] / G:.2f} GiB on disk, {staged:.2f} GiB "
          f"staged, {a.nodes} node(s), median of {a.repeat}")
    if facts["repeated"]:
        print(f"note: {facts['repeated']} run(s) repeated: another process removed their segments (SegmentMissing)")
    print("load = every wrapper built + every load_weights, inside the engine process, after `import kt_kernel`"
          " (import = that import, incl. the .pth hook's patches; hook = ktnuma's share of it); peak = anon RSS"
          " + the run's segments + the model's page cache; resident = restart (attach + engine build)")
    print(f"{'mode':5} {'case':9} {'load s':>8} {'x stock':>8} {'import s':>8} {'hook s':>7} {'peak GiB':>9} "
          f"{'x stock':>8}  note")
    got: dict[tuple[str, str], dict[str, float | None]] = {}
    for mode in MODES:
        b_load = _median(rows.get((mode, "stock"), []), "load_s")
        b_peak = _median(rows.get((mode, "stock"), []), "peak")
        for case in CASES:
            rs = rows.get((mode, case), [])
            load, peak = _median(rs, "load_s"), _median(rs, "peak")
            if load is None or peak is None:
                err = next((r["error"] for r in rs if "error" in r), "?").strip().splitlines()[-1:] or ["?"]
                print(f"{mode:5} {case:9} {'-':>8} {'-':>8} {'-':>8} {'-':>7} {'-':>9} {'-':>8}  {err[0][:100]}")
                continue
            hook = _median(rs, "hook_s") or 0.0
            cpp = _median(rs, "kt_cpp_s")
            xs, xp = (load / b_load if b_load else None), (peak / b_peak if b_peak else None)
            got[(mode, case)] = {"load": load, "peak": peak, "xs": xs, "xp": xp, "hook": hook, "cpp": cpp}
            kt = f" (kt-kernel's C++ create_moe + load_weights: {cpp:.3f} s)" if cpp is not None else ""
            note = (f"restart {load + hook:.3f} s{kt}; memory {peak / G:.2f} GiB engine side + {staged:.2f} GiB "
                    "segments" if case == "resident" else "")
            f = (lambda v: f"{v:8.3f}" if v is not None else f"{'-':>8}")
            print(f"{mode:5} {case:9} {load:8.3f} {f(xs)} {_median(rs, 'import_s') or 0:8.3f} {hook:7.3f} "
                  f"{peak / G:9.3f} {f(xp)}  {note}")

    def target(name: str, key: tuple[str, str], field: str, limit: float, extra: str = "") -> None:
        v = got.get(key, {}).get(field)
        out.append((name, None if v is None else v <= limit, "not measured" if v is None else f"{v:.3f}{extra}"))

    out: list[tuple[str, bool | None, str]] = []
    target("handoff cold load <= 0.6x stock", ("cold", "handoff"), "xs", 0.6, "x")
    target("handoff warm load <= 1.0x stock", ("warm", "handoff"), "xs", 1.0, "x")
    target("handoff cold peak <= stock", ("cold", "handoff"), "xp", 1.0, "x")
    target("handoff warm peak <= stock", ("warm", "handoff"), "xp", 1.0, "x")
    res, stock = got.get(("cold", "resident")), got.get(("cold", "stock"))
    if facts["method"] == "RAWINT4" and res and stock:  # the in-place engine: restart vs the stock load
        r = (res["load"] + res["hook"]) / stock["load"]
        out.append(("resident RAWINT4 restart <= 0.01x stock cold load", r <= 0.01,
                    f"{r:.4f}x ({res['load'] + res['hook']:.3f} s / {stock['load']:.3f} s)"))
        if res.get("cpp") is not None:  # what is left once kt-kernel's own C++ work is taken out
            rest = res["load"] + res["hook"] - res["cpp"]
            out.append(("  (info) restart less kt-kernel's own C++ time <= 0.01x", rest / stock["load"] <= 0.01,
                        f"{rest / stock['load']:.4f}x ({rest:.3f} s / {stock['load']:.3f} s)"))
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse
    import tempfile

    ap = argparse.ArgumentParser(prog="python -m ktnuma.tools.bench_ktwrapper")
    ap.add_argument("model", nargs="+", help="model directories (e.g. one layer count at two sizes)")
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--env", action="append", default=[], help="K=V for every engine process (all cases)")
    ap.add_argument("--ktnuma-env", action="append", default=[], help="K=V for the ktnuma cases only")
    ap.add_argument("--resident-env", action="append", default=[],
                    help="K=V for the resident case only (e.g. KT_RAWINT4_BACKEND=avx2: the in-place engine, "
                         "which a handoff refuses)")
    ap.add_argument("--no-warm-memory", dest="warm_memory", action="store_false",
                    help="do not write and free the staged bytes + two layers of shared memory right before "
                         "each child (python -m ktnuma.bench --help: a VM with free page reporting otherwise "
                         "makes a case's speed depend on what ran before it)")
    a = ap.parse_args(argv)
    verdicts: list[tuple[str, str, bool | None, str]] = []
    with tempfile.TemporaryDirectory(prefix="ktwrapper-bench-") as work:
        for i, model in enumerate(a.model):
            facts, rows = _measure(a, model, os.path.join(work, str(i)))
            verdicts += [(model, *t) for t in _report(facts, rows, a)]
    print("\ntargets (issue 13):")
    for model, name, ok, numbers in verdicts:
        mark = "-" if ok is None else ("ok" if ok else "MISS")
        print(f"  {mark:4} {name:52} {numbers:40} {os.path.basename(os.path.normpath(model))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
