"""Measuring a child process: wall time, peak memory of its process tree (anonymous RSS + our shared
memory + the model's mapped file pages), and the page cache of the expert ranges (warm/cold)."""
from __future__ import annotations

import ctypes
import os
import subprocess
import threading
import time
from collections.abc import Sequence

PAGE = os.sysconf("SC_PAGE_SIZE")


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for t in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{t}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            pass
    return out


def _anon(pid: int) -> int:
    """RssAnon of one process, bytes (file-backed RSS -- shared libraries -- is not counted)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def _mapped(pid: int, model_files: frozenset[str], shm_prefixes: tuple[str, ...],
            shm_seen: dict[str, int], files_rss: dict[tuple[int, str], int]) -> None:
    """Shared-memory segments (ours, by name prefix) mapped by `pid` -> shm_seen[path] = mapping
    bytes; resident pages of the model's files mapped by `pid` -> files_rss[(pid, path)] (smaps).
    The maps file is read as bytes and only the lines naming /dev/shm or a model file are parsed
    (a python process has hundreds of mappings: decoding and splitting them all was most of a
    sample's cost)."""
    try:
        with open(f"/proc/{pid}/maps", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return
    want_smaps = False
    for needle in (b"/dev/shm/", *{os.path.basename(p).encode() for p in model_files if p}):
        at = data.find(needle)
        while at >= 0:
            lo_line = data.rfind(b"\n", 0, at) + 1
            hi_line = data.find(b"\n", at)
            line = data[lo_line:hi_line if hi_line >= 0 else len(data)].decode(errors="replace")
            at = data.find(needle, hi_line) if hi_line >= 0 else -1
            parts = line.split(maxsplit=5)
            if len(parts) < 6:
                continue
            path = parts[5].removesuffix(" (deleted)")
            if path.startswith("/dev/shm/") and os.path.basename(path).startswith(shm_prefixes):
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                shm_seen[path] = max(shm_seen.get(path, 0), hi - lo)
            elif path in model_files:
                want_smaps = True
    if not want_smaps:
        return
    total: dict[str, int] = {}
    cur = None
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                if line[:1] in "0123456789abcdef" and "-" in line.split(maxsplit=1)[0]:
                    parts = line.split(maxsplit=5)
                    cur = parts[5].strip() if len(parts) == 6 and parts[5].strip() in model_files else None
                elif cur is not None and line.startswith("Rss:"):
                    total[cur] = total.get(cur, 0) + int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return
    for path, v in total.items():
        files_rss[(pid, path)] = v


class Sampler(threading.Thread):
    """Peak memory of a process tree, every `interval` seconds, as the issue defines it: anonymous
    RSS of all its processes + the shared memory it created or maps (segments named with one of
    `shm_prefixes`, by /dev/shm blocks or mapping size) + the model's file pages it keeps mapped
    (smaps Rss of mappings of `model_files`). Shared libraries' file pages are not counted.

    A sample reads each process's /proc maps (1.2-2.4 ms of CPU here); at the first version's 5 ms
    interval the sampler took 15-22% of one core of a 2-core machine from the case it measured. At
    INTERVAL it takes about a third of that; its own CPU time is kept in `cpu` (rows: sampler_cpu)."""

    INTERVAL = 0.02

    def __init__(self, pid: int, model_files: Sequence[str] = (), shm_prefixes: Sequence[str] = ("ktnuma.",),
                 interval: float = INTERVAL) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.model_files = frozenset(os.path.realpath(p) for p in model_files) | frozenset(model_files)
        self.prefixes = tuple(shm_prefixes)
        self.peak = 0
        self.parts = {"anon": 0, "shm": 0, "model_files": 0}  # at the peak
        self.max_shm = 0
        self.stop = threading.Event()
        self.cpu = 0.0  # seconds of CPU the sampling thread used
        self.samples = 0

    def run(self) -> None:
        c0 = time.thread_time()
        while not self.stop.is_set():
            self.sample()
            self.samples += 1
            self.stop.wait(self.interval)
        self.cpu = time.thread_time() - c0

    def sample(self) -> None:
        shm_seen: dict[str, int] = {}
        try:
            for e in os.scandir("/dev/shm"):
                if e.name.startswith(self.prefixes):
                    try:
                        shm_seen[e.path] = e.stat().st_blocks * 512
                    except FileNotFoundError:
                        pass
        except FileNotFoundError:
            pass
        anon = 0
        files_rss: dict[tuple[int, str], int] = {}
        for p in _tree(self.pid):
            anon += _anon(p)
            _mapped(p, self.model_files, self.prefixes, shm_seen, files_rss)
        shm_b, files_b = sum(shm_seen.values()), sum(files_rss.values())
        v = anon + shm_b + files_b
        self.max_shm = max(self.max_shm, shm_b)
        if v > self.peak:
            self.peak = v
            self.parts = {"anon": anon, "shm": shm_b, "model_files": files_b}


def timed(cmd: Sequence[str], env: dict | None = None, model_files: Sequence[str] = (),
          shm_prefixes: Sequence[str] = ("ktnuma.",)) -> tuple[float, int, str, dict]:
    """Run cmd; (seconds from start to exit, peak bytes, stdout, peak's parts). Raises on a non-zero exit."""
    t0 = time.perf_counter()
    p = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    s = Sampler(p.pid, model_files, tuple(x.replace("{pid}", str(p.pid)) for x in shm_prefixes))
    s.start()
    out, err = p.communicate()
    dt = time.perf_counter() - t0
    s.stop.set()
    s.join()
    s.sample()  # what it left behind (a detached staging's segments) after its last sample
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd[:4])}... exited {p.returncode}: {err.decode()[-800:]}")
    return dt, s.peak, out.decode(), {**s.parts, "max_shm": s.max_shm, "sampler_cpu": s.cpu}


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]


