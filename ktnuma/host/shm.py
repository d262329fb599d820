"""Segments: POSIX shared memory (default) or files under a tmpfs directory (`--shm-dir`).

One segment per (layer, node), named ``ktnuma.<run_id>.L<layer>.n<node>`` (no slash; ``shm_open``
gets ``/`` + name). Always created exclusively (``O_CREX`` / ``O_CREAT|O_EXCL``) with mode 0600:
``posix_ipc.SharedMemory`` with ``O_CREAT`` alone silently resizes an existing segment. Never
``multiprocessing.shared_memory`` (it unlinks segments when an attaching process exits).

Creation returns a file descriptor of size 0: the caller maps it, mbinds the mapping, and only
then ``posix_fallocate``s it (the order that places pages on the bound node).
Imports nothing heavy: the worker uses this module.
"""
from __future__ import annotations

import errno
import logging
import mmap
import os
import re
import stat

from ktnuma.errors import NotASegment

log = logging.getLogger(__name__)

PREFIX = "ktnuma."
DEFAULT_SHM_DIR = "/dev/shm"
MODE = 0o600
NAME_RE = re.compile(r"^ktnuma\.([0-9a-f]{16,48})\.L(0|[1-9][0-9]{0,4})\.n(0|[1-9][0-9]{0,3})$")
RUN_ID_RE = re.compile(r"^[0-9a-f]{16,48}$")  # the generated form: optional hex prefix + 16 hex digits
MAX_LAYER = 99_999  # layer numbers that fit a segment name (NAME_RE); the index refuses larger ones
MAX_NODE = 9999
TMPFS_MAGIC = 0x01021994


RUN_ID_PREFIX_ENV = "KTNUMA_RUN_ID_PREFIX"  # tests: hex prefix that tags one test session's runs


def session_prefix() -> str:
    """The hex run-id prefix from the environment that test sessions use to recognise their own
    segments ("" when unset or not lower-case hex)."""
    prefix = os.environ.get(RUN_ID_PREFIX_ENV, "")
    return prefix if all(c in "0123456789abcdef" for c in prefix) else ""


def new_run_id() -> str:
    """An unguessable run id: 16 random hex digits after :func:`session_prefix`."""
    return session_prefix() + os.urandom(8).hex()  # what secrets.token_hex does, without importing secrets


def valid_run_id(run_id: object) -> bool:
    return isinstance(run_id, str) and RUN_ID_RE.fullmatch(run_id) is not None


def segment_name(run_id: str, layer: int, node: int) -> str:
    if not valid_run_id(run_id) or not 0 <= layer <= MAX_LAYER or not 0 <= node <= MAX_NODE:
        raise ValueError(f"no segment name for run {run_id!r} layer {layer} node {node}")
    return f"{PREFIX}{run_id}.L{layer}.n{node}"


def parse_name(name: str) -> tuple[str, int, int] | None:
    """``ktnuma.<run_id>.L<layer>.n<node>`` -> (run_id, layer, node); None for other names."""
    m = NAME_RE.match(name)
    return (m.group(1), int(m.group(2)), int(m.group(3))) if m else None


def run_prefix(run_id: str) -> str:
    return f"{PREFIX}{run_id}."


def is_posix(shm_dir: str | None) -> bool:
    """True when segments go through shm_open (the default /dev/shm)."""
    return shm_dir is None or os.path.realpath(shm_dir) == os.path.realpath(DEFAULT_SHM_DIR)


def norm_dir(shm_dir: str | None) -> str:
    return DEFAULT_SHM_DIR if shm_dir is None else os.path.abspath(shm_dir)


def resolve_dir(shm_dir: str | os.PathLike[str] | None) -> str | None:
    """The one normalisation of a shm dir: None for POSIX shm (/dev/shm), else an absolute path.
    Every module passes the result on (never the raw user value)."""
    if shm_dir is None:
        return None
    d = os.fspath(shm_dir)
    if "\0" in d or not d:
        raise ValueError(f"bad shm dir {d!r}")
    return None if is_posix(d) else os.path.abspath(d)


def is_tmpfs(path: str) -> bool:
    """The directory is on a tmpfs (statfs f_type), i.e. its files are memory, not disk."""
    import ctypes

    class _StatFS(ctypes.Structure):
        _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_long * 15)]

    libc = ctypes.CDLL(None, use_errno=True)
    buf = _StatFS()
    if libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), path)
    return (buf.f_type & 0xFFFFFFFF) == TMPFS_MAGIC


def segment_path(name: str, shm_dir: str | None = None) -> str:
    """Filesystem path of a segment (for /dev/shm: where Linux keeps POSIX shm objects)."""
    _check_name(name)
    return os.path.join(norm_dir(shm_dir), name)


