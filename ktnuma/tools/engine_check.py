"""Checks of kt-kernel engines against the torch reference (a development and verification tool: the
runtime never imports it). `self_check` runs one engine on random tokens, `check_layer` the engines
of a staged layer; both compare with `ktnuma.tools.reference`'s dequantized weights."""
from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from ktnuma.errors import BadInput
from ktnuma.index.model import PROJS
from ktnuma.integrations.kt_kernel.backends import EngineSpec
from ktnuma.integrations.kt_kernel.engine import LoadedMoE, forward
from ktnuma.integrations.kt_kernel.layers import LayerEngines, random_tokens
from ktnuma.tools import reference as R

log = logging.getLogger(__name__)


def _dequantized(spec: EngineSpec, arrays: Mapping[tuple[str, str], Any], used: Sequence[int]) -> dict[str, dict[int, Any]]:
    """Torch reference weights {proj: {expert: W[N, K] float32}} of the experts `used`, from an engine's arrays."""
    deq: dict[str, dict[int, Any]] = {p: {} for p in PROJS}
    for proj in PROJS:
        n, k = spec._nk(proj)
        wt, sc = arrays[(proj, "weight")], arrays.get((proj, "scale"))
        for e in used:
            deq[proj][e] = R.dequantize(spec.format, wt[e], None if sc is None else sc[e], n=n, k=k,
                                        group_size=spec.group_size)
    return deq


def self_check(
    moe: LoadedMoE,
    cpuinfer: Any,
    arrays: Mapping[tuple[str, str], Any],
    *,
    tokens: int = 12,
    seed: int = 0,
) -> float:
    """Run `moe` on random tokens and compare with the torch reference computed from `arrays`
    (the stacked [E, ...] arrays it was built from, e.g. staged views). Returns the relative L1
    error; raises BadInput when it exceeds the backend's tolerance. Imports torch (engine side)."""
    import numpy as np
    import torch

    spec = moe.spec
    rng = np.random.default_rng(seed)
    q = min(int(tokens), spec.max_len)
    x = torch.from_numpy(rng.standard_normal((q, spec.hidden), dtype=np.float32)).to(torch.bfloat16)
    ids = np.stack([rng.permutation(spec.num_experts)[: spec.experts_per_tok] for _ in range(q)]).astype(np.int64)
    w = rng.random((q, spec.experts_per_tok), dtype=np.float32)
    out = forward(moe, cpuinfer, x, ids, w)
    used = sorted(set(ids.ravel().tolist()))
    deq = _dequantized(spec, arrays, used)
    ref = R.moe_forward(x, ids, w, deq["gate"], deq["up"], deq["down"])
    err = R.rel_l1(out, ref)
    log.info("self-check %s layer_idx=%d: rel L1 %.4f", spec.engine_class, moe.layer_idx, err)
    if not err < spec.tolerance:
        raise BadInput(
            f"kt-kernel {spec.engine_class} ({spec.format}) disagrees with the torch reference: "
            f"relative L1 {err:.4f} >= {spec.tolerance}"
        )
    return err


def layer_reference(engines: LayerEngines, x: Any, ids: Any, weights: Any) -> Any:
    """Torch reference of the layer (float32 [q, H]): the sum over parts of the MoE of each part's
    dequantized weights (tp: the node slices; ep: all experts)."""
    import numpy as np

    ids_np = np.asarray(ids.cpu() if hasattr(ids, "cpu") else ids)
    used = sorted(set(ids_np.ravel().tolist()))
    total = None
    for moe, src in zip(engines.parts, engines.sources):
        deq = _dequantized(moe.spec, src, used)
        ref = R.moe_forward(x, ids, weights, deq["gate"], deq["up"], deq["down"]).float()
        total = ref if total is None else total + ref
    return total


def check_layer(engines: LayerEngines, cpuinfer: Any, *, tokens: int = 12, seed: int = 0) -> tuple[float, float]:
    """Forward random tokens through the layer's engines and compare with the torch reference.
    Returns (relative L1, forward seconds); raises BadInput above the backend's tolerance."""
    x, ids, w = random_tokens(engines.spec, tokens, seed)
    t0 = time.perf_counter()
    out = engines.forward(cpuinfer, x, ids, w)
    dt = time.perf_counter() - t0
    err = R.rel_l1(out, layer_reference(engines, x, ids, w))
    tol = engines.spec.tolerance
    if not err < tol:
        raise BadInput(f"kt-kernel {engines.spec.engine_class} ({engines.spec.format}) layer {engines.layer}: "
                       f"relative L1 {err:.4f} vs the torch reference >= {tol}")
    return err, dt
