"""``python -m ktnuma.bench``: ktnuma against the raw bound, kt-kernel's own loader and the peers, side by side.

Generates (or reuses, in --cache) a synth model, then alternates the cases A B A B (--repeat N) and
reports medians, each warm (files read into the page cache first) and cold (files evicted with
posix_fadvise(DONTNEED) first):
  raw       scripts/raw_bound.py: one process per node, large preadv's of its share of the expert
            tensors into fresh posix_fallocate'd shared memory (the bound, as the issue defines it)
  rawsf     the same with sendfile(2) into the segment fd (an additional floor, ktnuma's copy path)
  ep, tp    `launch --detach` end to end (then `release`, untimed); ep-direct, tp-direct: --io direct;
            SPLIT[-direct]@N: over N simulated nodes (--scaling: ep and tp at 1, 2, 4, 8, both io)
  upstream  one process: kt-kernel's loader per MoE layer + the engine's load_weights_task copy,
            the loader released after each layer (as kt-kernel's NativeMoEWrapper does)
  stream    `ktnuma.stream` feeding the same kt-kernel engines
  attach    attach + engine build after a detached staging (the restart case; staging untimed)
  safetensors, fastsafetensors, runai   the peers, whole processes: the same routed-expert tensors
            into owned CPU memory, every byte touched (safe_open + get_tensor; fastsafe_open
            nogds on CPU; runai's SafetensorsStreamer)
Per case: seconds, GB/s (expert bytes / seconds), peak memory (anonymous RSS of the process tree +
the shared memory it created or maps + the model's file pages it keeps mapped; sampled every 20 ms;
not shared libraries; the sampler's own CPU time: --json's sampler_cpu), page cache left on the
expert ranges, read amplification (staging cases).
Before each timed case the bench writes and frees the staged bytes plus two layers of shared memory
(--no-warm-memory: not), so every case starts with free memory the host has backed
(measure.warm_free_memory).
Then each of the issue's targets, ok or MISS; one comparing two cases' times is judged on the
median of the rounds' ratios (report.paired). A table on stdout; --json prints one JSON object
instead. --quick: small model, 1 repeat.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from collections.abc import Sequence

from ktnuma.tools.bench.cases import PEER_CASES, Bench, known
from ktnuma.tools.bench.children import UPSTREAM_LOADERS, child_attach, child_peer, child_stream, child_upstream
from ktnuma.tools.bench.models import ensure_model
from ktnuma.tools.bench.report import print_report, targets

CASES = ("raw", "rawsf", "ep", "tp", "upstream", "stream", "attach") + PEER_CASES
SCALING = tuple(f"{s}{io}@{n}" for io in ("", "-direct") for n in (1, 2, 4, 8) for s in ("ep", "tp"))
CHILDREN = {"upstream": lambda a: child_upstream(a[0]), "stream": lambda a: child_stream(a[0], int(a[1]), a[2]),
            "attach": lambda a: child_attach(a[0]), "peer": lambda a: child_peer(a[0], a[1])}


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ktnuma.bench", description=__doc__.splitlines()[0],
                                epilog="\n".join(__doc__.splitlines()[2:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--format", default="bf16", help="synth format (default bf16)")
    p.add_argument("--size", type=float, help="GiB of experts (scales the layer count; default ~2)")
    p.add_argument("--nodes", type=int, default=2, help="nodes / raw-bound processes (default 2)")
    p.add_argument("--repeat", type=int, default=3, help="A B A B rounds (default 3)")
    p.add_argument("--cases", help="comma list (default: " + ",".join(CASES) + "; --quick: without the peers)")
    p.add_argument("--scaling", action="store_true",
                   help="also ep and tp at 1, 2, 4, 8 simulated nodes, buffered and direct")
    p.add_argument("--modes", default="warm,cold", help="warm,cold (default both)")
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "ktnuma-bench"),
                   help="where synth models are kept (default $TMPDIR/ktnuma-bench)")
    p.add_argument("--quick", action="store_true", help="small model, 1 repeat (the test suite's run)")
    p.add_argument("--overhead", action="store_true", help="also time plan + spawn for a DeepSeek-V3-sized plan")
    p.add_argument("--no-warm-memory", dest="warm_memory", action="store_false",
                   help="do not write and free the staged bytes' worth of shared memory right before each "
                        "timed case (a VM with free page reporting otherwise makes a case's speed depend on "
                        "what ran before it)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout instead of the table")
    a = p.parse_args(argv)
    default = [c for c in CASES if not (a.quick and c in PEER_CASES)]
    a.case_list = ([c for c in a.cases.split(",") if c] if a.cases else default) + (list(SCALING) if a.scaling else [])
    bad = [c for c in a.case_list if not known(c)]
    if bad:
        p.error(f"unknown case(s) {bad}; known: {', '.join(CASES)}, SPLIT[-direct][@N]")
    return a


def _select(a: argparse.Namespace) -> list[str]:
    cases = a.case_list
    if a.format not in UPSTREAM_LOADERS and not a.format.startswith("gguf:"):
        cases = [c for c in cases if c != "upstream"]
    if a.format.startswith("gguf:"):
        # one llamafile MOE per node (TP=1 each) keeps reading the staged bytes: not a copy-at-load engine
        if "stream" in cases:
            print("stream: skipped for GGUF (kt-kernel's llamafile engine at TP=1 reads the staged memory in "
                  "place; use launch --detach + attach)", file=sys.stderr)
        cases = [c for c in cases if c != "stream" and c not in PEER_CASES]  # the peers read safetensors
    return list(dict.fromkeys(cases))


def _medians(results: dict[str, dict[str, list[dict]]]) -> dict:
    out = {}
    for mode, per_case in results.items():
        rows = {}
        for c, rs in per_case.items():
            if rs:
                rows[c] = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
                rows[c]["runs"] = len(rs)
                rows[c]["rounds"] = [r["seconds"] for r in rs]  # in round order: report.paired
        raw = rows.get("raw", {}).get("seconds")
        up = rows.get("upstream", {}).get("seconds")
        for r in rows.values():
            r["vs_raw"] = raw / r["seconds"] if raw else None  # throughput ratio
            r["vs_upstream"] = up / r["seconds"] if up else None
        out[mode] = rows
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        return CHILDREN[argv[1]](argv[2:])
    a = _args(argv)
    cases = _select(a)
    repeat = 1 if a.quick else max(1, a.repeat)
    modes = [m for m in a.modes.split(",") if m]
    os.makedirs(a.cache, exist_ok=True)
    model, meta = ensure_model(a.cache, a.format, a.quick, a.size, max(8, a.nodes) if a.scaling else a.nodes)
    results: dict[str, dict[str, list[dict]]] = {m: {c: [] for c in cases} for m in modes}
    errors: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="ktnuma-bench.") as work:
        b = Bench(model, a.nodes, work, a.warm_memory)
        for _ in range(repeat):
            for mode in modes:
                for c in cases:
                    if c in errors:
                        continue
                    try:
                        results[mode][c].append(b.run(c, mode == "warm"))
                    except Exception as exc:  # noqa: BLE001 - reported in the table
                        errors[c] = f"{type(exc).__name__}: {exc}"[:600]
    summary = {"model": model, "format": a.format, "bytes": b.bytes, "largest_layer": b.largest,
               "nodes": a.nodes, "repeat": repeat, "warm_memory": a.warm_memory, "errors": errors,
               "modes": _medians(results)}
    if a.overhead:
        from ktnuma.tools.bench.overhead import overhead

        summary["overhead"] = overhead(8)
    summary["targets"] = targets(summary)
    if a.json:
        print(json.dumps(summary), flush=True)
    else:
        print_report(summary)
    return 1 if errors else 0
