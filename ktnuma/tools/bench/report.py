"""The issue's targets, each checked against the medians (ok / MISS), and the printed tables.

A target that compares two cases' times (tp@8 against ep@8, the sendfile floor against staging) is
judged on their *paired* ratio: every round runs all cases back to back, so the ratio is taken round
by round and its median judged. This machine's speed drifts between rounds (a shared VM: the cost of
first touching memory changes with what the host did last), which a ratio of the two medians mixes
in; the pairing cancels it. The message shows both, and the range of the rounds."""
from __future__ import annotations

import statistics

GIB = 2 ** 30


def paired(num: dict, den: dict) -> tuple[float, float, float, int]:
    """num's seconds over den's, round by round (both rows' "rounds", in round order; a case that
    failed part-way has fewer, and the pairs stop there): (median, lowest, highest, pairs)."""
    v = sorted(a / b for a, b in zip(num.get("rounds") or [num["seconds"]], den.get("rounds") or [den["seconds"]]))
    return statistics.median(v), v[0], v[-1], len(v)


def _ratio_note(num: dict, den: dict, what: str) -> tuple[float, str]:
    """(paired median, its message: the pairs' range, and the ratio of the medians)."""
    med, lo, hi, n = paired(num, den)
    return med, (f"{med:.2f} x paired median of {n} round(s) (range {lo:.2f}-{hi:.2f}); medians {what} "
                 f"{num['seconds']:.2f} s / {den['seconds']:.2f} s = {num['seconds'] / den['seconds']:.2f} x")


def _scale_targets(s: dict, add) -> None:
    """read_bytes / staged <= 1.02 at 2, 4 and 8 nodes; tp@8 <= 1.15 x ep@8 (cold direct, warm buffered)."""
    for mode, rows in s["modes"].items():
        for case, r in rows.items():
            n = int(case.split("@")[1]) if "@" in case else s["nodes"]
            if "read_ratio" in r and n >= 2:
                add(f"{mode} {case} read_bytes / staged_bytes <= 1.02", r["read_ratio"] <= 1.02,
                    f"{r['read_ratio']:.4f}")
    for mode, io in (("cold", "-direct"), ("warm", "")):
        rows = s["modes"].get(mode, {})
        tp, ep = rows.get(f"tp{io}@8"), rows.get(f"ep{io}@8")
        if tp and ep:
            v, note = _ratio_note(tp, ep, "tp / ep")
            add(f"{mode} tp{io}@8 <= 1.15 x ep{io}@8", v <= 1.15, note)


def _peer_targets(s: dict, add, staged: int, layer: int) -> None:
    """Warm whole-process staging (ep, tp at the bench's nodes) >= 3 x faster than each peer."""
    warm = s["modes"].get("warm", {})
    for peer in ("safetensors", "fastsafetensors", "runai"):
        if peer not in warm:
            continue
        for split in ("ep", "tp"):
            if split in warm:
                v = warm[peer]["seconds"] / warm[split]["seconds"]
                add(f"warm {split} >= 3 x faster than {peer}", v >= 3,
                    f"{v:.2f} x ({warm[peer]['seconds']:.2f} s vs {warm[split]['seconds']:.2f} s; peer peak "
                    f"{warm[peer]['peak'] / GIB:.2f} GiB, staged + 1.5 layers {(staged + 1.5 * layer) / GIB:.2f} GiB)")


def targets(s: dict) -> list[dict]:
    """The issue's targets against the medians (each: target, measured, ok)."""
    out: list[dict] = []
    gib = 2 ** 30
    B, L = s["bytes"], s["largest_layer"]

    def add(target: str, ok: bool, measured: str) -> None:
        out.append({"target": target, "ok": bool(ok), "measured": measured})

    warm, cold = s["modes"].get("warm", {}), s["modes"].get("cold", {})
    for split, want in (("ep", 0.9), ("tp", 0.85)):
        if split in warm and "raw" in warm:
            r = warm[split]["vs_raw"]
            sf = warm.get("rawsf", {}).get("seconds")
            extra = f"; vs the sendfile floor {sf / warm[split]['seconds']:.2f} x" if sf else ""
            add(f"warm {split} staging >= {want} x raw bound", r >= want,
                f"{r:.2f} x ({warm['raw']['seconds']:.2f} s raw / {warm[split]['seconds']:.2f} s){extra}")
            if sf:
                v, note = _ratio_note(warm["rawsf"], warm[split], f"rawsf / {split}")
                add(f"warm {split} staging >= 0.85 x the sendfile floor", v >= 0.85, note)
    for mode, rows in s["modes"].items():
        for split in ("ep", "tp"):
            if split in rows:
                r = rows[split]
                add(f"{mode} {split} peak <= staged + 1.5 x largest layer", r["peak"] <= B + 1.5 * L,
                    f"{r['peak'] / gib:.2f} GiB <= {(B + 1.5 * L) / gib:.2f} GiB"
                    + (f" (upstream peak {rows['upstream']['peak'] / gib:.2f} GiB)" if "upstream" in rows else ""))
                add(f"{mode} {split} page cache left <= 5%", r["cache_left"] <= 0.05, f"{100 * r['cache_left']:.1f}%")
        if "stream" in rows:
            r = rows["stream"]
            add(f"{mode} stream peak <= engine copy + 2.5 layers", r["peak"] <= B + 2.5 * L,
                f"{r['peak'] / gib:.2f} GiB <= {(B + 2.5 * L) / gib:.2f} GiB (engine copy {B / gib:.2f} GiB)")
            if "upstream" in rows:
                up = rows["upstream"]["seconds"]
                add(f"{mode} stream time <= upstream", r["seconds"] <= up, f"{r['seconds']:.2f} s vs {up:.2f} s")
    if "upstream" in cold:
        for split in ("ep", "tp"):
            if split in cold:
                v = cold[split]["vs_upstream"]
                add(f"cold {split} staging >= 2 x upstream cold throughput", v >= 2,
                    f"{v:.2f} x ({cold[split]['gbps']:.2f} vs {cold['upstream']['gbps']:.2f} GB/s)")
    _scale_targets(s, add)
    _peer_targets(s, add, B, L)
    if "overhead" in s:
        o = s["overhead"]
        add("plan + spawn overhead (58 x 256 experts, 8 nodes) <= 2 s", o["total_s"] <= 2, f"{o['total_s']:.2f} s")
    return out


