"""An SGLang-like kt-kernel consumer for tests/test_ktwrapper.py and the ktwrapper bench cases (dev tool).

    python -m ktnuma.tools.ktwrapper_child SPEC.json RESULT.npz

starts a multiprocessing `spawn` child (as SGLang starts its scheduler) that builds one unmodified
`kt_kernel.KTMoEWrapper` per MoE layer (ascending), then calls `load_weights` on each in order, then
`forward` on fixed tokens, and saves every layer's output bits, the times (import_s: `import kt_kernel`,
which runs the .pth hook's patches; build_s: every wrapper built; weights_s: every load_weights; load_s =
build_s + weights_s; total_s = all three) and the peak of
(anonymous RSS + the session's ktnuma segments in /dev/shm) sampled during the load. The parent prints one
JSON line: {"exitcode": ..., "error": one line or null}. ktnuma is active in the child only through the
environment (KTNUMA_MANIFEST / KTNUMA_STAGE) and the installed .pth hook; this module imports nothing of
ktnuma's runtime.

Tests/bench-only shim: CPU-only torch refuses `pin_memory=True`, which KTMoEWrapper asks for; the child drops
that argument from torch.zeros/empty/full (the product never does this).
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
import threading
import time


PTH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "integrations", "kt_kernel",
                   "ktnuma-kt-kernel.pth")


def make_hook_site(d: str) -> str:
    """Where ktnuma is not pip-installed (this dev tree): a directory to put first on PYTHONPATH whose
    sitecustomize adds a site dir holding the package's .pth, so child processes run its line exactly as
    site-packages would. Returns the directory."""
    import shutil

    site_dir = os.path.join(d, "site")
    os.makedirs(site_dir, exist_ok=True)
    shutil.copy(PTH, os.path.join(site_dir, os.path.basename(PTH)))
    with open(os.path.join(d, "sitecustomize.py"), "w") as f:
        f.write(f"import site\nsite.addsitedir({site_dir!r})\n")
    return d


def _shim_pin_memory(torch) -> None:
    for name in ("zeros", "empty", "full"):
        stock = getattr(torch, name)

        def unpinned(*a, _stock=stock, **kw):
            kw.pop("pin_memory", None)
            return _stock(*a, **kw)

        setattr(torch, name, unpinned)


def _anon_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def _shm_bytes(prefix: str) -> int:
    total = 0
    for n in os.listdir("/dev/shm"):
        if n.startswith(prefix):
            try:
                total += os.stat(os.path.join("/dev/shm", n)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


def cached_bytes(paths: list[str]) -> int:
    """Bytes of `paths` resident in the page cache (mincore over a mapping that touches nothing)."""
    import ctypes
    import mmap

    import numpy as np

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
    total = 0
    for path in paths:
        size = os.path.getsize(path)
        if size == 0:
            continue
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ)
        try:
            pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
            vec = ctypes.create_string_buffer(pages)
            view = np.frombuffer(mm, dtype=np.uint8)
            addr = view.ctypes.data
            if libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore")
            total += int((np.frombuffer(vec.raw, dtype=np.uint8) & 1).sum()) * mmap.PAGESIZE
            del view
        finally:
            mm.close()
    return total


class _Peak(threading.Thread):
    """Peak of (anonymous RSS + this session's ktnuma segments + the model files' page cache)."""

    def __init__(self, prefix: str, files: list[str]) -> None:
        super().__init__(daemon=True)
        self.prefix, self.files, self.peak, self.stop = prefix, files, 0, False

    def sample(self) -> None:
        self.peak = max(self.peak, _anon_rss() + _shm_bytes(self.prefix) + cached_bytes(self.files))

    def run(self) -> None:
        while not self.stop:
            self.sample()
            time.sleep(0.01)


def _hook_seconds() -> float:
    """The .pth hook's own time in this process (read off the module if the hook ran; nothing imported)."""
    act = sys.modules.get("ktnuma.integrations.kt_kernel.activate")
    return float(getattr(act, "SECONDS", 0.0))


def scheduler(spec: dict, out_path: str) -> None:
    import numpy as np
    import torch

    _shim_pin_memory(torch)
    prefix = "ktnuma." + os.environ.get("KTNUMA_RUN_ID_PREFIX", "")
    peak = _Peak(prefix, spec.get("model_files", []))
    peak.sample()
    base = peak.peak
    peak.start()
    if spec.get("log"):  # dev: a timeline of ktnuma's log records (ms since the interpreter started)
        import logging

        logging.basicConfig(level=getattr(logging, str(spec["log"]).upper()), stream=sys.stderr,
                            format="%(relativeCreated)7.0f ms %(threadName)s %(name)s: %(message)s")
    prof = None
    if spec.get("profile"):  # dev: cProfile of build + load_weights, dumped to spec["profile"]
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    t0 = time.perf_counter()
    try:
        from kt_kernel import KTMoEWrapper  # the .pth hook patches kt-kernel here (ktnuma's imports: in t_import)

        t_import = time.perf_counter()
        E, k, H, I = spec["experts"], spec["experts_per_tok"], spec["hidden"], spec["intermediate"]
        wrappers = [KTMoEWrapper(layer_idx=L, num_experts=E, num_experts_per_tok=k, hidden_size=H,
                                 moe_intermediate_size=I, gpu_experts_mask=None,
                                 cpuinfer_threads=spec.get("threads", 2), threadpool_count=spec["threadpool_count"],
                                 weight_path=spec["weight_path"], chunked_prefill_size=spec.get("max_len", 64),
                                 method=spec["method"])
                    for L in spec["layers"]]
        t_build = time.perf_counter()
        for w in wrappers:
            w.load_weights(torch.arange(E, dtype=torch.int64))
        t_load = time.perf_counter()
        if prof is not None:
            prof.disable()
            prof.dump_stats(spec["profile"])
        peak.sample()
        peak.stop = True
        shm_after = _shm_bytes(prefix)
        g = torch.Generator().manual_seed(spec.get("seed", 1))
        q = spec.get("tokens", 12)
        outs = {}
        if spec.get("forward", True):
            for L, w in zip(spec["layers"], wrappers):
                x = torch.randn(q, H, generator=g).to(torch.bfloat16)
                ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(q)]).to(torch.int64)
                wt = torch.rand(q, k, generator=g, dtype=torch.float32)
                outs[f"L{L}"] = w.forward(x, ids, wt, 0).clone().view(torch.int16).numpy()
        np.savez(out_path, **outs, meta=np.frombuffer(json.dumps({
            "import_s": t_import - t0, "hook_s": _hook_seconds(), "build_s": t_build - t_import, "weights_s": t_load - t_build,
            "load_s": t_load - t_import, "total_s": t_load - t0, "peak": peak.peak - base, "shm_after": shm_after,
            "rss_after": _anon_rss()}).encode(), dtype=np.uint8))
    except Exception as exc:  # the refusal under test: one line for the parent
        with open(out_path + ".err", "w") as f:
            f.write(f"{type(exc).__name__}: {exc}")
        raise SystemExit(2)


def main(argv: list[str]) -> int:
    spec = json.load(open(argv[0]))
    out = argv[1]
    if os.path.exists(out + ".err"):
        os.unlink(out + ".err")
    p = mp.get_context("spawn").Process(target=scheduler, args=(spec, out))
    p.start()
    p.join()
    err = open(out + ".err").read() if os.path.exists(out + ".err") else None
    print(json.dumps({"exitcode": p.exitcode, "error": err}))
    return 1 if "--strict" in argv[2:] and p.exitcode != 0 else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
