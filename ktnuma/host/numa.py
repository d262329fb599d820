"""Raw NUMA calls: memory policy, page placement and CPU pinning.

ctypes bindings to the system-call wrappers in Debian's ``libnuma.so.1`` (``mbind``, ``set_mempolicy``,
``get_mempolicy``, ``move_pages``), loaded with ``use_errno=True`` so that a failing call becomes a
:class:`NumaError` naming the call, the node, the address range and the errno. Not py-libnuma (it
segfaults when asked for a node that does not exist). Imports nothing heavy: workers use this module.

Order that places pages (design, "NUMA facts"): mmap the segment, :func:`mbind` it, then
``posix_fallocate``, then write/read into it. :func:`placement` reads the result back with
``move_pages(nodes=NULL)``.
"""
from __future__ import annotations

import ctypes
import errno as _errno
import logging
import mmap
import os
from array import array
from collections.abc import Callable, Iterable
from functools import lru_cache

from ktnuma.errors import NodeNotFound, NumaError

log = logging.getLogger(__name__)

NODE_ROOT = "/sys/devices/system/node"

# <linux/mempolicy.h>
MPOL_DEFAULT = 0
MPOL_PREFERRED = 1
MPOL_BIND = 2
MPOL_INTERLEAVE = 3
MPOL_LOCAL = 4
MPOL_MODE_FLAGS = (1 << 15) | (1 << 14) | (1 << 13)  # STATIC_NODES, RELATIVE_NODES, NUMA_BALANCING
MPOL_MF_STRICT = 1 << 0
MPOL_MF_MOVE = 1 << 1
MPOL_F_NODE = 1 << 0
MPOL_F_ADDR = 1 << 1
MPOL_NAMES = {MPOL_DEFAULT: "default", MPOL_PREFERRED: "preferred", MPOL_BIND: "bind",
              MPOL_INTERLEAVE: "interleave", MPOL_LOCAL: "local"}
MODES = {"bind": MPOL_BIND, "interleave": MPOL_INTERLEAVE}  # the range policies a plan can ask for

MASK_BITS = 1024  # node ids the masks can carry (the kernel's CONFIG_NODES_SHIFT=10 maximum)
_ULONG_BITS = ctypes.sizeof(ctypes.c_ulong) * 8
_MASK_WORDS = MASK_BITS // _ULONG_BITS
_NodeMask = ctypes.c_ulong * _MASK_WORDS
_MOVE_PAGES_CHUNK = 1 << 18  # pages per move_pages call (bounds the temporary arrays)

PAGE_SIZE = mmap.PAGESIZE


# ---------------------------------------------------------------- libnuma

@lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL("libnuma.so.1", use_errno=True)
    except OSError as exc:
        raise NumaError("dlopen", f"cannot load libnuma.so.1 ({exc}); install Debian's libnuma1") from None
    vp, ul, ci = ctypes.c_void_p, ctypes.c_ulong, ctypes.c_int
    lib.mbind.argtypes = [vp, ul, ci, ctypes.POINTER(ul), ul, ctypes.c_uint]
    lib.mbind.restype = ci
    lib.set_mempolicy.argtypes = [ci, ctypes.POINTER(ul), ul]
    lib.set_mempolicy.restype = ci
    lib.get_mempolicy.argtypes = [ctypes.POINTER(ci), ctypes.POINTER(ul), ul, vp, ul]
    lib.get_mempolicy.restype = ci
    lib.move_pages.argtypes = [ci, ul, ctypes.POINTER(vp), ctypes.POINTER(ci), ctypes.POINTER(ci), ci]
    lib.move_pages.restype = ctypes.c_long
    return lib


