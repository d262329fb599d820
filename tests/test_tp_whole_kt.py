"""kt-kernel's native methods on a `--split tp-whole` run, through the real, unmodified
`kt_kernel.KTMoEWrapper` in a spawn child (the machinery of test_ktwrapper.py): a resident tp-whole run
at threadpool_count 2 gives forward output bit-identical to the stock load; a sliced tp run is refused
naming tp-whole (or ep); a handoff over several parts stages tp-whole."""
from __future__ import annotations

import json

import pytest

from test_ktwrapper import _model, _refused, _same, child, detached, hook_site  # noqa: F401 - fixtures

pytestmark = pytest.mark.procs  # a fresh spawn child per case


@pytest.mark.parametrize("method", ["BF16", "FP8", "GPTQ_INT4"])
def test_resident_tp_whole_at_two_parts_is_bit_identical_to_stock(child, detached, synth_model, method):
    info = _model(synth_model, method, 2)
    stock = child(method, info.path, info, 2)
    assert stock["exitcode"] == 0, stock["stderr"][-1500:]
    man = detached(info.path, "tp-whole", 2)
    with open(man) as f:
        m = json.load(f)
    assert m["split"] == "tp-whole" and all(s["policy"] for s in m["segments"])
    if method != "GPTQ_INT4":  # GPTQ's parts here are sub-page (all interleaved); the others bind rows
        assert any(r[2] == "bind" for s in m["segments"] for r in s["policy"])
    res = child(method, info.path, info, 2, KTNUMA_MANIFEST=man)
    assert res["exitcode"] == 0, res["error"] or res["stderr"][-1500:]
    _same(stock["out"], res["out"])


def test_sliced_tp_is_refused_naming_tp_whole_and_handoff_stages_tp_whole(child, detached, synth_model):
    from ktnuma.integrations.kt_kernel.methods import METHODS, handoff_split, split_refusal

    info = _model(synth_model, "BF16", 2)
    # first: shm_after counts every run's segments; the workers' debug log shows the ranges they mbind
    ho = child("BF16", info.path, info, 2, KTNUMA_STAGE="1", KTNUMA_LOG="DEBUG")
    assert ho["exitcode"] == 0, ho["error"] or ho["stderr"][-1500:]
    assert "-> interleave [" in ho["stderr"] and "-> bind [" in ho["stderr"], ho["stderr"][-1500:]
    stock = child("BF16", info.path, info, 2)
    _same(stock["out"], ho["out"])
    assert ho["shm_after"] == 0
    man_tp = detached(info.path, "tp", 2)
    _refused(child("BF16", info.path, info, 2, KTNUMA_MANIFEST=man_tp), "split=tp run over 2 nodes",
             "--split tp-whole", "--split ep")
    for name, m in METHODS.items():
        if m.wrapper == "native":
            assert handoff_split(m, 2) == "tp-whole" and handoff_split(m, 1) == "tp"
            assert split_refusal(m, "tp-whole", 2) is None and split_refusal(m, "ep", 2) is None
            assert split_refusal(m, "tp", 1) is None and "tp-whole" in split_refusal(m, "tp", 2)
        else:
            assert handoff_split(m, 2) != "tp-whole" and split_refusal(m, "tp-whole", 2) is not None, name
