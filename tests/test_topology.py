"""ktnuma.host.topology: discovery, topology files, --nodes/--topology/--no-simulate rules."""
from __future__ import annotations

import logging
import mmap
import os
import tomllib
import uuid
from pathlib import Path

import posix_ipc
import pytest

from ktnuma.cli import as_flags
from ktnuma.host import numa
from ktnuma.host import topology
from ktnuma.errors import TopologyError

ROOT = Path(__file__).resolve().parents[1]
TOPOS = ROOT / "configs" / "topologies"
FILES = ["two-node.toml", "four-node.toml", "sparse.toml", "snc-8.toml"]
REAL = numa.real_nodes()
ALLOWED = os.sched_getaffinity(0)


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and r.name == "ktnuma.host.topology"]


def assert_round_robin(topo: topology.Topology) -> None:
    """Each real node's CPUs are shared out round-robin among the nodes it backs, never none."""
    for r in set(n.real_node for n in topo.nodes):
        backed = [n for n in topo.nodes if n.real_node == r]
        cpus = numa.node_cpus(r) or tuple(sorted(ALLOWED))
        k = len(backed)
        if len(cpus) >= k:
            assert [n.cpus for n in backed] == [cpus[j::k] for j in range(k)]
        else:
            assert [n.cpus for n in backed] == [(cpus[j % len(cpus)],) for j in range(k)]


def write(tmp_path: Path, text: str, name: str = "t.toml") -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


# ---------------------------------------------------------------- discovery

def test_discover_matches_this_machine():
    t = topology.discover()
    assert t.simulated is False and t.source == "sysfs"
    assert tuple(n.id for n in t.nodes) == REAL
    for n in t.nodes:
        assert n.real_node == n.id and n.cpus and n.cpus == (numa.node_cpus(n.id) or n.cpus)
    assert t.as_manifest() == {"simulated": False,
                               "nodes": [{"id": n.id, "cpus": list(n.cpus)} for n in t.nodes]}


def test_select_default_is_all_real_nodes(caplog):
    caplog.set_level(logging.WARNING)
    assert topology.select() == topology.discover()
    assert topology.select(len(REAL), simulate=False) == topology.discover()
    assert topology.select(1).nodes == topology.discover().nodes[:1]
    assert warnings(caplog) == []


# ---------------------------------------------------------------- simulation

@pytest.mark.parametrize("extra", [1, 3, 7])
def test_more_nodes_than_machine_are_simulated(caplog, extra):
    caplog.set_level(logging.WARNING)
    n = len(REAL) + extra
    t = topology.select(n)
    assert len(warnings(caplog)) == 1 and "simulating" in warnings(caplog)[0]
    assert t.simulated is True and t.as_manifest()["simulated"] is True
    assert [x.id for x in t.nodes] == list(range(n))
    assert [x.real_node for x in t.nodes] == [REAL[i % len(REAL)] for i in range(n)]
    for x in t.nodes:
        assert x.cpus and set(x.cpus) <= set(numa.node_cpus(x.real_node) or ALLOWED)
    assert_round_robin(t)


def test_no_simulate_refuses_more_nodes():
    with pytest.raises(TopologyError) as info:
        topology.select(len(REAL) + 1, simulate=False)
    assert info.value.exit_code == 2
    assert f"nodes={len(REAL) + 1}" in str(info.value) and "simulate=False" in str(info.value)
    assert f"--nodes {len(REAL) + 1}" in as_flags(str(info.value)) and "--no-simulate" in as_flags(str(info.value))


@pytest.mark.parametrize("bad", [0, -1, True, 1.5])
def test_bad_node_counts(bad):
    with pytest.raises(TopologyError):
        topology.select(bad)


def test_simulated_node_binds_to_its_backing_real_node():
    t = topology.select(len(REAL) + 2)
    node = t.nodes[-1]
    size = 16 * mmap.PAGESIZE
    shm = posix_ipc.SharedMemory(f"/ktnuma.test-topo.{uuid.uuid4().hex[:12]}", posix_ipc.O_CREX,
                                 mode=0o600, size=size)
    try:
        with mmap.mmap(shm.fd, size) as m:
            addr = numa.address_of(m)
            numa.mbind(addr, size, node.real_node)
            os.posix_fallocate(shm.fd, 0, size)
            m[:] = b"\x5a" * size
            assert numa.placement(addr, size) == {str(node.real_node): 16}
            if node.id not in REAL:  # the simulated id itself is not a node of this machine
                with pytest.raises(numa.NodeNotFound):
                    numa.mbind(addr, size, node.id)
    finally:
        shm.close_fd()
        shm.unlink()


def test_real_mem_available_per_backing_node():
    t = topology.select(len(REAL) + 3)
    mem = topology.real_mem_available(t)
    assert set(mem) == set(n.real_node for n in t.nodes)
    assert all(v > 0 for v in mem.values())


# ---------------------------------------------------------------- topology files

