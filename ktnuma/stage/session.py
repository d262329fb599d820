"""One staging session: :func:`prepare` a run, and :func:`remove_run` it.

Every way of staging (``python -m ktnuma.launch``, ``ktnuma.stream`` and launch's multi-host path
under torchrun) prepares its run here, and every teardown (launch, the coordinator's Run,
stream, a multi-host survivor reaping a dead rank, ``cleanup``, ``release``) removes a run here.

Call order (each step only after the previous one succeeded; nothing on this machine changes
before step 7, and nothing is left behind by a failure in steps 1-7):

1. ``check_shm_dir(shm_dir)``: the one normalisation of a shm dir (None = POSIX shm under
   /dev/shm, else an absolute path), checked to be an existing tmpfs directory.
2. ``select(nodes, topology, simulate)``: the topology (node count checked against the machine).
3. ``index_model(model, format, layers)``: headers only; the model path, its files (regular files
   only) and the layer spec are checked against the checkpoint.
4. ``restrict(index)`` (multi-host: this rank's experts), then ``check_split``: the split's
   alignment against the model, with the numbers and a way out.
5. ``spawn(topology)`` (optional, launch): worker interpreters start only now, for the nodes
   that will get work, while the remaining steps run.
6. ``plan`` (pure) and ``check_memory`` (shm space and each backing node's MemAvailable, for the
   whole run or for a ``window`` of layers in flight).
7. ``registry.register``: the run's entry (state ``staging``) exists before its first segment.

:func:`prepare` returns a :class:`Prepared`; the caller then stages (``coordinator.Run``),
publishes (launch: ``manifest.publish`` then ``registry.update``) and, on every path that does
not hand the run over, calls ``Prepared.remove()``. :func:`remove_run` is idempotent and never
raises: each failure is one log line and the rest is still removed. It removes only what is
provably the run's: segments named ``ktnuma.<run_id>.L<layer>.n<node>`` of the caller's uid in the
run's shm dir (never names in ``protected``: objects that existed before the run), the manifest
only while it still carries the run id (and the run's stale publish temp file), and the registry
entry.
"""
from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from ktnuma.errors import BadInput, SplitError
from ktnuma.host import shm

log = logging.getLogger(__name__)


def check_shm_dir(shm_dir: str | os.PathLike[str] | None) -> str | None:
    """``shm_dir`` normalised (:func:`shm.resolve_dir`) and checked: an existing tmpfs directory.
    BadInput naming the parameter (``shm_dir``) otherwise."""
    try:
        d = shm.resolve_dir(shm_dir)
    except ValueError as exc:
        raise BadInput(f"shm_dir: {exc}") from None
    if d is None:
        return None
    if not os.path.isdir(d):
        raise BadInput(f"shm_dir={d}: no such directory")
    try:
        tmpfs = shm.is_tmpfs(d)
    except OSError as exc:
        raise BadInput(f"shm_dir={d}: {exc.strerror}") from None
    if not tmpfs:
        raise BadInput(f"shm_dir={d} is not on a tmpfs (segments must be memory, not disk files); "
                       "mount one there (mount -t tmpfs -o size=...,mode=0700 tmpfs DIR) or use /dev/shm")
    return d


@dataclass(frozen=True)
class Removed:
    """What :func:`remove_run` removed."""

    segments: tuple[str, ...] = ()
    manifest: bool = False
    entry: bool = False


