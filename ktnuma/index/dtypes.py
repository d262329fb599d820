"""One table per concept: element dtypes, GGML block types, staging conversions."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction


@dataclass(frozen=True)
class DType:
    name: str  # canonical, lower case; also the manifest's `dtype`
    itemsize: int
    safetensors: str | None  # name in a safetensors header
    numpy: str | None  # numpy dtype string where numpy has one


# Every safetensors dtype, plus the names ktnuma stages.
DTYPES: dict[str, DType] = {
    d.name: d
    for d in (
        DType("bool", 1, "BOOL", "bool"),
        DType("u8", 1, "U8", "u1"),
        DType("i8", 1, "I8", "i1"),
        DType("f8_e4m3", 1, "F8_E4M3", None),
        DType("f8_e5m2", 1, "F8_E5M2", None),
        DType("f8_e8m0", 1, "F8_E8M0", None),
        DType("i16", 2, "I16", "<i2"),
        DType("u16", 2, "U16", "<u2"),
        DType("f16", 2, "F16", "<f2"),
        DType("bf16", 2, "BF16", None),
        DType("i32", 4, "I32", "<i4"),
        DType("u32", 4, "U32", "<u4"),
        DType("f32", 4, "F32", "<f4"),
        DType("i64", 8, "I64", "<i8"),
        DType("u64", 8, "U64", "<u8"),
        DType("f64", 8, "F64", "<f8"),
    )
}
SAFETENSORS_DTYPES: dict[str, DType] = {d.safetensors: d for d in DTYPES.values() if d.safetensors}

# Sub-byte safetensors dtypes (F4, F6_*) are packed; ktnuma does not stage them and the
# reader refuses them as unknown rather than guessing a size.


@dataclass(frozen=True)
class GGMLType:
    name: str
    id: int
    block: int  # weights per block
    type_size: int  # bytes per block
    f16_fields: tuple[int, ...] = ()  # byte offsets of a block's f16 scale fields (d, dmin, ...)


GGML_TYPES: dict[str, GGMLType] = {
    t.name: t
    for t in (
        GGMLType("F32", 0, 1, 4),
        GGMLType("F16", 1, 1, 2),
        GGMLType("Q4_0", 2, 32, 18, (0,)),
        GGMLType("Q4_1", 3, 32, 20),
        GGMLType("Q5_0", 6, 32, 22),
        GGMLType("Q5_1", 7, 32, 24),
        GGMLType("Q8_0", 8, 32, 34),
        GGMLType("Q8_1", 9, 32, 40),
        GGMLType("Q2_K", 10, 256, 84, (80, 82)),
        GGMLType("Q3_K", 11, 256, 110, (108,)),
        GGMLType("Q4_K", 12, 256, 144, (0, 2)),
        GGMLType("Q5_K", 13, 256, 176, (0, 2)),
        GGMLType("Q6_K", 14, 256, 210, (208,)),
        GGMLType("Q8_K", 15, 256, 292),
        GGMLType("IQ2_XXS", 16, 256, 66),
        GGMLType("IQ2_XS", 17, 256, 74),
        GGMLType("IQ3_XXS", 18, 256, 98),
        GGMLType("IQ1_S", 19, 256, 50),
        GGMLType("IQ4_NL", 20, 32, 18),
        GGMLType("IQ3_S", 21, 256, 110),
        GGMLType("IQ2_S", 22, 256, 82),
        GGMLType("IQ4_XS", 23, 256, 136),
        GGMLType("I8", 24, 1, 1),
        GGMLType("I16", 25, 1, 2),
        GGMLType("I32", 26, 1, 4),
        GGMLType("I64", 27, 1, 8),
        GGMLType("F64", 28, 1, 8),
        GGMLType("IQ1_M", 29, 256, 56),
        GGMLType("BF16", 30, 1, 2),
    )
}
GGML_BY_ID: dict[int, GGMLType] = {t.id: t for t in GGML_TYPES.values()}


def gguf_dtype(t: GGMLType) -> str:
    return f"gguf:{t.name}"


def ggml_nbytes(t: GGMLType | str, count: int) -> int:
    """Bytes of `count` weights of GGML type `t` (`count` a multiple of its block): THE formula."""
    g = GGML_TYPES[t] if isinstance(t, str) else t
    return count // g.block * g.type_size


FP8_BLOCK = 128  # FP8 block scales cover 128 x 128 weights


def numpy_view(dtype: str) -> str:
    """numpy dtype of a view of staged `dtype` (raw bits where numpy has no type: bf16 -> <u2, f8 -> u1)."""
    d = DTYPES[dtype]
    return d.numpy or {1: "u1", 2: "<u2"}[d.itemsize]


def itemsize(dtype: str) -> int:
    """Bytes per stored element for non-GGUF dtypes."""
    return DTYPES[dtype].itemsize


# ---------------------------------------------------------------- conversions applied while staging
# Each function fills `dst` from `src` (raw bytes); numpy is imported inside (workers import this lazily).
def _ue8m0_to_bf16(src: memoryview | bytes, dst: memoryview) -> None:
    """UE8M0 exponent byte -> bf16 bits (u8 << 7): exact for every code but 0 and 255."""
    import numpy as np

    out = np.frombuffer(dst, dtype="<u2")
    np.left_shift(np.frombuffer(src, dtype="u1"), 7, out=out, dtype="<u2", casting="unsafe")


def _f16_to_f32(src: memoryview | bytes, dst: memoryview) -> None:
    import numpy as np

    np.frombuffer(dst, dtype="<f4")[...] = np.frombuffer(src, dtype="<f2")


def _bf16_to_f32(src: memoryview | bytes, dst: memoryview) -> None:
    """bf16 -> f32, exact (the bf16 bits become the f32's upper half)."""
    import numpy as np

    out = np.frombuffer(dst, dtype="<u4")
    np.left_shift(np.frombuffer(src, dtype="<u2"), 16, out=out, dtype="<u4", casting="unsafe")


def _bf16_transposed(phase: int | None) -> Callable[..., None]:
    def fn(src: memoryview | bytes, dst: memoryview, rows: int) -> None:
        """The gathered [rows, n] bf16 piece staged as [n, rows] (Llama4/Aria gate/up and down are stored
        [H, I] and [I, H], the engine takes [I, H] and [H, I]); with a phase, only every other element
        of each row from `phase` is kept first (gpt-oss gate = even, up = odd columns of gate_up_proj).
        Bits moved, never changed."""
        import numpy as np

        a = np.frombuffer(src, dtype="<u2").reshape(rows, -1)
        if phase is not None:
            a = a[:, phase::2]
        np.copyto(np.frombuffer(dst, dtype="<u2").reshape(a.shape[1], rows), a.T)
    return fn


@dataclass(frozen=True)
class Conversion:
    """A byte transform applied while staging: n source elements -> n * keep staged elements.

    A transposing conversion (`transposes`) takes the piece's gathered rows as a whole, [rows, n]
    elements, and stages them as [n * keep, rows]: its writes are never cut between rows, and the
    staged shape is the gathered one reversed (`fn(src, dst, rows)`; the others are `fn(src, dst)`)."""

    name: str
    src: str
    dst: str
    fn: Callable[..., None]
    keep: Fraction = Fraction(1)  # share of the source elements that are staged (1/2: de-interleave)
    transposes: bool = False

    @property
    def ratio(self) -> Fraction:
        """Staged bytes per source byte (1/2 for a bf16 de-interleave: a write's byte count must
        come out whole, which the planner checks)."""
        return Fraction(DTYPES[self.dst].itemsize, DTYPES[self.src].itemsize) * self.keep


CONVERSIONS: dict[str, Conversion] = {
    c.name: c
    for c in (
        Conversion("ue8m0->bf16", "u8", "bf16", _ue8m0_to_bf16),  # mxfp4 scales
        Conversion("f16->f32", "f16", "f32", _f16_to_f32),  # GPTQ scales
        Conversion("bf16->f32", "bf16", "f32", _bf16_to_f32),  # llm-compressor FP8_BLOCK scales
        Conversion("bf16-T", "bf16", "bf16", _bf16_transposed(None), transposes=True),  # llama4/aria
        Conversion("bf16-even-T", "bf16", "bf16", _bf16_transposed(0), Fraction(1, 2), True),  # gpt-oss gate
        Conversion("bf16-odd-T", "bf16", "bf16", _bf16_transposed(1), Fraction(1, 2), True),  # gpt-oss up
    )
}


def transposes(name: str | None) -> bool:
    """Whether conversion `name` stages a piece's gathered rows transposed."""
    return name is not None and CONVERSIONS[name].transposes


def convert(name: str, src: memoryview | bytes, dst: memoryview, rows: int = 1) -> None:
    """Apply conversion `name` from `src` bytes into `dst` (len(dst) == len(src) * ratio); `rows`: the
    rows `src` was gathered as (what a transposing conversion turns into columns)."""
    c = CONVERSIONS[name]
    if c.transposes:
        c.fn(src, dst, rows)
    else:
        c.fn(src, dst)
