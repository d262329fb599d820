"""Bounded JSON: every JSON ktnuma reads from disk (safetensors headers, config.json, index files,
manifests, registry entries) goes through :func:`loads`.

Limits: nesting depth (:data:`MAX_DEPTH`), integer length (:data:`MAX_INT_DIGITS` digits; Python's
own limit is 4300 and costs quadratic time below it), no duplicate object keys (the safetensors
library refuses them too: which of two entries would count is a guess), no NaN/Infinity. A
violation is :class:`JSONLimit` (a ValueError) whose message says which limit; callers wrap it in
their own named error with the file name.
"""
from __future__ import annotations

import json
from typing import Any

from ktnuma.errors import JSONLimit

MAX_DEPTH = 64
MAX_INT_DIGITS = 20  # 2**64 has 20 digits


def _int(text: str) -> int:
    digits = len(text) - (text[0] == "-")
    if digits > MAX_INT_DIGITS:
        raise JSONLimit(f"an integer of {digits} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise JSONLimit(f"duplicate key {k[:80]!r}")
            seen.add(k)
    return out


def _constant(name: str) -> Any:
    raise JSONLimit(f"{name} is not a JSON number")


def depth(obj: Any) -> int:
    """Nesting depth of a parsed JSON value (scalars 0), without recursion."""
    best = 0
    stack = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, dict):
            o = o.values()
        elif not isinstance(o, list):
            continue
        best = max(best, d)
        stack.extend((v, d + 1) for v in o if isinstance(v, (dict, list)))
    return best


def loads(data: bytes | str, *, max_depth: int = MAX_DEPTH) -> Any:
    """json.loads with the limits of the module doc; JSONLimit on any violation or bad JSON."""
    try:
        obj = json.loads(data, parse_int=_int, object_pairs_hook=_pairs, parse_constant=_constant)
    except RecursionError:
        raise JSONLimit(f"nested deeper than {max_depth} levels") from None
    except JSONLimit:
        raise
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, bad UTF-8
        raise JSONLimit(f"not valid JSON ({exc})") from None
    if depth(obj) > max_depth:
        raise JSONLimit(f"nested deeper than {max_depth} levels")
    return obj


def read(path: str, *, limit: int, max_depth: int = MAX_DEPTH) -> Any:
    """Read and parse a regular file of at most ``limit`` bytes (a FIFO or device is refused without
    blocking). OSError for the environment, JSONLimit for the content."""
    import errno
    import os
    import stat

    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise JSONLimit("not a regular file")
        if st.st_size > limit:
            raise JSONLimit(f"{st.st_size} bytes, more than the {limit}-byte limit")
        chunks = []
        left = limit + 1
        while left > 0:
            b = os.read(fd, min(left, 1 << 20))
            if not b:
                break
            chunks.append(b)
            left -= len(b)
        data = b"".join(chunks)
        if len(data) > limit:
            raise JSONLimit(f"more than the {limit}-byte limit")
    except OSError as exc:
        if exc.errno == errno.EISDIR:
            raise JSONLimit("is a directory") from None
        raise
    finally:
        os.close(fd)
    return loads(data, max_depth=max_depth)
