"""The test's own reading of a corpus checkpoint (never ktnuma's readers): safetensors headers parsed
here, GGUF through gguf.GGUFReader. `Source.piece(layer, expert, proj, kind)` is one expert's 2-D piece
in the formats table's orientation (gate/up [I, H], down [H, I]; packed int4 along K as stored), as
numpy raw elements (bf16 -> uint16, e4m3 -> uint8); `expected(piece, record)` applies a manifest
record's slice and dtype conversion."""
from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ST_DTYPES = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32, "F8_E4M3": np.uint8, "I32": np.int32,
             "U8": np.uint8, "I8": np.int8, "I64": np.int64, "F8_E8M0": np.uint8}
PROJ_NAMES = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down", "w1": "gate", "w3": "up", "w2": "down"}
KIND_SUFFIX = {"weight": "weight", "weight_packed": "weight", "weight_scale": "scale", "weight_scale_inv": "scale"}
PER_EXPERT = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:.*\.)?experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)\."
                        r"(weight|weight_packed|weight_scale|weight_scale_inv)$")
# Stacked [E, ...] tensors: name tail -> role. "gu" = gate and up together, "d" = down.
STACKED = {"experts.gate_up_proj": "gu", "experts.down_proj": "d", "experts.w13_weight": "gu",
           "experts.w2_weight": "d", "input_linear.weight": "gu", "output_linear.weight": "d",
           "experts.fc1.weight": "gu", "experts.fc2.weight": "d"}
STACKED_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:.*\.)?(" + "|".join(re.escape(k) for k in STACKED) + r")$")
# model types whose stacked gate/up interleave gate and up (even/odd) along 2I: gpt-oss in memory
# and on disk; Inkling2's on-disk w13_weight (transformers' conversion_mapping: Interleave(dim=1)).
INTERLEAVED = {"gpt_oss", "inkling2_text"}


def st_header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        h = json.loads(f.read(n))
    h.pop("__metadata__", None)
    return h, 8 + n


@dataclass(frozen=True)
class _T:
    file: Path
    start: int  # absolute byte offset
    dtype: str
    shape: tuple[int, ...]

    def load(self) -> np.ndarray:
        dt = np.dtype(ST_DTYPES[self.dtype])
        n = int(np.prod(self.shape))
        with open(self.file, "rb") as f:
            f.seek(self.start)
            return np.frombuffer(f.read(n * dt.itemsize), dtype=dt).reshape(self.shape)


class SafetensorsSource:
    def __init__(self, d: Path, model_type: str, hidden: int, inter: int) -> None:
        self.model_type, self.hidden, self.inter = model_type, hidden, inter
        self.per: dict[tuple[int, int, str, str], _T] = {}
        self.stacked: dict[tuple[int, str], _T] = {}
        for f in sorted(Path(d).glob("*.safetensors")):
            h, base = st_header(f)
            for name, v in h.items():
                t = _T(f, base + v["data_offsets"][0], v["dtype"], tuple(v["shape"]))
                if m := PER_EXPERT.search(name):
                    key = (int(m.group(1)), int(m.group(2)), PROJ_NAMES[m.group(3)], KIND_SUFFIX[m.group(4)])
                    self.per[key] = t
                elif (m := STACKED_RE.search(name)) and len(t.shape) == 3 and "attention" not in name:
                    # (JetMoe's self_attention.experts.input_linear are attention experts, not MLP)
                    self.stacked[(int(m.group(1)), STACKED[m.group(2)])] = t
        self._cache: dict = {}

    def _stack(self, layer: int, role: str) -> np.ndarray:
        k = (layer, role)
        if k not in self._cache:
            self._cache[k] = self.stacked[k].load()
        return self._cache[k]

    def piece(self, layer: int, e: int, proj: str, kind: str) -> np.ndarray:
        if (layer, e, proj, kind) in self.per:
            return self.per[(layer, e, proj, kind)].load()
        if kind != "weight":
            raise KeyError((layer, e, proj, kind))
        H, I = self.hidden, self.inter
        if proj == "down":
            d = self._stack(layer, "d")[e]
            return d if d.shape == (H, I) else np.ascontiguousarray(d.T)  # [I, H] stored transposed
        gu = self._stack(layer, "gu")[e]
        if gu.shape == (2 * I, H):  # [2I, H]: gate rows then up rows (or even/odd rows)
            if self.model_type in INTERLEAVED:
                return np.ascontiguousarray(gu[0::2] if proj == "gate" else gu[1::2])
            return gu[:I] if proj == "gate" else gu[I:]
        assert gu.shape == (H, 2 * I), gu.shape
        if self.model_type in INTERLEAVED:  # [H, 2I], gate = even columns, up = odd
            cols = gu[:, 0::2] if proj == "gate" else gu[:, 1::2]
        else:  # [H, 2I], gate columns then up columns
            cols = gu[:, :I] if proj == "gate" else gu[:, I:]
        return np.ascontiguousarray(cols.T)

    def has(self, layer: int, e: int, proj: str, kind: str) -> bool:
        try:
            self.piece(layer, e, proj, kind)
            return True
        except KeyError:
            return False