def _check_name(name: str) -> None:
    if "/" in name or not name.startswith(PREFIX) or name in (".", ".."):
        raise ValueError(f"bad segment name {name!r}")


def create(name: str, shm_dir: str | None = None) -> int:
    """Create segment ``name`` exclusively (mode 0600, size 0); return an O_RDWR fd.

    Raises FileExistsError if it exists (never resizes someone else's segment).
    """
    _check_name(name)
    if is_posix(shm_dir):
        import posix_ipc

        try:
            shm = posix_ipc.SharedMemory("/" + name, flags=posix_ipc.O_CREX, mode=MODE, size=0)
        except posix_ipc.ExistentialError as exc:
            raise FileExistsError(errno.EEXIST, f"segment exists: {name}") from exc
        except posix_ipc.PermissionsError as exc:
            raise PermissionError(errno.EACCES, f"no permission to create segment {name}") from exc
        fd = os.dup(shm.fd)
        shm.close_fd()
        return fd
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.open(os.path.join(norm_dir(shm_dir), name), flags, MODE)


def open_segment(name: str, shm_dir: str | None = None, *, write: bool = False) -> int:
    """Open an existing segment; returns an fd (O_RDONLY unless write).

    Opened by path (on Linux ``shm_open`` is an open() under /dev/shm) with O_NOFOLLOW and
    O_NONBLOCK, and refused unless it is a regular file: a FIFO or device planted at the name
    never blocks or feeds the caller (OSError ENXIO-like: ``NotASegment``)."""
    _check_name(name)
    flags = (os.O_RDWR if write else os.O_RDONLY) | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    path = os.path.join(norm_dir(shm_dir), name)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, f"no such segment: {name}", path) from None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO):
            raise NotASegment(errno.EINVAL, f"{path} is not a regular file (symlink, FIFO or device)",
                              path) from None
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise PermissionError(errno.EACCES, f"no permission to open segment {name}", path) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise NotASegment(errno.EINVAL, f"{path} is not a regular file (FIFO or device)", path)
    return fd


def unlink(name: str, shm_dir: str | None = None) -> bool:
    """Remove a segment; True if it existed. Never raises for a missing segment."""
    _check_name(name)
    if is_posix(shm_dir):
        import posix_ipc

        try:
            posix_ipc.unlink_shared_memory("/" + name)
            return True
        except posix_ipc.ExistentialError:
            return False
        except posix_ipc.PermissionsError as exc:
            raise PermissionError(errno.EACCES, f"no permission to remove segment {name}") from exc
    try:
        os.unlink(os.path.join(norm_dir(shm_dir), name))
        return True
    except FileNotFoundError:
        return False


def map_fd(fd: int, size: int, *, write: bool = True) -> mmap.mmap:
    """MAP_SHARED mapping of ``size`` bytes of ``fd`` (the file may still be empty)."""
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if write else 0)
    return mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=prot)


def list_segments(shm_dir: str | None = None, *, uid: int | None = None) -> list[str]:
    """Names of ``ktnuma.<run_id>.L<layer>.n<node>`` segments in ``shm_dir`` (default /dev/shm),
    optionally only regular files of one owner."""
    d = norm_dir(shm_dir)
    out = []
    try:
        entries = os.scandir(d)
    except (FileNotFoundError, NotADirectoryError):
        return []
    with entries:
        for e in entries:
            if not e.name.startswith(PREFIX) or NAME_RE.match(e.name) is None:
                continue
            if uid is not None:
                try:
                    st = e.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if st.st_uid != uid or not stat.S_ISREG(st.st_mode):
                    continue
            out.append(e.name)
    return sorted(out)


def run_segments(run_id: str, shm_dir: str | None = None, *, uid: int | None = None) -> list[str]:
    """Every existing segment of run ``run_id`` (optionally only regular files of ``uid``)."""
    p = run_prefix(run_id)
    return [n for n in list_segments(shm_dir, uid=uid) if n.startswith(p)]


def unlink_run(run_id: str, shm_dir: str | None = None) -> list[str]:
    """Unlink every segment of ``run_id``; returns the names removed."""
    removed = [n for n in run_segments(run_id, shm_dir) if unlink(n, shm_dir)]
    if removed:
        log.debug("unlinked %d segment(s) of run %s", len(removed), run_id)
    return removed


def free_bytes(shm_dir: str | None = None) -> int:
    """Free space of the filesystem holding the segments (os.statvfs)."""
    st = os.statvfs(norm_dir(shm_dir))
    return st.f_bavail * st.f_frsize
