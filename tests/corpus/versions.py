"""Writer versions and the cache directory they key."""
from __future__ import annotations

import hashlib
import os
from importlib import metadata
from pathlib import Path

WRITERS = ("transformers", "compressed-tensors", "llmcompressor", "gguf", "torch")
# Bump when the generator's specs change (invalidates every cached model).
GENERATOR_REV = "3"


def version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def llama_cpp_dir() -> Path | None:
    """vendor/llama.cpp of the unpacked llama-cpp-python sdist (scripts/install-writers puts it there)."""
    root = Path(os.environ.get("KTNUMA_LLAMA_CPP", Path.home() / ".cache" / "ktnuma-writers" / "llama.cpp"))
    return root if (root / "convert_hf_to_gguf.py").is_file() else None


def llama_cpp_version() -> str | None:
    d = llama_cpp_dir()
    if d is None:
        return None
    f = d / "VERSION"
    return f.read_text().strip() if f.is_file() else "unknown"


def versions() -> dict[str, str | None]:
    v = {w: version(w) for w in WRITERS}
    v["llama-cpp-python"] = llama_cpp_version()
    return v


def cache_root() -> Path:
    base = Path(os.environ.get("KTNUMA_CORPUS_CACHE", Path.home() / ".cache" / "ktnuma-corpus"))
    v = versions()
    key = ",".join(f"{k}={v[k]}" for k in sorted(v)) + f",rev={GENERATOR_REV}"
    return base / hashlib.sha256(key.encode()).hexdigest()[:16]
