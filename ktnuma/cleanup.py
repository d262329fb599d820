"""``python -m ktnuma.cleanup [--dry-run]``: remove what dead runs left behind.

Removes (1) the segments, manifest and registry entry of every registered run whose owner died
while staging or holding (a detached entry without its manifest counts as dead), and (2)
``ktnuma.<run_id>.L<layer>.n<node>`` segments of the caller's uid that no registered run owns.
Never a live run, never a detached run with its manifest, never another user's segment; only
names of the run's form, regular files of the caller's uid, in the run's recorded shm dir. Also
removes the publish temp file of a dead run and registry temp files whose writer is gone.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from ktnuma import cli
from ktnuma.host import shm
from ktnuma.stage import registry
from ktnuma.stage.session import remove_run

log = logging.getLogger("ktnuma.cleanup")


@dataclass
class Report:
    segments: list[tuple[str, str]] = field(default_factory=list)  # (shm dir, name)
    manifests: list[str] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)  # registry entries removed
    kept: list[str] = field(default_factory=list)  # live / detached runs left alone
    temps: list[str] = field(default_factory=list)  # stale temp files of dead writers


def _stale_temps(dry_run: bool) -> list[str]:
    """Registry temp files (``.<run_id>.json.<pid>.tmp``) whose writer is gone."""
    d = registry.registry_dir()
    out = []
    for name in os.listdir(d):
        parts = name.split(".")
        if len(parts) != 5 or parts[0] or parts[2:] != ["json", parts[3], "tmp"] or not parts[3].isdigit():
            continue
        if registry.owner_alive(registry.RunEntry(parts[1], int(parts[3]), None, "staging", "/", "/")):
            continue
        path = os.path.join(d, name)
        out.append(path)
        if not dry_run:
            try:
                os.unlink(path)
            except OSError as exc:
                log.warning("cannot remove %s: %s", path, exc)
    return out


def _private_scope() -> str:
    """Run-id prefix the unowned pass is limited to. A private registry (``KTNUMA_REGISTRY_DIR``,
    tests only) sees only its own runs, so the live runs of other registries of the same uid would
    look unowned: with one, only segments whose run id carries the session's ``KTNUMA_RUN_ID_PREFIX``
    are candidates. The real registry (one per uid) sees every run: no limit."""
    return shm.session_prefix() if os.environ.get(registry.DIR_ENV) else ""


def cleanup(dry_run: bool = False, scan_dirs: Sequence[str] | None = None) -> Report:
    rep = Report()
    uid = os.getuid()
    owned: set[str] = set()
    for e in registry.entries():
        if registry.is_live(e):
            owned.add(e.run_id)
            rep.kept.append(e.run_id)
            continue
        d = shm.resolve_dir(e.shm_dir)
        gone = remove_run(e.run_id, d, manifest=e.manifest, dry_run=dry_run)
        rep.segments += [(shm.norm_dir(d), name) for name in gone.segments]
        if gone.manifest:
            rep.manifests.append(e.manifest)
        rep.runs.append(e.run_id)
    rep.temps = _stale_temps(dry_run)
    scope = _private_scope()
    for d in scan_dirs or [shm.DEFAULT_SHM_DIR]:
        dd = shm.resolve_dir(d)
        for name in shm.list_segments(dd, uid=uid):
            parsed = shm.parse_name(name)
            if parsed is None or parsed[0] in owned or not parsed[0].startswith(scope):
                continue
            if (shm.norm_dir(dd), name) in rep.segments:
                continue
            late = registry.get(parsed[0])  # a run that registered after the entries were read
            if late is not None and registry.is_live(late):
                owned.add(parsed[0])
                rep.kept.append(parsed[0])
                continue
            gone = remove_run(parsed[0], dd, names=[name], entry=False, dry_run=dry_run).segments
            rep.segments += [(shm.norm_dir(dd), n) for n in gone if (shm.norm_dir(dd), n) not in rep.segments]
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
    for t in rep.temps:
        print(f"{verb} temp file {t}")
    if not args.quiet:
        print(f"ktnuma cleanup: {verb} {len(rep.segments)} segment(s) of {len(rep.runs)} dead run(s) "
              f"and unowned; left {len(rep.kept)} live or detached run(s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run("cleanup", main))
