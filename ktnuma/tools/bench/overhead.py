"""Plan + spawn overhead for a DeepSeek-V3-sized model (no data): workers started while planning."""
from __future__ import annotations

import math
import time


def overhead(nodes: int = 8) -> dict:
    """Plan a DeepSeek-V3-sized model (58 x 256 experts, fp8 block, no data) for `nodes` nodes,
    spawn that many workers and wait for their ready handshake + send every job's bytes' size."""
    from ktnuma.plan.ops import layer_ops
    from ktnuma.stage import protocol
    from ktnuma.stage.procs import WorkerProc
    from ktnuma.index.model import ModelConfig, ModelIndex, PieceGroup, SourceFile
    from ktnuma.plan.planner import plan
    from ktnuma.host.topology import select
    import queue

    H, I, E, L = 7168, 2048, 256, 58
    files = tuple(SourceFile(f"/m/model-{i:05d}.safetensors", 4_400_000_000, 0) for i in range(163))
    groups, pos = [], 0
    for layer in range(3, 3 + L):
        for proj in ("gate", "up", "down"):
            for kind in ("weight", "scale"):
                w = kind == "weight"
                shape = ((I, H) if proj != "down" else (H, I)) if w else \
                    ((I // 128, H // 128) if proj != "down" else (H // 128, I // 128))
                idim = 0 if proj != "down" else 1
                nb = math.prod(shape) * (1 if w else 4)
                offs, fs = [], []
                for _ in range(E):
                    fs.append(pos // 4_300_000_000)
                    offs.append(pos % 4_300_000_000)
                    pos += nb
                groups.append(PieceGroup(layer, proj, kind, "f8_e4m3" if w else "f32", shape, nb, tuple(fs),
                                         tuple(offs), (f"model.layers.{layer}.mlp.experts.0.{proj}_proj.{kind}",),
                                         idim, 1 if w else 128, quantum_bytes=1 if w else 4,
                                         staged_dtype="f8_e4m3" if w else "f32"))
    idx = ModelIndex("/m", "fp8", "deepseek", files, ModelConfig(E, 8, H, I, tuple(range(3, 3 + L))), tuple(groups))
    topo = select(nodes, None, simulate=True)
    t0 = time.perf_counter()
    events: queue.Queue = queue.Queue()
    procs = [WorkerProc(n, 1, events, None, None) for n in topo.nodes]  # workers start while we plan
    t_spawned = time.perf_counter()
    p = plan(idx, topo, "tp")
    t1 = time.perf_counter()
    for pr in procs:
        pr.init(list(p.files), None)
    ready = 0
    while ready < len(procs):
        _, _, msg = events.get(timeout=30)
        ready += bool(msg and msg.get("op") == "ready")
    t2 = time.perf_counter()
    msgs = 0  # every layer's read ops planned and every job line encoded, as the coordinator does
    for layer in p.layers:
        for node, ops in layer_ops(p, layer).items():
            msgs += len(protocol.job(layer, node, 0, None, {n: "ktnuma.x.L0.n0" for n in p.nodes}, ops))
    t3 = time.perf_counter()
    for pr in procs:
        pr.stop()
    return {"spawn_s": t_spawned - t0, "plan_s": t1 - t_spawned, "ready_wait_s": t2 - t1,
            "encode_jobs_s": t3 - t2, "job_bytes": msgs, "total_s": t3 - t0, "segments": len(p.segments)}
