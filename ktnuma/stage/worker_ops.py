"""Executing one job's read ops (protocol.unpack_ops) in a small thread pool: the executor executes,
it never plans. A copy (one plain contiguous write of the whole read) goes file -> segment with
sendfile; anything else is read once into the thread's bounce buffer and each write's rows are
packed, converted if asked, and pwritten into its node's segment. Strided rows are packed by
ktnuma._pack (C, built at install; no import cost, no GIL held); without it, a worker's first PY_ROWS
rows are packed in Python and the rest with numpy (lazily imported: ~0.1 s of CPU per worker)."""
from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from ktnuma.host import shm
from ktnuma.stage.protocol import Op
from ktnuma.stage.worker_io import Sources, write_full

native_pack: Callable[..., None] | None = None
if os.environ.get("KTNUMA_NATIVE_PACK", "1") != "0":  # 0: the numpy/Python packers (tests, debugging)
    try:
        from ktnuma._pack import pack as native_pack
    except ImportError:  # built without a C compiler (setup.py: optional), or a source tree never built
        pass

PY_ROWS = 1 << 16  # strided rows a worker packs in Python (~0.3 us each) before it imports numpy
_py_rows = [PY_ROWS]  # what is left of that budget (pool threads race on it: approximate is fine)


class JobOps:
    """The ops of one job over the segments it writes (node -> name); per-thread segment fds."""

    def __init__(self, src: Sources, segments: dict[int, str], shm_dir: str | None,
                 check: Callable[[], None]) -> None:
        self.src = src
        self.segments = segments
        self.shm_dir = shm_dir
        self.check = check
        self.local = threading.local()
        self.lock = threading.Lock()
        self.opened: list[int] = []
        self.read = 0
        self.written: dict[int, int] = dict.fromkeys(segments, 0)

    def seg_fd(self, node: int) -> int:
        """This thread's own fd of node's segment (sendfile writes at the fd's position)."""
        fds = getattr(self.local, "fds", None)
        if fds is None:
            fds = self.local.fds = {}
        fd = fds.get(node)
        if fd is None:
            fd = fds[node] = shm.open_segment(self.segments[node], self.shm_dir, write=True)
            with self.lock:
                self.opened.append(fd)
        return fd

    def _count(self, read: int, node_bytes: list[tuple[int, int]]) -> None:
        with self.lock:
            self.read += read
            for node, n in node_bytes:
                self.written[node] += n

    def one(self, op: Op) -> None:
        self.check()
        fi, off, length, writes = op
        if len(writes) == 1 and fi not in self.src.direct:
            node, dest, s, rows, run, _, _, conv = writes[0]
            if s == 0 and rows == 1 and run == length and conv is None:
                got = self.src.sendfile(self.seg_fd(node), fi, off, dest, length)
                self._count(got, [(node, length)])
                return
        extra = max(w[3] * w[4] + w[6] for w in writes)  # packed rows + converted bytes
        data, room, got = self.src.read(fi, off, length, extra)
        done = []
        for node, dest, s, rows, run, stride, nbytes, conv in writes:
            out = self._pack(data, room, s, rows, run, stride, nbytes, conv)
            write_full(self.seg_fd(node), out, dest)
            done.append((node, len(out)))
        self._count(got, done)

    @staticmethod
    def _pack(data: memoryview, room: memoryview, s: int, rows: int, run: int, stride: int, nbytes: int,
              conv: str | None) -> memoryview:
        if rows == 1 or run == stride:
            packed = data[s:s + rows * run]
        elif native_pack is not None:
            packed = room[:rows * run]
            native_pack(data, s, rows, run, stride, packed)
        elif rows <= _py_rows[0] and "numpy" not in sys.modules:
            _py_rows[0] -= rows
            packed = room[:rows * run]
            o = 0
            for a in range(s, s + rows * stride, stride):
                packed[o:o + run] = data[a:a + run]
                o += run
        else:
            import numpy as np
            from numpy.lib.stride_tricks import as_strided

            packed = room[:rows * run]
            a = as_strided(np.frombuffer(data, np.uint8)[s:], shape=(rows, run), strides=(stride, 1))
            np.copyto(np.frombuffer(packed, np.uint8).reshape(rows, run), a)
            del a
        if conv is None:
            return packed
        from ktnuma.index.dtypes import convert

        converted = room[rows * run:rows * run + nbytes]
        convert(conv, packed, converted, rows)  # a transposing conversion turns the rows into columns
        return converted

    def run(self, ops: list[Op], pool: ThreadPoolExecutor | None, before: Callable[[int], None]) -> None:
        """Every op, `before(i)` ahead of op i (the fault hook); waits for every op even after a
        failure (none may outlive the job's fds), then re-raises the first failure."""
        def step(i_op: tuple[int, Op]) -> None:
            before(i_op[0])
            self.one(i_op[1])

        items = list(enumerate(ops))
        if pool is None or len(items) < 2:
            for it in items:
                step(it)
            return
        futures = [pool.submit(step, it) for it in items]
        first: BaseException | None = None
        for f in futures:
            try:
                f.result()
            except BaseException as exc:  # noqa: BLE001 - the first one is re-raised below
                first = first or exc
        if first is not None:
            raise first

    def close(self) -> None:
        with self.lock:
            fds, self.opened = self.opened, []
        for fd in fds:
            os.close(fd)
