"""Engine integrations. Each one imports its engine lazily: ktnuma works without any of them."""
from __future__ import annotations

__all__ = ["kt_kernel"]
