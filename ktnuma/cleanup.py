"""``python -m ktnuma.cleanup [--dry-run]``: remove what dead runs left behind.

Removes (1) the segments, manifest and registry entry of every registered run whose owner died
while staging or holding (a detached entry without its manifest counts as dead), and (2)
``ktnuma.<run_id>.L<layer>.n<node>`` segments of the caller's uid that no registered run owns.
Never a live run, never a detached run with its manifest, never another user's segment.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from ktnuma import cli
from ktnuma.stage import registry
from ktnuma.host import shm

log = logging.getLogger("ktnuma.cleanup")


@dataclass
class Report:
    segments: list[tuple[str, str]] = field(default_factory=list)  # (shm dir, name)
    manifests: list[str] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)  # registry entries removed
    kept: list[str] = field(default_factory=list)  # live / detached runs left alone


def _manifest_of(entry: registry.RunEntry) -> bool:
    """The entry's manifest exists and belongs to that run (never delete someone else's file)."""
    import json

    try:
        with open(entry.manifest) as f:
            return json.load(f).get("run_id") == entry.run_id
    except (OSError, ValueError, AttributeError):
        return False


def cleanup(dry_run: bool = False, scan_dirs: Sequence[str] | None = None) -> Report:
    rep = Report()
    uid = os.getuid()
    owned: set[str] = set()
    for e in registry.entries():
        if registry.is_live(e):
            owned.add(e.run_id)
            rep.kept.append(e.run_id)
            continue
        d = None if shm.is_posix(e.shm_dir) else e.shm_dir
        for name in shm.run_segments(e.run_id, d):
            rep.segments.append((shm.norm_dir(d), name))
            if not dry_run:
                shm.unlink(name, d)
        if _manifest_of(e):
            rep.manifests.append(e.manifest)
            if not dry_run:
                os.unlink(e.manifest)
        rep.runs.append(e.run_id)
        if not dry_run:
            registry.remove(e.run_id)
    for d in scan_dirs or [shm.DEFAULT_SHM_DIR]:
        dd = None if shm.is_posix(d) else os.path.abspath(d)
        for name in shm.list_segments(dd, uid=uid):
            parsed = shm.parse_name(name)
            if parsed is None or parsed[0] in owned:
                continue
            if (shm.norm_dir(dd), name) in rep.segments:
                continue
            late = registry.get(parsed[0])  # a run that registered after the entries were read
            if late is not None and registry.is_live(late):
                owned.add(parsed[0])
                rep.kept.append(parsed[0])
                continue
            rep.segments.append((shm.norm_dir(dd), name))
            if not dry_run:
                shm.unlink(name, dd)
    return rep


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ktnuma.cleanup", description=__doc__.splitlines()[0],
                                epilog=__doc__.split("\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
    p.add_argument("--shm-dir", action="append", metavar="DIR",
                   help="directory to scan for unowned segments (default /dev/shm; repeatable)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    cli.setup_logging("cleanup", quiet=args.quiet)
    rep = cleanup(args.dry_run, args.shm_dir)
    verb = "would remove" if args.dry_run else "removed"
    for d, name in rep.segments:
        print(f"{verb} segment {os.path.join(d, name)}")
    for m in rep.manifests:
        print(f"{verb} manifest {m}")
    if not args.quiet:
        print(f"ktnuma cleanup: {verb} {len(rep.segments)} segment(s) of {len(rep.runs)} dead run(s) "
              f"and unowned; left {len(rep.kept)} live or detached run(s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run("cleanup", main))
