"""The worker's I/O: source files opened once (buffered and O_DIRECT), per-thread bounce buffers,
full reads/writes in IO_STEP pieces (each one counted, so slow-but-moving I/O shows progress),
sendfile copies. Standard library only."""
from __future__ import annotations

import mmap
import os
import threading
from collections.abc import Callable

from ktnuma.errors import SourceTruncated
from ktnuma.host import numa
from ktnuma.stage.protocol import IO_STEP

ALIGN = 4096  # O_DIRECT: file offset, length and buffer address multiple of this
MADV_POPULATE_READ = 22  # Linux 5.14+: map the segment's pages without touching them one by one
FAULT_AROUND = 64 << 10  # Linux's default fault_around_bytes: one read fault maps the cached pages around it


def _short(path: str, at: int, left: int) -> SourceTruncated:
    return SourceTruncated(f"{path}: unexpected end of file at byte {at} ({left} bytes still expected); "
                      "was the file changed?")


def write_full(fd: int, src: memoryview, offset: int) -> None:
    while len(src):
        n = os.pwritev(fd, [src], offset)
        src = src[n:]
        offset += n


def populate(mm: mmap.mmap, page: int, start: int = 0, length: int | None = None) -> None:
    """Map the (already placed) pages of ``mm`` (or of its ``[start, start+length)``) so move_pages
    can see them; best effort."""
    length = len(mm) - start if length is None else length
    try:
        mm.madvise(MADV_POPULATE_READ, start, length)
    except OSError:  # older kernel: fault them in, one read per page
        for i in range(start, start + length, page):
            mm[i]


def prove(mm: mmap.mmap, addr: int, size: int) -> dict[str, int]:
    """Where the pages of a staged segment's mapping ``mm`` (at ``addr``) are: numa.placement of
    every page after mapping them. Mapped the cheap way: the mapping marked MADV_RANDOM (so its
    unmap does not mark every page accessed, a page-cache LRU move each), then one read per
    FAULT_AROUND bytes (a read fault maps the written pages around it in one go, without the
    mark-accessed MADV_POPULATE_READ does per page); move_pages then finds the pages those
    did not map (never written, e.g. padding; or a smaller fault-around), maps them one by one
    and asks again, so every page is asked about, mapped. Per 256 MiB here: 42 ms against 58 ms
    populating first (mapping, move_pages and unmap)."""
    page = numa.PAGE_SIZE
    try:
        mm.madvise(mmap.MADV_RANDOM)
    except (OSError, AttributeError):  # pragma: no cover - advisory
        pass
    for i in range(0, min(size, len(mm)), FAULT_AROUND):
        mm[i]
    return numa.placement(addr, size, fault=lambda at, n: populate(mm, page, at - addr, n))


def direct_ok(path: str) -> bool:
    """Whether ``path`` can be read with O_DIRECT (tmpfs and some overlay filesystems refuse)."""
    if not hasattr(os, "O_DIRECT"):
        return False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:
        return False
    buf = mmap.mmap(-1, ALIGN)
    try:
        os.preadv(fd, [buf], 0)
        return True
    except OSError:
        return False
    finally:
        buf.close()
        os.close(fd)


class Sources:
    """The run's source files. ``tick(n)`` is called after every IO_STEP-sized piece of I/O."""

    def __init__(self, files: list[str], direct: bool, tick: Callable[[int], None]) -> None:
        self.files = files
        self.direct = {i for i, f in enumerate(files) if direct_ok(f)} if direct else set()
        self.tick = tick
        self.fds: dict[tuple[int, bool], int] = {}
        self.lock = threading.Lock()
        self.local = threading.local()

    def fd(self, i: int, direct: bool = False) -> int:
        fd = self.fds.get((i, direct))
        if fd is None:
            with self.lock:  # pool threads race here: open each file once
                fd = self.fds.get((i, direct))
                if fd is None:
                    flags = os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECT if direct else 0)
                    fd = self.fds[(i, direct)] = os.open(self.files[i], flags)
        return fd

    def bounce(self, n: int) -> memoryview:
        """This thread's reusable buffer (anonymous mmap: page-aligned, as O_DIRECT needs)."""
        buf = getattr(self.local, "buf", None)
        if buf is None or len(buf) < n:
            buf = self.local.buf = mmap.mmap(-1, max(-(-n // ALIGN) * ALIGN, 1 << 20))
        return memoryview(buf)[:n]

    def read(self, fi: int, off: int, n: int, extra: int = 0) -> tuple[memoryview, memoryview, int]:
        """Bytes ``[off, off+n)`` of file ``fi`` in this thread's bounce buffer, the buffer's ``extra``
        bytes after them (for packing/converting), and the bytes actually read (O_DIRECT files are
        read as the page-aligned superset of the span)."""
        path = self.files[fi]
        direct = fi in self.direct
        a0 = off - off % ALIGN if direct else off
        a1 = -(-(off + n) // ALIGN) * ALIGN if direct else off + n
        room = -(-(a1 - a0) // ALIGN) * ALIGN
        buf = self.bounce(room + extra)
        fd, pos, want = self.fd(fi, direct), a0, off + n  # read until the span's last byte is in
        while pos < want:
            got = os.preadv(fd, [buf[pos - a0:min(a1, pos + IO_STEP) - a0]], pos)
            if got <= 0 or (direct and pos + got < want and got % ALIGN):
                raise _short(path, pos + max(got, 0), want - pos - max(got, 0))
            pos += got
            self.tick(got)
        return buf[off - a0:off - a0 + n], buf[room:room + extra], pos - a0

    def sendfile(self, out: int, fi: int, off: int, dest: int, length: int) -> int:
        """Kernel copy page cache -> segment (no user copy, no zero-fill of the pages); bytes read."""
        src = self.fd(fi)
        os.lseek(out, dest, os.SEEK_SET)
        done = 0
        while done < length:
            n = os.sendfile(out, src, off + done, min(IO_STEP, length - done))
            if n <= 0:
                raise _short(self.files[fi], off + done, length - done)
            done += n
            self.tick(n)
        return done

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