def _mask(nodes: Iterable[int]) -> _NodeMask:
    mask = _NodeMask()
    for n in nodes:
        mask[n // _ULONG_BITS] |= 1 << (n % _ULONG_BITS)
    return mask


def _unmask(mask: _NodeMask) -> tuple[int, ...]:
    return tuple(w * _ULONG_BITS + b for w in range(_MASK_WORDS) for b in range(_ULONG_BITS)
                 if mask[w] >> b & 1)


# ---------------------------------------------------------------- sysfs

def parse_cpulist(text: str) -> tuple[int, ...]:
    """Kernel list format ``0-3,8,10-11`` -> sorted ids."""
    out: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return tuple(sorted(out))


def real_nodes() -> tuple[int, ...]:
    """Online NUMA nodes of this machine (``/sys/devices/system/node/online``)."""
    try:
        with open(os.path.join(NODE_ROOT, "online")) as f:
            return parse_cpulist(f.read())
    except FileNotFoundError:  # kernel without CONFIG_NUMA: one node
        return (0,)


def _check_node(node: object, call: str) -> int:
    if isinstance(node, bool) or not isinstance(node, int):
        raise NodeNotFound(call, f"node must be an int, got {node!r}")
    nodes = real_nodes()
    if node not in nodes:
        raise NodeNotFound(call, f"no such NUMA node (this machine has nodes "
                                 f"{', '.join(map(str, nodes))})", node=node)
    return node


def node_cpus(node: int) -> tuple[int, ...]:
    """CPUs of ``node`` this process may run on (sysfs cpulist intersected with its affinity)."""
    _check_node(node, "node_cpus")
    path = os.path.join(NODE_ROOT, f"node{node}", "cpulist")
    try:
        with open(path) as f:
            cpus = parse_cpulist(f.read())
    except FileNotFoundError:
        cpus = tuple(range(os.cpu_count() or 1))
    allowed = os.sched_getaffinity(0)
    return tuple(c for c in cpus if c in allowed)


def _meminfo(path: str) -> dict[str, int]:
    """``Node N Key:  123 kB`` or ``Key: 123 kB`` lines -> {key: bytes}."""
    out: dict[str, int] = {}
    with open(path) as f:
        for line in f:
            key, _, rest = line.partition(":")
            fields = rest.split()
            if not fields:
                continue
            value = int(fields[0]) * (1024 if fields[1:2] == ["kB"] else 1)
            out[key.split()[-1]] = value
    return out


def node_mem_available(node: int) -> int:
    """Bytes that ``node`` can still give without swapping, from ``nodeN/meminfo``.

    Per-node meminfo has no MemAvailable line on most kernels, so this is the kernel's own estimate
    done conservatively: free pages plus half of the reclaimable page cache and slab. On a one-node
    machine the system-wide MemAvailable (if lower) is used, since it is the same memory.
    """
    _check_node(node, "node_mem_available")
    path = os.path.join(NODE_ROOT, f"node{node}", "meminfo")
    try:
        info = _meminfo(path)
    except FileNotFoundError:
        info = {}
    if "MemAvailable" in info:
        avail = info["MemAvailable"]
    elif info:
        cache = info.get("Active(file)", 0) + info.get("Inactive(file)", 0)
        avail = info.get("MemFree", 0) + cache // 2 + info.get("SReclaimable", 0) // 2
    else:
        avail = None
    if len(real_nodes()) == 1 or avail is None:
        system = _meminfo("/proc/meminfo").get("MemAvailable")
        if system is not None:
            avail = system if avail is None else min(avail, system)
    return int(avail or 0)


# ---------------------------------------------------------------- addresses and policy

class _PyBuffer(ctypes.Structure):
    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.py_object), ("len", ctypes.c_ssize_t),
                ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
                ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
                ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p)]