class GGUFSource:
    """Per-expert pieces of the stacked blk.L.ffn_*_exps tensors, as uint8 [rows, row_bytes]."""

    def __init__(self, path: Path) -> None:
        from gguf import GGUFReader
        from gguf.constants import GGML_QUANT_SIZES

        r = GGUFReader(path)
        self.tensors = {t.name: t for t in r.tensors}
        self.sizes = GGML_QUANT_SIZES

    def block(self, layer: int, proj: str) -> tuple[int, int]:
        t = self.tensors[f"blk.{layer}.ffn_{proj}_exps.weight"]
        return self.sizes[t.tensor_type]  # (weights per block, bytes per block)

    def type_name(self, layer: int, proj: str) -> str:
        return self.tensors[f"blk.{layer}.ffn_{proj}_exps.weight"].tensor_type.name

    def piece(self, layer: int, e: int, proj: str, kind: str) -> np.ndarray:
        if kind != "weight":
            raise KeyError((layer, e, proj, kind))
        t = self.tensors[f"blk.{layer}.ffn_{proj}_exps.weight"]
        cols, rows, experts = (int(x) for x in t.shape)  # GGML order
        raw = np.asarray(t.data).view(np.uint8).reshape(experts, rows, -1)
        return raw[e]

    def has(self, layer: int, e: int, proj: str, kind: str) -> bool:
        return kind == "weight" and f"blk.{layer}.ffn_{proj}_exps.weight" in self.tensors


def bf16_to_f32(a: np.ndarray) -> np.ndarray:
    return (a.astype(np.uint32) << 16).view(np.float32)


def oriented(piece: np.ndarray, rec: dict) -> np.ndarray:
    """The orientation rule: every record holds its piece in the formats table's orientation (gate/up
    [I, H], down [H, I]), whatever the checkpoint stores (Llama4 / Aria / gpt-oss stacks are stored
    transposed and staged transposed back). The record's shape, with its sliced dim's extent left
    open, must be the piece's (GGUF records count weights along a row: rows only)."""
    shape, sl = list(rec["shape"]), rec.get("slice")
    if rec.get("dtype", "").startswith("gguf:"):
        assert shape[0] == piece.shape[0] or (sl is not None and sl["dim"] == 0), (shape, piece.shape)
        return piece
    assert len(shape) == piece.ndim and all(a == b for i, (a, b) in enumerate(zip(piece.shape, shape))
                                            if sl is None or i != sl["dim"]), \
        f"record shape {shape} (slice {sl}) is not the table orientation of the piece {list(piece.shape)}"
    return piece


def expected(src, piece: np.ndarray, rec: dict, layer: int, proj: str) -> bytes:
    """The bytes the manifest record should hold for this source piece: slice, then conversion."""
    sl = rec.get("slice")
    p = oriented(piece, rec)
    if sl is not None:
        a, b = sl["start"], sl["stop"]
        if isinstance(src, GGUFSource) and sl["dim"] == 1:  # weights along a row -> bytes
            wpb, bpb = src.block(layer, proj)
            assert a % wpb == 0 and b % wpb == 0, f"slice {sl} not on {wpb}-weight blocks"
            a, b = a // wpb * bpb, b // wpb * bpb
        p = p[a:b] if sl["dim"] == 0 else p[:, a:b]
    if rec["dtype"] == "f32" and p.dtype == np.uint16:  # bf16 staged as exact f32 (FP8_BLOCK scales)
        p = bf16_to_f32(p)
    return np.ascontiguousarray(p).tobytes()


def source_for(d: Path, rec: dict):
    exp = rec["expected"]
    ggufs = sorted(Path(d).glob("*.gguf"))
    if ggufs:
        return GGUFSource(ggufs[0])
    return SafetensorsSource(d, rec["model_type"], exp["hidden_size"], exp["moe_intermediate_size"])
