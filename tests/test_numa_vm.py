"""Placement on a real two-node kernel: scripts/numa-vm boots Debian's kernel under qemu (TCG) with two
NUMA nodes and runs the checks inside it. Runs in the normal suite (about a minute); run alone with
`pytest tests/test_numa_vm.py -s` to see the per-node page counts.

Skipped only when qemu & co. cannot be installed from Debian packages on this machine.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.vm  # boots a qemu NUMA guest: minutes

ROOT = Path(__file__).resolve().parents[1]
VM = ROOT / "scripts" / "numa-vm"
CANNOT_INSTALL = ("cannot install", "apt-get update failed", "apt-get download", "cannot find a linux-image")


def numa_vm(*cmd: str, cwd: Path = ROOT, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([str(VM), *cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def hardware() -> subprocess.CompletedProcess:
    """First VM boot (also installs qemu/busybox/numactl and unpacks the kernel when missing)."""
    if shutil.which("apt-get") is None and shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is missing and there is no apt-get to install it")
    r = numa_vm("numactl", "--hardware")
    if r.returncode == 125 and any(s in r.stderr for s in CANNOT_INSTALL):
        pytest.skip("scripts/numa-vm cannot install what it needs: " + r.stderr.strip().splitlines()[-1])
    return r


def test_numactl_hardware_shows_two_nodes(hardware):
    assert hardware.returncode == 0, hardware.stderr[-3000:]
    out = hardware.stdout
    assert "available: 2 nodes (0-1)" in out
    assert "node 0 cpus: 0\n" in out and "node 1 cpus: 1\n" in out


def test_exit_status_cwd_and_streams_pass_through(hardware, tmp_path):
    r = numa_vm("sh", "-c", "pwd; echo to-stderr >&2; test -w /dev/shm && exit 7", cwd=tmp_path)
    assert r.returncode == 7, r.stderr[-3000:]
    assert r.stdout == f"{tmp_path}\n"
    assert r.stderr.endswith("to-stderr\n")


def test_placement_on_two_real_nodes(hardware):
    """Processes pinned to node 0 and node 1 each create (O_CREX, 0600), mbind, fallocate and write a
    segment: 100% of each one's pages are on its node (seen by the writer and by a second process);
    an unbound control written from node 0 has no page on node 1; a segment written from node 0's CPU
    but bound to node 1 is entirely on node 1."""
    t0 = time.monotonic()
    r = numa_vm("python3", "scripts/vm/placement_check.py", "--mib", "16")
    wall = time.monotonic() - t0
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads(r.stdout.splitlines()[0])
    print(f"\nVM placement check: wall {wall:.1f} s (in-VM {report['seconds']} s)\n{r.stderr}")
    assert report["real_nodes"] == [0, 1] and report["ok"] is True
    pages = (16 << 20) // 4096
    segs = {s["name"].rsplit(".", 1)[1]: s for s in report["segments"]}
    assert set(segs) == {"n0", "n1", "control", "cross"}
    for n in (0, 1):
        s = segs[f"n{n}"]
        assert s["cpus"] == [n] and s["bound_to"] == n and s["bytes_match"]
        assert s["placement"] == {str(n): pages} == s["placement_seen_by_parent"]
    ctl = segs["control"]
    assert ctl["bound_to"] is None and ctl["cpus"] == [0] and ctl["bytes_match"]
    assert "1" not in ctl["placement_seen_by_parent"] and "1" not in ctl["placement"]
    assert sum(ctl["placement_seen_by_parent"].values()) == pages
    cross = segs["cross"]
    assert cross["cpus"] == [0] and cross["placement_seen_by_parent"] == {"1": pages}


def test_launch_stages_each_node_slice_on_its_node(hardware, tmp_path):
    """The whole main job on a real two-node kernel: `launch --nodes 2` (no simulation) stages a model
    with tp and with ep, and every segment's pages read back by move_pages lie on its own node."""
    from ktnuma.tools.synth import write_model

    info = write_model(tmp_path / "model", "bf16", layers=2, experts=4, hidden=256, intermediate=256, mtp=False)
    script = tmp_path / "stage.sh"
    script.write_text(
        "export KTNUMA_REGISTRY_DIR=$TMPDIR/ktnuma-registry\n"
        "for split in tp ep; do\n"
        f"  python3 -m ktnuma.launch {info.path} --nodes 2 --no-simulate --split $split --detach --quiet"
        " --manifest $TMPDIR/$split.json > /dev/null || exit $?\n"
        "  python3 -c 'import json, sys; print(json.dumps(json.load(open(sys.argv[1]))))' $TMPDIR/$split.json\n"
        "  python3 -m ktnuma.release --quiet $TMPDIR/$split.json || exit $?\n"
        "done\n"
        "ls /dev/shm | grep -c ktnuma || true\n")
    r = numa_vm("sh", str(script), timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    manifests = [json.loads(x) for x in lines[:2]]
    assert lines[2] == "0", "release left segments in the VM's /dev/shm"
    for m in manifests:
        assert m["topology"]["simulated"] is False
        assert [n["id"] for n in m["topology"]["nodes"]] == [0, 1]
        assert len(m["segments"]) == 4
        for s in m["segments"]:
            pages = -(-s["size"] // 4096)
            assert s["placement"] == {str(s["node"]): pages}, (m["split"], s)
        print(m["split"], [(s["name"].split(".", 2)[2], s["placement"]) for s in m["segments"]])
