"""ktnuma.host.numa on this machine: real libnuma calls, real POSIX shm, real processes."""
from __future__ import annotations

import errno
import json
import mmap
import os
import subprocess
import sys
import uuid
from pathlib import Path

import posix_ipc
import pytest

from ktnuma.host import numa
from ktnuma.errors import BadInput, KtnumaError

ROOT = Path(__file__).resolve().parents[1]
PAGE = mmap.PAGESIZE


def run_py(code: str) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter (policy and affinity changes must not leak into pytest)."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


@pytest.fixture
def segment():
    """Factory for ktnuma.* POSIX shm segments (O_CREX, 0600), always unlinked."""
    made: list[tuple[posix_ipc.SharedMemory, mmap.mmap]] = []

    def make(size: int) -> tuple[posix_ipc.SharedMemory, mmap.mmap]:
        shm = posix_ipc.SharedMemory(f"/ktnuma.test-numa.{uuid.uuid4().hex[:12]}", posix_ipc.O_CREX,
                                     mode=0o600, size=size)
        m = mmap.mmap(shm.fd, size)
        made.append((shm, m))
        return shm, m

    try:
        yield make
    finally:
        for shm, m in made:
            m.close()
            shm.close_fd()
            shm.unlink()


def absent_node() -> int:
    return max(numa.real_nodes()) + 1


# ---------------------------------------------------------------- discovery

def test_parse_cpulist():
    assert numa.parse_cpulist("0-3,8,10-11\n") == (0, 1, 2, 3, 8, 10, 11)
    assert numa.parse_cpulist("5") == (5,)
    assert numa.parse_cpulist("\n") == ()


def test_real_nodes_match_sysfs():
    nodes = numa.real_nodes()
    assert 0 in nodes and list(nodes) == sorted(nodes)
    listed = sorted(int(p.name[4:]) for p in Path("/sys/devices/system/node").glob("node[0-9]*"))
    assert set(nodes) <= set(listed)


def test_node_cpus_are_allowed_and_cover_affinity():
    allowed = os.sched_getaffinity(0)
    seen: set[int] = set()
    for n in numa.real_nodes():
        cpus = numa.node_cpus(n)
        assert set(cpus) <= allowed
        text = Path(f"/sys/devices/system/node/node{n}/cpulist").read_text()
        assert set(cpus) == set(numa.parse_cpulist(text)) & allowed
        seen |= set(cpus)
    assert seen == allowed


def test_node_mem_available_is_plausible():
    total = numa._meminfo("/sys/devices/system/node/node0/meminfo")["MemTotal"]
    avail = numa.node_mem_available(0)
    assert 0 < avail <= total


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("call", ["mbind", "bind", "cpus", "mem"])
@pytest.mark.parametrize("node", ["next", 1023, 5000, -1])
def test_missing_node_raises_named_error(segment, call, node):
    node = absent_node() if node == "next" else node
    _, m = segment(PAGE)
    fn = {"mbind": lambda: numa.mbind(numa.address_of(m), PAGE, node),
          "bind": lambda: numa.bind_process_memory(node),
          "cpus": lambda: numa.node_cpus(node),
          "mem": lambda: numa.node_mem_available(node)}[call]
    with pytest.raises(numa.NodeNotFound) as info:
        fn()
    err = info.value
    assert isinstance(err, BadInput) and isinstance(err, numa.NumaError) and err.exit_code == 2
    assert f"node {node}" in str(err) and "no such NUMA node" in str(err)
    assert "\n" not in str(err)
    assert numa.get_mempolicy()[0] == numa.MPOL_DEFAULT  # nothing was changed