@pytest.mark.parametrize("name", FILES)
def test_every_topology_file(name, caplog):
    caplog.set_level(logging.WARNING)
    path = TOPOS / name
    doc = tomllib.loads(path.read_text())
    t = topology.load(str(path))
    assert t.source == str(path) and t.simulated is True
    assert [n.id for n in t.nodes] == [e["id"] for e in doc["nodes"]]
    file_cpus = {c for e in doc["nodes"] for c in e["cpus"]}
    missing = file_cpus - ALLOWED
    for n, e in zip(t.nodes, doc["nodes"]):
        assert n.cpus and set(n.cpus) <= ALLOWED and n.real_node in REAL
        if not missing:
            assert n.cpus == tuple(e["cpus"])
    if missing:
        (msg,) = warnings(caplog)
        assert name in msg and "lacks CPU" in msg
        assert [n.real_node for n in t.nodes] == [REAL[i % len(REAL)] for i in range(len(t.nodes))]
        assert_round_robin(t)
    else:
        assert warnings(caplog) == []
    manifest = t.as_manifest()
    assert manifest["simulated"] is True
    assert [d["id"] for d in manifest["nodes"]] == [e["id"] for e in doc["nodes"]]


def test_expected_files_exist():
    assert len(topology.load(str(TOPOS / "two-node.toml")).nodes) == 2
    assert len(topology.load(str(TOPOS / "four-node.toml")).nodes) == 4
    assert len(topology.load(str(TOPOS / "snc-8.toml")).nodes) == 8


def test_sparse_ids():
    t = topology.select(path=str(TOPOS / "sparse.toml"))
    assert [n.id for n in t.nodes] == [0, 2]
    assert t.node(2).id == 2 and t.node(2).real_node in REAL
    with pytest.raises(TopologyError) as info:
        t.node(1)
    assert "no node 1" in str(info.value)
    assert [d["id"] for d in t.as_manifest()["nodes"]] == [0, 2]
    assert topology.select(1, str(TOPOS / "sparse.toml")).nodes == t.nodes[:1]


def test_file_cpus_the_machine_has_are_kept(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    cpus = sorted(ALLOWED)
    path = write(tmp_path, f"simulated = true\n[[nodes]]\nid = 5\ncpus = {cpus}\n"
                           f"[[nodes]]\nid = 9\ncpus = [{cpus[-1]}]\n")
    t = topology.load(path)
    assert [(n.id, n.cpus) for n in t.nodes] == [(5, tuple(cpus)), (9, (cpus[-1],))]
    owner = {c: r for r in REAL for c in numa.node_cpus(r)}
    assert t.nodes[1].real_node == owner[cpus[-1]]
    assert warnings(caplog) == []


def test_missing_cpus_remapped_with_one_warning(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    body = "".join(f"[[nodes]]\nid = {i}\ncpus = [{100000 + 2 * i}, {100001 + 2 * i}]\n" for i in range(5))
    t = topology.load(write(tmp_path, body))
    (msg,) = warnings(caplog)
    assert "100000-100009" in msg and "t.toml" in msg
    assert t.simulated is True
    assert [n.real_node for n in t.nodes] == [REAL[i % len(REAL)] for i in range(5)]
    assert all(n.cpus and set(n.cpus) <= ALLOWED for n in t.nodes)
    assert_round_robin(t)


def test_nodes_below_file_count_takes_first_n_and_above_is_error(caplog):
    caplog.set_level(logging.WARNING)
    path = str(TOPOS / "snc-8.toml")
    full = topology.load(path)
    caplog.clear()
    t = topology.select(3, path)
    assert t.nodes == full.nodes[:3] and t.simulated and t.source == path
    assert len(warnings(caplog)) <= 1
    with pytest.raises(TopologyError) as info:
        topology.select(9, path)
    assert "snc-8.toml" in str(info.value) and "9" in str(info.value) and info.value.exit_code == 2


def test_no_simulate_refuses_simulated_file():
    with pytest.raises(TopologyError) as info:
        topology.select(path=str(TOPOS / "two-node.toml"), simulate=False)
    assert "simulate=False" in str(info.value) and "two-node.toml" in str(info.value)


def test_real_layout_file_with_no_simulate_is_accepted(tmp_path):
    body = "simulated = false\n" + "".join(
        f"[[nodes]]\nid = {r}\ncpus = {list(numa.node_cpus(r))}\n" for r in REAL if numa.node_cpus(r))
    t = topology.select(path=write(tmp_path, body), simulate=False)
    assert t.simulated is False
    assert [(n.id, n.real_node) for n in t.nodes] == [(n.id, n.id) for n in t.nodes]


@pytest.mark.parametrize("text, reason", [
    ("[[nodes]\nid = 0", "cannot read"),
    ("simulated = true\n", "no [[nodes]]"),
    ("[[nodes]]\nid = 0\ncpus = []\n", "non-empty list"),
    ("[[nodes]]\nid = 0\ncpus = [0]\n[[nodes]]\nid = 0\ncpus = [1]\n", "duplicate node id 0"),
    ("[[nodes]]\nid = -1\ncpus = [0]\n", "non-negative"),
    ("[[nodes]]\nid = 0\ncpus = ['a']\n", "CPU numbers"),
    ("[[nodes]]\nid = 0\ncpus = [0]\nmem = 3\n", "expected only"),
    ("simulated = 'yes'\n[[nodes]]\nid = 0\ncpus = [0]\n", "true or false"),
    ("nodez = 1\n", "unknown keys"),
])
def test_bad_topology_files(tmp_path, text, reason):
    path = write(tmp_path, text, "bad.toml")
    with pytest.raises(TopologyError) as info:
        topology.select(path=path)
    assert str(info.value).startswith(path + ": ") and reason in str(info.value)
    assert info.value.exit_code == 2


def test_missing_file():
    with pytest.raises(TopologyError, match="not found"):
        topology.load("/nonexistent/ktnuma-topology.toml")