def cached_fraction(files: Sequence[str], ranges: Sequence[tuple[int, int, int]]) -> float:
    """Fraction of the pages of `ranges` ((file, offset, length)) resident in the page cache."""
    import mmap

    resident = total = 0
    for fi, path in enumerate(files):
        mine = [(o, n) for f, o, n in ranges if f == fi]
        if not mine:
            continue
        size = os.path.getsize(path)
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                raise OSError(ctypes.get_errno(), f"mmap {path}")
            try:
                for o, n in mine:
                    s = o // PAGE * PAGE
                    e = min(size, o + n)
                    pages = -(-(e - s) // PAGE)
                    vec = ctypes.create_string_buffer(pages)
                    if _libc.mincore(addr + s, e - s, vec) != 0:
                        raise OSError(ctypes.get_errno(), f"mincore {path}")
                    resident += sum(b & 1 for b in vec.raw)
                    total += pages
            finally:
                _libc.munmap(addr, size)
        finally:
            os.close(fd)
    return resident / total if total else 0.0


def warm_free_memory(nbytes: int, shm_dir: str = "/dev/shm") -> bool:
    """Write ``nbytes`` into a scratch file of ``shm_dir`` and free it, right before a timed case, so
    that every case starts with free memory its host has backed. On a VM with free page reporting
    (virtio-balloon), memory free for more than ~2 s is handed back to the host, and the next first
    touch of each page costs a host fault: a case would run up to 2x slower or faster depending on
    what ran before it (a release just before, or a page cache it dropped). Bare metal has no such
    state. False (and nothing left behind) when the space is not there."""
    path = os.path.join(shm_dir, f"ktnuma-bench-warm.{os.getpid()}")  # not a "ktnuma." segment name
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:
        return False
    try:
        os.unlink(path)  # the open fd keeps it until close: nothing can be left behind
        os.ftruncate(fd, nbytes)
        os.posix_fallocate(fd, 0, nbytes)
        step = 8 << 20
        zeros = memoryview(bytes(step))  # sliced without a copy
        for off in range(0, nbytes, step):
            os.pwrite(fd, zeros[:min(step, nbytes - off)], off)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def set_cache(files: Sequence[str], warm: bool) -> None:
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            if warm:
                buf = bytearray(16 << 20)
                off = 0
                while n := os.preadv(fd, [buf], off):
                    off += n
            else:
                os.fsync(fd) if os.access(path, os.W_OK) else None
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ------------------------------------------------------------------ model