def address_of(buf) -> int:
    """Start address of an ``mmap.mmap``, memoryview, bytearray or numpy array's buffer."""
    try:
        ref = ctypes.c_char.from_buffer(buf)
    except TypeError:  # read-only buffer (e.g. a PROT_READ mapping): ask the buffer protocol
        view = _PyBuffer()
        get, release = ctypes.pythonapi.PyObject_GetBuffer, ctypes.pythonapi.PyBuffer_Release
        get.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
        release.argtypes = [ctypes.POINTER(_PyBuffer)]
        if get(buf, ctypes.byref(view), 0) != 0:
            raise
        try:
            return int(view.buf or 0)
        finally:
            release(ctypes.byref(view))
    try:
        return ctypes.addressof(ref)
    finally:
        del ref  # drop the buffer export at once so the mapping can still be closed


def _raise_errno(call: str, reason: str, **where) -> None:
    err = ctypes.get_errno()
    cls = NumaError
    node = where.get("node")
    if err == _errno.EINVAL and node is not None and node not in real_nodes():
        cls = NodeNotFound
    raise cls(call, reason, err=err, **where)


def mbind(addr: int, length: int, node: int, mode: str = "bind", nodes: Iterable[int] = ()) -> None:
    """Set the policy of the page-aligned range ``[addr, addr+length)`` before first touch: ``mode``
    "bind" (MPOL_BIND to ``node``) or "interleave" (MPOL_INTERLEAVE over ``nodes``, real node ids;
    ``node`` is named in errors). On a shared mapping the policy is the segment's, for every process."""
    want = sorted(set(nodes)) if mode == "interleave" else [node]
    for n in want:
        _check_node(n, "mbind")
    if mode not in MODES or not want:
        raise NumaError("mbind", f"mode {mode!r} over nodes {want}: expected bind, or interleave over "
                        "at least one node", node=node, addr=addr, length=length)
    if addr % PAGE_SIZE:
        raise NumaError("mbind", f"address is not aligned to the {PAGE_SIZE}-byte page",
                        node=node, addr=addr, length=length, err=_errno.EINVAL)
    if length <= 0:
        raise NumaError("mbind", "length must be positive", node=node, addr=addr, length=length)
    if _lib().mbind(addr, length, MODES[mode], _mask(want), MASK_BITS + 1, 0) != 0:
        _raise_errno("mbind", f"{MPOL_NAMES[MODES[mode]]} over nodes {want} failed", node=node, addr=addr,
                     length=length)
    log.debug("mbind 0x%x+%d -> %s %s", addr, length, mode, want)


def policy_at(addr: int) -> tuple[int, tuple[int, ...]]:
    """The memory policy governing address ``addr`` (``get_mempolicy(MPOL_F_ADDR)``: of a shared
    mapping, the segment's shared policy): (mode without flag bits, node ids of its mask)."""
    mode = ctypes.c_int()
    mask = _NodeMask()
    if _lib().get_mempolicy(ctypes.byref(mode), mask, MASK_BITS, addr, MPOL_F_ADDR) != 0:
        _raise_errno("get_mempolicy", "MPOL_F_ADDR failed", addr=addr)
    return mode.value & ~MPOL_MODE_FLAGS, _unmask(mask)


def bind_process_memory(node: int) -> None:
    """``set_mempolicy(MPOL_BIND, {node})``: this process's future allocations come from ``node``."""
    _check_node(node, "set_mempolicy")
    if _lib().set_mempolicy(MPOL_BIND, _mask([node]), MASK_BITS + 1) != 0:
        _raise_errno("set_mempolicy", "MPOL_BIND failed", node=node)


def get_mempolicy() -> tuple[int, tuple[int, ...]]:
    """This process's policy: (mode without flag bits, node ids of its mask)."""
    mode = ctypes.c_int()
    mask = _NodeMask()
    if _lib().get_mempolicy(ctypes.byref(mode), mask, MASK_BITS, None, 0) != 0:
        _raise_errno("get_mempolicy", "failed")
    return mode.value & ~MPOL_MODE_FLAGS, _unmask(mask)


