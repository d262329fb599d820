#!/usr/bin/env python3
"""Start-up A/B: `python -m ktnuma.launch --detach` of two source trees, alternated, on one small model.

    python3 scripts/startup_ab.py --before /work/wt/before [--after .] [-n 5] [--model DIR] [--warm-memory]

Each round runs every (mode, split) case once per tree, A B then B A on the next round (order effects
cancel), each a fresh `python -m ktnuma.launch MODEL --nodes N --split S --detach --quiet --json` with
PYTHONPATH set to that tree, then `ktnuma.release` (untimed). warm: the model's files read into the
page cache first; cold: evicted with posix_fadvise(DONTNEED) first. Per case it prints the median
wall seconds (start to exit) and CPU seconds (user+sys of launch and its reaped workers) of each tree,
and after/before ratios (< 1.0: the after tree is faster), plus read_ratio (launch's JSON), and the
load average before and after the measurement (a shared machine's noise). Default model: the
bench's --quick model (generated into $TMPDIR/ktnuma-bench by this tree if missing).
A development tool (never imported by ktnuma); the helpers it uses are the bench's.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)  # this checkout's bench helpers (the timed runs import each tree's own ktnuma)

from ktnuma.tools.bench.measure import set_cache, warm_free_memory  # noqa: E402


def tree_env(tree: str, work: str, pyc: str) -> dict[str, str]:
    """The environment of a tree's runs. pyc=cached: bytecode cached under a private per-tree
    PYTHONPYCACHEPREFIX (as an installed package has its .pyc files); pyc=none: nothing cached,
    every module compiled from source at every start (PYTHONDONTWRITEBYTECODE=1, and an empty
    PYTHONPYCACHEPREFIX, so a tree's own __pycache__ dirs, e.g. from scripts/install, are not read)."""
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
    if pyc == "cached":
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = os.path.join(work, "pyc", os.path.abspath(tree).strip("/").replace("/", "_"))
    else:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        env["PYTHONPYCACHEPREFIX"] = os.path.join(work, "pyc-none")  # never written: stays empty
    return env


def run_one(env: dict[str, str], model: str, split: str, nodes: int, work: str) -> tuple[float, float, float]:
    """(wall s, cpu s, read_ratio) of one detached launch with `env` (released afterwards, untimed)."""
    tree = env["PYTHONPATH"]
    manifest = os.path.join(work, f"m-{split}.json")
    cmd = [sys.executable, "-m", "ktnuma.launch", model, "--nodes", str(nodes), "--split", split,
           "--detach", "--quiet", "--json", "--manifest", manifest]
    out_path = os.path.join(work, "out")
    with open(out_path, "wb") as out, open(os.path.join(work, "err"), "wb") as errf:
        t0 = time.perf_counter()
        pid = os.posix_spawn(sys.executable, cmd, env, file_actions=[
            (os.POSIX_SPAWN_DUP2, out.fileno(), 1), (os.POSIX_SPAWN_DUP2, errf.fileno(), 2)])
        _, status, ru = os.wait4(pid, 0)
        wall = time.perf_counter() - t0
    subprocess.run([sys.executable, "-m", "ktnuma.release", manifest], env=env, capture_output=True, check=False)
    rc = os.waitstatus_to_exitcode(status)
    if rc:
        with open(os.path.join(work, "err"), "rb") as f:
            raise SystemExit(f"{tree}: launch exited {rc}: {f.read().decode()[-600:]}")
    with open(out_path) as f:
        s = json.loads(f.read().strip().splitlines()[0])
    # wait4's rusage covers the launch process and every descendant it waited for (the workers)
    ratio = s.get("read_ratio", s.get("read_bytes", 0) / s["bytes"] if s.get("bytes") else 0.0)
    return wall, ru.ru_utime + ru.ru_stime, ratio


def default_model() -> str:
    from ktnuma.tools.bench.models import ensure_model

    cache = os.path.join(tempfile.gettempdir(), "ktnuma-bench")
    os.makedirs(cache, exist_ok=True)
    return ensure_model(cache, "bf16", True, None)[0]


def model_files(model: str) -> list[str]:
    if os.path.isfile(model):
        return [model]
    return [os.path.join(model, f) for f in sorted(os.listdir(model))
            if f.endswith((".safetensors", ".gguf"))]


def _ratio(r: float) -> str:
    return f"{r:.3f}" if r else "-"  # a tree whose summary has no read_bytes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("--before", required=True, help="tree A (a checkout holding ktnuma/)")
    p.add_argument("--after", default=HERE, help="tree B (default: this checkout)")
    p.add_argument("-n", "--rounds", type=int, default=5, help="rounds (default 5)")
    p.add_argument("--model", help="model dir or file (default: the bench's --quick model)")
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--modes", default="warm,cold")
    p.add_argument("--splits", default="ep,tp")
    p.add_argument("--pyc", choices=("none", "cached"), default="none",
                   help="none: every start compiles from source (PYTHONDONTWRITEBYTECODE=1, default); "
                        "cached: bytecode cached per tree (warmed up first), as after an install")
    p.add_argument("--json", action="store_true", help="also print the medians as one JSON line")
    p.add_argument("--warm-memory", action="store_true",
                   help="before each timed run write and free as many /dev/shm bytes as the model's files "
                        "hold (the bench's warm-up: a VM with free page reporting otherwise times host faults)")
    a = p.parse_args(argv)
    model = a.model or default_model()
    files = model_files(model)
    model_bytes = sum(os.path.getsize(f) for f in files)
    trees = {"before": a.before, "after": a.after}
    cases = [(m, s) for m in a.modes.split(",") if m for s in a.splits.split(",") if s]
    res: dict[tuple[str, str, str], list[tuple[float, float, float]]] = {}
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="ktnuma-ab.") as work:
        envs = {name: tree_env(t, work, a.pyc) for name, t in trees.items()}
        if a.pyc == "cached":
            for name in trees:  # fill the bytecode caches
                for _, split in cases:
                    run_one(envs[name], model, split, a.nodes, work)
        for r in range(a.rounds):
            order = list(trees) if r % 2 == 0 else list(trees)[::-1]
            for mode, split in cases:
                for name in order:
                    set_cache(files, mode == "warm")
                    if a.warm_memory:
                        warm_free_memory(model_bytes)
                    res.setdefault((name, mode, split), []).append(
                        run_one(envs[name], model, split, a.nodes, work))
    load1 = os.getloadavg()
    print(f"model {model}, {a.nodes} nodes, {a.rounds} rounds alternated, bytecode {a.pyc}; "
          f"before={os.path.abspath(a.before)} after={os.path.abspath(a.after)}")
    print(f"load average before {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}, "
          f"after {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f} ({os.cpu_count()} CPUs)")
    print(f"{'case':<8} {'wall before':>11} {'wall after':>10} {'ratio':>6} {'cpu before':>10} "
          f"{'cpu after':>9} {'ratio':>6} {'read_ratio b/a':>15}")
    table = {}
    for mode, split in cases:
        b = [statistics.median(x[i] for x in res[("before", mode, split)]) for i in range(3)]
        f = [statistics.median(x[i] for x in res[("after", mode, split)]) for i in range(3)]
        table[f"{mode} {split}"] = {"before": b, "after": f, "wall_ratio": f[0] / b[0], "cpu_ratio": f[1] / b[1]}
        print(f"{mode + ' ' + split:<8} {b[0]:>11.3f} {f[0]:>10.3f} {f[0] / b[0]:>6.2f} {b[1]:>10.3f} "
              f"{f[1]:>9.3f} {f[1] / b[1]:>6.2f} {_ratio(b[2]):>7}/{_ratio(f[2])}")
    if a.json:
        print(json.dumps({"load": [load0, load1], "cases": table}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
