"""Multi-host staging under torchrun: real ranks (gloo on loopback), real segments, real kills.

Two "hosts" are two torchrun ranks on this machine, each with its own simulated topology, run id
and manifest. The union of what they staged is compared byte for byte with the source file.
"""
from __future__ import annotations

import json
import os
import re
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import SESSION_TAG
from ktnuma.stage import distributed as D
from ktnuma.errors import BadInput

REPO = Path(__file__).resolve().parent.parent
TOPO = REPO / "configs" / "topologies"
SHM = "/dev/shm"
NAME = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")


# ---------------------------------------------------------------- pure parts

def test_host_blocks_remainder_to_lowest_ranks():
    assert D.host_blocks(0, 8, 3) == [(0, 3), (3, 6), (6, 8)]
    assert D.host_blocks(0, 8, 1) == [(0, 8)]
    with pytest.raises(BadInput, match="3 ranks but only 2 experts"):
        D.host_blocks(0, 2, 3)


def test_host_map_forms_and_refusals():
    assert D.parse_host_map([[0, 3], [3, 5]], 2, 0, 8) == [(0, 3), (3, 8)]
    assert D.parse_host_map({"1": [0, 2], "0": {"experts": [2, 3, 4, 5, 6, 7]}}, 2, 0, 8) == [(2, 8), (0, 2)]
    bad = {
        "not contiguous": [{"experts": [0, 1, 3]}, [3, 5]],
        "experts \\[3, 4\\) are on no host": [[0, 3], [4, 4]],
        "also on another host": [[0, 4], [3, 5]],
        "2 entries, world size is 3": [[0, 4], [4, 4]],
        "outside the model": [[0, 4], [4, 5]],
        "holds no expert": [[0, 8], [8, 0]],
        "expected \\[first, count\\]": [[0, 4], "4-8"],
        "ranks \\[0, 2\\] given": {"0": [0, 4], "2": [4, 4]},
    }
    for why, data in bad.items():
        world = 3 if "world size is 3" in why else 2
        with pytest.raises(BadInput, match=why):
            D.parse_host_map(data, world, 0, 8)


def test_host_map_file_errors_name_the_file(tmp_path):
    p = tmp_path / "map.json"
    p.write_text("[[0, 4], [4,")
    with pytest.raises(BadInput, match=f"host_experts={p}: not readable JSON"):
        D.load_host_map(str(p), 2, 0, 8)
    with pytest.raises(BadInput, match="no such file"):
        D.load_host_map(str(tmp_path / "nope.json"), 2, 0, 8)


@pytest.mark.parametrize("split,nodes", [("tp", 2), ("ep", 4), ("ep", 2)])
def test_restricted_plans_tile_the_model(synth_model, split, nodes):
    """Each rank's plan is valid for its restricted index; together they hold every piece once."""
    from ktnuma.index.experts import index_model
    from ktnuma.plan.planner import manifest_arrays, plan, validate

    info = synth_model("fp8")
    index = index_model(info.path)
    held: dict[tuple, int] = {}
    for first, stop in D.parse_host_map([[0, 5], [5, 3]], 2, 0, 8):
        sub = D.restrict_experts(index, first, stop)
        assert sub.config == index.config and all(g.first == first and g.count == stop - first
                                                 for g in sub.groups)
        p = plan(sub, list(range(nodes)), split)
        validate(p, sub)
        for a in manifest_arrays(p, "x"):
            for e in range(a["experts"][0], sum(a["experts"])):
                assert first <= e < stop
                key = (a["layer"], e, a["proj"], a["kind"])
                held[key] = held.get(key, 0) + (a["nbytes"] if split == "ep" or a["slice"] else 0)
    want = {(g.layer, e, g.proj, g.kind) for g in index.groups for e in range(8)}
    assert set(held) == want
    if split == "ep":  # whole pieces, once each
        sizes = {(g.layer, g.proj, g.kind): g.nbytes * (g.conversion is None) for g in index.groups}
        for (lyr, _, proj, kind), n in held.items():
            if sizes[(lyr, proj, kind)]:
                assert n == sizes[(lyr, proj, kind)]
    with pytest.raises(BadInput, match="outside"):
        D.restrict_experts(index, 6, 9)


