"""Build hooks: the worker's C packer (optional), and `ktnuma-kt-kernel.pth` at the root of
site-packages, for regular and editable (`pip install -e .`) installs alike. Its one line is inert
unless KTNUMA_MANIFEST or KTNUMA_STAGE is set in the environment (docs/kt-kernel.md)."""
from __future__ import annotations

import os
from typing import Any

from setuptools import Extension, setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = "ktnuma-kt-kernel.pth"
SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ktnuma", "integrations", "kt_kernel", PTH)


class build_py_with_pth(build_py):
    """Regular wheels: the .pth next to the packages."""

    def run(self) -> None:
        super().run()
        self.copy_file(SRC, os.path.join(self.build_lib, PTH), preserve_mode=0)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), os.path.join(self.build_lib, PTH)]


class _StrategyWithPth:
    """Editable wheels: whatever strategy setuptools picks, plus the .pth."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __enter__(self) -> "_StrategyWithPth":
        self.inner.__enter__()
        return self

    def __exit__(self, *exc: Any) -> Any:
        return self.inner.__exit__(*exc)

    def __call__(self, wheel: Any, files: list[str], mapping: Any) -> None:
        self.inner(wheel, files, mapping)
        with open(SRC, "rb") as f:
            wheel.writestr(PTH, f.read())


class editable_wheel_with_pth(editable_wheel):
    def _select_strategy(self, *args: Any, **kwargs: Any) -> Any:
        return _StrategyWithPth(super()._select_strategy(*args, **kwargs))


# The worker's strided-row packer (ktnuma/_pack.c). Optional: without a C compiler the install still
# succeeds and workers pack with numpy instead (slower start: each worker imports numpy).
PACK = Extension("ktnuma._pack", ["ktnuma/_pack.c"], optional=True, extra_compile_args=["-O2"])

setup(cmdclass={"build_py": build_py_with_pth, "editable_wheel": editable_wheel_with_pth}, ext_modules=[PACK])
