"""Multi-host staging under torchrun: each rank stages one contiguous block of experts.

``torchrun --nnodes H --nproc-per-node 1 ... -m ktnuma.launch --nodes N MODEL``: rank and world
size come from the environment torchrun sets (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). Every
rank computes the same host map (contiguous expert blocks, the remainder to the lowest ranks, or
``--host-experts PATH``), restricts the model index to its own block, and launch plans and stages
that block over the host's NUMA nodes as usual (``--split tp|ep`` within the host).

The ranks agree over a gloo process group created with a short timeout (``--dist-timeout``,
default 60 s, not gloo's 30 minutes). Each agreement is one round of ``all_gather_object`` of a
:class:`RankReport` (ok or the rank's error):

  1. ``plan``  after indexing: host names, pids, expert blocks, format and layers must agree;
  2. ``ready`` after the rank published its manifest: manifest paths and run ids;
  3. ``global`` after rank 0 wrote ``<manifest stem>.global.json``.

A rank that fails (bad input, a worker failure, a signal) first removes its run (launch's own
cleanup), then reports its error in the next round, so every other rank removes its run too and
exits non-zero naming that rank and reason. A rank killed outright is noticed by the others
within the timeout (a gloo error or timeout in the round); a survivor on the same host also
removes the dead rank's segments, manifest and registry entry (its workers already removed
their unfinished segments when its pipes closed). On another host, ``python -m ktnuma.cleanup``
finds them.

torch is imported only here and only when launch runs under torchrun: never on the single-host
path, never in workers. ``KTNUMA_DISTRIBUTED=0`` turns the detection off (e.g. an engine started
by torchrun that runs launch as a subprocess inherits the torchrun environment), ``=1`` forces it.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ktnuma.errors import BadInput, Interrupted, KtnumaError, LostContact, PeerFailed, WorkerFailed
from ktnuma.index.model import ModelIndex
from ktnuma.stage.ranks import (AGENT_MARKS, DEFAULT_TIMEOUT, ENV_KEYS, MODE_ENV,  # noqa: F401 - detection
                                 _parent_cmdline, add_arguments, in_torchrun)
from ktnuma.stage.hostmap import (expert_span, global_path, host_blocks, load_host_map,  # noqa: F401
                                  parse_host_map, restrict_experts, write_global)

log = logging.getLogger("ktnuma.distributed")

DIE_ENV = "KTNUMA_TEST_DIE_RANK"  # tests: this rank SIGKILLs itself after staging, before `ready`
ROUNDS = ("plan", "ready", "global")


# ---------------------------------------------------------------- the rounds

@dataclass(frozen=True)
class RankReport:
    """What one rank says in a round (pickled by all_gather_object)."""

    round: str
    rank: int
    host: str
    pid: int
    ok: bool
    error: str = ""
    code: int = 0
    experts: tuple[int, int] = (0, 0)  # [first, stop)
    info: dict = field(default_factory=dict)  # plan: format/layers/map; ready: manifest/run_id


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class Session:
    """This rank's membership in the group: init, rounds, teardown."""

    def __init__(self, timeout: float = DEFAULT_TIMEOUT, host_map_path: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        try:
            self.rank, self.world = int(env["RANK"]), int(env["WORLD_SIZE"])
        except (KeyError, ValueError):
            raise BadInput("RANK / WORLD_SIZE not set or not numbers; start launch with torchrun") from None
        if not 0 <= self.rank < self.world:
            raise BadInput(f"RANK {self.rank} outside WORLD_SIZE {self.world}")
        if timeout <= 0:
            raise BadInput(f"dist_timeout={timeout:g}: must be > 0 seconds")
        self.timeout = timeout
        self.host_map_path = host_map_path
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.dist: Any = None
        self.rounds_done = 0
        self.broken = False  # a round failed or reported a failure: no more rounds
        self.busy = False  # a round thread is in flight
        self.experts = (0, 0)
        self.peers: list[RankReport] = []  # the plan round's reports
        self.global_path: str | None = None

    # -- lifecycle
    def open(self) -> None:
        from datetime import timedelta

        if os.environ.get("MASTER_ADDR") in ("127.0.0.1", "localhost", "::1"):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        import torch.distributed as dist  # only here: the multi-host path

        t0 = time.monotonic()
        try:
            dist.init_process_group("gloo", init_method="env://", rank=self.rank, world_size=self.world,
                                    timeout=timedelta(seconds=self.timeout))
        except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError/DistStoreError/...
            raise LostContact(f"rank {self.rank}: cannot join the torch.distributed group at "
                              f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} within "
                              f"{self.timeout:g} s: {_first_line(exc)}") from None
        self.dist = dist
        log.info("rank %d of %d on %s joined the gloo group in %.2f s", self.rank, self.world, self.host,
                 time.monotonic() - t0)

    def close(self) -> None:
        if self.dist is None or self.busy:
            return  # a round thread still waits inside gloo: leave the group to process exit
        try:
            self.dist.destroy_process_group()
        except Exception as exc:  # noqa: BLE001
            log.debug("destroy_process_group: %s", exc)
        self.dist = None

    # -- rounds
    def _gather(self, report: RankReport) -> list[RankReport]:
        """all_gather_object in a thread, so that signals still reach the main thread."""
        out: list[Any] = [None] * self.world
        err: list[BaseException] = []

        def run() -> None:
            try:
                self.dist.all_gather_object(out, report)
            except BaseException as exc:  # noqa: BLE001
                err.append(exc)

        t = threading.Thread(target=run, name=f"ktnuma-round-{report.round}", daemon=True)
        self.busy = True
        t0 = time.monotonic()
        t.start()
        while t.is_alive():
            t.join(0.1)  # a signal handler may raise here (launch: Interrupted)
        self.busy = False
        if err:
            self.broken = True
            dead = self.reap_dead_peers(wait=1.0)
            who = _dead_text(dead) if dead else "a rank died or hung"
            raise LostContact(f"rank {self.rank}: the '{report.round}' exchange failed after "
                              f"{time.monotonic() - t0:.1f} s ({who}): {_first_line(err[0])}")
        return out

    def round(self, report: RankReport) -> list[RankReport]:
        """One exchange; raises PeerFailed naming the failing ranks if any reported an error."""
        if self.broken:
            raise KtnumaError(f"rank {self.rank}: the group is broken, no more exchanges")
        self.rounds_done += 1
        reports = self._gather(report)
        bad = [r for r in reports if not r.ok]
        if bad:
            self.broken = True
            others = [r for r in bad if r.rank != self.rank]
            if others:
                first = others[0]
                more = f" (and {len(others) - 1} more rank(s))" if len(others) > 1 else ""
                raise PeerFailed(f"rank {first.rank} on {first.host} failed: {first.error}{more}; "
                                 f"rank {self.rank} removed its run", first.code)
        return reports

    def _report(self, name: str, ok: bool = True, **kw: Any) -> RankReport:
        return RankReport(name, self.rank, self.host, self.pid, ok, experts=self.experts, **kw)

    def fail(self, err: BaseException) -> None:
        """Tell the others this rank failed (in the next round), unless the group already knows."""
        if self.dist is None or self.broken or self.busy or self.rounds_done >= len(ROUNDS):
            return
        name = ROUNDS[self.rounds_done]
        try:
            self.round(self._report(name, ok=False, error=_first_line(err),
                                    code=getattr(err, "exit_code", 1)))
        except KtnumaError as exc:
            log.debug("reporting the failure: %s", exc)

    # -- the two hooks launch calls
    def restrict(self, index: ModelIndex) -> ModelIndex:
        first, stop = expert_span(index)
        if self.host_map_path:
            blocks = load_host_map(self.host_map_path, self.world, first, stop)
        else:
            blocks = host_blocks(first, stop, self.world)
        self.experts = blocks[self.rank]
        info = {"format": index.format, "layers": list(index.config.layers), "blocks": blocks,
                "span": [first, stop], "num_experts": index.config.num_experts}
        reports = self.round(self._report("plan", info=info))
        for r in reports:
            for key in ("format", "num_experts", "layers", "span", "blocks"):
                if r.info.get(key) != info[key]:
                    self.broken = True
                    raise BadInput(f"rank {r.rank} on {r.host} has {key} {r.info.get(key)!r}, rank "
                                   f"{self.rank} has {info[key]!r}: every host must stage the same model, "
                                   "layers and host map (host_experts=PATH)")
        self.peers = reports
        log.info("rank %d stages experts [%d, %d) of [%d, %d)", self.rank, *self.experts, first, stop)
        return restrict_experts(index, *self.experts)

    def ready(self, manifest_path: str, run_id: str) -> None:
        if os.environ.get(DIE_ENV) == str(self.rank):
            log.warning("%s=%d: rank %d kills itself (test hook)", DIE_ENV, self.rank, self.rank)
            os.kill(os.getpid(), signal.SIGKILL)
        reports = self.round(self._report("ready", info={"manifest": os.path.abspath(manifest_path),
                                                         "run_id": run_id}))
        ok, error, code = True, "", 0
        if self.rank == 0:
            try:
                self.global_path = write_global(manifest_path, reports, self.peers[0].info)
            except (OSError, KtnumaError) as exc:
                ok, error, code = False, f"cannot write the global index: {_first_line(exc)}", 4
        self.round(self._report("global", ok=ok, error=error, code=code))
        if not ok:
            raise WorkerFailed(error)

    def drop_global(self) -> None:
        if self.global_path:
            try:
                os.unlink(self.global_path)
            except FileNotFoundError:
                pass
            self.global_path = None

    # -- a dead peer on this host
    def reap_dead_peers(self, wait: float = 0.0) -> list[RankReport]:
        """Remove the runs of plan-round peers on this host whose process is gone.

        ``wait``: a peer whose sockets just closed may still be exiting; give it that long."""
        from ktnuma.stage import registry
        from ktnuma.stage.session import remove_run

        local = [r for r in self.peers if r.rank != self.rank and r.host == self.host]
        deadline = time.monotonic() + wait
        while local and not any(_pid_dead(r.pid) for r in local) and time.monotonic() < deadline:
            time.sleep(0.05)
        dead = []
        for r in local:
            if not _pid_dead(r.pid):
                continue
            dead.append(r)
            for e in registry.entries():
                if e.pid != r.pid or not _pid_dead(e.pid, e.start_time):
                    continue
                gone = remove_run(e.run_id, e.shm_dir, manifest=e.manifest).segments
                log.warning("rank %d (pid %d) died: removed its run %s (%d segment(s))", r.rank, r.pid,
                            e.run_id, len(gone))
        return dead


