"""Run registry: one ``<run_id>.json`` per run in a per-uid directory every process of that uid agrees on.

Location (:func:`registry_dir`): ``/run/ktnuma-<uid>`` when it exists or ``/run`` lets this uid
create it, else ``/tmp/ktnuma-<uid>``; never from a variable that differs between a user's
shells, cron, sudo and systemd units (``XDG_RUNTIME_DIR`` is ignored). The directory must be owned
by the uid, mode 0700, and not under /dev/shm. Tests get a private registry with
``KTNUMA_REGISTRY_DIR`` (:data:`DIR_ENV`; for tests only, same checks).

Each entry: owner pid + process start time, state (staging | held | detached), manifest path,
shm dir, uid. Registered before the run's first segment exists, replaced atomically on every
change (temp files ``.<run_id>.json.<pid>.tmp``; cleanup removes those of dead writers). A run is
alive while a process with its pid and the same start time exists. Publishing the manifest is the
commit point: a detached entry whose manifest is missing counts as dead. Entries are validated on
read (run id of the generated form, absolute paths, this uid): a malformed one is ignored.
"""
from __future__ import annotations

import json
import logging
import os
import stat
import time
from dataclasses import asdict, dataclass, replace

from ktnuma.errors import KtnumaError, RegistryError
from ktnuma.host import shm
from ktnuma.index import bounded
from ktnuma.stage.manifest import LIMIT, proc_start_time, write_atomic

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


DIR_ENV = "KTNUMA_REGISTRY_DIR"  # tests only: a private registry directory
ENTRY_LIMIT = 64 << 10  # bytes of one entry file


def candidates() -> list[str]:
    """Where the registry of this uid lives, in order of preference."""
    uid = os.getuid()
    env = os.environ.get(DIR_ENV)
    if env:
        return [os.path.abspath(env)]
    return [f"/run/ktnuma-{uid}", f"/tmp/ktnuma-{uid}"]


def _usable(d: str) -> bool:
    try:
        st = os.lstat(d)
    except FileNotFoundError:
        return os.access(os.path.dirname(d), os.W_OK | os.X_OK)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid()


def _under_shm(d: str) -> bool:
    real = os.path.realpath(d)
    return any(real == s or real.startswith(s + os.sep) for s in {"/dev/shm", os.path.realpath("/dev/shm")})


def registry_dir(create: bool = True) -> str:
    cands = candidates()
    d = next((c for c in cands if _usable(c)), cands[-1])
    if _under_shm(d):
        raise RegistryError(f"run registry {d} is under /dev/shm (where segments live); refusing it")
    if create:
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            pass
        except OSError as e:
            raise RegistryError(f"run registry {d}: {e.strerror}") from None
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
    if not shm.valid_run_id(run_id):
        raise RegistryError(f"run registry: {run_id!r} is not a ktnuma run id")
    return os.path.join(registry_dir(), f"{run_id}.json")


def tmp_name(run_id: str, pid: int | None = None) -> str:
    return f".{run_id}.json.{pid or os.getpid()}.tmp"


def write(entry: RunEntry) -> RunEntry:
    if entry.state not in STATES:
        raise ValueError(entry.state)
    path = _path(entry.run_id)
    try:
        write_atomic(path, json.dumps(asdict(entry)).encode() + b"\n",
                     tmp=os.path.join(os.path.dirname(path), tmp_name(entry.run_id)))
    except OSError as e:
        raise RegistryError(f"run registry {path}: {e.strerror}") from None
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


def _entry(d: object) -> RunEntry | None:
    """A registry entry from its JSON, or None unless every field has the right type and form."""
    if not isinstance(d, dict) or set(d) - {f for f in RunEntry.__dataclass_fields__}:
        return None
    try:
        e = RunEntry(**d)
    except TypeError:
        return None
    ints = (e.pid, e.uid) + (() if e.start_time is None else (e.start_time,))
    if (not shm.valid_run_id(e.run_id) or not all(type(i) is int for i in ints) or e.pid <= 0
            or e.state not in STATES or not isinstance(e.manifest, str) or not isinstance(e.shm_dir, str)
            or not os.path.isabs(e.manifest) or not os.path.isabs(e.shm_dir) or "\0" in e.manifest + e.shm_dir
            or e.uid != os.getuid() or not isinstance(e.created, (int, float))):
        return None
    return e


def get(run_id: str) -> RunEntry | None:
    try:
        return _entry(bounded.read(_path(run_id), limit=ENTRY_LIMIT))
    except (OSError, ValueError, RegistryError):
        return None


def entries() -> list[RunEntry]:
    d = registry_dir()
    out = []
    for name in sorted(os.listdir(d)):
        if not name.endswith(".json") or name.startswith(".") or not shm.valid_run_id(name[:-5]):
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
    """True for a run that cleanup must leave alone: a detached run whose manifest (still carrying
    its run id) exists, or a run whose owner is still the same living process."""
    if entry.state == "detached":
        if not os.path.lexists(entry.manifest):
            return False
        try:
            m = bounded.read(entry.manifest, limit=LIMIT)
        except OSError:  # cannot tell (e.g. not readable by us): leave it alone
            return True
        except ValueError:
            return False
        return isinstance(m, dict) and m.get("run_id") == entry.run_id
    return owner_alive(entry)
