"""llama.cpp's convert_hf_to_gguf.py (vendor/llama.cpp of the llama-cpp-python sdist): bf16 and q8_0
GGUFs of three transformers models (H 256, I 512: sizes llamafile runs), through tests/corpus/gguf_driver.py (vocabulary "none")."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.corpus import versions

SOURCES = ("qwen3_moe", "mixtral", "deepseek_v2")
OUTTYPES = ("bf16", "q8_0")
DRIVER = Path(__file__).with_name("gguf_driver.py")


def convert(src: str, outtype: str, out: Path) -> dict:
    from tests.corpus import build

    lc = versions.llama_cpp_dir()
    if lc is None:
        raise RuntimeError("llama.cpp converter not installed (run scripts/install-writers)")
    sdir = build.ensure(f"{src}-h256")
    f = out / f"{src}-{outtype}.gguf"
    p = subprocess.run([sys.executable, str(DRIVER), str(lc), str(sdir), "--outtype", outtype,
                        "--outfile", str(f)], capture_output=True, text=True, timeout=600)
    if p.returncode:
        raise RuntimeError(f"convert_hf_to_gguf.py {src} --outtype {outtype} failed: "
                           + (p.stderr.strip().splitlines() or ["?"])[-1])
    rec = build.record(sdir)
    return {"writer": "llama.cpp convert_hf_to_gguf.py", "writer_version": versions.llama_cpp_version(),
            "class": rec["class"], "model_type": rec["model_type"], "format": f"gguf {outtype}",
            "source": f"{src}-h256", "file": f.name, "expected": rec["expected"]}


def entries() -> list:
    from tests.corpus.build import Entry

    from tests.corpus import hf

    out = [Entry(f"{src}-h256", "transformers", lambda d, s=src: hf.write(hf.sized(s, "h256"), d)) for src in SOURCES]
    out += [Entry(f"gguf-{src}-{t}", "llama.cpp", lambda d, s=src, t=t: convert(s, t, d), (f"{src}-h256",))
            for src in SOURCES for t in OUTTYPES]
    return out
