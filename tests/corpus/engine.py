"""kt-kernel on a staged layer vs kt-kernel on the writer's own tensors (read by tests/corpus/oracle)."""
from __future__ import annotations

import itertools

import numpy as np

from tests.corpus import oracle

PROJS = ("gate", "up", "down")
_ids = itertools.count(1)


def writer_arrays(src, spec, layer: int) -> dict:
    """{(proj, kind): stacked [E, ...] numpy array} as kt-kernel takes it (fp8 block scales f32, as
    kt-kernel's wrapper converts them), from the checkpoint as the writer wrote it."""
    out = {}
    for proj in PROJS:
        for kind in spec.kinds:
            pieces = [src.piece(layer, e, proj, kind) for e in range(spec.num_experts)]
            a = np.stack(pieces)
            if spec.backend == "fp8" and kind == "scale" and a.dtype == np.uint16:
                a = oracle.bf16_to_f32(a)
            if isinstance(src, oracle.GGUFSource):
                a = a.reshape(spec.num_experts, -1)
            out[(proj, kind)] = np.ascontiguousarray(a)
    return out


def compare(view, src, cpu, tokens: int = 12, seed: int = 0) -> tuple[str, float]:
    """Forward the same tokens through the staged engines and one engine built from the writer's
    tensors. ep: bit-identical (returns ("bit-identical", 0)); tp: the parts' sum within tolerance."""
    import torch

    from ktnuma.integrations import kt_kernel as K
    from ktnuma.tools import reference as R

    staged = K.engines_for_layer(view, cpu)
    spec = staged.spec
    mine = K.build_moe(cpu, spec, writer_arrays(src, spec, view.layer), mode="flat",
                       layer_idx=900_000 + next(_ids) * 64)
    x, ids, w = K.random_tokens(spec, tokens, seed)
    want = K.forward(mine, cpu, x, ids, w)
    assert torch.isfinite(want.float()).all() and want.float().abs().sum() > 0
    parts = staged.forward_parts(cpu, x, ids, w)
    if view.split == "ep":
        assert len(parts) == 1
        assert parts[0].view(torch.int16).equal(want.view(torch.int16)), \
            f"layer {view.layer}: staged ep engine not bit-identical to the writer's tensors"
        return "bit-identical", 0.0
    total = sum(p.float() for p in parts)
    err = R.rel_l1(total, want.float())
    assert err < spec.tolerance, f"layer {view.layer}: tp parts vs writer's tensors rel L1 {err:.4f}"
    return "tp-sum", err