def _pid_dead(pid: int, start_time: int | None = None) -> bool:
    """The process is gone, a zombie (killed, not yet reaped by torchrun's agent), or the pid
    now names another process (a different start time)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    rest = data[data.rindex(b")") + 2:].split()
    if rest[0] in (b"Z", b"X"):
        return True
    return start_time is not None and int(rest[19]) != start_time


def _dead_text(dead: Sequence[RankReport]) -> str:
    return ", ".join(f"rank {r.rank} (pid {r.pid} on {r.host})" for r in dead) + \
        " died; its segments, manifest and registry entry were removed"


# ---------------------------------------------------------------- launch's hooks

_session: Session | None = None


def restrict(index: ModelIndex) -> ModelIndex:
    """launch: the index cut to this rank's experts (unchanged outside torchrun)."""
    return index if _session is None else _session.restrict(index)


def ready(manifest_path: str, run_id: str) -> None:
    """launch, after publishing and before printing ready: agree with every rank (no-op outside torchrun)."""
    if _session is not None:
        _session.ready(manifest_path, run_id)


def wrap(main: Callable[[Sequence[str] | None], int],
         parse_args: Callable[[Sequence[str] | None], argparse.Namespace]) -> Callable[[Sequence[str] | None], int]:
    """launch's main as a rank of the group under torchrun; ``main`` itself otherwise."""
    if not in_torchrun():
        return main

    def run(argv: Sequence[str] | None = None) -> int:
        global _session
        args = parse_args(argv)
        s = Session(args.dist_timeout, args.host_experts)
        s.open()
        _session = s
        try:
            code = main(argv)
        except BaseException as exc:
            s.drop_global()
            s.fail(exc)
            dead = s.reap_dead_peers()
            if dead and isinstance(exc, Interrupted):  # torchrun stops the others when a rank dies
                raise LostContact(f"rank {s.rank}: {_dead_text(dead)}; {_first_line(exc)}") from exc
            raise
        finally:
            _session = None
            s.close()
        if not args.detach:
            s.drop_global()  # foreground: the run is gone
        return code

    return run
