"""python -m tests.corpus.table JUNIT.xml: the corpus results table (model class, writer + version,
format, result) from a `pytest tests/test_corpus.py --junitxml=...` run; pending models get the
one-line refusal `ktnuma.inspect` gives them now."""
from __future__ import annotations

import re
import sys
import xml.etree.ElementTree as ET

from tests.corpus import build, findings
from tests.corpus.pending import PENDING, REFUSALS


def results(junit: str) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for tc in ET.parse(junit).getroot().iter("testcase"):
        m = re.match(r"test_(inspect_matches_the_writers_config|stages_byte_exact)\[(.+?)(?:-(tp2|tp4|ep2|ep4))?\]$",
                     tc.get("name", ""))
        if not m:
            continue
        status = "fail" if tc.find("failure") is not None or tc.find("error") is not None else (
            "skip" if tc.find("skipped") is not None else "ok")
        out.setdefault(m.group(2), {})[m.group(3) or "inspect"] = status
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    res = results(argv[0])
    print("| model (class) | writer + version | format | result |\n|---|---|---|---|")
    for key in build.entries():
        d = build.ensure(key)
        rec = build.record(d)
        r = res.get(key, {})
        if key in PENDING:
            target = d / rec["file"] if "file" in rec else d
            verdict = findings.inspect(target).replace(str(d) + "/", "").replace(str(d), key)
            result = f"gap ({PENDING[key]}); inspect today: {verdict}"
        elif key in REFUSALS and r and all(v == "ok" for v in r.values()):
            target = d / rec["file"] if "file" in rec else d
            verdict = findings.inspect(target).replace(str(d) + "/", "").replace(str(d), key)
            result = f"refused as expected (exit 2, tested): {verdict}"
        elif r and all(v == "ok" for v in r.values()) and len(r) == 5:
            result = "inspect ok; stages byte-exact tp2 tp4 ep2 ep4 (+ kt-kernel where it has an engine)"
        else:
            result = "; ".join(f"{k} {v}" for k, v in sorted(r.items())) or "not run"
        print(f"| {key} ({rec.get('class')}) | {rec['writer']} {rec.get('writer_version')} | {rec.get('format')} | {result} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
