"""--io direct: O_DIRECT reads of aligned supersets into an aligned bounce buffer, byte-exact.

The models live on a real disk (/var/tmp, checked to accept O_DIRECT; the test skips otherwise),
are staged by real workers with io="direct" and verified by test_staging.py's separate verifier
process (every piece compared byte for byte with its numpy reference). The source is evicted
first and the run keeps the page cache (drop_cache=False): O_DIRECT must leave the expert ranges
uncached, which a buffered run does not. A tmpfs source falls back to buffered reads with one
warning (where tmpfs refuses O_DIRECT: Linux < 6.6).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from conftest import run_module
from test_staging import TOPOS, resident_fraction, verify_in_subprocess

DISK = "/var/tmp"


@pytest.fixture(scope="module")
def disk_models():
    from ktnuma.stage.worker import direct_ok

    root = tempfile.mkdtemp(prefix="ktnuma-iodirect.", dir=DISK)
    probe = os.path.join(root, "probe")
    with open(probe, "wb") as f:
        f.write(b"\0" * 8192)
    if not direct_ok(probe):
        shutil.rmtree(root)
        pytest.skip(f"{DISK} does not accept O_DIRECT")
    cache: dict = {}

    def make(fmt: str, **kw):
        from ktnuma.tools.synth import write_model

        key = (fmt, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = write_model(os.path.join(root, f"m{len(cache)}"), fmt, **kw)
        return cache[key]

    yield make
    shutil.rmtree(root, ignore_errors=True)


def _evict(paths) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)  # freshly written pages are dirty: DONTNEED skips those
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


CASES = [("bf16", "tp", {}), ("bf16", "ep", {}), ("fp8", "tp", {}), ("gguf:Q4_K", "tp", {"intermediate": 512})]


@pytest.mark.parametrize("fmt,split,kw", CASES, ids=[f"{f}-{s}" for f, s, _ in CASES])
def test_direct_staging_is_byte_exact_and_bypasses_the_page_cache(fmt, split, kw, disk_models, tmp_path):
    from ktnuma.host import shm
    from ktnuma.stage.coordinator import stage
    from ktnuma.index.experts import index_model
    from ktnuma.stage.manifest import build, publish
    from ktnuma.plan.planner import plan as make_plan
    from ktnuma.host.topology import select

    info = disk_models(fmt, **kw)
    topo = select(path=TOPOS[2])
    index = index_model(info.path)
    plan = make_plan(index, topo, split)
    files = [f.path for f in index.files]
    expert = {}
    for g in index.groups:
        for f, o in zip(g.files, g.offsets):
            expert.setdefault(files[f], []).append((o, g.nbytes))
    results = {}
    for io in ("direct", "buffered"):
        _evict(files)
        run_id = shm.new_run_id()
        try:
            res = stage(index, topo, split, run_id=run_id, plan=plan, io=io, drop_cache=False)
            cached = sum(resident_fraction(p, r) for p, r in expert.items()) / len(expert)
            results[io] = cached
            if io == "direct":
                m = build(index, topo, plan, res, run_id=run_id, shm_dir=None)
                out = verify_in_subprocess(publish(m, str(tmp_path / "manifest.json")))
                assert out["pieces"] >= len(info.staged)
        finally:
            shm.unlink_run(run_id)
    # O_DIRECT bypassed the page cache; the buffered run (nothing dropped) filled it
    assert results["direct"] < 0.05 and results["buffered"] > 0.9, results


def test_tmpfs_source_falls_back_with_one_warning(synth_model, tmp_path, run_registry):
    from ktnuma.tools.synth import write_model
    from ktnuma.stage.worker import direct_ok

    src = tempfile.mkdtemp(prefix="iodirect-test.", dir="/dev/shm")  # tmpfs: refuses O_DIRECT before Linux 6.6
    try:
        probe = os.path.join(src, "probe")
        with open(probe, "wb") as f:
            f.write(b"\0" * 8192)
        if direct_ok(probe):
            pytest.skip(f"tmpfs accepts O_DIRECT on this kernel ({os.uname().release}): no fallback to test")
        info = write_model(os.path.join(src, "m"), "bf16", layers=2)
        man = str(tmp_path / "m.json")
        r = run_module("launch", info.path, "--topology", TOPOS[2], "--io", "direct", "--detach",
                       "--manifest", man)
        try:
            assert r.returncode == 0, r.stderr[-2000:]
            assert r.stderr.count("refuse O_DIRECT") == 1, r.stderr
            assert verify_in_subprocess(man)["pieces"] >= len(info.staged)
        finally:
            if os.path.exists(man):
                subprocess.run([sys.executable, "-m", "ktnuma.release", man], capture_output=True)
    finally:
        shutil.rmtree(src, ignore_errors=True)
