"""The drop-in: make an unmodified `kt_kernel.KTMoEWrapper` take its experts from ktnuma.

The `ktnuma-kt-kernel.pth` file that `pip install` puts into site-packages runs, in every Python process
(multiprocessing `spawn` children included)::

    import os; (os.environ.get("KTNUMA_MANIFEST") or os.environ.get("KTNUMA_STAGE")) and <install()>

so with neither variable set nothing is imported. `install()` adds one import hook: when kt-kernel's own
modules finish executing it swaps in ktnuma's loaders (no kt-kernel or SGLang file changes):

| kt-kernel attribute                               | becomes                                            |
|---------------------------------------------------|----------------------------------------------------|
| `_MoEBase._get_cpu_infer`                         | the same, recording threadpool_count / numa_nodes  |
| `utils.amx.NativeMoEWrapper._create_loader`       | `loaders.NativeLoader` (session started eagerly)   |
| `utils.amx.SafeTensorLoader` (AMXMoEWrapper only) | `loaders.AmxLoader`                                |
| `utils.llamafile.GGUFLoader`                      | `loaders.GgufLoader`                               |
The stock objects stay reachable as `_ktnuma_stock` on each patched owner. Imports nothing heavy.
"""
from __future__ import annotations

import functools
import sys
import time
from typing import Any

_T0 = time.perf_counter()
SECONDS = 0.0  # this process's time in the hook: this module's import + install() + the patches (bench)

HOOKED = ("kt_kernel.experts_base", "kt_kernel.utils.amx", "kt_kernel.utils.llamafile")


def _pool() -> Any:
    from ktnuma.errors import BadInput
    from ktnuma.integrations.kt_kernel import sessions

    if sessions.POOL is None:
        raise BadInput("ktnuma: kt-kernel built its CPUInfer pool before ktnuma was activated; set "
                       f"{sessions.MANIFEST_ENV} or {sessions.STAGE_ENV} before the process imports kt_kernel")
    return sessions.POOL


@functools.lru_cache(maxsize=None)
def _cpu_has_amx() -> bool:
    from ktnuma.integrations.kt_kernel import methods

    return methods.cpu_has_amx()


@functools.lru_cache(maxsize=None)
def _in_place(method_name: str, threadpool_count: int) -> bool:
    """Whether the engine kt-kernel picks for (method, pool) reads the weights in place (asked once)."""
    from ktnuma.integrations.kt_kernel import methods

    return methods.method(method_name).in_place(threadpool_count, sys.modules["kt_kernel.utils.amx"])


def _session_fn(method_name: str, weight_path: str) -> Any:
    """A function returning the process's session for (method, weight_path), creating it on first call.
    kt-kernel asks for a loader about twice per layer: what does not change within the process (the
    CPU's AMX, the engine kt-kernel picks) is looked up once."""
    import os

    from ktnuma.integrations.kt_kernel import methods, sessions

    m = methods.method(method_name)
    methods.check_cpu(m, os.environ, _cpu_has_amx())
    path = os.fspath(weight_path)

    def get() -> Any:
        pool = _pool()
        return sessions.session(m, pool, path, in_place=_in_place(m.name, pool.threadpool_count))

    return get


def _patch_base(mod: Any) -> None:
    from ktnuma.integrations.kt_kernel import sessions

    base = mod._MoEBase
    stock = base._get_cpu_infer.__func__

    def _get_cpu_infer(cls: Any, cpuinfer_threads: int, threadpool_count: int, numa_nodes: Any = None) -> Any:
        if cls._cpu_infer_instance is None:
            nodes = tuple(int(n) for n in numa_nodes) if numa_nodes is not None else tuple(range(threadpool_count))
            sessions.POOL = sessions.Pool(int(threadpool_count), nodes)
        return stock(cls, cpuinfer_threads, threadpool_count, numa_nodes=numa_nodes)

    base._ktnuma_stock = base._get_cpu_infer
    base._get_cpu_infer = classmethod(_get_cpu_infer)


def _patch_amx(mod: Any) -> None:
    from ktnuma.integrations.kt_kernel.loaders import AmxLoader, NativeLoader

    native = mod.NativeMoEWrapper

    def _create_loader(method: str, weight_path: str) -> Any:
        get = _session_fn(method, weight_path)
        get()  # start (or check) the session now: a handoff begins staging with the first wrapper
        return NativeLoader(get)

    native._ktnuma_stock = native._create_loader
    native._create_loader = staticmethod(_create_loader)

    def safetensor_loader(weight_path: str) -> Any:
        caller = sys._getframe(1).f_locals  # AMXMoEWrapper.__init__: its `method` argument
        return AmxLoader(_session_fn(str(caller.get("method", "AMXINT4")), weight_path))

    mod._ktnuma_stock = mod.SafeTensorLoader
    mod.SafeTensorLoader = safetensor_loader


def _patch_llamafile(mod: Any) -> None:
    from ktnuma.integrations.kt_kernel.loaders import GgufLoader

    def gguf_loader(weight_path: str) -> Any:
        return GgufLoader(_session_fn("LLAMAFILE", weight_path))

    mod._ktnuma_stock = mod.GGUFLoader
    mod.GGUFLoader = gguf_loader


def _patched(patch: Any) -> Any:
    def run(mod: Any) -> None:
        global SECONDS
        t = time.perf_counter()
        patch(mod)
        mod._ktnuma_patched = True
        SECONDS += time.perf_counter() - t

    return run


PATCHES = {"kt_kernel.experts_base": _patch_base, "kt_kernel.utils.amx": _patch_amx,
           "kt_kernel.utils.llamafile": _patch_llamafile}


class _Finder:
    """Meta-path finder: lets the normal finders load the hooked modules, then patches them."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name not in PATCHES:
            return None
        from importlib.machinery import PathFinder

        spec = PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        stock_exec = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            stock_exec(module)
            _patched(PATCHES[name])(module)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def install() -> None:
    """Patch kt-kernel now if it is imported, else when it is (idempotent)."""
    global SECONDS
    if any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    for name, patch in PATCHES.items():
        mod = sys.modules.get(name)
        if mod is not None and not getattr(mod, "_ktnuma_patched", False):
            _patched(patch)(mod)
    sys.meta_path.insert(0, _Finder())
    SECONDS += time.perf_counter() - _T0
