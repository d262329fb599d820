"""ktnuma: stage MoE expert weights into node-local shared memory.

Importing the package is cheap: nothing heavy is imported until used.
"""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["attach", "stream", "__version__"]


def __getattr__(name: str) -> object:  # lazy engine-side entry points (no typing import: start-up time)
    if name == "attach":
        from ktnuma.engine.attachment import attach

        return attach
    if name == "stream":
        from ktnuma.engine.streaming import stream

        return stream
    raise AttributeError(name)
