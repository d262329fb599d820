"""python -m tests.corpus [--list] [--root DIR] [KEY...]: build the corpus, one line per model."""
from __future__ import annotations

import argparse
import sys
import time
import traceback

from tests.corpus import build, versions


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.corpus")
    ap.add_argument("keys", nargs="*")
    ap.add_argument("--list", action="store_true")
    a = ap.parse_args(argv)
    ents = build.entries()
    if a.list:
        print("\n".join(ents))
        return 0
    print(f"corpus: {versions.cache_root()}  {versions.versions()}", file=sys.stderr)
    t0, bad = time.monotonic(), 0
    for k in a.keys or ents:
        t = time.monotonic()
        try:
            d = build.ensure(k)
            print(f"ok    {k:28s} {time.monotonic() - t:6.1f}s {d}")
        except Exception as e:  # noqa: BLE001 - report every writer failure, go on
            bad += 1
            print(f"FAIL  {k:28s} {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
            traceback.print_exc(limit=-3, file=sys.stderr)
    print(f"{len(a.keys or ents)} models, {bad} failed, {time.monotonic() - t0:.1f}s", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
