"""The bench's cases as one table: case name -> the command its timed child process runs.

Staging cases are named ``SPLIT[-direct][@N]``: `launch --detach --json` with that split, ``--io
direct`` if asked, over N simulated nodes (default: the bench's --nodes); their read amplification
(``read_bytes / staged_bytes``) comes from launch's JSON summary. Another module may add cases: any
``ktnuma/tools/bench_*.py`` that defines ``BENCH_CASES = {name: fn(bench) -> argv}``.
"""
from __future__ import annotations

import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
from collections.abc import Callable

from ktnuma.tools.bench.measure import cached_fraction, set_cache, timed, warm_free_memory
from ktnuma.tools.bench.models import expert_ranges

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
RAW_BOUND = os.path.join(_ROOT, "scripts", "raw_bound.py")
STAGING = re.compile(r"^(ep|tp)(-direct)?(?:@(\d+))?$")


class Bench:
    def __init__(self, model: str, nodes: int, work: str, warm_memory: bool = True) -> None:
        self.model, self.nodes, self.work, self.warm_memory = model, nodes, work, warm_memory
        self.files, self.ranges, self.largest, self.names = expert_ranges(model)
        self.bytes = sum(r[2] for r in self.ranges)
        self.spec = os.path.join(work, "spec.json")
        with open(self.spec, "w") as f:
            json.dump({"files": self.files, "ranges": self.ranges}, f)
        self.peer_spec = os.path.join(work, "peers.json")
        with open(self.peer_spec, "w") as f:
            json.dump(self.names, f)
        self.py = sys.executable
        prefix = os.urandom(3).hex()  # our children's run ids: count only their segments
        self.env = dict(os.environ, KTNUMA_RUN_ID_PREFIX=prefix)
        self.shm_prefixes = (f"ktnuma.{prefix}", "ktnuma.raw.{pid}.")

    def launch(self, split: str, io: str = "buffered", nodes: int | None = None) -> list[str]:
        return [self.py, "-m", "ktnuma.launch", self.model, "--nodes", str(nodes or self.nodes), "--split", split,
                "--io", io, "--detach", "--quiet", "--json",
                "--manifest", os.path.join(self.work, f"m-{split}.json")]

    def child(self, *args: str) -> list[str]:
        return [self.py, "-m", "ktnuma.bench", "--child", *args]

    def release(self, manifest: str) -> None:
        subprocess.run([self.py, "-m", "ktnuma.release", manifest], capture_output=True, check=False,
                       env=self.env)

    def command(self, case: str, warm: bool) -> tuple[list[str], str | None]:
        """(argv, manifest to release afterwards) of a case."""
        m = STAGING.match(case)
        if m:
            cmd = self.launch(m[1], "direct" if m[2] else "buffered", int(m[3]) if m[3] else None)
            return cmd, cmd[-1]
        if case == "attach":
            cmd = self.launch("tp")
            subprocess.run(cmd, check=True, capture_output=True, env=self.env)
            set_cache(self.files, warm)
            return self.child("attach", cmd[-1]), cmd[-1]
        return table()[case](self), None

    def run(self, case: str, warm: bool) -> dict:
        set_cache(self.files, warm)
        manifest = None
        try:
            cmd, manifest = self.command(case, warm)
            if self.warm_memory:  # last, right before the clock starts (measure.warm_free_memory)
                warm_free_memory(self.bytes + 2 * self.largest)
            secs, peak, out, parts = timed(cmd, self.env, self.files, self.shm_prefixes)
        finally:
            if manifest:
                self.release(manifest)
        left = cached_fraction(self.files, self.ranges)
        row = {"seconds": secs, "gbps": self.bytes / secs / 1e9, "peak": peak, "cache_left": left,
               "peak_anon": parts["anon"], "peak_shm": parts["shm"], "peak_model_files": parts["model_files"],
               "max_shm": parts["max_shm"], "sampler_cpu": parts["sampler_cpu"]}
        if STAGING.match(case):
            s = json.loads(out.strip().splitlines()[0])
            row["read_ratio"] = s["read_bytes"] / s["bytes"] if s["bytes"] else 0.0
        return row


# case -> argv of its child, for the cases that are not staging ones
CASES: dict[str, Callable[[Bench], list[str]]] = {
    "raw": lambda b: [b.py, RAW_BOUND, "--procs", str(b.nodes), b.spec],
    "rawsf": lambda b: [b.py, RAW_BOUND, "--procs", str(b.nodes), b.spec, "--sendfile"],
    "upstream": lambda b: b.child("upstream", b.model),
    "stream": lambda b: b.child("stream", b.model, str(b.nodes), "tp"),
    "safetensors": lambda b: b.child("peer", "safetensors", b.peer_spec),
    "fastsafetensors": lambda b: b.child("peer", "fastsafetensors", b.peer_spec),
    "runai": lambda b: b.child("peer", "runai", b.peer_spec),
}
PEER_CASES = ("safetensors", "fastsafetensors", "runai")


def table() -> dict[str, Callable[[Bench], list[str]]]:
    """CASES plus the cases of every ktnuma/tools/bench_*.py module (BENCH_CASES)."""
    import ktnuma.tools as tools

    out = dict(CASES)
    for mod in pkgutil.iter_modules(tools.__path__):
        if mod.name.startswith("bench_"):
            out.update(getattr(importlib.import_module(f"ktnuma.tools.{mod.name}"), "BENCH_CASES", {}))
    return out


def known(case: str) -> bool:
    return bool(STAGING.match(case)) or case == "attach" or case in table()
