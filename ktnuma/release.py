"""``python -m ktnuma.release MANIFEST``: unlink a run's segments, delete its manifest and registry entry."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from ktnuma import cli
from ktnuma.stage import registry
from ktnuma.host import shm
from ktnuma.stage.manifest import load

log = logging.getLogger("ktnuma.release")


def release(manifest_path: str) -> list[str]:
    """Remove everything of the run published at ``manifest_path``; returns the segments removed."""
    m = load(manifest_path)
    run_id, shm_dir = m["run_id"], m.get("shm_dir")
    removed = [s["name"] for s in m["segments"] if shm.unlink(s["name"], shm_dir)]
    removed += shm.unlink_run(run_id, shm_dir)  # anything else of the run (never more than it named)
    for path in (manifest_path, _global_index(manifest_path, run_id)):
        if path is None:
            continue
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    registry.remove(run_id)
    return removed


def _global_index(manifest_path: str, run_id: str) -> str | None:
    """Rank 0 of a multi-host run also wrote `<stem>.global.json`; it goes with rank 0's manifest."""
    import json

    from ktnuma.stage.distributed import global_path

    path = global_path(manifest_path)
    try:
        with open(path, encoding="utf-8") as f:
            g = json.load(f)
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
        epilog="exit codes: 0 ok, 2 not a readable ktnuma manifest.")
    p.add_argument("manifest", metavar="MANIFEST", help="the manifest path printed by `launch` (ready ...)")
    p.add_argument("--quiet", action="store_true", help="print nothing on success")
    args = p.parse_args(argv)
    cli.setup_logging("release", quiet=args.quiet)
    removed = release(args.manifest)
    if not args.quiet:
        print(f"ktnuma release: removed {len(removed)} segment(s) and {os.path.abspath(args.manifest)}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run("release", main))
