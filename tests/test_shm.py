"""Segments: exclusive creation, mode 0600, names, unlink, both backends (POSIX shm and --shm-dir)."""
from __future__ import annotations

import os
import stat

import pytest

from ktnuma.host import shm


@pytest.fixture(params=["posix", "dir"])
def shm_dir(request, tmp_path):
    return None if request.param == "posix" else str(tmp_path)


def test_run_id_and_names():
    ids = {shm.new_run_id() for _ in range(100)}
    tag = os.environ.get("KTNUMA_RUN_ID_PREFIX", "")  # the test session's tag (conftest)
    assert len(ids) == 100 and all(len(i) == 16 + len(tag) and i.startswith(tag) and int(i, 16) >= 0
                                   for i in ids)
    rid = "00ff" * 4
    name = shm.segment_name(rid, 61, 3)
    assert name == f"ktnuma.{rid}.L61.n3" and "/" not in name
    assert shm.parse_name(name) == (rid, 61, 3)
    assert shm.parse_name(f"ktnuma.{rid}.L61") is None
    # only names of the generated form: a short, non-hex or slashed run id, a layer number too long
    for bad in (("00ff", 1, 0), ("../x" + "0" * 16, 1, 0), (rid, 10**12, 0), (rid, -1, 0), (rid, 0, 10**5)):
        with pytest.raises(ValueError):
            shm.segment_name(*bad)
    for bad in (f"ktnuma.{rid}.L01.n0", f"ktnuma.{rid}.L1.n0\0", f"ktnuma.{rid.upper()}.L1.n0", "ktnuma.00ff.L1.n0"):
        assert shm.parse_name(bad) is None
    with pytest.raises(ValueError):
        shm.create("ktnuma.x/../y")


def test_create_exclusive_mode_and_unlink(shm_dir):
    rid = shm.new_run_id()
    name = shm.segment_name(rid, 1, 0)
    fd = shm.create(name, shm_dir)
    try:
        st = os.fstat(fd)
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_size == 0
        os.ftruncate(fd, 8192)
        os.pwrite(fd, b"keep", 0)
        with pytest.raises(FileExistsError):  # O_CREX: never reopen / resize an existing one
            shm.create(name, shm_dir)
        assert os.fstat(fd).st_size == 8192
        assert os.path.exists(shm.segment_path(name, shm_dir))
        assert shm.run_segments(rid, shm_dir) == [name]
        fd2 = shm.open_segment(name, shm_dir)
        mm = shm.map_fd(fd2, 8192, write=False)
        assert mm[:4] == b"keep"
        mm.close()
        os.close(fd2)
    finally:
        os.close(fd)
        assert shm.unlink(name, shm_dir) is True
    assert shm.unlink(name, shm_dir) is False
    assert not os.path.exists(shm.segment_path(name, shm_dir))
    with pytest.raises(FileNotFoundError):
        shm.open_segment(name, shm_dir)


def test_unlink_run_only_touches_that_run(shm_dir):
    a, b = shm.new_run_id(), shm.new_run_id()
    names = [shm.segment_name(a, 0, 0), shm.segment_name(a, 1, 1), shm.segment_name(b, 0, 0)]
    for n in names:
        os.close(shm.create(n, shm_dir))
    try:
        assert sorted(shm.unlink_run(a, shm_dir)) == sorted(names[:2])
        assert shm.run_segments(a, shm_dir) == [] and shm.run_segments(b, shm_dir) == [names[2]]
    finally:
        for n in names:
            shm.unlink(n, shm_dir)


def test_posix_default_dir_is_dev_shm():
    assert shm.is_posix(None) and shm.is_posix("/dev/shm") and shm.is_posix("/dev/shm/")
    assert shm.norm_dir(None) == "/dev/shm"
    assert shm.free_bytes(None) > 0
