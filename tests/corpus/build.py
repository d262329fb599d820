"""Build (or reuse) the corpus: one directory per model under versions.cache_root(), with corpus.json."""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tests.corpus import hf, versions

log = logging.getLogger(__name__)
RECORD = "corpus.json"


@dataclass(frozen=True)
class Entry:
    key: str                 # directory name, unique
    writer: str
    make: Callable[[Path], dict]   # writes the model into the given dir, returns the record
    needs: tuple[str, ...] = ()    # keys of entries it is derived from


def entries() -> dict[str, Entry]:
    out: dict[str, Entry] = {}
    for spec in hf.moe_model_types():
        if spec.model_type in hf.BROKEN:
            continue
        out[spec.key] = Entry(spec.key, "transformers", lambda d, s=spec: hf.write(s, d))
    from tests.corpus import gguf_conv, llmc
    for e in gguf_conv.entries() + llmc.entries():
        out[e.key] = e
    return out


def ensure(key: str, root: Path | None = None) -> Path:
    """The model dir for key, generated if not cached (atomically: tmp dir, then rename)."""
    root = root or versions.cache_root()
    d = root / key
    if (d / RECORD).is_file():
        return d
    e = entries()[key]
    for dep in e.needs:
        ensure(dep, root)
    tmp = root / f".{key}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.monotonic()
    try:
        rec = e.make(tmp)
        rec = {"key": key, **rec, "seconds": round(time.monotonic() - t0, 2), "versions": versions.versions()}
        (tmp / RECORD).write_text(json.dumps(rec, indent=1, sort_keys=True))
        try:
            tmp.rename(d)
        except OSError:  # another process built it first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return d


def record(d: Path) -> dict:
    return json.loads((d / RECORD).read_text())
