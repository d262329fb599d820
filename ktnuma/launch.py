"""``python -m ktnuma.launch MODEL``: stage a model's routed experts into node-local shared memory.

Exit codes: 0 ok, 2 bad input or usage, 3 not enough memory/shm, 4 worker failure after retries,
130 interrupted while staging. Light imports: the model readers are imported only when used.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence

from ktnuma import cli
from ktnuma.errors import Interrupted, StdoutClosed
from ktnuma.stage import ranks, session  # registry: after the workers started; distributed: under torchrun only

log = logging.getLogger("ktnuma.launch")

EPILOG = """\
what it does:
  Reads the model's headers, plans one shared-memory segment per (MoE layer, node), starts one
  worker process per node (pinned to the node's CPUs, memory bound to the node) and stages every
  layer's expert slices, then publishes a JSON manifest that engines attach to.

  stdout: with --json one JSON summary line; in every mode `ready <absolute manifest path>` as the
  last line. Progress and the per-node summary table go to stderr (--quiet silences them).
  Foreground (default): hold the segments until SIGINT/SIGTERM/SIGHUP, then remove everything and
  exit 0. --detach: exit 0 at once, leaving segments and manifest for `python -m ktnuma.release`.

exit codes: 0 ok, 2 bad input/usage, 3 not enough memory or shm space, 4 worker failure after
  retries, 130 interrupted while staging (nothing is left behind).

examples:
  python -m ktnuma.launch --nodes 2 --detach model/
  python -m ktnuma.launch --topology configs/topologies/four-node.toml --split ep --json model/
"""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ktnuma.launch", description=__doc__.splitlines()[0],
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="model directory (safetensors or GGUF) or file")
    p.add_argument("--nodes", type=int, metavar="N",
                   help="nodes to stage onto (default: every real NUMA node; more are simulated)")
    p.add_argument("--topology", metavar="PATH", help="topology TOML (configs/topologies/)")
    p.add_argument("--no-simulate", action="store_true",
                   help="refuse (exit 2) instead of simulating nodes this machine lacks")
    p.add_argument("--split", choices=("tp", "ep", "tp-whole"), default="tp",  # == plan.splits.SPLITS (tested)
                   help="tp: a 1/N slice of every expert per node (default); ep: whole experts per node; "
                        "tp-whole: whole experts, each page on the node of the kt part that reads it (kt-kernel "
                        "native methods over several nodes)")
    p.add_argument("--format", metavar="NAME", help="force the format (bf16, fp8, gguf:Q4_K, ...)")
    p.add_argument("--layers", metavar="SPEC", help="checkpoint layer numbers, e.g. 1-3,7")
    p.add_argument("--manifest", metavar="PATH", help="manifest path (default ./ktnuma-<run_id>.json)")
    p.add_argument("--detach", action="store_true", help="exit after `ready`, leaving segments + manifest")
    p.add_argument("--shm-dir", metavar="DIR", help="a tmpfs directory for the segments (default /dev/shm)")
    p.add_argument("--io", choices=("buffered", "direct"), default="buffered",
                   help="source reads: page cache (dropped per layer, default) or O_DIRECT (aligned reads "
                        "around each range; files that refuse O_DIRECT, e.g. on tmpfs, are read buffered)")
    p.add_argument("--verify", action="store_true",
                   help="checksum (crc32) every staged piece from the source and from its segment, "
                        "fail on a difference, record the checksums in the manifest")
    p.add_argument("--retries", type=int, default=2, metavar="N",
                   help="restarts of a dying worker per segment (default 2)")
    p.add_argument("--layers-in-flight", type=int, default=2, metavar="K", help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print a JSON summary line on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress or summary on stderr")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log lines on stderr")
    ranks.add_arguments(p)  # --host-experts, --dist-timeout (under torchrun)
    args = p.parse_args(argv)
    if args.retries < 0:
        p.error(f"--retries must be >= 0, got {args.retries}")
    return args


# ---------------------------------------------------------------- signals

class Signals:
    """While staging a signal raises Interrupted (once); while holding it just sets a flag."""

    NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM", signal.SIGHUP: "SIGHUP"}

    def __init__(self) -> None:
        self.mode = "staging"
        self.got: int | None = None

    def install(self) -> None:
        for s in self.NAMES:
            signal.signal(s, self.handler)

    def handler(self, signum, frame) -> None:  # noqa: ARG002
        first = self.got is None
        self.got = signum
        if self.mode == "staging" and first:
            raise Interrupted(f"interrupted by {self.NAMES.get(signum, signum)} while staging; "
                              "nothing was left behind")

    def ignore(self) -> None:
        self.mode = "cleanup"
        for s in self.NAMES:
            signal.signal(s, signal.SIG_IGN)


# ---------------------------------------------------------------- progress and summary

class Reporter:
    def __init__(self, quiet: bool, topology) -> None:
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.topology = topology
        self.last = 0.0

    def __call__(self, ev) -> None:
        if self.quiet:
            return
        if ev.kind == "retry":
            self._line(f"node {ev.node} layer {ev.layer}: {ev.message}", final=True)
            return
        if ev.kind != "layer" and not self.tty:
            return
        now = time.monotonic()
        if self.tty and ev.kind != "layer" and now - self.last < 0.2:
            return
        self.last = now
        parts = []
        for n in self.topology.nodes:
            b, s = ev.node_bytes.get(n.id, 0), ev.node_seconds.get(n.id, 0.0)
            parts.append(f"n{n.id} {cli.human(b)} {b / s / 1e9 if s else 0:.2f} GB/s")
        frac = ev.bytes_done / ev.bytes_total if ev.bytes_total else 1.0
        eta = ev.elapsed * (1 - frac) / frac if frac > 0 else 0.0
        self._line(f"layers {ev.layers_done}/{ev.layers_total} | " + " | ".join(parts)
                   + f" | {100 * frac:.0f}% ETA {eta:.1f}s", final=not self.tty)

    def _line(self, text: str, final: bool) -> None:
        if self.tty:
            sys.stderr.write("\r\x1b[K" + text + ("\n" if final else ""))
        else:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def end(self) -> None:
        if self.tty and not self.quiet:
            sys.stderr.write("\n")
            sys.stderr.flush()


def summary(result, topology, manifest_path: str, index) -> dict:
    nodes = []
    for ns in result.nodes:
        nodes.append({"node": ns.node, "real_node": ns.real_node, "bytes": ns.bytes,
                      "seconds": round(ns.seconds, 4), "gbps": round(ns.gbps, 3),
                      "pct_on_node": round(ns.pct_on_node, 2)})
    return {"run_id": result.run_id, "manifest": manifest_path, "model": os.path.abspath(index.root),
            "format": index.format, "split": result.plan.split, "layers": list(result.plan.layers),
            "segments": len(result.segments), "bytes": result.bytes,
            "read_bytes": result.read_bytes, "read_ratio": round(result.read_ratio, 4),
            "seconds": round(result.seconds, 4),
            "gbps": round(result.bytes / result.seconds / 1e9, 3) if result.seconds else 0.0,
            "simulated": bool(topology.simulated), "retries": result.retries_used, "nodes": nodes}


def summary_table(s: dict) -> str:
    lines = [f"staged {cli.human(s['bytes'])} in {s['segments']} segments, {len(s['layers'])} layers, "
             f"{s['seconds']:.2f} s ({s['gbps']:.2f} GB/s), read {s['read_ratio']:.3f} x the staged bytes"
             f"{' [simulated topology]' if s['simulated'] else ''}",
             f"{'node':>4} {'real':>4} {'bytes':>12} {'seconds':>8} {'GB/s':>7} {'on node':>8}"]
    for n in s["nodes"]:
        lines.append(f"{n['node']:>4} {n['real_node']:>4} {cli.human(n['bytes']):>12} "
                     f"{n['seconds']:>8.2f} {n['gbps']:>7.2f} {n['pct_on_node']:>7.1f}%")
    return "\n".join(lines)


# ---------------------------------------------------------------- main

def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cli.setup_logging("launch", quiet=args.quiet, verbose=args.verbose)
    sig = Signals()
    sig.install()
    from ktnuma.stage.procs import prespawn  # not the coordinator: its import would delay the workers

    dist = _distributed()
    prepared = session.prepare(args.model, nodes=args.nodes, topology=args.topology,
                               simulate=not args.no_simulate, split=args.split, format=args.format,
                               layers=args.layers, shm_dir=args.shm_dir, manifest=args.manifest,
                               restrict=dist.restrict if dist else None, spawn=prespawn)
    try:
        return _stage(args, sig, prepared)
    finally:
        prepared.stop_workers()  # the ones the run did not adopt (an error before staging)


def _write_ready(lines: Sequence[str]) -> None:
    """stdout's last lines, flushed; StdoutClosed (exit 2) if they cannot be written."""
    try:
        if sys.stdout is None:  # started with fd 1 closed
            raise OSError(9, "stdout is closed")
        for line in lines:
            sys.stdout.write(line + "\n")
        sys.stdout.flush()
    except (OSError, ValueError) as exc:  # EPIPE (reader gone), a closed stdout (ValueError), EBADF
        try:  # what is still buffered must not fail again at exit
            fd = os.open(os.devnull, os.O_WRONLY)
            os.dup2(fd, sys.stdout.fileno())
            os.close(fd)
        except (OSError, ValueError, AttributeError):
            pass
        raise StdoutClosed(f"cannot write `ready` to stdout ({getattr(exc, 'strerror', None) or exc}); "
                           "the run was removed") from None


def _stage(args: argparse.Namespace, sig: Signals, p: session.Prepared) -> int:
    from ktnuma.stage import registry

    if args.io == "direct":
        from ktnuma.stage.worker import direct_ok

        refused = [f for f in p.plan.files if not direct_ok(f)]
        if refused:
            log.warning("--io direct: %d of %d source file(s) refuse O_DIRECT (e.g. %s on tmpfs?); "
                        "reading those through the page cache", len(refused), len(p.plan.files), refused[0])
    detached = False
    protected: frozenset[str] = frozenset()  # pre-existing names this run must never remove
    reporter = Reporter(args.quiet, p.topology)
    try:
        from ktnuma.stage.coordinator import stage
        from ktnuma.stage.manifest import build, publish

        result = stage(p.index, p.topology, args.split, run_id=p.run_id, shm_dir=p.shm_dir, plan=p.plan,
                       layers_in_flight=args.layers_in_flight, retries=args.retries, progress=reporter,
                       io=args.io, workers=p.workers)
        reporter.end()
        m = build(p.index, p.topology, p.plan, result, run_id=p.run_id, shm_dir=p.shm_dir)
        if args.verify:
            from ktnuma.stage.verify import add_to_manifest, verify_run

            add_to_manifest(m, verify_run(p.plan, p.run_id, p.shm_dir, p.topology))
        publish(m, p.manifest)  # never replaces; from here on the finally removes it (it carries our id)
        entry = registry.update(p.entry, state="held")
        dist = _distributed()
        if dist is not None:
            dist.ready(p.manifest, p.run_id)  # under torchrun: every rank ok, or exit non-zero
        # from here on a signal means "release the held run" (foreground) or nothing (detach), never
        # "abort": `ready` may be on its way to the reader
        sig.mode = "holding"
        s = summary(result, p.topology, p.manifest, p.index)
        if not args.quiet:
            print(summary_table(s), file=sys.stderr, flush=True)
        _write_ready(([json.dumps(s)] if args.json else []) + [f"ready {p.manifest}"])
        if args.detach:  # `ready` is out: only now does the run count as detached
            sig.ignore()
            registry.update(entry, state="detached")
            detached = True
            return 0
        while sig.got is None:  # a short sleep, not pause(): no window between the check and the wait
            time.sleep(0.2)
        sig.ignore()
        log.info("%s: removing run %s", Signals.NAMES.get(sig.got, sig.got), p.run_id)
        return 0
    except BaseException as exc:
        protected = getattr(exc, "names", frozenset())
        raise
    finally:
        if sig.mode != "cleanup":
            sig.ignore()
        if not detached:
            p.remove(protected)


def _distributed():
    """The multi-host hooks (ktnuma.stage.distributed: restrict the index to this rank's experts,
    agree on `ready`) once this process imported them, as :func:`entry` does for a torchrun rank;
    None otherwise (the single-host path never imports them: start-up time)."""
    return sys.modules.get("ktnuma.stage.distributed")


def _entry_main():
    if not ranks.in_torchrun():
        return main
    from ktnuma.stage import distributed

    return distributed.wrap(main, parse_args)


def entry(argv: Sequence[str] | None = None) -> int:
    return cli.run("launch", _entry_main(), argv)


def exit_now(rc: int) -> None:
    """Exit with ``rc`` without the interpreter's teardown (finalizing every module and object:
    15-40 ms of a detached launch's wall time that nothing depends on: the run's files are closed
    and fsynced, its workers reaped). The atexit hooks still run (logging's flush, torch's under
    torchrun); a process with other threads alive takes the normal exit (it joins them)."""
    import atexit
    import threading

    if threading.active_count() > 1:
        sys.exit(rc)
    atexit._run_exitfuncs()
    for f in (sys.stdout, sys.stderr):
        try:
            if f is not None:
                f.flush()
        except (OSError, ValueError):
            pass
    os._exit(rc)


if __name__ == "__main__":
    exit_now(entry())
