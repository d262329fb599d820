"""Run registry: one ``<run_id>.json`` per run in ``${XDG_RUNTIME_DIR:-/tmp}/ktnuma-<uid>/`` (0700).

Each entry: owner pid + process start time, state (staging | held | detached), manifest path,
shm dir. Registered before the run's first segment exists, replaced atomically on every change.
Never under /dev/shm or --shm-dir. A run is alive while a process with its pid and the same
start time exists. Publishing the manifest is the commit point: a detached entry whose manifest
is missing counts as dead.
"""
from __future__ import annotations

import json
import logging
import os
import stat
import time
from dataclasses import asdict, dataclass, replace

from ktnuma.errors import KtnumaError, RegistryError
from ktnuma.stage.manifest import proc_start_time, write_atomic

log = logging.getLogger(__name__)

STATES = ("staging", "held", "detached")


@dataclass(frozen=True)
class RunEntry:
    run_id: str
    pid: int
    start_time: int | None
    state: str
    manifest: str
    shm_dir: str
    created: float = 0.0
    uid: int = -1


def registry_dir(create: bool = True) -> str:
    base = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
    d = os.path.join(base, f"ktnuma-{os.getuid()}")
    if create:
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            pass
        except OSError as e:
            raise RegistryError(f"run registry {d}: {e.strerror}; set XDG_RUNTIME_DIR to a writable directory") from None
        st = os.lstat(d)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            raise RegistryError(f"run registry {d} is not a directory owned by uid {os.getuid()}")
        if stat.S_IMODE(st.st_mode) != 0o700:
            try:
                os.chmod(d, 0o700)
            except OSError as e:
                raise RegistryError(f"run registry {d}: cannot make it private (0700): {e.strerror}") from None
    return d


def _path(run_id: str) -> str:
    return os.path.join(registry_dir(), f"{run_id}.json")


def write(entry: RunEntry) -> RunEntry:
    if entry.state not in STATES:
        raise ValueError(entry.state)
    path = _path(entry.run_id)
    try:
        write_atomic(path, json.dumps(asdict(entry)).encode() + b"\n")
    except OSError as e:
        raise RegistryError(f"run registry {path}: {e.strerror}; set XDG_RUNTIME_DIR to a writable directory") from None
    return entry


def register(run_id: str, manifest: str, shm_dir: str, *, state: str = "staging",
             pid: int | None = None) -> RunEntry:
    pid = pid or os.getpid()
    return write(RunEntry(run_id, pid, proc_start_time(pid), state, os.path.abspath(manifest),
                          shm_dir, time.time(), os.getuid()))


def update(entry: RunEntry, **changes) -> RunEntry:
    return write(replace(entry, **changes))


def remove(run_id: str) -> bool:
    """Delete a run's entry; never raises (it runs on cleanup paths)."""
    try:
        os.unlink(_path(run_id))
        return True
    except FileNotFoundError:
        return False
    except (OSError, KtnumaError) as e:
        log.warning("run registry: cannot remove the entry of run %s: %s", run_id, e)
        return False


def get(run_id: str) -> RunEntry | None:
    try:
        with open(_path(run_id)) as f:
            return RunEntry(**json.load(f))
    except (FileNotFoundError, ValueError, TypeError):
        return None


def entries() -> list[RunEntry]:
    d = registry_dir()
    out = []
    for name in sorted(os.listdir(d)):
        if not name.endswith(".json") or name.startswith("."):
            continue
        e = get(name[:-5])
        if e is None:
            log.warning("run registry: unreadable entry %s", os.path.join(d, name))
            continue
        out.append(e)
    return out


def owner_alive(entry: RunEntry) -> bool:
    """The owner pid exists and is the same process (same start time)."""
    try:
        os.kill(entry.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    st = proc_start_time(entry.pid)
    return st is not None and (entry.start_time is None or st == entry.start_time)


def is_live(entry: RunEntry) -> bool:
    """True for a run that cleanup must leave alone: a detached run with its manifest, or a run
    whose owner is still the same living process."""
    if entry.state == "detached":
        return os.path.exists(entry.manifest)
    return owner_alive(entry)
