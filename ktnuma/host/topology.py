"""Which nodes a run stages onto: the machine's real NUMA nodes, or a simulated topology.

Rules (design contract, `--nodes/--topology/--no-simulate`):
- ``--nodes`` defaults to every real node; fewer takes the first N real nodes.
- More nodes than the machine has are simulated (one warning line): simulated node i is backed by real
  node ``real[i mod R]`` and gets that real node's CPUs round-robin (shared when there are too few,
  never none). ``simulate=False`` makes that an error.
- A topology file (TOML, ``configs/topologies/``) whose CPUs this machine lacks is remapped the same way
  (one warning). ``nodes`` below the file's node count takes its first N; above it is an error.
- A simulated node binds its memory to the real node backing it (``Node.real_node``).
Errors are :class:`ktnuma.errors.TopologyError` (exit 2).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from ktnuma.host import numa
from ktnuma.text import ranges
from ktnuma.errors import TopologyError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Node:
    id: int                  # the node id the run uses (segment names, manifest)
    cpus: tuple[int, ...]    # CPUs its worker is pinned to
    real_node: int           # the real NUMA node its memory is bound to


@dataclass(frozen=True)
class Topology:
    nodes: tuple[Node, ...]
    simulated: bool
    source: str              # "sysfs" or the TOML path

    def as_manifest(self) -> dict:
        return {"simulated": self.simulated,
                "nodes": [{"id": n.id, "cpus": list(n.cpus)} for n in self.nodes]}

    def node(self, node_id: int) -> Node:
        for n in self.nodes:
            if n.id == node_id:
                return n
        raise TopologyError(f"{self.source}: no node {node_id} (nodes are "
                            f"{', '.join(str(n.id) for n in self.nodes)})")

    @property
    def ids(self) -> tuple[int, ...]:
        return tuple(n.id for n in self.nodes)

    @property
    def real_nodes(self) -> tuple[int, ...]:
        """Distinct backing real nodes, in first-use order."""
        return tuple(dict.fromkeys(n.real_node for n in self.nodes))


# ---------------------------------------------------------------- this machine

def _real_cpus() -> dict[int, tuple[int, ...]]:
    """Real node -> its CPUs this process may use (a CPU-less node borrows every allowed CPU)."""
    allowed = tuple(sorted(os.sched_getaffinity(0)))
    return {r: numa.node_cpus(r) or allowed for r in numa.real_nodes()}


def _spread(cpus: tuple[int, ...], k: int) -> list[tuple[int, ...]]:
    """Share ``cpus`` among ``k`` nodes round-robin; with fewer CPUs than nodes they share, never none."""
    if len(cpus) >= k:
        return [cpus[j::k] for j in range(k)]
    return [(cpus[j % len(cpus)],) for j in range(k)]


def _backed(ids: list[int], real: dict[int, tuple[int, ...]]) -> tuple[Node, ...]:
    """Node at index i gets real node ``R[i mod len(R)]`` and a round-robin share of its CPUs."""
    reals = sorted(real)
    backing = [reals[i % len(reals)] for i in range(len(ids))]
    shares = {r: iter(_spread(real[r], backing.count(r))) for r in reals if r in backing}
    return tuple(Node(id=nid, cpus=next(shares[r]), real_node=r) for nid, r in zip(ids, backing))


def discover() -> Topology:
    """The real NUMA nodes of this machine with their allowed CPUs."""
    real = _real_cpus()
    return Topology(nodes=tuple(Node(id=r, cpus=c, real_node=r) for r, c in sorted(real.items())),
                    simulated=False, source="sysfs")


# ---------------------------------------------------------------- topology files

def _bad(path: str, reason: str) -> TopologyError:
    return TopologyError(f"{path}: {reason}")


def _int_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


TOPOLOGY_LIMIT = 1 << 20  # bytes of a topology file
MAX_NODE_ID = 9999  # node ids that fit a segment name (host.shm.MAX_NODE)
MAX_CPU = 1 << 20
MAX_NODES = 1024  # Linux's MAX_NUMNODES: more nodes than any machine has, simulated or not


def load(path: str) -> Topology:
    """Read a TOML topology file; CPUs the machine lacks are remapped with one warning."""
    path = str(path)
    import stat
    import tomllib  # only for a topology file (start-up time of every launch)

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO must not block
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode) or st.st_size > TOPOLOGY_LIMIT:
                raise _bad(path, f"not a regular file of at most {TOPOLOGY_LIMIT} bytes")
            doc = tomllib.loads(f.read(TOPOLOGY_LIMIT).decode("utf-8"))
    except FileNotFoundError:
        raise _bad(path, "topology file not found") from None
    except UnicodeDecodeError as exc:
        raise _bad(path, f"not a TOML text file ({exc.reason} at byte {exc.start})") from None
    except (OSError, ValueError, RecursionError) as exc:  # TOMLDecodeError is a ValueError; so are huge ints
        raise _bad(path, f"cannot read topology file: {str(exc)[:200]}") from None
    unknown = set(doc) - {"simulated", "nodes"}
    if unknown:
        raise _bad(path, f"unknown keys {sorted(unknown)} (expected 'simulated' and [[nodes]])")
    flag = doc.get("simulated", True)
    if not isinstance(flag, bool):
        raise _bad(path, f"'simulated' must be true or false, got {flag!r}")
    entries = doc.get("nodes")
    if not isinstance(entries, list) or not entries:
        raise _bad(path, "no [[nodes]] entries")
    ids: list[int] = []
    cpus: list[tuple[int, ...]] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or set(entry) - {"id", "cpus"}:
            raise _bad(path, f"nodes[{i}]: expected only 'id' and 'cpus', got {entry!r}")
        nid, ncpus = entry.get("id"), entry.get("cpus")
        if not isinstance(nid, int) or isinstance(nid, bool) or not 0 <= nid <= MAX_NODE_ID:
            raise _bad(path, f"nodes[{i}]: 'id' must be a non-negative integer (at most {MAX_NODE_ID}), got {nid!r:.40}")
        if nid in ids:
            raise _bad(path, f"nodes[{i}]: duplicate node id {nid}")
        if not _int_list(ncpus) or not ncpus or min(ncpus) < 0 or max(ncpus) > MAX_CPU:
            raise _bad(path, f"node {nid}: 'cpus' must be a non-empty list of CPU numbers, got {ncpus!r}")
        if len(set(ncpus)) != len(ncpus):
            raise _bad(path, f"node {nid}: duplicate CPUs in {ncpus}")
        ids.append(nid)
        cpus.append(tuple(ncpus))

    real = _real_cpus()
    owner = {c: r for r, cs in real.items() for c in cs}
    missing = sorted({c for cs in cpus for c in cs} - set(owner))
    if missing:
        nodes = _backed(ids, real)
        log.warning("%s: this machine lacks CPU(s) %s; remapped %d nodes onto real node(s) %s: %s",
                    path, ranges(missing), len(ids), ",".join(map(str, sorted(real))),
                    "; ".join(f"node {n.id} -> real {n.real_node} cpus {ranges(n.cpus)}" for n in nodes))
    else:
        nodes = tuple(Node(id=nid, cpus=cs, real_node=_majority(cs, owner)) for nid, cs in zip(ids, cpus))
    simulated = flag or bool(missing) or any(n.id != n.real_node for n in nodes)
    return Topology(nodes=nodes, simulated=simulated, source=path)


def _majority(cpus: tuple[int, ...], owner: dict[int, int]) -> int:
    counts: dict[int, int] = {}
    for c in cpus:
        counts[owner[c]] = counts.get(owner[c], 0) + 1
    return min(counts, key=lambda r: (-counts[r], r))


# ---------------------------------------------------------------- selection

def select(nodes: int | None = None, path: str | None = None, simulate: bool = True) -> Topology:
    """The topology for ``--nodes N [--topology PATH] [--no-simulate]`` (see the module doc)."""
    if nodes is not None and (isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1):
        raise TopologyError(f"nodes={nodes!r}: must be a positive integer")
    if nodes is not None and nodes > MAX_NODES:
        raise TopologyError(f"nodes={nodes}: more than {MAX_NODES} nodes (Linux's MAX_NUMNODES) cannot be staged")
    if path is not None:
        topo = load(path)
        count = len(topo.nodes)
        if nodes is not None and nodes > count:
            raise TopologyError(f"{path}: nodes={nodes} but the topology file has {count} node(s)")
        if nodes is not None:
            topo = Topology(nodes=topo.nodes[:nodes], simulated=topo.simulated, source=topo.source)
        if topo.simulated and not simulate:
            raise TopologyError(f"{path}: the topology is simulated on this machine (real node(s) "
                                f"{ranges(numa.real_nodes())}) and simulate=False was given")
        return topo

    real = discover()
    have = len(real.nodes)
    if nodes is None or nodes == have:
        return real
    if nodes < have:
        return Topology(nodes=real.nodes[:nodes], simulated=False, source=real.source)
    if not simulate:
        raise TopologyError(f"nodes={nodes} but this machine has {have} NUMA node(s) "
                            f"({ranges(real.ids)}); drop simulate=False to simulate them")
    sim = _backed(list(range(nodes)), {n.id: n.cpus for n in real.nodes})
    log.warning("simulating %d NUMA nodes on %d real node(s): %s", nodes, have,
                "; ".join(f"node {n.id} -> real {n.real_node} cpus {ranges(n.cpus)}" for n in sim))
    return Topology(nodes=sim, simulated=True, source=real.source)


def real_mem_available(topology: Topology) -> dict[int, int]:
    """MemAvailable (bytes) of each real node backing ``topology``."""
    return {r: numa.node_mem_available(r) for r in topology.real_nodes}
