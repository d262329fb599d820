#!/usr/bin/env python3
"""Attach to a staged run, build kt-kernel's MoE for every staged layer and run one forward each.

    python scripts/attach_forward.py MANIFEST [--tokens N] [--threads T] [--mode flat|pointers] [--json]

Run it in its own process after `python -m ktnuma.launch ... --detach`. For each layer: tp split,
one engine per node of width I/N whose outputs are summed; ep split, one engine over all experts
(merged per-expert pointer rows; GGUF: one stacked buffer). Every layer's output is compared with
the torch reference of the dequantized staged weights. Prints attach time, engine build time,
per-layer forward time and relative L1; exit 0 when every layer is within the backend's
tolerance, 2 on bad input or a failed check.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("manifest")
    p.add_argument("--tokens", type=int, default=12, help="random tokens per forward (default 12)")
    p.add_argument("--threads", type=int, default=None, help="kt-kernel threads (default: CPUs available)")
    p.add_argument("--mode", choices=("flat", "pointers"), default=None, help="how weights are handed over")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON result line on stdout")
    a = p.parse_args(argv)

    import ktnuma
    from ktnuma.errors import KtnumaError
    from ktnuma.integrations import kt_kernel as K
    from ktnuma.tools import engine_check as EC

    try:
        t0 = time.perf_counter()
        att = ktnuma.attach(a.manifest)
        t_attach = time.perf_counter() - t0
    except KtnumaError as exc:
        print(f"attach_forward: {exc}", file=sys.stderr)
        return exc.exit_code
    threads = a.threads or len(os.sched_getaffinity(0))
    result: dict = {"manifest": os.path.abspath(a.manifest), "format": att.format, "split": att.split,
                    "nodes": list(att.nodes), "attach_s": round(t_attach, 6), "layers": []}
    saved = os.dup(1)
    sys.stdout.flush()
    os.dup2(2, 1)  # kt-kernel's C++ chatter goes to stderr; stdout carries the result only
    try:
        with att:
            t0 = time.perf_counter()
            cpu = K.make_cpuinfer(threads=threads)
            t_cpu = time.perf_counter() - t0
            engines = []
            t0 = time.perf_counter()
            for layer in att.layers:
                t1 = time.perf_counter()
                eng = K.engines_for_layer(att.layer(layer), cpu, mode=a.mode, max_len=max(a.tokens, 1))
                engines.append((eng, time.perf_counter() - t1))
            t_build = time.perf_counter() - t0
            for i, (eng, t_b) in enumerate(engines):
                err, t_f = EC.check_layer(eng, cpu, tokens=a.tokens, seed=a.seed + i)
                result["layers"].append({"layer": eng.layer, "engine": eng.spec.engine_class,
                                         "engines": len(eng.parts), "mode": eng.parts[0].mode,
                                         "build_s": round(t_b, 6), "forward_s": round(t_f, 6),
                                         "rel_l1": round(err, 6), "copied_bytes": eng.copied})
            result.update(cpuinfer_s=round(t_cpu, 6), build_s=round(t_build, 6), threads=threads)
            engines.clear()
            eng = cpu = None  # engines and CPUInfer go before the views they may read
    except KtnumaError as exc:
        print(f"attach_forward: {exc}", file=sys.stderr)
        return exc.exit_code
    finally:
        import gc

        gc.collect()
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
    print(f"attached {result['manifest']} ({att.format}, split {att.split}, nodes {list(att.nodes)}) "
          f"in {1e3 * t_attach:.2f} ms; engines built in {1e3 * result['build_s']:.1f} ms "
          f"(+ {1e3 * t_cpu:.0f} ms CPUInfer, {threads} threads)", file=sys.stderr)
    print(f"{'layer':>5} {'engine':<18} {'parts':>5} {'mode':<8} {'build ms':>9} {'fwd ms':>8} {'rel L1':>8}",
          file=sys.stderr)
    for r in result["layers"]:
        print(f"{r['layer']:>5} {r['engine']:<18} {r['engines']:>5} {r['mode']:<8} {1e3 * r['build_s']:>9.2f} "
              f"{1e3 * r['forward_s']:>8.2f} {r['rel_l1']:>8.4f}", file=sys.stderr)
    worst = max((r["rel_l1"] for r in result["layers"]), default=0.0)
    print(f"ok: {len(result['layers'])} layer(s), {a.tokens} tokens each, worst rel L1 {worst:.4f} vs torch",
          file=sys.stderr if a.json else sys.stdout)
    if a.json:
        print(json.dumps(result))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
