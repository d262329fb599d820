"""Shared fixtures: shared-memory leak check, private run registry, cached synthetic models."""
from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

SHM = "/dev/shm"
REPO = Path(__file__).resolve().parent.parent

# Every run id made by this session (in-process or in child processes, which inherit the
# environment) starts with this hex tag, so the leak check never touches segments of another
# pytest session running at the same time on this machine.
SESSION_TAG = os.environ.get("KTNUMA_RUN_ID_PREFIX") or secrets.token_hex(3)
os.environ["KTNUMA_RUN_ID_PREFIX"] = SESSION_TAG
PREFIX = f"ktnuma.{SESSION_TAG}"


def _ktnuma_segments() -> set[str]:
    try:
        return {n for n in os.listdir(SHM) if n.startswith(PREFIX)}
    except FileNotFoundError:
        return set()


def _remove(names) -> None:
    for name in names:
        try:
            os.unlink(os.path.join(SHM, name))
        except FileNotFoundError:
            pass


def pytest_sessionfinish(session, exitstatus):
    left = _ktnuma_segments()
    _remove(left)
    if left:
        print(f"\nktnuma: the test session left {len(left)} segment(s) in {SHM} (removed): {sorted(left)[:5]}")
        session.exitstatus = 1


@pytest.fixture(autouse=True)
def shm_leak_check():
    """Fail a test that leaves ktnuma.* segments in /dev/shm (and remove them)."""
    before = _ktnuma_segments()
    yield
    left = _ktnuma_segments() - before
    _remove(left)
    if left:
        pytest.fail(f"test left {len(left)} shared-memory segment(s) in {SHM}: {sorted(left)[:5]}")


@pytest.fixture
def run_registry(tmp_path, monkeypatch) -> Path:
    """A private run registry (KTNUMA_REGISTRY_DIR, the tests-only override; inherited by
    subprocesses), so registry tests see only their runs."""
    d = tmp_path / "xdg"
    d.mkdir(mode=0o700)
    reg = d / f"ktnuma-{os.getuid()}"
    monkeypatch.setenv("KTNUMA_REGISTRY_DIR", str(reg))
    return reg


@pytest.fixture(scope="session")
def synth_model(tmp_path_factory):
    """synth_model(fmt, **kw) -> SynthInfo, written once per session per argument set."""
    from ktnuma.tools.synth import write_model

    cache: dict = {}

    def make(fmt: str = "bf16", **kw):
        key = (fmt, tuple(sorted(kw.items())))
        if key not in cache:
            d = tmp_path_factory.mktemp("model-" + fmt.replace(":", "_"))
            cache[key] = write_model(d, fmt, **kw)
        return cache[key]

    return make


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """mount_tmpfs(size) -> a small tmpfs directory (skips where mounting is not allowed)."""
    mounts: list[str] = []

    def mount(size: str = "1m") -> str:
        d = tmp_path / f"tmpfs{len(mounts)}"
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(d)],
                           capture_output=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
        mounts.append(str(d))
        return str(d)

    yield mount
    for d in mounts:
        subprocess.run(["umount", "-l", d], capture_output=True)


def run_module(mod: str, *args: str, env: dict | None = None, timeout: float = 120,
               **kw) -> subprocess.CompletedProcess:
    """python -m ktnuma.<mod> args..., text output captured."""
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", f"ktnuma.{mod}", *args], capture_output=True, text=True,
                          env=e, timeout=timeout, **kw)