def _ours(path: str, uid: int) -> bool:
    """``path`` exists and is a regular file (or symlink) of ``uid``."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if st.st_uid != uid:
        log.warning("not removing %s: owned by uid %d, not %d", path, st.st_uid, uid)
        return False
    return stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)


def remove_run(run_id: str, shm_dir: str | None, *, names: Iterable[str] = (), manifest: str | None = None,
               protected: Iterable[str] = (), entry: bool = True, dry_run: bool = False) -> Removed:
    """Remove run ``run_id`` (see the module doc): its segments in ``shm_dir`` (the listed
    ``names`` and any other of the run found there), its manifest if it still carries the run id,
    its stale publish temp file, its registry entry (unless ``entry=False``). Never raises.
    ``dry_run``: remove nothing, return what would be removed."""
    if not shm.valid_run_id(run_id):
        log.warning("not removing run %r: not a ktnuma run id", run_id)
        return Removed()
    uid = os.getuid()
    removed: list[str] = []
    keep = set(protected)
    try:
        d = shm.resolve_dir(shm_dir)
        found = set(shm.run_segments(run_id, d, uid=uid))
    except (OSError, ValueError) as exc:
        log.warning("run %s: cannot list its segments in %s: %s", run_id, shm_dir, exc)
        d, found = shm.resolve_dir(None) if shm_dir is None else shm_dir, set()
    for name in sorted(found | set(names)):
        parsed = shm.parse_name(name)
        if name in keep or parsed is None or parsed[0] != run_id:
            continue
        try:
            if _ours(os.path.join(shm.norm_dir(d), name), uid) and (dry_run or shm.unlink(name, d)):
                removed.append(name)
        except (OSError, ValueError) as exc:
            log.warning("cannot remove segment %s: %s", name, exc)
    man = False
    if manifest is not None:
        from ktnuma.stage.manifest import carries, tmp_path, unlink_if_ours

        man = carries(manifest, run_id) if dry_run else unlink_if_ours(manifest, run_id)
        tmp = tmp_path(manifest, run_id)
        try:
            if _ours(tmp, uid) and not dry_run:
                os.unlink(tmp)
        except OSError as exc:
            log.warning("cannot remove %s: %s", tmp, exc)
    ent = False
    if entry and not dry_run:
        from ktnuma.stage import registry

        ent = registry.remove(run_id)
    if removed:
        log.debug("run %s: removed %d segment(s)", run_id, len(removed))
    return Removed(tuple(removed), man, ent)


@dataclass(frozen=True)
class Prepared:
    """A registered run that has not staged anything yet (see the module doc)."""

    run_id: str
    index: Any  # ModelIndex
    topology: Any  # Topology
    plan: Any  # Plan
    shm_dir: str | None
    manifest: str  # where launch publishes it; for stream a name in the registry dir
    entry: Any  # RunEntry
    workers: Any = None  # coordinator.Workers started by `spawn`, adopted by the Run
    names: tuple[str, ...] = field(default=())

    def remove(self, protected: Iterable[str] = ()) -> Removed:
        """Remove everything of this run (never raises)."""
        return remove_run(self.run_id, self.shm_dir, names=self.names, manifest=self.manifest,
                          protected=protected)

    def stop_workers(self) -> None:
        if self.workers is not None:
            self.workers.stop()


def _busy_nodes(index: Any, topology: Any, split: str) -> Any:
    """The topology cut to the nodes that will get work (ep over more nodes than experts: the first ones)."""
    if split != "ep":
        return topology
    count = max((g.count for g in index.groups), default=0)
    return replace(topology, nodes=topology.nodes[:max(count, 1)])


def prepare(model: str | os.PathLike[str], *, nodes: int | None = None, topology: str | None = None,
            simulate: bool = True, split: str = "tp", format: str | None = None, layers: Any = None,
            shm_dir: str | os.PathLike[str] | None = None, manifest: str | None = None, stream: bool = False,
            window: int | None = None, restrict: Callable[[Any], Any] | None = None,
            spawn: Callable[[Any], Any] | None = None) -> Prepared:
    """Steps 1-7 of the module doc. ``manifest``: launch's ``--manifest`` (default
    ``./ktnuma-<run_id>.json``; its directory must exist and the path must not); ``stream=True``: no
    manifest file (the entry names ``<registry>/<run_id>.stream``). ``window``: check memory for
    that many layers at once instead of the whole run. Raises the named error of the first step
    that refuses; on any failure the workers ``spawn`` started are stopped and nothing is left."""
    # imports in the order they are needed: what runs before the workers start delays them
    from ktnuma.host.topology import select
    from ktnuma.index.experts import index_model
    from ktnuma.plan.splits import check_split

    sdir = check_shm_dir(shm_dir)
    topo = select(nodes, os.fspath(topology) if topology is not None else None, simulate=simulate)
    index = index_model(os.fspath(model), format=format, layers=layers)
    if restrict is not None:
        index = restrict(index)
    try:
        check_split(index, len(topo.nodes), split)
    except SplitError as exc:  # name the model: the planner's message has the numbers and the way out
        raise SplitError(f"{os.path.abspath(index.root)}: {exc}") from None
    workers = spawn(_busy_nodes(index, topo, split)) if spawn is not None else None
    try:
        from ktnuma.host.preflight import check_memory
        from ktnuma.plan.planner import plan as make_plan
        from ktnuma.stage import registry

        plan = make_plan(index, topo, split)
        if window is None:
            check_memory(plan.segments, topo, sdir)
        else:
            heaviest = sorted(plan.layers, key=lambda lyr: -sum(s.size for s in plan.layer_segments(lyr)))[:window]
            check_memory([s for lyr in heaviest for s in plan.layer_segments(lyr)], topo, sdir,
                         what=f"ktnuma.stream with {window} layer(s) in flight", way_out="lower prefetch")
        run_id = shm.new_run_id()
        if stream:
            path = os.path.join(registry.registry_dir(), f"{run_id}.stream")
        else:
            path = os.path.abspath(manifest or f"ktnuma-{run_id}.json")
            if not os.path.isdir(os.path.dirname(path)):
                raise BadInput(f"manifest={path}: directory does not exist")
            if os.path.lexists(path):
                raise BadInput(f"manifest={path}: exists; remove it or choose another path")
        names = tuple(shm.segment_name(run_id, s.layer, s.node) for s in plan.segments)
        entry = registry.register(run_id, path, shm.norm_dir(sdir))
    except BaseException:
        if workers is not None:
            workers.stop()
        raise
    return Prepared(run_id, index, topo, plan, sdir, path, entry, workers, names)