def print_report(s: dict) -> None:
    """The summary as tables on stdout: every case (with its read amplification and, for the peers,
    its time over ktnuma ep/tp), the scaling table, the targets, errors."""
    f = lambda v, d=2: f"{v:.{d}f}" if v is not None else "-"  # noqa: E731
    print(f"model {s['model']}: {s['format']}, {s['bytes'] / GIB:.2f} GiB of experts, largest layer "
          f"{s['largest_layer'] / GIB:.3f} GiB, {s['nodes']} nodes, median of {s['repeat']}"
          + ("" if s.get("warm_memory", True) else ", free memory not warmed before each case"))
    print(f"{'mode':5} {'case':16} {'seconds':>8} {'GB/s':>6} {'peak GiB':>9} {'(anon':>6} {'shm':>5} "
          f"{'model)':>6} {'cache left':>10} {'x raw':>6} {'x upstream':>10} {'read x':>7} {'/ep':>5} {'/tp':>5}")
    for mode, rows in s["modes"].items():
        ep, tp = rows.get("ep", {}).get("seconds"), rows.get("tp", {}).get("seconds")
        for c, r in rows.items():
            if "@" in c:
                continue
            peer = c in ("safetensors", "fastsafetensors", "runai")
            print(f"{mode:5} {c:16} {r['seconds']:8.2f} {r['gbps']:6.2f} {r['peak'] / GIB:9.2f} "
                  f"{r['peak_anon'] / GIB:6.2f} {r['peak_shm'] / GIB:5.2f} {r['peak_model_files'] / GIB:6.2f} "
                  f"{100 * r['cache_left']:9.1f}% {f(r['vs_raw']):>6} {f(r['vs_upstream']):>10} "
                  f"{f(r.get('read_ratio'), 3):>7} {f(r['seconds'] / ep if peer and ep else None):>5} "
                  f"{f(r['seconds'] / tp if peer and tp else None):>5}")
    scale = [(m, c, r) for m, rows in s["modes"].items() for c, r in rows.items() if "@" in c]
    if scale:
        print("scaling (simulated nodes):")
        print(f"{'mode':5} {'split':5} {'io':8} {'nodes':>5} {'seconds':>8} {'GB/s':>6} {'peak GiB':>9} "
              f"{'read x':>7} {'tp/ep':>6}  (tp/ep: median of the rounds' ratios)")
        for m, c, r in scale:
            split, _, n = c.partition("@")
            other = s["modes"][m].get(split.replace("tp", "ep", 1) + "@" + n) if split.startswith("tp") else None
            print(f"{m:5} {split[:2]:5} {'direct' if 'direct' in split else 'buffered':8} {n:>5} "
                  f"{r['seconds']:8.2f} {r['gbps']:6.2f} {r['peak'] / GIB:9.2f} {f(r.get('read_ratio'), 3):>7} "
                  f"{f(paired(r, other)[0] if other else None):>6}")
    print("targets:")
    for t in s["targets"]:
        print(f"  {'ok  ' if t['ok'] else 'MISS'} {t['target']}: {t['measured']}")
    if "overhead" in s:
        o = s["overhead"]
        print(f"DeepSeek-V3-sized plan (58x256, 8 nodes): spawn 8 workers {o['spawn_s']:.2f} s + plan (while they "
              f"start) {o['plan_s']:.2f} s + rest of ready wait {o['ready_wait_s']:.2f} s + read ops and "
              f"{o['segments']} jobs' lines ({o['job_bytes'] / 1e6:.1f} MB) {o['encode_jobs_s']:.2f} s = "
              f"{o['total_s']:.2f} s (target <= 2 s)")
    for c, e in s["errors"].items():
        print(f"error {c}: {e}")