def test_detection(monkeypatch):
    env = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    assert D.in_torchrun(env)
    assert not D.in_torchrun({**env, D.MODE_ENV: "0"})
    assert not D.in_torchrun({"RANK": "0"})
    # a process started by a torchrun rank (an engine) inherits the variables: not a rank itself
    assert not D.in_torchrun({**env, "TORCHELASTIC_RUN_ID": "x"})
    assert D.in_torchrun({**env, "TORCHELASTIC_RUN_ID": "x", D.MODE_ENV: "1"})
    with pytest.raises(BadInput, match="MASTER_PORT"):
        D.in_torchrun({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", D.MODE_ENV: "1"})


def test_single_host_path_never_imports_torch():
    code = ("import sys, os\n"
            "for k in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT'): os.environ.pop(k, None)\n"
            "from ktnuma import launch\nfrom ktnuma.stage import distributed\n"
            "assert distributed.wrap(launch.main, launch.parse_args) is launch.main\n"
            "assert distributed.restrict('idx') == 'idx'\n"
            "distributed.ready('m', 'r')\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------- real ranks

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(torch_args: list[str], launch_args: list[str], env: dict | None = None,
             cwd: Path | None = None) -> subprocess.Popen:
    e = dict(os.environ)
    e.update({"GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"})
    e.update(env or {})
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *torch_args, "-m", "ktnuma.launch",
                             *launch_args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e,
                            cwd=cwd)


def two_hosts(port: int, per_rank: list[list[str]], env: dict | None = None,
              timeout: float = 60) -> list[tuple[int, str, str, float]]:
    """Two `--nnodes 2 --node-rank r` invocations (static rendezvous on 127.0.0.1), as on two hosts."""
    t0 = time.monotonic()
    procs = [torchrun(["--nnodes", "2", "--node-rank", str(r), "--nproc-per-node", "1",
                       "--master-addr", "127.0.0.1", "--master-port", str(port)], args, env)
             for r, args in enumerate(per_rank)]
    out = []
    try:
        for p in procs:
            so, se = p.communicate(timeout=timeout)
            out.append((p.returncode, so, se, time.monotonic() - t0))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return out


def our_segments() -> set[str]:
    return {n for n in os.listdir(SHM) if n.startswith(f"ktnuma.{SESSION_TAG}")}


def source_pieces(files) -> dict[tuple[int, int, str], np.ndarray]:
    """(layer, expert, proj) -> the bf16 piece as uint16 [rows, cols], read via the raw safetensors header."""
    out = {}
    for path in files:
        data = Path(path).read_bytes()
        n = struct.unpack("<Q", data[:8])[0]
        header = json.loads(data[8:8 + n])
        for name, t in header.items():
            m = NAME.search(name)
            if not m:
                continue
            assert t["dtype"] == "BF16"
            s, e = t["data_offsets"]
            out[(int(m[1]), int(m[2]), m[3])] = np.frombuffer(data[8 + n + s:8 + n + e], "<u2").reshape(t["shape"])
    return out


def staged_pieces(manifest: dict) -> dict[tuple[int, int, str], list[tuple[int | None, int, np.ndarray]]]:
    """(layer, expert, proj) -> [(slice dim, start, bytes as uint16 [rows, cols])] from the live segments."""
    out: dict = {}
    for a in manifest["arrays"]:
        assert a["kind"] == "weight" and a["dtype"] == "bf16" and a["stride"] == a["nbytes"]
        seg = Path(manifest["shm_dir"], a["segment"]).read_bytes()
        first, count = a["experts"]
        for e in range(first, first + count):
            start = a["offset"] + (e - first) * a["stride"]
            arr = np.frombuffer(seg[start:start + a["nbytes"]], "<u2").reshape(a["shape"])
            sl = a["slice"]
            out.setdefault((a["layer"], e, a["proj"]), []).append(
                (None, 0, arr) if sl is None else (sl["dim"], sl["start"], arr))
    return out


@pytest.mark.torchrun
def test_two_hosts_stage_disjoint_shares_byte_exact(synth_model, run_registry, tmp_path):
    info = synth_model("bf16")
    hmap = tmp_path / "hosts.json"
    hmap.write_text(json.dumps([[0, 3], {"experts": [3, 4, 5, 6, 7]}]))
    man = [tmp_path / "r0" / "m.json", tmp_path / "r1" / "m.json"]
    for m in man:
        m.parent.mkdir()
    common = ["--detach", "--json", "--quiet", "--dist-timeout", "20", "--host-experts", str(hmap), info.path]
    per_rank = [["--topology", str(TOPO / "two-node.toml"), "--split", "tp", "--manifest", str(man[0]), *common],
                ["--topology", str(TOPO / "four-node.toml"), "--split", "ep", "--manifest", str(man[1]), *common]]
    res = two_hosts(free_port(), per_rank)
    try:
        for r, (rc, so, se, _) in enumerate(res):
            assert rc == 0, f"rank {r}: {se}"
            assert so.strip().splitlines()[-1] == f"ready {man[r]}"
        ms = [json.loads(m.read_text()) for m in man]
        assert ms[0]["run_id"] != ms[1]["run_id"]
        assert len(ms[0]["topology"]["nodes"]) == 2 and len(ms[1]["topology"]["nodes"]) == 4
        glob = json.loads((tmp_path / "r0" / "m.global.json").read_text())
        assert not (tmp_path / "r1" / "m.global.json").exists()
        host = socket.gethostname()
        assert glob["world_size"] == 2 and glob["num_experts"] == 8 and glob["format"] == "bf16"
        assert glob["ranks"] == [
            {"rank": 0, "host": host, "manifest": str(man[0]), "run_id": ms[0]["run_id"], "experts": [0, 3]},
            {"rank": 1, "host": host, "manifest": str(man[1]), "run_id": ms[1]["run_id"], "experts": [3, 5]}]
        for m, (lo, hi) in zip(ms, [(0, 3), (3, 8)]):
            assert {e for a in m["arrays"] for e in range(a["experts"][0], sum(a["experts"]))} == set(range(lo, hi))
            assert m["config"]["num_experts"] == 8
        src = {k: v for k, v in source_pieces(info.files).items() if k[0] in info.moe_layers}  # no MTP
        assert len(src) == 8 * 3 * len(info.moe_layers)
        staged: dict = {}
        for r, m in enumerate(ms):
            for key, parts in staged_pieces(m).items():
                assert key not in staged, f"{key} staged by rank {staged.get(key, (None,))[0]} and rank {r}"
                staged[key] = (r, parts)
        assert set(staged) == set(src)
        for key, (r, parts) in staged.items():
            want = src[key]
            if parts[0][0] is None:  # ep: one whole piece
                assert len(parts) == 1 and parts[0][2].tobytes() == want.tobytes(), key
                continue
            dim = parts[0][0]  # tp: slices along I tile the piece exactly once
            parts.sort(key=lambda p: p[1])
            pos = 0
            for d, start, arr in parts:
                assert d == dim and start == pos, (key, [(p[0], p[1]) for p in parts])
                pos += arr.shape[dim]
            assert pos == want.shape[dim]
            assert np.concatenate([p[2] for p in parts], axis=dim).tobytes() == want.tobytes(), key
        # releasing rank 0's manifest takes the global index with it; rank 1's release leaves it alone
        subprocess.run([sys.executable, "-m", "ktnuma.release", str(man[1])], check=True, capture_output=True, timeout=60)
        assert (tmp_path / "r0" / "m.global.json").exists()
        subprocess.run([sys.executable, "-m", "ktnuma.release", str(man[0])], check=True, capture_output=True, timeout=60)
        assert not (tmp_path / "r0" / "m.global.json").exists()
    finally:
        for m in man:
            if m.exists():
                subprocess.run([sys.executable, "-m", "ktnuma.release", str(m)], capture_output=True, timeout=60)
        (tmp_path / "r0" / "m.global.json").unlink(missing_ok=True)
    assert our_segments() == set()


@pytest.mark.torchrun
def test_failing_rank_aborts_every_rank(synth_model, run_registry, tmp_path):
    """Rank 1 refuses its --manifest after the plan exchange; rank 0 has staged by then and must undo it."""
    info = synth_model("bf16")
    taken = tmp_path / "taken.json"
    taken.write_text("{}")
    before = our_segments()
    common = ["--topology", str(TOPO / "two-node.toml"), "--detach", "--quiet", "--dist-timeout", "20", info.path]
    res = two_hosts(free_port(), [["--manifest", str(tmp_path / "m0.json"), *common],
                                  ["--manifest", str(taken), *common]])
    (rc0, so0, se0, _), (rc1, so1, se1, _) = res
    assert rc1 != 0 and f"--manifest {taken}: exists" in se1
    assert rc0 != 0 and "ready" not in so0 + so1
    line = [x for x in se0.splitlines() if x.startswith("ktnuma launch: error:")]
    assert line and "rank 1 on" in line[0] and f"--manifest {taken}: exists" in line[0], se0
    assert not (tmp_path / "m0.json").exists() and not (tmp_path / "m0.global.json").exists()
    assert our_segments() == before
    assert sorted(os.listdir(run_registry)) == []


@pytest.mark.torchrun
def test_killed_rank_makes_every_rank_exit_within_timeout(synth_model, run_registry, tmp_path):
    """One torchrun, two ranks; rank 1 SIGKILLs itself after staging (test hook), before `ready`."""
    info = synth_model("bf16")
    before = our_segments()
    timeout = 10
    cwd = tmp_path / "cwd"  # default manifests ./ktnuma-<run_id>.json land here
    cwd.mkdir()
    p = torchrun(["--nnodes", "1", "--nproc-per-node", "2", "--master-port", str(free_port())],
                 ["--topology", str(TOPO / "two-node.toml"), "--split", "ep", "--detach", "--quiet",
                  "--dist-timeout", str(timeout), info.path], env={D.DIE_ENV: "1"}, cwd=cwd)
    try:
        so, se = p.communicate(timeout=90)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode != 0 and "ready" not in so
    # torchrun's failure report: one entry per rank with its exit code and the time it ended
    ends = {int(r): (int(code), time.mktime(time.strptime(t, "%Y-%m-%d_%H:%M:%S")))
            for t, r, code in re.findall(r"time\s*: (\S+)\s+host\s*: \S+\s+rank\s*: (\d).*?exitcode\s*: (-?\d+)",
                                         se, re.S)}
    assert set(ends) == {0, 1} and ends[1][0] == -9 and ends[0][0] not in (0, -9), se
    assert ends[0][1] - ends[1][1] <= timeout, ends  # rank 0 noticed within the timeout
    line = [x for x in se.splitlines() if x.startswith("ktnuma launch: error:")]
    assert line and "rank 1" in line[0] and "died" in line[0], se
    assert our_segments() == before  # rank 0 removed its run and the dead rank's
    assert os.listdir(run_registry) == [] and list(cwd.iterdir()) == []
