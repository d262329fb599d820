"""``python -m ktnuma.release MANIFEST``: unlink a run's segments, delete its manifest and registry entry."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from ktnuma import cli
from ktnuma.errors import ManifestNotTrusted
from ktnuma.stage import registry
from ktnuma.stage.manifest import load, trust
from ktnuma.stage.session import check_shm_dir, remove_run

log = logging.getLogger("ktnuma.release")


def release(manifest_path: str, force: bool = False) -> list[str]:
    """Remove everything of the run published at ``manifest_path``; returns the segments removed.

    The manifest must be the caller's and not group/world-writable (``force`` overrides, with a
    warning) and pass the one validation (manifest_check). What is removed takes its identity from
    the run registry where the run has an entry (its recorded shm dir; the entry must record this
    manifest), else from the validated manifest: names ``ktnuma.<run_id>.L<layer>.n<node>`` of that
    run only, regular files of the caller's uid, inside a tmpfs shm dir."""
    path = os.path.abspath(manifest_path)
    trust(path, force)
    m = load(path)
    run_id = m["run_id"]
    entry = registry.get(run_id)
    if entry is not None:
        if os.path.realpath(entry.manifest) != os.path.realpath(path) and not force:
            raise ManifestNotTrusted(f"{path}: the run registry records run {run_id}'s manifest at "
                                     f"{entry.manifest}, not here; release that one (or force=True)")
        shm_dir = entry.shm_dir
    else:
        shm_dir = m["shm_dir"]
    d = check_shm_dir(shm_dir)
    names = [s["name"] for s in m["segments"]]
    removed = remove_run(run_id, d, names=names, manifest=path).segments
    g = _global_index(path, run_id)
    if g is not None:
        try:
            os.unlink(g)
        except FileNotFoundError:
            pass
    return list(removed)


def _global_index(manifest_path: str, run_id: str) -> str | None:
    """Rank 0 of a multi-host run also wrote `<stem>.global.json`; it goes with rank 0's manifest."""
    from ktnuma.index import bounded
    from ktnuma.stage.distributed import global_path

    path = global_path(manifest_path)
    try:
        g = bounded.read(path, limit=64 << 20)
    except (OSError, ValueError):
        return None
    ranks = g.get("ranks") if isinstance(g, dict) else None
    if isinstance(ranks, list) and ranks and isinstance(ranks[0], dict) and ranks[0].get("run_id") == run_id:
        return path
    return None


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m ktnuma.release",
        description="Unlink a staged run's shared-memory segments and delete its manifest and "
                    "registry entry (for runs started with `launch --detach`).",
        epilog="exit codes: 0 ok, 2 not a readable or valid ktnuma manifest, or not trusted (owned by "
               "another user or group/world-writable: --force).")
    p.add_argument("manifest", metavar="MANIFEST", help="the manifest path printed by `launch` (ready ...)")
    p.add_argument("--force", action="store_true",
                   help="release a manifest owned by another user or writable by group/others "
                        "(still only that run's segments of your uid)")
    p.add_argument("--quiet", action="store_true", help="print nothing on success")
    args = p.parse_args(argv)
    cli.setup_logging("release", quiet=args.quiet)
    removed = release(args.manifest, force=args.force)
    if not args.quiet:
        print(f"ktnuma release: removed {len(removed)} segment(s) and {os.path.abspath(args.manifest)}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run("release", main))
