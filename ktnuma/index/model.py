"""Frozen descriptors of a model directory: what the readers find and what the planner consumes.

Nothing here does I/O. `ModelIndex` is the single hand-off from `formats`/`experts` to `plan`.
"""
from __future__ import annotations

from dataclasses import dataclass

PROJS: tuple[str, ...] = ("gate", "up", "down")
KINDS: tuple[str, ...] = ("weight", "scale")


@dataclass(frozen=True)
class TensorExtent:
    """One tensor of one file, as bytes: absolute file offset, length, dtype and shape.

    `dtype` is canonical lower-case (see formats.dtypes: "bf16", "f8_e4m3", "i32", ...,
    or "gguf:Q4_K"). `shape` is row-major in PyTorch order (GGUF shapes are reversed
    from GGML order by the reader); for GGUF it counts weights, not blocks.
    """

    name: str
    file: int  # index into ModelIndex.files
    offset: int  # absolute byte offset in the file
    nbytes: int
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class SourceFile:
    path: str  # absolute path as found in the model dir (symlinks not resolved)
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class PieceGroup:
    """All experts' pieces of one (layer, proj, kind), uniform in dtype and shape.

    Piece e (expert `first + k`, k = position in the tuples) lives at
    files[k] / offsets[k], `nbytes` long, and is laid out as `shape` (2-D [rows, cols], or
    1-D for per-channel scales, which count as [n, 1]). GGUF: shape in weights, each row
    `cols // quantum` blocks of `quantum_bytes`.

    Orientation (from the formats table): `i_dim` is the stored dim that indexes the MoE
    intermediate size I (None: I-independent, copied whole to every node under tp);
    `i_unit` is how many I elements one stored index along `i_dim` covers (8 for int4
    packed in int32 along I, 2 for mxfp4 bytes, 128 for fp8 block scales, gs for group
    scales, 1 otherwise); `unit_note` names that unit for error messages.
    `conversion` names a CONVERSIONS entry applied while staging (None: bytes as stored; a
    transposing one stages the piece, or its cut, transposed), `staged_dtype` is the dtype after
    it. `row_stride` (strided pieces: a chunk or a row interleave of a stacked tensor) is the
    stored distance between rows of `row_bytes` each.
    """

    layer: int
    proj: str  # gate | up | down
    kind: str  # weight | scale
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    files: tuple[int, ...]
    offsets: tuple[int, ...]
    tensors: tuple[str, ...]
    i_dim: int | None
    i_unit: int = 1
    unit_note: str = ""
    quantum: int = 1  # column granularity in elements (GGUF block size), 1 otherwise
    quantum_bytes: int = 0  # bytes per quantum along a row (itemsize when quantum == 1)
    conversion: str | None = None
    staged_dtype: str = ""
    first: int = 0  # expert number of position 0
    shard: int | None = None  # amx pre-sharded: the `.numa.{n}` shard of this group
    globals: tuple[float, ...] | None = None  # NVFP4: each piece's per-tensor f32 scale (manifest global_scale)
    row_stride: int = 0  # stored bytes from one row to the next when the rows are not contiguous (0: row_bytes)

    @property
    def strided(self) -> bool:
        return self.row_stride not in (0, self.row_bytes)

    @property
    def span(self) -> int:
        """Source bytes from a piece's offset to the end of its last row."""
        return (self.rows - 1) * self.row_stride + self.row_bytes if self.strided else self.nbytes

    @property
    def count(self) -> int:
        return len(self.offsets)

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def cols(self) -> int:
        return self.shape[1] if len(self.shape) > 1 else 1

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.rows


@dataclass(frozen=True)
class ModelConfig:
    """The manifest's `config` keys (plus what the readers cross-checked them with)."""

    num_experts: int
    experts_per_tok: int | None
    hidden_size: int
    moe_intermediate_size: int
    layers: tuple[int, ...]  # MoE layers that will be staged (checkpoint numbers)
    num_hidden_layers: int | None = None
    group_size: int | None = None  # quant group size where the format has one

    def as_manifest(self) -> dict:
        return {
            "num_experts": self.num_experts,
            "experts_per_tok": self.experts_per_tok,
            "hidden_size": self.hidden_size,
            "moe_intermediate_size": self.moe_intermediate_size,
            "layers": list(self.layers),
        }


@dataclass(frozen=True)
class ModelIndex:
    """A model directory understood: files, format, naming, config, and routed-expert pieces.

    `groups` holds one PieceGroup per (layer, proj, kind[, shard]) for layers in
    `config.layers`, ordered by layer, then PROJS order, then KINDS order (then shard).
    `all_layers` lists every MoE layer found (including ones at/after num_hidden_layers).
    """

    root: str
    format: str  # bf16 | fp8 | rawint4 | gptq-int4 | mxfp4 | gguf:<T> | amx-int4 | amx-int8
    naming: str  # deepseek | mixtral | mistral | packed | v4flash | amx | gguf
    files: tuple[SourceFile, ...]
    config: ModelConfig
    groups: tuple[PieceGroup, ...]
    all_layers: tuple[int, ...] = ()
    shards: int | None = None  # amx pre-sharded: number of `.numa.{n}` shards
    notes: tuple[tuple[str, str], ...] = ()  # (topic, text): how the format was staged (manifest model.notes)

    def layer_groups(self, layer: int) -> tuple[PieceGroup, ...]:
        return tuple(g for g in self.groups if g.layer == layer)
