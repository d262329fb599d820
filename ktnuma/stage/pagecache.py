"""Dropping the page cache of what a run has read (posix_fadvise DONTNEED on the plan's ranges)."""
from __future__ import annotations

import logging
import os

from ktnuma.plan.records import DropRange

log = logging.getLogger(__name__)

FOLIO_ALIGN = 2 << 20  # the largest page-cache folio the final drop pass expects (PMD size)


class PageCache:
    """Source files opened once for dropping; `drop(ranges, widen)` advises DONTNEED on each range
    (widened to `widen` boundaries if given)."""

    def __init__(self, files: tuple[str, ...]) -> None:
        self.files = files
        self.fds: dict[int, int] = {}

    def drop(self, ranges: tuple[DropRange, ...], widen: int = 0) -> None:
        for r in ranges:
            start, length = r.start, r.length
            if widen:
                start = r.start - r.start % widen
                length = -(-(r.start + r.length) // widen) * widen - start
            fd = self.fds.get(r.file)
            if fd is None:
                try:
                    fd = self.fds[r.file] = os.open(self.files[r.file], os.O_RDONLY | os.O_CLOEXEC)
                except OSError as exc:
                    log.warning("cannot open %s to drop its page cache: %s", self.files[r.file], exc)
                    continue
            try:
                os.posix_fadvise(fd, start, length, os.POSIX_FADV_DONTNEED)
            except OSError as exc:  # pragma: no cover - advisory
                log.debug("posix_fadvise(%s): %s", self.files[r.file], exc)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