def test_missing_node_in_fresh_process_does_not_crash():
    r = run_py("from ktnuma.host import numa\n"
               "try:\n    numa.bind_process_memory(4096)\n"
               "except numa.NodeNotFound as e:\n    print('refused:', e)\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("refused: set_mempolicy: node 4096")


def test_unaligned_mbind_names_call_range_and_errno(segment):
    _, m = segment(2 * PAGE)
    addr = numa.address_of(m) + 1
    with pytest.raises(numa.NumaError) as info:
        numa.mbind(addr, PAGE, 0)
    err = info.value
    assert not isinstance(err, numa.NodeNotFound)
    assert err.call == "mbind" and err.errno == errno.EINVAL and err.addr == addr
    assert f"0x{addr:x}" in str(err) and "EINVAL" in str(err)


def test_kernel_errno_becomes_numa_error():
    # an unmapped range: the kernel refuses with EFAULT/ENOMEM, turned into NumaError (not a crash)
    m = mmap.mmap(-1, 2 * PAGE)
    addr = numa.address_of(m)
    m.close()
    with pytest.raises(numa.NumaError) as info:
        numa.mbind(addr, 2 * PAGE, 0)
    assert info.value.errno in (errno.EFAULT, errno.ENOMEM)
    assert str(info.value).startswith("mbind: node 0, range ")
    assert isinstance(info.value, KtnumaError)


def test_pin_cpus_errors():
    with pytest.raises(numa.NumaError):
        numa.pin_cpus([])
    with pytest.raises(numa.NumaError) as info:
        numa.pin_cpus([100_000])
    assert info.value.errno == errno.EINVAL and "100000" in str(info.value)


# ---------------------------------------------------------------- addresses

def test_address_of_buffers():
    ba = bytearray(b"abcdefghijklmnop")
    base = numa.address_of(ba)
    assert numa.address_of(memoryview(ba)[10:]) == base + 10
    import ctypes
    assert ctypes.string_at(base + 3, 4) == b"defg"
    ro = b"0123456789abcdef" * 4
    assert ctypes.string_at(numa.address_of(memoryview(ro)[5:]), 3) == b"567"  # read-only path
    m = mmap.mmap(-1, PAGE)
    try:
        m[:4] = b"xyzw"
        assert numa.address_of(m) % PAGE == 0
        assert ctypes.string_at(numa.address_of(m), 4) == b"xyzw"
    finally:
        m.close()  # address_of released its buffer export: close() must not raise


# ---------------------------------------------------------------- policy

def test_default_policy_and_bind_process_memory_in_child():
    r = run_py("from ktnuma.host import numa\n"
               "print(numa.get_mempolicy())\n"
               "numa.bind_process_memory(0)\n"
               "print(numa.get_mempolicy())\n"
               "b = bytearray(8 << 20)\n"
               "print(numa.placement(numa.address_of(b), len(b)))\n")
    assert r.returncode == 0, r.stderr
    before, after, placed = r.stdout.splitlines()
    assert before == "(0, ())"
    assert after == "(2, (0,))"
    counts = eval(placed)  # noqa: S307 - our own repr of a dict of ints
    assert counts.get("0", 0) >= (8 << 20) // PAGE - 1 and set(counts) <= {"0", "absent"}


# ---------------------------------------------------------------- placement

def test_placement_counts_absent_pages(segment):
    npages = 64
    shm, m = segment(npages * PAGE)
    addr = numa.address_of(m)
    assert numa.placement(addr, npages * PAGE) == {"absent": npages}
    for i in range(0, npages, 2):  # touch every other page
        m[i * PAGE] = 1
    assert numa.placement(addr, npages * PAGE) == {"0": npages // 2, "absent": npages // 2}
    # an unaligned sub-range counts every page it overlaps
    assert numa.placement(addr + 100, PAGE) == {"0": 1, "absent": 1}
    assert numa.placement(addr, 0) == {}


def test_placement_maps_the_pages_it_finds_absent_through_fault(segment):
    npages = 64
    shm, m = segment(npages * PAGE)
    addr = numa.address_of(m)
    calls: list[tuple[int, int]] = []

    def fault(at: int, n: int) -> None:
        calls.append((at - addr, n))
        for off in range(at - addr, min(at - addr + n, npages * PAGE), PAGE):
            m[off]

    for i in range(npages):  # all but 3 pages mapped: those 3 are faulted one by one
        if i not in (0, 17, 63):
            m[i * PAGE] = 1
    assert numa.placement(addr, npages * PAGE, fault=fault) == {"0": npages}
    assert sorted(calls) == [(0, PAGE), (17 * PAGE, PAGE), (63 * PAGE, PAGE)]


def test_placement_faults_a_mostly_absent_batch_at_once(segment):
    npages = 64
    shm, m = segment(npages * PAGE)
    addr = numa.address_of(m)
    m[5 * PAGE] = 1  # 63 of 64 absent: more than 1/16, one call for the whole batch
    calls: list[tuple[int, int]] = []

    def fault(at: int, n: int) -> None:
        calls.append((at - addr, n))
        m.madvise(22, at - addr, n)  # MADV_POPULATE_READ

    assert numa.placement(addr, npages * PAGE, fault=fault) == {"0": npages}
    assert calls == [(0, npages * PAGE)]


def test_placement_counts_what_fault_did_not_map(segment):
    """A fault that maps nothing does not make the pages count as placed."""
    npages = 16
    shm, m = segment(npages * PAGE)
    addr = numa.address_of(m)
    m[0] = 1
    seen: list[int] = []
    assert numa.placement(addr, npages * PAGE, fault=lambda at, n: seen.append(n)) == \
        {"0": 1, "absent": npages - 1}
    assert seen == [npages * PAGE]


def _numa_maps_line(addr: int) -> str:
    """This process's /proc/self/numa_maps line of the mapping at ``addr`` (the kernel's own count
    of its mapped pages per node: an oracle that does not go through move_pages)."""
    with open("/proc/self/numa_maps") as f:
        for line in f:
            if int(line.split()[0], 16) == addr:
                return line
    raise AssertionError(f"no numa_maps line at {addr:#x}")


@pytest.mark.parametrize("writable", [True, False])
def test_prove_maps_every_page_of_a_staged_segment(segment, writable):
    """worker_io.prove (fault-around reads, then the pages they missed one by one): every page is
    counted on its node, none absent, the written bytes unchanged. The segment has what staged
    segments have: pages never written (padding between pieces, the tail), an unaligned end."""
    from ktnuma.stage.worker_io import FAULT_AROUND, prove

    size = 70 * FAULT_AROUND + 3 * PAGE + 100
    shm, m = segment(size)
    addr = numa.address_of(m)
    numa.mbind(addr, size, 0)
    os.posix_fallocate(shm.fd, 0, size)
    data = os.urandom(size)
    holes = {0, 17, 16 * 7, 16 * 7 + 1, size // PAGE - 1}  # pages left unwritten
    for i in range(0, size, PAGE):
        if i // PAGE not in holes:
            os.pwrite(shm.fd, data[i:i + PAGE], i)
    mm = mmap.mmap(shm.fd, size, prot=mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0))
    try:
        at = numa.address_of(mm)
        npages = -(-size // PAGE)
        assert prove(mm, at, size) == {"0": npages}
        line = _numa_maps_line(at)
        assert f" N0={npages} " in line, line  # every page mapped here, all on node 0
        for i in range(0, size, PAGE):
            want = bytes(min(PAGE, size - i)) if i // PAGE in holes else data[i:i + PAGE]
            assert mm[i:i + PAGE] == want, f"page {i // PAGE}"
    finally:
        mm.close()


def test_bound_fallocated_written_segment_is_all_on_node_0(segment):
    size = 8 << 20
    shm, m = segment(size)
    addr = numa.address_of(m)
    numa.mbind(addr, size, 0)
    os.posix_fallocate(shm.fd, 0, size)
    data = os.urandom(4096) * (size // 4096)
    m[:] = data
    assert numa.placement(addr, size) == {"0": size // PAGE}
    assert m[:] == data


def test_pinned_process_bound_segment_placement_100pct_on_node_0():
    """The VM check run on this machine: a child pinned to node 0's CPUs creates (O_CREX, 0600),
    mbinds, fallocates and writes a segment; the child and the parent both read placement back."""
    r = subprocess.run([sys.executable, str(ROOT / "scripts/vm/placement_check.py"), "--mib", "8",
                        "--nodes", "0"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout.splitlines()[0])
    (seg,) = report["segments"]
    pages = (8 << 20) // PAGE
    assert seg["placement"] == {"0": pages} and seg["placement_seen_by_parent"] == {"0": pages}
    assert seg["bytes_match"] and seg["cpus"] == list(numa.node_cpus(0))
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(seg["name"])]


def test_pin_cpus_in_child():
    cpu = min(os.sched_getaffinity(0))
    r = run_py(f"import os; from ktnuma.host import numa; numa.pin_cpus([{cpu}]); "
               "print(sorted(os.sched_getaffinity(0)))")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"[{cpu}]"