def pin_cpus(cpus) -> None:
    """Run this process only on ``cpus`` (``os.sched_setaffinity(0, cpus)``)."""
    cpus = set(cpus)
    if not cpus:
        raise NumaError("sched_setaffinity", "empty CPU set")
    try:
        os.sched_setaffinity(0, cpus)
    except OSError as exc:
        raise NumaError("sched_setaffinity", f"cannot pin to CPUs {sorted(cpus)}",
                        err=exc.errno) from None


def placement(addr: int, length: int, fault: Callable[[int, int], None] | None = None) -> dict[str, int]:
    """Pages of ``[addr, addr+length)`` per real node, via ``move_pages(nodes=NULL)``.

    Keys are real node ids as strings; ``"absent"`` (only when > 0) counts pages not present
    (never touched, or otherwise not resolvable to a node). The page and status arrays are built
    and counted at C level (``array``), no per-page Python work: workers call this per segment.
    ``fault(page address, nbytes)``: called for the pages found absent (one call per page, or one
    for the whole batch when more than 1/16 of it is absent) to map them; those are asked again.
    """
    if length <= 0:
        return {}
    start = addr - addr % PAGE_SIZE
    npages = (addr + length - start + PAGE_SIZE - 1) // PAGE_SIZE
    counts: dict[int, int] = {}
    lib = _lib()
    try:
        known = real_nodes()
    except (OSError, ValueError):
        known = ()
    for first in range(0, npages, _MOVE_PAGES_CHUNK):
        n = min(_MOVE_PAGES_CHUNK, npages - first)
        base = start + first * PAGE_SIZE
        pages = array("Q", range(base, base + n * PAGE_SIZE, PAGE_SIZE))
        status = _page_nodes(lib, pages)
        if fault is not None:
            status = _refault(lib, pages, status, fault)
        found = 0
        for k in known:
            c = status.count(k)
            if c:
                counts[k] = counts.get(k, 0) + c
                found += c
        if found < n:  # absent pages (negative errno), or a node outside real_nodes()
            for k in set(status) - set(known):
                if k >= 0:
                    c = status.count(k)
                    counts[k] = counts.get(k, 0) + c
                    found += c
        if found < n:
            counts[-1] = counts.get(-1, 0) + n - found
    out = {str(k): v for k, v in sorted(counts.items()) if k >= 0}
    absent = counts.get(-1, 0)
    if absent:
        out["absent"] = absent
    return out


def _page_nodes(lib, pages: array) -> array:
    """move_pages(nodes=NULL) over ``pages``: each page's node, or a negative errno."""
    n = len(pages)
    status = array("i", bytes(4 * n))
    if lib.move_pages(0, n, ctypes.cast(pages.buffer_info()[0], ctypes.POINTER(ctypes.c_void_p)), None,
                      ctypes.cast(status.buffer_info()[0], ctypes.POINTER(ctypes.c_int)), 0) != 0:
        _raise_errno("move_pages", "query failed", addr=pages[0], length=n * PAGE_SIZE)
    return status


def _refault(lib, pages: array, status: array, fault: Callable[[int, int], None]) -> array:
    """``status`` with its absent pages mapped by ``fault`` and asked again."""
    negative = [v for v in set(status) if v < 0]
    if not negative:
        return status
    n = len(pages)
    if sum(status.count(v) for v in negative) > n // 16:  # many: map the whole batch at once
        fault(pages[0], n * PAGE_SIZE)
        return _page_nodes(lib, pages)
    where = []
    for v in negative:  # C-level searches, one per absent page
        i = status.index(v)
        while True:
            where.append(i)
            try:
                i = status.index(v, i + 1)
            except ValueError:
                break
    for i in where:
        fault(pages[i], PAGE_SIZE)
    again = _page_nodes(lib, array("Q", (pages[i] for i in where)))
    for i, v in zip(where, again):
        status[i] = v
    return status


def mempolicy_name(mode: int) -> str:
    return MPOL_NAMES.get(mode, str(mode))
